//! Restore prefetch. PostgreSQL asks `restore_command` for one segment at a time and replays it
//! before asking for the next; a detached worker fetches, verifies and decodes the following
//! segments of the same timeline into the spool meanwhile, so that most calls only move a
//! prepared file into place.
//!
//! The spool holds `<spool>/restore/<hash of store and boot>/<segment>`: files written as a
//! restore writes `%p` (fully decoded and verified, renamed into place complete), by a worker
//! that read the repository's metadata. They are not fsynced: the spool of an earlier boot is
//! never read, and PostgreSQL fsyncs a restored file itself when it keeps it (a standby's
//! `pg_wal`); a served file is renamed into place. Before one is served it is checked again: its first page
//! must name it and carry the system identifier in the data directory's `global/pg_control`. A
//! spool of another repository sits under another hash; one of another cluster fails the check;
//! names carry the timeline, so another timeline's file is never a match. `.history` and
//! `.partial` files are never prefetched: PostgreSQL may ask for them while they are still
//! changing in the archive (a history file appears at promotion) and they are small.
//!
//! Coordination: the foreground writes `want` (the segment PostgreSQL asked for); the worker
//! fetches the segments after it, as many as the byte bound holds, evicts the ones before it,
//! holds `<segment>.lock` while fetching one (a call for that segment waits for it), and exits
//! after `WORKER_LINGER` without a new request, removing what was never asked for.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::Digest;

use crate::config::Config;
use crate::error::{Error, ErrorKind};
use crate::ops::restore::{
    Durability, Restored, remove_stale_temporaries, restore_durable, restore_file,
    restore_file_with,
};
use crate::ops::spool::{self, Lock};
use crate::pg::{
    SIZE_OF_XLOG_LONG_PHD, SegmentExpectations, WalFileKind, WalFileName, WalSegmentSize,
    check_segment_header, parse_long_page_header,
};
use crate::repo::Repository;
use crate::store::wal_key;

/// How long a worker waits for PostgreSQL's next request before it cleans up and exits.
const WORKER_LINGER: Duration = Duration::from_secs(30);
/// How often the worker looks for a new request: often while PostgreSQL asks in quick
/// succession, rarely once it has paused for a while.
const WORKER_POLL: Duration = Duration::from_millis(5);
const WORKER_POLL_IDLE: Duration = Duration::from_millis(50);
/// After this long without a new request the worker polls at [`WORKER_POLL_IDLE`].
const WORKER_BUSY: Duration = Duration::from_secs(1);
/// How long after "not in the repository" the worker asks again (the archive may still grow).
const ABSENT_RETRY: Duration = Duration::from_secs(2);
/// Segments fetched at once.
const PARALLEL: usize = 2;

/// Prefetch for one call: where the data directory and this repository's spool are.
#[derive(Debug, Clone)]
pub struct Prefetch {
    data_dir: PathBuf,
    dir: PathBuf,
    spool: PathBuf,
    max_bytes: u64,
}

impl Prefetch {
    /// Prefetch for restoring into `dest`, if it is on and `dest` is in a data directory's WAL
    /// directory.
    pub fn for_dest(config: &Config, repo: &Repository, dest: &Path) -> Option<Prefetch> {
        if config.prefetch == 0 {
            return None;
        }
        let data_dir = spool::data_dir_of(&spool::wal_dir_of(dest)).ok()?;
        if !data_dir.join("global/pg_control").is_file() {
            return None;
        }
        Some(Prefetch::new(config, repo, data_dir))
    }

    fn new(config: &Config, repo: &Repository, data_dir: PathBuf) -> Prefetch {
        let spool = spool::spool_dir(config, &data_dir);
        // Keyed by repository and by boot: spool files are not fsynced, so after a crash of the
        // machine they may be torn, and a spool of an earlier boot is never read again.
        let mut hash = sha2::Sha256::new();
        hash.update(repo.store().describe().as_bytes());
        hash.update([0]);
        hash.update(boot_id().as_bytes());
        let hash = hash.finalize();
        let dir = spool.join("restore").join(hex::encode(&hash[..8]));
        Prefetch {
            data_dir,
            dir,
            spool,
            max_bytes: config.prefetch,
        }
    }

    fn file(&self, name: &WalFileName) -> PathBuf {
        self.dir.join(name.to_string())
    }

    fn lock_path(&self, name: &WalFileName) -> PathBuf {
        self.dir.join(format!("{name}.lock"))
    }

    fn want_path(&self) -> PathBuf {
        self.dir.join("want")
    }

