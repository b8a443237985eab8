//! Look-ahead archiving. PostgreSQL calls `archive_command` for one segment at a time; when
//! segments are waiting (`archive_status/*.ready`), a detached worker archives the next ones in
//! parallel, so that when PostgreSQL asks for them they are usually durable already.
//!
//! The worker leaves a record per segment (`<spool>/archive/<name>.done`: length and CRC-32 of
//! what it archived, and the repository). A record is only a hint: before answering 0 for a
//! recorded segment the call checks that the file PostgreSQL hands over has that length and
//! CRC-32, and that the stored object's trailer says the same. Anything else and the call
//! archives the file itself (create-only, comparing with what is stored), exactly as without
//! look-ahead. So a crash at any moment, a stale record, or a record from another repository can
//! cost time but never acknowledge a segment that is not durable.
//!
//! Coordination through files in the spool: the foreground writes `archive/current` (the
//! segment PostgreSQL asked for) and the worker only takes segments after it; the worker holds
//! `archive/<name>.lock` while it works on a segment, and a foreground call for that segment
//! waits for it; `archive/worker.lock` keeps one worker per spool.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::codec::envelope::{TRAILER_LEN, Trailer};
use crate::config::Config;
use crate::error::{Error, ErrorKind};
use crate::ops::archive::{Archived, archive_file};
use crate::ops::spool::{self, Lock};
use crate::pg::{WalFileKind, WalFileName};
use crate::repo::Repository;
use crate::store::wal_key;

/// How long an idle worker waits for more `.ready` files before it exits.
const WORKER_LINGER: Duration = Duration::from_secs(1);
/// How often an idle worker looks at `archive_status`.
const WORKER_POLL: Duration = Duration::from_millis(20);

/// Look-ahead for one call: where PostgreSQL's WAL directory and the spool are.
#[derive(Debug, Clone)]
pub struct LookAhead {
    wal_dir: PathBuf,
    spool: PathBuf,
    parallel: u32,
}

impl LookAhead {
    /// Look-ahead for archiving `path`, if it is on and `path` is in PostgreSQL's WAL directory
    /// (one with `archive_status/`).
    pub fn for_path(config: &Config, path: &Path) -> Option<LookAhead> {
        if config.lookahead == 0 {
            return None;
        }
        let wal_dir = spool::wal_dir_of(path);
        if !wal_dir.join("archive_status").is_dir() {
            return None;
        }
        let data_dir = spool::data_dir_of(&wal_dir).ok()?;
        let wal_dir = data_dir.join(wal_dir.file_name()?);
        Some(LookAhead {
            spool: spool::spool_dir(config, &data_dir),
            wal_dir,
            parallel: config.lookahead,
        })
    }

    /// Look-ahead for a worker started on `wal_dir`.
    pub fn for_worker(config: &Config, wal_dir: &Path) -> Result<LookAhead, Error> {
        let data_dir = spool::data_dir_of(wal_dir)
            .map_err(|e| Error::new(ErrorKind::LocalIo, format!("{}: {e}", wal_dir.display())))?;
        Ok(LookAhead {
            spool: spool::spool_dir(config, &data_dir),
            wal_dir: wal_dir.to_path_buf(),
            parallel: config.lookahead.max(1),
        })
    }

    fn dir(&self) -> PathBuf {
        self.spool.join("archive")
    }

    fn record_path(&self, name: &WalFileName) -> PathBuf {
        self.dir().join(format!("{name}.done"))
    }

    fn lock_path(&self, name: &WalFileName) -> PathBuf {
        self.dir().join(format!("{name}.lock"))
    }

    fn current_path(&self) -> PathBuf {
        self.dir().join("current")
    }

