//! `walcore expire`: reads the repository, plans retention ([`retention_plan`]), and deletes
//! what the plan lets go, in an order that keeps every listed backup restorable at every
//! moment.
//!
//! # What is read, in this order
//! 1. Every WAL key with its size and the timeline histories, through the index
//!    (`index::wal_objects`: the log directories are listed, and only the new ones and the two
//!    newest of each timeline are read again).
//! 2. Every object under `backup/` (one paged listing): the objects of each backup, and those
//!    of takes that have no catalog record: running takes (a heartbeat or other write within
//!    the orphan grace) and leftovers.
//! 3. The catalog and the pins.
//!
//! The order is what makes a take that runs during `expire` safe: a take that starts after
//! step 2 asks the server for a checkpoint whose redo point lies in WAL that was not archived
//! yet at step 1, so none of its WAL is in the listing; a take seen at step 2 keeps the WAL
//! from its start on (its heartbeats carry it), and one whose start is not known yet keeps
//! all WAL for this run. A segment archived during `expire` is not in the listing either: only
//! listed keys are ever deleted.
//!
//! # What is deleted, in this order
//! 1. The catalog records of the expired backups (in one batch): they leave `list` first.
//! 2. Their objects and pin events.
//! 3. Leftovers of takes that never finished: a tombstone at `catalog/ID` first (a
//!    create-only write, so a take that was only stalled fails at its commit), then the
//!    objects, then the tombstone.
//! 4. WAL no kept backup and no second of the window needs.
//!
//! Killed at any point, the repository is one in which every listed backup has its objects
//! and WAL; running `expire` again finishes the job (a backup whose record went but whose
//! objects stayed is a leftover for step 3 next time).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::policy::{Policy, RetentionPlan, Unclassified, retention_plan, wal_to_delete};
use crate::backup::catalog::{self, Burial, is_valid_id};
use crate::backup::plan::{listing, read_histories};
use crate::backup::{heartbeat, pins};
use crate::error::{Error, ErrorKind};
use crate::pg::{Lsn, TimelineId, WalFileName, WalSegmentSize};
use crate::repo::Repository;
use crate::store::{ObjectInfo, StoreError};

/// How long a take without a catalog record must have written nothing before its objects are
/// taken for leftovers, by default.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(3600);
/// The shortest orphan grace: three heartbeat intervals.
pub const MIN_ORPHAN_GRACE: Duration = Duration::from_secs(15);

/// What `expire` is asked to do.
#[derive(Debug, Clone)]
pub struct ExpireOptions {
    pub policy: Policy,
    pub now: DateTime<Utc>,
    /// Plan and report only.
    pub dry_run: bool,
    /// See [`DEFAULT_ORPHAN_GRACE`].
    pub orphan_grace: Duration,
}

impl ExpireOptions {
    /// `policy` at `now`, executed, with the default orphan grace.
    pub fn new(policy: Policy, now: DateTime<Utc>) -> ExpireOptions {
        ExpireOptions {
            policy,
            now,
            dry_run: false,
            orphan_grace: DEFAULT_ORPHAN_GRACE,
        }
    }

    /// The configured policy and orphan grace, now.
    pub fn from_config(config: &crate::config::Config, dry_run: bool) -> ExpireOptions {
        ExpireOptions {
            policy: config.retention.clone(),
            now: Utc::now(),
            dry_run,
            orphan_grace: config.orphan_grace,
        }
    }
}

/// A run of consecutive WAL files of one timeline that go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalRun {
    pub timeline: u32,
    pub first: String,
    pub last: String,
    pub files: usize,
}

/// The WAL part of a report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WalReport {
    /// WAL files that go, and their stored bytes.
    pub delete: usize,
    pub delete_bytes: u64,
    /// WAL files that stay (needed, `.history`, or held back).
    pub kept: usize,
    pub runs: Vec<WalRun>,
    /// Keys that could not be classified: left alone.
    pub unclassified: Vec<Unclassified>,
    /// Why no WAL goes in this run, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_back: Option<String>,
}

/// What happens to the objects of a take that has no catalog record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrphanAction {
    /// Wrote something within the orphan grace: a take still running; left alone.
    Running,
    /// Nothing written for the orphan grace (or already given up by an earlier sweep): swept.
    Sweep,
    /// Its take wrote its record while `expire` looked: a backup after all, left alone.
    Recorded,
}

