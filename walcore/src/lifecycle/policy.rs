//! The retention policy as a pure function: which backups stay, and which WAL they need.
//!
//! # Backups
//! The rules have restic's `forget` meaning:
//! - `keep-last N`: the N newest complete backups;
//! - `keep-within D`: every backup that finished at or after `now - D`;
//! - `keep-daily/weekly/monthly/yearly N`: for the N most recent days (ISO weeks, months,
//!   years) that have a backup, the newest backup of each; calendar buckets are in UTC;
//! - pinned backups and the newest complete backup are always kept;
//! - with `pitr-window D`, the backup the window starts from (below) is kept too.
//!
//! A backup is kept when any rule keeps it. A policy without any rule is refused, so that
//! nothing is deleted by accident. Backups are ordered by stop time; backups with the same stop
//! time are ordered by ID (the greater ID counts as the newer: IDs begin with the start time).
//! Unlike recent restic versions, the oldest backup is not kept as a bonus when a rule has more
//! slots than buckets.
//!
//! # WAL
//! WAL is kept as ranges of LSNs per timeline, never ordered by file name:
//! - open-ended ranges start at an *anchor* backup and follow every path of the timeline
//!   histories through that backup's start to its newest timeline. With `pitr-window D` the
//!   anchors are the newest backup that finished at or before `now - D` (or, when none did,
//!   the oldest backup) and the kept backups that finished after `now - D`; without it, every
//!   backup kept by `keep-last`, `keep-within`, `keep-daily` or as the newest;
//! - every other kept backup keeps the WAL from its start to its stop only, which restores it
//!   consistently (`--target-immediate`);
//! - a range that crosses a switch point is split there: the parent timeline is kept up to the
//!   switch point (inclusive), the child from it. The parent's WAL after the switch point is
//!   kept only when something on the parent needs it (a path whose newest timeline is the
//!   parent itself, i.e. it went on after the branch).
//!
//! Range ends are inclusive, and a backup keeps the byte at its stop LSN: recovery reads the
//! record after the one that makes it consistent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Datelike, SecondsFormat, TimeDelta, Utc};
use serde::Serialize;

use crate::backup::catalog::BackupRecord;
use crate::error::{Error, ErrorKind};
use crate::pg::{Lsn, TimelineHistory, TimelineId, WalFileKind, WalFileName, WalSegmentSize};
use crate::store::wal_key;

/// A retention policy. Counts of 0 and `None` mean "rule not set".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub keep_last: u32,
    pub keep_within: Option<Duration>,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
    /// Every second of this window before now stays restorable.
    pub pitr_window: Option<Duration>,
}

impl Policy {
    /// Whether any rule is set (a policy without one is refused).
    pub fn has_rule(&self) -> bool {
        self.keep_last > 0
            || self.keep_within.is_some()
            || self.keep_daily > 0
            || self.keep_weekly > 0
            || self.keep_monthly > 0
            || self.keep_yearly > 0
            || self.pitr_window.is_some()
    }

    fn count(&self, rule: Rule) -> u32 {
        match rule {
            Rule::Last => self.keep_last,
            Rule::Daily => self.keep_daily,
            Rule::Weekly => self.keep_weekly,
            Rule::Monthly => self.keep_monthly,
            Rule::Yearly => self.keep_yearly,
            _ => 0,
        }
    }
}

impl fmt::Display for Policy {
    /// `keep-last 3, keep-daily 7, pitr-window 7d`, or `no rule`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for rule in COUNTED {
            let n = self.count(rule);
            if n > 0 {
                parts.push(format!("{} {n}", rule.flag()));
            }
        }
        if let Some(d) = self.keep_within {
            parts.push(format!("keep-within {}", duration_text(d)));
        }
        if let Some(d) = self.pitr_window {
            parts.push(format!("pitr-window {}", duration_text(d)));
        }
        if parts.is_empty() {
            return f.write_str("no rule");
        }
        f.write_str(&parts.join(", "))
    }
}

