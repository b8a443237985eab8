//! A repository in a local (or mounted) file system: `file:///path`.
//!
//! Create-only writes: the object is written to a temporary file beside its final name,
//! fsynced, hard-linked into place (`link` fails if the name exists, atomically), the temporary
//! name removed, and the directory fsynced. A crash leaves at most a temporary file, never a
//! partial object under a real name.
//!
//! Ownership: run as root, the process gives every file and directory it creates to the owner
//! of the repository root (when that is not root), so that a `take` or a manual push run as
//! root leaves objects the PostgreSQL user's hooks can read and write next to. Refusing to run
//! as root would be the other choice; but root is where backups are often scheduled from, and
//! giving each new object to the root directory's owner is what an operator then does by hand.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::recycle::Recycler;
use super::{PutOutcome, StoreError};
use crate::owner::{Owner, running_as_root};

/// Prefix of temporary files; readers and listings skip names starting with it.
pub const TEMP_PREFIX: &str = ".tmp.";
/// Stored objects are readable by the owner and group only, and never written again.
const OBJECT_MODE: u32 = 0o440;

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    /// Files of removed objects to write new ones into (see [`super::recycle`]).
    recycler: Option<Arc<Recycler>>,
}

impl LocalStore {
    pub fn new(root: PathBuf) -> LocalStore {
        LocalStore {
            root,
            recycler: None,
        }
    }

    /// This store, reusing the files of objects removed through [`retire`](Self::retire) for
    /// new objects once they have rested `min_age`, with its pool in directory `prefix`.
    pub fn recycling(&self, prefix: &str, min_age: Duration) -> io::Result<LocalStore> {
        let dir = self
            .path(prefix.trim_end_matches('/'))
            .join(super::recycle::pool_dir_name());
        create_dir_durable(&dir, &self.root, self.new_owner()?)?;
        Ok(LocalStore {
            root: self.root.clone(),
            recycler: Some(Arc::new(Recycler::new(dir, min_age)?)),
        })
    }

    /// Removes objects, keeping their files for new objects when this store recycles; absent
    /// ones are not an error. Returns once the removals are durable (directories fsynced).
    pub fn retire(&self, keys: &[String]) -> Result<(), StoreError> {
        let mut dirs = std::collections::BTreeSet::new();
        for key in keys {
            let path = self.path(key);
            let kept = match &self.recycler {
                Some(r) => r.keep(&path),
                None => Ok(false),
            };
            let removed = match kept {
                Ok(true) => Ok(()),
                Ok(false) => fs::remove_file(&path),
                Err(e) => Err(e),
            };
            match removed {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(StoreError::Permanent(format!(
                        "removing {}: {e}",
                        path.display()
                    )));
                }
            }
            if let Some(dir) = path.parent() {
                dirs.insert(dir.to_path_buf());
            }
        }
        for dir in dirs {
            fsync_dir_after_removal(&dir)
                .map_err(|e| StoreError::Permanent(format!("syncing {}: {e}", dir.display())))?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Who new files and directories must belong to: the root directory's owner when this
    /// process runs as root and the root belongs to someone else; else `None` (keep ours).
    fn new_owner(&self) -> io::Result<Option<Owner>> {
        if !running_as_root() {
            return Ok(None);
        }
        let owner = Owner::of_path(&self.root)?;
        Ok((owner.uid != 0).then_some(owner))
    }

    /// What is wrong with the root, as a message that says what to do about it.
    fn root_problem(&self, e: &io::Error) -> String {
        let root = self.root.display();
        if e.kind() != io::ErrorKind::NotFound {
            return format!("repository root {root}: {e}");
        }
        let user = if running_as_root() {
            "the user PostgreSQL runs as (usually postgres)".to_owned()
        } else {
            let uid = rustix::process::geteuid().as_raw();
            crate::owner::user_name(uid).unwrap_or_else(|| format!("uid {uid}"))
        };
        let owner = if running_as_root() {
            "postgres".to_owned()
        } else {
            user.clone()
        };
        format!(
            "repository root {root} does not exist (or its file system is not mounted): create \
             it, owned by {user}, who runs archive_command and walcore: install -d -m 0700 -o \
             {owner} {root}"
        )
    }

    /// Opens an object for reading. `NotFound` only when the file is absent and the repository
    /// root itself is there (an unmounted or missing root is an error, not an absence).
    pub fn open(&self, key: &str) -> Result<File, StoreError> {
        match File::open(self.path(key)) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::metadata(&self.root) {
                Ok(m) if m.is_dir() => Err(StoreError::NotFound),
                Ok(_) => Err(StoreError::Permanent(format!(
                    "repository root {} is not a directory",
                    self.root.display()
                ))),
                Err(e) => Err(StoreError::Permanent(self.root_problem(&e))),
            },
            Err(e) => Err(io_error(e)),
        }
    }