/// A take without a catalog record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Orphan {
    pub id: String,
    pub objects: usize,
    pub bytes: u64,
    /// Seconds since the newest of its objects was written (by `now`).
    pub idle_seconds: u64,
    pub action: OrphanAction,
    /// Where a running take's WAL starts, when its heartbeat says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_lsn: Option<Lsn>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_timeline: Option<u32>,
}

/// What was deleted (all zero for a dry run).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Deleted {
    pub backups: usize,
    pub backup_objects: usize,
    pub orphan_objects: usize,
    pub wal_objects: usize,
    pub bytes: u64,
}

/// What `expire` planned and did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpireReport {
    pub dry_run: bool,
    pub plan: RetentionPlan,
    pub wal: WalReport,
    pub orphans: Vec<Orphan>,
    pub deleted: Deleted,
    /// Things the operator should know (unreadable records, pins naming no backup...).
    pub warnings: Vec<String>,
}

/// The objects of one backup ID under `backup/ID/`.
#[derive(Debug, Default)]
struct Prefix {
    objects: Vec<ObjectInfo>,
}

impl Prefix {
    fn bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }

    fn newest(&self) -> Option<SystemTime> {
        self.objects.iter().map(|o| o.modified).max()
    }

    fn keys(&self) -> Vec<String> {
        self.objects.iter().map(|o| o.key.clone()).collect()
    }
}