    /// Notes that PostgreSQL is asking for `name` and makes sure a worker is running. Failures
    /// here only cost speed: they are logged, never returned.
    fn kick(&self, name: &WalFileName, worker_args: Option<&[OsString]>) {
        let attempt = || -> Result<(), Error> {
            let dir = self.dir();
            spool::make_dir(&dir).map_err(|e| spool::local_io(&dir, e))?;
            spool::write_atomic(&self.current_path(), &name.to_string())
                .map_err(|e| spool::local_io(&self.current_path(), e))?;
            if !has_ready_after(&self.wal_dir, name) {
                return Ok(());
            }
            spool::ensure_worker(
                &dir.join("worker.lock"),
                &self.spool.join("archive-worker.log"),
                "--lookahead-worker",
                &self.wal_dir,
                worker_args,
            )
        };
        if let Err(e) = attempt() {
            tracing::warn!("look-ahead is off for this call: {e}");
        }
    }
}

/// Whether a segment after `name` is waiting to be archived.
fn has_ready_after(wal_dir: &Path, name: &WalFileName) -> bool {
    ready_segments(wal_dir).is_ok_and(|r| r.iter().any(|n| n > name))
}

/// Segments (not history, backup or partial files) with a `.ready` status, oldest first.
fn ready_segments(wal_dir: &Path) -> io::Result<Vec<WalFileName>> {
    let mut out: Vec<WalFileName> = fs::read_dir(wal_dir.join("archive_status"))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let n = e.file_name();
            let n = n.to_str()?.strip_suffix(".ready")?;
            WalFileName::parse(n)
                .ok()
                .filter(|w| *w.kind() == WalFileKind::Segment)
        })
        .collect();
    out.sort();
    Ok(out)
}

/// What a record says the worker archived.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    bytes: u64,
    crc: u32,
    store: String,
}

impl Record {
    fn to_text(&self) -> String {
        format!(
            "walcore look-ahead 1\nbytes {}\ncrc {:08x}\nstore {}\n",
            self.bytes, self.crc, self.store
        )
    }

    fn parse(text: &str) -> Option<Record> {
        let mut lines = text.lines();
        if lines.next()? != "walcore look-ahead 1" {
            return None;
        }
        let bytes = lines.next()?.strip_prefix("bytes ")?.parse().ok()?;
        let crc = u32::from_str_radix(lines.next()?.strip_prefix("crc ")?, 16).ok()?;
        let store = lines.next()?.strip_prefix("store ")?.to_string();
        Some(Record { bytes, crc, store })
    }
}

/// Length and CRC-32 of a local file.
fn file_crc(path: &Path) -> io::Result<(u64, u32)> {
    let mut f = File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hasher.finalize()))
}

/// Answers from a worker's record, if it holds up: the file is the one recorded, and the
/// stored object's trailer names the same length and CRC-32.
async fn verified_record(
    repo: &Repository,
    la: &LookAhead,
    path: &Path,
    name: &WalFileName,
) -> Option<Archived> {
    let record_path = la.record_path(name);
    let record = Record::parse(&spool::read_text(&record_path)?);
    let _ = fs::remove_file(&record_path);
    let record = record?;
    let store = repo.store().describe();
    if record.store != store {
        tracing::debug!(
            "look-ahead record for {name} is for {}, ignored",
            record.store
        );
        return None;
    }
    let local = path.to_path_buf();
    let (bytes, crc) = tokio::task::spawn_blocking(move || file_crc(&local))
        .await
        .ok()?
        .ok()?;
    if (bytes, crc) != (record.bytes, record.crc) {
        tracing::warn!(
            "look-ahead record for {name} does not match the file (recorded {} bytes, CRC-32 {:08x}; file {bytes} bytes, CRC-32 {crc:08x}): archiving it again",
            record.bytes,
            record.crc
        );
        return None;
    }
    let key = wal_key(name);
    let tail = repo.store().tail(&key, TRAILER_LEN as u64).await;
    match tail.map(|t| Trailer::parse(&t)) {
        Ok(Ok(Some(t))) if t.plaintext_len == bytes && t.plaintext_crc == crc => {
            Some(Archived::AlreadyArchived { key, bytes, crc })
        }
        other => {
            tracing::warn!(
                "look-ahead record for {name}: the stored object does not confirm it ({other:?}): archiving it again"
            );
            None
        }
    }
}

