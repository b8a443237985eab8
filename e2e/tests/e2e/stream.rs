//! `walcore stream` against real PostgreSQL 15 with archiving off: the slot exists before a
//! byte streams; completed segments land in the repository byte for byte as the server wrote
//! them; the slot is released only as far as the repository holds; a killed stream started
//! again goes on where the repository ends, with no hole; and when the slot no longer holds
//! the segment after the repository's newest, the hole is refused by name.

use std::process::Child;
use std::time::{Duration, Instant};

use walcore_e2e::repo::{Codec, KEY_1, wal_key};
use walcore_e2e::workload::{create_table, insert_batch};
use walcore_e2e::{Cluster, Repo, bins};

use crate::backup::{Tool, conninfo};

const SLOT: &str = "walcore_e2e";

/// `walcore stream` in the background, its log in the cluster's directory.
fn spawn_stream(tool: &Tool, cluster: &Cluster, log: &str) -> Child {
    let conn = conninfo(cluster, "");
    let mut cmd = tool.command(&["stream", "--dbname", &conn, "--slot", SLOT]);
    let file = std::fs::File::create(cluster.dir().join(log)).expect("stream log");
    cmd.stdout(std::process::Stdio::null()).stderr(file);
    cmd.spawn().expect("spawn walcore stream")
}

fn wait_stored(repo: &Repo, names: &[String], cluster: &Cluster, log: &str) {
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let keys = repo.keys();
        if names.iter().all(|n| keys.contains(&wal_key(n))) {
            return;
        }
        assert!(
            Instant::now() < until,
            "segments {names:?} were not streamed; stream log:\n{}",
            std::fs::read_to_string(cluster.dir().join(log)).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn slot_restart(cluster: &Cluster) -> String {
    cluster.psql(&format!(
        "select coalesce(restart_lsn::text, '') from pg_replication_slots where slot_name = '{SLOT}'"
    ))
}

/// The segment as `walcore-restore` gives it back.
fn restored(env: &[(String, String)], name: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(name);
    let out = bins::restore(env, name, &file);
    assert!(out.status.success(), "restore {name}: {}", out.stderr);
    std::fs::read(&file).expect("restored file")
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn streamed_segments_are_the_servers_and_a_restarted_stream_leaves_no_hole() {
    let repo = Repo::file();
    let codec = Codec::encrypted(KEY_1);
    let env = repo.env(&codec);
    let src = Cluster::new();
    src.set("archive_mode", "off");
    src.start();
    create_table(&src);
    let mut tool = Tool::new(&src, env.clone());
    tool.program = src.install(bins::WALCORE);

    let child = spawn_stream(&tool, &src, "stream-1.log");
    let until = Instant::now() + Duration::from_secs(30);
    while slot_restart(&src).is_empty() {
        assert!(Instant::now() < until, "no slot reserving WAL");
        std::thread::sleep(Duration::from_millis(100));
    }
    let first: Vec<String> = (0..3)
        .map(|i| {
            insert_batch(&src, &format!("s{i}"), 300);
            src.switch_wal()
        })
        .collect();
    wait_stored(&repo, &first, &src, "stream-1.log");
    for name in &first {
        let in_pg_wal = std::fs::read(src.data.join("pg_wal").join(name)).expect("pg_wal");
        assert!(
            restored(&env, name) == in_pg_wal,
            "{name} streamed differs from pg_wal"
        );
    }
    // The slot is released as far as the repository holds: up to the end of the newest
    // stored segment (pg_walfile_name names the segment an end position falls in).
    let newest = first.last().expect("segments").clone();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let held = src.psql(&format!(
            "select pg_walfile_name(restart_lsn) from pg_replication_slots where slot_name = '{SLOT}'"
        ));
        assert!(
            held <= newest,
            "the slot moved to {held}, past the stored {newest}"
        );
        if held == newest {
            break;
        }
        assert!(Instant::now() < until, "the slot stays at {held}");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop(child);

    // Killed; more WAL meanwhile; started again: it goes on from the repository's end.
    let meanwhile: Vec<String> = (0..2)
        .map(|i| {
            insert_batch(&src, &format!("m{i}"), 300);
            src.switch_wal()
        })
        .collect();
    let child = spawn_stream(&tool, &src, "stream-2.log");
    wait_stored(&repo, &meanwhile, &src, "stream-2.log");
    stop(child);
    let segments: Vec<u64> = repo
        .keys()
        .iter()
        .filter(|k| k.starts_with("wal/00000001/"))
        .filter_map(|k| u64::from_str_radix(&k[k.len() - 8..], 16).ok())
        .collect();
    let (lo, hi) = (segments[0], segments[segments.len() - 1]);
    assert_eq!(
        segments,
        (lo..=hi).collect::<Vec<_>>(),
        "a hole in the streamed WAL"
    );
    // status sees the stream's newest segment as the last archived one.
    let status: serde_json::Value =
        serde_json::from_str(&tool.ok(&["status", "--json"])).expect("status");
    assert_eq!(
        status["last_archived"]["segment"],
        meanwhile.last().expect("segments").as_str(),
        "{status:#}"
    );

    // The slot dropped, WAL written, the slot made again past the repository's end: the
    // segments between are gone from the slot. A hole, refused by name.
    src.psql(&format!("select pg_drop_replication_slot('{SLOT}')"));
    for i in 0..2 {
        insert_batch(&src, &format!("h{i}"), 300);
        src.switch_wal();
    }
    // A new physical slot holds WAL from the last checkpoint's redo point: past those two.
    src.psql("checkpoint");
    src.psql(&format!(
        "select pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    let out = tool.run(&["stream", "--dbname", &conninfo(&src, ""), "--slot", SLOT]);
    assert!(!out.status.success(), "a hole was streamed over");
    assert!(
        out.stderr.contains("gone from the server") && out.stderr.contains("--accept-hole"),
        "{}",
        out.stderr
    );
}