/// Reads the repository, plans, and (unless `dry_run`) deletes; see the module documentation.
pub async fn expire(repo: &Repository, options: &ExpireOptions) -> Result<ExpireReport, Error> {
    if !options.policy.has_rule() {
        // The plan refuses too; refusing before reading anything says it sooner.
        retention_plan(
            &options.policy,
            &[],
            &BTreeMap::new(),
            &BTreeMap::new(),
            options.now,
        )?;
    }
    if options.orphan_grace < MIN_ORPHAN_GRACE {
        return Err(Error::new(
            ErrorKind::Configuration,
            format!(
                "orphan grace {}s is shorter than {}s (three heartbeats of a running take): a \
                 take still running could be swept",
                options.orphan_grace.as_secs(),
                MIN_ORPHAN_GRACE.as_secs()
            ),
        ));
    }
    let meta = repo.read_meta().await?.ok_or_else(|| {
        Error::new(
            ErrorKind::Configuration,
            format!(
                "{} is not a walcore repository: it has no {} (nothing was ever archived or \
                 backed up there); check WALCORE_REPO",
                repo.store().describe(),
                crate::store::META_KEY
            ),
        )
    })?;
    let seg_size = meta.segment_size()?;

    // 1. WAL, then 2. the backups' prefixes, then 3. the catalog (see the module docs).
    // Through the index: the directories it holds are not listed again, but for the newest.
    let wal = super::index::wal_objects(repo).await?;
    let histories = read_histories(repo, wal.iter().map(|o| o.key.as_str())).await?;
    let mut prefixes = backup_prefixes(repo).await?;
    let catalog = catalog::scan(repo).await?;
    let pin_keys = listing(repo, pins::PINS_PREFIX, |s| s.list(pins::PINS_PREFIX)).await?;
    let pin_states = pins::states(repo).await?;

    let mut warnings: Vec<String> = catalog
        .unreadable
        .iter()
        .map(|e| format!("unreadable catalog record, its backup is left alone: {e:#}"))
        .collect();
    let pinned: BTreeMap<String, Option<String>> = pin_states
        .into_iter()
        .filter(|(_, s)| s.pinned)
        .map(|(id, s)| (id, s.pin_note))
        .collect();
    let mut plan = retention_plan(
        &options.policy,
        &catalog.records,
        &pinned,
        &histories,
        options.now,
    )?;
    if !plan.unknown_pins.is_empty() {
        warnings.push(format!(
            "pins naming no backup in the catalog: {}",
            plan.unknown_pins.join(", ")
        ));
    }

    // Takes without a record: running, or leftovers.
    let recorded: BTreeSet<&str> = catalog.records.iter().map(|r| r.id.as_str()).collect();
    let unreadable_ids: BTreeSet<&str> =
        catalog.unreadable_ids.iter().map(String::as_str).collect();
    let mut orphans = Vec::new();
    let mut held_back: Option<String> = None;
    let tombstones: BTreeSet<&str> = catalog.tombstones.iter().map(String::as_str).collect();
    let candidates: BTreeSet<String> = prefixes
        .keys()
        .filter(|id| !recorded.contains(id.as_str()) && !unreadable_ids.contains(id.as_str()))
        .cloned()
        .chain(catalog.tombstones.iter().cloned())
        .collect();
    for id in candidates {
        let prefix = prefixes.remove(&id).unwrap_or_default();
        let idle = prefix.newest().map_or(Duration::MAX, |t| {
            SystemTime::from(options.now)
                .duration_since(t)
                .unwrap_or(Duration::ZERO)
        });
        let mut orphan = Orphan {
            id: id.clone(),
            objects: prefix.objects.len(),
            bytes: prefix.bytes(),
            idle_seconds: idle.as_secs().min(u64::from(u32::MAX)),
            action: OrphanAction::Sweep,
            start_lsn: None,
            start_timeline: None,
        };
        if idle < options.orphan_grace && !tombstones.contains(id.as_str()) {
            orphan.action = OrphanAction::Running;
            match running_start(repo, &id, &prefix).await {
                Some((lsn, tli)) => {
                    plan.keep_from(&histories, TimelineId(tli), lsn);
                    orphan.start_lsn = Some(lsn);
                    orphan.start_timeline = Some(tli);
                }
                None => {
                    held_back = Some(format!(
                        "take {id} is running and has not said where its WAL starts yet; no \
                         WAL is expired in this run"
                    ));
                }
            }
        }
        orphans.push((orphan, prefix));
    }

    // The WAL that goes.
    // `wal` is sorted by key: sizes by search, no map of a million keys.
    let size_of = |k: &str| {
        wal.binary_search_by(|o| o.key.as_str().cmp(k))
            .ok()
            .map(|i| wal[i].size)
    };
    let mut sweep = wal_to_delete(&plan, seg_size, wal.iter().map(|o| o.key.as_str()));
    if catalog.records.is_empty() {
        held_back =
            Some("the catalog holds no complete backup: WAL is never expired without one".into());
    } else if !catalog.unreadable.is_empty() {
        held_back = Some(
            "a catalog record could not be read: its backup may need WAL the plan cannot see, \
             so no WAL is expired in this run"
                .into(),
        );
    }
    if held_back.is_some() {
        sweep.kept += sweep.delete.len();
        sweep.delete.clear();
    }
    let delete_bytes = sweep
        .delete
        .iter()
        .filter_map(|k| size_of(k.as_str()))
        .sum();
    // A million listed keys are not needed past here: the sweep holds what goes.
    drop(wal);
    let wal_report = WalReport {
        delete: sweep.delete.len(),
        delete_bytes,
        kept: sweep.kept,
        runs: runs(&sweep.delete, seg_size),
        unclassified: sweep.unclassified.clone(),
        held_back,
    };

    let mut report = ExpireReport {
        dry_run: options.dry_run,
        plan,
        wal: wal_report,
        orphans: orphans.iter().map(|(o, _)| o.clone()).collect(),
        deleted: Deleted::default(),
        warnings,
    };
    if options.dry_run {
        return Ok(report);
    }

    // 1. The expired backups leave the catalog, in one batch.
    let expired: Vec<&str> = report.plan.expired().collect();
    let records: Vec<String> = expired.iter().map(|id| catalog::catalog_key(id)).collect();
    delete(repo, "the catalog records of expired backups", &records).await?;
    report.deleted.backups = expired.len();
    // 2. Their objects and pin events.
    let mut keys: BTreeSet<String> = BTreeSet::new();
    for id in &expired {
        if let Some(p) = prefixes.get(*id) {
            report.deleted.bytes += p.bytes();
            keys.extend(p.keys());
        }
        if let Some(r) = catalog.records.iter().find(|r| r.id == *id) {
            keys.extend(r.objects.iter().map(|o| o.key.clone()));
        }
        let pin_prefix = pins::pins_prefix(id);
        keys.extend(
            pin_keys
                .iter()
                .filter(|k| k.starts_with(&pin_prefix))
                .cloned(),
        );
    }
    let keys: Vec<String> = keys.into_iter().collect();
    delete(repo, "the objects of expired backups", &keys).await?;
    report.deleted.backup_objects = keys.len();
    for id in &expired {
        prune(repo, &format!("backup/{id}/")).await;
        prune(repo, &pins::pins_prefix(id)).await;
    }

    // 3. Leftovers of takes that never finished.
    for (i, (orphan, prefix)) in orphans.iter().enumerate() {
        if orphan.action != OrphanAction::Sweep {
            continue;
        }
        let swept = sweep_orphan(repo, &orphan.id, prefix).await?;
        match swept {
            None => report.orphans[i].action = OrphanAction::Recorded,
            Some(n) => {
                report.deleted.orphan_objects += n;
                report.deleted.bytes += orphan.bytes;
            }
        }
    }

    // 4. WAL, last.
    delete(repo, "expired WAL", &sweep.delete).await?;
    // The log directories this emptied (a file system keeps them; an object store has none).
    // Nothing archives into them: all they held was older than every kept backup's start.
    let emptied: BTreeSet<&str> = sweep
        .delete
        .iter()
        .filter_map(|k| k.rsplit_once('/').map(|(dir, _)| dir))
        .filter(|dir| dir.matches('/').count() == 2)
        .collect();
    let local = matches!(repo.store(), crate::store::Store::Local(_));
    for dir in emptied.into_iter().filter(|_| local) {
        if repo.store().list_dir(dir).await.is_ok_and(|o| o.is_empty()) {
            prune(repo, &format!("{dir}/")).await;
        }
    }
    super::index::forget_wal(repo, &sweep.delete).await;
    report.deleted.wal_objects = sweep.delete.len();
    report.deleted.bytes += report.wal.delete_bytes;
    Ok(report)
}

