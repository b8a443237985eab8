//! The spool: a directory of the data directory's own where look-ahead archiving leaves its
//! records and restore prefetch its prepared files, and the detached workers that fill it.
//!
//! Default place: `<data dir>/pgsql_tmp_walcore`. PostgreSQL's base backups skip every name that
//! starts with `pgsql_tmp`, so the spool never travels into a backup; it is not inside `pg_wal`.
//! Nothing in the spool is trusted on its own: an archive record is checked against the local
//! file and the stored object before a call answers 0, and a prefetched file against its name
//! and the data directory's system identifier before it is served.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Error, ErrorKind};

/// Name of the default spool directory inside the data directory.
pub const SPOOL_DIR_NAME: &str = "pgsql_tmp_walcore";

/// The directory holding a hook's `%p`, as given (`pg_wal` for `pg_wal/0000…`).
pub fn wal_dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The data directory above a WAL directory, absolute, taken lexically (a symlinked `pg_wal`
/// still belongs to the data directory that holds the link).
pub fn data_dir_of(wal_dir: &Path) -> io::Result<PathBuf> {
    let abs = if wal_dir.is_absolute() {
        wal_dir.to_path_buf()
    } else {
        std::env::current_dir()?.join(wal_dir)
    };
    let mut parts: Vec<_> = Vec::new();
    for c in abs.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.pop();
    Ok(parts.iter().collect())
}

/// The spool directory for a data directory.
pub fn spool_dir(config: &Config, data_dir: &Path) -> PathBuf {
    config
        .spool
        .clone()
        .unwrap_or_else(|| data_dir.join(SPOOL_DIR_NAME))
}

/// Creates `dir` and its parents, private to the server's user.
pub fn make_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes `text` to `path` through a temporary file and a rename, so readers see all or nothing.
/// Not fsynced: spool records are hints that are verified before use.
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    let temp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = File::create(&temp)?;
        f.write_all(text.as_bytes())?;
    }
    fs::rename(&temp, path).inspect_err(|_| {
        let _ = fs::remove_file(&temp);
    })
}

/// Reads a small text file; `None` if it is absent or unreadable.
pub fn read_text(path: &Path) -> Option<String> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    Some(s)
}

/// An exclusive lock on a file, held until dropped.
#[derive(Debug)]
pub struct Lock {
    _file: File,
    path: PathBuf,
}

impl Lock {
    /// Takes the lock on `path` (created if absent) if nobody holds it.
    pub fn try_take(path: &Path) -> io::Result<Option<Lock>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Lock {
                _file: file,
                path: path.to_path_buf(),
            })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Releases the lock and removes its file (a waiter holding the old file just finds it
    /// free; the work it guards is idempotent either way).
    pub fn release_and_remove(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Whether someone holds the lock on an existing `path` (never creates it).
pub fn is_locked(path: &Path) -> bool {
    match File::open(path) {
        Ok(f) => matches!(f.try_lock_shared(), Err(fs::TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

/// Waits while someone holds the lock on `path`, polling, for at most `limit`; true if it is
/// free (or absent) at the end.
pub fn wait_unlocked(path: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    let mut step = Duration::from_millis(1);
    while is_locked(path) {
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(step);
        step = (step * 2).min(Duration::from_millis(20));
    }
    true
}

/// Starts this executable again, detached (its own process group, no terminal, stdin and
/// stdout on /dev/null, stderr appended to `log`), with `args`. Does not wait for it.
pub fn spawn_detached(args: &[OsString], log: &Path) -> Result<(), Error> {
    use std::os::unix::process::CommandExt;
    let fail = |what: &str, e: io::Error| {
        Error::new(
            ErrorKind::LocalIo,
            format!("starting a background worker: {what}: {e}"),
        )
    };
    let exe = std::env::current_exe().map_err(|e| fail("finding this executable", e))?;
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| fail(&log.display().to_string(), e))?;
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .map_err(|e| fail("spawn", e))?;
    Ok(())
}

/// Keeps a worker's log from growing without bound: past 4 MiB it starts over.
fn trim_log(log: &Path) {
    if fs::metadata(log).is_ok_and(|m| m.len() > 4 << 20) {
        let _ = fs::remove_file(log);
    }
}

/// Starts a worker (`flag target`, then `worker_args`) logging to `log`, unless one holds
/// `worker_lock` or no `worker_args` were given (an embedding program runs workers itself).
pub fn ensure_worker(
    worker_lock: &Path,
    log: &Path,
    flag: &str,
    target: &Path,
    worker_args: Option<&[OsString]>,
) -> Result<(), Error> {
    let Some(worker_args) = worker_args else {
        return Ok(());
    };
    if is_locked(worker_lock) {
        return Ok(());
    }
    trim_log(log);
    let mut args: Vec<OsString> = vec![flag.into(), target.into()];
    args.extend_from_slice(worker_args);
    spawn_detached(&args, log)
}

/// A local file-system failure on `path`.
pub fn local_io(path: &Path, e: io::Error) -> Error {
    Error::new(ErrorKind::LocalIo, format!("{}: {e}", path.display()))
}

/// This process's peak resident set, from `/proc/self/status` (0 where unavailable).
pub fn peak_rss_kib() -> u64 {
    read_text(Path::new("/proc/self/status"))
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_is_lexical_parent_of_the_wal_dir() {
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(data_dir_of(Path::new("pg_wal")).expect("dir"), cwd);
        assert_eq!(
            data_dir_of(Path::new("/srv/pg/data/pg_wal")).expect("dir"),
            PathBuf::from("/srv/pg/data")
        );
        assert_eq!(
            data_dir_of(Path::new("/srv/pg/data/./pg_wal/")).expect("dir"),
            PathBuf::from("/srv/pg/data")
        );
        assert_eq!(
            wal_dir_of(Path::new("pg_wal/000000010000000000000001")),
            PathBuf::from("pg_wal")
        );
        assert_eq!(wal_dir_of(Path::new("x")), PathBuf::from("."));
    }

    #[test]
    fn locks_exclude_and_waiters_see_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.lock");
        assert!(!is_locked(&path), "an absent lock is free");
        let held = Lock::try_take(&path).expect("lock").expect("free");
        assert!(is_locked(&path));
        assert!(Lock::try_take(&path).expect("lock").is_none());
        assert!(!wait_unlocked(&path, Duration::from_millis(30)));
        held.release_and_remove();
        assert!(wait_unlocked(&path, Duration::from_millis(30)));
        assert!(!path.exists());
    }
}
