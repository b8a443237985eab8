//! The repository index (FORMAT.md §6.5): a cache of the catalog records and pin states, so
//! that `list`, `show`, restore plans, `expire` and `verify` read one object and list the
//! catalog instead of reading every record (ten thousand backups were ten thousand requests).
//!
//! It is never the only truth. Every use lists `catalog/` and `pins/` (a request per thousand
//! keys) and trusts a cached record only while the listing shows its object with the size and
//! time it had when it was cached; anything else is read again. A missing, stale, unreadable or
//! half-written index costs those reads, never a wrong answer. Index objects are written
//! create-only under new names (`index/TIME-RANDOM`), the newest wins, older ones are deleted
//! after a new one is written: it fits storage where nothing is ever overwritten, and a writer
//! killed at any point leaves either the old index or the new one, both valid caches.

use std::collections::BTreeMap;
use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::backup::catalog::{self, BackupRecord, Entry, Listing, Tombstone};
use crate::backup::pins::{self, PinState};
use crate::error::{Error, ErrorKind};
use crate::repo::Repository;
use crate::store::ObjectInfo;

/// Where index objects live.
pub const INDEX_PREFIX: &str = "index/";
/// Records read at once when the index does not have them.
const READS_IN_FLIGHT: usize = 16;

/// One index object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub format_version: u32,
    /// When it was written.
    #[serde(default)]
    pub time: String,
    #[serde(default)]
    pub created_by: String,
    /// Catalog entries by backup ID, each with the size and time its `catalog/ID` object had.
    #[serde(default)]
    pub catalog: BTreeMap<String, CachedEntry>,
    /// Pin states by backup ID, each with the name of the newest event it was read from.
    #[serde(default)]
    pub pins: BTreeMap<String, CachedPin>,
    /// The WAL directories `wal/TTTTTTTT/LLLLLLLL/`, by timeline then log directory, each as
    /// its last listing showed it.
    #[serde(default)]
    pub wal: BTreeMap<String, BTreeMap<String, WalDir>>,
}

/// What one WAL directory `wal/T/L/` held when it was last listed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WalDir {
    /// The segments, as inclusive runs of the last eight hexadecimal digits of their names.
    pub segments: Vec<(u32, u32)>,
    /// The stored size of each segment, in the order of `segments`.
    pub sizes: Vec<u64>,
    /// Every other object of the directory (`.partial`, `.backup`, anything else): name, size.
    pub others: Vec<(String, u64)>,
}

/// A WAL object as the index knows it: its key and stored size.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct WalObject {
    pub key: String,
    pub size: u64,
}

impl WalDir {
    /// Summarises the listing of `wal/tli/log/`.
    fn from_listing<'a>(
        tli: &str,
        log: &str,
        objects: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> WalDir {
        let mut dir = WalDir::default();
        for (key, size) in objects {
            let name = key.rsplit('/').next().unwrap_or(key);
            let seg = (name.len() == 24
                && name.starts_with(tli)
                && name[8..16] == *log
                && name
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c)))
            .then(|| u32::from_str_radix(&name[16..], 16).ok())
            .flatten();
            match seg {
                Some(s) => dir.push_segment(s, size),
                None => dir.others.push((name.to_owned(), size)),
            }
        }
        dir
    }

    /// Adds a segment by the last eight hexadecimal digits of its name, with its stored size;
    /// segments come in the order of their names.
    pub fn push_segment(&mut self, s: u32, size: u64) {
        match self.segments.last_mut() {
            Some(run) if run.1.checked_add(1) == Some(s) => run.1 = s,
            _ => self.segments.push((s, s)),
        }
        self.sizes.push(size);
    }

    /// The directory's objects, sorted by key.
    fn objects(&self, tli: &str, log: &str, out: &mut Vec<WalObject>) {
        let mut sizes = self.sizes.iter();
        let start = out.len();
        for &(lo, hi) in &self.segments {
            for s in lo..=hi {
                out.push(WalObject {
                    key: format!("wal/{tli}/{log}/{tli}{log}{s:08X}"),
                    size: sizes.next().copied().unwrap_or(0),
                });
            }
        }
        for (name, size) in &self.others {
            out.push(WalObject {
                key: format!("wal/{tli}/{log}/{name}"),
                size: *size,
            });
        }
        out[start..].sort();
    }
}