/// A duration as the flags spell it: `7d`, `36h`, `90m`, `45s`.
fn duration_text(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Why a backup is kept (or, for an expired one, what came nearest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    Pinned,
    Newest,
    PitrWindow,
    Last,
    Within,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

/// The rules that count slots, in the order an expired backup's nearest miss is looked for.
const COUNTED: [Rule; 5] = [
    Rule::Last,
    Rule::Daily,
    Rule::Weekly,
    Rule::Monthly,
    Rule::Yearly,
];

impl Rule {
    fn flag(self) -> &'static str {
        match self {
            Rule::Pinned => "pin",
            Rule::Newest => "newest",
            Rule::PitrWindow => "pitr-window",
            Rule::Last => "keep-last",
            Rule::Within => "keep-within",
            Rule::Daily => "keep-daily",
            Rule::Weekly => "keep-weekly",
            Rule::Monthly => "keep-monthly",
            Rule::Yearly => "keep-yearly",
        }
    }

    /// The calendar bucket of a time, for the bucket rules.
    fn bucket(self, t: DateTime<Utc>) -> Option<String> {
        Some(match self {
            Rule::Daily => t.format("%Y-%m-%d").to_string(),
            Rule::Weekly => {
                let w = t.iso_week();
                format!("{}-W{:02}", w.year(), w.week())
            }
            Rule::Monthly => t.format("%Y-%m").to_string(),
            Rule::Yearly => t.format("%Y").to_string(),
            _ => return None,
        })
    }
}

/// One rule's verdict on one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    pub rule: Rule,
    /// For the counted rules: 1 for the newest backup (`keep-last`) or the most recent bucket
    /// that has a backup (`keep-daily` ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    /// For the counted rules: the rule's count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The calendar bucket (`2026-12-04`, `2026-W49`, `2026-12`, `2026`), a pin's note, or the
    /// duration of `keep-within` and `pitr-window`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Reason {
    fn plain(rule: Rule, detail: Option<String>) -> Reason {
        Reason {
            rule,
            rank: None,
            limit: None,
            detail,
        }
    }
}

fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

impl fmt::Display for Reason {
    /// `daily (9th day, 2026-11-25, keep-daily 7)`, `pinned (before the upgrade)`, ...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let detail = self.detail.as_deref().unwrap_or("");
        match self.rule {
            Rule::Pinned if detail.is_empty() => f.write_str("pinned"),
            Rule::Pinned => write!(f, "pinned ({detail})"),
            Rule::Newest => f.write_str("newest complete backup"),
            Rule::PitrWindow => write!(f, "start of the restorable window (pitr-window {detail})"),
            Rule::Within => write!(f, "within (keep-within {detail})"),
            rule => {
                let name = &rule.flag()["keep-".len()..];
                let unit = match rule {
                    Rule::Daily => "day",
                    Rule::Weekly => "week",
                    Rule::Monthly => "month",
                    Rule::Yearly => "year",
                    _ => "newest",
                };
                write!(f, "{name} (")?;
                if let Some(rank) = self.rank {
                    write!(f, "{} {unit}, ", ordinal(rank))?;
                }
                if !detail.is_empty() {
                    write!(f, "{detail}, ")?;
                }
                write!(f, "{} {})", rule.flag(), self.limit.unwrap_or(0))
            }
        }
    }
}

/// What happens to one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Kept, with every rule that keeps it.
    Keep { reasons: Vec<Reason> },
    /// Expired; `nearest` is the rule that would have kept it with more slots, if any.
    Expire { nearest: Option<Reason> },
}

/// One backup in a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupDecision {
    pub id: String,
    pub stop_time: String,
    pub start_timeline: TimelineId,
    pub start_lsn: Lsn,
    pub stop_timeline: TimelineId,
    pub stop_lsn: Lsn,
    /// Bytes its objects take in the repository.
    pub stored_bytes: u64,
    #[serde(flatten)]
    pub verdict: Verdict,
}

impl BackupDecision {
    /// Whether the backup is kept.
    pub fn is_kept(&self) -> bool {
        matches!(self.verdict, Verdict::Keep { .. })
    }
}

