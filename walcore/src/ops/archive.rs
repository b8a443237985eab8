//! `archive_command`: PostgreSQL hands over a finished WAL file; it is checked, encoded and
//! stored create-only. Success is reported only once the object is durable.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use tracing::Instrument;

use crate::error::{Error, ErrorKind};
use crate::pg::{
    SIZE_OF_XLOG_LONG_PHD, SegmentExpectations, WalFileKind, WalFileName, check_segment_header,
    parse_long_page_header,
};
use crate::repo::Repository;
use crate::store::{PutOutcome, wal_key};

/// What archiving did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Archived {
    /// Stored now.
    Stored {
        key: String,
        bytes: u64,
        stored_bytes: u64,
        /// CRC-32 of the file.
        crc: u32,
    },
    /// Already in the repository with identical content; nothing written.
    AlreadyArchived { key: String, bytes: u64, crc: u32 },
}

impl Archived {
    /// Length and CRC-32 of the archived file.
    pub fn plaintext(&self) -> (u64, u32) {
        match self {
            Archived::Stored { bytes, crc, .. } | Archived::AlreadyArchived { bytes, crc, .. } => {
                (*bytes, *crc)
            }
        }
    }
}

/// Archives the WAL file at `path` (PostgreSQL's `%p`, relative to the data directory).
pub async fn archive_file(repo: &Repository, path: &Path) -> Result<Archived, Error> {
    let file_name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{}: not a WAL file path", path.display()),
        )
    })?;
    let name = WalFileName::parse(file_name)
        .map_err(|e| Error::from(e).context(format!("refusing to archive {}", path.display())))?;
    let span = tracing::info_span!("archive", file = %name);
    archive_named(repo, path, name).instrument(span).await
}

async fn archive_named(
    repo: &Repository,
    path: &Path,
    name: WalFileName,
) -> Result<Archived, Error> {
    let key = wal_key(&name);
    if matches!(name.kind(), WalFileKind::Segment | WalFileKind::Partial) {
        check_segment_file(repo, path, &name).await?;
    }

    let path_buf = path.to_path_buf();
    let outcome = match repo
        .with_retry(&format!("archiving {name}"), || push(repo, &path_buf, &key))
        .await
    {
        Err(e) if e.kind() == ErrorKind::Conflict && name.kind() == &WalFileKind::Partial => {
            match same_up_to_the_switch(repo, path, &key, &name).await? {
                Some(outcome) => outcome,
                None => return Err(e),
            }
        }
        other => other?,
    };
    match &outcome {
        Archived::Stored {
            bytes,
            stored_bytes,
            ..
        } => tracing::info!(
            key = %key,
            bytes,
            stored_bytes,
            "archived"
        ),
        Archived::AlreadyArchived { .. } => {
            tracing::info!(key = %key, "already archived with identical content")
        }
    }
    Ok(outcome)
}

/// A `.partial` segment is the last of a timeline that ended inside it: its bytes up to the
/// switch point are the timeline's WAL, and what follows is whatever the file held (zeros from
/// `walcore stream`, WAL received past the switch or an old recycled segment from the server).
/// Two copies that agree up to the switch point that a stored history file gives for it hold
/// the same timeline: the stored one is kept and the archive succeeds, so that the promoted
/// server's archiver does not stop on the copy the stream stored first. `None` when no stored
/// history places a switch in this segment, or the copies differ before it.
async fn same_up_to_the_switch(
    repo: &Repository,
    path: &Path,
    key: &str,
    name: &WalFileName,
) -> Result<Option<Archived>, Error> {
    let Some(meta) = repo.read_meta().await? else {
        return Ok(None);
    };
    let seg = meta.segment_size()?;
    let start = name.segno(seg)?.start_lsn(seg);
    let end = start.0 + u64::from(seg.bytes());
    let listed =
        crate::backup::plan::listing(repo, "wal/history/", |s| s.list("wal/history/")).await?;
    let histories =
        crate::backup::plan::read_histories(repo, listed.iter().map(String::as_str)).await?;
    let Some(switch) = histories
        .values()
        .flat_map(|h| h.entries())
        .filter(|e| e.parent == name.timeline())
        .map(|e| e.switch_point.0)
        .filter(|&at| at > start.0 && at <= end)
        .min()
    else {
        return Ok(None);
    };
    let upto = (switch - start.0) as usize;
    let stored = repo.get_small(key).await?;
    let local = std::fs::read(path).map_err(|e| read_error(path, e))?;
    if stored.len() < upto || local.len() < upto || stored[..upto] != local[..upto] {
        return Ok(None);
    }
    tracing::warn!(
        key = %key,
        "already archived with the same WAL up to the switch point {} and other bytes after \
         it (the copy stored first is kept)",
        crate::pg::Lsn(switch)
    );
    let crc = crc32fast::hash(&local);
    Ok(Some(Archived::AlreadyArchived {
        key: key.to_string(),
        bytes: local.len() as u64,
        crc,
    }))
}

