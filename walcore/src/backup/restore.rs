//! `walcore-basebackup restore`: a backup from the catalog into an empty directory, with the
//! recovery settings that bring the database to the chosen target when PostgreSQL starts.
//!
//! Order matters for an interrupted restore: every file but `global/pg_control` is written and
//! fsynced first, then the manifest and the recovery settings, and `pg_control` last. Until it
//! is there, PostgreSQL refuses to start on the directory.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::catalog::{ObjectEntry, ObjectKind};
use super::plan::{self, ArchiveMode, Request, RestorePlan};
use super::tar::{Entry, EntryKind, TarError, TarReader, TarSink};
use crate::error::{Error, ErrorKind, local};
use crate::repo::Repository;

/// What `restore` is asked to do.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The new data directory: absent or empty.
    pub pgdata: PathBuf,
    /// The backup, target, timeline, archiving and `restore_command` wanted.
    pub request: Request,
    /// Tablespace locations to move: the location in the backup, and where to put it.
    pub tablespace_map: Vec<(String, PathBuf)>,
    /// Print the plan, write nothing.
    pub dry_run: bool,
}

/// What a restore did (or, for a dry run, would do).
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub plan: RestorePlan,
    pub files: u64,
    pub bytes: u64,
    /// Settings found in the backup's `postgresql.auto.conf` that the restore removed (names).
    pub removed_settings: Vec<String>,
    /// Files of an earlier recovery the backup carried, moved out of the way.
    pub leftovers: Vec<String>,
    /// Whether and where the restored server will archive, in words.
    pub archiving: String,
}

/// Quotes a word for `/bin/sh`.
pub fn sh_quote(value: &str) -> String {
    if !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=,+@%".contains(&b))
    {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\'', "'\\''"))
}

/// Whether `dir` is an empty directory (`true`) or absent (`false`); an error naming it when it
/// holds anything, is not a directory, or cannot be read.
fn check_empty_dir(dir: &Path, what: &str) -> Result<bool, Error> {
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
/// directory that others can read.
fn prepare_empty_dir(dir: &Path, what: &str) -> Result<(), Error> {
    if check_empty_dir(dir, what)? {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| local(dir, "setting the mode of", e))
    } else {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| local(dir, "creating", e))
    }
}

/// Why extraction stopped.
#[derive(Debug)]
enum ExtractError {
    Tar(TarError),
    Io(Error),
}

impl From<TarError> for ExtractError {
    fn from(e: TarError) -> ExtractError {
        ExtractError::Tar(e)
    }
}

/// Writes the entries of one archive under a directory.
#[derive(Debug)]
struct FileSink {
    root: PathBuf,
    /// For `base.tar`: where each tablespace's `pg_tblspc/OID` link points.
    links: HashMap<u32, PathBuf>,
    /// For `base.tar`: keep `global/pg_control` in memory, to write it last.
    hold_pg_control: bool,
    pg_control: Option<Vec<u8>>,
    holding: bool,
    file: Option<(File, PathBuf)>,
    /// Each finished file goes to the sync threads, so writeback overlaps extraction.
    syncer: std::sync::mpsc::SyncSender<(File, PathBuf)>,
    files: u64,
    dirs: Vec<PathBuf>,
    bytes: u64,
}

impl FileSink {
    fn io(&self, path: &Path, doing: &str, e: std::io::Error) -> ExtractError {
        ExtractError::Io(local(path, doing, e))
    }

    fn ensure_parent(&mut self, path: &Path) -> Result<(), ExtractError> {
        if let Some(parent) = path.parent()
            && !parent.exists()
        {
            fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(parent)
                .map_err(|e| self.io(parent, "creating", e))?;
            self.dirs.push(parent.to_path_buf());
        }
        Ok(())
    }
}

impl TarSink for FileSink {
    type Error = ExtractError;

