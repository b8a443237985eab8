//! `walcore metrics` and `walcore serve`'s `/metrics`: the status of a repository in
//! Prometheus' text exposition format (version 0.0.4).
//!
//! Every time is given twice: as a Unix timestamp, and as an age in seconds at the moment of
//! rendering, so that an alert rule needs no `time()` (`walcore_last_archived_age_seconds >
//! 600`). Ages are computed from the timestamps at `now`, not taken from the report: a
//! report `serve` collected a minute ago still gives the ages of this scrape. Sizes are in
//! bytes, durations in seconds; names follow Prometheus' conventions. Labels carry only what
//! does not change from one scrape to the next (a timeline, a kind), never a segment name.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use super::status::StatusReport;

/// One metric family: its name, help, type, and samples (labels, value).
struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<(String, f64)>,
}

/// The exposition of `report` at `now`; `collected_in` is how long taking the report took.
pub fn render(report: &StatusReport, now: SystemTime, collected_in: f64) -> String {
    let mut families: Vec<Family> = Vec::new();
    let mut gauge = |name, help, samples: Vec<(String, f64)>| {
        families.push(Family {
            name,
            help,
            kind: "gauge",
            samples,
        })
    };
    let one = |v: Option<f64>| v.map(|v| vec![(String::new(), v)]).unwrap_or_default();
    let age = |t: Option<f64>| t.map(|t| (unix(now) - t).max(0.0));

    let r = &report.repository;
    gauge(
        "walcore_repository_info",
        "The repository reported on; always 1.",
        vec![(
            labels(&[
                ("url", r.url.as_str()),
                ("system_identifier", r.system_identifier.as_str()),
                ("pg_major", &r.pg_major.to_string()),
                ("format_version", &r.format_version.to_string()),
                ("encrypted", if r.encrypted { "true" } else { "false" }),
                (
                    "key_fingerprint",
                    r.key_fingerprint.as_deref().unwrap_or(""),
                ),
            ]),
            1.0,
        )],
    );
    gauge(
        "walcore_status_collect_seconds",
        "How long reading the repository's status took.",
        one(Some(collected_in)),
    );

    let archived = report
        .last_archived
        .as_ref()
        .and_then(|a| timestamp(&a.stored_at));
    gauge(
        "walcore_last_archived_timestamp_seconds",
        "When the newest WAL segment in the repository was stored.",
        one(archived),
    );
    gauge(
        "walcore_last_archived_age_seconds",
        "Seconds since the newest WAL segment in the repository was stored.",
        one(age(archived)),
    );

    let tail = report
        .stream_tail
        .as_ref()
        .and_then(|t| timestamp(&t.stored_at));
    gauge(
        "walcore_stream_tail_timestamp_seconds",
        "When walcore stream last stored a piece of the segment being filled.",
        one(tail),
    );
    gauge(
        "walcore_stream_tail_age_seconds",
        "Seconds since walcore stream last stored a piece of the segment being filled.",
        one(age(tail)),
    );
    gauge(
        "walcore_stream_tail_bytes",
        "How far the stored pieces reach into the segment being filled.",
        one(report.stream_tail.as_ref().map(|t| f64::from(t.bytes))),
    );

    gauge(
        "walcore_backups",
        "Complete base backups in the catalog.",
        one(Some(report.backups as f64)),
    );
    let backup = report.last_backup.as_ref();
    let backup_stop = backup.and_then(|b| timestamp(&b.stop_time));
    gauge(
        "walcore_last_backup_timestamp_seconds",
        "When the newest complete base backup ended.",
        one(backup_stop),
    );
    gauge(
        "walcore_last_backup_age_seconds",
        "Seconds since the newest complete base backup ended.",
        one(age(backup_stop)),
    );
    gauge(
        "walcore_last_backup_duration_seconds",
        "How long the newest complete base backup took.",
        one(backup.map(|b| b.duration_seconds as f64)),
    );
    gauge(
        "walcore_last_backup_data_bytes",
        "Bytes of data in the newest complete base backup, before compression.",
        one(backup.map(|b| b.data_bytes as f64)),
    );
    gauge(
        "walcore_last_backup_stored_bytes",
        "Bytes the newest complete base backup takes in the repository.",
        one(backup.map(|b| b.stored_bytes as f64)),
    );

    gauge(
        "walcore_repository_bytes",
        "Bytes stored, by kind (wal: segments and history files; backups: base backups).",
        vec![
            (labels(&[("kind", "wal")]), report.bytes.wal as f64),
            (labels(&[("kind", "backups")]), report.bytes.backups as f64),
        ],
    );

    let window = report.window.as_ref();
    gauge(
        "walcore_restorable_window_start_timestamp_seconds",
        "The earliest moment a restore can reach: the end of the oldest usable backup.",
        one(window.and_then(|w| timestamp(&w.earliest))),
    );
    gauge(
        "walcore_restorable_window_end_timestamp_seconds",
        "The latest moment a restore can reach without a gap: the newest segment's time.",
        one(window.and_then(|w| w.latest.as_deref().and_then(timestamp))),
    );
    gauge(
        "walcore_restorable_window_gaps",
        "Gaps in the WAL of the restorable window: each one ends what a restore can reach.",
        one(window.map(|w| w.gaps.len() as f64)),
    );
    gauge(
        "walcore_wal_segments",
        "WAL segments stored, per timeline.",
        report
            .timelines
            .iter()
            .map(|t| {
                (
                    labels(&[("timeline", &t.timeline.to_string())]),
                    t.segments as f64,
                )
            })
            .collect(),
    );
    gauge(
        "walcore_wal_holes",
        "Runs of missing segments between stored ones, per timeline.",
        report
            .timelines
            .iter()
            .map(|t| {
                (
                    labels(&[("timeline", &t.timeline.to_string())]),
                    t.holes_total as f64,
                )
            })
            .collect(),
    );

    let verify = report.last_verify.as_ref();
    let verified = verify.and_then(|v| timestamp(&v.time));
    gauge(
        "walcore_last_verify_timestamp_seconds",
        "When the last walcore verify ended.",
        one(verified),
    );
    gauge(
        "walcore_last_verify_age_seconds",
        "Seconds since the last walcore verify ended.",
        one(age(verified)),
    );
    gauge(
        "walcore_last_verify_problems",
        "Problems the last walcore verify found.",
        one(verify.map(|v| v.problems as f64)),
    );
    gauge(
        "walcore_last_verify_restore_affected",
        "Problems the last walcore verify found that cost a restore.",
        one(verify.map(|v| v.damage as f64)),
    );

    let drill = report.last_drill.as_ref();
    let drilled = drill.and_then(|d| timestamp(&d.time));
    gauge(
        "walcore_last_drill_timestamp_seconds",
        "When the last walcore drill ended.",
        one(drilled),
    );
    gauge(
        "walcore_last_drill_age_seconds",
        "Seconds since the last walcore drill ended.",
        one(age(drilled)),
    );
    gauge(
        "walcore_last_drill_success",
        "1 when the last walcore drill passed, 0 when it failed.",
        one(drill.map(|d| f64::from(u8::from(d.passed)))),
    );
    gauge(
        "walcore_last_drill_rto_seconds",
        "The last drill's time from the start of the restore until the server accepted queries.",
        one(drill.and_then(|d| d.rto_seconds)),
    );
    gauge(
        "walcore_last_drill_rto_phase_seconds",
        "The last drill's RTO by phase: download, start and recovery.",
        drill
            .map(|d| {
                [
                    ("download", d.download_seconds),
                    ("start", d.start_seconds),
                    ("recovery", d.recovery_seconds),
                ]
                .into_iter()
                .filter_map(|(phase, s)| Some((labels(&[("phase", phase)]), s?)))
                .collect()
            })
            .unwrap_or_default(),
    );
    gauge(
        "walcore_last_drill_rpo_seconds",
        "How far the last drill's newest commit restored trailed the newest WAL stored.",
        one(drill.and_then(|d| d.rpo_seconds)),
    );

    if report.server.is_some() || report.server_error.is_some() {
        gauge(
            "walcore_server_up",
            "Whether the server's archiving state could be read (walcore with --dbname).",
            one(Some(f64::from(u8::from(report.server.is_some())))),
        );
    }
    let server = report.server.as_ref();
    gauge(
        "walcore_archive_ready_files",
        "Files waiting on the server for archive_command.",
        one(server.map(|w| w.ready_files as f64)),
    );
    gauge(
        "walcore_archive_ready_oldest_age_seconds",
        "How long the oldest file waiting for archive_command has waited.",
        one(server.map(|w| w.oldest_ready_age_seconds.unwrap_or(0.0))),
    );
    let slot = server.and_then(|w| w.slot.as_ref());
    gauge(
        "walcore_stream_slot_active",
        "1 when walcore stream is connected to its replication slot.",
        one(slot.map(|s| f64::from(u8::from(s.active)))),
    );
    gauge(
        "walcore_stream_slot_retained_bytes",
        "WAL the stream's replication slot keeps on the server.",
        one(slot.and_then(|s| s.retained_bytes.map(|b| b as f64))),
    );
    gauge(
        "walcore_stream_lag_bytes",
        "How far the stream's stored position is behind the server's.",
        one(slot.and_then(|s| s.lag_bytes.map(|b| b as f64))),
    );
    gauge(
        "walcore_stream_flush_lag_seconds",
        "How long the last commits waited for the stream to store them.",
        one(slot.and_then(|s| s.flush_lag_seconds)),
    );

    gauge(
        "walcore_alerts_firing",
        "Alert conditions firing on this host (failing hooks and commands).",
        one(Some(report.failing.len() as f64)),
    );
    gauge(
        "walcore_alert_firing",
        "1 for each alert condition firing on this host.",
        report
            .failing
            .iter()
            .map(|a| (labels(&[("condition", a.condition.as_str())]), 1.0))
            .collect(),
    );

    let mut failures = report.failures.clone();
    for known in [
        "archive_command",
        "restore_command",
        "take",
        "expire",
        "verify",
        "drill",
    ] {
        failures.entry(known.to_owned()).or_insert(0);
    }
    families.push(Family {
        name: "walcore_failures_total",
        help: "Failed hook calls and commands counted on this host, by command.",
        kind: "counter",
        samples: failures
            .iter()
            .map(|(c, n)| (labels(&[("command", c.as_str())]), *n as f64))
            .collect(),
    });
    if let Some(w) = server {
        families.push(Family {
            name: "walcore_archiver_failures_total",
            help: "Failed archive_command calls the server counted (pg_stat_archiver).",
            kind: "counter",
            samples: vec![(String::new(), w.archiver_failed_count as f64)],
        });
    }

    let mut out = String::new();
    for f in families.iter().filter(|f| !f.samples.is_empty()) {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, value) in &f.samples {
            let _ = writeln!(out, "{}{} {}", f.name, labels, number(*value));
        }
    }
    out
}

