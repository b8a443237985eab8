//! The backup catalog (FORMAT.md §6): one record per complete base backup, written last.

use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind};
use crate::pg::Lsn;
use crate::repo::{RepoMeta, Repository};
use crate::store::META_KEY;

/// Where catalog records live.
pub const CATALOG_PREFIX: &str = "catalog/";

/// The key of a backup's catalog record.
pub fn catalog_key(id: &str) -> String {
    format!("{CATALOG_PREFIX}{id}")
}

/// The key of one archive (`base.tar`, `OID.tar`) of a backup.
pub fn archive_key(id: &str, archive: &str) -> String {
    format!("backup/{id}/data/{archive}")
}

/// The key of a backup's manifest.
pub fn manifest_key(id: &str) -> String {
    format!("backup/{id}/backup_manifest")
}

/// A new backup ID for a backup started at `at`: `YYYYMMDDTHHMMSSZ-XXXX`.
pub fn new_id(at: SystemTime) -> String {
    let mut r = [0u8; 2];
    // Uniqueness within one second is all the random part is for; a failed read still
    // leaves a valid (if less unique) ID, and the create-only catalog write catches a clash.
    let _ = getrandom::fill(&mut r);
    let t: DateTime<Utc> = at.into();
    format!("{}-{}", t.format("%Y%m%dT%H%M%SZ"), hex::encode(r))
}

/// Whether `text` has the shape of a backup ID (so that `show ../x` is refused before any key
/// is built from it).
pub fn is_valid_id(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 21
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'T'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && b[15] == b'Z'
        && b[16] == b'-'
        && b[17..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// A time as the catalog writes it: RFC 3339, UTC, milliseconds.
pub fn format_time(t: SystemTime) -> String {
    let t: DateTime<Utc> = t.into();
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// One tablespace of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablespaceEntry {
    pub oid: u32,
    /// Its directory on the server the backup was taken from.
    pub location: String,
    /// Its archive's name (`OID.tar`).
    pub archive: String,
}

/// What an object of a backup holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    Archive,
    Manifest,
}

/// One stored object of a backup, as its trailer describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectEntry {
    pub key: String,
    pub kind: ObjectKind,
    /// `base.tar`, `OID.tar` or `backup_manifest`.
    pub name: String,
    pub plaintext_len: u64,
    pub plaintext_crc32: u32,
    pub stored_len: u64,
}

/// The catalog record of one complete base backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    pub format_version: u32,
    pub id: String,
    pub label: String,
    /// Decimal, as in the repository metadata.
    pub system_identifier: String,
    pub pg_version_num: u32,
    pub wal_segment_size: u32,
    pub start_lsn: Lsn,
    pub start_timeline: u32,
    pub stop_lsn: Lsn,
    pub stop_timeline: u32,
    pub start_time: String,
    pub stop_time: String,
    pub checkpoint: String,
    pub wal_included: bool,
    pub tablespaces: Vec<TablespaceEntry>,
    pub objects: Vec<ObjectEntry>,
    pub created_by: String,
}

impl BackupRecord {
    /// Plaintext bytes of the backup's archives (the data directory's size, as tar).
    pub fn data_bytes(&self) -> u64 {
        self.objects
            .iter()
            .filter(|o| o.kind == ObjectKind::Archive)
            .map(|o| o.plaintext_len)
            .sum()
    }