/// Checks a segment's first page against its name and the repository's cluster, recording the
/// cluster at the first push.
async fn check_segment_file(
    repo: &Repository,
    path: &Path,
    name: &WalFileName,
) -> Result<(), Error> {
    let input = |e: io::Error| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("reading {}: {e}", path.display()),
        )
    };
    let mut file = File::open(path).map_err(input)?;
    let len = file.metadata().map_err(input)?.len();
    let mut first = [0u8; SIZE_OF_XLOG_LONG_PHD];
    file.read_exact(&mut first).map_err(|e| {
        Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{}: too short for a WAL segment ({len} bytes): {e}",
                path.display()
            ),
        )
    })?;
    let header = parse_long_page_header(&first)
        .map_err(|e| Error::from(e).context(format!("refusing to archive {name}")))?;
    let meta = repo.meta_for_push(&header).await?;
    let system_id = meta.system_id()?;
    if header.system_id != system_id {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "refusing to archive {name}: it belongs to the cluster with system identifier {}, but repository {} holds the cluster {system_id}; use one repository (or prefix) per cluster",
                header.system_id,
                repo.store().describe()
            ),
        ));
    }
    let seg_size = meta.segment_size()?;
    check_segment_header(
        &first,
        &SegmentExpectations {
            name: name.clone(),
            system_id: Some(system_id),
            seg_size: Some(seg_size),
        },
    )
    .map_err(|e| Error::from(e).context(format!("refusing to archive {name}")))?;
    if name.is_segment() && len != u64::from(seg_size.bytes()) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "refusing to archive {name}: it is {len} bytes, a segment of this cluster is {}",
                seg_size.bytes()
            ),
        ));
    }
    Ok(())
}

/// One attempt: encode and store create-only; on a conflict compare contents.
async fn push(repo: &Repository, path: &Path, key: &str) -> Result<Archived, Error> {
    let codec = repo.codec().clone();
    let name = key.to_string();
    let source = path.to_path_buf();
    let (outcome, summary) = repo
        .store()
        .put_create_with(key, move |w| {
            let file = File::open(&source).map_err(|e| read_error(&source, e))?;
            codec
                .encode(&name, file, w)
                .map_err(|e| encode_error(&source, e))
        })
        .await?;
    match outcome {
        PutOutcome::Created => Ok(Archived::Stored {
            key: key.to_string(),
            bytes: summary.plaintext_len,
            stored_bytes: summary.stored_len,
            crc: summary.plaintext_crc,
        }),
        PutOutcome::AlreadyExists => {
            compare_with_stored(
                repo,
                path,
                key,
                summary.plaintext_crc,
                summary.plaintext_len,
            )
            .await
        }
    }
}

fn read_error(path: &Path, e: io::Error) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!("reading {}: {e}", path.display()),
    )
}

fn encode_error(path: &Path, e: crate::codec::CodecError) -> Error {
    match e {
        crate::codec::CodecError::Read(io) => read_error(path, io),
        other => Error::from(other).context(format!("encoding {}", path.display())),
    }
}

