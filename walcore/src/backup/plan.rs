//! The restore plan: which backup, along which timeline path, from which WAL segment to which,
//! to which target, with which recovery settings. [`plan`] is a pure function of what the
//! repository holds ([`Facts`]) and what was asked ([`Request`]); [`gather`] reads those facts,
//! and `restore` executes the plan (or prints it, for `--dry-run`).
//!
//! The choice follows PostgreSQL's own rules for recovery (`readRecoverySignalFile`,
//! `validateRecoveryParameters`, `tliOfPointInHistory`): a backup can recover to a target only if
//! its WAL, from its start to its stop, lies on the target timeline's history, and (for a time
//! or an LSN) it finished before the target.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, FixedOffset, Utc};
use serde::Serialize;

use super::catalog::{self, BackupRecord};
use crate::error::{Error, ErrorKind};
use crate::pg::{
    Lsn, SegmentNo, TimelineHistory, TimelineId, WalFileKind, WalFileName, WalSegmentSize,
};
use crate::repo::Repository;
use crate::store::wal_key;

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Target {
    /// Replay to the end of the archive.
    #[default]
    End,
    /// `recovery_target_time`.
    Time(DateTime<FixedOffset>),
    /// `recovery_target_lsn`.
    Lsn(Lsn),
    /// `recovery_target_xid`.
    Xid(u64),
    /// `recovery_target_name` (a restore point made with `pg_create_restore_point`).
    Name(String),
    /// `recovery_target = 'immediate'`: as soon as the backup is consistent.
    Immediate,
}

impl Target {
    /// Parses `--target-time`: an ISO 8601 / PostgreSQL-style timestamp with an explicit zone
    /// (`2026-11-30 04:30:12+00`, `2026-11-30T04:30:12.5Z`, `2026-11-30 04:30:12 UTC`).
    pub fn parse_time(text: &str) -> Result<Target, Error> {
        let mut t = text.trim().to_owned();
        if t.get(10..11).is_some_and(|c| c == "T" || c == "t") {
            t.replace_range(10..11, " ");
        }
        for utc in [" UTC", " utc", "Z", "z"] {
            if let Some(stripped) = t.strip_suffix(utc) {
                t = format!("{stripped}+00:00");
                break;
            }
        }
        for pattern in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f %#z"] {
            if let Ok(parsed) = DateTime::parse_from_str(&t, pattern) {
                return Ok(Target::Time(parsed));
            }
        }
        let zone_hint =
            if DateTime::parse_from_str(&format!("{t}+00"), "%Y-%m-%d %H:%M:%S%.f%#z").is_ok() {
                " (give its time zone, e.g. '+00' or 'UTC': the restored server's TimeZone may \
             not be this machine's)"
            } else {
                ""
            };
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "--target-time '{text}' is not a time like '2026-11-30 04:30:12+00'{zone_hint}"
            ),
        ))
    }

    pub fn parse_lsn(text: &str) -> Result<Target, Error> {
        text.trim().parse::<Lsn>().map(Target::Lsn).map_err(|e| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("--target-lsn '{text}': {e}"),
            )
        })
    }

    pub fn parse_xid(text: &str) -> Result<Target, Error> {
        text.trim()
            .parse::<u64>()
            .ok()
            .filter(|x| *x >= 3)
            .map(Target::Xid)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("--target-xid '{text}' is not a transaction ID (a number from 3)"),
                )
            })
    }

    /// The one `recovery_target*` setting that says this target, if any.
    fn setting(&self) -> Option<(&'static str, String)> {
        match self {
            Target::End => None,
            Target::Time(t) => Some((
                "recovery_target_time",
                t.with_timezone(&Utc)
                    .format("%Y-%m-%d %H:%M:%S%.6f+00")
                    .to_string(),
            )),
            Target::Lsn(l) => Some(("recovery_target_lsn", l.to_string())),
            Target::Xid(x) => Some(("recovery_target_xid", x.to_string())),
            Target::Name(n) => Some(("recovery_target_name", n.clone())),
            Target::Immediate => Some(("recovery_target", "immediate".to_owned())),
        }
    }

    /// Whether `recovery_target_inclusive` means anything for this target.
    fn takes_inclusive(&self) -> bool {
        matches!(self, Target::Time(_) | Target::Lsn(_) | Target::Xid(_))
    }

    pub fn describe(&self) -> String {
        match self {
            Target::End => "the end of the archived WAL".to_owned(),
            Target::Time(t) => format!("time {t}"),
            Target::Lsn(l) => format!("LSN {l}"),
            Target::Xid(x) => format!("transaction {x}"),
            Target::Name(n) => format!("restore point '{n}'"),
            Target::Immediate => "the end of the backup (immediate)".to_owned(),
        }
    }
}

