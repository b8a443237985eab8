//! Failure alerts: `WALCORE_ALERT_COMMAND` (run with the event as JSON on stdin) and
//! `WALCORE_ALERT_WEBHOOK` (an HTTP POST of the same JSON, with a `text` field that Slack-style
//! receivers show).
//!
//! One alert per condition until it clears: a condition that fails makes a state file in the
//! alert state directory and sends `"firing"` only when it made it, so PostgreSQL retrying a
//! failing `archive_command` every few seconds alerts once; the first success after that
//! removes it and sends `"resolved"`. A delivery that fails is logged and leaves no state, so
//! the next failure tries again. Delivery is bounded ([`DELIVERY_TIME`]) and never changes a
//! command's exit status.
//!
//! The state directory: `alert_state`, else systemd's `$STATE_DIRECTORY`, else
//! `$HOME/.local/state/walcore/alerts`, else a directory in the temporary directory. The hooks
//! and the scheduled commands should see the same one (they do when they run as the same user
//! with the same `HOME`).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::error::Error;

/// How long delivering one event may take, command and webhook together.
pub const DELIVERY_TIME: Duration = Duration::from_secs(10);

/// Where alerts go. `Debug` tells what is set, never the command or the address (a webhook
/// URL carries its token).
#[derive(Clone, Default)]
pub struct AlertSettings {
    pub command: Option<String>,
    pub webhook: Option<String>,
    pub state_dir: Option<PathBuf>,
    /// `walcore serve` alerts when the newest complete backup is older (`alert_backup_age`;
    /// 0 turns it off).
    pub backup_age: Option<Duration>,
    /// `walcore serve` alerts when the newest stored segment is older (`alert_archive_age`;
    /// off by default: without `archive_timeout`, a quiet database archives nothing for hours).
    pub archive_age: Option<Duration>,
    /// `walcore check --alert` and `walcore serve --dbname` alert when a file has waited for
    /// `archive_command` longer (`alert_ready_age`; 0 turns it off).
    pub ready_age: Option<Duration>,
    /// How long the stream's slot may have no connection before `stream_disconnected` fires
    /// (`alert_stream_grace`).
    pub stream_grace: Duration,
}

/// Four minutes: PostgreSQL retries a failing `archive_command` three times, then waits a
/// minute, so a file waiting this long is not a hiccup; and with `serve`'s 30 s interval or
/// the minute's timer of `check --alert`, the alert comes within five minutes of the stall.
pub const DEFAULT_READY_AGE: Duration = Duration::from_secs(240);

/// How long the stream's slot may have no connection before `stream_disconnected` fires, unless
/// `alert_stream_grace` says: the stream reconnects within seconds, and a restart of its
/// service is not an incident.
pub const DEFAULT_STREAM_GRACE: Duration = Duration::from_secs(60);

/// A day and two hours: a daily backup that is late, not one that took a little longer.
pub const DEFAULT_BACKUP_AGE: Duration = Duration::from_secs(26 * 3600);

impl std::fmt::Debug for AlertSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertSettings")
            .field("command", &self.command.as_ref().map(|_| "(set)"))
            .field("webhook", &self.webhook.as_ref().map(|_| "(set)"))
            .field("state_dir", &self.state_dir)
            .field("backup_age", &self.backup_age)
            .field("archive_age", &self.archive_age)
            .field("ready_age", &self.ready_age)
            .field("stream_grace", &self.stream_grace)
            .finish()
    }
}

impl AlertSettings {
    pub fn enabled(&self) -> bool {
        self.command.is_some() || self.webhook.is_some()
    }

    fn state_dir(&self) -> PathBuf {
        if let Some(d) = &self.state_dir {
            return d.clone();
        }
        if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
            // systemd may give several, separated by colons: the first.
            let first = d
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned();
            if !first.is_empty() {
                return PathBuf::from(first).join("alerts");
            }
        }
        if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            return PathBuf::from(home).join(".local/state/walcore/alerts");
        }
        std::env::temp_dir().join(format!(
            "walcore-alerts-{}",
            rustix::process::getuid().as_raw()
        ))
    }
}

/// A condition firing on this host, and since when.
#[derive(Debug, Clone, Serialize)]
pub struct Firing {
    pub condition: String,
    pub since: String,
}

