//! `walcore verify`: every stored byte still decodes, every object is what refers to it, and no
//! WAL is missing that a backup or a second of the restorable window needs. Each problem comes
//! with its object's key, its kind, and what it costs in words (which backup can no longer be
//! restored, which interval can no longer be recovered to).
//!
//! The store is listed in full: only a listing shows an object deleted behind walcore's back.
//! Objects are immutable, so one verified once is recorded in a ledger inside the repository
//! (`verify/`, FORMAT.md §6.4) and not read again unless `--full`: a second run reads only what
//! is new. Reads run several at a time, each streaming through the codec with bounded memory.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::backup::catalog::{self, BackupRecord, ObjectEntry};
use crate::backup::plan::listing;
use crate::backup::progress::{Meter, human};
use crate::codec::CodecError;
use crate::error::{Error, ErrorKind};
use crate::pg::{
    Lsn, SIZE_OF_XLOG_LONG_PHD, SegmentExpectations, SegmentNo, TimelineHistory, TimelineId,
    WalFileKind, WalFileName, WalSegmentSize, check_segment_header,
};
use crate::repo::Repository;
use crate::store::ObjectInfo;
use crate::store::keys::wal_key;

/// Where verify ledgers live.
pub const LEDGER_PREFIX: &str = "verify/";
/// Objects read at once.
const READS_IN_FLIGHT: usize = 4;
/// A take whose objects were written this recently is running: its objects are not leftovers.
const RUNNING_TAKE: Duration = Duration::from_secs(3600);

/// What to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Read every object again, whatever the ledger says.
    pub full: bool,
    /// Only this backup: its objects, its record and the WAL from its start to its stop.
    pub backup: Option<String>,
    /// Draw a progress line (on a terminal).
    pub progress: bool,
    /// Take the WAL from the index instead of a full listing (`--index`): far fewer requests
    /// on a large repository, but an object deleted or rewritten behind walcore's back in an
    /// older WAL directory goes unseen.
    pub index: bool,
}

/// What is wrong with an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// Something refers to it and it is not stored.
    Missing,
    /// It is stored and does not decode, or decodes to other bytes than what refers to it says.
    Corrupt,
    /// It was encrypted with another key than the repository's (or the key is missing).
    WrongKey,
    /// A WAL segment of another PostgreSQL cluster (another system identifier).
    WrongCluster,
    /// WAL segments missing inside the restorable window.
    Gap,
    /// Stored, and nothing refers to it: space that no restore uses.
    Unreferenced,
}

impl ProblemKind {
    fn word(self) -> &'static str {
        match self {
            ProblemKind::Missing => "missing",
            ProblemKind::Corrupt => "corrupt",
            ProblemKind::WrongKey => "wrong key",
            ProblemKind::WrongCluster => "wrong cluster",
            ProblemKind::Gap => "gap",
            ProblemKind::Unreferenced => "unreferenced",
        }
    }

    /// Whether the problem costs a restore (everything but unreferenced objects).
    pub fn is_damage(self) -> bool {
        self != ProblemKind::Unreferenced
    }
}

/// One problem: the object, what is wrong, and what it costs.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub key: String,
    pub kind: ProblemKind,
    /// What was found.
    pub detail: String,
    /// What it costs, in words: the backups it breaks, the interval it makes unrecoverable.
    pub consequences: Vec<String>,
}

/// What a verify run did and found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub store: String,
    pub full: bool,
    pub backup: Option<String>,
    /// Objects listed in the parts of the repository verified.
    pub objects_listed: usize,
    /// Objects read and decoded in this run.
    pub objects_read: usize,
    /// Stored bytes read in this run.
    pub bytes_read: u64,
    /// Objects the ledger says were verified before, not read again.
    pub objects_already_verified: usize,
    /// Backups whose objects and WAL were checked.
    pub backups_checked: usize,
    /// WAL segments the continuity pass found stored along the window.
    pub window: Option<WindowReport>,
    pub problems: Vec<Problem>,
    /// The ledger written by this run (`None` when nothing new was verified or it could not
    /// be written).
    pub ledger: Option<String>,
}

/// The restorable window the continuity pass walked.
#[derive(Debug, Clone, Serialize)]
pub struct WindowReport {
    pub timeline: u32,
    /// The oldest backup on the newest timeline's history, where the window starts.
    pub from_backup: String,
    pub first_segment: String,
    pub last_segment: String,
    pub segments: u64,
}

impl VerifyReport {
    /// Whether anything costs a restore.
    pub fn has_damage(&self) -> bool {
        self.problems.iter().any(|p| p.kind.is_damage())
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "verified {}{}: {} objects listed, {} read ({}), {} verified before and not read again{}",
            self.store,
            self.backup
                .as_ref()
                .map(|b| format!(" (backup {b})"))
                .unwrap_or_default(),
            self.objects_listed,
            self.objects_read,
            human(self.bytes_read),
            self.objects_already_verified,
            if self.full { " (--full)" } else { "" }
        )?;
        writeln!(f, "backups checked: {}", self.backups_checked)?;
        if let Some(w) = &self.window {
            writeln!(
                f,
                "restorable window on timeline {}: from backup {}, WAL {} .. {} ({} segments)",
                w.timeline, w.from_backup, w.first_segment, w.last_segment, w.segments
            )?;
        }
        if self.problems.is_empty() {
            return writeln!(f, "no problems found");
        }
        writeln!(f, "{} problem(s):", self.problems.len())?;
        for p in &self.problems {
            writeln!(f, "  {}: {} ({})", p.kind.word(), p.key, p.detail)?;
            for c in &p.consequences {
                writeln!(f, "    -> {c}")?;
            }
        }
        Ok(())
    }
}

/// A ledger: the objects verified so far (FORMAT.md §6.4).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Ledger {
    format_version: u32,
    /// The newest modification time, as the store reports it, of the objects listed by the
    /// run that wrote this ledger (RFC 3339). An object counts as verified only when its own
    /// time is not after it: an object written again after that run is read again.
    listed_through: String,
    /// Keys of objects verified that are not WAL segments.
    keys: Vec<String>,
    /// WAL segments verified, per timeline (8 hex digits): runs of segment numbers, inclusive.
    segments: BTreeMap<String, Vec<(u64, u64)>>,
    /// The objects verified whose time is within [`RECENT`] of `listed_through`, with their
    /// time and entity tag: a store that keeps times to the second cannot tell by time alone
    /// an object rewritten in the same second as the listing.
    #[serde(default)]
    recent: Vec<RecentEntry>,
    /// What the run that wrote it found (`walcore status` shows it).
    #[serde(default)]
    result: Option<LastVerify>,
    time: String,
    created_by: String,
}