/// What PostgreSQL does when it reaches the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

impl std::str::FromStr for TargetAction {
    type Err = String;
    fn from_str(s: &str) -> Result<TargetAction, String> {
        match s {
            "promote" => Ok(TargetAction::Promote),
            "pause" => Ok(TargetAction::Pause),
            "shutdown" => Ok(TargetAction::Shutdown),
            _ => Err(format!("'{s}' is not promote, pause or shutdown")),
        }
    }
}

impl TargetAction {
    fn keyword(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

/// The timeline recovery follows (`recovery_target_timeline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetTimeline {
    /// The newest timeline in the repository (PostgreSQL's default).
    #[default]
    Latest,
    /// The timeline of the backup restored.
    Current,
    /// This timeline.
    Id(TimelineId),
}

impl std::str::FromStr for TargetTimeline {
    type Err = String;
    fn from_str(s: &str) -> Result<TargetTimeline, String> {
        match s {
            "latest" => Ok(TargetTimeline::Latest),
            "current" => Ok(TargetTimeline::Current),
            _ => s
                .parse::<u32>()
                .ok()
                .filter(|t| *t >= 1)
                .map(|t| TargetTimeline::Id(TimelineId(t)))
                .ok_or_else(|| format!("'{s}' is not latest, current or a timeline ID (1, 2, …)")),
        }
    }
}

impl TargetTimeline {
    fn setting(self) -> String {
        match self {
            TargetTimeline::Latest => "latest".to_owned(),
            TargetTimeline::Current => "current".to_owned(),
            TargetTimeline::Id(t) => t.to_string(),
        }
    }
}

/// Whether the restored server archives (`--archive-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArchiveMode {
    /// Keep the backup's `archive_mode` and `archive_command`: for the server that replaces
    /// the one backed up, which goes on archiving (on a new timeline) into the same repository.
    #[default]
    Preserve,
    /// `archive_mode = off`: for a clone, a drill or a staging copy, which must never push its
    /// own timeline into the production repository.
    Off,
}

impl std::str::FromStr for ArchiveMode {
    type Err = String;
    fn from_str(s: &str) -> Result<ArchiveMode, String> {
        match s {
            "preserve" => Ok(ArchiveMode::Preserve),
            "off" => Ok(ArchiveMode::Off),
            _ => Err(format!("'{s}' is not off or preserve")),
        }
    }
}

/// What was asked of the restore, as far as the plan is concerned.
#[derive(Debug, Clone)]
pub struct Request {
    pub target: Target,
    /// `--target-exclusive`: stop just before the target instead of just after it.
    pub exclusive: bool,
    pub action: TargetAction,
    pub timeline: TargetTimeline,
    /// `--backup ID`.
    pub backup: Option<String>,
    pub archive_mode: ArchiveMode,
    /// Restore even when the archive does not reach the target yet.
    pub allow_unreached: bool,
    /// The `restore_command` to write.
    pub restore_command: String,
}

/// The newest WAL segment stored for a timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedEnd {
    pub segment: WalFileName,
    /// When the store wrote it: every record in it is older.
    pub stored_at: DateTime<Utc>,
}

/// What the repository holds that a plan depends on.
#[derive(Debug, Clone)]
pub struct Facts {
    pub records: Vec<BackupRecord>,
    /// Every timeline history file in the repository, parsed.
    pub histories: BTreeMap<TimelineId, TimelineHistory>,
    /// The newest stored segment of each timeline on the path ([`path_timelines`]).
    pub ends: BTreeMap<TimelineId, ArchivedEnd>,
    pub seg_size: WalSegmentSize,
}