    fn entry(&mut self, entry: &Entry) -> Result<(), ExtractError> {
        let path = self.root.join(&entry.path);
        match entry.kind {
            EntryKind::Directory => {
                self.ensure_parent(&path)?;
                match fs::DirBuilder::new()
                    .mode(entry.mode & 0o777 | 0o700)
                    .create(&path)
                {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
                    Err(e) => return Err(self.io(&path, "creating", e)),
                }
                self.dirs.push(path);
            }
            EntryKind::Symlink => {
                self.ensure_parent(&path)?;
                let oid = entry
                    .path
                    .strip_prefix("pg_tblspc/")
                    .and_then(|o| o.parse::<u32>().ok());
                let target = match oid.and_then(|o| self.links.get(&o)) {
                    Some(t) => t.clone(),
                    None => PathBuf::from(&entry.link),
                };
                std::os::unix::fs::symlink(&target, &path)
                    .map_err(|e| self.io(&path, "creating the symbolic link", e))?;
            }
            EntryKind::File => {
                if self.hold_pg_control && entry.path == "global/pg_control" {
                    self.pg_control = Some(Vec::with_capacity(entry.size as usize));
                    self.holding = true;
                    return Ok(());
                }
                self.ensure_parent(&path)?;
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(entry.mode & 0o777 | 0o600)
                    .open(&path)
                    .map_err(|e| self.io(&path, "creating", e))?;
                self.file = Some((f, path));
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
            // if it did, the file is synced here instead.
            if let Err(std::sync::mpsc::SendError((f, path))) = self.syncer.send(done) {
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
            let text = match &e {
                ExtractError::Tar(t) => t.to_string(),
                ExtractError::Io(e) => e.to_string(),
            };
            self.failure = Some(e);
            return Err(std::io::Error::other(text));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Decodes one archive object into `sink`'s directory, verifying it against its catalog entry.
async fn extract(
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
            (Err(_), Some(ExtractError::Io(e))) => return Err(e),
            (Err(_), Some(ExtractError::Tar(t))) => {
                return Err(Error::new(
                    ErrorKind::Integrity,
                    format!("backup object {}: {t}", entry.key),
                ));
            }
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
        ex.tar.finish().map_err(|t| {
            Error::new(
                ErrorKind::Integrity,
                format!("backup object {}: {t}", entry.key),
            )
        })?;
        Ok(ex.sink)
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Internal, format!("an extract task failed: {e}")))?
}

/// fsyncs every path, on a few threads (the calls wait on the disk, not the CPU).
fn sync_all(paths: &[PathBuf]) -> Result<(), Error> {
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
struct Syncer {
    tx: std::sync::mpsc::SyncSender<(File, PathBuf)>,
    threads: Vec<std::thread::JoinHandle<Result<(), Error>>>,
}

impl Syncer {
    const THREADS: usize = 4;
    /// Finished files waiting for a sync thread, each holding a descriptor: when the disk
    /// falls behind, extraction waits rather than opening files without bound.
    const QUEUE: usize = 64;

    fn start() -> Syncer {
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
    fn finish(self) -> Result<(), Error> {
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

/// Writes a new file with `bytes`, mode 0600.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| local(path, "creating", e))?;
    f.write_all(bytes).map_err(|e| local(path, "writing", e))
}

/// Restores a backup as `options` say: plans, then (unless it is a dry run) executes the plan.
pub async fn restore(repo: &Repository, options: &RestoreOptions) -> Result<RestoreReport, Error> {
    let began = Instant::now();
    let pgdata = &options.pgdata;
    // Check everything that can be checked before writing anything.
    check_empty_dir(pgdata, "data directory")?;
    let facts = plan::gather(repo, &options.request).await?;
    let plan = plan::plan(&facts, &options.request)?;
    if options.dry_run {
        return Ok(RestoreReport {
            archiving: archiving_summary(None, &plan),
            plan,
            files: 0,
            bytes: 0,
            removed_settings: Vec::new(),
            leftovers: Vec::new(),
        });
    }
    if std::os::unix::fs::MetadataExt::uid(
        &fs::metadata("/proc/self").map_err(|e| local(Path::new("/proc/self"), "reading", e))?,
    ) == 0
    {
        tracing::warn!(
            "restoring as root: the files will belong to root, and PostgreSQL will not start on \
             them until they belong to its user (chown -R postgres: {}); run the restore as \
             that user instead",
            pgdata.display()
        );
    }
    let chosen = plan.backup.clone();
    tracing::info!(backup = %chosen.id, "restoring {}: {}", chosen.id, plan.reason);
    for note in &plan.notes {
        tracing::warn!("{note}");
    }

    let mut links = HashMap::new();
    let mut destinations = HashMap::new();
    for (old, _) in &options.tablespace_map {
        if !chosen.tablespaces.iter().any(|t| &t.location == old) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "--tablespace-map {old}=…: backup {} has no tablespace at {old} (it has: {})",
                    chosen.id,
                    chosen
                        .tablespaces
                        .iter()
                        .map(|t| t.location.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    for t in &chosen.tablespaces {
        let dest = options
            .tablespace_map
            .iter()
            .find(|(old, _)| *old == t.location)
            .map_or_else(|| PathBuf::from(&t.location), |(_, new)| new.clone());
        if !dest.is_absolute() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("tablespace location {} is not absolute", dest.display()),
            ));
        }
        links.insert(t.oid, dest.clone());
        destinations.insert(t.archive.clone(), dest);
    }
    prepare_empty_dir(pgdata, "data directory")?;
    for dest in destinations.values() {
        prepare_empty_dir(dest, "tablespace directory")?;
    }

    // Every archive at once: each decodes on the codec's threads while the others download.
    let syncer = Syncer::start();
    let mut tasks = Vec::new();
    for object in chosen
        .objects
        .iter()
        .filter(|o| o.kind == ObjectKind::Archive)
    {
        let is_base = object.name == "base.tar";
        let root = if is_base {
            pgdata.clone()
        } else {
            destinations.get(&object.name).cloned().ok_or_else(|| {
                Error::new(
                    ErrorKind::Integrity,
                    format!(
                        "catalog record of backup {}: archive {} belongs to no tablespace",
                        chosen.id, object.name
                    ),
                )
            })?
        };
        let sink = FileSink {
            root,
            links: if is_base {
                links.clone()
            } else {
                HashMap::new()
            },
            hold_pg_control: is_base,
            pg_control: None,
            holding: false,
            file: None,
            syncer: syncer.tx.clone(),
            files: 0,
            dirs: Vec::new(),
            bytes: 0,
        };
        let repo = repo.clone();
        let object = object.clone();
        tasks.push(tokio::spawn(
            async move { extract(&repo, &object, sink).await },
        ));
    }
    let mut written = Vec::new();
    let mut files = 0;
    let mut dirs = vec![pgdata.clone()];
    dirs.extend(destinations.values().cloned());
    let mut pg_control = None;
    let mut bytes = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(Ok(sink)) => {
                files += sink.files;
                dirs.extend(sink.dirs);
                bytes += sink.bytes;
                if sink.pg_control.is_some() {
                    pg_control = sink.pg_control;
                }
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(Error::new(
                    ErrorKind::Internal,
                    format!("an extract task failed: {e}"),
                ));
            }
        }
    }
    let synced = tokio::task::spawn_blocking(move || syncer.finish())
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("a sync task failed: {e}")))?;
    if let Some(e) = first_error.or(synced.err()) {
        return Err(e.context(format!(
            "restoring backup {} into {} failed; the directory has no pg_control and will not \
             start: empty it before trying again",
            chosen.id,
            pgdata.display()
        )));
    }
    let pg_control = pg_control.ok_or_else(|| {
        Error::new(
            ErrorKind::Integrity,
            format!("backup {}: base.tar holds no global/pg_control", chosen.id),
        )
    })?;

    if let Some(m) = chosen.manifest() {
        let key = m.key.clone();
        let manifest = repo
            .with_retry(&format!("reading {key}"), || repo.get_small(&key))
            .await?;
        if manifest.len() as u64 != m.plaintext_len
            || crc32fast::hash(&manifest) != m.plaintext_crc32
        {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!("backup object {key} does not match its catalog entry"),
            ));
        }
        let path = pgdata.join("backup_manifest");
        write_new(&path, &manifest)?;
        written.push(path);
    }
    let auto = pgdata.join("postgresql.auto.conf");
    let existing = match fs::read_to_string(&auto) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(local(&auto, "reading", e)),
    };
    let (conf, removed_settings) = plan::rewrite_auto_conf(
        &existing,
        &plan,
        &chrono::Utc::now()
            .format("%Y-%m-%d %H:%M:%S+00")
            .to_string(),
    );
    replace_file(&auto, conf.as_bytes())?;
    written.push(auto);
    let leftovers = set_aside_leftovers(pgdata)?;
    let archiving = archiving_summary(Some(pgdata), &plan);
    let signal = pgdata.join("recovery.signal");
    write_new(&signal, b"")?;
    written.push(signal);

    let files = files + written.len() as u64 + 1;
    tokio::task::spawn_blocking(move || -> Result<(), Error> {
        sync_all(&written)?;
        sync_all(&dirs)?;
        Ok(())
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Internal, format!("a sync task failed: {e}")))??;
    // Last: pg_control, which makes the directory a data directory PostgreSQL will start on.
    let global = pgdata.join("global");
    let control = global.join("pg_control");
    write_new(&control, &pg_control)?;
    sync_all(&[control, global, pgdata.clone()])?;
    tracing::info!(
        backup = %chosen.id,
        files,
        bytes,
        seconds = format!("{:.1}", began.elapsed().as_secs_f64()),
        "restored; start PostgreSQL on {} to recover to {}",
        pgdata.display(),
        plan.target.describe()
    );
    if !removed_settings.is_empty() {
        tracing::info!(
            "removed from the backup's postgresql.auto.conf: {}",
            removed_settings.join(", ")
        );
    }
    Ok(RestoreReport {
        plan,
        files,
        bytes,
        removed_settings,
        leftovers,
        archiving,
    })
}

