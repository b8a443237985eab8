//! The tail of the archive: what `walcore stream` has stored of the segment the server is still
//! filling (FORMAT §2, `stream/`). The stream stores it as pieces, each an immutable object that
//! holds the segment's bytes from one offset to another and says so in its key; a piece from
//! offset 0 supersedes every piece that reaches no further, and the complete segment, once
//! stored under `wal/`, supersedes them all. Recovery to the end of the archive uses the tail
//! ([`restore_tail`]): PostgreSQL gets the segment's bytes up to the furthest offset the pieces
//! reach without a gap, and zeros after, which it reads as the end of the WAL.

use std::io::Cursor;
use std::path::Path;

use bytes::Bytes;

use crate::error::{Error, ErrorKind};
use crate::pg::{
    SIZE_OF_XLOG_LONG_PHD, SegmentExpectations, TimelineId, WalFileName, WalSegmentSize,
    check_segment_header,
};
use crate::repo::Repository;
use crate::store::PutOutcome;

/// Where the pieces live.
pub const TAIL_PREFIX: &str = "stream/";

/// One stored piece: bytes `from..to` of segment `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub name: WalFileName,
    pub from: u32,
    pub to: u32,
}

impl Piece {
    /// `stream/TTTTTTTT/SEGMENT/FFFFFFFF-TTTTTTTT`: the offsets in upper-case hexadecimal, so
    /// that keys sort by where a piece starts, then by how far it reaches.
    pub fn key(&self) -> String {
        format!(
            "{}{:08X}/{}/{:08X}-{:08X}",
            TAIL_PREFIX,
            self.name.timeline().0,
            self.name,
            self.from,
            self.to
        )
    }

    /// The piece a key names; `None` for any other key.
    pub fn parse(key: &str) -> Option<Piece> {
        let rest = key.strip_prefix(TAIL_PREFIX)?;
        let mut parts = rest.split('/');
        let (tli, segment, range) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let name = WalFileName::parse(segment)
            .ok()
            .filter(|n| n.is_segment())?;
        if tli != format!("{:08X}", name.timeline().0) {
            return None;
        }
        let (from, to) = range.split_once('-')?;
        let hex = |s: &str| {
            (s.len() == 8 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')))
                .then(|| u32::from_str_radix(s, 16).ok())
                .flatten()
        };
        let (from, to) = (hex(from)?, hex(to)?);
        (from < to).then_some(Piece { name, from, to })
    }
}

/// The prefix holding the pieces of segment `name`.
fn segment_prefix(name: &WalFileName) -> String {
    format!("{}{:08X}/{}/", TAIL_PREFIX, name.timeline().0, name)
}

/// The prefix holding the pieces of timeline `tli`.
pub fn timeline_prefix(tli: TimelineId) -> String {
    format!("{}{:08X}/", TAIL_PREFIX, tli.0)
}

/// The pieces that make the longest run from offset 0 without a gap, in order. Pieces overlap
/// only where they hold the same WAL, so any piece that starts within the run extends it.
pub fn chain(pieces: &[Piece]) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    let mut reach = 0u32;
    loop {
        let next = pieces
            .iter()
            .filter(|p| p.from <= reach && p.to > reach)
            .max_by_key(|p| p.to);
        match next {
            Some(p) => {
                reach = p.to;
                out.push(p.clone());
            }
            None => return out,
        }
    }
}

/// The pieces stored for segment `name`, in key order.
pub async fn pieces(repo: &Repository, name: &WalFileName) -> Result<Vec<Piece>, Error> {
    let prefix = segment_prefix(name);
    let keys = repo
        .store()
        .list(&prefix)
        .await
        .map_err(|e| e.into_error("listing", &prefix, &repo.store().describe()))?;
    Ok(keys.iter().filter_map(|k| Piece::parse(k)).collect())
}