    /// Bytes the backup takes in the repository.
    pub fn stored_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.stored_len).sum()
    }

    /// `stop_time`, parsed.
    pub fn stop(&self) -> Result<DateTime<Utc>, Error> {
        parse_record_time(&self.id, "stop_time", &self.stop_time)
    }

    /// `start_time`, parsed.
    pub fn start(&self) -> Result<DateTime<Utc>, Error> {
        parse_record_time(&self.id, "start_time", &self.start_time)
    }

    /// The manifest object, if the backup has one.
    pub fn manifest(&self) -> Option<&ObjectEntry> {
        self.objects.iter().find(|o| o.kind == ObjectKind::Manifest)
    }

    fn check(&self, key: &str) -> Result<(), Error> {
        let bad =
            |why: String| Error::new(ErrorKind::Integrity, format!("catalog record {key}: {why}"));
        if self.format_version != 1 {
            return Err(Error::new(
                ErrorKind::Configuration,
                format!(
                    "catalog record {key} has format version {}; this walcore reads version 1",
                    self.format_version
                ),
            ));
        }
        if catalog_key(&self.id) != key {
            return Err(bad(format!("it names backup {}", self.id)));
        }
        if !self
            .objects
            .iter()
            .any(|o| o.kind == ObjectKind::Archive && o.name == "base.tar")
        {
            return Err(bad("it lists no base.tar".into()));
        }
        for o in &self.objects {
            if !o.key.starts_with(&format!("backup/{}/", self.id)) {
                return Err(bad(format!(
                    "object {} is outside the backup's prefix",
                    o.key
                )));
            }
        }
        self.start()?;
        self.stop()?;
        Ok(())
    }
}

fn parse_record_time(id: &str, field: &str, text: &str) -> Result<DateTime<Utc>, Error> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("catalog record of backup {id}: {field} '{text}': {e}"),
            )
        })
}

/// The repository's metadata; an error when there is none: a repository that does not exist
/// (a mistyped URL, an unmounted directory) is not one with no backups.
pub(crate) async fn repository_meta(repo: &Repository) -> Result<RepoMeta, Error> {
    repo.read_meta().await?.ok_or_else(|| {
        Error::new(
            ErrorKind::Configuration,
            format!(
                "{} is not a walcore repository: it has no {META_KEY} (nothing was ever \
                 archived or backed up there); check WALCORE_REPO",
                repo.store().describe()
            ),
        )
    })
}

/// Reads and checks one catalog record; `NotFound` when the backup does not exist. A record of
/// another cluster than the repository's is refused.
pub async fn load(repo: &Repository, id: &str) -> Result<BackupRecord, Error> {
    if !is_valid_id(id) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("'{id}' is not a backup ID (they look like 20261130T043012Z-3f9a)"),
        ));
    }
    let meta = repository_meta(repo).await?;
    load_checked(repo, id, &meta).await
}

async fn load_checked(repo: &Repository, id: &str, meta: &RepoMeta) -> Result<BackupRecord, Error> {
    match load_entry(repo, id, meta).await? {
        Entry::Record(r) => Ok(r),
        Entry::Tombstone(t) => Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "no backup {id} in {}: its take never finished, and its leftovers were swept \
                 at {} (walcore list shows the complete backups)",
                repo.store().describe(),
                t.time
            ),
        )),
    }
}

/// What `catalog/ID` holds: a backup's record, or the tombstone of a take that never finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Record(BackupRecord),
    Tombstone(Tombstone),
}

/// Written at `catalog/ID` by `expire` before it deletes the leftovers of a take that never
/// wrote its record (FORMAT.md §6.2): the create-only write that wins the race against that
/// take's own record, so a take that was only stalled fails instead of recording a backup
/// whose objects are gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub format_version: u32,
    pub id: String,
    /// Why the ID is dead, in words.
    pub tombstone: String,
    pub time: String,
    pub created_by: String,
}

/// Reads `catalog/ID`: a checked record or a tombstone; `NotFound` when neither exists.
pub(crate) async fn load_entry(
    repo: &Repository,
    id: &str,
    meta: &RepoMeta,
) -> Result<Entry, Error> {
    let key = catalog_key(id);
    let bytes = repo
        .with_retry(&format!("reading {key}"), || repo.get_small(&key))
        .await
        .map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "no backup {id} in {} (walcore list shows the complete ones)",
                        repo.store().describe()
                    ),
                )
            } else {
                e
            }
        })?;
    let bad = |e: serde_json::Error| {
        Error::new(
            ErrorKind::Integrity,
            format!("catalog record {key} in {}: {e}", repo.store().describe()),
        )
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(bad)?;
    if value.get("tombstone").is_some() {
        let t: Tombstone = serde_json::from_value(value).map_err(bad)?;
        if t.id != id {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!("catalog tombstone {key}: it names backup {}", t.id),
            ));
        }
        return Ok(Entry::Tombstone(t));
    }
    let record: BackupRecord = serde_json::from_value(value).map_err(bad)?;
    record.check(&key)?;
    if record.system_identifier != meta.system_identifier {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "catalog record {key} in {} is a backup of cluster {}, but the repository \
                 belongs to cluster {}: refused",
                repo.store().describe(),
                record.system_identifier,
                meta.system_identifier
            ),
        ));
    }
    Ok(Entry::Record(record))
}