/// The conditions firing now, as the state directory holds them, oldest first (none when
/// alerts are not set up).
pub fn firing(settings: &AlertSettings) -> Vec<Firing> {
    if !settings.enabled() {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(settings.state_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<Firing> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        // `.pending.NAME`: a condition seen, not yet firing.
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| Firing {
            condition: e.file_name().to_string_lossy().into_owned(),
            since: std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .trim()
                .to_owned(),
        })
        .collect();
    out.sort_by(|a, b| a.since.cmp(&b.since));
    out
}

/// Counts one failure of `condition` on this host: one byte appended to
/// `failures/CONDITION` in the state directory, so that concurrent hooks never lose a count
/// (appends are atomic) and the count is the file's length. Counted whether or not alerts are
/// set up; a count that cannot be written is only logged.
pub fn count_failure(settings: &AlertSettings, condition: &str) {
    let dir = settings.state_dir().join("failures");
    let appended = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(dir.join(condition))?
            .write_all(b"x")
    });
    if let Err(e) = appended {
        tracing::debug!("failure count {}: {e}", dir.display());
    }
}

/// The failures counted on this host since its state directory was made, per condition.
pub fn failure_counts(settings: &AlertSettings) -> std::collections::BTreeMap<String, u64> {
    let Ok(entries) = std::fs::read_dir(settings.state_dir().join("failures")) else {
        return Default::default();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let meta = e.metadata().ok().filter(|m| m.is_file())?;
            Some((e.file_name().to_string_lossy().into_owned(), meta.len()))
        })
        .collect()
}

/// Fills in what this host knows that the repository does not: the conditions firing and the
/// failures counted.
pub fn fill_host_state(
    report: &mut crate::lifecycle::status::StatusReport,
    settings: &AlertSettings,
) {
    report.failing = firing(settings);
    report.failures = failure_counts(settings);
}

/// One event, as the command reads it and the webhook receives it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// `firing` or `resolved`.
    pub status: &'static str,
    /// What failed: `archive_command`, `restore_command`, `take`, `expire`, `verify`, …
    pub condition: String,
    /// The repository (its URL; never a credential).
    pub repository: String,
    pub host: String,
    pub time: String,
    /// The error, for `firing`.
    pub error: Option<String>,
    /// One line for a person (what Slack-style receivers show).
    pub text: String,
}

/// Records the outcome of `condition` and sends what it changes: `firing` on the first
/// failure, `resolved` on the first success after it.
pub fn record(
    settings: &AlertSettings,
    condition: &str,
    repository: &str,
    outcome: Result<(), &Error>,
) {
    if !settings.enabled() {
        return;
    }
    let dir = settings.state_dir();
    let state = dir.join(condition);
    match outcome {
        Err(e) => {
            if let Err(err) = std::fs::create_dir_all(&dir) {
                tracing::warn!("alert state {}: {err}; alerting anyway", dir.display());
            }
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&state)
            {
                Ok(mut f) => {
                    let _ = writeln!(
                        f,
                        "{}",
                        crate::backup::catalog::format_time(SystemTime::now())
                    );
                }
                // Firing already: one alert per condition.
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => return,
                Err(err) => tracing::warn!("alert state {}: {err}", state.display()),
            }
            let event = event("firing", condition, repository, Some(format!("{e:#}")));
            if !deliver(settings, &event) {
                // Not delivered: the next failure tries again.
                let _ = std::fs::remove_file(&state);
            }
        }
        Ok(()) => {
            if !state.exists() {
                return;
            }
            let event = event("resolved", condition, repository, None);
            if deliver(settings, &event) {
                let _ = std::fs::remove_file(&state);
            }
        }
    }
}