/// Stores `bytes` as the piece of `name` from offset `from`, create-only: a piece already
/// stored with the same content is success, with other content a conflict (the server sent
/// other WAL for the same place, which only another cluster or timeline mix-up can cause).
pub async fn put_piece(
    repo: &Repository,
    name: &WalFileName,
    from: u32,
    bytes: Bytes,
) -> Result<Piece, Error> {
    let piece = Piece {
        name: name.clone(),
        from,
        to: from + bytes.len() as u32,
    };
    let key = piece.key();
    // A piece after the start lives seconds, until the next piece from the start supersedes
    // it: it is stored uncompressed (compressing a few kilobytes costs more than it saves).
    let codec = if from > 0 {
        repo.codec()
            .clone()
            .with_compression(crate::codec::Compression::None)
    } else {
        repo.codec().clone()
    };
    let data = bytes.clone();
    let key_owned = key.clone();
    let (outcome, _) = repo
        .with_retry(&format!("storing {key}"), || {
            let codec = codec.clone();
            let data = data.clone();
            let k = key_owned.clone();
            repo.store().put_create_once_with(&key_owned, move |w| {
                codec
                    .encode(&k, Cursor::new(data), w)
                    .map_err(|e| Error::from(e).context(format!("encoding {k}")))
            })
        })
        .await?;
    if outcome == PutOutcome::AlreadyExists {
        let stored = read_piece(repo, &piece).await?;
        if stored != bytes {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "{key} is already stored with different content; the stored object was left \
                     unchanged"
                ),
            ));
        }
    }
    Ok(piece)
}

/// The plaintext of a piece, checked to be as long as its key says.
async fn read_piece(repo: &Repository, piece: &Piece) -> Result<Bytes, Error> {
    let key = piece.key();
    let plain = repo.get_small(&key).await?;
    if plain.len() as u64 != u64::from(piece.to - piece.from) {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "{key} holds {} bytes, its name says {}",
                plain.len(),
                piece.to - piece.from
            ),
        ));
    }
    Ok(Bytes::from(plain))
}

/// Deletes the pieces of `name` that `reach` bytes from offset 0 make useless (those ending at
/// or before it), except `keep`; with `keep` `None` and `reach` the segment's size, all of them,
/// and on a file system their directory. Best effort: a piece left behind costs only space, and
/// the next supersession or the stream's start removes it.
pub async fn remove_superseded(
    repo: &Repository,
    name: &WalFileName,
    reach: u32,
    keep: Option<&Piece>,
) {
    let listed = match pieces(repo, name).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("superseded pieces of {name} not removed: {e:#}");
            return;
        }
    };
    if keep.is_none() {
        // Nothing writes pieces of a segment once it is complete: what a killed writer left
        // half-written goes too (pieces are written without looking for it, see `put_piece`).
        let _ = repo.store().remove_temporaries(&segment_prefix(name)).await;
    }
    let (gone, kept): (Vec<Piece>, Vec<Piece>) = listed
        .into_iter()
        .partition(|p| Some(p) != keep && p.to <= reach);
    if gone.is_empty() {
        if kept.is_empty() {
            let _ = repo.store().prune_empty_dirs(&segment_prefix(name)).await;
        }
        return;
    }
    let keys: Vec<String> = gone.iter().map(Piece::key).collect();
    if let Err(e) = repo.store().delete_many(&keys).await {
        tracing::warn!("superseded pieces of {name} not all removed: {e}");
        return;
    }
    if kept.is_empty() {
        let _ = repo.store().prune_empty_dirs(&segment_prefix(name)).await;
    }
}

/// The tail of segment `name`: its bytes from offset 0 as far as the stored pieces reach
/// without a gap, zero-filled to the segment's size, and that reach; `None` when no piece
/// starts at 0.
pub async fn read_tail(
    repo: &Repository,
    name: &WalFileName,
    seg: WalSegmentSize,
) -> Result<Option<(Vec<u8>, u32)>, Error> {
    read_listed(repo, name, seg, pieces(repo, name).await?).await
}

/// [`read_tail`] from pieces `listed` a moment ago.
async fn read_listed(
    repo: &Repository,
    name: &WalFileName,
    seg: WalSegmentSize,
    mut listed: Vec<Piece>,
) -> Result<Option<(Vec<u8>, u32)>, Error> {
    let mut attempt = 1;
    loop {
        let run = chain(&listed);
        match read_run(repo, name, seg, &run).await {
            Ok(tail) => return Ok(tail),
            Err(e) => {
                // A running stream superseded a piece of the run and removed it (or wrote its
                // file again) while it was read: the newer pieces hold its bytes. Any other
                // failure is the answer.
                let again = pieces(repo, name).await?;
                if attempt >= 3 || run.iter().all(|p| again.contains(p)) {
                    return Err(e);
                }
                tracing::debug!("a piece of {name} was superseded while read ({e:#}); again");
                listed = again;
                attempt += 1;
            }
        }
    }
}

