//! `walcore stream`: WAL streamed from the server over a physical replication slot into the
//! repository, seconds behind the server (or, with `--synchronous`, never behind a commit the
//! server acknowledged to its client).
//!
//! What is stored:
//! - each completed segment exactly as `walcore-archive` stores it (the same checks and the
//!   same object, so a segment both deliver is stored once and a different one is refused);
//! - the segment being filled, as pieces under `stream/` ([`super::tail`]): every
//!   `partial_interval` a piece from its start to what has arrived, which supersedes (and
//!   removes) the pieces before it; in synchronous mode also, after each batch, a piece from
//!   where the stored ones end to what has arrived;
//! - at a timeline switch, the old timeline's last segment as `.partial` under its own name
//!   (never as a complete segment), and the new timeline's history file.
//!
//! What is reported: the flush position is what the repository holds durably, never more, so
//! the slot never releases WAL the repository lacks, and synchronous replication waits for the
//! repository. What arrives while a store is in flight makes the next one (a group commit);
//! complete segments and pieces from a segment's start are stored one at a time, synchronous
//! pieces that continue each other up to [`MAX_DELTAS_IN_FLIGHT`] at once.
//!
//! Where it starts: after the newest segment the repository holds on the server's timeline;
//! with none there, at the slot's position (or the server's, for a new slot). When the slot no
//! longer holds the segment after the repository's newest, the WAL between is gone from the
//! server: that hole is refused with an error naming it (`--accept-hole` starts at the slot).

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes};
use futures::StreamExt;
use futures::stream::FuturesOrdered;

use super::tail::{self, Piece};
use crate::backup::plan::newest_segment;
use crate::backup::take::{check_cluster, server_segment_size};
use crate::error::{Error, ErrorKind};
use crate::pg::{
    Lsn, SegmentNo, TimelineHistory, TimelineId, WalFileKind, WalFileName, WalSegmentSize,
};
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
    /// How often the segment being filled is stored, as a piece from its start.
    pub partial_interval: Duration,
    /// Store what arrives at once, and report it flushed once stored.
    pub synchronous: bool,
    /// How often the lag is logged.
    pub lag_log_interval: Duration,
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
            partial_interval: Duration::from_secs(10),
            synchronous: false,
            lag_log_interval: Duration::from_secs(60),
        }
    }
}

/// Complete segments waiting for their store beyond this many stop the reading from the
/// server until one is stored: memory stays bounded when the store is slower than the server.
const MAX_PENDING_SEGMENTS: usize = 4;

/// Pieces stored at once in synchronous mode, each continuing the one before.
const MAX_DELTAS_IN_FLIGHT: usize = 3;

/// Streams until an error that waiting cannot cure (another cluster, a hole, a bad setting) or
/// SIGTERM/SIGINT (after storing what has arrived); everything else (the server gone, the
/// store down for a while) is retried with a backoff that doubles up to `max_backoff`.
pub async fn stream(repo: &Repository, options: &StreamOptions) -> Result<(), Error> {
    std::fs::create_dir_all(&options.spool).map_err(|e| {
        Error::new(
            ErrorKind::LocalIo,
            format!("creating the spool {}: {e}", options.spool.display()),
        )
    })?;
    // Synchronous pieces come and go by the thousand a second: on a file system, their files
    // are reused rather than allocated and freed each time.
    let repo = &repo.with_store(
        repo.store()
            .recycling(tail::TAIL_PREFIX)
            .await
            .map_err(|e| e.into_error("preparing", tail::TAIL_PREFIX, &repo.store().describe()))?,
    );
    let mut stop = Stop::new()?;
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut stored = 0u64;
        let outcome = session(repo, options, &mut stored, &mut stop).await;
        if stored > 0 {
            backoff = Duration::from_secs(1);
        }
        match outcome {
            Ok(Ended::Timeline(_)) => {
                tracing::info!("the stream ended at a timeline switch; starting again")
            }
            Ok(Ended::Stopped) => {
                tracing::info!("stopped by a signal, after storing what had arrived");
                return Ok(());
            }
            Err(e) if !retryable(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(
                    "streaming stopped: {e:#}; connecting again in {}s",
                    backoff.as_secs()
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait() => return Ok(()),
                }
                backoff = (backoff * 2).min(options.max_backoff);
            }
        }
    }
}

