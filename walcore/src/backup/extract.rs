//! Extraction of a backup's tar archives into directories they cannot leave.
//!
//! A backup's archives are outside input, and a restore may run as root. So:
//! - paths are relative, without `.` or `..` (checked by [`super::tar`]);
//! - every directory on an entry's path is opened from the destination's root one component
//!   at a time, without following links (`openat` with `O_NOFOLLOW | O_DIRECTORY`): a link on
//!   the way, whoever made it, stops the restore instead of leading elsewhere;
//! - files are created with `O_CREAT | O_EXCL | O_NOFOLLOW` inside the directory so opened,
//!   never through a link and never over an existing file;
//! - the only links written are the ones PostgreSQL writes: `pg_tblspc/OID` in `base.tar` for a
//!   tablespace of the backup, pointed at that tablespace's restored location; a `pg_wal` link
//!   becomes a plain directory inside the data directory. Any other symbolic link is refused,
//!   and hard links are refused by the tar reader;
//! - sizes in headers are not trusted for memory: only `global/pg_control` is held in memory
//!   (to be written last), and only up to [`PG_CONTROL_MAX`] bytes.
//!
//! Run as root with an [`Owner`], every directory, file and link created is given to that owner
//! as it is created, so PostgreSQL (which refuses to run as root) can start on the result.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use super::catalog::ObjectEntry;
use super::tar::{Entry, EntryKind, TarError, TarReader, TarSink};
use crate::error::{Error, ErrorKind, local};
use crate::owner::Owner;
use crate::repo::Repository;

/// The most `global/pg_control` may hold: PostgreSQL writes 8 KiB (`PG_CONTROL_FILE_SIZE`).
pub const PG_CONTROL_MAX: u64 = 64 * 1024;

/// Whether `dir` is an empty directory (`true`) or absent (`false`); an error naming it when it
/// holds anything, is not a directory, or cannot be read.
pub(super) fn check_empty_dir(dir: &Path, what: &str) -> Result<bool, Error> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "{what} {} is not empty; restore only into an empty or new directory \
                         (nothing was changed)",
                        dir.display()
                    ),
                ));
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{what} {} is not a directory", dir.display()),
        )),
        Err(e) => Err(local(dir, "reading", e)),
    }
}

/// Creates `dir` (mode 0700), or gives an empty one mode 0700: PostgreSQL refuses a data
/// directory that others can read. With an owner, gives it to that owner.
pub(super) fn prepare_empty_dir(dir: &Path, what: &str, owner: Option<Owner>) -> Result<(), Error> {
    if check_empty_dir(dir, what)? {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| local(dir, "setting the mode of", e))?;
    } else {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| local(dir, "creating", e))?;
    }
    if let Some(o) = owner {
        o.give_path(dir)
            .map_err(|e| local(dir, &format!("giving to {o}"), e))?;
    }
    Ok(())
}

/// Gives files written after the extraction (settings, signal files) to `owner`.
pub(super) fn give_to(owner: Option<Owner>, paths: &[PathBuf]) -> Result<(), Error> {
    if let Some(o) = owner {
        for p in paths {
            o.give_path(p)
                .map_err(|e| local(p, &format!("giving to {o}"), e))?;
        }
    }
    Ok(())
}

/// Why extraction stopped.
#[derive(Debug)]
pub(super) enum ExtractError {
    /// The tar stream is malformed.
    Tar(TarError),
    /// An entry is not one a restore may write (a link, a path through a link, an oversized
    /// `pg_control`).
    Refused { entry: String, why: String },
    /// The file system failed.
    Io(Error),
}

impl From<TarError> for ExtractError {
    fn from(e: TarError) -> ExtractError {
        ExtractError::Tar(e)
    }
}

impl std::fmt::Display for ExtractError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExtractError::Tar(t) => write!(f, "{t}"),
            ExtractError::Refused { entry, why } => write!(f, "entry {entry:?}: {why}"),
            ExtractError::Io(e) => write!(f, "{e}"),
        }
    }
}