/// [`read_tail`] of the pieces `run`.
async fn read_run(
    repo: &Repository,
    name: &WalFileName,
    seg: WalSegmentSize,
    run: &[Piece],
) -> Result<Option<(Vec<u8>, u32)>, Error> {
    let Some(reach) = run.last().map(|p| p.to) else {
        return Ok(None);
    };
    if reach > seg.bytes() {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "the stored pieces of {name} reach {reach} bytes, past the segment's {}",
                seg.bytes()
            ),
        ));
    }
    let mut segment = vec![0u8; seg.bytes() as usize];
    for p in run {
        let bytes = read_piece(repo, p).await?;
        segment[p.from as usize..p.to as usize].copy_from_slice(&bytes);
    }
    Ok(Some((segment, reach)))
}

/// How far the stored tail of segment `name` reaches from its start without a gap, and when
/// the newest piece of that run was stored; `None` when no piece starts at 0.
pub async fn reach(
    repo: &Repository,
    name: &WalFileName,
) -> Result<Option<(u32, std::time::SystemTime)>, Error> {
    let prefix = segment_prefix(name);
    let listed = repo
        .store()
        .list_info(&prefix)
        .await
        .map_err(|e| e.into_error("listing", &prefix, &repo.store().describe()))?;
    let found: Vec<(Piece, std::time::SystemTime)> = listed
        .iter()
        .filter_map(|o| Some((Piece::parse(&o.key)?, o.modified)))
        .collect();
    let pieces: Vec<Piece> = found.iter().map(|(p, _)| p.clone()).collect();
    let run = chain(&pieces);
    let Some(end) = run.last().map(|p| p.to) else {
        return Ok(None);
    };
    let newest = found
        .iter()
        .filter(|(p, _)| run.contains(p))
        .map(|(_, t)| *t)
        .max()
        .unwrap_or(std::time::UNIX_EPOCH);
    Ok(Some((end, newest)))
}

/// Whether the data directory `restore_command` runs in (its working directory) is a standby:
/// a standby must never replay a tail that is still growing, since it would go on from the
/// zeros after it and refuse the complete segment later.
pub fn recovering_as_standby() -> bool {
    Path::new("standby.signal").exists()
}

