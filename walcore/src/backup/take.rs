//! `walcore-basebackup take`: `BASE_BACKUP` streamed into the repository.
//!
//! ```text
//! server ──BASE_BACKUP──▶ network task ──events──▶ take ──pieces──▶ upload per archive
//!                                                    │            (encode on all cores, create-only,
//!                                                    │             multipart when large)
//!                                                    └─ Finished ─▶ wait for the WAL ─▶ catalog record
//! ```
//!
//! Memory is bounded whatever the database's size: the event queue, one upload queue per
//! archive, the codec's window of chunks and the store's part buffers.

use std::io::Read;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::catalog::{self, BackupRecord, ObjectEntry, ObjectKind, TablespaceEntry};
use super::heartbeat::{self, Heartbeat};
use super::progress::Meter;
use crate::error::{Error, ErrorKind};
use crate::pg::{Lsn, SegmentNo, WalFileName, WalSegmentSize};
use crate::replication::{
    BackupEvent, BaseBackupOptions, Checkpoint, ConnConfig, ConnectOptions, ManifestChecksums,
    ReplicationConnection, SystemInfo,
};
use crate::repo::{RepoMeta, Repository};
use crate::store::{PutOutcome, keys::wal_key};

/// Pieces of archive data queued for one upload (the server sends at most 32 KiB a piece).
const UPLOAD_QUEUE: usize = 64;
/// How often to look for the backup's WAL in the repository while waiting for it.
const WAL_POLL: Duration = Duration::from_millis(500);

/// What `take` is asked to do.
#[derive(Debug, Clone)]
pub struct TakeOptions {
    /// A libpq connection string or URL; the `PG*` variables and `.pgpass` fill in the rest.
    pub conninfo: String,
    /// Shown in `backup_label` and in the catalog; a default names the tool and the time.
    pub label: Option<String>,
    pub checkpoint: Checkpoint,
    /// Put the WAL the backup needs inside it (`pg_wal/` of `base.tar`) instead of waiting for
    /// it to be archived: a self-contained backup.
    pub include_wal: bool,
    /// How long to wait for the backup's last WAL segment to be archived.
    pub wal_timeout: Duration,
    /// `MAX_RATE` in kB/s.
    pub max_rate_kb: Option<u32>,
    /// Verify data page checksums on the server while reading.
    pub verify_checksums: bool,
    /// Draw a progress line on stderr (for a terminal); otherwise one log line per phase.
    pub progress_bar: bool,
}

impl Default for TakeOptions {
    fn default() -> TakeOptions {
        TakeOptions {
            conninfo: String::new(),
            label: None,
            checkpoint: Checkpoint::Fast,
            include_wal: false,
            wal_timeout: Duration::from_secs(600),
            max_rate_kb: None,
            verify_checksums: true,
            progress_bar: false,
        }
    }
}

/// The blocking side of an upload: reads the pieces the take sends, and fails unless the take
/// said the archive is complete (so an interrupted backup never stores a truncated object).
struct PieceReader {
    rx: mpsc::Receiver<Option<Bytes>>,
    current: Bytes,
    done: bool,
}

impl Read for PieceReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Some(piece)) => self.current = piece,
                Some(None) => self.done = true,
                None => {
                    return Err(std::io::Error::other(
                        "the base backup stream stopped before this archive was complete",
                    ));
                }
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// One object being uploaded while its data streams in.
struct Upload {
    key: String,
    tx: mpsc::Sender<Option<Bytes>>,
    task: JoinHandle<Result<ObjectEntry, Error>>,
}