/// `archive_command` with look-ahead: answers for `path` (0 only once it is durable) and keeps
/// a worker archiving the segments after it. `worker_args` are the flags the worker must be
/// started with (the repository and compression given on the command line); `None` starts no
/// worker (a program embedding walcore runs [`run_worker`] itself).
pub async fn archive_with_lookahead(
    repo: &Repository,
    config: &Config,
    path: &Path,
    worker_args: Option<&[OsString]>,
) -> Result<Archived, Error> {
    let la = LookAhead::for_path(config, path);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| WalFileName::parse(n).ok())
        .filter(|n| *n.kind() == WalFileKind::Segment);
    let (Some(la), Some(name)) = (la, name) else {
        return archive_file(repo, path).await;
    };
    la.kick(&name, worker_args);

    // If the worker is on this very segment, its result is the quickest answer.
    let lock = la.lock_path(&name);
    let wait = config.progress_timeout / 2;
    tokio::task::spawn_blocking(move || spool::wait_unlocked(&lock, wait))
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    if let Some(done) = verified_record(repo, &la, path, &name).await {
        tracing::info!(file = %name, "archived ahead by the look-ahead worker; verified");
        return Ok(done);
    }
    archive_file(repo, path).await
}

/// The detached worker: archives `.ready` segments after the one PostgreSQL asked for, up to
/// `lookahead` at once, until nothing is left for a second. One per spool.
pub async fn run_worker(repo: &Repository, config: &Config, wal_dir: &Path) -> Result<(), Error> {
    let la = LookAhead::for_worker(config, wal_dir)?;
    let dir = la.dir();
    spool::make_dir(&dir).map_err(|e| spool::local_io(&dir, e))?;
    let Some(_worker) =
        Lock::try_take(&dir.join("worker.lock")).map_err(|e| spool::local_io(&dir, e))?
    else {
        return Ok(());
    };
    tracing::info!(wal_dir = %wal_dir.display(), parallel = la.parallel, "look-ahead worker started");
    let store = repo.store().describe();
    let mut failed: BTreeSet<WalFileName> = BTreeSet::new();
    let mut running = tokio::task::JoinSet::new();
    let mut in_flight: BTreeSet<WalFileName> = BTreeSet::new();
    let mut idle_since = Instant::now();
    let mut archived = 0u64;
    loop {
        // Collect finished work.
        while let Some(done) = running.try_join_next() {
            let (name, result): (WalFileName, Result<(), Error>) =
                done.map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
            in_flight.remove(&name);
            match result {
                Ok(()) => archived += 1,
                Err(e) => {
                    tracing::warn!(
                        "look-ahead could not archive {name}, PostgreSQL's call will: {e:#}"
                    );
                    failed.insert(name);
                }
            }
        }
        let current =
            spool::read_text(&la.current_path()).and_then(|t| WalFileName::parse(t.trim()).ok());
        let ready = match ready_segments(&la.wal_dir) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => return Err(spool::local_io(&la.wal_dir, e)),
        };
        let mut started = false;
        for name in ready {
            if running.len() >= la.parallel as usize {
                break;
            }
            if current.as_ref().is_some_and(|c| name <= *c)
                || in_flight.contains(&name)
                || failed.contains(&name)
                || la.record_path(&name).exists()
            {
                continue;
            }
            let Ok(Some(lock)) = Lock::try_take(&la.lock_path(&name)) else {
                continue;
            };
            started = true;
            in_flight.insert(name.clone());
            let repo = repo.clone();
            let la = la.clone();
            let store = store.clone();
            running.spawn(async move {
                let path = la.wal_dir.join(name.to_string());
                let result = archive_file(&repo, &path).await.and_then(|done| {
                    let (bytes, crc) = done.plaintext();
                    let record = Record { bytes, crc, store };
                    spool::write_atomic(&la.record_path(&name), &record.to_text())
                        .map_err(|e| spool::local_io(&la.record_path(&name), e))
                });
                lock.release_and_remove();
                (name, result)
            });
        }
        if started || !running.is_empty() {
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= WORKER_LINGER {
            break;
        } else {
            // Waiting for PostgreSQL is not a stall.
            crate::progress::tick();
        }
        tokio::time::sleep(WORKER_POLL).await;
    }
    while running.join_next().await.is_some() {}
    clean_records(&la);
    let peak_rss_kib = spool::peak_rss_kib();
    tracing::info!(archived, peak_rss_kib, "look-ahead worker done");
    Ok(())
}