/// The catalog: the complete backups that could be read, oldest first, and an error for each
/// record that could not (named in the error).
#[derive(Debug)]
pub struct Listing {
    pub records: Vec<BackupRecord>,
    pub unreadable: Vec<Error>,
    /// The IDs of the unreadable records, in the order of `unreadable`.
    pub unreadable_ids: Vec<String>,
    /// IDs whose `catalog/ID` is a tombstone: takes that never finished.
    pub tombstones: Vec<String>,
}

/// Catalog records read at once by [`scan`].
const READS_IN_FLIGHT: usize = 16;

/// Every catalog record, through the repository index (`lifecycle::index`): the catalog is
/// listed, and only records the index does not hold as listed are read. The same answer as
/// [`scan_direct`].
pub async fn scan(repo: &Repository) -> Result<Listing, Error> {
    crate::lifecycle::index::catalog(repo).await
}

/// Reads every catalog record. A record that cannot be read or fails its checks does not hide
/// the others: it goes to [`Listing::unreadable`]. A store that stays unreachable, or a
/// repository that does not exist, is an error.
pub async fn scan_direct(repo: &Repository) -> Result<Listing, Error> {
    let meta = repository_meta(repo).await?;
    let store = repo.store().describe();
    let keys = repo
        .with_retry("listing the catalog", || async {
            repo.store()
                .list(CATALOG_PREFIX)
                .await
                .map_err(|e| e.into_error("listing", CATALOG_PREFIX, &store))
        })
        .await?;
    let mut ids: Vec<String> = keys
        .iter()
        .filter_map(|k| k.strip_prefix(CATALOG_PREFIX))
        .filter(|id| is_valid_id(id))
        .map(str::to_owned)
        .collect();
    ids.sort();
    let mut listing = Listing {
        records: Vec::with_capacity(ids.len()),
        unreadable: Vec::new(),
        unreadable_ids: Vec::new(),
        tombstones: Vec::new(),
    };
    // Several reads in flight: a thousand records are a thousand requests, and one at a time
    // they would cost a thousand round trips. `buffered` keeps the listing's order.
    let mut entries = futures::stream::iter(ids)
        .map(|id| {
            let meta = &meta;
            async move {
                let entry = load_entry(repo, &id, meta).await;
                (id, entry)
            }
        })
        .buffered(READS_IN_FLIGHT);
    while let Some((id, entry)) = entries.next().await {
        match entry {
            Ok(Entry::Record(r)) => listing.records.push(r),
            Ok(Entry::Tombstone(_)) => listing.tombstones.push(id),
            // Deleted between the listing and the read (a concurrent expire).
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            // Retries are spent: the store is down, not the record bad.
            Err(e) if e.kind() == ErrorKind::Transient => return Err(e),
            Err(e) => {
                listing.unreadable.push(e);
                listing.unreadable_ids.push(id);
            }
        }
    }
    Ok(listing)
}

/// Every complete backup that can be read, oldest first; each unreadable record is logged as a
/// warning naming it (see [`scan`]).
pub async fn list(repo: &Repository) -> Result<Vec<BackupRecord>, Error> {
    let listing = scan(repo).await?;
    for e in &listing.unreadable {
        tracing::warn!("skipping a catalog record: {e:#}");
    }
    let mut records = listing.records;
    oldest_first(&mut records);
    Ok(records)
}

