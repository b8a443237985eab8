//! `walcore verify` on real repositories written by real PostgreSQL: a clean repository exits
//! 0 and a second run reads only what is new; then one of each fault an operator can meet
//! (a flipped byte, a lost segment, a truncated backup archive, a backup without its WAL, an
//! object of another key, a segment of another cluster), each reported with its key, its kind
//! and what it costs, on `file://` and on S3, encrypted.

use std::time::Duration;

use walcore_e2e::repo::{Codec, KEY_1, KEY_2, flip_byte, wal_key};
use walcore_e2e::workload::{create_table, insert_batch};
use walcore_e2e::{Cluster, Moto, Repo, bins, moto};

use crate::backup::Tool;
use crate::scenario::ARCHIVE_WAIT;

#[test]
fn verify_reports_each_fault_that_costs_a_restore_on_file() {
    verify_faults(&Repo::file());
}

#[test]
fn verify_reports_each_fault_that_costs_a_restore_on_s3() {
    if !moto::s3_enabled("verify::verify_reports_each_fault_that_costs_a_restore_on_s3") {
        return;
    }
    verify_faults(&Repo::s3(Moto::shared()));
}

/// The segment (timeline 1, 16 MiB) that holds `lsn` (`X/X`).
fn segment_of(lsn: &str) -> String {
    let (hi, lo) = lsn.split_once('/').expect("an X/X LSN");
    let hi = u64::from_str_radix(hi, 16).expect("hex");
    let lo = u64::from_str_radix(lo, 16).expect("hex");
    let pos = (hi << 32) | lo;
    let segno = pos >> 24;
    format!("00000001{:08X}{:08X}", segno >> 8, segno & 0xFF)
}

/// Writes a little and ends the segment; returns the completed segment's name.
fn next_segment(c: &Cluster, tag: &str) -> String {
    insert_batch(c, tag, 200);
    c.switch_wal()
}

/// `walcore verify --json`: the exit status and the report.
fn verify(tool: &Tool, extra: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut args = vec!["verify", "--json"];
    args.extend_from_slice(extra);
    let out = tool.run(&args);
    let report = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify --json printed no report ({e}); status {:?}\n{}\n{}",
            out.status, out.stdout, out.stderr
        )
    });
    (out.status.code(), report)
}

/// The problem reported for `key`, with its kind and consequences.
fn problem<'a>(report: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .find(|p| p["key"] == key)
        .unwrap_or_else(|| panic!("no problem reported for {key}:\n{report:#}"))
}

fn consequences(p: &serde_json::Value) -> String {
    p["consequences"]
        .as_array()
        .expect("consequences")
        .iter()
        .map(|c| c.as_str().unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" | ")
}