/// A restore, decided: printed by `--dry-run`, executed by `restore`.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub backup: BackupRecord,
    /// Why that backup, in words.
    pub reason: String,
    pub target: Target,
    pub exclusive: bool,
    pub action: TargetAction,
    /// The timeline as asked, and the path recovery will follow.
    pub timeline: TargetTimeline,
    pub path: TimelineHistory,
    /// The first segment recovery reads (the backup's start).
    pub wal_first: WalFileName,
    /// The newest segment archived on the path's last timeline, if any.
    pub wal_end: Option<ArchivedEnd>,
    pub archive_mode: ArchiveMode,
    /// Every recovery setting written to `postgresql.auto.conf`, in order.
    pub settings: Vec<(&'static str, String)>,
    /// Things the user should know (the archive does not reach the target yet, …).
    pub notes: Vec<String>,
}

/// Every setting a restore owns: each is removed from the restored `postgresql.auto.conf` and
/// written again (empty where unused, so that a value in `postgresql.conf` is overridden too).
/// They exist in every PostgreSQL from 12 on.
pub const OWNED_SETTINGS: &[&str] = &[
    "restore_command",
    "archive_cleanup_command",
    "recovery_end_command",
    "recovery_min_apply_delay",
    "primary_conninfo",
    "primary_slot_name",
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_inclusive",
    "recovery_target_action",
    "recovery_target_timeline",
];

/// Recovery settings of older servers that a restored `postgresql.auto.conf` may still carry:
/// removed, never written (PostgreSQL 16 and later refuse to start on an unknown name).
const REMOVED_SETTINGS: &[&str] = &["promote_trigger_file", "standby_mode"];

const TARGET_SETTINGS: &[&str] = &[
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
];

/// The timeline a request leads to, before a backup is chosen (`None` for `current`, which
/// depends on the backup).
fn requested_timeline(
    request: &Request,
    records: &[BackupRecord],
    histories: &BTreeMap<TimelineId, TimelineHistory>,
) -> Result<Option<TimelineId>, Error> {
    match request.timeline {
        TargetTimeline::Current => Ok(None),
        TargetTimeline::Latest => Ok(Some(
            histories
                .keys()
                .copied()
                .chain(records.iter().map(|r| TimelineId(r.stop_timeline)))
                .chain([TimelineId(1)])
                .max()
                .unwrap_or(TimelineId(1)),
        )),
        TargetTimeline::Id(t) => {
            let known = t.0 == 1
                || histories.contains_key(&t)
                || records.iter().any(|r| r.stop_timeline == t.0);
            if known {
                Ok(Some(t))
            } else {
                let mut have: Vec<String> = histories.keys().map(ToString::to_string).collect();
                have.insert(0, "1".to_owned());
                Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "--target-timeline {t}: the repository has no history file and no backup \
                         of timeline {t} (it knows timelines {})",
                        have.join(", ")
                    ),
                ))
            }
        }
    }
}

/// The history that leads to `timeline`: its history file, or no ancestors for timeline 1 (and
/// for a timeline whose history was never archived here).
fn path_of(
    timeline: TimelineId,
    histories: &BTreeMap<TimelineId, TimelineHistory>,
) -> TimelineHistory {
    histories
        .get(&timeline)
        .cloned()
        .unwrap_or_else(|| TimelineHistory::root(timeline))
}

/// The timelines whose newest archived segment a plan for `request` needs (to tell whether the
/// archive reaches the target): the path's own timeline. Empty when the target does not need
/// it, or when the timeline depends on the backup chosen (`current`; then the backup's).
pub fn path_timelines(
    request: &Request,
    records: &[BackupRecord],
    histories: &BTreeMap<TimelineId, TimelineHistory>,
) -> Result<Vec<TimelineId>, Error> {
    if !matches!(request.target, Target::Time(_) | Target::Lsn(_)) {
        return Ok(Vec::new());
    }
    Ok(match requested_timeline(request, records, histories)? {
        Some(t) => vec![t],
        None => {
            let mut t: Vec<TimelineId> = records
                .iter()
                .map(|r| TimelineId(r.stop_timeline))
                .collect();
            t.sort();
            t.dedup();
            t
        }
    })
}

