//! Deleting many objects at once: S3's `DeleteObjects` (up to 1000 keys a request, through
//! `object_store`'s `delete_stream`), a file system's unlinks with one directory fsync per
//! directory. For retention, which may delete a hundred thousand objects in one run.

use futures::StreamExt;

use super::{Store, StoreError};
use crate::progress;

impl Store {
    /// Removes every object of `keys`; absent ones are not an error. Returns once the store has
    /// acknowledged every deletion (on a file system: the directories are fsynced), or with the
    /// first failure (the other deletions may or may not have happened). A store made by
    /// [`recycling`](Self::recycling) keeps the files of small objects for new ones.
    pub async fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        match self {
            Store::Local(l) => {
                let l = l.clone();
                let keys = keys.to_vec();
                super::blocking(move || l.retire(&keys)).await?
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

    /// This store, reusing the files of the small objects [`delete_many`](Self::delete_many)
    /// removes for new objects, with the pool in directory `prefix` (see
    /// [`super::recycle`]); an object store is returned as it is. For one process that writes
    /// and removes many small objects a second under `prefix`.
    pub async fn recycling(&self, prefix: &str) -> Result<Store, StoreError> {
        match self {
            Store::Local(l) => {
                let l = l.clone();
                let prefix = prefix.to_string();
                let root = l.root().display().to_string();
                super::blocking(move || {
                    l.recycling(&prefix, super::recycle::MIN_AGE)
                        .map(Store::Local)
                        .map_err(|e| {
                            StoreError::Permanent(format!(
                                "the pool of reused files in {root}: {e}"
                            ))
                        })
                })
                .await?
            }
            Store::Remote(_) => Ok(self.clone()),
        }
    }
}