fn verify_faults(repo: &Repo) {
    let codec = Codec::encrypted(KEY_1);
    let env = repo.env(&codec);
    let src = Cluster::archiving_into(&env);
    create_table(&src);
    insert_batch(&src, "pre", 1_000);
    let tool = Tool::walcore(&src, env.clone());

    // Backup 1, four segments, backup 2, four segments.
    let b1 = tool.take(&src, &[]);
    let between: Vec<String> = (0..4)
        .map(|i| next_segment(&src, &format!("w{i}")))
        .collect();
    let b2 = tool.take(&src, &[]);
    let after: Vec<String> = (0..4)
        .map(|i| next_segment(&src, &format!("x{i}")))
        .collect();
    src.wait_archived(after.last().expect("segments"), ARCHIVE_WAIT);
    let show = |id: &str| -> serde_json::Value {
        serde_json::from_str(&tool.ok(&["show", id, "--json"])).expect("show --json")
    };
    let (r1, r2) = (show(&b1), show(&b2));

    // A clean repository: exit 0, everything read once.
    let (status, first) = verify(&tool, &[]);
    assert_eq!(status, Some(0), "clean repository:\n{first:#}");
    assert_eq!(first["problems"].as_array().map(Vec::len), Some(0));
    assert_eq!(first["backups_checked"], 2);
    let read = first["objects_read"].as_u64().expect("objects_read");
    let wal_objects = repo.keys().iter().filter(|k| k.starts_with("wal/")).count() as u64;
    assert!(
        read >= wal_objects + 4,
        "read {read} of {wal_objects} WAL objects and 2 backups"
    );
    assert!(
        first["window"]["from_backup"] == b1.as_str(),
        "the window starts at the oldest backup:\n{first:#}"
    );

    // A second run reads nothing; after one more segment, only that one.
    let (status, second) = verify(&tool, &[]);
    assert_eq!(status, Some(0), "{second:#}");
    assert_eq!(second["objects_read"], 0, "{second:#}");
    // Through the index: no full listing, nothing read again, the same window.
    let (status, indexed) = verify(&tool, &["--index"]);
    assert_eq!(status, Some(0), "{indexed:#}");
    assert_eq!(indexed["objects_read"], 0, "{indexed:#}");
    assert_eq!(indexed["window"], second["window"], "{indexed:#}");
    let newest = next_segment(&src, "y");
    src.wait_archived(&newest, ARCHIVE_WAIT);
    let before: Vec<String> = repo.keys();
    // The new segment through the index: read once, and again by the next full listing
    // (an index run cannot vouch for times it never listed).
    let (status, indexed) = verify(&tool, &["--index"]);
    assert_eq!(status, Some(0), "{indexed:#}");
    assert!(indexed["objects_read"].as_u64() >= Some(1), "{indexed:#}");
    let (status, third) = verify(&tool, &[]);
    assert_eq!(status, Some(0), "{third:#}");
    let new_keys = repo
        .keys()
        .iter()
        .filter(|k| !before.contains(k) || k.ends_with(&newest))
        .filter(|k| k.starts_with("wal/"))
        .count();
    assert_eq!(
        third["objects_read"].as_u64(),
        Some(new_keys as u64),
        "{third:#}"
    );
    // --full reads everything again.
    let (status, full) = verify(&tool, &["--full"]);
    assert_eq!(status, Some(0), "{full:#}");
    assert!(full["objects_read"].as_u64() > Some(read), "{full:#}");

    // One fault of each kind.
    // 1. A flipped byte in a WAL segment between the backups.
    let flipped = wal_key(&between[0]);
    let bytes = repo.read(&flipped).expect("stored");
    repo.tamper(&flipped, &flip_byte(&bytes, bytes.len() / 2));
    // 2. The same segment, encrypted with another key.
    let other_key = wal_key(&between[1]);
    let scratch = tempfile::tempdir().expect("temp dir");
    let file = scratch.path().join(&between[1]);
    let out = bins::restore(&env, &between[1], &file);
    assert!(
        out.status.success(),
        "restore {}: {}",
        between[1],
        out.stderr
    );
    let foreign_repo = Repo::file();
    let out = bins::archive(&foreign_repo.env(&Codec::encrypted(KEY_2)), &file);
    assert!(out.status.success(), "archive with key 2: {}", out.stderr);
    repo.tamper(
        &other_key,
        &foreign_repo.read(&other_key).expect("archived"),
    );
    // 3. The segment of the same name from another cluster.
    let wrong_cluster = wal_key(&between[2]);
    let foreign = foreign_segment(&between[2], &codec);
    repo.tamper(&wrong_cluster, &foreign);
    // 4. A segment after the last backup lost: a gap in the window.
    let lost = wal_key(&after[1]);
    repo.remove(&lost);
    // 5. Backup 1's base.tar cut in half.
    let archive = format!("backup/{b1}/data/base.tar");
    let bytes = repo.read(&archive).expect("base.tar");
    repo.tamper(&archive, &bytes[..bytes.len() / 2]);
    // 6. Backup 2 without the segment it starts in.
    let start2 = wal_key(&segment_of(r2["start_lsn"].as_str().expect("start_lsn")));
    repo.remove(&start2);

    // The index sees what walcore can see: the lost segments (the archive's newest
    // directory is listed again), not the rewrites of objects it verified before.
    let (status, indexed) = verify(&tool, &["--index"]);
    assert_eq!(status, Some(5), "damage exits 5:\n{indexed:#}");
    let (status, report) = verify(&tool, &[]);
    assert_eq!(status, Some(5), "damage exits 5:\n{report:#}");
    // Damage alerts (condition verify), as a failed verify does.
    let sink = crate::metrics::AlertSink::new();
    let mut alert_env = tool.env.clone();
    alert_env.extend(sink.env());
    let alerting = Tool {
        program: tool.program.clone(),
        env: alert_env,
        cwd: tool.cwd.clone(),
    };
    let (status, _) = verify(&alerting, &["--index"]);
    assert_eq!(status, Some(5));
    let fired = crate::metrics::events(&sink.file);
    assert!(
        fired
            .iter()
            .any(|e| e["condition"] == "verify" && e["status"] == "firing"),
        "no verify alert: {fired:#?}"
    );
    let expect = |key: &str, kind: &str, consequence: &str| {
        let p = problem(&report, key);
        assert_eq!(p["kind"], kind, "{key}:\n{p:#}");
        let c = consequences(p);
        assert!(c.contains(consequence), "{key}: {c}");
    };
    expect(&flipped, "corrupt", "no point-in-time recovery between");
    expect(&other_key, "wrong_key", "no point-in-time recovery between");
    expect(
        &wrong_cluster,
        "wrong_cluster",
        "no point-in-time recovery between",
    );
    expect(&lost, "gap", "no point-in-time recovery after");
    expect(
        &archive,
        "corrupt",
        &format!("backup {b1} can no longer be restored"),
    );
    expect(
        &start2,
        "missing",
        &format!("backup {b2} can no longer be restored"),
    );
    let p = problem(&report, &wrong_cluster);
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("system identifier")),
        "{p:#}"
    );
    let p = problem(&report, &other_key);
    assert!(
        p["detail"].as_str().is_some_and(|d| d.contains("key")),
        "{p:#}"
    );
    // The human form names them too.
    let out = tool.run(&["verify"]);
    assert_eq!(out.status.code(), Some(5), "{}", out.stderr);
    for key in [&flipped, &lost, &archive, &start2] {
        assert!(
            out.stdout.contains(key.as_str()),
            "{key} in:\n{}",
            out.stdout
        );
    }
    // Backup 1 alone: its archive, not the WAL of the window.
    let (status, one) = verify(&tool, &["--backup", &b1]);
    assert_eq!(status, Some(5), "{one:#}");
    assert_eq!(one["backups_checked"], 1);
    problem(&one, &archive);
    assert!(
        one["problems"]
            .as_array()
            .expect("problems")
            .iter()
            .all(|p| p["key"] != lost),
        "{one:#}"
    );
    let _ = r1;
    src.stop();
}