/// Replaces `path` with `bytes` (mode 0600) through a temporary file renamed over it.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let temp = path.with_extension("walcore-new");
    let _ = fs::remove_file(&temp);
    write_new(&temp, bytes)?;
    fs::rename(&temp, path).map_err(|e| local(path, "renaming into", e))
}

/// Files of an earlier recovery that a backup may carry and that would change how this one
/// runs: `recovery.conf` (PostgreSQL 12 and later refuse to start beside it) is renamed, and
/// `standby.signal` (which would keep the server a standby that never reaches its target) is
/// removed. Returns what was done, in words.
fn set_aside_leftovers(pgdata: &Path) -> Result<Vec<String>, Error> {
    let mut done = Vec::new();
    let conf = pgdata.join("recovery.conf");
    if fs::symlink_metadata(&conf).is_ok() {
        let aside = pgdata.join("recovery.conf.walcore-disabled");
        fs::rename(&conf, &aside).map_err(|e| local(&conf, "renaming", e))?;
        done.push("recovery.conf renamed to recovery.conf.walcore-disabled".to_owned());
    }
    let standby = pgdata.join("standby.signal");
    if fs::symlink_metadata(&standby).is_ok() {
        fs::remove_file(&standby).map_err(|e| local(&standby, "removing", e))?;
        done.push("standby.signal removed".to_owned());
    }
    Ok(done)
}