/// `walcore_status_up`: whether the status behind the rest of the exposition could be read
/// (0 alone when the repository is unreachable, which is itself what to alert on).
pub fn up(ok: bool) -> String {
    format!(
        "# HELP walcore_status_up Whether the repository's status could be read.\n\
         # TYPE walcore_status_up gauge\nwalcore_status_up {}\n",
        u8::from(ok)
    )
}

/// `{a="x",b="y"}` with the values escaped as the format asks (backslash, quote, newline).
fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', r"\\")
                .replace('"', "\\\"")
                .replace('\n', r"\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// A value as the format writes it: integers without a fraction, milliseconds kept.
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.3}")
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The Unix time of an RFC 3339 time as the catalog writes it.
fn timestamp(text: &str) -> Option<f64> {
    let t = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    Some(t.timestamp_millis() as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            labels(&[("url", "s3://b/\"x\"\\\n")]),
            r#"{url="s3://b/\"x\"\\\n"}"#
        );
    }

    #[test]
    fn numbers_keep_milliseconds_and_write_integers_plainly() {
        assert_eq!(number(3.0), "3");
        assert_eq!(number(1_780_000_000.25), "1780000000.250");
        assert_eq!(timestamp("2026-12-06T02:00:00.500Z"), Some(1_796_522_400.5));
    }
}