/// What `walcore serve` notices on its own, each time it reads the status: the repository
/// unreadable (`repository_unreadable`), no complete backup for `backup_age`
/// (`backup_too_old`), no segment stored for `archive_age` (`archiving_stalled`). Blocking.
pub fn evaluate_status(
    settings: &AlertSettings,
    repository: &str,
    status: Result<&crate::lifecycle::status::StatusReport, &Error>,
) {
    use crate::error::ErrorKind;
    use crate::lifecycle::status::ago;
    let report = match status {
        Ok(r) => {
            record(settings, "repository_unreadable", repository, Ok(()));
            r
        }
        Err(e) => {
            // Nothing else can be judged: the other conditions keep their state.
            record(settings, "repository_unreadable", repository, Err(e));
            return;
        }
    };
    if let Some(limit) = settings.backup_age {
        let late = match &report.last_backup {
            Some(b) if b.age_seconds <= limit.as_secs() => None,
            Some(b) => Some(format!(
                "the newest complete backup, {}, ended {} ago (more than {})",
                b.id,
                ago(b.age_seconds),
                ago(limit.as_secs())
            )),
            None => Some("the repository holds no complete backup".to_string()),
        };
        let e = late.map(|why| Error::new(ErrorKind::NotFound, why));
        record(
            settings,
            "backup_too_old",
            repository,
            e.as_ref().map_or(Ok(()), Err),
        );
    }
    if let Some(limit) = settings.archive_age {
        let e = report
            .last_archived
            .as_ref()
            .filter(|a| a.age_seconds > limit.as_secs())
            .map(|a| {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "the newest segment, {}, was stored {} ago (more than {})",
                        a.segment,
                        ago(a.age_seconds),
                        ago(limit.as_secs())
                    ),
                )
            });
        record(
            settings,
            "archiving_stalled",
            repository,
            e.as_ref().map_or(Ok(()), Err),
        );
    }
}

/// This host's name, as events and drill reports give it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// [`record`], but a failure fires only once it has lasted `grace` (measured from the first
/// evaluation that saw it, remembered in `.pending.CONDITION` in the state directory).
pub fn record_after(
    settings: &AlertSettings,
    condition: &str,
    repository: &str,
    outcome: Result<(), &Error>,
    grace: Duration,
) {
    if !settings.enabled() {
        return;
    }
    let dir = settings.state_dir();
    let pending = dir.join(format!(".pending.{condition}"));
    if outcome.is_ok() {
        let _ = std::fs::remove_file(&pending);
        record(settings, condition, repository, outcome);
        return;
    }
    let since = std::fs::metadata(&pending).and_then(|m| m.modified());
    let lasted = match since {
        Ok(t) => SystemTime::now().duration_since(t).unwrap_or_default(),
        Err(_) => {
            let _ = std::fs::create_dir_all(&dir);
            if let Err(e) = std::fs::write(&pending, b"") {
                tracing::warn!("alert state {}: {e}", pending.display());
            }
            Duration::ZERO
        }
    };
    if lasted >= grace {
        record(settings, condition, repository, outcome);
    }
}

/// What the server says (see [`crate::watch::server`]), as `walcore check --alert` and
/// `walcore serve --dbname` judge it: the server unreachable (`server_unreachable`), a file
/// waiting for `archive_command` longer than `ready_age` (`archive_backlog`), the stream's slot
/// without a connection for `stream_grace` or invalidated (`stream_disconnected`). Blocking.
pub fn evaluate_server(
    settings: &AlertSettings,
    repository: &str,
    watch: Result<&crate::watch::server::ServerWatch, &Error>,
) {
    use crate::error::ErrorKind;
    use crate::lifecycle::status::ago;
    let w = match watch {
        Ok(w) => {
            record(settings, "server_unreachable", repository, Ok(()));
            w
        }
        Err(e) => {
            record(settings, "server_unreachable", repository, Err(e));
            return;
        }
    };
    if let Some(limit) = settings.ready_age {
        let e = w
            .oldest_ready_age_seconds
            .filter(|age| *age > limit.as_secs_f64())
            .map(|age| {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "{} file(s) wait for archive_command on the server, the oldest for {}                          (more than {}); the archiver failed {} time(s){}",
                        w.ready_files,
                        ago(age as u64),
                        ago(limit.as_secs()),
                        w.archiver_failed_count,
                        match (&w.archiver_last_failed_wal, &w.archiver_last_failed_time) {
                            (Some(f), Some(t)) => format!(", last on {f} at {t}"),
                            _ => String::new(),
                        }
                    ),
                )
            });
        record(
            settings,
            "archive_backlog",
            repository,
            e.as_ref().map_or(Ok(()), Err),
        );
    }
    if let Some(slot) = &w.slot {
        if slot.wal_status.as_deref() == Some("lost") {
            let e = Error::new(
                ErrorKind::Hole,
                format!(
                    "the stream's slot {} was invalidated (max_slot_wal_keep_size): the server                      removed WAL the repository may lack; take a base backup now",
                    slot.name
                ),
            );
            record(settings, "stream_disconnected", repository, Err(&e));
        } else if !slot.active {
            let e = Error::new(
                ErrorKind::Transient,
                format!(
                    "nothing streams from the slot {}: walcore stream is not running or cannot                      connect ({} byte(s) of WAL retained for it)",
                    slot.name,
                    slot.retained_bytes.unwrap_or(0)
                ),
            );
            record_after(
                settings,
                "stream_disconnected",
                repository,
                Err(&e),
                settings.stream_grace,
            );
        } else {
            record_after(
                settings,
                "stream_disconnected",
                repository,
                Ok(()),
                settings.stream_grace,
            );
        }
    }
}