/// Sorts records by when they started, to the millisecond: an ID names its second only, and
/// two takes started in the same second would otherwise follow their random suffixes.
pub fn oldest_first(records: &mut [BackupRecord]) {
    records.sort_by(|a, b| {
        let at = |r: &BackupRecord| r.start().ok();
        at(a).cmp(&at(b)).then_with(|| a.id.cmp(&b.id))
    });
}

/// Writes `record` create-only: from this moment the backup exists.
pub async fn commit(repo: &Repository, record: &BackupRecord) -> Result<(), Error> {
    let key = catalog_key(&record.id);
    let json = serde_json::to_vec_pretty(record)
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    let outcome = repo
        .with_retry(&format!("writing {key}"), || {
            repo.put_small(&key, json.clone())
        })
        .await?;
    match outcome {
        crate::store::PutOutcome::Created => Ok(()),
        crate::store::PutOutcome::AlreadyExists => {
            // A retried write whose first attempt landed reads back as our own record.
            let meta = repository_meta(repo).await?;
            match load_entry(repo, &record.id, &meta).await {
                Ok(Entry::Record(stored)) if stored == *record => Ok(()),
                Ok(Entry::Tombstone(t)) => Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "backup {} was given up as the leftovers of a take that never \
                         finished ({}, at {}): this take made no progress for longer than \
                         expire's orphan grace, and its objects are gone; it was not recorded",
                        record.id, t.tombstone, t.time
                    ),
                )),
                _ => Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "another catalog record {key} already exists in {}; this backup was \
                         not recorded",
                        repo.store().describe()
                    ),
                )),
            }
        }
    }
}

/// What [`bury`] found at `catalog/ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Burial {
    /// The tombstone was written: no take can record this ID any more.
    Buried,
    /// A tombstone was already there (an earlier sweep that did not finish).
    AlreadyBuried,
    /// A backup record is there: the take finished, nothing may be swept.
    Recorded,
}

/// Writes a tombstone at `catalog/ID`, create-only (FORMAT.md §6.2).
pub async fn bury(repo: &Repository, id: &str, why: &str) -> Result<Burial, Error> {
    let key = catalog_key(id);
    let tombstone = Tombstone {
        format_version: 1,
        id: id.to_owned(),
        tombstone: why.to_owned(),
        time: format_time(SystemTime::now()),
        created_by: format!("walcore {}", env!("CARGO_PKG_VERSION")),
    };
    let json = serde_json::to_vec_pretty(&tombstone)
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    let outcome = repo
        .with_retry(&format!("writing {key}"), || {
            repo.put_small(&key, json.clone())
        })
        .await?;
    if outcome == crate::store::PutOutcome::Created {
        return Ok(Burial::Buried);
    }
    let meta = repository_meta(repo).await?;
    match load_entry(repo, id, &meta).await {
        Ok(Entry::Tombstone(_)) => Ok(Burial::AlreadyBuried),
        Ok(Entry::Record(_)) => Ok(Burial::Recorded),
        // Something is there that is not ours to judge: treat it as a record.
        Err(e) if e.kind() != ErrorKind::Transient && e.kind() != ErrorKind::NotFound => {
            tracing::warn!("{key} is there but unreadable; its backup is left alone: {e:#}");
            Ok(Burial::Recorded)
        }
        Err(e) => Err(e),
    }
}

/// Deletes `catalog/ID` (a record: the backup leaves the catalog; a tombstone: once its ID's
/// leftovers are gone).
pub async fn remove(repo: &Repository, id: &str) -> Result<(), Error> {
    let key = catalog_key(id);
    let store = repo.store().describe();
    repo.with_retry(&format!("deleting {key}"), || async {
        repo.store()
            .delete(&key)
            .await
            .map_err(|e| e.into_error("deleting", &key, &store))
    })
    .await
}

/// The fuzz property of catalog records: any bytes are a record that passes the checks or an
/// error, never a panic; a record that passes survives a JSON round trip unchanged.
pub fn fuzz_catalog_property(data: &[u8]) -> bool {
    let Ok(record) = serde_json::from_slice::<BackupRecord>(data) else {
        return false;
    };
    if record.check(&catalog_key(&record.id)).is_err() {
        return false;
    }
    let _ = (
        record.data_bytes(),
        record.stored_bytes(),
        record.manifest(),
    );
    let again: BackupRecord =
        serde_json::from_slice(&serde_json::to_vec(&record).expect("a record serialises"))
            .expect("a serialised record parses");
    assert_eq!(again, record);
    true
}