impl Upload {
    fn start(repo: &Repository, key: String, kind: ObjectKind, name: String) -> Upload {
        let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
        let repo = repo.clone();
        let key_task = key.clone();
        let task = tokio::spawn(async move {
            let codec = repo.codec().clone();
            let name_in_envelope = key_task.clone();
            let (outcome, summary) = repo
                .store()
                .put_create_with(&key_task, move |w| {
                    let reader = PieceReader {
                        rx,
                        current: Bytes::new(),
                        done: false,
                    };
                    codec
                        .encode(&name_in_envelope, reader, w)
                        .map_err(Error::from)
                })
                .await?;
            if outcome == PutOutcome::AlreadyExists {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "{key_task} already exists in {}: another take chose the same backup ID",
                        repo.store().describe()
                    ),
                ));
            }
            Ok(ObjectEntry {
                key: key_task,
                kind,
                name,
                plaintext_len: summary.plaintext_len,
                plaintext_crc32: summary.plaintext_crc,
                stored_len: summary.stored_len,
            })
        });
        Upload { key, tx, task }
    }

    /// Sends a piece; when the upload has already failed, its error.
    async fn send(&mut self, piece: Bytes) -> Result<(), Error> {
        if self.tx.send(Some(piece)).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(())
    }

    async fn failure(&mut self) -> Error {
        match (&mut self.task).await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => Error::new(
                ErrorKind::Internal,
                format!("the upload of {} ended before its data", self.key),
            ),
            Err(e) => Error::new(
                ErrorKind::Internal,
                format!("the upload of {} failed: {e}", self.key),
            ),
        }
    }

    /// Marks the object complete; the upload finishes in the background.
    async fn complete(mut self) -> Result<JoinHandle<Result<ObjectEntry, Error>>, Error> {
        if self.tx.send(None).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(self.task)
    }
}

async fn join(task: JoinHandle<Result<ObjectEntry, Error>>) -> Result<ObjectEntry, Error> {
    task.await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("an upload task failed: {e}")))?
}

/// The server's `wal_segment_size`.
pub(crate) async fn server_segment_size(
    conn: &mut ReplicationConnection,
) -> Result<WalSegmentSize, Error> {
    let text = conn
        .simple_query("SHOW wal_segment_size")
        .await?
        .first()
        .and_then(|r| r.raw(0).map(|v| String::from_utf8_lossy(v).into_owned()))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("{} did not answer SHOW wal_segment_size", conn.server()),
            )
        })?;
    parse_segment_size(&text)
}

/// `wal_segment_size` as `SHOW` prints it (`16MB`, `1GB`, or plain bytes).
fn parse_segment_size(text: &str) -> Result<WalSegmentSize, Error> {
    let bytes = crate::config::parse_bytes(text).map_err(|e| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("the server's wal_segment_size: {e}"),
        )
    })?;
    let bytes = u32::try_from(bytes).map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("the server's wal_segment_size {text} is too large"),
        )
    })?;
    Ok(WalSegmentSize::new(bytes)?)
}

/// The repository's metadata, checked against (or, in a repository nothing was archived to
/// yet, made from) the server's identity. Nothing else is written before this check.
pub(crate) async fn check_cluster(
    repo: &Repository,
    server: &str,
    system: &SystemInfo,
    version_num: u32,
    seg_size: WalSegmentSize,
) -> Result<RepoMeta, Error> {
    let meta = match repo.read_meta().await? {
        Some(meta) => meta,
        None => {
            repo.init_meta(RepoMeta::new(
                system.system_id,
                version_num / 10_000,
                seg_size,
            ))
            .await?
        }
    };
    if meta.system_id()? != system.system_id {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{server} is the cluster with system identifier {}, but repository {} serves \
                 cluster {}; nothing was written (use one repository per cluster)",
                system.system_id,
                repo.store().describe(),
                meta.system_identifier
            ),
        ));
    }
    if meta.wal_segment_size != seg_size.bytes() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{server} has wal_segment_size {} but repository {} records {}",
                seg_size.bytes(),
                repo.store().describe(),
                meta.wal_segment_size
            ),
        ));
    }
    Ok(meta)
}

/// The archive names a server may send: `base.tar`, `OID.tar`.
fn check_archive_name(name: &str) -> Result<Option<u32>, Error> {
    if name == "base.tar" {
        return Ok(None);
    }
    name.strip_suffix(".tar")
        .filter(|oid| !oid.is_empty() && oid.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|oid| oid.parse::<u32>().ok())
        .map(Some)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the server sent an archive named {name:?}, which is not base.tar or OID.tar"
                ),
            )
        })
}