/// The key exists: identical content is success, anything else a loud conflict. The stored
/// object is never touched.
async fn compare_with_stored(
    repo: &Repository,
    path: &Path,
    key: &str,
    local_crc: u32,
    local_len: u64,
) -> Result<Archived, Error> {
    let store = repo.store().describe();
    let reader = repo
        .store()
        .open_reader(key)
        .await
        .map_err(|e| e.into_error("reading the already archived", key, &store))?;
    let codec = repo.codec().clone();
    let name = key.to_string();
    let local = PathBuf::from(path);
    let (summary, same) = tokio::task::spawn_blocking(move || {
        let file = File::open(&local).map_err(|e| read_error(&local, e))?;
        let mut cmp = CompareWriter {
            other: io::BufReader::with_capacity(1 << 20, file),
            same: true,
            scratch: Vec::new(),
        };
        let summary = codec.decode(&name, reader, &mut cmp).map_err(Error::from)?;
        // The local file must also end where the stored object ends.
        let mut rest = [0u8; 1];
        let longer = cmp
            .other
            .read(&mut rest)
            .map_err(|e| read_error(&local, e))?
            > 0;
        Ok::<_, Error>((summary, cmp.same && !longer))
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?
    .map_err(|e| {
        e.context(format!(
            "{key} is already archived but could not be compared"
        ))
    })?;

    if same && summary.plaintext_crc == local_crc && summary.plaintext_len == local_len {
        return Ok(Archived::AlreadyArchived {
            key: key.to_string(),
            bytes: local_len,
            crc: local_crc,
        });
    }
    Err(Error::new(
        ErrorKind::Conflict,
        format!(
            "{} is already archived in {store} with different content (stored: {} bytes, CRC-32 {:08x}; this file: {local_len} bytes, CRC-32 {local_crc:08x}); the stored object was left unchanged",
            path.file_name()
                .map_or_else(|| key.into(), |n| n.to_string_lossy()),
            summary.plaintext_len,
            summary.plaintext_crc,
        ),
    ))
}

/// A `Write` that compares what it is given with another reader's bytes.
struct CompareWriter<R: Read> {
    other: R,
    same: bool,
    scratch: Vec<u8>,
}

impl<R: Read> Write for CompareWriter<R> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.same {
            self.scratch.resize(data.len(), 0);
            let mut got = 0;
            while got < data.len() {
                let n = self.other.read(&mut self.scratch[got..])?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            if got < data.len() || self.scratch[..] != *data {
                self.same = false;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Layer};
    use crate::ops::testing::{SEG, seg_name, segment};

    /// The promoted server archives its own `.partial` after `walcore stream` stored one with
    /// zeros past the switch: the same WAL up to the switch is accepted (the archiver must not
    /// stop there), other WAL before it is still a conflict.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partial_that_agrees_up_to_the_switch_is_already_archived() {
        const SYSID: u64 = 7_000_000_000_000_000_005;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("repo")).expect("repo");
        let url = format!("file://{}", dir.path().join("repo").display());
        let config = Config::load_with(Layer::default(), |k| {
            (k == "WALCORE_REPO").then(|| url.clone())
        })
        .expect("config");
        let repo = Repository::open(&config).expect("repo");
        let file = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).expect("write");
            path
        };
        let partial = format!("{}.partial", seg_name(5));
        // The stream's copy: WAL up to the switch, zeros after.
        let switch = 0x0080_0000usize;
        let mut ours = segment(5, SYSID, 0x11);
        ours[switch..].fill(0);
        archive_file(&repo, &file(&partial, &ours))
            .await
            .expect("the stream's copy");
        // The server's copy: the same up to the switch, an old recycled segment after.
        let mut theirs = ours.clone();
        theirs[switch..].fill(0x77);

        // Without a history file placing the switch, nothing says where the timeline ends.
        let e = archive_file(&repo, &file(&partial, &theirs))
            .await
            .expect_err("no history");
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");

        let start = 5 * u64::from(SEG);
        let history = format!(
            "1\t0/{:X}\tno recovery target specified\n",
            start + switch as u64
        );
        archive_file(&repo, &file("00000002.history", history.as_bytes()))
            .await
            .expect("history");
        let done = archive_file(&repo, &file(&partial, &theirs))
            .await
            .expect("the same WAL up to the switch");
        assert!(matches!(done, Archived::AlreadyArchived { .. }), "{done:?}");

        // Different before the switch: a conflict, the stored copy untouched.
        let mut other = theirs.clone();
        other[switch - 100] ^= 0xFF;
        let e = archive_file(&repo, &file(&partial, &other))
            .await
            .expect_err("other WAL");
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        let stored = repo
            .get_small(&wal_key(&WalFileName::parse(&partial).expect("name")))
            .await;
        assert_eq!(stored.expect("stored"), ours);
    }
}