/// Whether the restored server will archive, and where, in words: from the plan and, when the
/// configuration lives in the data directory, from its `archive_mode` and `archive_command`
/// (whose value is never repeated: it may hold credentials).
fn archiving_summary(pgdata: Option<&Path>, plan: &RestorePlan) -> String {
    if plan.archive_mode == ArchiveMode::Off {
        return "archive_mode = off (--archive-mode off): this copy archives nothing, so it \
                cannot add its own timeline to the repository"
            .to_owned();
    }
    let mut mode = None;
    let mut command = None;
    for file in ["postgresql.conf", "postgresql.auto.conf"] {
        let Some(text) = pgdata.and_then(|d| fs::read_to_string(d.join(file)).ok()) else {
            continue;
        };
        for line in text.lines() {
            let Some((name, value)) = line.split_once('=') else {
                continue;
            };
            let name = name.trim().to_ascii_lowercase();
            let value = value
                .split('#')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('\'');
            match name.as_str() {
                "archive_mode" => mode = Some(value.to_ascii_lowercase()),
                "archive_command" => command = Some(value.to_owned()),
                _ => {}
            }
        }
    }
    let archives = mode.as_deref().is_some_and(|m| m == "on" || m == "always");
    let walcore = command
        .as_deref()
        .is_some_and(|c| c.contains("walcore-archive"));
    if archives && walcore {
        "archive_mode is on and archive_command runs walcore-archive (--archive-mode preserve): \
         once promoted, this server archives its new timeline into the repository that command \
         names, as its source did, and recovery_target_timeline = 'latest' restores from that \
         repository will follow it; restore clones and drills with --archive-mode off"
            .to_owned()
    } else if archives {
        "archive_mode is on (--archive-mode preserve): once promoted, this server runs its \
         archive_command; restore clones and drills with --archive-mode off"
            .to_owned()
    } else if mode.is_some() {
        "archive_mode is off in the restored configuration: this server archives nothing".to_owned()
    } else {
        "archive_mode is kept as the server's configuration sets it (--archive-mode preserve); if \
         that configuration archives into this repository, the restored server will add its new \
         timeline there once promoted: restore clones and drills with --archive-mode off"
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(sh_quote("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(sh_quote("a b'c"), "'a b'\\''c'");
    }
}