/// Removes records of segments PostgreSQL no longer waits for (answered and renamed to
/// `.done`, or removed).
fn clean_records(la: &LookAhead) {
    let Ok(entries) = fs::read_dir(la.dir()) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let file = e.file_name();
        let Some(seg) = file.to_str().and_then(|f| f.strip_suffix(".done")) else {
            continue;
        };
        if !la
            .wal_dir
            .join("archive_status")
            .join(format!("{seg}.ready"))
            .exists()
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Layer;
    use crate::ops::testing::seg_name;

    const SYSID: u64 = 7_000_000_000_000_000_001;

    fn segment(no: u64, fill: u8) -> Vec<u8> {
        crate::ops::testing::segment(no, SYSID, fill)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn worker_records_are_verified_before_they_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = dir.path().join("data/pg_wal");
        fs::create_dir_all(wal.join("archive_status")).expect("pg_wal");
        for no in 1..=4 {
            fs::write(wal.join(seg_name(no)), segment(no, 0)).expect("segment");
            fs::write(
                wal.join(format!("archive_status/{}.ready", seg_name(no))),
                "",
            )
            .expect("ready");
        }
        fs::create_dir(dir.path().join("repo")).expect("repository directory");
        let repo_url = format!("file://{}", dir.path().join("repo").display());
        let config = Config::load_with(Layer::default(), |k| match k {
            "WALCORE_REPO" => Some(repo_url.clone()),
            "WALCORE_ENCRYPTION_KEY" => Some("42".repeat(32)),
            _ => None,
        })
        .expect("config");
        let repo = Repository::open(&config).expect("repo");
        let call = |no: u64| {
            let (repo, config, path) = (repo.clone(), config.clone(), wal.join(seg_name(no)));
            async move { archive_with_lookahead(&repo, &config, &path, None).await }
        };

        // PostgreSQL asks for 1: stored by the call; then the worker takes 2, 3 and 4.
        let first = call(1).await;
        assert!(matches!(first, Ok(Archived::Stored { .. })), "{first:?}");
        run_worker(&repo, &config, &wal).await.expect("worker");
        let la = LookAhead::for_worker(&config, &wal).expect("look-ahead");
        let record = |no: u64| la.record_path(&WalFileName::parse(&seg_name(no)).expect("name"));
        for no in 2..=4 {
            assert!(record(no).exists(), "no record for segment {no}");
        }

        // 2: the record holds up; answered from it, and the record is used up.
        assert!(matches!(
            call(2).await,
            Ok(Archived::AlreadyArchived { .. })
        ));
        assert!(!record(2).exists());

        // 3: the file PostgreSQL hands over is not the one recorded: the record is not
        // believed, and the stored object (different content) is a loud conflict.
        fs::write(wal.join(seg_name(3)), segment(3, 1)).expect("rewrite");
        let e = call(3)
            .await
            .expect_err("a different file under an archived name");
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");

        // 4: the record is right but the object is gone: the call stores it again.
        let key = wal_key(&WalFileName::parse(&seg_name(4)).expect("name"));
        fs::remove_file(dir.path().join("repo").join(&key)).expect("remove object");
        assert!(matches!(call(4).await, Ok(Archived::Stored { .. })));
    }

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let r = Record {
            bytes: 16 << 20,
            crc: 0xdead_beef,
            store: "file:///r".into(),
        };
        assert_eq!(Record::parse(&r.to_text()), Some(r));
        assert_eq!(Record::parse("walcore look-ahead 1\nbytes x\n"), None);
        assert_eq!(Record::parse(""), None);
    }
}