/// SIGTERM (systemd's stop) and SIGINT.
struct Stop {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Stop {
    fn new() -> Result<Stop, Error> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind| {
            signal(kind)
                .map_err(|e| Error::new(ErrorKind::Internal, format!("listening for signals: {e}")))
        };
        Ok(Stop {
            term: listen(SignalKind::terminate())?,
            int: listen(SignalKind::interrupt())?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Why a session ended without an error.
enum Ended {
    /// The server's timeline ended; a new session goes on on the next one.
    Timeline(TimelineId),
    /// A signal asked to stop.
    Stopped,
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

/// What one store made durable.
enum Stored {
    /// Complete segment number N, and whether pieces of it may exist (to be removed).
    Segment(u64, bool),
    /// A piece of segment N.
    Piece(u64, Piece),
}

type Job<'a> = Pin<Box<dyn Future<Output = Result<Stored, Error>> + Send + 'a>>;

/// The segment being filled.
struct Filling {
    segno: u64,
    buf: Vec<u8>,
    /// Bytes from its start that pieces stored or being stored hold.
    submitted: u32,
    /// Whether pieces of it may be stored (this session's or an earlier one's).
    has_pieces: bool,
    /// When the last piece from offset 0 was started (or the session began).
    consolidated_at: Instant,
}

/// The state of one session's stream: what has arrived, what is stored, what waits.
struct Progress<'a> {
    repo: &'a Repository,
    options: &'a StreamOptions,
    tli: TimelineId,
    seg: WalSegmentSize,
    filling: Filling,
    /// Complete segments not yet stored, oldest first, and whether pieces of each may exist.
    pending: VecDeque<(u64, Vec<u8>, bool)>,
    received: Lsn,
    flushed: Lsn,
    /// When the oldest byte not yet durable arrived.
    unflushed_since: Option<Instant>,
    /// The server's end of WAL, as it last said.
    server_end: Lsn,
}

impl<'a> Progress<'a> {
    fn seg_bytes(&self) -> u64 {
        u64::from(self.seg.bytes())
    }

    fn name(&self, segno: u64) -> WalFileName {
        WalFileName::segment(self.tli, SegmentNo(segno), self.seg)
    }

    /// Takes WAL from `at` (which must be where the stream is).
    fn receive(&mut self, at: Lsn, mut data: Bytes) -> Result<(), Error> {
        if at != self.received {
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "the server sent WAL from {at}, but the stream is at {}",
                    self.received
                ),
            ));
        }
        if data.has_remaining() && self.unflushed_since.is_none() {
            self.unflushed_since = Some(Instant::now());
        }
        let seg_bytes = self.seg_bytes();
        while data.has_remaining() {
            let room = (seg_bytes - self.filling.buf.len() as u64) as usize;
            let take = room.min(data.len());
            self.filling.buf.extend_from_slice(&data[..take]);
            data.advance(take);
            self.received = Lsn(self.received.0 + take as u64);
            if self.filling.buf.len() as u64 == seg_bytes {
                let next = Filling {
                    segno: self.filling.segno + 1,
                    buf: Vec::with_capacity(seg_bytes as usize),
                    submitted: 0,
                    has_pieces: false,
                    consolidated_at: self.filling.consolidated_at,
                };
                let full = std::mem::replace(&mut self.filling, next);
                self.pending
                    .push_back((full.segno, full.buf, full.has_pieces));
            }
        }
        Ok(())
    }