/// What the last verify run found, as its ledger records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastVerify {
    /// When it ended (the ledger's time).
    #[serde(default)]
    pub time: String,
    pub full: bool,
    /// The backup it was limited to (`--backup`), if any.
    pub backup: Option<String>,
    pub objects_read: usize,
    /// Problems found, and how many of them cost a restore.
    pub problems: usize,
    pub damage: usize,
}

/// The result of the newest verify run, from its ledger; `None` when verify never ran (or its
/// ledger cannot be read).
pub async fn last_run(repo: &Repository) -> Result<Option<LastVerify>, Error> {
    let keys = listing(repo, LEDGER_PREFIX, |s| s.list(LEDGER_PREFIX)).await?;
    let Some(newest) = keys.iter().filter(|k| is_ledger_key(k)).max() else {
        return Ok(None);
    };
    let bytes = match repo.get_small(newest).await {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::Transient => return Err(e),
        Err(_) => return Ok(None),
    };
    Ok(serde_json::from_slice::<Ledger>(&bytes).ok().and_then(|l| {
        l.result.map(|r| LastVerify {
            time: l.time.clone(),
            ..r
        })
    }))
}

/// A recently written object as verified (see [`Ledger::recent`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RecentEntry {
    key: String,
    modified: String,
    #[serde(default)]
    etag: Option<String>,
}

/// Objects written this close to the newest of a listing are identified by time and tag, not
/// by time alone (stores keep times to the second; clocks tick coarsely).
const RECENT: Duration = Duration::from_secs(2);

fn nanos(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// What the ledger says was verified.
#[derive(Debug, Default)]
pub(crate) struct Verified {
    through: Option<SystemTime>,
    /// Recently written objects: key, time, tag.
    recent: BTreeMap<String, (String, Option<String>)>,
    /// Keys that are not WAL segments.
    keys: BTreeSet<String>,
    /// WAL segments: timeline and the 64-bit number of the name (a million segments stay
    /// small).
    segments: std::collections::HashSet<(u32, u64)>,
}

impl Verified {
    #[cfg(test)]
    fn covers(&self, object: &ObjectInfo) -> bool {
        self.covers_as(segment_number(&object.key), object)
    }

    /// [`covers`](Self::covers) for an object whose segment number (when it is a segment) is
    /// already known.
    fn covers_as(&self, segment: Option<(u32, u64)>, object: &ObjectInfo) -> bool {
        let Some(through) = self.through else {
            return false;
        };
        let listed = match segment {
            Some(s) => self.segments.contains(&s),
            None => self.keys.contains(&object.key),
        };
        if !listed {
            return false;
        }
        // Older than the recent edge: verified as it is (a rewrite after that listing would
        // carry a later time). Recent: only with the same time and tag.
        if object.modified + RECENT < through {
            return true;
        }
        self.recent
            .get(&object.key)
            .is_some_and(|(t, tag)| *t == nanos(object.modified) && *tag == object.etag)
    }
}

/// The timeline and 64-bit name number of a WAL segment key of this layout.
fn segment_number(key: &str) -> Option<(u32, u64)> {
    parse_wal_key(key)
        .filter(WalFileName::is_segment)
        .map(|n| number_of(&n))
}

/// The segment a 64-bit name number denotes under `seg` (`XLogFromFileName`); `None` for a
/// number past the segments one log id holds (no PostgreSQL writes such a name).
pub(crate) fn segno_of(num: u64, seg: WalSegmentSize) -> Option<SegmentNo> {
    let per_id = seg.segments_per_xlog_id();
    let (log, id) = (num >> 32, num & u64::from(u32::MAX));
    (id < per_id).then(|| SegmentNo(log * per_id + id))
}

/// The timeline and 64-bit name number of a WAL file name.
fn number_of(name: &WalFileName) -> (u32, u64) {
    (
        name.timeline().0,
        u64::from(name.log_id()) << 32 | u64::from(name.seg_id()),
    )
}

/// The stored object kinds verify reads.
#[derive(Debug, Clone)]
enum Subject {
    Wal(WalFileName),
    /// Boxed: a million WAL subjects stay small.
    Backup(Box<(String, ObjectEntry)>),
}

/// One stored WAL segment, as small as a million of them need: its name as numbers, its
/// stored size and time, and whether it is verified (by the ledger, or read in this run).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StoredSegment {
    tli: u32,
    num: u64,
    size: u64,
    /// When the store wrote it (unknown when the listing came from the index).
    modified: Option<SystemTime>,
    verified: bool,
}

/// What the listing of `wal/` showed, kept as it streams by: segments compact, the few other
/// objects whole, and whole copies only of what this run must read or remember.
#[derive(Debug, Default)]
pub(crate) struct StoredWal {
    /// Sorted by timeline and number once the listing is done.
    segments: Vec<StoredSegment>,
    /// WAL files that are not segments (histories, `.partial`, `.backup`), sorted by key.
    pub(crate) others: Vec<(WalFileName, ObjectInfo)>,
    /// Keys under `wal/` that are not a WAL file name of this layout.
    foreign: Vec<ObjectInfo>,
    /// WAL files the ledger does not cover: to read.
    unverified: Vec<ObjectInfo>,
    /// Objects within [`RECENT`] of the newest time seen: the ledger's `recent` candidates.
    recent: Vec<ObjectInfo>,
    recent_kept: usize,
    newest: Option<SystemTime>,
}

impl StoredWal {
    fn add(&mut self, object: ObjectInfo, ledger: &Verified) {
        let Some(name) = parse_wal_key(&object.key) else {
            self.foreign.push(object);
            return;
        };
        let newest = self
            .newest
            .map_or(object.modified, |t| t.max(object.modified));
        self.newest = Some(newest);
        if object.modified + RECENT >= newest {
            self.recent.push(object.clone());
            if self.recent.len() > 2 * self.recent_kept + 1024 {
                self.recent.retain(|o| o.modified + RECENT >= newest);
                self.recent_kept = self.recent.len();
            }
        }
        let number = name.is_segment().then(|| number_of(&name));
        let verified = ledger.covers_as(number, &object);
        if !verified {
            self.unverified.push(object.clone());
        }
        match number {
            Some((tli, num)) => self.segments.push(StoredSegment {
                tli,
                num,
                size: object.size,
                modified: Some(object.modified),
                verified,
            }),
            None => self.others.push((name, object)),
        }
    }