/// Bytes `from..=to` of one timeline's WAL; `to: None` is open-ended (to whatever the archive
/// holds of that timeline, now and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct LsnRange {
    pub from: Lsn,
    pub to: Option<Lsn>,
}

impl LsnRange {
    /// Whether any byte of `lo..=hi` is in the range.
    pub fn overlaps(&self, lo: Lsn, hi: Lsn) -> bool {
        self.from <= hi && self.to.is_none_or(|to| to >= lo)
    }
}

impl fmt::Display for LsnRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to {
            Some(to) => write!(f, "{} .. {}", self.from, to),
            None => write!(f, "{} .. (end)", self.from),
        }
    }
}

/// The restorable window that remains: every point from `from` (the end of backup `base`) to
/// the end of the archive, along the paths that end on `timelines`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    pub base: String,
    pub from: String,
    pub timelines: Vec<TimelineId>,
    /// The `pitr-window` asked for, if any.
    pub requested: Option<String>,
    /// Whether `from` is at or before `now - pitr-window` (always true without one). False
    /// when no backup finished early enough: the start of the window was never restorable.
    pub covers_request: bool,
}

/// A retention plan: what stays and what goes, decided without touching the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetentionPlan {
    pub now: String,
    pub policy: String,
    /// Every backup, newest first.
    pub backups: Vec<BackupDecision>,
    /// Bytes the expiring backups' objects take (WAL comes on top, once listed).
    pub expired_bytes: u64,
    /// The WAL to keep, per timeline: sorted, disjoint, non-adjacent ranges.
    pub wal: BTreeMap<TimelineId, Vec<LsnRange>>,
    /// The timelines the plan knows (from a history file or a backup): WAL of any other
    /// timeline cannot be classified and is left alone.
    pub timelines: BTreeSet<TimelineId>,
    pub window: Option<Window>,
    /// Pins that name no backup in the catalog.
    pub unknown_pins: Vec<String>,
}

impl RetentionPlan {
    /// The IDs of the backups kept.
    pub fn kept(&self) -> impl Iterator<Item = &str> {
        self.backups
            .iter()
            .filter(|b| b.is_kept())
            .map(|b| b.id.as_str())
    }

    /// The IDs of the backups that expire.
    pub fn expired(&self) -> impl Iterator<Item = &str> {
        self.backups
            .iter()
            .filter(|b| !b.is_kept())
            .map(|b| b.id.as_str())
    }

    /// Whether any byte of `lo..=hi` on `timeline` must be kept.
    pub fn needs(&self, timeline: TimelineId, lo: Lsn, hi: Lsn) -> bool {
        self.wal
            .get(&timeline)
            .is_some_and(|ranges| ranges.iter().any(|r| r.overlaps(lo, hi)))
    }
}

/// A backup with its parsed stop time.
struct Dated<'a> {
    stop: DateTime<Utc>,
    record: &'a BackupRecord,
}

