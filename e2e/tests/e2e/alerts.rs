//! Failure alerts from a real `archive_command`: a repository PostgreSQL can no longer write to
//! makes `walcore-archive` fail; the alert reaches a local webhook receiver and a command within
//! 60 s, once however often PostgreSQL retries; the fix brings one "resolved" event; and the
//! webhook's address, which carries its token, never shows in the server's log.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use walcore_e2e::repo::Codec;
use walcore_e2e::workload::{create_table, insert_batch};
use walcore_e2e::{Cluster, Repo, http};

use crate::backup::{Tool, conninfo};
use crate::metrics::{AlertSink, events};
use crate::scenario::ARCHIVE_WAIT;

/// A webhook receiver on loopback: every POST's body, parsed; answers 200.
fn receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let Ok(n) = conn.read(&mut chunk) else {
                    break None;
                };
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let Some(end) = http::head_end(&buf) else {
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + len {
                    break Some(buf[end..end + len].to_vec());
                }
            };
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if let Some(body) = body.and_then(|b| serde_json::from_slice(&b).ok()) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(body);
            }
        }
    });
    (format!("http://{addr}/hook/T0KEN-4f9a1c"), got)
}

/// Makes the repository directory that holds segment `name` read-only; returns it and its mode
/// before, to put back.
fn freeze_wal_dir(repo: &Repo, name: &str) -> (std::path::PathBuf, u32) {
    let wal_dir = repo.path(&walcore_e2e::repo::wal_key(name));
    let wal_dir = wal_dir.parent().expect("its directory").to_path_buf();
    let mode = std::fs::metadata(&wal_dir)
        .expect("dir")
        .permissions()
        .mode();
    std::fs::set_permissions(&wal_dir, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    (wal_dir, mode)
}

fn count(events: &[serde_json::Value], status: &str) -> usize {
    events
        .iter()
        .filter(|e| e["status"] == status && e["condition"] == "archive_command")
        .count()
}

fn wait_until(what: &str, within: Duration, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_failing_archive_command_alerts_once_then_resolves() {
    let repo = Repo::file();
    let (url, posted) = receiver();
    let sink = AlertSink::new();
    let file = sink.file.clone();
    let mut env = repo.env(&Codec::default());
    env.extend(sink.env());
    env.push(("WALCORE_ALERT_WEBHOOK".into(), url.clone()));
    let src = Cluster::archiving_into(&env);
    create_table(&src);
    let first = src.switch_wal();
    src.wait_archived(&first, ARCHIVE_WAIT);
    assert!(events(&file).is_empty(), "an alert with nothing wrong");

    // The WAL directory becomes read-only for PostgreSQL's user.
    let (wal_dir, mode) = freeze_wal_dir(&repo, &first);
    insert_batch(&src, "broken", 100);
    let stuck = src.switch_wal();
    let posted_firing = || count(&posted.lock().unwrap_or_else(|p| p.into_inner()), "firing");
    wait_until("the webhook's alert", Duration::from_secs(60), || {
        posted_firing() == 1
    });
    wait_until("the command's alert", Duration::from_secs(10), || {
        count(&events(&file), "firing") == 1
    });
    // PostgreSQL retries, more segments wait: still one alert.
    for i in 0..3 {
        insert_batch(&src, &format!("more{i}"), 50);
        src.switch_wal();
        std::thread::sleep(Duration::from_secs(2));
    }
    let failed: u64 = src
        .psql("select failed_count from pg_stat_archiver")
        .trim()
        .parse()
        .expect("failed_count");
    assert!(failed >= 2, "PostgreSQL retried only {failed} time(s)");
    let log = src.server_log();
    let alert_lines: Vec<&str> = log.lines().filter(|l| l.contains("alert")).collect();
    assert_eq!(
        posted_firing(),
        1,
        "one alert, not one per retry: {alert_lines:#?}"
    );
    assert_eq!(count(&events(&file), "firing"), 1);
    let e = events(&file)
        .into_iter()
        .find(|e| e["status"] == "firing")
        .expect("the firing event");
    assert!(
        e["error"].as_str().is_some_and(|t| !t.is_empty()) && e["text"].is_string(),
        "{e}"
    );

    // Fixed: what waited is archived, and one "resolved" follows.
    std::fs::set_permissions(&wal_dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
    src.wait_archived(&stuck, Duration::from_secs(120));
    wait_until("the resolved event", Duration::from_secs(60), || {
        count(
            &posted.lock().unwrap_or_else(|p| p.into_inner()),
            "resolved",
        ) == 1
            && count(&events(&file), "resolved") == 1
    });
    let last = src.switch_wal();
    src.wait_archived(&last, ARCHIVE_WAIT);
    assert_eq!(count(&events(&file), "resolved"), 1, "resolved once");
    assert!(
        !src.server_log().contains("T0KEN-4f9a1c"),
        "the webhook's token is in the server log"
    );
    // Every failed call was counted, however few alerts it sent.
    let m = crate::metrics::samples(&Tool::walcore(&src, env.clone()).ok(&["metrics"]));
    let counted = m
        .get(r#"walcore_failures_total{command="archive_command"}"#)
        .copied();
    assert!(
        counted.is_some_and(|n| n >= failed as f64),
        "{counted:?} failures counted, PostgreSQL saw {failed}"
    );
}

/// The events of `condition` with `status` an alert command appended to `file`.
fn of(file: &std::path::Path, condition: &str, status: &str) -> usize {
    events(file)
        .iter()
        .filter(|e| e["condition"] == condition && e["status"] == status)
        .count()
}

/// Runs `walcore check --alert` every second until `done`; panics after `within`.
fn judge_until(tool: &Tool, conn: &str, what: &str, within: Duration, done: impl Fn() -> bool) {
    let start = Instant::now();
    loop {
        tool.ok(&["check", "--alert", "--dbname", conn]);
        if done() {
            return;
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn check_alert_notices_files_piling_up_for_archive_command_and_a_stream_that_stopped() {
    let repo = Repo::file();
    let env = repo.env(&Codec::default());
    let sink = AlertSink::new();
    let file = sink.file.clone();
    let mut tool_env = env.clone();
    tool_env.extend(sink.env());
    tool_env.extend([
        ("WALCORE_ALERT_BACKUP_AGE".to_string(), "0".to_string()),
        ("WALCORE_ALERT_READY_AGE".to_string(), "5s".to_string()),
        ("WALCORE_ALERT_STREAM_GRACE".to_string(), "3s".to_string()),
    ]);
    // PostgreSQL's own archive_command has no alert settings: what fires here, the server's
    // side noticed.
    let src = Cluster::archiving_into(&env);
    create_table(&src);
    let first = src.switch_wal();
    src.wait_archived(&first, ARCHIVE_WAIT);
    let tool = Tool::walcore(&src, tool_env);
    let conn = conninfo(&src, "");

    // All well: nothing waits, no slot, no alert.
    let report: serde_json::Value =
        serde_json::from_str(&tool.ok(&["check", "--alert", "--json", "--dbname", &conn]))
            .expect("check --alert --json");
    assert_eq!(report["server"]["ready_files"], 0, "{report:#}");
    assert!(report["server"]["slot"].is_null(), "{report:#}");
    assert!(events(&file).is_empty(), "{:#?}", events(&file));

    // The repository's WAL directory turns read-only: segments pile up as .ready files, and
    // the oldest passing 5 s fires archive_backlog, once.
    let (wal_dir, mode) = freeze_wal_dir(&repo, &first);
    insert_batch(&src, "stuck", 100);
    let stuck = src.switch_wal();
    // Not before the threshold: a judgement that saw the oldest file younger than 5 s sent
    // nothing.
    let early: serde_json::Value =
        serde_json::from_str(&tool.ok(&["check", "--alert", "--json", "--dbname", &conn]))
            .expect("check --alert --json");
    let age = early["server"]["oldest_ready_age_seconds"].as_f64();
    if age.is_some_and(|a| a < 5.0) {
        assert_eq!(of(&file, "archive_backlog", "firing"), 0, "{early:#}");
    }
    judge_until(
        &tool,
        &conn,
        "archive_backlog",
        Duration::from_secs(60),
        || of(&file, "archive_backlog", "firing") == 1,
    );
    tool.ok(&["check", "--alert", "--dbname", &conn]);
    assert_eq!(of(&file, "archive_backlog", "firing"), 1, "one alert");
    let e = events(&file)
        .into_iter()
        .find(|e| e["condition"] == "archive_backlog")
        .expect("the event");
    assert!(
        e["error"]
            .as_str()
            .is_some_and(|t| t.contains("wait for archive_command")),
        "{e}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&tool.ok(&["status", "--json", "--dbname", &conn]))
            .expect("status --json");
    assert!(
        status["server"]["ready_files"].as_u64() >= Some(1)
            && status["server"]["archiver_failed_count"].as_u64() >= Some(1),
        "{status:#}"
    );

    // Fixed: what waited is archived, and the next judgement resolves it.
    std::fs::set_permissions(&wal_dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
    // A new segment wakes the archiver from its minute's pause after failures.
    insert_batch(&src, "wake", 10);
    let wake = src.switch_wal();
    src.wait_archived(&stuck, Duration::from_secs(120));
    src.wait_archived(&wake, ARCHIVE_WAIT);
    judge_until(
        &tool,
        &conn,
        "archive_backlog resolved",
        Duration::from_secs(60),
        || of(&file, "archive_backlog", "resolved") == 1,
    );

    // A slot nothing streams from fires stream_disconnected after its grace; a stream that
    // connects resolves it, and the metrics show the slot.
    src.psql("select pg_create_physical_replication_slot('walcore', true)");
    tool.ok(&["check", "--alert", "--dbname", &conn]);
    assert_eq!(
        of(&file, "stream_disconnected", "firing"),
        0,
        "within the grace"
    );
    judge_until(
        &tool,
        &conn,
        "stream_disconnected",
        Duration::from_secs(30),
        || of(&file, "stream_disconnected", "firing") == 1,
    );
    let log = std::fs::File::create(src.dir().join("stream.log")).expect("stream log");
    let mut stream = tool
        .command(&["stream", "--dbname", &conn, "--slot", "walcore"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("walcore stream");
    judge_until(
        &tool,
        &conn,
        "stream_disconnected resolved",
        Duration::from_secs(60),
        || of(&file, "stream_disconnected", "resolved") == 1,
    );
    insert_batch(&src, "streamed", 100);
    let text = tool.ok(&["metrics", "--dbname", &conn]);
    let _ = stream.kill();
    let _ = stream.wait();
    crate::metrics::promtool_accepts(&text);
    let m = crate::metrics::samples(&text);
    assert_eq!(m.get("walcore_server_up"), Some(&1.0), "{text}");
    assert_eq!(m.get("walcore_stream_slot_active"), Some(&1.0), "{text}");
    assert!(
        m.contains_key("walcore_stream_slot_retained_bytes")
            && m.contains_key("walcore_stream_lag_bytes")
            && m.contains_key("walcore_archiver_failures_total"),
        "{text}"
    );
    assert_eq!(m.get("walcore_archive_ready_files"), Some(&0.0), "{text}");
}