    /// The next store to run, if any is due, given `in_flight` stores already running:
    /// complete segments first, then a piece of the segment being filled (at once in
    /// synchronous mode or when `now` is set, otherwise when the partial interval has passed).
    /// A complete segment and a piece from offset 0 run alone (they remove what they
    /// supersede); in synchronous mode up to [`MAX_DELTAS_IN_FLIGHT`] pieces that continue the
    /// submitted ones run at once, so that a commit waits for one store, not for the end of the
    /// one before it too. Stores finish in the order they began (see `session`).
    fn next_job(&mut self, in_flight: usize, now: bool) -> Option<Job<'a>> {
        let repo = self.repo;
        if !self.pending.is_empty() {
            if in_flight > 0 {
                return None;
            }
            let (segno, bytes, has_pieces) = self.pending.pop_front()?;
            let name = self.name(segno);
            let spool = self.options.spool.clone();
            return Some(Box::pin(async move {
                store_segment(repo, &spool, &name, &bytes).await?;
                Ok(Stored::Segment(segno, has_pieces))
            }));
        }
        let f = &mut self.filling;
        let len = f.buf.len() as u32;
        if len <= f.submitted {
            return None;
        }
        let due = f.consolidated_at.elapsed() >= self.options.partial_interval;
        if !(self.options.synchronous || due || now) {
            return None;
        }
        // A piece from the start when one is due (or there is none yet), else the bytes after
        // the submitted ones.
        let from = if due || now || f.submitted == 0 {
            if in_flight > 0 {
                return None;
            }
            f.consolidated_at = Instant::now();
            0
        } else {
            if in_flight >= MAX_DELTAS_IN_FLIGHT {
                return None;
            }
            f.submitted
        };
        f.has_pieces = true;
        f.submitted = len;
        let segno = f.segno;
        let bytes = Bytes::copy_from_slice(&f.buf[from as usize..]);
        let name = self.name(segno);
        Some(Box::pin(async move {
            let piece = tail::put_piece(repo, &name, from, bytes).await?;
            Ok(Stored::Piece(segno, piece))
        }))
    }

    /// Records what a store made durable; returns the pieces it superseded, to be removed
    /// (segment, reach, piece to keep).
    fn stored(&mut self, done: Stored) -> Option<(WalFileName, u32, Option<Piece>)> {
        let seg_bytes = self.seg_bytes();
        let (reach, superseded) = match done {
            Stored::Segment(segno, has_pieces) => (
                Lsn((segno + 1) * seg_bytes),
                has_pieces.then(|| (self.name(segno), self.seg.bytes(), None)),
            ),
            Stored::Piece(segno, piece) => {
                let reach = Lsn(segno * seg_bytes + u64::from(piece.to));
                let superseded =
                    (piece.from == 0).then(|| (piece.name.clone(), piece.to, Some(piece)));
                (reach, superseded)
            }
        };
        if reach > self.flushed {
            self.flushed = reach;
        }
        if self.flushed >= self.received {
            self.unflushed_since = None;
        }
        superseded
    }

    /// Stores what is pending and what has arrived of the segment being filled.
    async fn store_everything(&mut self) -> Result<(), Error> {
        while let Some(job) = self.next_job(0, true) {
            let done = job.await?;
            self.settle(done).await;
        }
        Ok(())
    }

    /// [`stored`](Self::stored), then the removal of what it superseded, waited for.
    async fn settle(&mut self, done: Stored) {
        if let Some((name, reach, keep)) = self.stored(done) {
            tail::remove_superseded(self.repo, &name, reach, keep.as_ref()).await;
        }
    }

    fn status(&self) -> StatusUpdate {
        StatusUpdate {
            write: self.received,
            flush: self.flushed,
            // Nothing is replayed here (as pg_receivewal reports it).
            apply: Lsn(0),
            sent_at: pg_time(SystemTime::now()),
            reply_requested: false,
        }
    }

    fn log_lag(&self) {
        let behind = self.server_end.0.saturating_sub(self.flushed.0);
        let seconds = self
            .unflushed_since
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        tracing::info!(
            received = %self.received,
            flushed = %self.flushed,
            server_end = %self.server_end,
            lag_bytes = behind,
            lag_seconds = format!("{seconds:.1}"),
            // The slot keeps what was not reported flushed: the server's end minus the flush.
            slot_retained_bytes = behind,
            "stream lag: the repository is {behind} bytes and {seconds:.1}s behind the server"
        );
    }
}