    /// The system identifier in the data directory's `pg_control` (its first 8 bytes).
    fn system_id(&self) -> Option<u64> {
        let mut b = [0u8; 8];
        File::open(self.data_dir.join("global/pg_control"))
            .and_then(|mut f| f.read_exact(&mut b))
            .ok()?;
        Some(u64::from_ne_bytes(b))
    }

    /// Notes that PostgreSQL asked for `name` and makes sure a worker is running. Failures
    /// here only cost speed: they are logged, never returned.
    fn kick(&self, name: &WalFileName, worker_args: Option<&[OsString]>) {
        let attempt = || -> Result<(), Error> {
            spool::make_dir(&self.dir).map_err(|e| spool::local_io(&self.dir, e))?;
            spool::write_atomic(&self.want_path(), &name.to_string())
                .map_err(|e| spool::local_io(&self.want_path(), e))?;
            spool::ensure_worker(
                &self.dir.join("worker.lock"),
                &self.spool.join("restore-worker.log"),
                "--prefetch-worker",
                &self.data_dir,
                worker_args,
            )
        };
        if let Err(e) = attempt() {
            tracing::warn!("prefetch is off for this call: {e}");
        }
    }

    /// Moves a prefetched `name` into `dest` if the spool has it and it holds up.
    fn serve(&self, name: &WalFileName, dest: &Path) -> Option<u64> {
        let file = self.file(name);
        let mut first = [0u8; SIZE_OF_XLOG_LONG_PHD];
        let len = File::open(&file)
            .and_then(|mut f| {
                f.read_exact(&mut first)?;
                f.metadata()
            })
            .ok()?
            .len();
        let checked = parse_long_page_header(&first)
            .map_err(|e| e.to_string())
            .and_then(|h| {
                let size = WalSegmentSize::new(h.seg_size).map_err(|e| e.to_string())?;
                check_segment_header(
                    &first,
                    &SegmentExpectations {
                        name: name.clone(),
                        system_id: Some(self.system_id().ok_or("pg_control is unreadable")?),
                        seg_size: Some(size),
                    },
                )
                .map_err(|e| e.to_string())?;
                if len == u64::from(size.bytes()) {
                    Ok(())
                } else {
                    Err(format!("{len} bytes, not {}", size.bytes()))
                }
            });
        if let Err(why) = checked {
            tracing::warn!("prefetched {name} does not hold up ({why}); fetching it again");
            let _ = fs::remove_file(&file);
            return None;
        }
        if let Err(e) = move_into_place(&file, dest) {
            tracing::warn!("could not move prefetched {name} into place ({e}); fetching it again");
            return None;
        }
        Some(len)
    }
}

/// This boot of the machine (`/proc/sys/kernel/random/boot_id`); where that is unreadable, a
/// fresh value, so that nothing of an earlier process is ever served.
fn boot_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        spool::read_text(Path::new("/proc/sys/kernel/random/boot_id"))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("process-{}", std::process::id()))
    })
    .clone()
}

