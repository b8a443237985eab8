//! `walcore-basebackup` when things go wrong: connection and authentication failures and a
//! server of another cluster (each a clear error, nothing in the catalog), `take` killed with
//! SIGKILL at a random moment (only complete backups are ever listed, the next take works),
//! and the restores it must refuse (a non-empty directory, a target older than every backup, a
//! corrupted object).

use std::time::{Duration, Instant};

use walcore_e2e::repo::{Codec, KEY_1};
use walcore_e2e::workload::{create_table, insert_batch};
use walcore_e2e::{Cluster, Repo, sys};

use crate::backup::{Tool, conninfo, empty_cluster, verify_backup};
use crate::replication::set_local_replication_auth;
use crate::scenario::ARCHIVE_WAIT;
use crate::throughput::Rng;

fn source(repo: &Repo, codec: &Codec) -> Cluster {
    let mut src = Cluster::new();
    src.archive_with_walcore();
    src.set_env(&repo.env(codec));
    src.start();
    create_table(&src);
    src
}

/// Asserts that a take failed with a message containing `needle`, and that the catalog is
/// still empty.
fn assert_take_fails(tool: &Tool, repo: &Repo, conninfo: &str, needle: &str, what: &str) {
    let out = tool.run(&["take", "--dbname", conninfo, "--wal-timeout", "20s"]);
    assert!(
        !out.status.success(),
        "{what}: take succeeded:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(needle),
        "{what}: expected {needle:?} in the error:\n{}",
        out.stderr
    );
    assert!(
        out.stdout.trim().is_empty(),
        "{what}: printed a backup ID: {}",
        out.stdout
    );
    assert_eq!(
        tool.list(),
        Vec::<String>::new(),
        "{what}: catalog not empty"
    );
    assert!(
        !repo.keys().iter().any(|k| k.starts_with("catalog/")),
        "{what}: a catalog record was written: {:?}",
        repo.keys()
    );
}

#[test]
fn failed_connections_write_nothing() {
    let repo = Repo::file();
    let codec = Codec::encrypted(KEY_1);
    let src = source(&repo, &codec);
    src.archive_all(ARCHIVE_WAIT);
    let tool = Tool::new(&src, repo.env(&codec));

    let nowhere = src.dir().join("no-such-socket-dir");
    assert_take_fails(
        &tool,
        &repo,
        &format!(
            "host={} port=5432 user=postgres connect_timeout=3",
            nowhere.display()
        ),
        &nowhere.display().to_string(),
        "unreachable server",
    );

    src.psql("create role plain login");
    assert_take_fails(
        &tool,
        &repo,
        &conninfo(&src, "").replace("user=postgres", "user=plain"),
        "replication",
        "a user without the REPLICATION attribute",
    );

    src.psql("set password_encryption = 'scram-sha-256'; create role rep replication login password 'right-one'");
    set_local_replication_auth(&src, "scram-sha-256");
    assert_take_fails(
        &tool,
        &repo,
        &conninfo(&src, "password=wrong-one").replace("user=postgres", "user=rep"),
        "password authentication failed",
        "a wrong password",
    );

    let foreign = Cluster::foreign();
    foreign.start();
    assert_take_fails(
        &tool,
        &repo,
        &conninfo(&foreign, ""),
        "system identifier",
        "a server of another cluster",
    );

    // The right password over SCRAM takes a backup.
    let scram = conninfo(&src, "password=right-one").replace("user=postgres", "user=rep");
    let id = tool.ok(&["take", "--dbname", &scram]).trim().to_owned();
    assert_eq!(tool.list(), vec![id]);
}

