//! `walcore stream`: WAL streamed from the server over a physical replication slot into the
//! repository. Each completed segment is stored exactly as `walcore-archive` stores it (the
//! same checks and the same object, so a segment both deliver is stored once and a different
//! one is refused), and only then reported to the server as flushed: the slot never releases
//! WAL the repository lacks.
//!
//! Where it starts: after the newest segment the repository holds on the server's timeline;
//! with none there, at the slot's position (or the server's, for a new slot). When the slot no
//! longer holds the segment after the repository's newest, the WAL between is gone from the
//! server: that hole is refused with an error naming it (`--accept-hole` starts at the slot).
//!
//! What it does not do yet (issue 12): partial segments every few seconds, the synchronous
//! mode, storing the old timeline's last segment and the new history at a promotion (it stops
//! streaming the old timeline at the switch and starts again on the new one, leaving the
//! partial segment to `archive_command`), and lag in `walcore status`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bytes::Buf;

use crate::backup::plan::newest_segment;
use crate::backup::take::{check_cluster, server_segment_size};
use crate::error::{Error, ErrorKind};
use crate::pg::{Lsn, SegmentNo, TimelineId, WalFileName, WalSegmentSize};
use crate::replication::stream::{ServerMessage, StatusUpdate, StreamEvent, pg_time};
use crate::replication::{ConnConfig, ConnectOptions, ReplicationConnection};
use crate::repo::Repository;

/// What to stream, and how.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// A libpq connection string or URL; the `PG*` variables and `.pgpass` fill in the rest.
    pub conninfo: String,
    /// The physical replication slot, created (reserving WAL) when absent.
    pub slot: String,
    /// Start at the slot even when WAL between the repository's newest segment and the slot
    /// is gone from the server.
    pub accept_hole: bool,
    /// Where a segment is put together before it is stored.
    pub spool: PathBuf,
    /// How often the positions are reported when nothing else prompts it.
    pub status_interval: Duration,
    /// A server silent this long is taken for gone (it sends keepalives when idle).
    pub silence: Duration,
    /// The longest wait between two connection attempts.
    pub max_backoff: Duration,
}

