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
}

impl Store {
    /// The names of the directories (common prefixes) directly under `prefix`, sorted.
    pub async fn child_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let prefix = prefix.trim_end_matches('/').to_owned();
        match self {
            Store::Local(l) => {
                let dir = l.root().join(&prefix);
                super::blocking(move || {
                    let mut out = Vec::new();
                    let entries = match std::fs::read_dir(&dir) {
                        Ok(e) => e,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
                        Err(e) => return Err(scan_error(&dir, e)),
                    };
                    for entry in entries {
                        let entry = entry.map_err(|e| scan_error(&dir, e))?;
                        if entry.file_type().map_err(|e| scan_error(&dir, e))?.is_dir() {
                            out.push(entry.file_name().to_string_lossy().into_owned());
                        }
                    }
                    out.sort();
                    Ok(out)
                })
                .await?
            }
            Store::Remote(r) => {
                let path = object_store::path::Path::from(prefix.as_str());
                let listed = r
                    .object_store()
                    .list_with_delimiter(Some(&path))
                    .await
                    .map_err(super::remote::map_error)?;
                progress::tick();
                let mut out: Vec<String> = listed
                    .common_prefixes
                    .iter()
                    .filter_map(|p| p.filename().map(str::to_owned))
                    .collect();
                out.sort();
                Ok(out)
            }
        }
    }

    /// The objects directly in the directory `prefix` (not below it), sorted by key.
    pub async fn list_dir(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let prefix = prefix.trim_end_matches('/').to_owned();
        match self {
            Store::Local(l) => {
                let root = l.root().to_path_buf();
                super::blocking(move || {
                    let dir = root.join(&prefix);
                    let mut out = Vec::new();
                    let entries = match std::fs::read_dir(&dir) {
                        Ok(e) => e,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
                        Err(e) => return Err(scan_error(&dir, e)),
                    };
                    for entry in entries {
                        let entry = entry.map_err(|e| scan_error(&dir, e))?;
                        let name = entry.file_name().to_string_lossy().into_owned();
                        if name.starts_with(TEMP_PREFIX) {
                            continue;
                        }
                        let meta = entry.metadata().map_err(|e| scan_error(&dir, e))?;
                        if !meta.is_file() {
                            continue;
                        }
                        out.push(ObjectInfo {
                            key: format!("{prefix}/{name}"),
                            size: meta.len(),
                            modified: meta.modified().map_err(|e| scan_error(&dir, e))?,
                        });
                    }
                    out.sort_by(|a, b| a.key.cmp(&b.key));
                    Ok(out)
                })
                .await?
            }
            Store::Remote(r) => {
                let path = object_store::path::Path::from(prefix.as_str());
                let listed = r
                    .object_store()
                    .list_with_delimiter(Some(&path))
                    .await
                    .map_err(super::remote::map_error)?;
                progress::tick();
                let mut out: Vec<ObjectInfo> = listed
                    .objects
                    .into_iter()
                    .map(|m| ObjectInfo {
                        key: m.location.to_string(),
                        size: m.size,
                        modified: m.last_modified.into(),
                    })
                    .collect();
                out.sort_by(|a, b| a.key.cmp(&b.key));
                Ok(out)
            }
        }
    }
}

fn scan_error(dir: &std::path::Path, e: std::io::Error) -> StoreError {
    StoreError::Permanent(format!("listing {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

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