/// Every object under `backup/`, grouped by backup ID (keys that are not `backup/ID/…` with a
/// valid ID are left out: nothing here deletes what it cannot name).
async fn backup_prefixes(repo: &Repository) -> Result<BTreeMap<String, Prefix>, Error> {
    let objects = listing(repo, "backup/", |s| s.list_info("backup/")).await?;
    let mut out: BTreeMap<String, Prefix> = BTreeMap::new();
    for o in objects {
        let Some(id) = o
            .key
            .strip_prefix("backup/")
            .and_then(|k| k.split_once('/'))
            .map(|(id, _)| id)
            .filter(|id| is_valid_id(id))
        else {
            continue;
        };
        out.entry(id.to_owned()).or_default().objects.push(o);
    }
    Ok(out)
}

/// A running take's start position, from its newest heartbeat (`None` when it has none that
/// says, or it cannot be read).
async fn running_start(repo: &Repository, id: &str, prefix: &Prefix) -> Option<(Lsn, u32)> {
    let beat_prefix = heartbeat::prefix(id);
    let newest = prefix
        .objects
        .iter()
        .filter(|o| o.key.starts_with(&beat_prefix))
        .max_by(|a, b| a.key.cmp(&b.key))?;
    match heartbeat::read(repo, &newest.key).await {
        Ok(b) => b.start_lsn.zip(b.start_timeline),
        Err(e) => {
            // A beat replaced between the listing and the read: the one before had the same.
            let beat0 = heartbeat::key(id, 0);
            if newest.key != beat0 {
                tracing::debug!("heartbeat {} is gone: {e:#}", newest.key);
            }
            None
        }
    }
}

/// Sweeps the leftovers of take `id`: tombstone, objects, tombstone removed. `None` when the
/// take recorded its backup meanwhile (nothing is deleted); else the number of objects
/// deleted.
async fn sweep_orphan(
    repo: &Repository,
    id: &str,
    prefix: &Prefix,
) -> Result<Option<usize>, Error> {
    let why = "leftovers of a take that never wrote its catalog record, swept by walcore expire";
    if catalog::bury(repo, id, why).await? == Burial::Recorded {
        return Ok(None);
    }
    // Listed again: anything written since the first listing goes too (the take can no
    // longer record its backup).
    let p = format!("backup/{id}/");
    let mut keys: BTreeSet<String> = prefix.keys().into_iter().collect();
    keys.extend(listing(repo, &p, |s| s.list(&p)).await?);
    let keys: Vec<String> = keys.into_iter().collect();
    delete(repo, &format!("the leftovers of take {id}"), &keys).await?;
    // A killed take's partial archive on a file system: a temporary file, never listed.
    let store = repo.store().describe();
    let partial = repo
        .store()
        .remove_temporaries(&p)
        .await
        .map_err(|e| e.into_error("removing the partial files of", &p, &store))?;
    prune(repo, &p).await;
    catalog::remove(repo, id).await?;
    tracing::info!(
        backup = %id,
        objects = keys.len(),
        partial_files = partial,
        "swept the leftovers of a take that never finished"
    );
    Ok(Some(keys.len()))
}