/// A catalog record or tombstone as the index keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedEntry {
    /// The stored size of `catalog/ID`.
    pub size: u64,
    /// Its time as the store listed it (RFC 3339, nanoseconds).
    pub modified: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<BackupRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tombstone: Option<Tombstone>,
}

/// A pin state as the index keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedPin {
    /// The newest event's name under `pins/ID/`.
    pub event: String,
    pub state: PinState,
}

fn stamp(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// Index object names: `index/YYYYMMDDTHHMMSS.mmmZ-XXXXXXXX`; they sort by time.
fn is_index_key(key: &str) -> bool {
    key.strip_prefix(INDEX_PREFIX).is_some_and(|n| {
        n.len() == 29 && n.as_bytes()[8] == b'T' && n[21..].bytes().all(|c| c.is_ascii_hexdigit())
    })
}

/// Whether `key` is a name [`next_name`] makes under `prefix`.
pub(crate) fn is_timed_name(prefix: &str, key: &str) -> bool {
    key.strip_prefix(prefix)
        .is_some_and(|n| n.len() == 29 && n.as_bytes()[8] == b'T')
}

/// A new name `PREFIX` + `YYYYMMDDTHHMMSS.mmmZ-XXXXXXXX` that sorts after every name in `old`
/// (the newest wins by name): the later of `now` and one millisecond after the newest old
/// name's time, then random digits. Two objects written in the same millisecond must not
/// let the older win.
pub(crate) fn next_name(prefix: &str, old: &[String], now: SystemTime) -> String {
    const FORMAT: &str = "%Y%m%dT%H%M%S%.3fZ";
    let mut t: DateTime<Utc> = now.into();
    t = DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t);
    let newest = old
        .iter()
        .filter_map(|k| k.strip_prefix(prefix)?.get(..20))
        .filter_map(|time| chrono::NaiveDateTime::parse_from_str(time, FORMAT).ok())
        .max();
    if let Some(newest) = newest
        && t.naive_utc() <= newest
    {
        t = newest.and_utc() + chrono::Duration::milliseconds(1);
    }
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    format!("{prefix}{}-{}", t.format(FORMAT), hex::encode(r))
}

/// The index objects stored, oldest first.
async fn index_keys(repo: &Repository) -> Result<Vec<String>, Error> {
    let keys = crate::backup::plan::listing(repo, INDEX_PREFIX, |s| s.list(INDEX_PREFIX)).await?;
    let mut keys: Vec<String> = keys.into_iter().filter(|k| is_index_key(k)).collect();
    keys.sort();
    Ok(keys)
}

/// The newest readable index and the keys of all stored ones; an empty index when there is
/// none or the newest cannot be read (a cache: reading the objects again is always right).
async fn read_newest(repo: &Repository) -> Result<(Index, Vec<String>), Error> {
    let keys = index_keys(repo).await?;
    let Some(newest) = keys.last() else {
        return Ok((Index::default(), keys));
    };
    match repo.get_small(newest).await {
        Ok(bytes) => match serde_json::from_slice::<Index>(&bytes) {
            Ok(index) if index.format_version == 1 => Ok((index, keys)),
            Ok(index) => {
                tracing::debug!(
                    "index {newest} has format version {}: not used",
                    index.format_version
                );
                Ok((Index::default(), keys))
            }
            Err(e) => {
                tracing::warn!("index {newest} is not readable ({e}): reading the catalog");
                Ok((Index::default(), keys))
            }
        },
        Err(e) if e.kind() == ErrorKind::Transient => Err(e),
        Err(e) => {
            tracing::warn!("index {newest} is not readable ({e:#}): reading the catalog");
            Ok((Index::default(), keys))
        }
    }
}