/// Decides the restore: the pure heart of `restore` and `restore --dry-run`.
pub fn plan(facts: &Facts, request: &Request) -> Result<RestorePlan, Error> {
    let records = &facts.records;
    if records.is_empty() {
        return Err(Error::new(
            ErrorKind::NotFound,
            "the repository has no complete backup (take one with walcore take)",
        ));
    }
    if request.exclusive && !request.target.takes_inclusive() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "--target-exclusive applies to a time, an LSN or a transaction target, not to {}",
                request.target.describe()
            ),
        ));
    }
    let target = &request.target;
    let finished_before = |r: &BackupRecord| -> Result<bool, Error> {
        Ok(match target {
            Target::Time(t) => {
                let t = t.with_timezone(&Utc);
                if request.exclusive {
                    r.stop()? < t
                } else {
                    r.stop()? <= t
                }
            }
            Target::Lsn(l) => r.stop_lsn <= *l,
            _ => true,
        })
    };
    let on_path = |r: &BackupRecord, path: &TimelineHistory| {
        path.reaches(TimelineId(r.start_timeline), r.start_lsn)
            && path.reaches(TimelineId(r.stop_timeline), r.stop_lsn)
    };
    let fixed = requested_timeline(request, records, &facts.histories)?;

    let (chosen, path, reason) = if let Some(id) = request.backup.as_deref() {
        let r = records.iter().find(|r| r.id == id).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("no complete backup {id} (walcore list shows them)"),
            )
        })?;
        let path = path_of(
            fixed.unwrap_or(TimelineId(r.stop_timeline)),
            &facts.histories,
        );
        if !on_path(r, &path) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "backup {id} (timeline {}, LSN {} to {}) is not on the history of timeline {}: \
                     {}",
                    r.stop_timeline,
                    r.start_lsn,
                    r.stop_lsn,
                    path.timeline(),
                    off_path_reason(r, &path)
                ),
            ));
        }
        if !finished_before(r)? {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "backup {id} finished at {} (LSN {}), after the target {}: recovery from it \
                     cannot stop there",
                    r.stop_time,
                    r.stop_lsn,
                    target.describe()
                ),
            ));
        }
        (
            r,
            path,
            format!("chosen with --backup; target {}", target.describe()),
        )
    } else {
        let mut newest: Option<(&BackupRecord, TimelineHistory)> = None;
        let mut off_path = Vec::new();
        for r in records {
            let path = path_of(
                fixed.unwrap_or(TimelineId(r.stop_timeline)),
                &facts.histories,
            );
            if !on_path(r, &path) {
                off_path.push(r);
                continue;
            }
            if finished_before(r)? && newest.as_ref().is_none_or(|(n, _)| r.id > n.id) {
                newest = Some((r, path));
            }
        }
        let Some((r, path)) = newest else {
            return Err(no_backup_error(records, &off_path, fixed, target));
        };
        let why = match target {
            Target::Time(_) | Target::Lsn(_) => format!(
                "the newest backup on timeline {}'s history that finished before the target {} \
                 (it finished at {}, LSN {})",
                path.timeline(),
                target.describe(),
                r.stop_time,
                r.stop_lsn
            ),
            _ => format!(
                "the newest backup on timeline {}'s history; target {}",
                path.timeline(),
                target.describe()
            ),
        };
        let skipped = if off_path.is_empty() {
            String::new()
        } else {
            format!(
                "; not on that history, so never chosen: {}",
                off_path
                    .iter()
                    .map(|o| format!("{} (timeline {})", o.id, o.stop_timeline))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        (r, path, format!("{why}{skipped}"))
    };

    let wal_first = WalFileName::segment(
        TimelineId(chosen.start_timeline),
        chosen.start_lsn.segment(facts.seg_size),
        facts.seg_size,
    );
    let wal_end = facts.ends.get(&path.timeline()).cloned();
    let mut notes = Vec::new();
    if let Some(unreached) = unreached(target, wal_end.as_ref(), &path, facts.seg_size) {
        if request.allow_unreached {
            notes.push(format!(
                "{unreached} (restoring anyway: --allow-unreached-target)"
            ));
        } else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{unreached}. Nothing was written. On the server being backed up, run \
                     SELECT pg_switch_wal(); so that the segment holding the target is archived \
                     (set archive_timeout to have that happen on its own), then restore again; \
                     --allow-unreached-target restores anyway"
                ),
            ));
        }
    }
    let action = request.action;
    let mut settings = settings(request, action);
    if *target == Target::Immediate {
        // Recovery to the consistent point reads no WAL past the stop segment, but PostgreSQL
        // reads ahead (and prefetches) past it; when retention expired what follows, that
        // read must meet "absent", not a hole.
        let last = WalFileName::segment(
            TimelineId(chosen.stop_timeline),
            chosen.stop_lsn.segment(facts.seg_size),
            facts.seg_size,
        );
        for (name, value) in &mut settings {
            if *name == "restore_command" {
                *value = bounded_restore_command(value, &last);
            }
        }
    }
    Ok(RestorePlan {
        backup: chosen.clone(),
        reason,
        target: target.clone(),
        exclusive: request.exclusive,
        action,
        timeline: request.timeline,
        path,
        wal_first,
        wal_end,
        archive_mode: request.archive_mode,
        settings,
        notes,
    })
}

