//! Looking at a part of the repository without reading it all: the "directories" directly
//! under a prefix, and the objects of one directory with their sizes and times. Restore plans
//! use these to find the newest archived segment of a timeline in two requests, however many
//! segments the repository holds.

use std::time::SystemTime;

use super::{Store, StoreError, local::TEMP_PREFIX};
use crate::progress;

/// One stored object as a listing describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// When the store last wrote it (for a file system: its modification time).
    pub modified: SystemTime,
    /// The store's entity tag, which changes when the content does (none on a file system,
    /// whose modification times are fine-grained enough to tell a rewrite).
    pub etag: Option<String>,
}

impl From<object_store::ObjectMeta> for ObjectInfo {
    fn from(meta: object_store::ObjectMeta) -> ObjectInfo {
        ObjectInfo {
            key: meta.location.to_string(),
            size: meta.size,
            modified: meta.last_modified.into(),
            etag: meta.e_tag,
        }
    }
}

/// One level of the key space under a prefix: the child "directories" and the objects.
#[derive(Debug, Default)]
struct Level {
    dirs: Vec<String>,
    objects: Vec<ObjectInfo>,
}

impl Store {
    /// The names of the directories (common prefixes) directly under `prefix`, sorted.
    pub async fn child_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.level(prefix).await?.dirs)
    }

    /// The objects directly in the directory `prefix` (not below it), sorted by key.
    pub async fn list_dir(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        Ok(self.level(prefix).await?.objects)
    }

    /// Every object under `prefix` (at any depth) with its size and time, sorted by key: one
    /// paged listing on an object store, a directory walk on a file system.
    pub async fn list_info(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut out = self
            .fold_info(prefix, Vec::new(), |out, o| out.push(o))
            .await?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Every object under `prefix` (at any depth) with its size and time, each handed to
    /// `visit` as the listing goes, in no particular order: what a caller keeps of a million
    /// objects is up to it, the listing itself holds one directory or page at a time.
    pub async fn fold_info<S: Send + 'static>(
        &self,
        prefix: &str,
        mut state: S,
        mut visit: impl FnMut(&mut S, ObjectInfo) + Send + 'static,
    ) -> Result<S, StoreError> {
        match self {
            Store::Local(l) => {
                let root = l.root().to_path_buf();
                let prefix = prefix.trim_end_matches('/').to_owned();
                super::blocking(move || {
                    walk_each(&root, &prefix, |o| visit(&mut state, o))?;
                    Ok(state)
                })
                .await?
            }
            Store::Remote(r) => {
                use futures::StreamExt;
                let path = object_store::path::Path::from(prefix.trim_end_matches('/'));
                let mut stream = r.object_store().list(Some(&path));
                while let Some(meta) = stream.next().await {
                    progress::tick();
                    let meta = meta.map_err(super::remote::map_error)?;
                    visit(&mut state, ObjectInfo::from(meta));
                }
                Ok(state)
            }
        }
    }

    /// Removes the temporary files under `prefix` on a file system: what a killed writer left
    /// (a partial archive of a killed take can be as large as the backup). Only for a prefix
    /// nothing writes to any more. An object store has none (an unfinished multipart upload is
    /// invisible; a bucket rule that aborts them after a day is the store's own clean-up).
    pub async fn remove_temporaries(&self, prefix: &str) -> Result<usize, StoreError> {
        let Store::Local(l) = self else {
            return Ok(0);
        };
        let dir = l.root().join(prefix.trim_end_matches('/'));
        super::blocking(move || {
            let mut removed = 0;
            let mut stack = vec![dir];
            while let Some(dir) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(scan_error(&dir, e)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| scan_error(&dir, e))?;
                    let kind = entry.file_type().map_err(|e| scan_error(&dir, e))?;
                    if kind.is_dir() {
                        stack.push(entry.path());
                    } else if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                        std::fs::remove_file(entry.path()).map_err(|e| {
                            StoreError::Permanent(format!(
                                "removing {}: {e}",
                                entry.path().display()
                            ))
                        })?;
                        removed += 1;
                    }
                }
            }
            Ok(removed)
        })
        .await?
    }

    /// Removes the empty directories under `prefix`, and `prefix` itself when it ends up
    /// empty, on a file system (an object store has no directories: nothing to do). For the
    /// prefixes of deleted backups, which nothing writes to any more.
    pub async fn prune_empty_dirs(&self, prefix: &str) -> Result<(), StoreError> {
        let Store::Local(l) = self else {
            return Ok(());
        };
        let dir = l.root().join(prefix.trim_end_matches('/'));
        if dir == l.root() {
            return Ok(());
        }
        super::blocking(move || {
            prune(&dir);
            if let Some(parent) = dir.parent() {
                super::local::fsync_dir(parent).map_err(|e| {
                    StoreError::Permanent(format!("syncing {}: {e}", parent.display()))
                })?;
            }
            Ok(())
        })
        .await?
    }

    /// One listing request (a directory read on a file system), sorted.
    async fn level(&self, prefix: &str) -> Result<Level, StoreError> {
        let prefix = prefix.trim_end_matches('/').to_owned();
        let mut level = match self {
            Store::Local(l) => {
                let root = l.root().to_path_buf();
                super::blocking(move || read_level(&root, &prefix)).await??
            }
            Store::Remote(r) => {
                let path = object_store::path::Path::from(prefix.as_str());
                let listed = r
                    .object_store()
                    .list_with_delimiter(Some(&path))
                    .await
                    .map_err(super::remote::map_error)?;
                progress::tick();
                Level {
                    dirs: listed
                        .common_prefixes
                        .iter()
                        .filter_map(|p| p.filename().map(str::to_owned))
                        .collect(),
                    objects: listed.objects.into_iter().map(ObjectInfo::from).collect(),
                }
            }
        };
        level.dirs.sort();
        level.objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(level)
    }
}