/// Takes a base backup into `repo`; returns its catalog record once it is written.
pub async fn take(repo: &Repository, options: &TakeOptions) -> Result<BackupRecord, Error> {
    let started = Instant::now();
    let config = ConnConfig::from_env(&options.conninfo)
        .map_err(|e| Error::new(ErrorKind::Configuration, e.to_string()))?;
    let mut conn = ReplicationConnection::connect(&config, &ConnectOptions::default()).await?;
    let server = conn.server().to_owned();
    let system = conn.identify_system().await?;
    let version_num = conn.server_version_num().unwrap_or(0);
    let version = conn.server_version().unwrap_or("unknown").to_owned();
    let seg_size = server_segment_size(&mut conn).await?;
    check_cluster(repo, &server, &system, version_num, seg_size).await?;

    let start_time = SystemTime::now();
    let id = catalog::new_id(start_time);
    // The sign of life that keeps `expire` from sweeping this take's objects while it runs.
    let heartbeat = Heartbeat::start(repo, &id).await?;
    let label = options
        .label
        .clone()
        .unwrap_or_else(|| format!("walcore {id}"));
    let bb = BaseBackupOptions {
        label: label.clone(),
        checkpoint: options.checkpoint,
        manifest: true,
        manifest_checksums: ManifestChecksums::Crc32c,
        wait_for_wal_archive: false,
        include_wal: options.include_wal,
        // Symbolic links under pg_tblspc, which a restore can point elsewhere; a
        // tablespace_map file would be in the manifest, and so could not be rewritten.
        tablespace_map: false,
        progress: options.progress_bar,
        verify_checksums: options.verify_checksums,
        max_rate_kb: options.max_rate_kb,
        ..BaseBackupOptions::default()
    };
    tracing::info!(
        backup = %id,
        server = %server,
        version = %version,
        checkpoint = ?options.checkpoint,
        "starting the base backup (the server checkpoints first)"
    );
    let stream = conn.base_backup(&bb).await?;
    let (mut events, network) = stream.spawn();

    let mut meter = Meter::new(options.progress_bar);
    let mut current: Option<Upload> = None;
    let mut pending: Vec<JoinHandle<Result<ObjectEntry, Error>>> = Vec::new();
    // Every object this take starts, to remove again if the backup is not recorded.
    let mut keys: Vec<String> = Vec::new();
    let mut tablespaces: Vec<TablespaceEntry> = Vec::new();
    let mut start: Option<(Lsn, u32)> = None;
    let mut stop: Option<(Lsn, u32)> = None;
    let mut manifest_seen = false;
    let result: Result<(), Error> = async {
        while let Some(event) = events.recv().await {
            match event? {
                BackupEvent::Started {
                    start_lsn,
                    timeline,
                    tablespaces: list,
                } => {
                    start = Some((start_lsn, timeline.0));
                    heartbeat.set_start(start_lsn, timeline.0);
                    let total: Option<u64> =
                        list.iter().map(|t| t.size_kib.map(|k| k * 1024)).sum();
                    meter.set_total(total);
                    for t in &list {
                        if let (Some(oid), Some(location)) = (t.oid, &t.location) {
                            tablespaces.push(TablespaceEntry {
                                oid,
                                location: location.to_string_lossy().into_owned(),
                                archive: format!("{oid}.tar"),
                            });
                        }
                    }
                    tracing::info!(
                        backup = %id,
                        start_lsn = %start_lsn,
                        timeline = timeline.0,
                        tablespaces = list.len(),
                        "checkpoint done; streaming the data directory"
                    );
                }
                BackupEvent::Archive { name, .. } => {
                    check_archive_name(&name)?;
                    if let Some(up) = current.take() {
                        pending.push(up.complete().await?);
                    }
                    keys.push(catalog::archive_key(&id, &name));
                    current = Some(Upload::start(
                        repo,
                        catalog::archive_key(&id, &name),
                        ObjectKind::Archive,
                        name,
                    ));
                }
                BackupEvent::Data(bytes) => {
                    let up = current.as_mut().ok_or_else(|| {
                        Error::new(
                            ErrorKind::InvalidInput,
                            format!("{server} sent backup data before naming an archive"),
                        )
                    })?;
                    if !manifest_seen {
                        meter.add(bytes.len() as u64);
                    }
                    up.send(bytes).await?;
                }
                BackupEvent::Progress(_) => {}
                BackupEvent::Manifest => {
                    manifest_seen = true;
                    if let Some(up) = current.take() {
                        pending.push(up.complete().await?);
                    }
                    keys.push(catalog::manifest_key(&id));
                    current = Some(Upload::start(
                        repo,
                        catalog::manifest_key(&id),
                        ObjectKind::Manifest,
                        "backup_manifest".to_owned(),
                    ));
                }
                BackupEvent::Finished { end_lsn, timeline } => {
                    stop = Some((end_lsn, timeline.0));
                    if let Some(up) = current.take() {
                        pending.push(up.complete().await?);
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    meter.finish();
    // Dropping an unfinished upload's sender without the end mark abandons that object.
    drop(current);
    if let Err(e) = result {
        network.abort();
        heartbeat.stop();
        return Err(discard(repo, &id, &keys, pending, e).await);
    }
    let finished: Result<BackupRecord, Error> = async {
        let conn = network.await.map_err(|e| {
            Error::new(ErrorKind::Internal, format!("the network task failed: {e}"))
        })?;
        let _ = conn.close().await;
        let (Some((start_lsn, start_timeline)), Some((stop_lsn, stop_timeline))) = (start, stop)
        else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{server} ended the base backup without its start and end positions"),
            ));
        };
        if !manifest_seen {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{server} sent no backup manifest"),
            ));
        }
        let mut objects = Vec::with_capacity(pending.len());
        while !pending.is_empty() {
            objects.push(join(pending.remove(0)).await?);
        }
        let stop_time = SystemTime::now();
        let data_bytes: u64 = objects.iter().map(|o| o.plaintext_len).sum();
        let stored_bytes: u64 = objects.iter().map(|o| o.stored_len).sum();
        tracing::info!(
            backup = %id,
            stop_lsn = %stop_lsn,
            bytes = data_bytes,
            stored_bytes,
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            "data stored"
        );
        if !options.include_wal {
            wait_for_wal(
                repo,
                &id,
                seg_size,
                (start_lsn, start_timeline),
                (stop_lsn, stop_timeline),
                options.wal_timeout,
            )
            .await?;
        }
        Ok(BackupRecord {
            format_version: 1,
            id: id.clone(),
            label,
            system_identifier: system.system_id.to_string(),
            pg_version_num: version_num,
            wal_segment_size: seg_size.bytes(),
            start_lsn,
            start_timeline,
            stop_lsn,
            stop_timeline,
            start_time: catalog::format_time(start_time),
            stop_time: catalog::format_time(stop_time),
            checkpoint: match options.checkpoint {
                Checkpoint::Fast => "fast",
                Checkpoint::Spread => "spread",
            }
            .to_owned(),
            wal_included: options.include_wal,
            tablespaces,
            objects,
            created_by: format!("walcore {}", env!("CARGO_PKG_VERSION")),
        })
    }
    .await;
    heartbeat.stop();
    let record = match finished {
        Ok(r) => r,
        Err(e) => return Err(discard(repo, &id, &keys, pending, e).await),
    };
    // An `expire` that judged this take over (no sign of life for its whole orphan grace: a
    // stalled process, a lost network) deleted beat 0 with everything else.
    if !Heartbeat::survives(repo, &id).await? {
        return Err(discard(repo, &id, &keys, Vec::new(), swept(&id)).await);
    }
    // From here on the objects stay: a failed or uncertain catalog write may still have
    // landed, and a recorded backup must keep every object. A sweep that started before the
    // record was written holds `catalog/ID` with its tombstone, and the write fails.
    catalog::commit(repo, &record).await?;
    // A sweep that wrote its tombstone, deleted everything and removed the tombstone between
    // the check above and the record: the record would name objects that are gone.
    if !Heartbeat::survives(repo, &id).await? {
        catalog::remove(repo, &id).await?;
        return Err(discard(repo, &id, &keys, Vec::new(), swept(&id)).await);
    }
    heartbeat::clear(repo, &id).await;
    tracing::info!(
        backup = %id,
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "backup complete and recorded in the catalog"
    );
    Ok(record)
}

