//! `restore_command`: PostgreSQL asks for a WAL file by name; it is fetched, verified in full,
//! and only then appears at the destination (temporary file, fsync, rename, directory fsync).
//!
//! "Absent" is reported (as [`ErrorKind::NotFound`]) only when the store answered that the
//! object does not exist in a repository whose metadata it could read, and, for a segment,
//! when no later segment of its timeline shows that it is a hole rather than the end of the
//! archive ([`hole`]). Every other failure is another kind, which the binary turns into an exit
//! status PostgreSQL treats as fatal.

pub mod hole;

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
/// directory), as `restore_command` does: durably, after removing the temporary files killed
/// calls left beside `dest`, and reporting an absent segment that is a hole in the archive as an
/// [`ErrorKind::Hole`] error, not as absent.
pub async fn restore_file(repo: &Repository, name: &str, dest: &Path) -> Result<Restored, Error> {
    remove_stale_temporaries(dest);
    restore_durable(repo, name, dest).await
}

/// [`restore_file`] without the clean-up: for a caller that did it already.
pub(crate) async fn restore_durable(
    repo: &Repository,
    name: &str,
    dest: &Path,
) -> Result<Restored, Error> {
    let absent = match restore_file_with(repo, name, dest, Durability::Durable).await {
        Err(e) if e.kind() == ErrorKind::NotFound => e,
        other => return other,
    };
    let Some(wal) = WalFileName::parse(name)
        .ok()
        .filter(WalFileName::is_segment)
    else {
        // History, `.partial` and `.backup` files: PostgreSQL asks for history files that do
        // not exist as a matter of course, and the others are no segment of a sequence.
        return Err(absent);
    };
    match hole::check(repo, &wal).await? {
        // The end of the complete segments: what `walcore stream` stored of the segment being
        // filled is the rest of the archive, for a recovery that ends (never for a standby,
        // which would replay a tail that is still growing).
        hole::Checked::Absent(hole::Absence::PastTheEnd)
            if !super::tail::recovering_as_standby() =>
        {
            match super::tail::restore_tail(repo, &wal, dest).await? {
                Some(restored) => Ok(restored),
                None => Err(absent),
            }
        }
        hole::Checked::Absent(_) => Err(absent),
        hole::Checked::Appeared => restore_file_with(repo, name, dest, Durability::Durable).await,
    }
}

/// Removes what killed calls left beside `dest`: our temporary files (see `temp_path`, and
/// the prefetch's copy across file systems), and nothing else. Only for the `restore_command`
/// path: PostgreSQL runs one such call at a time per data directory, so a file of this pattern
/// there belongs to no live call (at most to one orphaned by a killed server, whose file must
/// not be renamed into place anyway). Never for the prefetch spool, which has concurrent
/// writers. Best effort: a file that cannot be removed costs only space.
pub fn remove_stale_temporaries(dest: &Path) {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        if e.file_name().to_str().is_some_and(is_our_temporary) {
            match fs::remove_file(e.path()) {
                Ok(()) => tracing::info!(
                    file = %e.path().display(),
                    "removed a temporary file a killed restore left behind"
                ),
                Err(err) => tracing::debug!(file = %e.path().display(), "not removed: {err}"),
            }
        }
    }
}

/// Whether `file` is a name [`temp_path`] makes (`.NAME.walcore-` + 12 hexadecimal digits +
/// `.tmp`) or the prefetch's copy makes (`NAME.walcore-prefetch.tmp`).
fn is_our_temporary(file: &str) -> bool {
    if file.ends_with(".walcore-prefetch.tmp") {
        return file.len() > ".walcore-prefetch.tmp".len();
    }
    let Some(stem) = file.strip_prefix('.').and_then(|f| f.strip_suffix(".tmp")) else {
        return false;
    };
    let Some((dest, random)) = stem.rsplit_once(".walcore-") else {
        return false;
    };
    !dest.is_empty()
        && random.len() == TEMP_RANDOM_BYTES * 2
        && random
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Random bytes in a temporary file's name.
const TEMP_RANDOM_BYTES: usize = 6;

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
    let mut suffix = [0u8; TEMP_RANDOM_BYTES];
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
    let temp = publish.temp;
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

    move_into_place(file, publish)?;
    Ok(summary.plaintext_len)
}