/// The stored object of segment `name` from a cluster with another system identifier,
/// encrypted with `codec`'s key: a foreign cluster archives until it has written `name`.
fn foreign_segment(name: &str, codec: &Codec) -> Vec<u8> {
    let scratch = Repo::file();
    let env = scratch.env(codec);
    let mut c = Cluster::foreign();
    c.archive_with_walcore();
    c.set_env(&env);
    c.start();
    create_table(&c);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while c.current_wal_file().as_str() <= name {
        assert!(
            std::time::Instant::now() < deadline,
            "foreign cluster never reached {name}"
        );
        next_segment(&c, "f");
    }
    c.wait_archived(name, ARCHIVE_WAIT);
    let bytes = scratch
        .read(&wal_key(name))
        .expect("foreign segment archived");
    c.stop();
    bytes
}

/// The index is written create-only under a new name, so a `walcore` killed while it writes
/// one (SIGKILL, at any moment) leaves the old index or the new one: `list` keeps giving the
/// backups the catalog holds, and a garbled index object changes nothing either.
#[test]
fn an_index_write_killed_at_any_moment_leaves_list_right() {
    let repo = Repo::file();
    let env = repo.env(&Codec::encrypted(KEY_1));
    let src = Cluster::archiving_into(&env);
    let tool = Tool::walcore(&src, env.clone());
    // Taken one after another: `list` gives them in that order (oldest first).
    let ids: Vec<String> = (0..3).map(|_| tool.take(&src, &[])).collect();
    src.stop();
    assert_eq!(tool.list(), ids);
    // Index objects, not the temporary files killed writers leave beside them on a file
    // system (readers never look at those).
    let index_objects = || {
        repo.keys()
            .into_iter()
            .filter(|k| k.starts_with("index/") && !k.contains("/.tmp."))
            .count()
    };
    assert_eq!(index_objects(), 1, "list wrote the index");
    for round in 0..20u64 {
        let mut child = tool.command(&["reindex"]).spawn().expect("spawn reindex");
        std::thread::sleep(Duration::from_millis(round * 3 % 40));
        // SIGKILL: no chance to clean up.
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(tool.list(), ids, "after a reindex killed at round {round}");
    }
    // A garbled newest index object is ignored (and replaced).
    let newest = repo
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("index/") && !k.contains("/.tmp."))
        .max()
        .expect("an index");
    let bytes = repo.read(&newest).expect("index");
    repo.tamper(&newest, &flip_byte(&bytes, bytes.len() / 2));
    assert_eq!(tool.list(), ids);
    let out = tool.ok(&["reindex"]);
    assert!(out.contains("indexed 3 backups"), "{out}");
    assert_eq!(index_objects(), 1, "reindex leaves one index");
    assert_eq!(tool.list(), ids);
}