/// Why a backup is not on a path, in words.
fn off_path_reason(r: &BackupRecord, path: &TimelineHistory) -> String {
    let tli = TimelineId(r.stop_timeline);
    match path.end_of(tli) {
        Some(end) => {
            format!("that history left timeline {tli} at LSN {end}, before the backup finished")
        }
        None => format!("timeline {tli} is not one of its ancestors"),
    }
}

fn no_backup_error(
    records: &[BackupRecord],
    off_path: &[&BackupRecord],
    fixed: Option<TimelineId>,
    target: &Target,
) -> Error {
    if off_path.len() == records.len() {
        let tli = fixed.map_or_else(|| "its own".to_owned(), |t| t.to_string());
        return Error::new(
            ErrorKind::InvalidInput,
            format!(
                "no backup lies on the history of timeline {tli} (backups: {}); choose the \
                 timeline with --target-timeline",
                records
                    .iter()
                    .map(|r| format!("{} on timeline {}", r.id, r.stop_timeline))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    let oldest = records.iter().min_by(|a, b| a.id.cmp(&b.id));
    let oldest = oldest.map_or(String::new(), |o| {
        format!(
            "; the oldest backup, {}, finished at {} (LSN {})",
            o.id, o.stop_time, o.stop_lsn
        )
    });
    Error::new(
        ErrorKind::InvalidInput,
        format!(
            "no backup finished before the target {}{oldest}: no backup can reach it",
            target.describe()
        ),
    )
}

/// Why the archive cannot reach `target` yet, if it cannot: PostgreSQL would replay to the end
/// of the archive and stop with "recovery ended before configured recovery target was reached".
fn unreached(
    target: &Target,
    end: Option<&ArchivedEnd>,
    path: &TimelineHistory,
    seg_size: WalSegmentSize,
) -> Option<String> {
    let end = end?;
    let segno = end.segment.segno(seg_size).ok()?;
    let covered_to = segno.next().start_lsn(seg_size);
    let newest = format!(
        "the newest WAL archived on timeline {} is segment {} (archived at {}, WAL up to LSN {})",
        path.timeline(),
        end.segment,
        end.stored_at.format("%Y-%m-%d %H:%M:%S%.3f+00"),
        covered_to
    );
    match target {
        Target::Time(t) if t.with_timezone(&Utc) > end.stored_at => Some(format!(
            "the archive does not reach the target {} yet: {newest}, and every record in it is \
             older than the target",
            target.describe()
        )),
        Target::Lsn(l) if *l >= covered_to => Some(format!(
            "the archive does not reach the target {} yet: {newest}",
            target.describe()
        )),
        _ => None,
    }
}

/// The recovery settings, in the order they are written: the unused targets (empty) before the
/// one that is set, so that PostgreSQL never sees two targets at once.
fn settings(request: &Request, action: TargetAction) -> Vec<(&'static str, String)> {
    let mut out: Vec<(&'static str, String)> = vec![
        ("restore_command", request.restore_command.clone()),
        ("archive_cleanup_command", String::new()),
        ("recovery_end_command", String::new()),
        ("recovery_min_apply_delay", "0".to_owned()),
        ("primary_conninfo", String::new()),
        ("primary_slot_name", String::new()),
    ];
    let set = request.target.setting();
    for name in TARGET_SETTINGS {
        if set.as_ref().is_none_or(|(n, _)| n != name) {
            out.push((name, String::new()));
        }
    }
    if let Some(s) = set {
        out.push(s);
    }
    out.push((
        "recovery_target_inclusive",
        if request.exclusive { "off" } else { "on" }.to_owned(),
    ));
    out.push(("recovery_target_action", action.keyword().to_owned()));
    out.push(("recovery_target_timeline", request.timeline.setting()));
    if request.archive_mode == ArchiveMode::Off {
        out.push(("archive_mode", "off".to_owned()));
    }
    out
}

/// A `walcore-restore` command told that recovery needs nothing past segment `last`
/// (`--last-needed`); any other command is left as it is.
fn bounded_restore_command(command: &str, last: &WalFileName) -> String {
    match command.strip_suffix(" %f %p") {
        Some(head) if head.contains("walcore-restore") => {
            format!("{head} --last-needed {last} %f %p")
        }
        _ => command.to_owned(),
    }
}

/// Quotes a value for `postgresql.conf`.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The name a `postgresql.conf` line sets, lower-cased (`None` for comments, blank lines and
/// `include` directives).
fn setting_name(line: &str) -> Option<String> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let name = line[..end].to_ascii_lowercase();
    (!name.starts_with("include")).then_some(name)
}

/// The start of the block a restore writes; earlier blocks of walcore are removed with it.
const BLOCK_MARK: &str = "# Recovery settings written by walcore";

/// `postgresql.auto.conf` as the restore leaves it: `existing` (the backup's) without any
/// setting the restore owns, then the plan's settings under a comment naming the backup and the
/// target. Returns the text and the names of the settings removed (never their values, which
/// may hold credentials).
pub fn rewrite_auto_conf(
    existing: &str,
    plan: &RestorePlan,
    written_at: &str,
) -> (String, Vec<String>) {
    let owned = |name: &str| {
        OWNED_SETTINGS.contains(&name)
            || REMOVED_SETTINGS.contains(&name)
            || (plan.archive_mode == ArchiveMode::Off && name == "archive_mode")
    };
    let mut out = String::new();
    let mut removed = Vec::new();
    for line in existing.lines() {
        if line.trim_start().starts_with(BLOCK_MARK) || line.trim_start().starts_with("# walcore:")
        {
            continue;
        }
        match setting_name(line) {
            Some(name) if owned(&name) => removed.push(name),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&format!(
        "\n{BLOCK_MARK} restore at {written_at}\n# walcore: backup {}, target {}{}, timeline {}\n\
         # walcore: every earlier recovery setting of this file was removed; these override \
         postgresql.conf\n",
        plan.backup.id,
        plan.target.describe(),
        if plan.exclusive { " (exclusive)" } else { "" },
        plan.timeline.setting(),
    ));
    for (name, value) in &plan.settings {
        out.push_str(&format!("{name} = {}\n", conf_quote(value)));
    }
    removed.dedup();
    (out, removed)
}

/// Escapes `%` for a command PostgreSQL expands (`restore_command`): `%%` stands for `%`.
pub fn escape_percent(text: &str) -> String {
    text.replace('%', "%%")
}

impl fmt::Display for RestorePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.backup;
        writeln!(f, "backup:    {} ({})", b.id, self.reason)?;
        writeln!(
            f,
            "           timeline {}, LSN {} to {}, finished at {}",
            b.stop_timeline, b.start_lsn, b.stop_lsn, b.stop_time
        )?;
        writeln!(
            f,
            "target:    {}{}, then {}",
            self.target.describe(),
            if self.exclusive { " (exclusive)" } else { "" },
            self.action.keyword()
        )?;
        let path = std::iter::once("1".to_owned())
            .filter(|_| self.path.entries().is_empty() && self.path.timeline().0 != 1)
            .chain(
                self.path
                    .entries()
                    .iter()
                    .map(|a| format!("{} (to {})", a.parent, a.switch_point)),
            )
            .chain([self.path.timeline().to_string()])
            .collect::<Vec<_>>();
        writeln!(
            f,
            "timeline:  {} (recovery_target_timeline = '{}'): {}",
            self.path.timeline(),
            self.timeline.setting(),
            path.join(" → ")
        )?;
        match &self.wal_end {
            Some(end) => writeln!(
                f,
                "WAL:       from {} to the newest archived, {} (archived at {})",
                self.wal_first,
                end.segment,
                end.stored_at.format("%Y-%m-%d %H:%M:%S+00")
            )?,
            None => writeln!(f, "WAL:       from {} on, as archived", self.wal_first)?,
        }
        writeln!(f, "settings written to postgresql.auto.conf:")?;
        for (name, value) in &self.settings {
            writeln!(f, "  {name} = {}", conf_quote(value))?;
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

/// The plan as JSON, for `--dry-run --json`.
#[derive(Debug, Serialize)]
pub struct PlanSummary<'a> {
    pub backup: &'a str,
    pub reason: &'a str,
    pub target: String,
    pub exclusive: bool,
    pub action: &'static str,
    pub timeline: u32,
    pub recovery_target_timeline: String,
    pub wal_first: String,
    pub wal_end: Option<String>,
    pub archive_mode: &'static str,
    pub settings: BTreeMap<&'static str, &'a str>,
    pub notes: &'a [String],
}

impl RestorePlan {
    pub fn summary(&self) -> PlanSummary<'_> {
        PlanSummary {
            backup: &self.backup.id,
            reason: &self.reason,
            target: self.target.describe(),
            exclusive: self.exclusive,
            action: self.action.keyword(),
            timeline: self.path.timeline().0,
            recovery_target_timeline: self.timeline.setting(),
            wal_first: self.wal_first.to_string(),
            wal_end: self.wal_end.as_ref().map(|e| e.segment.to_string()),
            archive_mode: match self.archive_mode {
                ArchiveMode::Preserve => "preserve",
                ArchiveMode::Off => "off",
            },
            settings: self
                .settings
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect(),
            notes: &self.notes,
        }
    }
}

/// Reads what a plan for `request` depends on: the catalog, every timeline history file, and
/// the newest archived segment of the timelines the target needs (two listing requests each).
pub async fn gather(repo: &Repository, request: &Request) -> Result<Facts, Error> {
    let meta = repo.read_meta().await?.ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "{} holds no walcore repository (no {} object): check WALCORE_REPO",
                repo.store().describe(),
                crate::store::META_KEY
            ),
        )
    })?;
    let seg_size = meta.segment_size()?;
    let records = catalog::list(repo).await?;
    let history_keys = listing(repo, "wal/history/", |s| s.list("wal/history/")).await?;
    let histories = read_histories(repo, history_keys.iter().map(String::as_str)).await?;
    let mut ends = BTreeMap::new();
    for tli in path_timelines(request, &records, &histories)? {
        if let Some(end) = newest_segment(repo, tli, seg_size).await? {
            ends.insert(tli, end);
        }
    }
    Ok(Facts {
        records,
        histories,
        ends,
        seg_size,
    })
}