/// One connection: identify, slot, start position, then segments until an error, a signal or
/// the end of the timeline. `stored` counts the stores made.
async fn session(
    repo: &Repository,
    options: &StreamOptions,
    stored: &mut u64,
    stop: &mut Stop,
) -> Result<Ended, Error> {
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
    let history = if tli.0 > 1 {
        Some(store_history(repo, &options.spool, &mut conn, tli).await?)
    } else {
        None
    };
    let start = start_position(
        repo,
        options,
        seg,
        tli,
        slot_at,
        system.xlogpos,
        history.as_ref(),
    )
    .await?;
    let seg_bytes = u64::from(seg.bytes());
    let first = start.0 / seg_bytes;
    remove_leftover_pieces(repo, tli, seg, first).await;
    let has_pieces = !tail::pieces(repo, &WalFileName::segment(tli, SegmentNo(first), seg))
        .await?
        .is_empty();
    tracing::info!(
        server = %server,
        slot = %options.slot,
        timeline = tli.0,
        start = %start,
        synchronous = options.synchronous,
        "streaming"
    );
    if let Some(end) = conn
        .start_replication(Some(&options.slot), start, tli)
        .await?
    {
        tracing::info!("timeline {} ended before {start}: {end:?}", tli.0);
        let StreamEvent::TimelineEnded { next_timeline, .. } = end else {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("START_REPLICATION answered {end:?}"),
            ));
        };
        return Ok(Ended::Timeline(next_timeline));
    }

    let mut p = Progress {
        repo,
        options,
        tli,
        seg,
        filling: Filling {
            segno: first,
            buf: Vec::with_capacity(seg.bytes() as usize),
            submitted: 0,
            has_pieces,
            consolidated_at: Instant::now(),
        },
        pending: VecDeque::new(),
        received: start,
        flushed: start,
        unflushed_since: None,
        server_end: start,
    };
    // Stores running, finishing in the order they began: the flush position only moves over
    // a run of stores that all finished.
    let mut jobs: FuturesOrdered<Job<'_>> = FuturesOrdered::new();
    let mut removals = tokio::task::JoinSet::new();
    let mut last_status = Instant::now();
    let mut last_lag_log = Instant::now();
    let mut reported = start;
    let outcome: Result<Ended, Error> = loop {
        // Group commit: take in what has already arrived before the next store starts.
        let reading = p.pending.len() < MAX_PENDING_SEGMENTS;
        if !conn.has_buffered() || !reading {
            while let Some(job) = p.next_job(jobs.len(), false) {
                jobs.push_back(job);
            }
        }
        let wake = {
            let status_at = last_status + options.status_interval;
            let piece_at = p.filling.consolidated_at + options.partial_interval;
            if jobs.is_empty() && p.filling.buf.len() as u32 > p.filling.submitted {
                status_at.min(piece_at)
            } else {
                status_at
            }
        };
        let mut reply = false;
        tokio::select! {
            Some(done) = jobs.next(), if !jobs.is_empty() => {
                match done {
                    Ok(done) => {
                        // Superseded pieces are removed beside the stream, so that a
                        // synchronous commit never waits for a clean-up.
                        if let Some((name, reach, keep)) = p.stored(done) {
                            let repo = repo.clone();
                            removals.spawn(async move {
                                tail::remove_superseded(&repo, &name, reach, keep.as_ref()).await;
                            });
                        }
                        *stored += 1;
                    }
                    // The store failed: nothing after it may be stored (a later segment
                    // stored before this one would read as the repository's end, leaving a
                    // hole behind it at the next start).
                    Err(e) => return Err(e),
                }
            }
            event = conn.recv_stream(options.silence), if reading => match event {
                Ok(StreamEvent::Message(ServerMessage::XLogData { start: at, wal_end, data, .. })) => {
                    p.server_end = p.server_end.max(wal_end);
                    if let Err(e) = p.receive(at, data) {
                        break Err(e);
                    }
                }
                Ok(StreamEvent::Message(ServerMessage::Keepalive { wal_end, reply_requested, .. })) => {
                    p.server_end = p.server_end.max(wal_end);
                    reply = reply_requested;
                }
                Ok(StreamEvent::TimelineEnded { next_timeline, start: next }) => {
                    tracing::info!(
                        "timeline {} ended at {next}; the server goes on on timeline {}",
                        tli.0,
                        next_timeline.0
                    );
                    break Ok(Ended::Timeline(next_timeline));
                }
                Err(e) => break Err(e.into()),
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = stop.wait() => break Ok(Ended::Stopped),
        }
        if p.flushed > reported || reply || last_status.elapsed() >= options.status_interval {
            if let Err(e) = conn.send_status(&p.status()).await {
                break Err(e.into());
            }
            reported = p.flushed;
            last_status = Instant::now();
        }
        if last_lag_log.elapsed() >= options.lag_log_interval {
            p.log_lag();
            last_lag_log = Instant::now();
        }
    };

    // Whatever ended the session, what has arrived is stored before it returns: the server may
    // be gone for good, and these bytes are the newest the repository can hold.
    while let Some(done) = jobs.next().await {
        p.settle(done?).await;
    }
    removals.join_all().await;
    if let Ok(Ended::Timeline(next)) = outcome {
        // The next timeline's history first: it places the switch, which lets the archive
        // path accept the server's own `.partial` beside the one stored here.
        store_history(repo, &options.spool, &mut conn, next).await?;
        end_of_timeline(&mut p).await?;
    } else {
        p.store_everything().await?;
    }
    if p.flushed > reported {
        // Best effort: the connection may be gone.
        let _ = conn.send_status(&p.status()).await;
    }
    outcome
}