    /// Reads a whole object.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let mut f = self.open(key)?;
        let mut v = Vec::new();
        f.read_to_end(&mut v).map_err(io_error)?;
        Ok(v)
    }

    /// Writes an object create-only; its bytes come from `produce`. Returns what `produce`
    /// returned, and whether the object was created or already existed (then nothing changed).
    pub fn put_create_with<T, E>(
        &self,
        key: &str,
        produce: impl FnOnce(&mut dyn Write) -> Result<T, E>,
    ) -> Result<(PutOutcome, T), PutError<E>> {
        self.put_create_sweeping(key, true, produce)
    }

    /// [`put_create_with`](Self::put_create_with); `sweep` false skips the removal of other
    /// writers' temporary files for the key (a read of the whole directory), for keys that
    /// only one writer ever writes, in directories that hold many objects.
    pub fn put_create_sweeping<T, E>(
        &self,
        key: &str,
        sweep: bool,
        produce: impl FnOnce(&mut dyn Write) -> Result<T, E>,
    ) -> Result<(PutOutcome, T), PutError<E>> {
        let target = self.path(key);
        let dir = target
            .parent()
            .ok_or_else(|| PutError::Store(StoreError::Permanent(format!("bad key {key}"))))?
            .to_path_buf();
        let owner = self
            .new_owner()
            .map_err(|e| PutError::Store(StoreError::Permanent(self.root_problem(&e))))?;
        create_dir_durable(&dir, &self.root, owner).map_err(|e| PutError::Store(io_error(e)))?;
        let file_name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let reused = self.recycler.as_ref().and_then(|r| r.take());
        let (opened, temp, recycled) = match reused {
            Some((file, path)) => (Ok(file), path, true),
            None => {
                let mut suffix = [0u8; 8];
                getrandom::fill(&mut suffix).map_err(|e| {
                    PutError::Store(StoreError::Permanent(format!("no randomness: {e}")))
                })?;
                let temp = dir.join(format!("{TEMP_PREFIX}{file_name}.{}", hex::encode(suffix)));
                let opened = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(OBJECT_MODE)
                    .open(&temp)
                    .and_then(|file| {
                        if let Some(o) = owner {
                            o.give_fd(&file)?;
                        }
                        Ok(file)
                    });
                (opened, temp, false)
            }
        };
        let result = (|| {
            let file = opened.map_err(|e| PutError::Store(io_error(e)))?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            let value = produce(&mut w).map_err(PutError::Produce)?;
            let mut file = w
                .into_inner()
                .map_err(|e| PutError::Store(io_error(e.into_error())))?;
            if recycled {
                // A removed object's file: cut what is left of its old bytes, and make it
                // read-only as every object is.
                (|| {
                    let len = file.stream_position()?;
                    file.set_len(len)?;
                    file.set_permissions(Permissions::from_mode(OBJECT_MODE))
                })()
                .map_err(|e| PutError::Store(io_error(e)))?;
            }
            file.sync_all().map_err(|e| PutError::Store(io_error(e)))?;
            drop(file);
            let outcome = match fs::hard_link(&temp, &target) {
                Ok(()) => PutOutcome::Created,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => PutOutcome::AlreadyExists,
                // Another writer of this key finished first and swept our temporary file away
                // (see below): the key exists, which is what a create-only write reports.
                Err(e) if e.kind() == io::ErrorKind::NotFound && target.exists() => {
                    PutOutcome::AlreadyExists
                }
                Err(e) => return Err(PutError::Store(io_error(e))),
            };
            Ok((outcome, value))
        })();
        // The temporary name goes whatever happened; the object (if linked) stays.
        let _ = fs::remove_file(&temp);
        let (outcome, value) = result?;
        // Also when the key was already there: a writer killed between its link and this sync
        // leaves an object a crash could still lose, and "already exists" must mean durable.
        fsync_dir(&dir).map_err(|e| PutError::Store(io_error(e)))?;
        // The key exists now, so every other temporary file for it is useless: a writer that
        // was killed left it, or one still writing will find the key taken either way.
        if sweep {
            remove_temporaries_of(&dir, &file_name);
        }
        Ok((outcome, value))
    }

    /// Whether an object exists, and its size.
    pub fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match fs::metadata(self.path(key)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(e)),
        }
    }

    /// Removes an object; an absent one is not an error. The directory is synced, so the
    /// removal outlives a crash.
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error(e)),
        }
        if let Some(dir) = path.parent() {
            fsync_dir_after_removal(dir).map_err(io_error)?;
        }
        Ok(())
    }

    /// Keys under a prefix (a directory), sorted; temporary files are skipped.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let start = self.path(prefix.trim_end_matches('/'));
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_error)?;
                let path = entry.path();
                let name = entry.file_name();
                if name.to_string_lossy().starts_with(TEMP_PREFIX) {
                    continue;
                }
                if entry.file_type().map_err(io_error)?.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(&self.root) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// At most `limit` keys under `prefix` that sort after `after` (all of them for `None`), in
    /// key order; temporary files are skipped. Reads only the directories that can hold such
    /// keys, in order, and stops at `limit`: the first keys after a position, without listing
    /// everything under the prefix.
    pub fn list_after(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let dir = prefix.trim_end_matches('/');
        self.list_after_in(dir, after, limit, &mut out)?;
        Ok(out)
    }

    /// [`list_after`](Self::list_after) below the directory of key prefix `dir`.
    fn list_after_in(
        &self,
        dir: &str,
        after: Option<&str>,
        limit: usize,
        out: &mut Vec<String>,
    ) -> Result<(), StoreError> {
        let entries = match fs::read_dir(self.path(dir)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error(e)),
        };
        // Sorted as their keys sort: the keys inside directory `d` all start with `d/`, which
        // sorts after a sibling file `d.x` although the name `d` sorts before it.
        let mut children: Vec<(String, bool)> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error)?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let key = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            if entry.file_type().map_err(io_error)?.is_dir() {
                children.push((format!("{key}/"), true));
            } else {
                children.push((key, false));
            }
        }
        children.sort();
        for (key, is_dir) in children {
            if out.len() >= limit {
                break;
            }
            if !is_dir {
                if after.is_none_or(|a| key.as_str() > a) {
                    out.push(key);
                }
                continue;
            }
            // Every key below holds `key` (with its slash) as a prefix: all of them sort after
            // `after` when `key` does, none does when `key` sorts before `after` without being
            // a prefix of it; otherwise `after` lies inside.
            let below = match after {
                Some(a) if a.starts_with(&key) => Some(a),
                Some(a) if key.as_str() <= a => continue,
                _ => None,
            };
            self.list_after_in(key.trim_end_matches('/'), below, limit, out)?;
        }
        Ok(())
    }
}