/// Refuses a plan whose target lies in WAL that is gone: recovery from the chosen backup must
/// read on past its stop for any target but `immediate`, and when the segment after the stop
/// is not stored while later WAL of the path is, retention expired it (or it was lost). Such
/// a restore would stop at that hole with recovery unfinished; refusing it before anything is
/// written says why. Costs one or two `HEAD` requests.
pub async fn check_wal_after_stop(
    repo: &Repository,
    facts: &Facts,
    plan: &RestorePlan,
) -> Result<(), Error> {
    if plan.target == Target::Immediate {
        return Ok(());
    }
    let seg = facts.seg_size;
    let next = SegmentNo(plan.backup.stop_lsn.segment(seg).0 + 1);
    let first_byte = next.start_lsn(seg);
    let last_byte = Lsn(first_byte.0 + u64::from(seg.bytes()) - 1);
    let timelines: BTreeSet<TimelineId> = [
        plan.path.timeline_at(first_byte),
        plan.path.timeline_at(last_byte),
    ]
    .into_iter()
    .collect();
    let store = repo.store().describe();
    for tli in &timelines {
        let key = wal_key(&WalFileName::segment(*tli, next, seg));
        let found = repo
            .with_retry(&format!("looking for {key}"), || async {
                repo.store()
                    .head(&key)
                    .await
                    .map_err(|e| e.into_error("looking for", &key, &store))
            })
            .await?;
        if found.is_some() {
            return Ok(());
        }
    }
    // Not stored: the end of the archive (fine), or a hole when later WAL is stored.
    let end = match &plan.wal_end {
        Some(end) => Some(end.clone()),
        None => newest_segment(repo, plan.path.timeline(), seg).await?,
    };
    let Some(end) = end else {
        return Ok(());
    };
    let later = end.segment.timeline() > *timelines.iter().next_back().unwrap_or(&TimelineId(0))
        || end.segment.segno(seg).is_ok_and(|s| s > next);
    if !later {
        return Ok(());
    }
    let missing = WalFileName::segment(plan.path.timeline_at(first_byte), next, seg);
    Err(Error::new(
        ErrorKind::InvalidInput,
        format!(
            "the target ({}) cannot be reached from backup {}: WAL segment {missing}, which \
             recovery needs right after the backup's end ({}), is not in {store} while later \
             WAL ({}) is. Retention expired it, so the target lies outside the restorable \
             window that remains (walcore expire --dry-run shows it), or it was lost. Nothing \
             was written. Restore a target inside the window, or this backup to its consistent \
             point with --target-immediate",
            plan.target.describe(),
            plan.backup.id,
            plan.backup.stop_time,
            end.segment
        ),
    ))
}