/// Decides retention: the pure heart of `expire` and `expire --dry-run`.
///
/// `pins` maps pinned backup IDs to their notes; `histories` holds the parsed timeline history
/// files (a timeline without one is taken to have no ancestors). Fails when the policy has no
/// rule, and when a record's stop time does not parse or its stop LSN is before its start.
pub fn retention_plan(
    policy: &Policy,
    backups: &[BackupRecord],
    pins: &BTreeMap<String, Option<String>>,
    histories: &BTreeMap<TimelineId, TimelineHistory>,
    now: DateTime<Utc>,
) -> Result<RetentionPlan, Error> {
    if !policy.has_rule() {
        return Err(Error::new(
            ErrorKind::Configuration,
            "expire: no retention rule is set (keep-last, keep-within, keep-daily, \
             keep-weekly, keep-monthly, keep-yearly or pitr-window); without one every \
             unpinned backup but the newest would be deleted, so nothing is done",
        ));
    }
    if let Some(r) = backups.iter().find(|r| r.stop_lsn < r.start_lsn) {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "catalog record of backup {}: stop LSN {} is before start LSN {}; its WAL \
                 cannot be told, so nothing is planned",
                r.id, r.stop_lsn, r.start_lsn
            ),
        ));
    }
    let mut dated = backups
        .iter()
        .map(|r| r.stop().map(|stop| Dated { stop, record: r }))
        .collect::<Result<Vec<_>, Error>>()?;
    // Newest first; equal stop times: the greater ID first.
    dated.sort_by(|a, b| (b.stop, &b.record.id).cmp(&(a.stop, &a.record.id)));
    let n = dated.len();
    let mut reasons: Vec<Vec<Reason>> = vec![Vec::new(); n];
    let mut misses: Vec<Option<(u32, Reason)>> = vec![None; n];

    for (i, d) in dated.iter().enumerate() {
        if let Some(note) = pins.get(&d.record.id) {
            reasons[i].push(Reason::plain(Rule::Pinned, note.clone()));
        }
    }
    if n > 0 {
        reasons[0].push(Reason::plain(Rule::Newest, None));
    }

    // The counted rules: a rank per backup (keep-last) or per bucket head.
    for rule in COUNTED {
        let limit = policy.count(rule);
        if limit == 0 {
            continue;
        }
        let mut rank = 0u32;
        let mut previous: Option<String> = None;
        for (i, d) in dated.iter().enumerate() {
            let bucket = rule.bucket(d.stop);
            if rule != Rule::Last && bucket == previous {
                continue; // not the newest of its bucket
            }
            previous.clone_from(&bucket);
            rank = rank.saturating_add(1);
            let reason = Reason {
                rule,
                rank: Some(rank),
                limit: Some(limit),
                detail: bucket,
            };
            if rank <= limit {
                reasons[i].push(reason);
            } else {
                let over = rank - limit;
                if misses[i].as_ref().is_none_or(|(o, _)| over < *o) {
                    misses[i] = Some((over, reason));
                }
            }
        }
    }

    if let Some(d) = policy.keep_within {
        let cutoff = cutoff(now, d);
        for (i, b) in dated.iter().enumerate() {
            if cutoff.is_none_or(|c| b.stop >= c) {
                reasons[i].push(Reason::plain(Rule::Within, Some(duration_text(d))));
            }
        }
    }

    // The window's base: the newest backup that finished at or before now - window, else the
    // oldest.
    let window_cut = policy.pitr_window.map(|d| cutoff(now, d));
    let mut window_base = None;
    if let Some(cut) = window_cut
        && n > 0
    {
        let base = dated
            .iter()
            .position(|b| cut.is_some_and(|c| b.stop <= c))
            .unwrap_or(n - 1);
        let d = policy.pitr_window.map(duration_text);
        reasons[base].push(Reason::plain(Rule::PitrWindow, d));
        window_base = Some(base);
    }

    let ids: BTreeSet<&str> = backups.iter().map(|r| r.id.as_str()).collect();
    let unknown_pins = pins
        .keys()
        .filter(|p| !ids.contains(p.as_str()))
        .cloned()
        .collect();

    // Timelines the plan knows.
    let mut timelines: BTreeSet<TimelineId> = histories.keys().copied().collect();
    for h in histories.values() {
        timelines.extend(h.entries().iter().map(|e| e.parent));
    }
    for r in backups {
        timelines.insert(TimelineId(r.start_timeline));
        timelines.insert(TimelineId(r.stop_timeline));
    }
    let path = |t: TimelineId| {
        histories
            .get(&t)
            .cloned()
            .unwrap_or_else(|| TimelineHistory::root(t))
    };
    let paths: BTreeMap<TimelineId, TimelineHistory> =
        timelines.iter().map(|t| (*t, path(*t))).collect();

    // Open-ended anchors.
    let kept = |i: usize| !reasons[i].is_empty();
    let anchors: Vec<usize> = match (window_base, window_cut) {
        (Some(base), Some(cut)) => std::iter::once(base)
            .chain((0..n).filter(|&i| kept(i) && cut.is_none_or(|c| dated[i].stop > c)))
            .collect(),
        _ => (0..n)
            .filter(|&i| {
                reasons[i].iter().any(|r| {
                    matches!(
                        r.rule,
                        Rule::Last | Rule::Within | Rule::Daily | Rule::Newest
                    )
                })
            })
            .collect(),
    };

    let mut wal: BTreeMap<TimelineId, Vec<LsnRange>> = BTreeMap::new();
    let mut add = |t: TimelineId, from: Lsn, to: Option<Lsn>| {
        if to.is_none_or(|to| from <= to) {
            wal.entry(t).or_default().push(LsnRange { from, to });
        }
    };
    let mut window_timelines: Vec<TimelineId> = Vec::new();
    for &a in &anchors {
        let r = dated[a].record;
        let (tli, lsn) = (TimelineId(r.start_timeline), r.start_lsn);
        let (tips, ranges) = open_ranges(&paths, tli, lsn);
        if Some(a) == window_base || (window_base.is_none() && Some(&a) == anchors.last()) {
            window_timelines = tips;
        }
        for (t, from, to) in ranges {
            add(t, from, to);
        }
    }
    // Every kept backup: its own start..stop.
    for (i, d) in dated.iter().enumerate() {
        if !kept(i) {
            continue;
        }
        let r = d.record;
        let (start_tli, stop_tli) = (TimelineId(r.start_timeline), TimelineId(r.stop_timeline));
        let p = &paths[&stop_tli];
        if !p.includes(start_tli) {
            // The history does not connect the two: keep the span on both.
            add(start_tli, r.start_lsn, Some(r.stop_lsn));
            add(stop_tli, r.start_lsn, Some(r.stop_lsn));
            continue;
        }
        let mut on = false;
        for t in p.entries().iter().map(|e| e.parent).chain([stop_tli]) {
            on = on || t == start_tli;
            if !on {
                continue;
            }
            let start = p.start_of(t).unwrap_or(Lsn::INVALID);
            let end = p.end_of(t).map_or(r.stop_lsn, |e| e.min(r.stop_lsn));
            add(t, start.max(r.start_lsn), Some(end));
        }
    }
    for ranges in wal.values_mut() {
        *ranges = merge(std::mem::take(ranges));
    }

    // The window that remains: from the base (or the oldest open-ended anchor).
    let window_at = window_base.or_else(|| anchors.iter().copied().max());
    let window = window_at.map(|i| Window {
        base: dated[i].record.id.clone(),
        from: dated[i].record.stop_time.clone(),
        timelines: window_timelines,
        requested: policy.pitr_window.map(duration_text),
        covers_request: match window_cut {
            Some(Some(c)) => dated[i].stop <= c,
            _ => true,
        },
    });

    let backups = dated
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let r = d.record;
            let verdict = if reasons[i].is_empty() {
                Verdict::Expire {
                    nearest: misses[i].take().map(|(_, reason)| reason),
                }
            } else {
                Verdict::Keep {
                    reasons: std::mem::take(&mut reasons[i]),
                }
            };
            BackupDecision {
                id: r.id.clone(),
                stop_time: r.stop_time.clone(),
                start_timeline: TimelineId(r.start_timeline),
                start_lsn: r.start_lsn,
                stop_timeline: TimelineId(r.stop_timeline),
                stop_lsn: r.stop_lsn,
                stored_bytes: r.stored_bytes(),
                verdict,
            }
        })
        .collect::<Vec<BackupDecision>>();
    let expired_bytes = backups
        .iter()
        .filter(|b| !b.is_kept())
        .map(|b| b.stored_bytes)
        .sum();

    Ok(RetentionPlan {
        now: now.to_rfc3339_opts(SecondsFormat::Secs, true),
        policy: policy.to_string(),
        backups,
        expired_bytes,
        wal,
        timelines,
        window,
        unknown_pins,
    })
}