    /// The WAL as the index summarises it (`walcore status`, `verify --index`): segments
    /// without times. With a ledger, the segments it names count as verified and the others
    /// are to read.
    pub(crate) fn from_index(
        dirs: &super::index::WalDirs,
        history: Vec<ObjectInfo>,
        ledger: Option<&Verified>,
    ) -> StoredWal {
        let mut wal = StoredWal::default();
        // Without a ledger (status) nothing is to read: no whole entry is kept per segment.
        let reading = ledger.is_some();
        let none = Verified::default();
        let ledger = ledger.unwrap_or(&none);
        for (tli_dir, logs) in dirs {
            let Ok(tli) = u32::from_str_radix(tli_dir, 16) else {
                continue;
            };
            for (log_dir, dir) in logs {
                let Ok(log) = u32::from_str_radix(log_dir, 16) else {
                    continue;
                };
                let mut sizes = dir.sizes.iter();
                for &(lo, hi) in &dir.segments {
                    for s in lo..=hi {
                        let num = u64::from(log) << 32 | u64::from(s);
                        let size = sizes.next().copied().unwrap_or(0);
                        let verified =
                            ledger.through.is_some() && ledger.segments.contains(&(tli, num));
                        if reading && !verified {
                            wal.unverified.push(ObjectInfo {
                                key: format!("wal/{tli_dir}/{log_dir}/{tli_dir}{log_dir}{s:08X}"),
                                size,
                                modified: SystemTime::UNIX_EPOCH,
                                etag: None,
                            });
                        }
                        wal.segments.push(StoredSegment {
                            tli,
                            num,
                            size,
                            modified: None,
                            verified,
                        });
                    }
                }
                for (name, size) in &dir.others {
                    let object = ObjectInfo {
                        key: format!("wal/{tli_dir}/{log_dir}/{name}"),
                        size: *size,
                        modified: SystemTime::UNIX_EPOCH,
                        etag: None,
                    };
                    match parse_wal_key(&object.key) {
                        Some(name) => {
                            if reading && !ledger.covers_as(None, &object) {
                                wal.unverified.push(object.clone());
                            }
                            wal.others.push((name, object));
                        }
                        None => wal.foreign.push(object),
                    }
                }
            }
        }
        for o in history {
            if let Some(name) = parse_wal_key(&o.key) {
                if reading && !ledger.covers_as(None, &o) {
                    wal.unverified.push(o.clone());
                }
                wal.others.push((name, o));
            }
        }
        // What this view was verified against: the ledger's own listing, never later (the
        // index cannot tell an object rewritten since).
        wal.newest = Some(ledger.through.unwrap_or(SystemTime::UNIX_EPOCH));
        wal.recent.clear();
        wal.finish()
    }

    /// The WAL of a whole listing, nothing verified before (tests compare it with the index).
    #[cfg(test)]
    pub(crate) fn from_listing(objects: Vec<ObjectInfo>) -> StoredWal {
        let none = Verified::default();
        let mut wal = StoredWal::default();
        for o in objects {
            wal.add(o, &none);
        }
        wal.finish()
    }

    /// The stored segments, by timeline and number.
    pub(crate) fn segments(&self) -> impl Iterator<Item = (TimelineId, u64, u64)> + '_ {
        self.segments
            .iter()
            .map(|s| (TimelineId(s.tli), s.num, s.size))
    }

    fn finish(mut self) -> StoredWal {
        self.segments.sort_unstable_by_key(|s| (s.tli, s.num));
        self.others.sort_by(|a, b| a.1.key.cmp(&b.1.key));
        self.unverified.sort_by(|a, b| a.key.cmp(&b.key));
        if let Some(newest) = self.newest {
            self.recent.retain(|o| o.modified + RECENT >= newest);
        }
        self
    }

    fn position(&self, (tli, num): (u32, u64)) -> Option<usize> {
        self.segments
            .binary_search_by_key(&(tli, num), |s| (s.tli, s.num))
            .ok()
    }

    /// The stored segment of this name.
    pub(crate) fn segment(&self, name: &WalFileName) -> Option<&StoredSegment> {
        if !name.is_segment() {
            return None;
        }
        self.position(number_of(name)).map(|i| &self.segments[i])
    }

    /// The index's summary of the listing: by timeline and log directory.
    pub(crate) fn directories(&self) -> BTreeMap<String, BTreeMap<String, super::index::WalDir>> {
        let mut out: BTreeMap<String, BTreeMap<String, super::index::WalDir>> = BTreeMap::new();
        for s in &self.segments {
            out.entry(format!("{:08X}", s.tli))
                .or_default()
                .entry(format!("{:08X}", s.num >> 32))
                .or_default()
                .push_segment(s.num as u32, s.size);
        }
        // Everything else in a log directory, as the index's own listing of it would show.
        let rest = self.others.iter().map(|(_, o)| o).chain(&self.foreign);
        for o in rest {
            let mut parts = o.key.split('/');
            if let (Some("wal"), Some(tli), Some(log), Some(file), None) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) && super::index::is_hex8(tli)
                && super::index::is_hex8(log)
            {
                out.entry(tli.to_owned())
                    .or_default()
                    .entry(log.to_owned())
                    .or_default()
                    .others
                    .push((file.to_owned(), o.size));
            }
        }
        for dir in out.values_mut().flat_map(BTreeMap::values_mut) {
            dir.others.sort();
        }
        out
    }
}

/// The outcome of reading one object.
struct Read {
    key: String,
    stored: u64,
    problem: Option<(ProblemKind, String)>,
}