/// Reads and parses the timeline history files among `keys` (other keys are skipped).
pub(crate) async fn read_histories<'k>(
    repo: &Repository,
    keys: impl IntoIterator<Item = &'k str>,
) -> Result<BTreeMap<TimelineId, TimelineHistory>, Error> {
    let store = repo.store().describe();
    let mut histories = BTreeMap::new();
    for key in keys {
        let Some(name) = key
            .strip_prefix("wal/history/")
            .and_then(|n| WalFileName::parse(n).ok())
            .filter(|n| *n.kind() == WalFileKind::History)
        else {
            continue;
        };
        let bytes = repo
            .with_retry(&format!("reading {key}"), || repo.get_small(key))
            .await?;
        let history = TimelineHistory::parse(name.timeline(), &bytes)
            .map_err(|e| Error::new(ErrorKind::Integrity, format!("{key} in {store}: {e}")))?;
        histories.insert(name.timeline(), history);
    }
    Ok(histories)
}

/// A listing of `prefix`, retried as every store request is.
pub(crate) async fn listing<'a, T, Fut>(
    repo: &'a Repository,
    prefix: &str,
    list: impl Fn(&'a crate::store::Store) -> Fut,
) -> Result<T, Error>
where
    Fut: std::future::Future<Output = Result<T, crate::store::StoreError>>,
{
    let store = repo.store().describe();
    repo.with_retry(&format!("listing {prefix}"), || {
        let pending = list(repo.store());
        async {
            pending
                .await
                .map_err(|e| e.into_error("listing", prefix, &store))
        }
    })
    .await
}

/// The newest full segment stored for `timeline`: the last log directory that holds one.
pub(crate) async fn newest_segment(
    repo: &Repository,
    timeline: TimelineId,
    seg_size: WalSegmentSize,
) -> Result<Option<ArchivedEnd>, Error> {
    let probe = WalFileName::segment(timeline, crate::pg::SegmentNo(0), seg_size);
    let timeline_dir = wal_key(&probe)
        .rsplitn(3, '/')
        .nth(2)
        .map(str::to_owned)
        .unwrap_or_default();
    let dirs = listing(repo, &timeline_dir, |s| s.child_dirs(&timeline_dir)).await?;
    for dir in dirs.iter().rev() {
        let prefix = format!("{timeline_dir}/{dir}");
        let objects = listing(repo, &prefix, |s| s.list_dir(&prefix)).await?;
        let newest = objects.iter().rev().find_map(|o| {
            let name = WalFileName::parse(o.key.rsplit('/').next()?).ok()?;
            (name.is_segment() && name.timeline() == timeline).then(|| ArchivedEnd {
                segment: name,
                stored_at: o.modified.into(),
            })
        });
        if newest.is_some() {
            return Ok(newest);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests;