#[test]
fn take_killed_at_a_random_moment() {
    let repo = Repo::file();
    let codec = Codec::encrypted(KEY_1);
    let src = source(&repo, &codec);
    insert_batch(&src, "pre", 150_000);
    let tool = Tool::new(&src, repo.env(&codec));

    let t0 = Instant::now();
    let first = tool.take(&src, &[]);
    let took = t0.elapsed();
    eprintln!("a complete take took {took:?}");
    let mut complete = vec![first];
    let mut rng = Rng::seeded();
    for round in 0..3 {
        let delay = Duration::from_micros(rng.below(took.as_micros() as u64));
        let args = ["take", "--dbname", &conninfo(&src, "")];
        let mut child = tool
            .command(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn take");
        std::thread::sleep(delay);
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait for take");
        let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        eprintln!(
            "round {round}: killed after {delay:?} ({:?}); printed {printed:?}",
            out.status
        );
        let listed = tool.list();
        // A take that printed its ID had recorded it; one killed before that may or may not
        // have: either way, what is listed is complete.
        if !printed.is_empty() {
            complete.push(printed);
        } else if let Some(extra) = listed.iter().find(|id| !complete.contains(id)) {
            complete.push(extra.clone());
        }
        assert_eq!(listed, complete, "round {round}: list shows something else");
        for id in &listed {
            tool.ok(&["show", id]);
        }
    }
    // The server let go of the killed backups: the next take works.
    let last = tool.take(&src, &[]);
    complete.push(last.clone());
    assert_eq!(tool.list(), complete);
    let dst = empty_cluster(15);
    let data = dst.data.to_string_lossy().into_owned();
    tool.ok(&[
        "restore",
        "--pgdata",
        &data,
        "--backup",
        &last,
        "--restore-command",
        "false",
    ]);
    verify_backup(&dst);
}

#[test]
fn restores_it_must_refuse() {
    let repo = Repo::file();
    let codec = Codec::plain();
    let src = source(&repo, &codec);
    insert_batch(&src, "pre", 20_000);
    let tool = Tool::new(&src, repo.env(&codec));
    let id = tool.take(&src, &[]);

    // A non-empty directory is refused and left alone.
    let dst = empty_cluster(15);
    sys::server_mkdir(&dst.data);
    let keep = dst.data.join("precious");
    std::fs::write(&keep, "keep me").expect("write");
    let data = dst.data.to_string_lossy().into_owned();
    let out = tool.run(&["restore", "--pgdata", &data, "--restore-command", "false"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("is not empty"), "{}", out.stderr);
    assert_eq!(
        std::fs::read_to_string(&keep).expect("still there"),
        "keep me"
    );
    std::fs::remove_file(&keep).expect("remove");

    // A target older than every backup, and a time without a zone.
    let out = tool.run(&[
        "restore",
        "--pgdata",
        &data,
        "--target-time",
        "2000-01-01 00:00:00+00",
        "--restore-command",
        "false",
    ]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("no backup finished before") && out.stderr.contains(&id),
        "{}",
        out.stderr
    );
    let out = tool.run(&[
        "restore",
        "--pgdata",
        &data,
        "--target-time",
        "2000-01-01 00:00:00",
    ]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("time zone"), "{}", out.stderr);
    assert_eq!(
        std::fs::read_dir(&dst.data).expect("dir").count(),
        0,
        "a refused restore wrote something"
    );

    // A corrupted object stops the restore, naming it; the directory never gets a pg_control.
    let key = format!("backup/{id}/data/base.tar");
    let path = repo.path(&key);
    let mut bytes = std::fs::read(&path).expect("read the object");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    // The store writes objects read-only; replace it as its owner would.
    std::fs::remove_file(&path).expect("remove");
    std::fs::write(&path, &bytes).expect("write the corrupted object");
    sys::give_to_server_user(&path, 0o444);
    let out = tool.run(&["restore", "--pgdata", &data, "--restore-command", "false"]);
    assert!(!out.status.success(), "restored a corrupted backup");
    assert!(
        out.stderr.contains(&key),
        "the error does not name {key}:\n{}",
        out.stderr
    );
    assert!(
        !dst.data.join("global/pg_control").exists(),
        "a failed restore left a pg_control"
    );
}

/// A take whose WAL never reaches the repository (the server archives nothing) fails after
/// `--wal-timeout`, says why, and removes the objects it had stored.
#[test]
fn take_whose_wal_is_never_archived_leaves_nothing() {
    let repo = Repo::file();
    let codec = Codec::encrypted(KEY_1);
    let src = Cluster::new();
    src.set("archive_mode", "off");
    src.start();
    create_table(&src);
    insert_batch(&src, "pre", 5_000);
    let tool = Tool::new(&src, repo.env(&codec));
    let out = tool.run(&[
        "take",
        "--dbname",
        &conninfo(&src, ""),
        "--wal-timeout",
        "2s",
    ]);
    assert!(!out.status.success(), "take succeeded without its WAL");
    for needle in [
        "was not archived",
        "archive_command",
        "its objects were removed",
    ] {
        assert!(
            out.stderr.contains(needle),
            "{needle:?} not in:\n{}",
            out.stderr
        );
    }
    let keys = repo.keys();
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with("backup/") || k.starts_with("catalog/")),
        "the failed take left objects: {keys:?}"
    );
    assert_eq!(tool.list(), Vec::<String>::new());
}