/// Renames the written `temp` to `dest`, fsyncing file and directory when durable.
fn move_into_place(file: File, publish: &Publish<'_>) -> Result<(), Error> {
    let Publish { temp, dest, sync } = *publish;
    if sync == Durability::Durable {
        file.sync_all().map_err(|e| local(temp, "syncing", e))?;
    }
    drop(file);
    fs::rename(temp, dest).map_err(|e| local(dest, "renaming into", e))?;
    if sync == Durability::UntilReboot {
        return Ok(());
    }
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    crate::store::local::fsync_dir(dir).map_err(|e| local(dir, "syncing directory", e))
}

/// Writes `bytes` to `dest` as a restored file is written: a temporary file beside it,
/// fsynced, renamed into place, the directory fsynced.
pub(crate) fn publish_bytes(bytes: &[u8], dest: &Path) -> Result<(), Error> {
    let temp = temp_path(dest)?;
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, bytes).map(|()| f))
        .map_err(|e| local(&temp, "writing", e))
        .and_then(|f| {
            move_into_place(
                f,
                &Publish {
                    temp: &temp,
                    dest,
                    sync: Durability::Durable,
                },
            )
        });
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Layer};
    use crate::ops::archive::archive_file;
    use crate::ops::testing::{seg_name, segment};

    #[test]
    fn only_our_temporary_files_are_recognised() {
        let dest = Path::new("pg_wal/RECOVERYXLOG");
        let made = temp_path(dest).expect("temporary name");
        let made = made.file_name().and_then(|f| f.to_str()).expect("name");
        assert!(is_our_temporary(made), "{made}");
        for ours in [
            ".RECOVERYXLOG.walcore-0123456789ab.tmp",
            ".000000010000000000000003.walcore-ffffffffffff.tmp",
            "RECOVERYXLOG.walcore-prefetch.tmp",
        ] {
            assert!(is_our_temporary(ours), "{ours}");
        }
        for not_ours in [
            "RECOVERYXLOG",
            "000000010000000000000003",
            ".RECOVERYXLOG.walcore-0123456789AB.tmp",
            ".RECOVERYXLOG.walcore-0123456789a.tmp",
            ".RECOVERYXLOG.walcore-notours.tmp",
            "..walcore-0123456789ab.tmp",
            "RECOVERYXLOG.walcore-0123456789ab.tmp",
            ".walcore-prefetch.tmp",
            "xlogtemp.1234",
        ] {
            assert!(!is_our_temporary(not_ours), "{not_ours}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_segment_is_a_hole_and_the_end_is_absent() {
        const SYSID: u64 = 7_000_000_000_000_000_003;
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        let pg_wal = dir.path().join("pg_wal");
        fs::create_dir_all(&source).expect("source");
        fs::create_dir_all(&pg_wal).expect("pg_wal");
        fs::create_dir(dir.path().join("repo")).expect("repository directory");
        let url = format!("file://{}", dir.path().join("repo").display());
        let config = Config::load_with(Layer::default(), |k| {
            (k == "WALCORE_REPO").then(|| url.clone())
        })
        .expect("config");
        let repo = Repository::open(&config).expect("repo");
        for no in [1, 2, 4] {
            let path = source.join(seg_name(no));
            fs::write(&path, segment(no, SYSID, 0)).expect("segment");
            archive_file(&repo, &path).await.expect("archive");
        }
        // What a restore killed while writing left, and a file that only looks like it.
        let stale = pg_wal.join(".RECOVERYXLOG.walcore-0123456789ab.tmp");
        let lookalike = pg_wal.join(".RECOVERYXLOG.walcore-someone-else.tmp");
        fs::write(&stale, b"half").expect("stale");
        fs::write(&lookalike, b"theirs").expect("lookalike");
        let dest = pg_wal.join("RECOVERYXLOG");

        let r = restore_file(&repo, &seg_name(2), &dest).await.expect("2");
        assert_eq!(r.bytes, u64::from(crate::ops::testing::SEG));
        assert!(!stale.exists(), "the stale temporary file is still there");
        assert!(lookalike.exists(), "a file that is not ours was removed");

        let e = restore_file(&repo, &seg_name(3), &dest)
            .await
            .expect_err("3 is missing");
        assert_eq!(e.kind(), ErrorKind::Hole, "{e}");
        let message = e.to_string();
        assert!(
            message.contains(&seg_name(3)) && message.contains(&seg_name(4)),
            "{message}"
        );
        assert_eq!(crate::exit::code(crate::exit::Hook::Restore, e.kind()), 209);

        for absent in [seg_name(5), "00000002.history".to_string()] {
            let e = restore_file(&repo, &absent, &dest)
                .await
                .expect_err("absent");
            assert_eq!(e.kind(), ErrorKind::NotFound, "{absent}: {e}");
        }
    }
}
