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

use crate::metrics::events;
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
    let sink = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(sink.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let file = sink.path().join("alerts.jsonl");
    let mut env = repo.env(&Codec::default());
    env.push((
        "WALCORE_ALERT_COMMAND".into(),
        format!("cat >> {}", file.display()),
    ));
    env.push(("WALCORE_ALERT_WEBHOOK".into(), url.clone()));
    env.push((
        "WALCORE_ALERT_STATE".into(),
        sink.path().join("state").display().to_string(),
    ));
    let src = Cluster::archiving_into(&env);
    create_table(&src);
    let first = src.switch_wal();
    src.wait_archived(&first, ARCHIVE_WAIT);
    assert!(events(&file).is_empty(), "an alert with nothing wrong");

    // The WAL directory becomes read-only for PostgreSQL's user.
    let wal_dir = repo.path(&walcore_e2e::repo::wal_key(&first));
    let wal_dir = wal_dir.parent().expect("its directory").to_path_buf();
    let mode = std::fs::metadata(&wal_dir)
        .expect("dir")
        .permissions()
        .mode();
    std::fs::set_permissions(&wal_dir, std::fs::Permissions::from_mode(0o555)).expect("chmod");
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
}