/// A failed create-only write: the store failed, or the producer of the bytes did.
#[derive(Debug)]
pub enum PutError<E> {
    Store(StoreError),
    Produce(E),
}

fn io_error(e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::PermissionDenied => StoreError::Permission(e.to_string()),
        io::ErrorKind::NotFound => StoreError::NotFound,
        _ => StoreError::Permanent(e.to_string()),
    }
}

/// Creates `dir` and its missing parents below `root`, fsyncing each parent whose entries
/// changed, so a new object's directory survives a crash; gives each new one to `owner`.
fn create_dir_durable(dir: &Path, root: &Path, owner: Option<Owner>) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && parent != root
        && parent.starts_with(root)
    {
        create_dir_durable(parent, root, owner)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {
            if let Some(o) = owner {
                o.give_path(dir)?;
            }
            if let Some(parent) = dir.parent() {
                fsync_dir(parent)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the temporary files of object `file_name` in `dir` (best effort).
fn remove_temporaries_of(dir: &Path, file_name: &str) {
    let prefix = format!("{TEMP_PREFIX}{file_name}.");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        if e.file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Fsyncs a directory so that entries created in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    tests::SYNCED_DIRS.with(|d| d.borrow_mut().push(dir.to_path_buf()));
    File::open(dir)?.sync_all()
}

/// Makes the removal of an entry of `dir` durable. A directory that is gone already (another
/// process removed it once it was empty, and synced its parent) holds the removal too: that is
/// success, not an error. Two `expire` runs at once delete the same backup's objects and prune
/// its directory; the second must not fail on the first's pruning.
pub(crate) fn fsync_dir_after_removal(dir: &Path) -> io::Result<()> {
    match fsync_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removal_in_a_directory_pruned_meanwhile_is_durable() {
        let dir = tempfile::tempdir().expect("dir");
        let gone = dir.path().join("backup/20260101T000000Z-0001");
        assert!(
            fsync_dir(&gone).is_err(),
            "the plain sync fails on a missing directory"
        );
        fsync_dir_after_removal(&gone).expect("a pruned directory holds the removal");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").expect("write");
        fsync_dir_after_removal(&file.join("x")).expect_err("other errors stay errors");
    }

    thread_local! {
        /// Directories `fsync_dir` synced on this thread (tests run one per thread).
        pub(super) static SYNCED_DIRS: std::cell::RefCell<Vec<PathBuf>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    /// A writer killed after linking its object but before syncing the directory leaves an
    /// object whose name a crash may still lose. The next write of that key finds it there and
    /// answers "already archived", on which PostgreSQL recycles its segment: the directory
    /// must be synced before that answer, or a crash loses the segment.
    #[test]
    fn already_exists_is_answered_only_once_the_directory_is_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().to_path_buf());
        // The killed writer's object: linked, its directory never synced.
        std::fs::create_dir_all(dir.path().join("wal/x")).expect("mkdir");
        std::fs::write(dir.path().join("wal/x/seg"), b"one").expect("object");
        SYNCED_DIRS.with(|d| d.borrow_mut().clear());
        let (outcome, ()) = store
            .put_create_with("wal/x/seg", |w| w.write_all(b"one"))
            .map_err(|e| format!("{e:?}"))
            .expect("put");
        assert_eq!(outcome, PutOutcome::AlreadyExists);
        let synced = SYNCED_DIRS.with(|d| d.borrow().clone());
        assert!(
            synced.contains(&dir.path().join("wal/x")),
            "answered AlreadyExists without syncing the object's directory: synced {synced:?}"
        );
    }

    #[test]
    fn create_only_never_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().to_path_buf());
        let put = |bytes: &'static [u8]| {
            store
                .put_create_with("a/b/c", |w| w.write_all(bytes))
                .map(|(o, ())| o)
                .map_err(|e| format!("{e:?}"))
        };
        assert_eq!(put(b"one").expect("put"), PutOutcome::Created);
        assert_eq!(put(b"two").expect("put"), PutOutcome::AlreadyExists);
        assert_eq!(store.get("a/b/c").expect("get"), b"one");
        assert_eq!(store.list("a").expect("list"), vec!["a/b/c".to_string()]);
        assert!(matches!(store.get("a/b/d"), Err(StoreError::NotFound)));
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path().join("a/b")).expect("dir").collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn list_after_gives_the_first_keys_after_a_position_in_key_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().to_path_buf());
        let keys = [
            "wal/00000001/00000000/000000010000000000000001",
            "wal/00000001/00000000/000000010000000000000002",
            "wal/00000001/00000000/000000010000000000000002.00000028.backup",
            "wal/00000001/00000000/000000010000000000000004",
            "wal/00000001/00000001/000000010000000100000000",
            "wal/00000002/00000000/000000020000000000000004",
            "wal/history/00000002.history",
            // A directory sorts after a file whose name extends its own.
            "a/b/c",
            "a/b.x",
        ];
        for k in keys {
            store
                .put_create_with(k, |w| w.write_all(b"x"))
                .map_err(|e| format!("{e:?}"))
                .expect("put");
        }
        // A killed writer's temporary file is never listed.
        fs::write(
            dir.path().join(format!(
                "wal/00000001/00000000/{TEMP_PREFIX}000000010000000000000003.00"
            )),
            b"half",
        )
        .expect("temporary");
        let after = |prefix: &str, a: Option<&str>, limit: usize| {
            store.list_after(prefix, a, limit).expect("list_after")
        };
        let tl1 = "wal/00000001/";
        // From the start of a prefix.
        assert_eq!(after(tl1, None, 1), vec![keys[0].to_string()]);
        // After an absent key: the next one, across the `.backup` file and into the next
        // directory as the limit allows.
        let absent = "wal/00000001/00000000/000000010000000000000003";
        assert_eq!(after(tl1, Some(absent), 1), vec![keys[3].to_string()]);
        assert_eq!(
            after(tl1, Some(absent), 10),
            vec![keys[3].to_string(), keys[4].to_string()]
        );
        // After a present key: its own suffixed names come first.
        assert_eq!(
            after(tl1, Some(keys[1]), 2),
            vec![keys[2].to_string(), keys[3].to_string()]
        );
        // Past the last key of the prefix: nothing, not the next timeline's keys.
        assert!(after(tl1, Some(keys[4]), 10).is_empty());
        // The same order as `list`.
        assert_eq!(after("", None, 100), store.list("").expect("list"));
        assert_eq!(after("a", None, 100), vec!["a/b.x", "a/b/c"]);
        assert_eq!(after("a", Some("a/b.x"), 100), vec!["a/b/c"]);
        // An absent prefix holds nothing.
        assert!(after("wal/00000009/", None, 10).is_empty());
    }

    #[test]
    fn as_root_new_objects_belong_to_the_roots_owner() {
        use std::os::unix::fs::MetadataExt;
        if !running_as_root() {
            eprintln!("not root: ownership of new objects cannot be tested");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("repo");
        fs::create_dir(&root).expect("mkdir");
        std::os::unix::fs::chown(&root, Some(4242), Some(4343)).expect("chown");
        let store = LocalStore::new(root.clone());
        store
            .put_create_with("catalog/x/y", |w| w.write_all(b"one"))
            .map_err(|e| format!("{e:?}"))
            .expect("put");
        for p in ["catalog", "catalog/x", "catalog/x/y"] {
            let m = fs::metadata(root.join(p)).expect(p);
            assert_eq!((m.uid(), m.gid()), (4242, 4343), "{p}");
        }
        // A root-owned repository stays root's.
        let store = LocalStore::new(dir.path().to_path_buf());
        store
            .put_create_with("k", |w| w.write_all(b"one"))
            .map_err(|e| format!("{e:?}"))
            .expect("put");
        assert_eq!(fs::metadata(dir.path().join("k")).expect("k").uid(), 0);
    }

    #[test]
    fn a_missing_root_is_not_an_absent_object() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().join("not-mounted"));
        assert!(matches!(store.get("x"), Err(StoreError::Permanent(_))));
    }

    #[test]
    fn a_failing_producer_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().to_path_buf());
        let r = store.put_create_with("k", |w| {
            w.write_all(b"partial").map_err(|e| e.to_string())?;
            Err::<(), _>("boom".to_string())
        });
        assert!(matches!(r, Err(PutError::Produce(ref m)) if m == "boom"));
        assert!(store.head("k").expect("head").is_none());
        assert_eq!(fs::read_dir(dir.path()).expect("dir").count(), 0);
    }

    #[test]
    fn a_killed_writers_temporary_file_goes_when_the_key_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().to_path_buf());
        // What a writer killed before its link leaves behind, and another key's.
        let stale = dir.path().join(format!("{TEMP_PREFIX}k.0011223344556677"));
        let other = dir.path().join(format!("{TEMP_PREFIX}kk.0011223344556677"));
        fs::write(&stale, b"half").expect("stale");
        fs::write(&other, b"half").expect("other");
        let put = |data: &'static [u8]| {
            store
                .put_create_with("k", |w| w.write_all(data).map_err(|e| e.to_string()))
                .map(|(o, ())| o)
                .map_err(|e| format!("{e:?}"))
        };
        assert_eq!(put(b"one").expect("put"), PutOutcome::Created);
        assert!(
            !stale.exists(),
            "the killed writer's temporary file is still there"
        );
        assert!(other.exists(), "another key's temporary file was removed");
        // Also when the key already existed.
        fs::write(&stale, b"half").expect("stale");
        assert_eq!(put(b"two").expect("put"), PutOutcome::AlreadyExists);
        assert!(!stale.exists());
        assert_eq!(store.get("k").expect("get"), b"one");
    }
}