/// Writes `index` as a new index object, then deletes `old` ones. Best effort: a repository
/// that may only be read (a restore with read-only credentials) keeps working without it.
async fn write(repo: &Repository, mut index: Index, old: &[String]) -> Option<String> {
    let now = SystemTime::now();
    index.format_version = 1;
    index.time = catalog::format_time(now);
    index.created_by = format!("walcore {}", env!("CARGO_PKG_VERSION"));
    let body = match serde_json::to_vec(&index) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("encoding the index: {e}");
            return None;
        }
    };
    let key = next_name(INDEX_PREFIX, old, now);
    if let Err(e) = repo.put_small(&key, body).await {
        tracing::info!(
            "the repository index could not be written ({e:#}); commands keep reading the \
             catalog in full"
        );
        return None;
    }
    let stale: Vec<String> = old.to_vec();
    if !stale.is_empty()
        && let Err(e) = repo.store().delete_many(&stale).await
    {
        tracing::debug!("deleting older index objects: {e}");
    }
    Some(key)
}

/// The catalog, through the index: lists `catalog/`, reuses each cached entry whose object
/// the listing shows unchanged, reads the others (several at a time), and writes a new index
/// when anything changed. The answer is [`catalog::scan_direct`]'s.
pub async fn catalog(repo: &Repository) -> Result<Listing, Error> {
    let meta = catalog::repository_meta(repo).await?;
    let listed = catalog_listing(repo).await?;
    let (mut index, keys) = read_newest(repo).await?;
    let (listing, changed) = refresh_catalog(repo, &meta, &mut index, &listed).await?;
    if changed {
        write(repo, index, &keys).await;
    }
    Ok(listing)
}

/// The stored `catalog/ID` objects, by ID.
async fn catalog_listing(repo: &Repository) -> Result<Vec<(String, ObjectInfo)>, Error> {
    let prefix = catalog::CATALOG_PREFIX;
    let objects = crate::backup::plan::listing(repo, prefix, |s| s.list_dir(prefix)).await?;
    let mut out: Vec<(String, ObjectInfo)> = objects
        .into_iter()
        .filter_map(|o| {
            let id = o.key.strip_prefix(prefix)?.to_owned();
            catalog::is_valid_id(&id).then_some((id, o))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

async fn refresh_catalog(
    repo: &Repository,
    meta: &crate::repo::RepoMeta,
    index: &mut Index,
    listed: &[(String, ObjectInfo)],
) -> Result<(Listing, bool), Error> {
    let mut changed = index.catalog.len() != listed.len();
    let mut cached = std::mem::take(&mut index.catalog);
    let mut fresh: BTreeMap<String, CachedEntry> = BTreeMap::new();
    let mut to_read = Vec::new();
    for (id, info) in listed {
        let modified = stamp(info.modified);
        match cached.remove(id) {
            Some(c) if c.size == info.size && c.modified == modified => {
                fresh.insert(id.clone(), c);
            }
            _ => to_read.push((id.clone(), info.size, modified)),
        }
    }
    changed |= !to_read.is_empty();
    let mut unreadable = Vec::new();
    let mut reads = futures::stream::iter(to_read)
        .map(|(id, size, modified)| async move {
            let entry = catalog::load_entry(repo, &id, meta).await;
            (id, size, modified, entry)
        })
        .buffered(READS_IN_FLIGHT);
    while let Some((id, size, modified, entry)) = reads.next().await {
        let (record, tombstone) = match entry {
            Ok(Entry::Record(r)) => (Some(r), None),
            Ok(Entry::Tombstone(t)) => (None, Some(t)),
            // Deleted between the listing and the read (a concurrent expire).
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) if e.kind() == ErrorKind::Transient => return Err(e),
            // Never cached: read (and reported) again every time.
            Err(e) => {
                unreadable.push((id, e));
                continue;
            }
        };
        fresh.insert(
            id,
            CachedEntry {
                size,
                modified,
                record,
                tombstone,
            },
        );
    }
    let mut listing = Listing {
        records: Vec::with_capacity(fresh.len()),
        unreadable: Vec::new(),
        unreadable_ids: Vec::new(),
        tombstones: Vec::new(),
    };
    for (id, entry) in &fresh {
        if let Some(r) = &entry.record {
            listing.records.push(r.clone());
        } else if entry.tombstone.is_some() {
            listing.tombstones.push(id.clone());
        }
    }
    for (id, e) in unreadable {
        listing.unreadable_ids.push(id);
        listing.unreadable.push(e);
    }
    index.catalog = fresh;
    Ok((listing, changed))
}

/// The pin state of every backup that has events, through the index: lists `pins/`, reuses
/// each cached state whose newest event is still the newest, reads the others. The answer is
/// [`pins::states_direct`]'s.
pub async fn pin_states(repo: &Repository) -> Result<BTreeMap<String, PinState>, Error> {
    let newest = pins::newest_events(repo).await?;
    let (mut index, keys) = read_newest(repo).await?;
    let mut changed = index.pins.len() != newest.len();
    let mut cached = std::mem::take(&mut index.pins);
    let mut out = BTreeMap::new();
    for (id, event) in newest {
        let state = match cached.remove(&id) {
            Some(c) if c.event == event => c.state,
            _ => {
                changed = true;
                pins::read_state(repo, &id, &event).await?
            }
        };
        index.pins.insert(
            id.clone(),
            CachedPin {
                event,
                state: state.clone(),
            },
        );
        out.insert(id, state);
    }
    if changed {
        write(repo, index, &keys).await;
    }
    Ok(out)
}

/// Every WAL object, through the index: the timelines and their log directories are listed
/// (a request per thousand directories), and only the directories the index does not hold,
/// and the two newest of each timeline (where archiving writes, in any order), are listed
/// again; `wal/history/` is listed in full. Directories that are gone are dropped. Changes the
/// index cannot see are those inside older directories made behind walcore's back (walcore's
/// own deletions update it; `verify` and `reindex` list everything and re-anchor it).
pub async fn wal_objects(repo: &Repository) -> Result<Vec<WalObject>, Error> {
    let (wal, history) = wal_summary(repo).await?;
    let mut out = Vec::new();
    for (tli, dirs) in &wal {
        for (log, dir) in dirs {
            dir.objects(tli, log, &mut out);
        }
    }
    out.extend(history.into_iter().map(|o| WalObject {
        key: o.key,
        size: o.size,
    }));
    out.sort();
    Ok(out)
}

/// The WAL as [`wal_objects`] sees it, as the index summarises it (by timeline and log
/// directory, segments as runs) and without a key per object, and the objects of
/// `wal/history/`.
pub async fn wal_summary(repo: &Repository) -> Result<(WalDirs, Vec<ObjectInfo>), Error> {
    let (mut index, keys) = read_newest(repo).await?;
    let changed = refresh_wal(repo, &mut index).await?;
    let history =
        crate::backup::plan::listing(repo, "wal/history/", |s| s.list_dir("wal/history/")).await?;
    let wal = if changed {
        let wal = index.wal.clone();
        write(repo, index, &keys).await;
        wal
    } else {
        index.wal
    };
    Ok((wal, history))
}

/// The index's WAL part: [`WalDir`]s by timeline, then log directory (8 hex digits each).
pub type WalDirs = BTreeMap<String, BTreeMap<String, WalDir>>;

/// Timeline directory names: eight upper-case hexadecimal digits.
pub(crate) fn is_hex8(name: &str) -> bool {
    name.len() == 8
        && name
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c))
}