fn event(status: &'static str, condition: &str, repository: &str, error: Option<String>) -> Event {
    let host = hostname();
    let text = match &error {
        Some(e) => format!("walcore on {host}: {condition} is failing ({repository}): {e}"),
        None => format!("walcore on {host}: {condition} works again ({repository})"),
    };
    Event {
        status,
        condition: condition.to_owned(),
        repository: repository.to_owned(),
        host,
        time: crate::backup::catalog::format_time(SystemTime::now()),
        error,
        text,
    }
}

/// Sends `event` to the command and the webhook; true when every one configured took it.
fn deliver(settings: &AlertSettings, event: &Event) -> bool {
    let Ok(json) = serde_json::to_vec(event) else {
        return false;
    };
    let deadline = Instant::now() + DELIVERY_TIME;
    let mut ok = true;
    if let Some(cmd) = &settings.command
        && let Err(e) = run_command(cmd, &json, deadline)
    {
        tracing::warn!("the alert command failed: {e}");
        ok = false;
    }
    if let Some(url) = &settings.webhook
        && let Err(e) = post(url, &json, deadline)
    {
        tracing::warn!("the alert webhook failed: {e}");
        ok = false;
    }
    if ok {
        tracing::info!(condition = %event.condition, "alert sent: {}", event.status);
    }
    ok
}