/// Deletes `keys` in batches, each retried as every store request is.
async fn delete(repo: &Repository, what: &str, keys: &[String]) -> Result<(), Error> {
    let store = repo.store().describe();
    for batch in keys.chunks(1000) {
        repo.with_retry(&format!("deleting {what}"), || async {
            repo.store()
                .delete_many(batch)
                .await
                .map_err(|e: StoreError| {
                    e.into_error("deleting", batch.first().map_or("", String::as_str), &store)
                })
        })
        .await
        .map_err(|e| e.context(format!("deleting {what} in {store}")))?;
    }
    Ok(())
}

/// Removes the empty directories a deleted prefix leaves on a file system; a failure only
/// leaves an empty directory.
async fn prune(repo: &Repository, prefix: &str) {
    if let Err(e) = repo.store().prune_empty_dirs(prefix).await {
        tracing::debug!("could not remove the empty directories of {prefix}: {e}");
    }
}

/// The deleted keys as runs of consecutive segments per timeline (for the plan's text). The
/// keys come sorted (a sweep of a sorted listing), which is (timeline, segment) order; names
/// are borrowed, so a million keys cost no second copy of their text.
fn runs(keys: &[String], seg_size: WalSegmentSize) -> Vec<WalRun> {
    let mut named: Vec<(TimelineId, u64, &str)> = keys
        .iter()
        .filter_map(|k| {
            let file = k.rsplit('/').next()?;
            let name = WalFileName::parse(file).ok()?;
            let segno = name.segno(seg_size).ok()?;
            Some((name.timeline(), segno.0, file))
        })
        .collect();
    if !named.is_sorted() {
        named.sort_unstable();
    }
    let mut out: Vec<WalRun> = Vec::new();
    let mut last: Option<(TimelineId, u64)> = None;
    for (tli, segno, name) in named {
        match (out.last_mut(), last) {
            (Some(run), Some((t, s))) if t == tli && segno <= s + 1 => {
                run.last = name.to_owned();
                run.files += 1;
            }
            _ => out.push(WalRun {
                timeline: tli.0,
                first: name.to_owned(),
                last: name.to_owned(),
                files: 1,
            }),
        }
        last = Some((tli, segno));
    }
    out
}

impl fmt::Display for ExpireReport {
    /// The plan, then what it does to WAL and leftovers, then what was deleted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.plan)?;
        let w = &self.wal;
        match &w.held_back {
            Some(why) => writeln!(f, "WAL expired: none ({why})")?,
            None if w.delete == 0 => writeln!(f, "WAL expired: none")?,
            None => {
                writeln!(
                    f,
                    "WAL expired: {} files ({} bytes), {} stay",
                    w.delete, w.delete_bytes, w.kept
                )?;
                for r in &w.runs {
                    writeln!(
                        f,
                        "  timeline {}: {} .. {} ({} files)",
                        r.timeline, r.first, r.last, r.files
                    )?;
                }
            }
        }
        for u in &w.unclassified {
            writeln!(f, "left alone: {} ({})", u.key, u.reason)?;
        }
        for o in &self.orphans {
            let what = match o.action {
                OrphanAction::Running => "a take still running, left alone",
                OrphanAction::Sweep if self.dry_run => "leftovers of a take that never finished",
                OrphanAction::Sweep => "leftovers of a take that never finished, swept",
                OrphanAction::Recorded => "its take recorded the backup meanwhile, left alone",
            };
            writeln!(
                f,
                "take {} without a catalog record: {} objects, {} bytes, idle {}s: {what}",
                o.id, o.objects, o.bytes, o.idle_seconds
            )?;
        }
        for warning in &self.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        if self.dry_run {
            writeln!(f, "dry run: nothing was deleted")
        } else {
            let d = &self.deleted;
            writeln!(
                f,
                "deleted: {} backups ({} objects), {} leftover objects, {} WAL files; {} bytes freed",
                d.backups, d.backup_objects, d.orphan_objects, d.wal_objects, d.bytes
            )
        }
    }
}

#[cfg(test)]
#[path = "expire_tests.rs"]
mod tests;
