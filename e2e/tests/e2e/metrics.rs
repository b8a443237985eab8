//! `walcore metrics` and `walcore serve` on a real repository written by real PostgreSQL: the
//! exposition passes Prometheus' own checker (`promtool check metrics`, which also lints names
//! and units), and its values are those `walcore status --json` gives; `serve` answers
//! `/metrics` and `/healthz`, follows the repository as it changes, and says when it cannot
//! read it.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};
use walcore_e2e::sys;

use walcore_e2e::repo::{Codec, KEY_1, wal_key};
use walcore_e2e::workload::{create_table, insert_batch};
use walcore_e2e::{Cluster, Repo, http};

use crate::backup::Tool;
use crate::scenario::ARCHIVE_WAIT;

/// `promtool`: `WALCORE_TEST_PROMTOOL`, what `./scripts/test` fetched, or the `PATH`'s.
fn promtool() -> String {
    if let Ok(p) = std::env::var("WALCORE_TEST_PROMTOOL") {
        return p;
    }
    let fetched = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-tools/prometheus/usr/bin/promtool");
    if fetched.exists() {
        return fetched.display().to_string();
    }
    let found = Command::new("promtool").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "these tests need promtool: run ./scripts/test, which fetches it, or set \
         WALCORE_TEST_PROMTOOL"
    );
    "promtool".into()
}

/// Asserts that Prometheus' checker finds nothing wrong with `text`, lint included.
pub(crate) fn promtool_accepts(text: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("metrics.prom");
    std::fs::write(&file, text).expect("write");
    let out = sys::run(
        Command::new("sh").arg("-c").arg(format!(
            "'{}' check metrics < '{}'",
            promtool(),
            file.display()
        )),
        Duration::from_secs(60),
    );
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{text}"
    );
}

/// The samples of an exposition: `name{labels}` to value.
pub(crate) fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a sample line");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