fn refuse(entry: &Entry, why: impl Into<String>) -> ExtractError {
    ExtractError::Refused {
        entry: entry.path.clone(),
        why: why.into(),
    }
}

fn io_at(path: &Path, doing: &str, e: impl Into<std::io::Error>) -> ExtractError {
    ExtractError::Io(local(path, doing, e.into()))
}

/// Flags of a directory opened on the way to an entry: never through a link.
fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Writes the entries of one archive under a directory.
#[derive(Debug)]
pub(super) struct FileSink {
    root: PathBuf,
    /// The root, opened once: every path is resolved from it.
    root_fd: Option<OwnedFd>,
    /// The directory of the last entry, opened (entries come grouped by directory).
    last_dir: Option<(String, OwnedFd)>,
    /// `base.tar` (the only archive that may hold links).
    is_base: bool,
    /// For `base.tar`: where each tablespace's `pg_tblspc/OID` link points.
    links: HashMap<u32, PathBuf>,
    owner: Option<Owner>,
    /// For `base.tar`: `global/pg_control`, kept in memory to be written last.
    pub(super) pg_control: Option<Vec<u8>>,
    holding: bool,
    file: Option<(File, PathBuf)>,
    /// Each finished file goes to the sync threads, so writeback overlaps extraction (`None`
    /// once released: then files are synced here).
    syncer: Option<std::sync::mpsc::SyncSender<(File, PathBuf)>>,
    pub(super) files: u64,
    /// Directories created, to fsync at the end.
    pub(super) dirs: Vec<PathBuf>,
    pub(super) bytes: u64,
}

impl FileSink {
    /// A sink writing under `root` (an empty directory [`prepare_empty_dir`] made). `links`
    /// (for `base.tar`) maps tablespace OIDs to their restored locations.
    pub(super) fn new(
        root: PathBuf,
        is_base: bool,
        links: HashMap<u32, PathBuf>,
        owner: Option<Owner>,
        syncer: &Syncer,
    ) -> FileSink {
        FileSink {
            root,
            root_fd: None,
            last_dir: None,
            is_base,
            links: if is_base { links } else { HashMap::new() },
            owner,
            pg_control: None,
            holding: false,
            file: None,
            syncer: Some(syncer.tx.clone()),
            files: 0,
            dirs: Vec::new(),
            bytes: 0,
        }
    }

    #[cfg(test)]
    /// Lets go of the sync threads, so that [`Syncer::finish`] can end while this sink lives.
    pub(super) fn release(&mut self) {
        self.syncer = None;
    }

    fn give(&self, fd: &OwnedFd, path: &Path) -> Result<(), ExtractError> {
        match self.owner {
            Some(o) => o
                .give_fd(fd)
                .map_err(|e| io_at(path, &format!("giving to {o}"), e)),
            None => Ok(()),
        }
    }