/// The error of a take whose objects `expire` swept while it was stalled.
fn swept(id: &str) -> Error {
    Error::new(
        ErrorKind::Conflict,
        format!(
            "backup {id} was swept by walcore expire as the leftovers of a take that never \
             finished: this take showed no sign of life for longer than the orphan grace \
             (stopped, or cut off from the repository); it was not recorded, take a new one"
        ),
    )
}

/// After a take failed before its catalog record was written: lets the uploads still running
/// end (so none lands after the clean-up), then removes every object the take started, and
/// returns `error` saying what was left. Nothing refers to these objects; removing them only
/// saves space, so a failure to remove one is reported, not fatal.
async fn discard(
    repo: &Repository,
    id: &str,
    keys: &[String],
    pending: Vec<JoinHandle<Result<ObjectEntry, Error>>>,
    error: Error,
) -> Error {
    for task in pending {
        let _ = task.await;
    }
    let store = repo.store().describe();
    let mut left = Vec::new();
    for key in keys {
        if let Err(e) = repo.store().delete(key).await {
            tracing::warn!(key = %key, "could not remove an object of the failed backup: {e}");
            left.push(key.as_str());
        }
    }
    heartbeat::clear(repo, id).await;
    if let Err(e) = repo
        .store()
        .prune_empty_dirs(&format!("backup/{id}/"))
        .await
    {
        tracing::debug!("could not remove the empty directories of backup {id}: {e}");
    }
    if left.is_empty() {
        error.context(format!(
            "backup {id} failed and is not in the catalog; its objects were removed"
        ))
    } else {
        error.context(format!(
            "backup {id} failed and is not in the catalog; {} of its objects could not be \
             removed from {store} ({})",
            left.len(),
            left.join(", ")
        ))
    }
}