/// Runs `walcore verify`.
pub async fn verify(repo: &Repository, options: &VerifyOptions) -> Result<VerifyReport, Error> {
    let store = repo.store().describe();
    let meta = repo.read_meta().await?.ok_or_else(|| {
        Error::new(
            ErrorKind::Configuration,
            format!(
                "{store} is not a walcore repository: it has no {} (nothing was ever archived or \
                 backed up there); check WALCORE_REPO",
                crate::store::META_KEY
            ),
        )
    })?;
    let seg = meta.segment_size()?;
    let system_id = meta.system_id()?;

    // The ledger first: the WAL listing keeps whole only what it does not cover.
    let ledger = Arc::new(if options.full {
        Verified::default()
    } else {
        read_ledger(repo).await?
    });
    let wal = if options.index {
        let (dirs, history) = super::index::wal_summary(repo).await?;
        StoredWal::from_index(&dirs, history, Some(&ledger))
    } else {
        listing(repo, "wal/", |s| {
            let ledger = ledger.clone();
            s.fold_info("wal/", StoredWal::default(), move |w, o| w.add(o, &ledger))
        })
        .await?
        .finish()
    };
    let backups = listing(repo, "backup/", |s| s.list_info("backup/")).await?;
    let cat = catalog::scan(repo).await?;
    let mut problems = Vec::new();
    for (id, e) in cat.unreadable_ids.iter().zip(&cat.unreadable) {
        let kind = match e.kind() {
            ErrorKind::WrongKey => ProblemKind::WrongKey,
            ErrorKind::InvalidInput => ProblemKind::WrongCluster,
            _ => ProblemKind::Corrupt,
        };
        problems.push(Problem {
            key: catalog::catalog_key(id),
            kind,
            detail: format!("{e:#}"),
            consequences: vec![format!(
                "backup {id} can no longer be listed or restored (its catalog record cannot be \
                 read)"
            )],
        });
    }
    let records: Vec<&BackupRecord> = cat
        .records
        .iter()
        .filter(|r| options.backup.as_ref().is_none_or(|b| &r.id == b))
        .collect();
    if let Some(id) = &options.backup
        && records.is_empty()
    {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("no complete backup {id} in the catalog of {store} (see walcore list)"),
        ));
    }
    if options.backup.is_none() {
        problems.extend(wal.foreign.iter().map(|o| Problem {
            key: o.key.clone(),
            kind: ProblemKind::Unreferenced,
            detail: "not a WAL file name of this repository's layout".into(),
            consequences: vec!["no restore reads it; it only takes space".into()],
        }));
    }
    let mut histories = BTreeMap::new();
    for (name, o) in &wal.others {
        if *name.kind() == WalFileKind::History {
            match repo.get_small(&o.key).await {
                Ok(bytes) => {
                    if let Ok(h) = TimelineHistory::parse(name.timeline(), &bytes) {
                        histories.insert(name.timeline(), h);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Transient => return Err(e),
                // Reported by the read pass below.
                Err(_) => {}
            }
        }
    }
    let history_of = |tli: TimelineId| {
        histories
            .get(&tli)
            .cloned()
            .unwrap_or_else(|| TimelineHistory::root(tli))
    };

    // What to read: WAL (all of it, or the backup's range), and the backups' objects.
    let needed_by_backup: Vec<(&BackupRecord, Vec<Vec<WalFileName>>)> = records
        .iter()
        .map(|r| {
            (
                *r,
                backup_wal(r, &history_of(TimelineId(r.stop_timeline)), seg),
            )
        })
        .collect();
    let wanted_wal: Option<BTreeSet<String>> = options.backup.as_ref().map(|_| {
        needed_by_backup
            .iter()
            .flat_map(|(_, segs)| segs.iter().flatten().map(wal_key))
            .collect()
    });
    let wal_subjects = match &wanted_wal {
        None => wal.segments.len() + wal.others.len(),
        Some(w) => w
            .iter()
            .filter(|k| segment_number(k).and_then(|n| wal.position(n)).is_some())
            .count(),
    };
    let mut to_read: Vec<(&ObjectInfo, Subject)> = Vec::new();
    for info in &wal.unverified {
        if wanted_wal.as_ref().is_none_or(|w| w.contains(&info.key))
            && let Some(name) = parse_wal_key(&info.key)
        {
            to_read.push((info, Subject::Wal(name)));
        }
    }
    let stored_backup: BTreeMap<&str, &ObjectInfo> =
        backups.iter().map(|o| (o.key.as_str(), o)).collect();
    let mut backup_subjects = 0;
    let mut verified_keys: BTreeSet<String> = BTreeSet::new();
    for r in &records {
        for entry in &r.objects {
            match stored_backup.get(entry.key.as_str()) {
                Some(info) => {
                    backup_subjects += 1;
                    if ledger.covers_as(None, info) {
                        verified_keys.insert(info.key.clone());
                    } else {
                        to_read.push((
                            *info,
                            Subject::Backup(Box::new((r.id.clone(), entry.clone()))),
                        ));
                    }
                }
                None => problems.push(Problem {
                    key: entry.key.clone(),
                    kind: ProblemKind::Missing,
                    detail: format!("backup {}'s {} is not stored", r.id, entry.name),
                    consequences: vec![format!("backup {} can no longer be restored", r.id)],
                }),
            }
        }
    }
    if options.backup.is_none() {
        problems.extend(unreferenced_backup_objects(
            &backups,
            &cat.records,
            &cat.unreadable_ids,
            SystemTime::now(),
        ));
    }

    // The reads.
    let objects_listed = wal_subjects + backup_subjects + cat.records.len();
    let meter = Arc::new(Mutex::new(Meter::new(options.progress)));
    if let Ok(mut m) = meter.lock() {
        m.set_total(Some(to_read.iter().map(|(i, _)| i.size).sum()));
    }
    let expect = Arc::new((system_id, seg));
    let mut reads = futures::stream::iter(to_read)
        .map(|(info, subject)| {
            let meter = meter.clone();
            let expect = expect.clone();
            async move { read_one(repo, info.clone(), subject, &expect, &meter).await }
        })
        .buffer_unordered(READS_IN_FLIGHT);
    // Segments by number (a million of them stay small), other objects by key.
    let mut bad_segments: std::collections::HashSet<(u32, u64)> = Default::default();
    let mut verified_now: Vec<(u32, u64)> = Vec::new();
    let mut objects_read = 0;
    let mut bytes_read = 0;
    let mut read_problems = Vec::new();
    while let Some(read) = reads.next().await {
        let read = read?;
        objects_read += 1;
        bytes_read += read.stored;
        let number = segment_number(&read.key);
        match read.problem {
            None => match number {
                Some(n) => verified_now.push(n),
                None => {
                    verified_keys.insert(read.key);
                }
            },
            Some((kind, detail)) => {
                if let Some(n) = number {
                    bad_segments.insert(n);
                }
                read_problems.push(Problem {
                    key: read.key,
                    kind,
                    detail,
                    consequences: Vec::new(),
                });
            }
        }
    }
    drop(reads);
    if let Ok(mut m) = meter.lock() {
        m.finish();
    }
    let mut wal = wal;
    for n in verified_now {
        if let Some(i) = wal.position(n) {
            wal.segments[i].verified = true;
        }
    }

    // Continuity: what each backup needs, and the window.
    let present = |name: &WalFileName| {
        wal.segment(name).is_some() && !bad_segments.contains(&number_of(name))
    };
    let mut consequences: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (r, segments) in &needed_by_backup {
        if r.wal_included {
            continue;
        }
        for choices in segments {
            if choices.iter().any(&present) {
                continue;
            }
            let key = wal_key(&choices[0]);
            consequences.entry(key).or_default().push(format!(
                "backup {} can no longer be restored (it needs this segment to become consistent)",
                r.id
            ));
        }
    }
    let mut window = None;
    if options.backup.is_none() {
        let w = window_pass(&cat.records, &histories, &wal, &present, seg);
        if let Some((report, gaps)) = w {
            window = Some(report);
            for gap in gaps {
                for key in &gap.keys {
                    consequences
                        .entry(key.clone())
                        .or_default()
                        .push(gap.consequence.clone());
                }
            }
        }
    }
    for p in &mut read_problems {
        if let Some(c) = consequences.remove(&p.key) {
            p.consequences = c;
        } else if p.key.starts_with("wal/") {
            p.consequences
                .push("no backup and no second of the restorable window needs it".into());
        } else if let Some(id) = backup_id_of(&p.key) {
            p.consequences
                .push(format!("backup {id} can no longer be restored"));
        }
    }
    problems.extend(read_problems);
    problems.extend(missing_wal(consequences));
    problems.sort_by(|a, b| a.key.cmp(&b.key).then(a.kind.cmp(&b.kind)));

    if options.backup.is_none() && !options.index {
        super::index::anchor_wal(repo, wal.directories()).await;
    }

    // The new ledger: what the old one covered and is still stored, what was read now, and
    // the catalog records (decoded by the scan: they count as verified).
    let objects_already_verified = objects_listed - objects_read - cat.records.len();
    for (_, o) in &wal.others {
        if ledger.covers_as(None, o) {
            verified_keys.insert(o.key.clone());
        }
    }
    verified_keys.extend(cat.records.iter().map(|r| catalog::catalog_key(&r.id)));
    // Through the index, the ledger keeps the time of the last full listing: what it covers
    // is no more than what that listing and the reads since have shown.
    let through = if options.index {
        wal.newest
    } else {
        wal.newest
            .into_iter()
            .chain(backups.iter().map(|o| o.modified))
            .max()
    };
    let is_verified = |o: &ObjectInfo| match segment_number(&o.key) {
        Some(n) => wal.position(n).is_some_and(|i| wal.segments[i].verified),
        None => verified_keys.contains(&o.key),
    };
    let mut recent: Vec<RecentEntry> = match through {
        Some(t) => wal
            .recent
            .iter()
            .chain(&backups)
            .filter(|o| o.modified + RECENT >= t)
            .filter(|o| is_verified(o))
            .map(|o| RecentEntry {
                key: o.key.clone(),
                modified: nanos(o.modified),
                etag: o.etag.clone(),
            })
            .collect(),
        None => Vec::new(),
    };
    if options.index {
        // The WAL was not listed: the old ledger's recent WAL entries stand as they were.
        let listed: BTreeSet<String> = recent.iter().map(|r| r.key.clone()).collect();
        recent.extend(
            ledger
                .recent
                .iter()
                .filter(|(key, _)| key.starts_with("wal/") && !listed.contains(*key))
                .map(|(key, (modified, etag))| RecentEntry {
                    key: key.clone(),
                    modified: modified.clone(),
                    etag: etag.clone(),
                }),
        );
    }
    // Written by every run, also one that read nothing: `status` shows when verify last ran
    // and what it found.
    let result = LastVerify {
        time: String::new(),
        full: options.full,
        backup: options.backup.clone(),
        objects_read,
        problems: problems.len(),
        damage: problems.iter().filter(|p| p.kind.is_damage()).count(),
    };
    let ledger_key = {
        let mut runs: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
        for s in wal.segments.iter().filter(|s| s.verified) {
            let list = runs.entry(s.tli).or_default();
            match list.last_mut() {
                Some(last) if last.1 + 1 == s.num => last.1 = s.num,
                _ => list.push((s.num, s.num)),
            }
        }
        let written = Written {
            segments: runs,
            keys: verified_keys.into_iter().collect(),
            recent,
            result,
        };
        write_ledger(repo, written, through).await
    };

    Ok(VerifyReport {
        store,
        full: options.full,
        backup: options.backup.clone(),
        objects_listed,
        objects_read,
        bytes_read,
        objects_already_verified,
        backups_checked: records.len(),
        window,
        problems,
        ledger: ledger_key,
    })
}

/// Reads and checks one object. Store failures that outlast the retries end the run (the
/// store is down, the object not bad); everything else is a problem of the object.
async fn read_one(
    repo: &Repository,
    info: ObjectInfo,
    subject: Subject,
    expect: &(u64, WalSegmentSize),
    meter: &Arc<Mutex<Meter>>,
) -> Result<Read, Error> {
    let store = repo.store().describe();
    let key = info.key.clone();
    let reader = match repo.store().open_reader(&key).await {
        Ok(r) => r,
        Err(e) => {
            let e = e.into_error("reading", &key, &store);
            return match e.kind() {
                ErrorKind::NotFound => Ok(Read {
                    key,
                    stored: 0,
                    problem: Some((ProblemKind::Missing, "deleted while verify ran".into())),
                }),
                _ => Err(e),
            };
        }
    };
    let codec = repo.codec().clone();
    let meter = meter.clone();
    let (system_id, seg) = *expect;
    let name = key.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut sink = Sink {
            first: Vec::with_capacity(SIZE_OF_XLOG_LONG_PHD),
        };
        let mut counted = Counted {
            inner: reader,
            n: 0,
            meter,
        };
        let summary = codec.decode(&name, &mut counted, &mut sink);
        (summary, sink.first, counted.n)
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Internal, format!("decoder thread failed: {e}")))?;
    let (summary, first, stored) = outcome;
    let summary = match summary {
        Ok(s) => s,
        Err(e) => {
            if let CodecError::Read(io) = &e
                && !looks_like_corruption(io)
            {
                return Err(Error::from(e).context(format!("reading {key} in {store}")));
            }
            let kind = match &e {
                CodecError::WrongKey { .. }
                | CodecError::KeyMissing { .. }
                | CodecError::Unencrypted => ProblemKind::WrongKey,
                _ => ProblemKind::Corrupt,
            };
            return Ok(Read {
                key,
                stored,
                problem: Some((kind, Error::from(e).to_string())),
            });
        }
    };
    let problem = match subject {
        Subject::Wal(name) => check_wal(&name, &first, summary.plaintext_len, system_id, seg),
        Subject::Backup(backup) => {
            let (id, entry) = *backup;
            if summary.plaintext_len != entry.plaintext_len
                || summary.plaintext_crc != entry.plaintext_crc32
            {
                Some((
                    ProblemKind::Corrupt,
                    format!(
                        "decodes to {} bytes with CRC-32 {:08x}; backup {id}'s catalog record \
                         says {} bytes with CRC-32 {:08x}",
                        summary.plaintext_len,
                        summary.plaintext_crc,
                        entry.plaintext_len,
                        entry.plaintext_crc32
                    ),
                ))
            } else if info.size != entry.stored_len {
                Some((
                    ProblemKind::Corrupt,
                    format!(
                        "stored as {} bytes; backup {id}'s catalog record says {}",
                        info.size, entry.stored_len
                    ),
                ))
            } else {
                None
            }
        }
    };
    Ok(Read {
        key,
        stored,
        problem,
    })
}

