//! Deleting many objects at once: S3's `DeleteObjects` (up to 1000 keys a request, through
//! `object_store`'s `delete_stream`), a file system's unlinks with one directory fsync per
//! directory. For retention, which may delete a hundred thousand objects in one run.

use std::collections::BTreeSet;

use futures::StreamExt;

use super::{Store, StoreError};
use crate::progress;

impl Store {
    /// Removes every object of `keys`; absent ones are not an error. Returns once the store has
    /// acknowledged every deletion (on a file system: the directories are fsynced), or with the
    /// first failure (the other deletions may or may not have happened).
    pub async fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        match self {
            Store::Local(l) => {
                let root = l.root().to_path_buf();
                let keys = keys.to_vec();
                super::blocking(move || {
                    let mut dirs = BTreeSet::new();
                    for key in &keys {
                        let path = root.join(key);
                        match std::fs::remove_file(&path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
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
                        super::local::fsync_dir_after_removal(&dir).map_err(|e| {
                            StoreError::Permanent(format!("syncing {}: {e}", dir.display()))
                        })?;
                    }
                    Ok(())
                })
                .await?
            }
            Store::Remote(r) => {
                let paths: Vec<object_store::Result<object_store::path::Path>> = keys
                    .iter()
                    .map(|k| Ok(object_store::path::Path::from(k.as_str())))
                    .collect();
                let mut done = r
                    .object_store()
                    .delete_stream(futures::stream::iter(paths).boxed());
                while let Some(answer) = done.next().await {
                    match answer {
                        Ok(_) | Err(object_store::Error::NotFound { .. }) => progress::tick(),
                        Err(e) => return Err(super::remote::map_error(e)),
                    }
                }
                Ok(())
            }
        }
    }
}
