//! `walcore status`: is the data safe, and how far back can it be restored? The repository,
//! the newest archived segment and its age, the newest backup and its age, the restorable
//! window and its gaps, the WAL per timeline with its holes, the bytes stored, and what the
//! last `verify` found.
//!
//! Everything comes through the index (the catalog, and the WAL as directory summaries) plus
//! two listing requests for the newest segment's time and one for the verify ledger: a
//! repository of a million segments answers in about the time of a `list`. Like every reader
//! of the index it cannot see an object deleted behind walcore's back in an older directory;
//! `verify` lists everything and tells.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use serde::Serialize;

use super::verify::{self, LastVerify, StoredWal};
use crate::backup::catalog::{self, BackupRecord};
use crate::backup::plan::read_histories;
use crate::backup::progress::human;
use crate::error::Error;
use crate::pg::{TimelineHistory, TimelineId, WalFileName, WalSegmentSize};
use crate::repo::Repository;

/// Holes listed per timeline (the count is always whole).
const HOLES_SHOWN: usize = 20;

/// The state of a repository (`walcore status`; `--json` prints it as it is: see the README's
/// "status" section for the fields).
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// When the status was taken (RFC 3339, UTC).
    pub time: String,
    pub repository: RepositoryStatus,
    /// The newest segment stored on the newest timeline that has one.
    pub last_archived: Option<LastArchived>,
    /// What `walcore stream` stored of the segment after the last archived one.
    pub stream_tail: Option<StreamTail>,
    /// The complete backup that finished last.
    pub last_backup: Option<LastBackup>,
    /// Complete backups in the catalog.
    pub backups: usize,
    /// What a restore can reach along the newest timeline's history.
    pub window: Option<RestorableWindow>,
    /// The stored WAL segments of each timeline, and the holes between them.
    pub timelines: Vec<TimelineWal>,
    pub bytes: StoredBytes,
    /// What the newest `walcore verify` found; `None` when it never ran.
    pub last_verify: Option<LastVerify>,
    /// What the newest `walcore drill` found; `None` when no drill ran.
    pub last_drill: Option<LastDrill>,
    /// The alert conditions firing on this host (failing hooks and commands), oldest first;
    /// filled in by the command from the alert state ([`crate::alert::firing`]).
    pub failing: Vec<crate::alert::Firing>,
    /// Failures counted on this host, per hook or command (`archive_command`, `take`, …);
    /// filled in by the command ([`crate::alert::failure_counts`]).
    pub failures: std::collections::BTreeMap<String, u64>,
    /// The server's side of archiving and streaming, when the command was given `--dbname`
    /// ([`crate::watch::server`]); filled in by the command.
    pub server: Option<crate::watch::server::ServerWatch>,
    /// Why the server could not be read, when it was asked and could not be.
    pub server_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepositoryStatus {
    pub url: String,
    /// Decimal, as in the repository metadata.
    pub system_identifier: String,
    pub pg_major: u32,
    pub format_version: u32,
    pub wal_segment_size: u32,
    /// Whether this walcore encrypts (a key is configured), and the key's fingerprint.
    pub encrypted: bool,
    pub key_fingerprint: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastArchived {
    pub segment: String,
    pub timeline: u32,
    /// When the store wrote it (RFC 3339).
    pub stored_at: String,
    pub age_seconds: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastBackup {
    pub id: String,
    pub start_time: String,
    pub stop_time: String,
    pub age_seconds: u64,
    pub duration_seconds: u64,
    /// The data directory's size (as tar), and what the backup takes in the repository.
    pub data_bytes: u64,
    pub stored_bytes: u64,
}

/// The restorable window: from the consistent point of the oldest backup on the newest
/// timeline's history to about when the newest segment on it was stored.
#[derive(Debug, Clone, Serialize)]
pub struct RestorableWindow {
    pub timeline: u32,
    pub from_backup: String,
    /// The earliest point in time a restore reaches: that backup's end.
    pub earliest: String,
    /// About the latest: when the newest segment along the history was stored (its last
    /// commit is a little older).
    pub latest: Option<String>,
    pub first_segment: String,
    pub last_segment: String,
    pub segments: u64,
    /// Runs of segments missing inside the window, each with what it costs.
    pub gaps: Vec<WindowGap>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WindowGap {
    pub first: String,
    pub last: String,
    pub segments: usize,
    pub consequence: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelineWal {
    pub timeline: u32,
    pub segments: u64,
    pub first: String,
    pub last: String,
    pub bytes: u64,
    /// Segments missing between the first and the last stored one, as runs (at most
    /// [`HOLES_SHOWN`]; `holes_total` counts them all). Retention leaves such holes on purpose
    /// between the WAL of a pinned old backup and the window; the window's `gaps` say which
    /// holes cost a restore.
    pub holes: Vec<Hole>,
    pub holes_total: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Hole {
    pub first: String,
    pub last: String,
    pub segments: u64,
}

/// The tail of the archive: the segment being filled, as far as the stream stored it.
#[derive(Debug, Clone, Serialize)]
pub struct StreamTail {
    pub segment: String,
    /// The WAL position the stored pieces reach without a gap.
    pub reaches: String,
    /// Bytes of the segment stored.
    pub bytes: u32,
    pub stored_at: String,
    pub age_seconds: u64,
}

/// The newest restore drill, as its report in the repository says (seconds to the millisecond).
#[derive(Debug, Clone, Serialize)]
pub struct LastDrill {
    /// When it ended (RFC 3339).
    pub time: String,
    pub age_seconds: u64,
    pub passed: bool,
    pub failed_in: Option<String>,
    pub error: Option<String>,
    pub backup: Option<String>,
    pub target: String,
    pub rto_seconds: Option<f64>,
    pub download_seconds: Option<f64>,
    pub start_seconds: Option<f64>,
    pub recovery_seconds: Option<f64>,
    pub rpo_seconds: Option<f64>,
    pub last_commit_restored: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StoredBytes {
    pub wal: u64,
    pub backups: u64,
}

/// Takes the status of the repository.
pub async fn status(repo: &Repository) -> Result<StatusReport, Error> {
    let now = SystemTime::now();
    let meta = catalog::repository_meta(repo).await?;
    let seg = meta.segment_size()?;
    let cat = catalog::scan(repo).await?;
    let (dirs, history) = super::index::wal_summary(repo).await?;
    let history_keys: Vec<String> = history.iter().map(|o| o.key.clone()).collect();
    let histories = read_histories(repo, history_keys.iter().map(String::as_str)).await?;
    let wal = StoredWal::from_index(&dirs, history, None);
    let last_verify = verify::last_run(repo).await?;
    let last_drill = crate::backup::drill::last(repo).await?.map(|d| LastDrill {
        age_seconds: chrono::DateTime::parse_from_rfc3339(&d.finished_at)
            .map_or(0, |t| age(now, t.with_timezone(&chrono::Utc).into())),
        time: d.finished_at,
        passed: d.passed,
        failed_in: d.failed_in,
        error: d.error,
        backup: d.backup,
        target: d.target,
        rto_seconds: d.rto_seconds,
        download_seconds: d.download_seconds,
        start_seconds: d.start_seconds,
        recovery_seconds: d.recovery_seconds,
        rpo_seconds: d.rpo_seconds,
        last_commit_restored: d.last_commit_restored,
    });

    let timelines = timelines(&wal, seg);
    let mut last_archived = None;
    if let Some(t) = timelines.last()
        && let Some(end) =
            crate::backup::plan::newest_segment(repo, TimelineId(t.timeline), seg).await?
    {
        last_archived = Some(LastArchived {
            segment: end.segment.to_string(),
            timeline: t.timeline,
            stored_at: catalog::format_time(end.stored_at.into()),
            age_seconds: age(now, end.stored_at.into()),
        });
    }
    let mut stream_tail = None;
    if let Some(a) = &last_archived
        && let Ok(name) = WalFileName::parse(&a.segment)
        && let Ok(segno) = name.segno(seg)
    {
        let next = WalFileName::segment(name.timeline(), crate::pg::SegmentNo(segno.0 + 1), seg);
        if let Some((bytes, at)) = crate::ops::tail::reach(repo, &next).await? {
            let lsn = crate::pg::Lsn((segno.0 + 1) * u64::from(seg.bytes()) + u64::from(bytes));
            stream_tail = Some(StreamTail {
                segment: next.to_string(),
                reaches: lsn.to_string(),
                bytes,
                stored_at: catalog::format_time(at),
                age_seconds: age(now, at),
            });
        }
    }
    let window = window(&cat.records, &histories, &wal, seg, last_archived.as_ref());
    let last_backup = cat
        .records
        .iter()
        .filter_map(|r| Some((r.stop().ok()?, r)))
        .max_by_key(|(stop, _)| *stop)
        .map(|(stop, r)| LastBackup {
            id: r.id.clone(),
            start_time: r.start_time.clone(),
            stop_time: r.stop_time.clone(),
            age_seconds: age(now, stop.into()),
            duration_seconds: r
                .start()
                .map(|start| (stop - start).num_seconds().max(0) as u64)
                .unwrap_or(0),
            data_bytes: r.data_bytes(),
            stored_bytes: r.stored_bytes(),
        });
    let bytes = StoredBytes {
        wal: timelines.iter().map(|t| t.bytes).sum::<u64>()
            + wal.others.iter().map(|(_, o)| o.size).sum::<u64>(),
        backups: cat.records.iter().map(BackupRecord::stored_bytes).sum(),
    };
    Ok(StatusReport {
        time: catalog::format_time(now),
        repository: RepositoryStatus {
            url: repo.store().describe(),
            system_identifier: meta.system_identifier.clone(),
            pg_major: meta.pg_major,
            format_version: meta.format_version,
            wal_segment_size: meta.wal_segment_size,
            encrypted: repo.codec().key().is_some(),
            key_fingerprint: repo.codec().key().map(|k| k.fingerprint().to_string()),
        },
        last_archived,
        stream_tail,
        backups: cat.records.len(),
        last_backup,
        window,
        timelines,
        bytes,
        last_verify,
        last_drill,
        failing: Vec::new(),
        failures: Default::default(),
        server: None,
        server_error: None,
    })
}

fn age(now: SystemTime, then: SystemTime) -> u64 {
    now.duration_since(then).map_or(0, |d| d.as_secs())
}

/// Each timeline's segments: how many, the first and last, the holes between.
fn timelines(wal: &StoredWal, seg: WalSegmentSize) -> Vec<TimelineWal> {
    let name = |tli: TimelineId, segno: u64| {
        WalFileName::segment(tli, crate::pg::SegmentNo(segno), seg).to_string()
    };
    let mut out: Vec<TimelineWal> = Vec::new();
    // The timeline and segment seen last; a timeline's `last` name is written when it ends.
    let mut last: Option<(TimelineId, u64)> = None;
    for (tli, num, size) in wal.segments() {
        let Some(crate::pg::SegmentNo(segno)) = verify::segno_of(num, seg) else {
            continue;
        };
        match (out.last_mut(), last) {
            (Some(t), Some((prev_tli, prev))) if prev_tli == tli => {
                if segno > prev + 1 {
                    t.holes_total += 1;
                    if t.holes.len() < HOLES_SHOWN {
                        t.holes.push(Hole {
                            first: name(tli, prev + 1),
                            last: name(tli, segno - 1),
                            segments: segno - prev - 1,
                        });
                    }
                }
                t.segments += 1;
                t.bytes += size;
            }
            (ended, _) => {
                if let (Some(t), Some((prev_tli, prev))) = (ended, last) {
                    t.last = name(prev_tli, prev);
                }
                out.push(TimelineWal {
                    timeline: tli.0,
                    segments: 1,
                    first: name(tli, segno),
                    last: String::new(),
                    bytes: size,
                    holes: Vec::new(),
                    holes_total: 0,
                });
            }
        }
        last = Some((tli, segno));
    }
    if let (Some(t), Some((tli, segno))) = (out.last_mut(), last) {
        t.last = name(tli, segno);
    }
    out
}

/// The window through verify's continuity pass, on the index's view of the WAL.
fn window(
    records: &[BackupRecord],
    histories: &BTreeMap<TimelineId, TimelineHistory>,
    wal: &StoredWal,
    seg: WalSegmentSize,
    last_archived: Option<&LastArchived>,
) -> Option<RestorableWindow> {
    let present = |name: &WalFileName| wal.segment(name).is_some();
    let (report, gaps) = verify::window_pass(records, histories, wal, &present, seg)?;
    let from = records.iter().find(|r| r.id == report.from_backup)?;
    let latest = last_archived
        .filter(|a| a.segment == report.last_segment)
        .map(|a| a.stored_at.clone());
    Some(RestorableWindow {
        timeline: report.timeline,
        from_backup: report.from_backup.clone(),
        earliest: from.stop_time.clone(),
        latest,
        first_segment: report.first_segment,
        last_segment: report.last_segment,
        segments: report.segments,
        gaps: gaps
            .into_iter()
            .map(|g| {
                let file = |k: Option<&String>| {
                    k.and_then(|k| k.rsplit('/').next())
                        .unwrap_or_default()
                        .to_owned()
                };
                WindowGap {
                    first: file(g.keys.first()),
                    last: file(g.keys.last()),
                    segments: g.keys.len(),
                    consequence: g.consequence,
                }
            })
            .collect(),
    })
}

/// Seconds as a short duration: `42s`, `3m 20s`, `5h 02m`, `3d 4h`.
pub(crate) fn ago(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.repository;
        writeln!(
            f,
            "repository     {} (system {}, PostgreSQL {}, {})",
            r.url,
            r.system_identifier,
            r.pg_major,
            match &r.key_fingerprint {
                Some(k) => format!("encrypted, key {k}"),
                None => "not encrypted".into(),
            }
        )?;
        match &self.last_archived {
            Some(a) => writeln!(
                f,
                "last archived  {} (timeline {}), stored {}, {} ago",
                a.segment,
                a.timeline,
                a.stored_at,
                ago(a.age_seconds)
            )?,
            None => writeln!(f, "last archived  nothing yet")?,
        }
        if let Some(t) = &self.stream_tail {
            writeln!(
                f,
                "stream tail    {} up to {} ({}), stored {}, {} ago",
                t.segment,
                t.reaches,
                human(u64::from(t.bytes)),
                t.stored_at,
                ago(t.age_seconds)
            )?;
        }
        match &self.last_backup {
            Some(b) => writeln!(
                f,
                "last backup    {}, finished {}, {} ago; took {}, {} of data stored as {} ({} complete backup(s))",
                b.id,
                b.stop_time,
                ago(b.age_seconds),
                ago(b.duration_seconds),
                human(b.data_bytes),
                human(b.stored_bytes),
                self.backups
            )?,
            None => writeln!(f, "last backup    none (walcore take)")?,
        }
        match &self.window {
            Some(w) => {
                writeln!(
                    f,
                    "restorable     {} .. {} (timeline {}, from backup {}, {} segments{})",
                    w.earliest,
                    w.latest.as_deref().map_or_else(
                        || format!("the end of {}", w.last_segment),
                        |t| format!("about {t}")
                    ),
                    w.timeline,
                    w.from_backup,
                    w.segments,
                    if w.gaps.is_empty() {
                        ", no gap".to_string()
                    } else {
                        format!(", {} GAP(S)", w.gaps.len())
                    }
                )?;
                for g in &w.gaps {
                    writeln!(
                        f,
                        "  gap          {}..{} ({} segment(s)): {}",
                        g.first, g.last, g.segments, g.consequence
                    )?;
                }
            }
            None => writeln!(f, "restorable     nothing: no backup with WAL after it")?,
        }
        for t in &self.timelines {
            writeln!(
                f,
                "WAL timeline {:<2} {} segments {}..{}, {}{}",
                t.timeline,
                t.segments,
                t.first,
                t.last,
                human(t.bytes),
                match t.holes_total {
                    0 => String::new(),
                    n => format!(", {n} hole(s), the first at {}", t.holes[0].first),
                }
            )?;
        }
        writeln!(
            f,
            "stored         WAL {}, backups {}",
            human(self.bytes.wal),
            human(self.bytes.backups)
        )?;
        match &self.last_verify {
            Some(v) => writeln!(
                f,
                "last verify    {}{}: {} problem(s){}, {} object(s) read{}",
                v.time,
                v.backup
                    .as_deref()
                    .map(|b| format!(" (backup {b})"))
                    .unwrap_or_default(),
                v.problems,
                if v.damage > 0 {
                    format!(", {} that cost a restore", v.damage)
                } else {
                    String::new()
                },
                v.objects_read,
                if v.full { " (--full)" } else { "" }
            ),
            None => writeln!(f, "last verify    never (run walcore verify on a schedule)"),
        }?;
        let secs = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{s:.1} s"));
        match &self.last_drill {
            Some(d) if d.passed => writeln!(
                f,
                "last drill     {} ({} ago): passed, backup {}, RTO {}, RPO {}",
                d.time,
                ago(d.age_seconds),
                d.backup.as_deref().unwrap_or("-"),
                secs(d.rto_seconds),
                secs(d.rpo_seconds)
            ),
            Some(d) => writeln!(
                f,
                "last drill     {} ({} ago): FAILED in {}: {}",
                d.time,
                ago(d.age_seconds),
                d.failed_in.as_deref().unwrap_or("?"),
                d.error.as_deref().unwrap_or("?")
            ),
            None => writeln!(f, "last drill     never (run walcore drill monthly)"),
        }?;
        if let Some(w) = &self.server {
            writeln!(
                f,
                "server         {} file(s) waiting for archive_command{}; archiver failures: {}{}",
                w.ready_files,
                w.oldest_ready_age_seconds
                    .map(|a| format!(", the oldest for {}", ago(a as u64)))
                    .unwrap_or_default(),
                w.archiver_failed_count,
                if w.in_recovery { " (a standby)" } else { "" }
            )?;
            match &w.slot {
                Some(slot) => writeln!(
                    f,
                    "stream slot    {}: {}, {} retained, {} behind{}",
                    slot.name,
                    if slot.active {
                        "connected"
                    } else {
                        "NOT CONNECTED"
                    },
                    human(slot.retained_bytes.unwrap_or(0)),
                    human(slot.lag_bytes.unwrap_or(0)),
                    slot.wal_status
                        .as_deref()
                        .map(|s| format!(", WAL {s}"))
                        .unwrap_or_default()
                ),
                None => writeln!(f, "stream slot    none (walcore stream does not run here)"),
            }?;
        }
        if let Some(e) = &self.server_error {
            writeln!(f, "server         UNREADABLE: {e}")?;
        }
        for failing in &self.failing {
            writeln!(
                f,
                "FAILING        {} since {}",
                failing.condition, failing.since
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Holes are counted in segments across log directories (256 segments of 16 MiB each).
    #[test]
    fn holes_are_runs_of_missing_segments_across_log_directories() {
        let seg = WalSegmentSize::new(16 * 1024 * 1024).expect("size");
        let mut dirs = super::super::index::WalDirs::new();
        let mut log0 = super::super::index::WalDir::default();
        for s in [1, 2, 3, 7, 0xFE] {
            log0.push_segment(s, 100);
        }
        let mut log1 = super::super::index::WalDir::default();
        for s in [0, 1] {
            log1.push_segment(s, 100);
        }
        dirs.entry("00000001".into())
            .or_default()
            .insert("00000000".into(), log0);
        dirs.entry("00000001".into())
            .or_default()
            .insert("00000001".into(), log1);
        let mut log2 = super::super::index::WalDir::default();
        log2.push_segment(0x40, 7);
        dirs.entry("00000002".into())
            .or_default()
            .insert("00000001".into(), log2);
        let wal = StoredWal::from_index(&dirs, Vec::new(), None);
        let t = timelines(&wal, seg);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].segments, 7);
        assert_eq!(t[0].bytes, 700);
        assert_eq!(t[0].first, "000000010000000000000001");
        assert_eq!(t[0].last, "000000010000000100000001");
        // 4..6, 8..FD, and FF (the last of log 0) before log 1 begins.
        let holes: Vec<(&str, &str, u64)> = t[0]
            .holes
            .iter()
            .map(|h| (h.first.as_str(), h.last.as_str(), h.segments))
            .collect();
        assert_eq!(
            holes,
            vec![
                ("000000010000000000000004", "000000010000000000000006", 3),
                ("000000010000000000000008", "0000000100000000000000FD", 246),
                ("0000000100000000000000FF", "0000000100000000000000FF", 1),
            ]
        );
        assert_eq!(t[0].holes_total, 3);
        assert_eq!((t[1].timeline, t[1].segments, t[1].holes_total), (2, 1, 0));
    }

    #[test]
    fn durations_read_short() {
        assert_eq!(ago(42), "42s");
        assert_eq!(ago(200), "3m 20s");
        assert_eq!(ago(5 * 3600 + 120), "5h 02m");
        assert_eq!(ago(3 * 86400 + 4 * 3600), "3d 4h");
    }
}