/// An I/O error while reading a stored object: a store failure (reported as an error) unless
/// it is the store's way of saying the bytes are short.
fn looks_like_corruption(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::UnexpectedEof
}

/// The checks of a decoded WAL file against its name and the repository.
fn check_wal(
    name: &WalFileName,
    first: &[u8],
    len: u64,
    system_id: u64,
    seg: WalSegmentSize,
) -> Option<(ProblemKind, String)> {
    match name.kind() {
        WalFileKind::Segment | WalFileKind::Partial => {
            let expect = SegmentExpectations {
                name: name.clone(),
                system_id: None,
                seg_size: Some(seg),
            };
            let header = match check_segment_header(first, &expect) {
                Ok(h) => h,
                Err(e) => return Some((ProblemKind::Corrupt, e.to_string())),
            };
            if header.system_id != system_id {
                return Some((
                    ProblemKind::WrongCluster,
                    format!(
                        "a segment of the cluster with system identifier {}; this repository \
                         holds cluster {system_id}",
                        header.system_id
                    ),
                ));
            }
            if name.is_segment() && len != u64::from(seg.bytes()) {
                return Some((
                    ProblemKind::Corrupt,
                    format!("{len} bytes, a segment has {}", seg.bytes()),
                ));
            }
            None
        }
        WalFileKind::History => TimelineHistory::parse(name.timeline(), first)
            .err()
            .map(|e| (ProblemKind::Corrupt, e.to_string())),
        _ => None,
    }
}