/// Writes the tail of segment `name` to `dest` durably, after checking its first page against
/// the repository's cluster. `None` when the repository holds no tail of it.
pub async fn restore_tail(
    repo: &Repository,
    name: &WalFileName,
    dest: &Path,
) -> Result<Option<super::restore::Restored>, Error> {
    let meta = repo.read_meta().await?.ok_or_else(|| {
        Error::new(
            ErrorKind::Configuration,
            format!("{} holds no walcore repository", repo.store().describe()),
        )
    })?;
    let seg = meta.segment_size()?;
    let Some((segment, reach)) = read_tail(repo, name, seg).await? else {
        return Ok(None);
    };
    if (reach as usize) < SIZE_OF_XLOG_LONG_PHD {
        return Ok(None);
    }
    check_segment_header(
        &segment[..SIZE_OF_XLOG_LONG_PHD],
        &SegmentExpectations {
            name: name.clone(),
            system_id: Some(meta.system_id()?),
            seg_size: Some(seg),
        },
    )
    .map_err(|e| {
        Error::new(
            ErrorKind::Integrity,
            format!("the streamed tail of {name} does not hold it: {e}"),
        )
    })?;
    let dest = dest.to_path_buf();
    tokio::task::spawn_blocking(move || super::restore::publish_bytes(&segment, &dest))
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("writer thread failed: {e}")))??;
    tracing::info!(
        file = %name,
        bytes = reach,
        "restored the streamed tail of the archive: the segment's first {reach} bytes, zeros after"
    );
    Ok(Some(super::restore::Restored {
        key: segment_prefix(name),
        bytes: u64::from(reach),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> WalFileName {
        WalFileName::parse("000000020000000100000003").expect("name")
    }

    fn piece(from: u32, to: u32) -> Piece {
        Piece {
            name: name(),
            from,
            to,
        }
    }

    #[test]
    fn a_piece_key_says_where_it_is_and_reads_back() {
        let p = piece(0x10, 0x2000);
        assert_eq!(
            p.key(),
            "stream/00000002/000000020000000100000003/00000010-00002000"
        );
        assert_eq!(Piece::parse(&p.key()), Some(p));
        for not_a_piece in [
            "stream/00000002/000000020000000100000003/00002000-00000010",
            "stream/00000001/000000020000000100000003/00000000-00000010",
            "stream/00000002/000000020000000100000003.partial/00000000-00000010",
            "stream/00000002/000000020000000100000003/0000000-00000010",
            "stream/00000002/000000020000000100000003/00000000-0000001a",
            "stream/00000002/000000020000000100000003/00000000-00000010/x",
            "wal/00000002/00000001/000000020000000100000003",
        ] {
            assert_eq!(Piece::parse(not_a_piece), None, "{not_a_piece}");
        }
    }

    fn repo(dir: &Path) -> Repository {
        use crate::codec::{Codec, Compression};
        use crate::store::{LocalStore, Store};
        Repository::new(
            Store::Local(LocalStore::new(dir.to_path_buf())),
            Codec::new(Compression::None, None),
            std::time::Duration::from_secs(1),
        )
    }

    #[tokio::test]
    async fn a_tail_read_while_the_stream_supersedes_its_pieces_reads_the_newer_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let repo = repo(dir.path());
        let seg = WalSegmentSize::new(1 << 20).expect("size");
        let wal: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let first = put_piece(&repo, &name(), 0, Bytes::copy_from_slice(&wal[..100]))
            .await
            .expect("first");
        put_piece(&repo, &name(), 100, Bytes::copy_from_slice(&wal[100..200]))
            .await
            .expect("delta");
        let listed = pieces(&repo, &name()).await.expect("list");
        // Meanwhile, a piece from the start supersedes both, and they go.
        let whole = put_piece(&repo, &name(), 0, Bytes::copy_from_slice(&wal[..300]))
            .await
            .expect("whole");
        remove_superseded(&repo, &name(), whole.to, Some(&whole)).await;
        assert!(!pieces(&repo, &name()).await.expect("list").contains(&first));
        let (bytes, reach) = read_listed(&repo, &name(), seg, listed)
            .await
            .expect("read")
            .expect("a tail");
        assert_eq!(reach, 300);
        assert_eq!(&bytes[..300], &wal[..]);
        assert!(bytes[300..].iter().all(|b| *b == 0));
        // A piece that is there but does not read is an error, not a reason to read less.
        let again = pieces(&repo, &name()).await.expect("list");
        std::fs::remove_file(dir.path().join(whole.key())).expect("remove");
        std::fs::write(dir.path().join(whole.key()), b"garbage").expect("corrupt");
        let e = read_listed(&repo, &name(), seg, again)
            .await
            .expect_err("a corrupt piece");
        assert!(e.to_string().contains(&whole.key()), "{e:#}");
    }

    #[test]
    fn the_chain_is_the_longest_run_from_zero() {
        assert!(chain(&[]).is_empty());
        assert!(chain(&[piece(10, 20)]).is_empty(), "a run starts at 0");
        // A consolidated piece, the deltas after it, one delta it superseded, and a piece
        // after a gap.
        let pieces = [
            piece(0, 100),
            piece(0, 300),
            piece(100, 200),
            piece(300, 350),
            piece(350, 400),
            piece(500, 600),
        ];
        assert_eq!(
            chain(&pieces),
            vec![piece(0, 300), piece(300, 350), piece(350, 400)]
        );
        // Overlapping deltas (a restarted stream) still make one run.
        assert_eq!(
            chain(&[piece(0, 100), piece(50, 150), piece(120, 130)]),
            vec![piece(0, 100), piece(50, 150)]
        );
    }
}