/// The open-ended WAL ranges from position `lsn` of `tli` on: along every path through that
/// position, each timeline from where the path enters it to where it leaves it (the newest to
/// the end). Returns the paths' newest timelines too.
#[allow(clippy::type_complexity)]
fn open_ranges(
    paths: &BTreeMap<TimelineId, TimelineHistory>,
    tli: TimelineId,
    lsn: Lsn,
) -> (Vec<TimelineId>, Vec<(TimelineId, Lsn, Option<Lsn>)>) {
    let tips = tips_through(paths, tli, lsn);
    let mut ranges = Vec::new();
    for &tip in &tips {
        let p = &paths[&tip];
        let mut on = false;
        for t in p.entries().iter().map(|e| e.parent).chain([tip]) {
            on = on || t == tli;
            if !on {
                continue;
            }
            let start = p.start_of(t).unwrap_or(Lsn::INVALID);
            let from = if t == tli { start.max(lsn) } else { start };
            ranges.push((t, from, p.end_of(t)));
        }
    }
    (tips, ranges)
}

impl RetentionPlan {
    /// Keeps, besides what the policy keeps, all WAL from position `lsn` of `tli` on (a take
    /// that is still running, whose record is not written yet, needs it from its start).
    pub fn keep_from(
        &mut self,
        histories: &BTreeMap<TimelineId, TimelineHistory>,
        tli: TimelineId,
        lsn: Lsn,
    ) {
        self.timelines.insert(tli);
        let paths: BTreeMap<TimelineId, TimelineHistory> = self
            .timelines
            .iter()
            .map(|t| {
                let p = histories
                    .get(t)
                    .cloned()
                    .unwrap_or_else(|| TimelineHistory::root(*t));
                (*t, p)
            })
            .collect();
        for (t, from, to) in open_ranges(&paths, tli, lsn).1 {
            if to.is_none_or(|to| from <= to) {
                self.wal.entry(t).or_default().push(LsnRange { from, to });
            }
        }
        for ranges in self.wal.values_mut() {
            *ranges = merge(std::mem::take(ranges));
        }
    }
}

