//! Reusing the files of removed objects for new ones, on a file system.
//!
//! `walcore stream --synchronous` stores one small object per group of commits, and removes
//! them by the thousand once a larger piece supersedes them. On ext4 without a journal (the
//! machines these tools are measured on), allocating an inode skips every inode of its group
//! freed in the last minute, reading each one's inode-table block: with a thousand files
//! created and removed a second, a third of the stream's CPU went there, and the commits
//! waited for it. A removed object's file moved into a pool directory, and later written
//! again as a new object's temporary file, needs no inode allocated or freed.
//!
//! What this keeps of create-only writes: an object's name is only ever linked to a file
//! whose bytes are complete and fsynced, exactly as with a new file. A pooled file is reused
//! only after [`MIN_AGE`], so a reader that opened the object just before it was removed has
//! finished with it; one that has not reads bytes that fail their authentication (the key is
//! part of what is authenticated), never another object's bytes taken for this one's.
//!
//! The pool lives in one process: a file moved there by a process that ended is only a
//! temporary file, removed when a later process enables the pool.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::local::TEMP_PREFIX;

/// How long a removed object's file rests before it is written again.
pub const MIN_AGE: Duration = Duration::from_secs(2);
/// At most this many files wait in the pool; more are removed as usual. Ten seconds of
/// synchronous pieces at a thousand commits a second fit.
const CAPACITY: usize = 16384;
/// Larger objects are removed as usual: the pool is for small ones, and holds their space.
const MAX_BYTES: u64 = 256 * 1024;
/// Mode of a pooled file: writable by its owner, as a temporary file is.
const POOL_MODE: u32 = 0o600;

/// Name of the pool directory below the prefix it serves (a temporary name: listings skip it).
pub fn pool_dir_name() -> String {
    format!("{TEMP_PREFIX}recycled")
}

#[derive(Debug)]
pub struct Recycler {
    dir: PathBuf,
    min_age: Duration,
    free: Mutex<VecDeque<(PathBuf, Instant)>>,
}