/// Collects the first bytes of a decoded object (a segment's page header, or a whole history
/// file) and drops the rest.
struct Sink {
    first: Vec<u8>,
}

/// History files are read whole; a segment's header is the first 40 bytes.
const FIRST_BYTES: usize = 64 * 1024;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = FIRST_BYTES.saturating_sub(self.first.len()).min(buf.len());
        self.first.extend_from_slice(&buf[..room]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Counts the stored bytes read, for the report and the progress line.
struct Counted<R> {
    inner: R,
    n: u64,
    meter: Arc<Mutex<Meter>>,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        if let Ok(mut m) = self.meter.lock() {
            m.add(n as u64);
        }
        Ok(n)
    }
}

/// A WAL key of this layout: `wal/TTTTTTTT/LLLLLLLL/NAME` or `wal/history/NAME`, with the
/// directories matching the name.
fn parse_wal_key(key: &str) -> Option<WalFileName> {
    let name = WalFileName::parse(key.rsplit('/').next()?).ok()?;
    (wal_key(&name) == key).then_some(name)
}

/// The backup ID a `backup/ID/...` key belongs to.
fn backup_id_of(key: &str) -> Option<&str> {
    key.strip_prefix("backup/")?.split('/').next()
}

/// The segments a backup needs from its start to its stop, each as the names that can serve
/// it (the one PostgreSQL asks for first, then the one of the backup's own timeline there).
fn backup_wal(
    r: &BackupRecord,
    path: &TimelineHistory,
    seg: WalSegmentSize,
) -> Vec<Vec<WalFileName>> {
    let first = r.start_lsn.segment(seg).0;
    let last = r.stop_lsn.segment(seg).0;
    (first..=last)
        .map(|s| serving(path, SegmentNo(s), seg))
        .collect()
}

/// The names that can serve segment `s` along `path`: the newest timeline of the path that
/// began at or before the segment (what PostgreSQL reads first), then the timeline that holds
/// the segment's first byte.
fn serving(path: &TimelineHistory, s: SegmentNo, seg: WalSegmentSize) -> Vec<WalFileName> {
    let start = s.start_lsn(seg);
    let end = Lsn(start.0 + u64::from(seg.bytes()) - 1);
    let newest = path.timeline_at(end);
    let holder = path.timeline_at(start);
    let mut out = vec![WalFileName::segment(newest, s, seg)];
    if holder != newest {
        out.push(WalFileName::segment(holder, s, seg));
    }
    out
}

/// A run of segments missing or unreadable inside the window, and what it costs.
pub(crate) struct Gap {
    pub(crate) keys: Vec<String>,
    pub(crate) consequence: String,
}