/// Renames `from` to `to`; across file systems (a symlinked `pg_wal`), copies and renames.
///
/// Not fsynced, like the spool file itself: syncing here would write the whole segment out
/// while PostgreSQL waits, and nothing needs it. A restored file is read and replayed, and after
/// a crash PostgreSQL asks for its WAL again; where it keeps a restored file (a standby's
/// `pg_wal`) it fsyncs it itself.
fn move_into_place(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
            let temp = to.with_extension("walcore-prefetch.tmp");
            fs::copy(from, &temp)?;
            fs::rename(&temp, to)?;
            let _ = fs::remove_file(from);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// `restore_command` with prefetch: serves `name` from the spool when it was prefetched, else
/// fetches it; and keeps a worker fetching the segments after it. `worker_args` are the flags
/// the worker must be started with; `None` starts no worker (a program embedding walcore runs
/// [`run_worker`] itself).
pub async fn restore_with_prefetch(
    repo: &Repository,
    config: &Config,
    name: &str,
    dest: &Path,
    worker_args: Option<&[OsString]>,
) -> Result<Restored, Error> {
    let pf = Prefetch::for_dest(config, repo, dest);
    let wal = WalFileName::parse(name)
        .ok()
        .filter(|n| *n.kind() == WalFileKind::Segment);
    let (Some(pf), Some(wal)) = (pf, wal) else {
        return restore_file(repo, name, dest).await;
    };
    remove_stale_temporaries(dest);
    // First say what PostgreSQL wants, so the worker moves on to what follows it.
    pf.kick(&wal, worker_args);
    // If the worker is fetching this very segment, its result is the quickest answer.
    let lock = pf.lock_path(&wal);
    let wait = config.progress_timeout / 2;
    let served = {
        let pf = pf.clone();
        let wal = wal.clone();
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || {
            spool::wait_unlocked(&lock, wait);
            pf.serve(&wal, &dest)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?
    };
    crate::progress::tick();
    if let Some(bytes) = served {
        tracing::info!(file = %wal, bytes, "restored (prefetched)");
        return Ok(Restored {
            key: wal_key(&wal),
            bytes,
        });
    }
    // A segment the spool does not have, or absent there: fetched here, where an absent one is
    // checked for being a hole (the worker's "absent" only means "not prefetched").
    restore_durable(repo, name, dest).await
}

/// The detached worker: keeps the segments after the one PostgreSQL last asked for in the
/// spool, within the byte bound, until no request came for `WORKER_LINGER`. One per spool.
pub async fn run_worker(repo: &Repository, config: &Config, data_dir: &Path) -> Result<(), Error> {
    run_worker_lingering(repo, config, data_dir, WORKER_LINGER).await
}

async fn run_worker_lingering(
    repo: &Repository,
    config: &Config,
    data_dir: &Path,
    linger: Duration,
) -> Result<(), Error> {
    let pf = Prefetch::new(config, repo, data_dir.to_path_buf());
    spool::make_dir(&pf.dir).map_err(|e| spool::local_io(&pf.dir, e))?;
    let Some(_worker) =
        Lock::try_take(&pf.dir.join("worker.lock")).map_err(|e| spool::local_io(&pf.dir, e))?
    else {
        return Ok(());
    };
    remove_temporaries(&pf.dir);
    let meta = repo.read_meta().await?.ok_or_else(|| {
        Error::new(
            ErrorKind::Configuration,
            format!("{} holds no walcore repository", repo.store().describe()),
        )
    })?;
    let seg_size = meta.segment_size()?;
    let window = (pf.max_bytes / u64::from(seg_size.bytes())).max(1);
    tracing::info!(spool = %pf.dir.display(), window, "prefetch worker started");

    let mut want: Option<WalFileName> = None;
    let mut last_request = Instant::now();
    let mut absent: BTreeMap<WalFileName, Instant> = BTreeMap::new();
    let mut running = tokio::task::JoinSet::new();
    let mut in_flight: Vec<WalFileName> = Vec::new();
    let (mut fetched, mut evicted) = (0u64, 0u64);
    loop {
        while let Some(done) = running.try_join_next() {
            let (name, result): (WalFileName, Result<Restored, Error>) =
                done.map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
            in_flight.retain(|n| *n != name);
            match result {
                Ok(_) => fetched += 1,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    absent.insert(name, Instant::now());
                }
                Err(e) => {
                    tracing::warn!(
                        "prefetching {name} failed, PostgreSQL's call will fetch it: {e:#}"
                    );
                    absent.insert(name, Instant::now());
                }
            }
        }
        if !pf.data_dir.join("global/pg_control").exists() {
            break;
        }
        let now_want = spool::read_text(&pf.want_path())
            .and_then(|t| WalFileName::parse(t.trim()).ok())
            .filter(|w| *w.kind() == WalFileKind::Segment);
        if now_want != want {
            want = now_want;
            last_request = Instant::now();
            evicted += evict_outside(&pf, want.as_ref(), window, seg_size);
        } else if last_request.elapsed() >= linger && running.is_empty() {
            break;
        }
        if let Some(w) = &want {
            let segno = w.segno(seg_size)?;
            let mut next = segno;
            for _ in 0..window {
                if running.len() >= PARALLEL {
                    break;
                }
                next = next.next();
                let name = WalFileName::segment(w.timeline(), next, seg_size);
                if in_flight.contains(&name) || pf.file(&name).exists() {
                    continue;
                }
                if absent
                    .get(&name)
                    .is_some_and(|t| t.elapsed() < ABSENT_RETRY)
                {
                    continue;
                }
                let Ok(Some(lock)) = Lock::try_take(&pf.lock_path(&name)) else {
                    continue;
                };
                in_flight.push(name.clone());
                let repo = repo.clone();
                let dest = pf.file(&name);
                running.spawn(async move {
                    let result =
                        restore_file_with(&repo, &name.to_string(), &dest, Durability::UntilReboot)
                            .await;
                    lock.release_and_remove();
                    (name, result)
                });
            }
        }
        if running.is_empty() {
            // Waiting for PostgreSQL is not a stall.
            crate::progress::tick();
        }
        tokio::time::sleep(if last_request.elapsed() < WORKER_BUSY {
            WORKER_POLL
        } else {
            WORKER_POLL_IDLE
        })
        .await;
    }
    while running.join_next().await.is_some() {}
    let left = evict_outside(&pf, None, window, seg_size);
    tracing::info!(
        fetched,
        unused = left,
        evicted,
        peak_rss_kib = spool::peak_rss_kib(),
        "prefetch worker done"
    );
    Ok(())
}

/// Removes prefetched segments outside `want` and the window after it (all of them for `None`);
/// returns how many.
fn evict_outside(
    pf: &Prefetch,
    want: Option<&WalFileName>,
    window: u64,
    size: WalSegmentSize,
) -> u64 {
    let keep = |name: &WalFileName| -> bool {
        let Some(w) = want else { return false };
        if name.timeline() != w.timeline() {
            return false;
        }
        match (name.segno(size), w.segno(size)) {
            (Ok(n), Ok(w)) => n >= w && n.0 - w.0 <= window,
            _ => false,
        }
    };
    let Ok(entries) = fs::read_dir(&pf.dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.filter_map(Result::ok) {
        let Some(name) = e
            .file_name()
            .to_str()
            .and_then(|f| WalFileName::parse(f).ok())
        else {
            continue;
        };
        if !keep(&name) && fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

/// Removes decode temporaries an interrupted worker left behind.
fn remove_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        if e.file_name()
            .to_str()
            .is_some_and(|f| f.starts_with('.') && f.ends_with(".tmp"))
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Layer;
    use crate::ops::archive::archive_file;
    use crate::ops::testing::seg_name;

    const SYSID: u64 = 7_000_000_000_000_000_002;

    fn segment(no: u64, system_id: u64) -> Vec<u8> {
        crate::ops::testing::segment(no, system_id, 0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prefetched_files_are_checked_before_they_are_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        let data = dir.path().join("data");
        fs::create_dir_all(&source).expect("source");
        fs::create_dir_all(data.join("pg_wal")).expect("pg_wal");
        fs::create_dir_all(data.join("global")).expect("global");
        let mut control = SYSID.to_ne_bytes().to_vec();
        control.resize(8192, 0);
        fs::write(data.join("global/pg_control"), control).expect("pg_control");
        fs::create_dir(dir.path().join("repo")).expect("repository directory");
        let repo_url = format!("file://{}", dir.path().join("repo").display());
        let config = Config::load_with(Layer::default(), |k| match k {
            "WALCORE_REPO" => Some(repo_url.clone()),
            "WALCORE_PREFETCH" => Some("64MiB".into()),
            _ => None,
        })
        .expect("config");
        let repo = Repository::open(&config).expect("repo");
        for no in 1..=4 {
            let path = source.join(seg_name(no));
            fs::write(&path, segment(no, SYSID)).expect("segment");
            archive_file(&repo, &path).await.expect("archive");
        }
        let dest = data.join("pg_wal/RECOVERYXLOG");
        let call = |no: u64| {
            let (repo, config, dest) = (repo.clone(), config.clone(), dest.clone());
            async move {
                let r = restore_with_prefetch(&repo, &config, &seg_name(no), &dest, None).await;
                let got = fs::read(&dest);
                let _ = fs::remove_file(&dest);
                r.map(|_| got.expect("restored file"))
            }
        };

        assert_eq!(call(1).await.expect("restore 1"), segment(1, SYSID));
        let worker = {
            let (repo, config, data) = (repo.clone(), config.clone(), data.clone());
            tokio::spawn(async move {
                run_worker_lingering(&repo, &config, &data, Duration::from_millis(500)).await
            })
        };
        let pf = Prefetch::for_dest(&config, &repo, &dest).expect("prefetch is on");
        let spooled = |no: u64| pf.file(&WalFileName::parse(&seg_name(no)).expect("name"));
        let start = Instant::now();
        while !(2..=4).all(|no| spooled(no).exists()) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nothing prefetched"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // 2 is served from the spool (moved, so it is gone from there).
        assert_eq!(call(2).await.expect("restore 2"), segment(2, SYSID));
        assert!(!spooled(2).exists(), "2 was not served from the spool");

        // 3 in the spool belongs to another cluster: not served; fetched from the repository.
        fs::write(spooled(3), segment(3, SYSID + 1)).expect("plant");
        assert_eq!(call(3).await.expect("restore 3"), segment(3, SYSID));

        // Past the end of the archive is still "absent".
        let e = call(5).await.expect_err("5 was never archived");
        assert_eq!(e.kind(), ErrorKind::NotFound);

        worker.await.expect("join").expect("worker");
        let left: Vec<_> = fs::read_dir(&pf.dir)
            .expect("spool")
            .filter_map(Result::ok)
            .filter(|e| WalFileName::parse(&e.file_name().to_string_lossy()).is_ok())
            .collect();
        assert!(left.is_empty(), "the worker left {left:?}");
    }
}