impl StreamOptions {
    pub fn new(conninfo: String, slot: String, spool: PathBuf) -> StreamOptions {
        StreamOptions {
            conninfo,
            slot,
            accept_hole: false,
            spool,
            status_interval: Duration::from_secs(10),
            silence: Duration::from_secs(90),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// Streams until an error that waiting cannot cure (another cluster, a hole, a bad setting);
/// everything else (the server gone, the store down for a while) is retried with a backoff
/// that doubles up to `max_backoff`.
pub async fn stream(repo: &Repository, options: &StreamOptions) -> Result<(), Error> {
    std::fs::create_dir_all(&options.spool).map_err(|e| {
        Error::new(
            ErrorKind::LocalIo,
            format!("creating the spool {}: {e}", options.spool.display()),
        )
    })?;
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut stored = 0u64;
        let outcome = session(repo, options, &mut stored).await;
        if stored > 0 {
            backoff = Duration::from_secs(1);
        }
        match outcome {
            Ok(()) => tracing::info!("the stream ended at a timeline switch; starting again"),
            Err(e) if !retryable(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(
                    "streaming stopped: {e:#}; connecting again in {}s",
                    backoff.as_secs()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(options.max_backoff);
            }
        }
    }
}

/// Errors that a later attempt may not meet.
fn retryable(e: &Error) -> bool {
    !matches!(
        e.kind(),
        ErrorKind::Hole
            | ErrorKind::Conflict
            | ErrorKind::Configuration
            | ErrorKind::InvalidInput
            | ErrorKind::WrongKey
            | ErrorKind::Internal
    )
}

/// One connection: identify, slot, start position, then segments until an error or the end
/// of the timeline. `stored` counts the segments stored.
async fn session(
    repo: &Repository,
    options: &StreamOptions,
    stored: &mut u64,
) -> Result<(), Error> {
    let mut config = ConnConfig::from_env(&options.conninfo)
        .map_err(|e| Error::new(ErrorKind::Configuration, e.to_string()))?;
    if config.application_name.is_none() {
        config.application_name = Some("walcore".into());
    }
    let connect = ConnectOptions {
        read_timeout: options.silence,
        ..ConnectOptions::default()
    };
    let mut conn = ReplicationConnection::connect(&config, &connect).await?;
    let server = conn.server().to_owned();
    let system = conn.identify_system().await?;
    let version_num = conn.server_version_num().unwrap_or(0);
    let seg = server_segment_size(&mut conn).await?;
    check_cluster(repo, &server, &system, version_num, seg).await?;

    // The slot, reserving WAL, before anything streams.
    match conn.create_physical_slot(&options.slot).await {
        Ok(()) => tracing::info!(slot = %options.slot, "created the replication slot"),
        Err(e) if e.server_error().is_some_and(|s| s.code == "42710") => {}
        Err(e) => return Err(e.into()),
    }
    let slot_at = if version_num >= 150_000 {
        conn.read_replication_slot(&options.slot)
            .await?
            .map(|(lsn, _)| lsn)
    } else {
        None
    };

    let tli = system.timeline;
    let start = start_position(repo, options, seg, tli, slot_at, system.xlogpos).await?;
    tracing::info!(
        server = %server,
        slot = %options.slot,
        timeline = tli.0,
        start = %start,
        "streaming"
    );
    if let Some(end) = conn
        .start_replication(Some(&options.slot), start, tli)
        .await?
    {
        tracing::info!("timeline {} ended before {start}: {end:?}", tli.0);
        return Ok(());
    }

    let seg_bytes = u64::from(seg.bytes());
    let mut buf: Vec<u8> = Vec::with_capacity(seg.bytes() as usize);
    let mut received = start;
    let mut flushed = start;
    let mut last_status = Instant::now();
    loop {
        let event = conn.recv_stream(options.silence).await?;
        let mut reply = false;
        match event {
            StreamEvent::Message(ServerMessage::XLogData {
                start: at,
                mut data,
                ..
            }) => {
                if at != received {
                    return Err(Error::new(
                        ErrorKind::Internal,
                        format!("{server} sent WAL from {at}, but the stream is at {received}"),
                    ));
                }
                while data.has_remaining() {
                    let room = (seg_bytes - buf.len() as u64) as usize;
                    let take = room.min(data.len());
                    buf.extend_from_slice(&data[..take]);
                    data.advance(take);
                    received = Lsn(received.0 + take as u64);
                    if buf.len() as u64 == seg_bytes {
                        let segno = SegmentNo(received.0 / seg_bytes - 1);
                        let name = WalFileName::segment(tli, segno, seg);
                        store_segment(repo, &options.spool, &name, &buf).await?;
                        *stored += 1;
                        flushed = received;
                        buf.clear();
                        reply = true;
                    }
                }
            }
            StreamEvent::Message(ServerMessage::Keepalive {
                reply_requested, ..
            }) => reply = reply_requested,
            StreamEvent::TimelineEnded {
                next_timeline,
                start: next,
            } => {
                tracing::info!(
                    "timeline {} ended at {next}; the server goes on on timeline {}",
                    tli.0,
                    next_timeline.0
                );
                return Ok(());
            }
        }
        if reply || last_status.elapsed() >= options.status_interval {
            conn.send_status(&StatusUpdate {
                write: received,
                flush: flushed,
                // Nothing is replayed here (as pg_receivewal reports it).
                apply: Lsn(0),
                sent_at: pg_time(SystemTime::now()),
                reply_requested: false,
            })
            .await?;
            last_status = Instant::now();
        }
    }
}

/// Where a session starts (see the module documentation).
async fn start_position(
    repo: &Repository,
    options: &StreamOptions,
    seg: WalSegmentSize,
    tli: TimelineId,
    slot_at: Option<Lsn>,
    server_at: Lsn,
) -> Result<Lsn, Error> {
    let seg_bytes = u64::from(seg.bytes());
    let floor = |l: Lsn| Lsn(l.0 - l.0 % seg_bytes);
    let Some(end) = newest_segment(repo, tli, seg).await? else {
        return Ok(floor(slot_at.unwrap_or(server_at)));
    };
    let next = end.segment.segno(seg)?.0 + 1;
    let wanted = SegmentNo(next).start_lsn(seg);
    match slot_at {
        Some(held) if floor(held) > wanted => {
            let first_held = WalFileName::segment(tli, SegmentNo(held.0 / seg_bytes), seg);
            let first_missing = WalFileName::segment(tli, SegmentNo(next), seg);
            if options.accept_hole {
                tracing::warn!(
                    "segments {first_missing} up to {first_held} (not included) are gone from \
                     the server and not in the repository: starting at {first_held} as \
                     --accept-hole says; recovery cannot pass that hole"
                );
                Ok(floor(held))
            } else {
                Err(Error::new(
                    ErrorKind::Hole,
                    format!(
                        "the repository ends before {first_missing}, but slot {} holds WAL only \
                         from {first_held}: the segments between are gone from the server. \
                         Store them from elsewhere (a copy of pg_wal, walcore-archive), or \
                         start after the hole with --accept-hole (recovery will stop there)",
                        options.slot
                    ),
                ))
            }
        }
        _ => Ok(wanted),
    }
}

/// Stores one complete segment through the archive path (checks, create-only, identical
/// content accepted, different content refused); the spool copy goes afterwards.
async fn store_segment(
    repo: &Repository,
    spool: &Path,
    name: &WalFileName,
    bytes: &[u8],
) -> Result<(), Error> {
    let path = spool.join(name.to_string());
    std::fs::write(&path, bytes).map_err(|e| {
        Error::new(
            ErrorKind::LocalIo,
            format!("writing {} to the spool: {e}", path.display()),
        )
    })?;
    let outcome = super::archive::archive_file(repo, &path).await;
    let _ = std::fs::remove_file(&path);
    let archived = outcome?;
    tracing::info!(segment = %name, "streamed segment stored: {archived:?}");
    Ok(())
}