/// The continuity pass over the restorable window: along the newest timeline's history, from
/// the oldest backup on it to the newest segment stored on it, every segment must be there.
pub(crate) fn window_pass(
    records: &[BackupRecord],
    histories: &BTreeMap<TimelineId, TimelineHistory>,
    wal: &StoredWal,
    present: &dyn Fn(&WalFileName) -> bool,
    seg: WalSegmentSize,
) -> Option<(WindowReport, Vec<Gap>)> {
    let newest_tli = histories
        .keys()
        .copied()
        .chain(records.iter().map(|r| TimelineId(r.stop_timeline)))
        .max()?;
    let path = histories
        .get(&newest_tli)
        .cloned()
        .unwrap_or_else(|| TimelineHistory::root(newest_tli));
    let on_path: Vec<&BackupRecord> = records
        .iter()
        .filter(|r| {
            path.reaches(TimelineId(r.start_timeline), r.start_lsn)
                && path.reaches(TimelineId(r.stop_timeline), r.stop_lsn)
        })
        .collect();
    let oldest = on_path.iter().min_by_key(|r| r.start_lsn)?;
    // The newest segment stored along the path.
    let last = wal
        .segments
        .iter()
        .filter_map(|s| {
            let n = segno_of(s.num, seg)?;
            path.reaches(TimelineId(s.tli), n.start_lsn(seg))
                .then_some(n.0)
        })
        .max()?;
    let first = oldest.start_lsn.segment(seg).0;
    if last < first {
        return None;
    }
    let mut gaps = Vec::new();
    let mut run: Vec<(u64, String)> = Vec::new();
    let flush = |run: &mut Vec<(u64, String)>, gaps: &mut Vec<Gap>| {
        let (Some((lo, _)), Some((hi, _))) = (run.first(), run.last()) else {
            return;
        };
        let before = SegmentNo(*lo).start_lsn(seg);
        let after = SegmentNo(hi + 1).start_lsn(seg);
        let t1 = wal
            .segment(&serving(&path, SegmentNo(lo.saturating_sub(1)), seg)[0])
            .and_then(|s| s.modified)
            .map(catalog::format_time);
        let from = on_path
            .iter()
            .filter(|r| r.stop_lsn < before)
            .map(|r| r.stop_time.clone())
            .max();
        let t1 = t1
            .or(from)
            .unwrap_or_else(|| "the start of the window".into());
        let next = on_path
            .iter()
            .filter(|r| r.start_lsn >= after)
            .min_by_key(|r| r.start_lsn);
        let consequence = match next {
            Some(b) => format!(
                "no point-in-time recovery between {t1} and {} (backup {} finishes after the \
                 gap; recovery from an older backup stops at WAL position {before})",
                b.stop_time, b.id
            ),
            None => format!(
                "no point-in-time recovery after {t1}: recovery stops at WAL position {before}, \
                 and no backup was taken after the gap"
            ),
        };
        gaps.push(Gap {
            keys: run.drain(..).map(|(_, k)| k).collect(),
            consequence,
        });
    };
    for s in first..=last {
        let choices = serving(&path, SegmentNo(s), seg);
        if choices.iter().any(present) {
            flush(&mut run, &mut gaps);
        } else {
            run.push((s, wal_key(&choices[0])));
        }
    }
    flush(&mut run, &mut gaps);
    Some((
        WindowReport {
            timeline: newest_tli.0,
            from_backup: oldest.id.clone(),
            first_segment: WalFileName::segment(
                path.timeline_at(SegmentNo(first).start_lsn(seg)),
                SegmentNo(first),
                seg,
            )
            .to_string(),
            last_segment: WalFileName::segment(
                path.timeline_at(SegmentNo(last).start_lsn(seg)),
                SegmentNo(last),
                seg,
            )
            .to_string(),
            segments: last - first + 1,
        },
        gaps,
    ))
}

/// Problems for WAL that something needs and that is not stored at all (unreadable ones were
/// reported by the read pass and took their consequences there). A run of consecutive
/// segments with the same consequences is one gap problem.
fn missing_wal(consequences: BTreeMap<String, Vec<String>>) -> Vec<Problem> {
    let mut out: Vec<Problem> = Vec::new();
    for (key, cs) in consequences {
        // A segment a backup needs is missing; one only the window needs is a gap in it.
        let kind = if cs.iter().any(|c| c.starts_with("backup ")) {
            ProblemKind::Missing
        } else {
            ProblemKind::Gap
        };
        if let Some(prev) = out.last_mut()
            && prev.kind == kind
            && prev.consequences == cs
            && adjacent(&prev.detail, &key)
        {
            prev.detail = extend_run(&prev.detail, &key);
            continue;
        }
        out.push(Problem {
            detail: format!("not stored: {}", key.rsplit('/').next().unwrap_or(&key)),
            key,
            kind,
            consequences: cs,
        });
    }
    out
}

/// Whether `key`'s segment follows the last segment named in a run's detail.
fn adjacent(detail: &str, key: &str) -> bool {
    let last = detail.rsplit([' ', '.']).next().unwrap_or("");
    let (Ok(a), Some(b)) = (
        WalFileName::parse(last),
        key.rsplit('/')
            .next()
            .and_then(|n| WalFileName::parse(n).ok()),
    ) else {
        return false;
    };
    a.timeline() == b.timeline()
        && a.is_segment()
        && b.is_segment()
        && (u64::from(b.log_id()) << 32 | u64::from(b.seg_id()))
            == (u64::from(a.log_id()) << 32 | u64::from(a.seg_id())) + 1
}

fn extend_run(detail: &str, key: &str) -> String {
    let first = detail
        .strip_prefix("not stored: ")
        .unwrap_or(detail)
        .split(' ')
        .next()
        .unwrap_or("");
    let first = first.split("..").next().unwrap_or(first);
    format!(
        "not stored: {first}..{}",
        key.rsplit('/').next().unwrap_or(key)
    )
}

/// Objects under `backup/` that no record refers to: leftovers of takes that never finished
/// (older than a running take's sign of life), and keys a recorded backup does not list.
fn unreferenced_backup_objects(
    stored: &[ObjectInfo],
    records: &[BackupRecord],
    unreadable: &[String],
    now: SystemTime,
) -> Vec<Problem> {
    let listed: BTreeSet<&str> = records
        .iter()
        .flat_map(|r| r.objects.iter().map(|o| o.key.as_str()))
        .collect();
    let recorded: BTreeSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let mut newest: BTreeMap<&str, SystemTime> = BTreeMap::new();
    for o in stored {
        if let Some(id) = backup_id_of(&o.key) {
            let t = newest.entry(id).or_insert(o.modified);
            *t = (*t).max(o.modified);
        }
    }
    let mut out = Vec::new();
    for o in stored {
        let Some(id) = backup_id_of(&o.key) else {
            continue;
        };
        if listed.contains(o.key.as_str()) || unreadable.iter().any(|u| u == id) {
            continue;
        }
        let recent = newest
            .get(id)
            .is_some_and(|t| now.duration_since(*t).unwrap_or_default() < RUNNING_TAKE);
        if !recorded.contains(id) && recent {
            continue; // a take still running
        }
        if recorded.contains(id) && o.key.contains("/heartbeat/") {
            continue; // a finished take deletes its beats right after its record
        }
        let detail = if recorded.contains(id) {
            format!("backup {id}'s catalog record does not list it")
        } else {
            format!(
                "backup {id} has no catalog record: the leftovers of a take that never finished"
            )
        };
        out.push(Problem {
            key: o.key.clone(),
            kind: ProblemKind::Unreferenced,
            detail,
            consequences: vec![
                "no restore reads it; it only takes space (walcore expire sweeps the leftovers \
                 of takes that never finished)"
                    .into(),
            ],
        });
    }
    out
}

