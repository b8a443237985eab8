//! `restore_command`: PostgreSQL asks for a WAL file by name; it is fetched, verified in full,
//! and only then appears at the destination (temporary file, fsync, rename, directory fsync).
//!
//! "Absent" is reported (as [`ErrorKind::NotFound`]) only when the store answered that the
//! object does not exist in a repository whose metadata it could read. Every other failure is
//! another kind, which the binary turns into an exit status PostgreSQL treats as fatal.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};

use tracing::Instrument;

use crate::error::{Error, ErrorKind, local};
use crate::pg::{
    SIZE_OF_XLOG_LONG_PHD, SegmentExpectations, WalFileKind, WalFileName, check_segment_header,
};
use crate::repo::Repository;
use crate::store::wal_key;

/// What restoring wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub key: String,
    pub bytes: u64,
}

/// Restores WAL file `name` (PostgreSQL's `%f`) to `dest` (`%p`, relative to the data
/// directory).
pub async fn restore_file(repo: &Repository, name: &str, dest: &Path) -> Result<Restored, Error> {
    restore_file_with(repo, name, dest, Durability::Durable).await
}

/// Whether a restored file is fsynced before it is renamed into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// File and directory fsynced: what `restore_command` does.
    Durable,
    /// Renamed into place complete but not fsynced: for a cache that is never read after the
    /// machine restarts (the prefetch spool is keyed by boot).
    UntilReboot,
}

/// [`restore_file`], choosing whether the result is fsynced.
pub async fn restore_file_with(
    repo: &Repository,
    name: &str,
    dest: &Path,
    sync: Durability,
) -> Result<Restored, Error> {
    let name = WalFileName::parse(name).map_err(|e| {
        Error::from(e).context("restore_command was asked for a name that is not a WAL file name")
    })?;
    let span = tracing::info_span!("restore", file = %name);
    async {
        let restored = repo
            .with_retry(&format!("restoring {name}"), || {
                restore_once(repo, &name, dest, sync)
            })
            .await?;
        tracing::info!(key = %restored.key, bytes = restored.bytes, "restored");
        Ok(restored)
    }
    .instrument(span)
    .await
}

async fn restore_once(
    repo: &Repository,
    name: &WalFileName,
    dest: &Path,
    sync: Durability,
) -> Result<Restored, Error> {
    let store = repo.store().describe();
    // Without readable metadata nothing can be called absent: a wrong URL, an unmounted
    // directory or an empty bucket must stop recovery, not end it.
    let meta = repo.read_meta().await?.ok_or_else(|| {
        Error::new(
            ErrorKind::Configuration,
            format!(
                "{store} holds no walcore repository (no {} object): check WALCORE_REPO; refusing to report {name} as absent",
                crate::store::META_KEY
            ),
        )
    })?;
    let expect = SegmentExpectations {
        name: name.clone(),
        system_id: Some(meta.system_id()?),
        seg_size: Some(meta.segment_size()?),
    };

    let key = wal_key(name);
    let reader = repo
        .store()
        .open_reader(&key)
        .await
        .map_err(|e| e.into_error("reading", &key, &store))?;

    let codec = repo.codec().clone();
    let dest = dest.to_path_buf();
    let key_owned = key.clone();
    let name = name.clone();
    let bytes = tokio::task::spawn_blocking(move || {
        let temp = temp_path(&dest)?;
        let result = decode_verify_publish(
            &codec,
            &key_owned,
            &name,
            &expect,
            reader,
            &Publish {
                temp: &temp,
                dest: &dest,
                sync,
            },
        );
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Internal, format!("decoder thread failed: {e}")))?
    .map_err(|e| e.context(format!("restoring {key} from {store}")))?;
    Ok(Restored { key, bytes })
}

fn temp_path(dest: &Path) -> Result<PathBuf, Error> {
    let file = dest.file_name().ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("destination {} is not a file path", dest.display()),
        )
    })?;
    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix).map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    Ok(dest.with_file_name(format!(
        ".{}.walcore-{}.tmp",
        file.to_string_lossy(),
        hex::encode(suffix)
    )))
}

/// Where a decoded file goes: written to `temp`, then renamed to `dest`.
#[derive(Debug, Clone, Copy)]
struct Publish<'a> {
    temp: &'a Path,
    dest: &'a Path,
    sync: Durability,
}

fn decode_verify_publish(
    codec: &crate::codec::Codec,
    key: &str,
    name: &WalFileName,
    expect: &SegmentExpectations,
    reader: Box<dyn Read + Send>,
    publish: &Publish<'_>,
) -> Result<u64, Error> {
    let Publish { temp, dest, sync } = *publish;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .map_err(|e| local(temp, "creating", e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let summary = codec.decode(key, reader, &mut w).map_err(Error::from)?;
    let file = w
        .into_inner()
        .map_err(|e| local(temp, "writing", e.into_error()))?;

    if matches!(name.kind(), WalFileKind::Segment | WalFileKind::Partial) {
        let mut first = [0u8; SIZE_OF_XLOG_LONG_PHD];
        File::open(temp)
            .and_then(|mut f| f.read_exact(&mut first))
            .map_err(|_| {
                Error::new(
                    ErrorKind::Integrity,
                    format!(
                        "{name}: the stored file is {} bytes, too short for a WAL segment",
                        summary.plaintext_len
                    ),
                )
            })?;
        check_segment_header(&first, expect).map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("the stored object does not hold {name}: {e}"),
            )
        })?;
        let size = expect.seg_size.map_or(0, |s| u64::from(s.bytes()));
        if name.is_segment() && summary.plaintext_len != size {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{name}: the stored segment is {} bytes, expected {size}",
                    summary.plaintext_len
                ),
            ));
        }
    }

    if sync == Durability::Durable {
        file.sync_all().map_err(|e| local(temp, "syncing", e))?;
    }
    drop(file);
    fs::rename(temp, dest).map_err(|e| local(dest, "renaming into", e))?;
    if sync == Durability::UntilReboot {
        return Ok(summary.plaintext_len);
    }
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    crate::store::local::fsync_dir(dir).map_err(|e| local(dir, "syncing directory", e))?;
    Ok(summary.plaintext_len)
}