/// `now - d`; `None` when that is before any representable time (everything is within).
fn cutoff(now: DateTime<Utc>, d: Duration) -> Option<DateTime<Utc>> {
    TimeDelta::from_std(d)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
}

/// The newest timelines of the paths through position `lsn` of `tli`: every known timeline
/// whose path holds that position, except one that another such path continues (a parent
/// past which a child branched is not followed beyond the branch).
fn tips_through(
    paths: &BTreeMap<TimelineId, TimelineHistory>,
    tli: TimelineId,
    lsn: Lsn,
) -> Vec<TimelineId> {
    let through: Vec<TimelineId> = paths
        .iter()
        .filter(|(_, p)| p.reaches(tli, lsn))
        .map(|(t, _)| *t)
        .collect();
    through
        .iter()
        .copied()
        .filter(|&t| !through.iter().any(|&u| u != t && paths[&u].includes(t)))
        .collect()
}

/// Sorts ranges and merges those that overlap or touch.
fn merge(mut ranges: Vec<LsnRange>) -> Vec<LsnRange> {
    ranges.sort();
    let mut out: Vec<LsnRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        if let Some(last) = out.last_mut() {
            match last.to {
                None => continue,
                Some(to) if r.from.0 <= to.0.saturating_add(1) => {
                    last.to = r.to.map(|rt| rt.max(to));
                    continue;
                }
                Some(_) => {}
            }
        }
        out.push(r);
    }
    out
}