impl Recycler {
    /// A pool in `dir`, which exists: what an earlier process left there is removed.
    pub fn new(dir: PathBuf, min_age: Duration) -> io::Result<Recycler> {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::remove_file(entry.path())?;
            }
        }
        Ok(Recycler {
            dir,
            min_age,
            free: Mutex::new(VecDeque::new()),
        })
    }

    /// A pooled file that has rested long enough, opened for writing from its start, and its
    /// path; `None` when there is none.
    pub fn take(&self) -> Option<(File, PathBuf)> {
        loop {
            let path = {
                let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
                match free.front() {
                    Some((_, since)) if since.elapsed() >= self.min_age => free.pop_front()?.0,
                    _ => return None,
                }
            };
            match OpenOptions::new().write(true).open(&path) {
                Ok(file) => return Some((file, path)),
                // Removed by someone else meanwhile: try the next one.
                Err(_) => continue,
            }
        }
    }

    /// Moves the file of the object at `path` into the pool instead of removing it. Returns
    /// false (nothing done) when the pool is full or the file too large to keep; the caller
    /// then removes it. The removal of `path` is durable once its directory is synced.
    pub fn keep(&self, path: &Path) -> io::Result<bool> {
        let meta = fs::metadata(path)?;
        if !meta.is_file() || meta.len() > MAX_BYTES || self.len() >= CAPACITY {
            return Ok(false);
        }
        let mut suffix = [0u8; 8];
        getrandom::fill(&mut suffix).map_err(|e| io::Error::other(format!("randomness: {e}")))?;
        let pooled = self
            .dir
            .join(format!("{TEMP_PREFIX}{}", hex::encode(suffix)));
        fs::set_permissions(path, Permissions::from_mode(POOL_MODE))?;
        fs::rename(path, &pooled)?;
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((pooled, Instant::now()));
        Ok(true)
    }

    fn len(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A process that ends normally leaves no pooled file behind (best effort; a killed one's go
/// when the next process enables the pool).
impl Drop for Recycler {
    fn drop(&mut self) {
        let free = self.free.get_mut().unwrap_or_else(|p| p.into_inner());
        for (path, _) in free.drain(..) {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::store::{LocalStore, PutOutcome};

    fn put(store: &LocalStore, key: &str, bytes: &[u8]) -> PutOutcome {
        let bytes = bytes.to_vec();
        store
            .put_create_sweeping(key, false, move |w: &mut dyn Write| w.write_all(&bytes))
            .expect("put")
            .0
    }

    fn recycling(root: &Path, min_age: Duration) -> LocalStore {
        LocalStore::new(root.to_path_buf())
            .recycling("stream", min_age)
            .expect("recycling store")
    }

    #[test]
    fn a_removed_objects_file_holds_the_next_object_and_only_its_bytes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = recycling(dir.path(), Duration::ZERO);
        put(&store, "stream/1/a", &[7u8; 5000]);
        let inode = fs::metadata(dir.path().join("stream/1/a"))
            .expect("a")
            .ino();
        store.retire(&["stream/1/a".to_string()]).expect("retire");
        assert!(!dir.path().join("stream/1/a").exists());
        assert_eq!(put(&store, "stream/2/b", b"short"), PutOutcome::Created);
        let b = dir.path().join("stream/2/b");
        let meta = fs::metadata(&b).expect("b");
        assert_eq!(
            meta.ino(),
            inode,
            "the removed object's file was not reused"
        );
        assert_eq!(fs::read(&b).expect("read b"), b"short");
        assert_eq!(meta.mode() & 0o777, 0o440, "objects are read-only");
        assert_eq!(meta.nlink(), 1, "the pool's name for the file is gone");
        assert!(
            store
                .list("stream")
                .expect("list")
                .iter()
                .all(|k| k == "stream/2/b"),
            "the pool is not listed"
        );
    }

    #[test]
    fn a_file_is_not_reused_before_it_has_rested() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = recycling(dir.path(), Duration::from_secs(3600));
        put(&store, "stream/1/a", b"first");
        let inode = fs::metadata(dir.path().join("stream/1/a"))
            .expect("a")
            .ino();
        store.retire(&["stream/1/a".to_string()]).expect("retire");
        put(&store, "stream/1/b", b"second");
        let b = fs::metadata(dir.path().join("stream/1/b")).expect("b");
        assert_ne!(b.ino(), inode, "a file just removed was written again");
    }

    #[test]
    fn large_objects_are_removed_not_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = recycling(dir.path(), Duration::ZERO);
        put(&store, "stream/1/big", &vec![1u8; (MAX_BYTES + 1) as usize]);
        store.retire(&["stream/1/big".to_string()]).expect("retire");
        let pool = dir.path().join("stream").join(pool_dir_name());
        assert_eq!(fs::read_dir(&pool).expect("pool").count(), 0);
        assert!(!dir.path().join("stream/1/big").exists());
    }

    #[test]
    fn what_an_earlier_process_left_in_the_pool_goes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = recycling(dir.path(), Duration::ZERO);
        put(&store, "stream/1/a", b"a");
        store.retire(&["stream/1/a".to_string()]).expect("retire");
        let pool = dir.path().join("stream").join(pool_dir_name());
        assert_eq!(fs::read_dir(&pool).expect("pool").count(), 1);
        // Killed: the pool's files stay until the next process enables the pool.
        std::mem::forget(store);
        assert_eq!(fs::read_dir(&pool).expect("pool").count(), 1);
        let again = recycling(dir.path(), Duration::ZERO);
        assert_eq!(fs::read_dir(&pool).expect("pool").count(), 0);
        // Ended normally: it takes its pool's files with it.
        put(&again, "stream/1/b", b"b");
        again.retire(&["stream/1/b".to_string()]).expect("retire");
        assert_eq!(fs::read_dir(&pool).expect("pool").count(), 1);
        drop(again);
        assert_eq!(fs::read_dir(&pool).expect("pool").count(), 0);
    }

    #[test]
    fn a_reused_file_that_another_process_removed_is_skipped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = recycling(dir.path(), Duration::ZERO);
        put(&store, "stream/1/a", b"a");
        store.retire(&["stream/1/a".to_string()]).expect("retire");
        let pool = dir.path().join("stream").join(pool_dir_name());
        for e in fs::read_dir(&pool).expect("pool") {
            fs::remove_file(e.expect("entry").path()).expect("remove");
        }
        assert_eq!(put(&store, "stream/1/b", b"b"), PutOutcome::Created);
        assert_eq!(fs::read(dir.path().join("stream/1/b")).expect("b"), b"b");
    }
}