/// Brings the index's WAL part up to the store; whether anything changed.
async fn refresh_wal(repo: &Repository, index: &mut Index) -> Result<bool, Error> {
    use crate::backup::plan::listing;
    let timelines = listing(repo, "wal/", |s| s.child_dirs("wal/")).await?;
    let timelines: Vec<String> = timelines.into_iter().filter(|t| is_hex8(t)).collect();
    let mut changed = false;
    let before = index.wal.len();
    index.wal.retain(|t, _| timelines.contains(t));
    changed |= index.wal.len() != before;
    for tli in timelines {
        let prefix = format!("wal/{tli}/");
        let logs = listing(repo, &prefix, |s| s.child_dirs(&prefix)).await?;
        let logs: Vec<String> = logs.into_iter().filter(|l| is_hex8(l)).collect();
        let known = index.wal.entry(tli.clone()).or_default();
        let before = known.len();
        known.retain(|l, _| logs.contains(l));
        changed |= known.len() != before;
        let newest: Vec<&String> = logs.iter().rev().take(2).collect();
        let stale: Vec<String> = logs
            .iter()
            .filter(|l| !known.contains_key(*l) || newest.contains(l))
            .cloned()
            .collect();
        let listed = futures::stream::iter(stale)
            .map(|log| {
                let prefix = format!("wal/{tli}/{log}/");
                async move {
                    let objects = listing(repo, &prefix, |s| s.list_dir(&prefix)).await?;
                    Ok::<_, Error>((log, objects))
                }
            })
            .buffered(READS_IN_FLIGHT)
            .collect::<Vec<_>>()
            .await;
        for result in listed {
            let (log, objects) = result?;
            let dir =
                WalDir::from_listing(&tli, &log, objects.iter().map(|o| (o.key.as_str(), o.size)));
            if known.get(&log) != Some(&dir) {
                changed = true;
                known.insert(log, dir);
            }
        }
    }
    Ok(changed)
}