impl fmt::Display for RetentionPlan {
    /// The `--dry-run` text: each backup that goes and why, the backups kept, the WAL kept per
    /// timeline and the window that remains.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = self.backups.iter().filter(|b| b.is_kept()).count();
        writeln!(f, "retention plan at {} ({})", self.now, self.policy)?;
        writeln!(
            f,
            "backups: {kept} kept, {} expire ({} bytes freed)",
            self.backups.len() - kept,
            self.expired_bytes
        )?;
        for b in &self.backups {
            match &b.verdict {
                Verdict::Expire { nearest } => {
                    write!(
                        f,
                        "  expire {} (stopped {}, {} bytes): ",
                        b.id, b.stop_time, b.stored_bytes
                    )?;
                    match nearest {
                        Some(r) => writeln!(f, "no rule keeps it; nearest: {r}")?,
                        None => writeln!(f, "no rule keeps it")?,
                    }
                }
                Verdict::Keep { reasons } => {
                    let why: Vec<String> = reasons.iter().map(ToString::to_string).collect();
                    writeln!(
                        f,
                        "  keep   {} (stopped {}): {}",
                        b.id,
                        b.stop_time,
                        why.join("; ")
                    )?;
                }
            }
        }
        if !self.unknown_pins.is_empty() {
            writeln!(f, "pins naming no backup: {}", self.unknown_pins.join(", "))?;
        }
        writeln!(f, "WAL kept:")?;
        if self.wal.is_empty() {
            writeln!(f, "  none")?;
        }
        for (t, ranges) in &self.wal {
            let r: Vec<String> = ranges.iter().map(ToString::to_string).collect();
            writeln!(f, "  timeline {t}: {}", r.join(", "))?;
        }
        match &self.window {
            None => writeln!(f, "restorable window: none (no backup)")?,
            Some(w) => {
                let tl: Vec<String> = w.timelines.iter().map(ToString::to_string).collect();
                writeln!(
                    f,
                    "restorable window: every point from {} (end of backup {}) to the end of \
                     the archive, timeline(s) {}",
                    w.from,
                    w.base,
                    tl.join(", ")
                )?;
                if !w.covers_request
                    && let Some(req) = &w.requested
                {
                    writeln!(
                        f,
                        "  shorter than pitr-window {req}: no backup finished early enough"
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// A stored key that [`wal_to_delete`] could not classify: left alone, and reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unclassified {
    pub key: String,
    pub reason: String,
}

/// Which stored WAL keys a plan lets go.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WalSweep {
    /// Keys no kept range needs any byte of.
    pub delete: Vec<String>,
    /// How many keys stay (needed, or `.history`).
    pub kept: usize,
    pub unclassified: Vec<Unclassified>,
}

/// Decides which WAL keys (`wal/TTTTTTTT/LLLLLLLL/NAME`, `wal/history/NAME`) may be deleted
/// under `plan`: a segment, `.partial` or `.backup` file only when no kept range of its
/// timeline needs any byte of its segment; `.history` files never. A key that is not a WAL
/// key of this layout, whose name does not fit `segment_size`, or whose timeline the plan does
/// not know, is left alone and reported.
pub fn wal_to_delete<'k>(
    plan: &RetentionPlan,
    segment_size: WalSegmentSize,
    keys: impl IntoIterator<Item = &'k str>,
) -> WalSweep {
    let mut sweep = WalSweep::default();
    for key in keys {
        let mut unclassified = |reason: String| {
            sweep.unclassified.push(Unclassified {
                key: key.to_owned(),
                reason,
            });
        };
        let Some(name) = key.strip_prefix("wal/").and_then(|k| k.rsplit('/').next()) else {
            unclassified("not a WAL key".into());
            continue;
        };
        let name = match WalFileName::parse(name) {
            Ok(name) => name,
            Err(e) => {
                unclassified(e.to_string());
                continue;
            }
        };
        if wal_key(&name) != key {
            unclassified(format!(
                "a {} is not stored under this key",
                name.kind().describe()
            ));
            continue;
        }
        if *name.kind() == WalFileKind::History {
            sweep.kept += 1;
            continue;
        }
        let segno = match name.segno(segment_size) {
            Ok(s) => s,
            Err(e) => {
                unclassified(e.to_string());
                continue;
            }
        };
        let timeline = name.timeline();
        if !plan.timelines.contains(&timeline) {
            unclassified(format!(
                "timeline {timeline} has neither a history file nor a backup"
            ));
            continue;
        }
        let lo = segno.start_lsn(segment_size);
        let hi = Lsn(lo.0.saturating_add(u64::from(segment_size.bytes()) - 1));
        if plan.needs(timeline, lo, hi) {
            sweep.kept += 1;
        } else {
            sweep.delete.push(key.to_owned());
        }
    }
    sweep
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
