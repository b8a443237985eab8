//! `walcore stream` against real PostgreSQL 15 with archiving off: the slot exists before a
//! byte streams; completed segments land in the repository byte for byte as the server wrote
//! them; the slot is released only as far as the repository holds; a killed stream started
//! again goes on where the repository ends, with no hole; and when the slot no longer holds
//! the segment after the repository's newest, the hole is refused by name.

use std::process::Child;
use std::time::{Duration, Instant};

use walcore_e2e::repo::{Codec, KEY_1, wal_key};
use walcore_e2e::workload::{create_table, insert_batch};
use walcore_e2e::{Cluster, Repo, bins, sys};

use crate::backup::{Tool, conninfo, restore_and_recover, restore_into_new};

const SLOT: &str = "walcore_e2e";

/// `walcore stream` in the background, its log in the cluster's directory.
fn spawn_stream(tool: &Tool, cluster: &Cluster, log: &str) -> Child {
    spawn_stream_with(tool, cluster, log, &[])
}

fn spawn_stream_with(tool: &Tool, cluster: &Cluster, log: &str, extra: &[&str]) -> Child {
    let conn = conninfo(cluster, "");
    let mut args = vec!["stream", "--dbname", &conn, "--slot", SLOT];
    args.extend_from_slice(extra);
    let mut cmd = tool.command(&args);
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
    let tool = Tool::walcore(&src, env.clone());

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

/// A failover while streaming: the stream follows a standby, the primary stops and the
/// standby is promoted to timeline 2. The stream stores the old timeline's last segment as
/// `.partial` (never as a complete segment), stores `00000002.history`, and goes on on the new
/// timeline; restores to a time before the switch and to one after it bring back exactly the
/// rows committed before each.
#[test]
fn a_promotion_while_streaming_keeps_the_old_timeline_partial_and_follows_the_new() {
    let repo = Repo::file();
    let codec = Codec::encrypted(KEY_1);
    let env = repo.env(&codec);
    let mut primary = Cluster::new();
    primary.archive_with_walcore();
    primary.set_env(&env);
    primary.start();
    create_table(&primary);
    let tool = Tool::walcore(&primary, env.clone());
    tool.take(&primary, &[]);

    let standby = Cluster::standby_of(&primary);
    let child = spawn_stream(&tool, &standby, "stream.log");
    let caught_up = |what: &str| {
        let want = primary.psql("select count(*) from t");
        let until = Instant::now() + Duration::from_secs(60);
        while standby.psql("select count(*) from t") != want {
            assert!(
                Instant::now() < until,
                "the standby did not catch up ({what})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    insert_batch(&primary, "a", 2000);
    caught_up("a");
    let before_switch = primary.psql("select now()");
    std::thread::sleep(Duration::from_millis(1100));
    insert_batch(&primary, "b", 2000);
    caught_up("b");
    // A failover: the old primary stops, the standby takes over on timeline 2.
    primary.stop();
    assert_eq!(standby.psql("select pg_promote()"), "t");
    let history = std::fs::read_to_string(standby.data.join("pg_wal/00000002.history"))
        .expect("the promotion wrote 00000002.history");
    let switch_segment = {
        let line = history.lines().next().expect("a history line");
        let lsn = line.split('\t').nth(1).expect("a switch point");
        // pg_walfile_name names the segment on the server's timeline, now 2.
        let on_2 = standby.psql(&format!("select pg_walfile_name('{lsn}'::pg_lsn - 1)"));
        format!("00000001{}", &on_2[8..])
    };
    insert_batch(&standby, "c", 2000);
    std::thread::sleep(Duration::from_millis(1100));
    let after_switch = standby.psql("select now()");
    std::thread::sleep(Duration::from_millis(1100));
    insert_batch(&standby, "d", 2000);
    let last = standby.switch_wal();
    assert!(last.starts_with("00000002"), "{last}");
    wait_stored(&repo, std::slice::from_ref(&last), &standby, "stream.log");
    stop(child);

    let keys = repo.keys();
    let old_partial = format!("{}.partial", wal_key(&switch_segment));
    assert!(
        keys.contains(&old_partial),
        "the old timeline's last segment is not stored as {old_partial}: {keys:?}"
    );
    assert!(
        !keys.contains(&wal_key(&switch_segment)),
        "the old timeline's last segment is stored as complete"
    );
    assert!(keys.contains(&"wal/history/00000002.history".to_string()));
    assert_eq!(
        restored(&env, "00000002.history").as_slice(),
        history.as_bytes(),
        "the stored history is not the server's"
    );

    for (target, want) in [(&before_switch, "a"), (&after_switch, "a,b,c")] {
        let dst = restore_and_recover(
            &tool,
            &env,
            &["--target-time", target],
            "restore across a promotion",
        );
        assert_eq!(
            dst.psql("select string_agg(distinct batch, ',' order by batch) from t"),
            want,
            "restored to {target}"
        );
    }
}

/// An hour of a quiet database with `archive_timeout = 60s`, compressed: sixty segments, each
/// delivered by both `archive_command` and the stream, the stream SIGKILLed and started again
/// at random moments (some in the middle of a store). Every segment is stored once, with no
/// conflict on either side and no hole; no piece outlives its complete segment; a restore of
/// the latest state has every row.
#[test]
fn stream_and_archive_command_together_through_kills_store_each_segment_once() {
    let repo = Repo::file();
    let env = repo.env(&Codec::encrypted(KEY_1));
    let mut src = Cluster::new();
    src.archive_with_walcore();
    src.set_env(&env);
    src.start();
    create_table(&src);
    let tool = Tool::walcore(&src, env.clone());
    tool.take(&src, &[]);

    let extra = ["--partial-interval", "200ms"];
    let mut child = spawn_stream_with(&tool, &src, "stream-0.log", &extra);
    let mut restarts = 0;
    let mut names = Vec::new();
    for i in 0..60u32 {
        insert_batch(&src, &format!("m{i}"), 50);
        names.push(src.switch_wal());
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        if clock.is_multiple_of(7) {
            std::thread::sleep(Duration::from_millis(u64::from(clock % 300)));
            stop(child);
            restarts += 1;
            child = spawn_stream_with(&tool, &src, &format!("stream-{restarts}.log"), &extra);
        }
    }
    insert_batch(&src, "tail", 50);
    let last = names.last().expect("segments").clone();
    wait_stored(
        &repo,
        std::slice::from_ref(&last),
        &src,
        &format!("stream-{restarts}.log"),
    );
    src.wait_archived(&last, Duration::from_secs(120));
    // Stopped cleanly: what has arrived of the segment being filled is stored first.
    let out = sys::run(
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string()),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{}", out.stderr);
    let status = child.wait().expect("the stream exits");
    assert!(status.success(), "the stream failed on SIGTERM: {status:?}");
    eprintln!("{restarts} restarts");

    assert_eq!(
        src.psql("select failed_count from pg_stat_archiver"),
        "0",
        "archive_command failed (a conflict with the stream?)"
    );
    let logs: String = (0..=restarts)
        .map(|r| {
            std::fs::read_to_string(src.dir().join(format!("stream-{r}.log"))).unwrap_or_default()
        })
        .collect();
    assert!(!logs.contains("different content"), "{logs}");
    let keys = repo.keys();
    let segments: Vec<u64> = keys
        .iter()
        .filter(|k| k.starts_with("wal/00000001/") && k.len() - k.rfind('/').unwrap_or(0) == 25)
        .filter_map(|k| u64::from_str_radix(&k[k.len() - 8..], 16).ok())
        .collect();
    let (lo, hi) = (segments[0], segments[segments.len() - 1]);
    assert_eq!(segments, (lo..=hi).collect::<Vec<_>>(), "a hole");
    for name in &names {
        assert!(keys.contains(&wal_key(name)), "{name} is not stored");
    }
    for piece in keys.iter().filter(|k| k.starts_with("stream/")) {
        let segment = piece
            .split('/')
            .nth(2)
            .expect("a piece key names its segment");
        assert!(
            !keys.contains(&wal_key(segment)),
            "{piece} outlived its complete segment; the streams' logs:\n{logs}"
        );
    }

    let want = walcore_e2e::workload::fingerprint(&src);
    let dst = restore_and_recover(&tool, &env, &[], "restore of the latest state");
    assert_eq!(walcore_e2e::workload::fingerprint(&dst), want);
    assert!(
        dst.server_log().contains("restored the streamed tail"),
        "the rows after the last switch came from somewhere else"
    );
}

/// A standby that follows the repository through `restore_command` while the stream stores
/// the segment being filled: it never replays that growing tail (it would go on from the
/// zeros after it), and replays the segment once it is complete.
#[test]
fn a_standby_following_the_repository_never_replays_the_growing_tail() {
    let repo = Repo::file();
    let env = repo.env(&Codec::encrypted(KEY_1));
    let mut src = Cluster::new();
    src.set("archive_mode", "off");
    src.set_env(&env);
    src.start();
    create_table(&src);
    let tool = Tool::walcore(&src, env.clone());
    let child = spawn_stream_with(&tool, &src, "stream.log", &["--partial-interval", "200ms"]);
    let until = Instant::now() + Duration::from_secs(30);
    while slot_restart(&src).is_empty() {
        assert!(Instant::now() < until, "no slot");
        std::thread::sleep(Duration::from_millis(100));
    }
    tool.take(&src, &[]);
    insert_batch(&src, "complete", 500);
    let done = src.switch_wal();
    wait_stored(&repo, std::slice::from_ref(&done), &src, "stream.log");

    let mut standby = restore_into_new(&tool, &[]);
    std::fs::write(standby.data.join("standby.signal"), "").expect("standby.signal");
    crate::backup::prepare_restored(&mut standby, &env);
    // It asks the repository again every 200 ms, not every 5 s.
    standby.set("wal_retrieve_retry_interval", "200ms");
    standby.start();
    let complete = src.psql("select count(*) from t");
    let rows = |c: &Cluster| c.try_psql("select count(*) from t").unwrap_or_default();
    let until = Instant::now() + Duration::from_secs(60);
    while rows(&standby) != complete {
        assert!(
            Instant::now() < until,
            "the standby did not replay the complete segments"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Rows in the segment being filled: stored as pieces, not for the standby.
    insert_batch(&src, "growing", 500);
    let piece_of = |segment: &str| {
        repo.keys()
            .iter()
            .any(|k| k.starts_with("stream/") && k.contains(segment))
    };
    let growing = src.current_wal_file();
    let until = Instant::now() + Duration::from_secs(30);
    while !piece_of(&growing) {
        assert!(Instant::now() < until, "no piece of {growing} stored");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status: serde_json::Value =
        serde_json::from_str(&tool.ok(&["status", "--json"])).expect("status");
    assert_eq!(
        status["stream_tail"]["segment"],
        growing.as_str(),
        "status does not show the tail: {status:#}"
    );
    assert!(status["stream_tail"]["bytes"].as_u64().unwrap_or(0) > 0);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        rows(&standby),
        complete,
        "the standby replayed the growing tail"
    );
    assert!(
        !standby.server_log().contains("streamed tail"),
        "the standby was given the growing tail"
    );

    // Complete now: the standby replays it.
    let full = src.psql("select count(*) from t");
    let last = src.switch_wal();
    wait_stored(&repo, std::slice::from_ref(&last), &src, "stream.log");
    let until = Instant::now() + Duration::from_secs(60);
    while rows(&standby) != full {
        assert!(
            Instant::now() < until,
            "the standby did not replay the completed segment\n{}",
            sys::tail(&standby.server_log(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop(child);
}

/// The protocol on every supported major (13 and 14 have no READ_REPLICATION_SLOT; 15 and later
/// do): the slot is made reserving WAL, completed segments arrive byte for byte, the tail of
/// the segment being filled is stored as pieces, and a restarted stream goes on without a hole.
#[test]
fn streaming_works_on_every_major() {
    for major in walcore_e2e::cluster::pg_majors_wanted() {
        eprintln!("PostgreSQL {major}");
        let repo = Repo::file();
        let env = repo.env(&Codec::encrypted(KEY_1));
        let src = Cluster::new_major(major);
        src.set("archive_mode", "off");
        src.start();
        create_table(&src);
        let tool = Tool::walcore(&src, env.clone());
        let extra = ["--partial-interval", "200ms"];
        let child = spawn_stream_with(&tool, &src, "stream-1.log", &extra);
        let until = Instant::now() + Duration::from_secs(30);
        while slot_restart(&src).is_empty() {
            assert!(
                Instant::now() < until,
                "PostgreSQL {major}: no slot reserving WAL"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        insert_batch(&src, "a", 300);
        let first = src.switch_wal();
        wait_stored(&repo, std::slice::from_ref(&first), &src, "stream-1.log");
        insert_batch(&src, "b", 300);
        let growing = src.current_wal_file();
        let until = Instant::now() + Duration::from_secs(30);
        while !repo
            .keys()
            .iter()
            .any(|k| k.starts_with("stream/") && k.contains(&growing))
        {
            assert!(
                Instant::now() < until,
                "PostgreSQL {major}: no piece of {growing}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        stop(child);
        let second = src.switch_wal();
        let child = spawn_stream_with(&tool, &src, "stream-2.log", &extra);
        wait_stored(&repo, std::slice::from_ref(&second), &src, "stream-2.log");
        stop(child);
        for name in [&first, &second] {
            let in_pg_wal = std::fs::read(src.data.join("pg_wal").join(name)).expect("pg_wal");
            assert!(
                restored(&env, name) == in_pg_wal,
                "PostgreSQL {major}: {name} streamed differs from pg_wal"
            );
        }
    }
}