/// Replaces the index's WAL part with what a full listing of `wal/` showed, summarised by
/// directory (`verify` lists everything anyway): changes made behind walcore's back in older
/// directories, which the index cannot see by itself, are in it from then on. Best effort.
pub async fn anchor_wal(repo: &Repository, wal: WalDirs) {
    let Ok((mut index, keys)) = read_newest(repo).await else {
        return;
    };
    if wal != index.wal {
        index.wal = wal;
        write(repo, index, &keys).await;
    }
}

/// Removes `deleted` WAL keys from the index after walcore deleted them (expire), so the
/// index never shows what walcore itself removed. Best effort, like every index write.
pub async fn forget_wal(repo: &Repository, deleted: &[String]) {
    if deleted.is_empty() {
        return;
    }
    let Ok((mut index, keys)) = read_newest(repo).await else {
        return;
    };
    let mut by_dir: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for key in deleted {
        let mut parts = key.split('/');
        if let (Some("wal"), Some(tli), Some(log), Some(name), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            by_dir.entry((tli, log)).or_default().push(name);
        }
    }
    let mut changed = false;
    for ((tli, log), names) in by_dir {
        let Some(dirs) = index.wal.get_mut(tli) else {
            continue;
        };
        let Some(dir) = dirs.get(log) else {
            continue;
        };
        let mut objects = Vec::new();
        dir.objects(tli, log, &mut objects);
        let gone: std::collections::BTreeSet<&str> = names.into_iter().collect();
        let left: Vec<&WalObject> = objects
            .iter()
            .filter(|o| !gone.contains(o.key.rsplit('/').next().unwrap_or("")))
            .collect();
        changed = true;
        if left.is_empty() {
            dirs.remove(log);
        } else {
            let dir = WalDir::from_listing(tli, log, left.iter().map(|o| (o.key.as_str(), o.size)));
            dirs.insert(log.to_owned(), dir);
        }
    }
    if changed {
        write(repo, index, &keys).await;
    }
}

/// What `walcore reindex` did.
#[derive(Debug, Clone, Serialize)]
pub struct Reindexed {
    pub key: Option<String>,
    pub records: usize,
    pub tombstones: usize,
    pub unreadable: usize,
    pub pins: usize,
    pub wal_dirs: usize,
    pub removed: usize,
}

/// `walcore reindex`: builds the index from the objects alone (every record and newest pin
/// event read), writes it, and deletes every older index object.
pub async fn reindex(repo: &Repository) -> Result<Reindexed, Error> {
    let meta = catalog::repository_meta(repo).await?;
    let listed = catalog_listing(repo).await?;
    let old = index_keys(repo).await?;
    let mut index = Index::default();
    let (listing, _) = refresh_catalog(repo, &meta, &mut index, &listed).await?;
    for (id, event) in pins::newest_events(repo).await? {
        let state = pins::read_state(repo, &id, &event).await?;
        index.pins.insert(id, CachedPin { event, state });
    }
    let pins = index.pins.len();
    refresh_wal(repo, &mut index).await?;
    let wal_dirs = index.wal.values().map(BTreeMap::len).sum();
    let key = write(repo, index, &old).await;
    if key.is_none() {
        return Err(Error::new(
            ErrorKind::Storage,
            format!(
                "the index could not be written to {} (see the log)",
                repo.store().describe()
            ),
        ));
    }
    Ok(Reindexed {
        key,
        records: listing.records.len(),
        tombstones: listing.tombstones.len(),
        unreadable: listing.unreadable.len(),
        pins,
        wal_dirs,
        removed: old.len(),
    })
}

#[cfg(test)]
mod tests;