    /// The directory `dir` (relative, `""` for the root), opened; missing directories on the
    /// way are created (0700). A component that is a link or not a directory is refused.
    fn open_dir(&mut self, dir: &str, entry: &Entry) -> Result<&OwnedFd, ExtractError> {
        if dir.is_empty() {
            if self.root_fd.is_none() {
                let fd = rustix::fs::open(
                    &self.root,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io_at(&self.root, "opening", e))?;
                self.root_fd = Some(fd);
            }
            return self
                .root_fd
                .as_ref()
                .ok_or_else(|| refuse(entry, "the destination directory could not be opened"));
        }
        if self.last_dir.as_ref().is_none_or(|(d, _)| d != dir) {
            self.last_dir = None;
            let mut cur = self
                .open_dir("", entry)?
                .try_clone()
                .map_err(|e| io_at(&self.root, "opening", e))?;
            let mut walked = String::new();
            for comp in dir.split('/') {
                if !walked.is_empty() {
                    walked.push('/');
                }
                walked.push_str(comp);
                let path = self.root.join(&walked);
                cur = match rustix::fs::openat(&cur, comp, dir_flags(), Mode::empty()) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => {
                        match rustix::fs::mkdirat(&cur, comp, Mode::from_raw_mode(0o700)) {
                            Ok(()) | Err(Errno::EXIST) => {}
                            Err(e) => return Err(io_at(&path, "creating", e)),
                        }
                        let fd = rustix::fs::openat(&cur, comp, dir_flags(), Mode::empty())
                            .map_err(|e| io_at(&path, "opening", e))?;
                        self.give(&fd, &path)?;
                        self.dirs.push(path);
                        fd
                    }
                    Err(Errno::LOOP | Errno::NOTDIR) => {
                        return Err(refuse(
                            entry,
                            format!(
                                "{walked} is a link or not a directory; nothing is written \
                                 through a link"
                            ),
                        ));
                    }
                    Err(e) => return Err(io_at(&path, "opening", e)),
                };
            }
            self.last_dir = Some((dir.to_owned(), cur));
        }
        self.last_dir
            .as_ref()
            .map(|(_, fd)| fd)
            .ok_or_else(|| refuse(entry, "its directory could not be opened"))
    }

    /// Creates directory `name` in `parent` (or accepts one already there, not a link).
    fn make_dir(&mut self, entry: &Entry, path: PathBuf, mode: u32) -> Result<(), ExtractError> {
        let (dir, name) = split(&entry.path);
        let owner = self.owner;
        let parent = self.open_dir(dir, entry)?;
        match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(mode)) {
            Ok(()) => {
                if let Some(o) = owner {
                    rustix::fs::chownat(
                        parent,
                        name,
                        Some(rustix::fs::Uid::from_raw(o.uid)),
                        Some(rustix::fs::Gid::from_raw(o.gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| io_at(&path, &format!("giving to {o}"), e))?;
                }
                self.dirs.push(path);
                Ok(())
            }
            Err(Errno::EXIST) => {
                let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| io_at(&path, "reading", e))?;
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::Directory
                {
                    Ok(())
                } else {
                    Err(refuse(
                        entry,
                        "a directory entry where a non-directory exists",
                    ))
                }
            }
            Err(e) => Err(io_at(&path, "creating", e)),
        }
    }

    /// A symbolic link entry: only `pg_tblspc/OID` of a tablespace of the backup, and
    /// `pg_wal`, in `base.tar`.
    fn link(&mut self, entry: &Entry, path: PathBuf) -> Result<(), ExtractError> {
        let allowed = "a backup may hold symbolic links only at pg_tblspc/OID (its tablespaces) \
                       and pg_wal; a link elsewhere could lead the restore outside the data \
                       directory";
        if !self.is_base {
            return Err(refuse(
                entry,
                format!(
                    "a symbolic link (to {:?}) in a tablespace archive; {allowed}",
                    entry.link
                ),
            ));
        }
        if entry.path == "pg_wal" {
            // WAL goes into the data directory, never where the source's link pointed.
            return self.make_dir(entry, path, 0o700);
        }
        let oid = entry
            .path
            .strip_prefix("pg_tblspc/")
            .and_then(|o| o.parse::<u32>().ok());
        let Some(oid) = oid else {
            return Err(refuse(
                entry,
                format!("a symbolic link to {:?}; {allowed}", entry.link),
            ));
        };
        let Some(target) = self.links.get(&oid).cloned() else {
            return Err(refuse(
                entry,
                format!(
                    "a link for tablespace {oid}, which the backup's catalog record does not list"
                ),
            ));
        };
        let (dir, name) = split(&entry.path);
        let owner = self.owner;
        let parent = self.open_dir(dir, entry)?;
        rustix::fs::symlinkat(&target, parent, name)
            .map_err(|e| io_at(&path, "creating the symbolic link", e))?;
        if let Some(o) = owner {
            rustix::fs::chownat(
                parent,
                name,
                Some(rustix::fs::Uid::from_raw(o.uid)),
                Some(rustix::fs::Gid::from_raw(o.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io_at(&path, &format!("giving to {o}"), e))?;
        }
        Ok(())
    }
}

/// `a/b/c` → (`a/b`, `c`); `c` → (`""`, `c`).
fn split(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((dir, name)) => (dir, name),
        None => ("", path),
    }
}