/// At the end of a timeline: complete segments are stored, and the segment the timeline ended
/// in is stored as `.partial` under its own name: its bytes up to the switch, zeros after.
async fn end_of_timeline(p: &mut Progress<'_>) -> Result<(), Error> {
    while !p.pending.is_empty() {
        let Some(job) = p.next_job(0, false) else {
            break;
        };
        let done = job.await?;
        p.settle(done).await;
    }
    if p.filling.buf.is_empty() {
        return Ok(());
    }
    let name = p.name(p.filling.segno).with_kind(WalFileKind::Partial);
    let mut bytes = std::mem::take(&mut p.filling.buf);
    bytes.resize(p.seg.bytes() as usize, 0);
    store_segment(p.repo, &p.options.spool, &name, &bytes).await?;
    if p.filling.has_pieces {
        tail::remove_superseded(p.repo, &p.name(p.filling.segno), p.seg.bytes(), None).await;
    }
    Ok(())
}

/// Stores timeline `tli`'s history file as the server has it (through the archive path, so a
/// copy `archive_command` stored first is accepted when identical).
async fn store_history(
    repo: &Repository,
    spool: &Path,
    conn: &mut ReplicationConnection,
    tli: TimelineId,
) -> Result<TimelineHistory, Error> {
    let (file, content) = conn.timeline_history(tli).await?;
    let name = WalFileName::parse(&file)
        .ok()
        .filter(|n| n.kind() == &WalFileKind::History && n.timeline() == tli)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Internal,
                format!("the server sent history file {file:?} for timeline {tli}"),
            )
        })?;
    let history = TimelineHistory::parse(tli, &content).map_err(|e| {
        Error::from(e).context(format!("the history of timeline {tli} the server sent"))
    })?;
    store_segment(repo, spool, &name, &content).await?;
    Ok(history)
}

/// Removes the pieces an earlier session left of segments before `first` on `tli` that are
/// stored complete (a piece of a segment that is not is kept: it may be all there is of it).
async fn remove_leftover_pieces(
    repo: &Repository,
    tli: TimelineId,
    seg: WalSegmentSize,
    first: u64,
) {
    let prefix = tail::timeline_prefix(tli);
    // Before this session stores anything, no one writes here: what a killed session left
    // half-written goes.
    let _ = repo.store().remove_temporaries(&prefix).await;
    let keys = match repo.store().list(&prefix).await {
        Ok(k) => k,
        Err(e) => {
            tracing::debug!("pieces left by an earlier session not looked for: {e}");
            return;
        }
    };
    let mut segments: Vec<WalFileName> = keys
        .iter()
        .filter_map(|k| Piece::parse(k))
        .filter(|p| p.name.segno(seg).is_ok_and(|n| n.0 < first))
        .map(|p| p.name)
        .collect();
    segments.dedup();
    for name in segments {
        if let Ok(Some(_)) = repo.store().head(&crate::store::wal_key(&name)).await {
            tail::remove_superseded(repo, &name, seg.bytes(), None).await;
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
    history: Option<&TimelineHistory>,
) -> Result<Lsn, Error> {
    let seg_bytes = u64::from(seg.bytes());
    let floor = |l: Lsn| Lsn(l.0 - l.0 % seg_bytes);
    let next = match newest_segment(repo, tli, seg).await? {
        Some(end) => end.segment.segno(seg)?.0 + 1,
        None => {
            // Nothing of this timeline yet. When the repository holds the timeline it branched
            // from, this one goes on from where it began (the segment of the switch, which the
            // server keeps under the new timeline's name); otherwise from the slot.
            let parent = history.and_then(|h| h.entries().last());
            let begun = match (parent, history.and_then(|h| h.start_of(tli))) {
                (Some(p), Some(begin)) if newest_segment(repo, p.parent, seg).await?.is_some() => {
                    Some(begin)
                }
                _ => None,
            };
            match begun {
                Some(begin) => begin.0 / seg_bytes,
                None => return Ok(floor(slot_at.unwrap_or(server_at))),
            }
        }
    };
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