/// A record of a small backup of cluster `system_identifier`, for tests.
#[cfg(test)]
pub(crate) fn sample_record(id: &str, system_identifier: &str) -> BackupRecord {
    BackupRecord {
        format_version: 1,
        id: id.to_owned(),
        label: "t".into(),
        system_identifier: system_identifier.into(),
        pg_version_num: 150_000,
        wal_segment_size: 16 << 20,
        start_lsn: Lsn(0x0200_0028),
        start_timeline: 1,
        stop_lsn: Lsn(0x0200_0100),
        stop_timeline: 1,
        start_time: "2026-11-30T01:00:00.000Z".into(),
        stop_time: "2026-11-30T01:00:05.000Z".into(),
        checkpoint: "fast".into(),
        wal_included: false,
        tablespaces: vec![],
        objects: vec![ObjectEntry {
            key: archive_key(id, "base.tar"),
            kind: ObjectKind::Archive,
            name: "base.tar".into(),
            plaintext_len: 0,
            plaintext_crc32: 0,
            stored_len: 0,
        }],
        created_by: "test".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_corpus() {
        for (file, data) in crate::pg::corpus::corpus_files("catalog") {
            let valid = fuzz_catalog_property(&data);
            assert_eq!(valid, file.starts_with("valid-"), "{file}");
        }
    }

    #[test]
    fn ids_sort_by_time_and_validate() {
        let a = new_id(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000));
        let b = new_id(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_001));
        assert!(a < b, "{a} < {b}");
        assert!(a.starts_with("20231114T221320Z-"), "{a}");
        assert!(is_valid_id(&a) && is_valid_id(&b));
        for bad in [
            "",
            "../catalog/x",
            "20231114T221320Z",
            "20231114T221320Z-ABCD",
            "20231114T221320Z-abcg",
            "2023111aT221320Z-abcd",
        ] {
            assert!(!is_valid_id(bad), "{bad}");
        }
    }

    mod repository {
        use std::time::Duration;

        use super::super::*;
        use crate::codec::{Codec, Compression};
        use crate::pg::WalSegmentSize;
        use crate::store::{LocalStore, Store};

        fn repo(root: &std::path::Path) -> Repository {
            Repository::new(
                Store::Local(LocalStore::new(root.to_path_buf())),
                Codec::new(Compression::None, None),
                Duration::from_millis(200),
            )
        }

        use super::super::sample_record as record;

        const A: &str = "20261130T010000Z-aaaa";
        const B: &str = "20261130T020000Z-bbbb";
        const C: &str = "20261130T030000Z-cccc";

        async fn setup(root: &std::path::Path) -> Repository {
            let r = repo(root);
            let seg = WalSegmentSize::new(16 << 20).expect("size");
            r.init_meta(RepoMeta::new(7_000_000_000_000_000_001, 15, seg))
                .await
                .expect("meta");
            r
        }

        #[tokio::test]
        async fn a_record_of_another_cluster_is_refused() {
            let dir = tempfile::tempdir().expect("tempdir");
            let r = setup(dir.path()).await;
            commit(&r, &record(A, "7000000000000000001"))
                .await
                .expect("commit");
            commit(&r, &record(B, "7000000000000000002"))
                .await
                .expect("commit");
            let e = load(&r, B).await.expect_err("another cluster's record");
            assert_eq!(e.kind(), ErrorKind::Integrity);
            assert!(
                e.to_string().contains("7000000000000000002")
                    && e.to_string().contains("catalog/20261130T020000Z-bbbb"),
                "{e}"
            );
            let listing = scan(&r).await.expect("scan");
            assert_eq!(listing.records.len(), 1);
            assert_eq!(listing.records[0].id, A);
            assert_eq!(listing.unreadable.len(), 1);
        }

        #[tokio::test]
        async fn one_unreadable_record_does_not_hide_the_others() {
            let dir = tempfile::tempdir().expect("tempdir");
            let r = setup(dir.path()).await;
            for id in [A, B, C] {
                commit(&r, &record(id, "7000000000000000001"))
                    .await
                    .expect("commit");
            }
            // B's object is garbage: not an envelope at all.
            let path = dir.path().join(catalog_key(B));
            std::fs::remove_file(&path).expect("remove");
            std::fs::write(&path, b"not a record").expect("write");
            let listing = scan(&r).await.expect("scan");
            let ids: Vec<&str> = listing.records.iter().map(|r| r.id.as_str()).collect();
            assert_eq!(ids, [A, C]);
            assert_eq!(listing.unreadable.len(), 1);
            let e = listing.unreadable[0].to_string();
            assert!(
                e.contains(&catalog_key(B)),
                "the warning does not name it: {e}"
            );
            assert_eq!(list(&r).await.expect("list").len(), 2);
        }

        #[tokio::test]
        async fn records_read_several_at_a_time_come_back_oldest_first() {
            let dir = tempfile::tempdir().expect("tempdir");
            let r = setup(dir.path()).await;
            let n = 3 * READS_IN_FLIGHT + 1;
            let ids: Vec<String> = (0..n)
                .map(|i| format!("20261130T{:02}{:02}00Z-{i:04x}", i / 60, i % 60))
                .collect();
            // Committed newest first, so the store's order of writes is not the answer.
            for id in ids.iter().rev() {
                commit(&r, &record(id, "7000000000000000001"))
                    .await
                    .expect("commit");
            }
            let bad = &ids[READS_IN_FLIGHT + 2];
            std::fs::write(dir.path().join(catalog_key(bad)), b"not a record").expect("write");
            let listing = scan(&r).await.expect("scan");
            let got: Vec<&str> = listing.records.iter().map(|r| r.id.as_str()).collect();
            let want: Vec<&str> = ids
                .iter()
                .filter(|id| *id != bad)
                .map(String::as_str)
                .collect();
            assert_eq!(got, want);
            assert_eq!(listing.unreadable_ids, std::slice::from_ref(bad));
        }

        #[tokio::test]
        async fn a_repository_that_does_not_exist_is_an_error() {
            let dir = tempfile::tempdir().expect("tempdir");
            // The root is missing.
            let e = list(&repo(&dir.path().join("not-mounted")))
                .await
                .expect_err("a missing root");
            assert!(e.to_string().contains("not-mounted"), "{e}");
            // The root is there, but nothing was ever stored.
            let e = list(&repo(dir.path())).await.expect_err("no metadata");
            assert_eq!(e.kind(), ErrorKind::Configuration);
            assert!(e.to_string().contains("not a walcore repository"), "{e}");
            let e = load(&repo(dir.path()), A).await.expect_err("no metadata");
            assert_eq!(e.kind(), ErrorKind::Configuration);
            // An initialised repository without backups lists none.
            let r = setup(dir.path()).await;
            assert!(list(&r).await.expect("list").is_empty());
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(format_time(t), "2023-11-14T22:13:20.123Z");
    }
}

#[cfg(test)]
mod order_tests {
    use super::*;

    /// Two takes started in the same second: their IDs share the second, and the random
    /// suffix must not decide which is listed first.
    #[test]
    fn backups_of_the_same_second_are_listed_in_the_order_they_started() {
        let mut later = sample_record("20261205T131329Z-315e", "1");
        later.start_time = "2026-12-05T13:13:29.800Z".into();
        let mut earlier = sample_record("20261205T131329Z-b3a2", "1");
        earlier.start_time = "2026-12-05T13:13:29.100Z".into();
        let mut oldest = sample_record("20261205T131328Z-50d4", "1");
        oldest.start_time = "2026-12-05T13:13:28.500Z".into();
        let mut records = vec![later, oldest, earlier];
        oldest_first(&mut records);
        let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "20261205T131328Z-50d4",
                "20261205T131329Z-b3a2",
                "20261205T131329Z-315e"
            ]
        );
    }
}