impl TarSink for FileSink {
    type Error = ExtractError;

    fn entry(&mut self, entry: &Entry) -> Result<(), ExtractError> {
        let path = self.root.join(&entry.path);
        match entry.kind {
            EntryKind::Directory => self.make_dir(entry, path, entry.mode & 0o777 | 0o700)?,
            EntryKind::Symlink => self.link(entry, path)?,
            EntryKind::File => {
                if self.is_base && entry.path == "global/pg_control" {
                    if entry.size > PG_CONTROL_MAX {
                        return Err(refuse(
                            entry,
                            format!(
                                "{} bytes, but pg_control holds at most {PG_CONTROL_MAX}",
                                entry.size
                            ),
                        ));
                    }
                    self.pg_control = Some(Vec::new());
                    self.holding = true;
                    return Ok(());
                }
                let (dir, name) = split(&entry.path);
                let parent = self.open_dir(dir, entry)?;
                let fd = rustix::fs::openat(
                    parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(entry.mode & 0o777 | 0o600),
                )
                .map_err(|e| io_at(&path, "creating", e))?;
                self.give(&fd, &path)?;
                self.file = Some((File::from(fd), path));
            }
        }
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), ExtractError> {
        self.bytes += bytes.len() as u64;
        if self.holding {
            if let Some(buf) = &mut self.pg_control {
                buf.extend_from_slice(bytes);
            }
            return Ok(());
        }
        match &mut self.file {
            Some((f, path)) => f
                .write_all(bytes)
                .map_err(|e| ExtractError::Io(local(path, "writing", e))),
            None => Ok(()),
        }
    }

    fn end_entry(&mut self) -> Result<(), ExtractError> {
        self.holding = false;
        if let Some(done) = self.file.take() {
            self.files += 1;
            // The sync threads only stop after the extraction, so a send cannot fail before;
            // if it did, or the sink was released, the file is synced here instead.
            let unsent = match &self.syncer {
                Some(tx) => tx.send(done).err().map(|e| e.0),
                None => Some(done),
            };
            if let Some((f, path)) = unsent {
                f.sync_all()
                    .map_err(|e| ExtractError::Io(local(&path, "syncing", e)))?;
            }
        }
        Ok(())
    }
}

/// A [`TarReader`] and its [`FileSink`] as one `Write`, for the decoder's output.
#[derive(Debug)]
struct Extractor {
    tar: TarReader,
    sink: FileSink,
    failure: Option<ExtractError>,
}

impl Write for Extractor {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Err(e) = self.tar.feed(buf, &mut self.sink) {
            let text = e.to_string();
            self.failure = Some(e);
            return Err(std::io::Error::other(text));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The public error for an extraction that stopped on `e`, in archive object `key`.
fn extract_error(key: &str, e: ExtractError) -> Error {
    match e {
        ExtractError::Io(e) => e,
        ExtractError::Tar(_) => {
            Error::new(ErrorKind::Integrity, format!("backup object {key}: {e}"))
        }
        ExtractError::Refused { .. } => Error::new(
            ErrorKind::Integrity,
            format!("backup object {key}: refused {e}; nothing was written outside the restore"),
        ),
    }
}

/// Decodes one archive object into `sink`'s directory, verifying it against its catalog entry.
pub(super) async fn extract(
    repo: &Repository,
    object: &ObjectEntry,
    sink: FileSink,
) -> Result<FileSink, Error> {
    let store = repo.store().describe();
    let key = object.key.clone();
    let reader = repo
        .with_retry(&format!("opening {key}"), || async {
            repo.store()
                .open_reader(&key)
                .await
                .map_err(|e| e.into_error("reading", &key, &store))
        })
        .await
        .map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                Error::new(
                    ErrorKind::Integrity,
                    format!("backup object {key} is missing from {store}"),
                )
            } else {
                e
            }
        })?;
    let codec = repo.codec().clone();
    let entry = object.clone();
    tokio::task::spawn_blocking(move || {
        let mut ex = Extractor {
            tar: TarReader::new(),
            sink,
            failure: None,
        };
        let decoded = codec.decode(&entry.key, reader, &mut ex);
        match (decoded, ex.failure.take()) {
            (Err(_), Some(e)) => return Err(extract_error(&entry.key, e)),
            (Err(e), None) => {
                return Err(Error::from(e).context(format!("backup object {}", entry.key)));
            }
            (Ok(summary), _) => {
                if summary.plaintext_len != entry.plaintext_len
                    || summary.plaintext_crc != entry.plaintext_crc32
                {
                    return Err(Error::new(
                        ErrorKind::Integrity,
                        format!(
                            "backup object {} holds {} bytes with CRC-32 {:08x}, but the catalog \
                             records {} bytes with CRC-32 {:08x}",
                            entry.key,
                            summary.plaintext_len,
                            summary.plaintext_crc,
                            entry.plaintext_len,
                            entry.plaintext_crc32
                        ),
                    ));
                }
            }
        }
        ex.tar
            .finish()
            .map_err(|t| extract_error(&entry.key, ExtractError::Tar(t)))?;
        Ok(ex.sink)
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Internal, format!("an extract task failed: {e}")))?
}