pub(crate) fn unix(rfc3339: &serde_json::Value) -> f64 {
    let text = rfc3339.as_str().expect("a time");
    let out = Command::new("date")
        .args(["-u", "-d", text, "+%s.%3N"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("seconds")
}

/// Asserts that the exposition `m` says what the status `s` says.
fn agrees(m: &BTreeMap<String, f64>, s: &serde_json::Value) {
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in {m:#?}"));
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(get("walcore_status_up"), 1.0);
    assert_eq!(get("walcore_backups"), num(&s["backups"]));
    let b = &s["last_backup"];
    assert_eq!(
        get("walcore_last_backup_stored_bytes"),
        num(&b["stored_bytes"])
    );
    assert_eq!(get("walcore_last_backup_data_bytes"), num(&b["data_bytes"]));
    assert_eq!(
        get("walcore_last_backup_duration_seconds"),
        num(&b["duration_seconds"])
    );
    assert_eq!(
        get("walcore_last_backup_timestamp_seconds"),
        unix(&b["stop_time"])
    );
    let age = get("walcore_last_backup_age_seconds");
    assert!(
        age + 1.0 >= num(&b["age_seconds"]) && age < num(&b["age_seconds"]) + 120.0,
        "backup age {age} against status {}",
        b["age_seconds"]
    );
    assert_eq!(
        get("walcore_last_archived_timestamp_seconds"),
        unix(&s["last_archived"]["stored_at"])
    );
    assert!(get("walcore_last_archived_age_seconds") >= 0.0);
    assert_eq!(
        get(r#"walcore_repository_bytes{kind="wal"}"#),
        num(&s["bytes"]["wal"])
    );
    assert_eq!(
        get(r#"walcore_repository_bytes{kind="backups"}"#),
        num(&s["bytes"]["backups"])
    );
    assert_eq!(
        get("walcore_restorable_window_start_timestamp_seconds"),
        unix(&s["window"]["earliest"])
    );
    assert_eq!(
        get("walcore_restorable_window_end_timestamp_seconds"),
        unix(&s["window"]["latest"])
    );
    assert_eq!(
        get("walcore_restorable_window_gaps"),
        s["window"]["gaps"].as_array().map_or(0, Vec::len) as f64
    );
    assert_eq!(
        get(r#"walcore_wal_holes{timeline="1"}"#),
        num(&s["timelines"][0]["holes_total"])
    );
    assert_eq!(
        get(r#"walcore_wal_segments{timeline="1"}"#),
        num(&s["timelines"][0]["segments"])
    );
    assert_eq!(
        get("walcore_last_verify_problems"),
        num(&s["last_verify"]["problems"])
    );
    let info = m
        .keys()
        .find(|k| k.starts_with("walcore_repository_info{"))
        .expect("walcore_repository_info");
    let sysid = s["repository"]["system_identifier"].as_str().expect("id");
    assert!(
        info.contains(&format!("system_identifier=\"{sysid}\""))
            && info.contains("encrypted=\"true\""),
        "{info}"
    );
}

/// Where a test's alerts go: an alert command's output file and the alert state directory,
/// in a directory the server user may write (the hooks run as that user).
pub(crate) struct AlertSink {
    dir: tempfile::TempDir,
    /// What the alert command appends to, one JSON line per event.
    pub file: std::path::PathBuf,
}

impl AlertSink {
    pub(crate) fn new() -> AlertSink {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let file = dir.path().join("alerts.jsonl");
        AlertSink { dir, file }
    }

    /// `WALCORE_ALERT_COMMAND` (appending to [`AlertSink::file`]) and `WALCORE_ALERT_STATE`.
    pub(crate) fn env(&self) -> [(String, String); 2] {
        [
            (
                "WALCORE_ALERT_COMMAND".to_string(),
                format!("cat >> {}", self.file.display()),
            ),
            (
                "WALCORE_ALERT_STATE".to_string(),
                self.dir.path().join("state").display().to_string(),
            ),
        ]
    }
}

/// The JSON lines an alert command appended to `file`.
pub(crate) fn events(file: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits (a minute at most) for an alert event in the command's output file.
fn wait_alert(file: &std::path::Path, condition: &str, status: &str) {
    let start = Instant::now();
    while !events(file)
        .iter()
        .any(|e| e["condition"] == condition && e["status"] == status)
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no {condition} {status} alert: {:#?}",
            events(file)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("address")
}

fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let r = http::request(addr, "GET", path, b"").ok()?;
    Some((r.status, String::from_utf8_lossy(&r.body).into_owned()))
}

/// Polls `path` until `done` holds for its answer; panics with the last one after a minute.
fn wait_for(addr: SocketAddr, path: &str, what: &str, done: impl Fn(u16, &str) -> bool) -> String {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < Duration::from_secs(60) {
        if let Some((code, body)) = get(addr, path) {
            if done(code, &body) {
                return body;
            }
            last = Some((code, body));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what}: {path} never answered so; last: {last:?}");
}

#[test]
fn metrics_say_what_status_says_and_serve_follows_the_repository() {
    let repo = Repo::file();
    let env = repo.env(&Codec::encrypted(KEY_1));
    let src = Cluster::archiving_into(&env);
    create_table(&src);
    insert_batch(&src, "pre", 200);
    // serve alerts too: on a backup older than a second (at once), and on the repository
    // becoming unreadable (below).
    let sink = AlertSink::new();
    let alerts = sink.file.clone();
    let mut tool_env = env.clone();
    tool_env.extend(sink.env());
    tool_env.extend([("WALCORE_ALERT_BACKUP_AGE".to_string(), "1s".to_string())]);
    let tool = Tool::walcore(&src, tool_env);

    // Before any backup: the exposition is valid, and says there is none.
    let first = src.switch_wal();
    src.wait_archived(&first, ARCHIVE_WAIT);
    let text = tool.ok(&["metrics"]);
    promtool_accepts(&text);
    let m = samples(&text);
    assert_eq!(m.get("walcore_backups"), Some(&0.0), "{text}");
    assert!(!m.contains_key("walcore_last_backup_age_seconds"), "{text}");

    // A backup, segments after it, a clean verify: every value as status gives it.
    tool.take(&src, &[]);
    let mut names = Vec::new();
    for i in 0..3 {
        insert_batch(&src, &format!("a{i}"), 200);
        names.push(src.switch_wal());
    }
    src.wait_archived(names.last().expect("names"), ARCHIVE_WAIT);
    tool.ok(&["verify", "--json"]);
    let text = tool.ok(&["metrics"]);
    let s: serde_json::Value =
        serde_json::from_str(&tool.ok(&["status", "--json"])).expect("status --json");
    promtool_accepts(&text);
    agrees(&samples(&text), &s);

    // serve: the same, over HTTP; then a lost segment shows within an interval or two.
    let addr = free_port();
    let mut serve = tool
        .command(&["serve", "--listen", &addr.to_string(), "--interval", "1s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("walcore serve");
    wait_for(addr, "/healthz", "serve starts", |code, _| code == 200);
    let body = wait_for(addr, "/metrics", "serve's metrics", |code, _| code == 200);
    promtool_accepts(&body);
    agrees(&samples(&body), &s);
    assert_eq!(get(addr, "/nothing").map(|(c, _)| c), Some(404));
    wait_alert(&alerts, "backup_too_old", "firing");
    // What fires shows in status and in the metrics.
    let s: serde_json::Value =
        serde_json::from_str(&tool.ok(&["status", "--json"])).expect("status --json");
    assert!(
        s["failing"]
            .as_array()
            .is_some_and(|f| f.iter().any(|a| a["condition"] == "backup_too_old")),
        "{s:#}"
    );
    wait_for(addr, "/metrics", "the firing alert", |_, body| {
        samples(body).get(r#"walcore_alert_firing{condition="backup_too_old"}"#) == Some(&1.0)
    });

    repo.remove(&wal_key(&names[1]));
    wait_for(addr, "/metrics", "the lost segment", |_, body| {
        samples(body).get("walcore_restorable_window_gaps") == Some(&1.0)
    });

    // A repository that cannot be read: up 0 at once, /healthz 503 after three intervals.
    // (An unmounted file system looks like this: the root directory is gone.)
    let root = repo.path("");
    let root = root.components().collect::<std::path::PathBuf>();
    let away = root.with_extension("away");
    std::fs::rename(&root, &away).expect("move the repository away");
    wait_for(addr, "/metrics", "status failing", |_, body| {
        samples(body).get("walcore_status_up") == Some(&0.0)
    });
    wait_alert(&alerts, "repository_unreadable", "firing");
    let why = wait_for(addr, "/healthz", "unhealthy", |code, _| code == 503);
    assert!(why.contains(&root.display().to_string()), "{why}");
    std::fs::rename(&away, &root).expect("move the repository back");
    wait_for(addr, "/healthz", "healthy again", |code, _| code == 200);
    wait_alert(&alerts, "repository_unreadable", "resolved");
    let sent = events(&alerts);
    for (condition, status, n) in [
        ("repository_unreadable", "firing", 1),
        ("repository_unreadable", "resolved", 1),
        ("backup_too_old", "firing", 1),
    ] {
        let found = sent
            .iter()
            .filter(|e| e["condition"] == condition && e["status"] == status)
            .count();
        assert_eq!(found, n, "{condition} {status}: {sent:#?}");
    }
    let out = tool.run(&["metrics"]);
    assert!(out.status.success(), "{}", out.stderr);

    let _ = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status();
    let status = serve.wait().expect("serve exits");
    assert!(status.success(), "serve on SIGTERM: {status:?}");
}