/// A directory of a local store as one level; an absent directory is an empty level.
fn read_level(root: &std::path::Path, prefix: &str) -> Result<Level, StoreError> {
    let dir = root.join(prefix);
    let mut level = Level::default();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(level),
        Err(e) => return Err(scan_error(&dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| scan_error(&dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = entry.metadata().map_err(|e| scan_error(&dir, e))?;
        if meta.is_dir() {
            level.dirs.push(name);
        } else if meta.is_file() && !name.starts_with(TEMP_PREFIX) {
            level.objects.push(ObjectInfo {
                key: format!("{prefix}/{name}"),
                size: meta.len(),
                modified: meta.modified().map_err(|e| scan_error(&dir, e))?,
                etag: None,
            });
        }
    }
    Ok(level)
}

/// Every object below directory `prefix` of a local store, handed to `visit` as its
/// directory is read; an absent directory has none.
fn walk_each(
    root: &std::path::Path,
    prefix: &str,
    mut visit: impl FnMut(ObjectInfo),
) -> Result<(), StoreError> {
    let mut stack = vec![prefix.to_owned()];
    while let Some(dir) = stack.pop() {
        let level = read_level(root, &dir)?;
        stack.extend(level.dirs.iter().map(|d| format!("{dir}/{d}")));
        level.objects.into_iter().for_each(&mut visit);
    }
    Ok(())
}

/// Removes `dir` and the directories below it that hold nothing; best effort (a directory
/// that is not empty, or cannot be removed, stays).
fn prune(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                prune(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn scan_error(dir: &std::path::Path, e: std::io::Error) -> StoreError {
    StoreError::Permanent(format!("listing {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    #[tokio::test]
    async fn directories_and_objects_of_a_local_store() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::Local(LocalStore::new(dir.path().to_path_buf()));
        for key in [
            "wal/00000001/00000000/000000010000000000000001",
            "wal/00000001/00000000/000000010000000000000002",
            "wal/00000001/00000001/000000010000000100000000",
        ] {
            store
                .put_create_with(key, |w| {
                    w.write_all(b"x")
                        .map_err(|e| crate::Error::new(crate::ErrorKind::LocalIo, e.to_string()))
                })
                .await
                .expect("put");
        }
        assert_eq!(
            store.child_dirs("wal/00000001/").await.expect("dirs"),
            vec!["00000000", "00000001"]
        );
        assert!(
            store
                .child_dirs("wal/00000009")
                .await
                .expect("dirs")
                .is_empty()
        );
        let objects = store.list_dir("wal/00000001/00000000").await.expect("list");
        assert_eq!(
            objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
            vec![
                "wal/00000001/00000000/000000010000000000000001",
                "wal/00000001/00000000/000000010000000000000002"
            ]
        );
        assert!(objects.iter().all(|o| o.size == 1));
    }
}