/// fsyncs every path, on a few threads (the calls wait on the disk, not the CPU).
pub(super) fn sync_all(paths: &[PathBuf]) -> Result<(), Error> {
    if paths.is_empty() {
        return Ok(());
    }
    let threads = 4.min(paths.len());
    let per = paths.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = paths
            .chunks(per)
            .map(|part| {
                scope.spawn(move || -> Result<(), Error> {
                    for p in part {
                        File::open(p)
                            .and_then(|f| f.sync_all())
                            .map_err(|e| local(p, "syncing", e))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| {
                Error::new(ErrorKind::Internal, "a sync thread panicked".to_owned())
            })??;
        }
        Ok(())
    })
}

/// Threads that fsync finished files while extraction goes on (their calls wait on the
/// disk, not the CPU), keeping the first failure.
#[derive(Debug)]
pub(super) struct Syncer {
    tx: std::sync::mpsc::SyncSender<(File, PathBuf)>,
    threads: Vec<std::thread::JoinHandle<Result<(), Error>>>,
}

impl Syncer {
    const THREADS: usize = 4;
    /// Finished files waiting for a sync thread, each holding a descriptor: when the disk
    /// falls behind, extraction waits rather than opening files without bound.
    const QUEUE: usize = 64;

    pub(super) fn start() -> Syncer {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(File, PathBuf)>(Syncer::QUEUE);
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let threads = (0..Syncer::THREADS)
            .map(|_| {
                let rx = std::sync::Arc::clone(&rx);
                std::thread::spawn(move || -> Result<(), Error> {
                    let mut first = Ok(());
                    loop {
                        let next = match rx.lock() {
                            Ok(guard) => guard.recv(),
                            Err(_) => break,
                        };
                        let Ok((file, path)) = next else { break };
                        if first.is_ok()
                            && let Err(e) = file.sync_all()
                        {
                            first = Err(local(&path, "syncing", e));
                        }
                    }
                    first
                })
            })
            .collect();
        Syncer { tx, threads }
    }

    /// Waits until every file sent has been synced.
    pub(super) fn finish(self) -> Result<(), Error> {
        drop(self.tx);
        let mut result = Ok(());
        for t in self.threads {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(Error::new(ErrorKind::Internal, "a sync thread panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

/// Writes a new file with `bytes`, mode 0600, never through a link; with an owner, gives it to
/// that owner.
pub(super) fn write_new(path: &Path, bytes: &[u8], owner: Option<Owner>) -> Result<(), Error> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(OFlags::NOFOLLOW.bits() as i32)
        .mode(0o600)
        .open(path)
        .map_err(|e| local(path, "creating", e))?;
    if let Some(o) = owner {
        o.give_fd(&f)
            .map_err(|e| local(path, &format!("giving to {o}"), e))?;
    }
    f.write_all(bytes).map_err(|e| local(path, "writing", e))
}

#[cfg(test)]
#[path = "extract_tests.rs"]
mod tests;