fn run_command(cmd: &str, json: &[u8], deadline: Instant) -> Result<(), String> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting it: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(json);
        let _ = stdin.write_all(b"\n");
    }
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("it exited with {status}")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("it took longer than {}s", DELIVERY_TIME.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// POSTs `json` to `url` (http or https), on a runtime of its own: the caller may be on one
/// that is shutting down.
fn post(url: &str, json: &[u8], deadline: Instant) -> Result<(), String> {
    let url =
        reqwest::Url::parse(url).map_err(|_| "WALCORE_ALERT_WEBHOOK is not a URL".to_string())?;
    let body = json.to_vec();
    let left = deadline.saturating_duration_since(Instant::now());
    let work = move || -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            crate::store::remote::install_crypto_provider();
            let client = reqwest::Client::builder()
                .timeout(left)
                .build()
                .map_err(|e| format!("{e}"))?;
            let resp = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                // The error may print the URL, which holds the webhook's token: say only what.
                .map_err(|e| {
                    if e.is_timeout() {
                        "no answer in time".to_string()
                    } else if e.is_connect() {
                        "could not connect".to_string()
                    } else {
                        "the request failed".to_string()
                    }
                })?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!("it answered {}", resp.status()))
            }
        })
    };
    std::thread::spawn(work)
        .join()
        .map_err(|_| "the webhook thread failed".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn settings(dir: &std::path::Path, command: &str) -> AlertSettings {
        AlertSettings {
            command: Some(command.to_owned()),
            webhook: None,
            state_dir: Some(dir.join("state")),
            ..AlertSettings::default()
        }
    }

    fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    }

    fn watch(oldest: Option<f64>, slot: Option<(bool, &str)>) -> crate::watch::server::ServerWatch {
        crate::watch::server::ServerWatch {
            observed_at: String::new(),
            in_recovery: false,
            ready_files: u64::from(oldest.is_some()),
            oldest_ready_age_seconds: oldest,
            archiver_failed_count: 4,
            archiver_last_failed_wal: Some("000000010000000000000003".into()),
            archiver_last_failed_time: Some("2026-12-06T04:00:00.000Z".into()),
            archiver_last_archived_time: None,
            slot: slot.map(|(active, wal)| crate::watch::server::SlotWatch {
                name: "walcore".into(),
                active,
                wal_status: Some(wal.into()),
                retained_bytes: Some(1 << 24),
                lag_bytes: Some(0),
                flush_lag_seconds: None,
                application_name: None,
                sync_state: None,
            }),
        }
    }

    fn fired(out: &std::path::Path) -> Vec<(String, String)> {
        lines(out)
            .iter()
            .map(|e| {
                (
                    e["condition"].as_str().unwrap_or("").to_owned(),
                    e["status"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn the_server_side_fires_on_old_ready_files_and_a_slot_past_its_grace() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("events");
        let mut s = settings(dir.path(), &format!("cat >> {}", out.display()));
        s.ready_age = Some(Duration::from_secs(300));
        s.stream_grace = Duration::from_millis(300);
        // Young files and a slot just left: nothing yet.
        evaluate_server(
            &s,
            "file:///r",
            Ok(&watch(Some(12.0), Some((false, "reserved")))),
        );
        assert!(fired(&out).is_empty(), "{:?}", fired(&out));
        assert!(firing(&s).is_empty(), "a pending condition is not firing");
        std::thread::sleep(Duration::from_millis(400));
        evaluate_server(
            &s,
            "file:///r",
            Ok(&watch(Some(301.0), Some((false, "reserved")))),
        );
        let got = fired(&out);
        assert!(
            got.contains(&("archive_backlog".into(), "firing".into())),
            "{got:?}"
        );
        assert!(
            got.contains(&("stream_disconnected".into(), "firing".into())),
            "{got:?}"
        );
        let backlog = &lines(&out)[0];
        assert!(
            backlog["error"]
                .as_str()
                .is_some_and(|t| t.contains("000000010000000000000003")),
            "{backlog}"
        );
        // Everything well again: both resolve; an invalidated slot fires without a grace.
        evaluate_server(&s, "file:///r", Ok(&watch(None, Some((true, "reserved")))));
        let got = fired(&out);
        assert_eq!(got.len(), 4, "{got:?}");
        evaluate_server(&s, "file:///r", Ok(&watch(None, Some((false, "lost")))));
        let last = lines(&out).pop().expect("an event");
        assert_eq!(last["condition"], "stream_disconnected");
        assert!(
            last["error"]
                .as_str()
                .is_some_and(|t| t.contains("invalidated")),
            "{last}"
        );
    }

    #[test]
    fn a_condition_fires_once_and_resolves_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("events");
        let s = settings(dir.path(), &format!("cat >> {}", out.display()));
        let e = Error::new(ErrorKind::Storage, "the store said no");
        record(&s, "take", "file:///r", Ok(()));
        assert!(lines(&out).is_empty(), "nothing to resolve");
        for _ in 0..3 {
            record(&s, "take", "file:///r", Err(&e));
        }
        record(&s, "verify", "file:///r", Err(&e));
        record(&s, "take", "file:///r", Ok(()));
        record(&s, "take", "file:///r", Ok(()));
        let got: Vec<(String, String)> = lines(&out)
            .iter()
            .map(|e| {
                (
                    e["condition"].as_str().unwrap_or("").to_owned(),
                    e["status"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        let want = [
            ("take", "firing"),
            ("verify", "firing"),
            ("take", "resolved"),
        ];
        assert_eq!(
            got,
            want.map(|(a, b)| (a.to_owned(), b.to_owned())).to_vec()
        );
        let first = &lines(&out)[0];
        assert!(
            first["error"]
                .as_str()
                .is_some_and(|t| t.contains("the store said no"))
        );
    }

    #[test]
    fn an_alert_not_delivered_is_tried_again_at_the_next_failure() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("events");
        let flag = dir.path().join("receiver-up");
        // The receiver is down until `flag` exists.
        let s = settings(
            dir.path(),
            &format!("test -e {} && cat >> {}", flag.display(), out.display()),
        );
        let e = Error::new(ErrorKind::Storage, "down");
        record(&s, "archive_command", "file:///r", Err(&e));
        assert!(lines(&out).is_empty());
        std::fs::write(&flag, b"").expect("flag");
        record(&s, "archive_command", "file:///r", Err(&e));
        record(&s, "archive_command", "file:///r", Err(&e));
        assert_eq!(lines(&out).len(), 1, "delivered once, when it could be");
    }

    #[test]
    fn debug_shows_neither_the_command_nor_the_address() {
        let s = AlertSettings {
            command: Some("notify --token s3cr3t".into()),
            webhook: Some("https://hooks.example/T0K3N".into()),
            ..AlertSettings::default()
        };
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("T0K3N"),
            "{shown}"
        );
    }
}