/// The newest ledger, or nothing verified when there is none. An unreadable ledger costs
/// reads, never a wrong answer: everything is read again.
async fn read_ledger(repo: &Repository) -> Result<Verified, Error> {
    let keys = listing(repo, LEDGER_PREFIX, |s| s.list(LEDGER_PREFIX)).await?;
    let Some(newest) = keys.iter().filter(|k| is_ledger_key(k)).max() else {
        return Ok(Verified::default());
    };
    let ledger: Ledger = match repo.get_small(newest).await {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("verify ledger {newest} is not readable ({e}): reading everything");
                return Ok(Verified::default());
            }
        },
        Err(e) if e.kind() == ErrorKind::Transient => return Err(e),
        Err(e) => {
            tracing::warn!("verify ledger {newest} is not readable ({e:#}): reading everything");
            return Ok(Verified::default());
        }
    };
    let Ok(through) = chrono::DateTime::parse_from_rfc3339(&ledger.listed_through) else {
        return Ok(Verified::default());
    };
    let keys: BTreeSet<String> = ledger.keys.into_iter().collect();
    let mut segments = std::collections::HashSet::new();
    for (tli, runs) in ledger.segments {
        let Ok(tli) = u32::from_str_radix(&tli, 16) else {
            continue;
        };
        for (lo, hi) in runs {
            // A run longer than any archive is not believed.
            segments.extend((lo..=hi.min(lo.saturating_add(1 << 28))).map(|s| (tli, s)));
        }
    }
    let recent = ledger
        .recent
        .into_iter()
        .map(|r| (r.key, (r.modified, r.etag)))
        .collect();
    Ok(Verified {
        through: Some(SystemTime::from(through)),
        recent,
        keys,
        segments,
    })
}

/// What a run puts in its ledger.
struct Written {
    /// WAL segments verified, per timeline: runs of numbers.
    segments: BTreeMap<u32, Vec<(u64, u64)>>,
    keys: Vec<String>,
    recent: Vec<RecentEntry>,
    result: LastVerify,
}

/// Ledger names: `verify/YYYYMMDDTHHMMSS.mmmZ-XXXXXXXX`, like pin events.
fn is_ledger_key(key: &str) -> bool {
    super::index::is_timed_name(LEDGER_PREFIX, key)
}

/// Writes the ledger of everything verified so far; the older ledgers go. Best effort: a
/// ledger that cannot be written costs the next run its reads, nothing else.
async fn write_ledger(
    repo: &Repository,
    written: Written,
    through: Option<SystemTime>,
) -> Option<String> {
    let through = through?;
    let ledger = Ledger {
        format_version: 1,
        listed_through: nanos(through),
        keys: written.keys,
        segments: written
            .segments
            .into_iter()
            .map(|(t, r)| (format!("{t:08X}"), r))
            .collect(),
        recent: written.recent,
        result: Some(written.result),
        time: catalog::format_time(SystemTime::now()),
        created_by: format!("walcore {}", env!("CARGO_PKG_VERSION")),
    };
    let old = listing(repo, LEDGER_PREFIX, |s| s.list(LEDGER_PREFIX))
        .await
        .ok()?;
    let key = super::index::next_name(LEDGER_PREFIX, &old, SystemTime::now());
    let body = serde_json::to_vec(&ledger).ok()?;
    match repo.put_small(&key, body).await {
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(
                "could not record what was verified in {key} ({e:#}): the next run reads it all again"
            );
            return None;
        }
    }
    let stale: Vec<String> = old.into_iter().filter(|k| is_ledger_key(k)).collect();
    if let Err(e) = repo.store().delete_many(&stale).await {
        tracing::warn!("could not delete older verify ledgers ({e}); they are ignored");
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(key: &str, at: SystemTime, etag: &str) -> ObjectInfo {
        ObjectInfo {
            key: key.into(),
            size: 10,
            modified: at,
            etag: Some(etag.into()),
        }
    }

    /// A store that keeps times to the second: an object rewritten in the second of the
    /// listing has the time it had, and only its tag tells it apart.
    #[test]
    fn an_object_rewritten_in_the_second_of_the_listing_is_read_again() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let old = "wal/00000001/00000000/000000010000000000000001";
        let new = "wal/00000001/00000000/000000010000000000000009";
        let mut ledger = Verified {
            through: Some(t),
            ..Verified::default()
        };
        ledger.segments.insert((1, 1));
        ledger.segments.insert((1, 9));
        ledger
            .recent
            .insert(new.into(), (nanos(t), Some("\"a\"".into())));
        let ten_before = t - Duration::from_secs(10);
        assert!(
            ledger.covers(&object(old, ten_before, "\"x\"")),
            "old, unchanged"
        );
        assert!(
            ledger.covers(&object(new, t, "\"a\"")),
            "recent, same time and tag"
        );
        assert!(
            !ledger.covers(&object(new, t, "\"b\"")),
            "recent, rewritten: another tag"
        );
        assert!(
            !ledger.covers(&object(old, t, "\"x\"")),
            "old key, rewritten after the listing: a later time"
        );
        let unknown = "wal/00000001/00000000/00000001000000000000000A";
        assert!(
            !ledger.covers(&object(unknown, ten_before, "\"x\"")),
            "never verified"
        );
        assert!(!Verified::default().covers(&object(old, ten_before, "\"x\"")));
    }

    #[test]
    fn missing_segments_in_a_row_are_one_problem() {
        let cs = |c: &str| vec![c.to_string()];
        let mut missing = BTreeMap::new();
        for s in ["05", "06", "07"] {
            missing.insert(
                format!("wal/00000001/00000000/0000000100000000000000{s}"),
                cs("no point-in-time recovery after T"),
            );
        }
        missing.insert(
            "wal/00000001/00000000/000000010000000000000009".into(),
            cs("backup B can no longer be restored"),
        );
        let problems = missing_wal(missing);
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert_eq!(problems[0].kind, ProblemKind::Gap);
        assert_eq!(
            problems[0].detail,
            "not stored: 000000010000000000000005..000000010000000000000007"
        );
        assert_eq!(problems[1].kind, ProblemKind::Missing);
    }
}