/// The WAL segments replay needs from `start` to `stop` (the segment holding the byte before
/// `stop`, as PostgreSQL's `do_pg_backup_stop` waits for).
pub fn needed_segments(
    seg_size: WalSegmentSize,
    start: Lsn,
    stop: Lsn,
) -> impl Iterator<Item = SegmentNo> {
    let first = start.segment(seg_size).0;
    let last = Lsn(stop.0.saturating_sub(1).max(start.0))
        .segment(seg_size)
        .0;
    (first..=last).map(SegmentNo)
}

/// Waits until every segment the backup needs is in the repository. A segment may be on the
/// start timeline or the stop timeline (a backup of a standby may cross a promotion).
async fn wait_for_wal(
    repo: &Repository,
    id: &str,
    seg_size: WalSegmentSize,
    start: (Lsn, u32),
    stop: (Lsn, u32),
    timeout: Duration,
) -> Result<(), Error> {
    let begun = Instant::now();
    let store = repo.store().describe();
    let mut logged = false;
    for segno in needed_segments(seg_size, start.0, stop.0) {
        let mut timelines = vec![stop.1];
        if start.1 != stop.1 {
            timelines.push(start.1);
        }
        let names: Vec<WalFileName> = timelines
            .iter()
            .map(|&tl| WalFileName::segment(crate::pg::TimelineId(tl), segno, seg_size))
            .collect();
        loop {
            let mut found = false;
            for name in &names {
                let key = wal_key(name);
                let present = repo
                    .with_retry(&format!("looking for {key}"), || async {
                        repo.store()
                            .head(&key)
                            .await
                            .map_err(|e| e.into_error("looking for", &key, &store))
                    })
                    .await?;
                if present.is_some() {
                    found = true;
                    break;
                }
            }
            if found {
                break;
            }
            if begun.elapsed() >= timeout {
                return Err(Error::new(
                    ErrorKind::Transient,
                    format!(
                        "WAL segment {} that backup {id} needs was not archived to {store} \
                         within {}s; check that archive_mode is on and archive_command runs \
                         walcore-archive with this repository (the backup is not in the catalog)",
                        names[0],
                        timeout.as_secs()
                    ),
                ));
            }
            if !logged {
                tracing::info!(backup = %id, segment = %names[0], "waiting for the WAL to be archived");
                logged = true;
            }
            tokio::time::sleep(WAL_POLL).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_segments_cover_start_to_the_byte_before_stop() {
        let s = WalSegmentSize::new(16 << 20).expect("size");
        let seg = |lsn: u64| -> Vec<u64> {
            needed_segments(s, Lsn(0x0200_0028), Lsn(lsn))
                .map(|n| n.0)
                .collect()
        };
        assert_eq!(seg(0x0200_0100), vec![2]);
        // A stop exactly at a segment boundary needs only the segment before it.
        assert_eq!(seg(0x0300_0000), vec![2]);
        assert_eq!(seg(0x0300_0001), vec![2, 3]);
        assert_eq!(seg(0x0500_0060), vec![2, 3, 4, 5]);
    }

    #[test]
    fn archive_names() {
        assert_eq!(check_archive_name("base.tar").expect("base"), None);
        assert_eq!(check_archive_name("16390.tar").expect("oid"), Some(16390));
        for bad in [
            "../x.tar",
            ".tar",
            "base.tar.gz",
            "1a.tar",
            "99999999999.tar",
        ] {
            assert!(check_archive_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn segment_sizes_as_show_prints_them() {
        assert_eq!(parse_segment_size("16MB").expect("16MB").bytes(), 16 << 20);
        assert_eq!(parse_segment_size("1GB").expect("1GB").bytes(), 1 << 30);
        assert!(parse_segment_size("15MB").is_err());
    }
}
