//! Physical streaming replication (`START_REPLICATION … PHYSICAL`): the messages that travel
//! inside CopyData once the server has answered with CopyBothResponse, parsed and built sans-IO,
//! and the connection calls that start a stream, receive from it, answer it and end it.
//!
//! From the server:
//! - XLogData `'w'`: the WAL position of the first byte, the server's current end of WAL, its
//!   clock, then WAL bytes;
//! - primary keepalive `'k'`: the server's end of WAL, its clock, and whether it wants an
//!   answer at once (it ends the connection after `wal_sender_timeout` without one).
//!
//! From the client, the standby status update `'r'`: the positions written, flushed (what the
//! server may release from a slot, and what synchronous replication waits for) and applied, the
//! client's clock, and whether it wants a keepalive back.
//!
//! Clocks are microseconds since 2000-01-01 00:00 UTC, PostgreSQL's epoch.
//!
//! When the server ends the stream (its timeline ended: the client streamed up to the switch
//! point), it sends CopyDone; the client answers CopyDone and the server then sends the next
//! timeline and where it starts as a one-row result, CommandComplete and ReadyForQuery.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::conn::ReplicationConnection;
use super::error::ReplicationError;
use super::message::{BackendMessage, message_name};
use crate::pg::{Lsn, TimelineId};

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00 UTC).
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// A message of the server inside the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// WAL bytes, the first of them at `start`.
    XLogData {
        start: Lsn,
        /// The server's end of WAL when it sent this.
        wal_end: Lsn,
        sent_at: i64,
        data: Bytes,
    },
    /// The server is alive; when `reply_requested`, it wants a status update at once.
    Keepalive {
        wal_end: Lsn,
        sent_at: i64,
        reply_requested: bool,
    },
}

/// What is wrong with a CopyData payload of the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamProblem {
    #[error("an empty CopyData message in the WAL stream")]
    Empty,
    #[error("a WAL stream message of unknown kind {0:#04x}")]
    UnknownKind(u8),
    #[error("a WAL stream '{kind}' message of {len} bytes; it needs at least {need}")]
    Short { kind: char, len: usize, need: usize },
}

/// Parses the payload of one CopyData message of the stream.
pub fn parse_server(mut payload: Bytes) -> Result<ServerMessage, StreamProblem> {
    let len = payload.len();
    let Some(&kind) = payload.first() else {
        return Err(StreamProblem::Empty);
    };
    let short = |need: usize| StreamProblem::Short {
        kind: char::from(kind),
        len,
        need,
    };
    match kind {
        b'w' => {
            const HEADER: usize = 1 + 8 + 8 + 8;
            if len < HEADER {
                return Err(short(HEADER));
            }
            payload.advance(1);
            let start = Lsn(payload.get_u64());
            let wal_end = Lsn(payload.get_u64());
            let sent_at = payload.get_i64();
            Ok(ServerMessage::XLogData {
                start,
                wal_end,
                sent_at,
                data: payload,
            })
        }
        b'k' => {
            const SIZE: usize = 1 + 8 + 8 + 1;
            if len < SIZE {
                return Err(short(SIZE));
            }
            payload.advance(1);
            let wal_end = Lsn(payload.get_u64());
            let sent_at = payload.get_i64();
            let reply_requested = payload.get_u8() != 0;
            Ok(ServerMessage::Keepalive {
                wal_end,
                sent_at,
                reply_requested,
            })
        }
        other => Err(StreamProblem::UnknownKind(other)),
    }
}

/// The standby status update (`'r'`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusUpdate {
    /// Received and written (not necessarily durable).
    pub write: Lsn,
    /// Durable: the server may release the slot's WAL before this, and a synchronous commit
    /// waiting on this standby returns once it is past the commit.
    pub flush: Lsn,
    /// Replayed (a WAL archiver replays nothing: the flush position, as `pg_receivewal` says).
    pub apply: Lsn,
    pub sent_at: i64,
    pub reply_requested: bool,
}

impl StatusUpdate {
    /// The CopyData payload.
    pub fn payload(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(1 + 8 * 4 + 1);
        out.put_u8(b'r');
        out.put_u64(self.write.0);
        out.put_u64(self.flush.0);
        out.put_u64(self.apply.0);
        out.put_i64(self.sent_at);
        out.put_u8(u8::from(self.reply_requested));
        out.freeze()
    }
}

/// `t` on PostgreSQL's clock (microseconds since 2000-01-01 UTC).
pub fn pg_time(t: SystemTime) -> i64 {
    let unix = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let micros = unix.as_micros() as i64;
    micros - (PG_EPOCH_UNIX_SECS as i64) * 1_000_000
}

/// A CopyData frame around `payload`.
fn copy_data(payload: &[u8], out: &mut BytesMut) {
    out.put_u8(b'd');
    out.put_i32((payload.len() + 4) as i32);
    out.put_slice(payload);
}

/// What the stream gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    Message(ServerMessage),
    /// The server ended the stream: its timeline `next_timeline` begins at `start` (the end of
    /// the one streamed). The connection is ready for the next command.
    TimelineEnded {
        next_timeline: TimelineId,
        start: Lsn,
    },
}

impl ReplicationConnection {
    /// `CREATE_REPLICATION_SLOT name PHYSICAL RESERVE_WAL`: a physical slot that holds WAL from
    /// now on (the form every PostgreSQL from 10 on accepts). Its position is read with
    /// [`read_replication_slot`](Self::read_replication_slot) (the reply's `consistent_point`
    /// is 0/0 for a physical slot).
    pub async fn create_physical_slot(&mut self, name: &str) -> Result<(), ReplicationError> {
        let doing = format!("creating replication slot {name}");
        check_slot_name(self, name, &doing)?;
        self.simple_query(&format!(
            "CREATE_REPLICATION_SLOT {name} PHYSICAL RESERVE_WAL"
        ))
        .await?;
        Ok(())
    }

    /// `READ_REPLICATION_SLOT name` (PostgreSQL 15 and later): the slot's `restart_lsn` and
    /// the timeline it is on; `None` when there is no such slot (or it holds no WAL).
    pub async fn read_replication_slot(
        &mut self,
        name: &str,
    ) -> Result<Option<(Lsn, Option<TimelineId>)>, ReplicationError> {
        let doing = format!("reading replication slot {name}");
        check_slot_name(self, name, &doing)?;
        let rows = self
            .simple_query(&format!("READ_REPLICATION_SLOT {name}"))
            .await?;
        let [row] = rows.as_slice() else {
            return Err(self.invalid(&doing, format!("expected one row, got {}", rows.len())));
        };
        let text = |column: &str| -> Result<Option<String>, ReplicationError> {
            row.text(column)
                .map(|v| v.map(str::to_owned))
                .map_err(|detail| self.invalid(&doing, detail))
        };
        let Some(restart) = text("restart_lsn")? else {
            return Ok(None);
        };
        let restart = restart
            .parse::<Lsn>()
            .map_err(|e| self.invalid(&doing, e.to_string()))?;
        let timeline = text("restart_tli")?
            .and_then(|t| t.parse::<u32>().ok())
            .filter(|&t| t > 0)
            .map(TimelineId);
        Ok(Some((restart, timeline)))
    }

    /// `TIMELINE_HISTORY tli`: the history file of timeline `tli` (above 1) as the server has
    /// it: its file name and its bytes.
    pub async fn timeline_history(
        &mut self,
        timeline: TimelineId,
    ) -> Result<(String, Bytes), ReplicationError> {
        let doing = format!("fetching the history of timeline {timeline}");
        let rows = self
            .simple_query(&format!("TIMELINE_HISTORY {}", timeline.0))
            .await?;
        let [row] = rows.as_slice() else {
            return Err(self.invalid(&doing, format!("expected one row, got {}", rows.len())));
        };
        let (Some(file), Some(content)) = (row.raw(0), row.raw(1)) else {
            return Err(self.invalid(&doing, "a column is null".into()));
        };
        let file = std::str::from_utf8(file)
            .map_err(|_| self.invalid(&doing, "the file name is not UTF-8".into()))?;
        Ok((file.to_owned(), Bytes::copy_from_slice(content)))
    }

    /// `START_REPLICATION [SLOT slot] PHYSICAL start TIMELINE tli`: the server streams WAL from
    /// `start` (which the caller rounds down to a page or segment boundary, as the server
    /// wants). Returns `None` once the server has answered CopyBothResponse; when `timeline` is
    /// one the server has left and `start` is at or past its end, the server streams nothing
    /// and names the next timeline instead, returned as [`StreamEvent::TimelineEnded`].
    pub async fn start_replication(
        &mut self,
        slot: Option<&str>,
        start: Lsn,
        timeline: TimelineId,
    ) -> Result<Option<StreamEvent>, ReplicationError> {
        let doing = format!("starting replication at {start} on timeline {timeline}");
        let slot = match slot {
            Some(s) => {
                check_slot_name(self, s, &doing)?;
                format!("SLOT {s} ")
            }
            None => String::new(),
        };
        let sql = format!(
            "START_REPLICATION {slot}PHYSICAL {start} TIMELINE {}",
            timeline.0
        );
        self.send_query(&sql, &doing).await?;
        self.next_timeline_or_stream(&doing, true).await
    }

    /// The next message of a started stream, waiting at most `limit` for it (a silent server
    /// past `limit` is a timeout error: a dead connection is found by time, not by progress).
    pub async fn recv_stream(&mut self, limit: Duration) -> Result<StreamEvent, ReplicationError> {
        let doing = "receiving WAL";
        match self.recv(limit, doing).await? {
            BackendMessage::CopyData(payload) => match parse_server(payload) {
                Ok(m) => Ok(StreamEvent::Message(m)),
                Err(e) => {
                    self.mark_broken();
                    Err(self.invalid(doing, e.to_string()))
                }
            },
            BackendMessage::CopyDone => self.finish_timeline().await,
            BackendMessage::ErrorResponse(fields) => {
                self.mark_broken();
                Err(self.server_error(doing, &fields))
            }
            other => Err(self.unexpected(doing, message_name(other.tag()), "CopyData")),
        }
    }

    /// Sends a standby status update.
    pub async fn send_status(&mut self, update: &StatusUpdate) -> Result<(), ReplicationError> {
        let mut frame = BytesMut::new();
        copy_data(&update.payload(), &mut frame);
        self.send_raw(&frame, "sending a standby status update")
            .await
    }

    /// After the server's CopyDone: answers CopyDone, then reads the next timeline and its
    /// start, CommandComplete and ReadyForQuery.
    async fn finish_timeline(&mut self) -> Result<StreamEvent, ReplicationError> {
        let doing = "ending the stream at the end of a timeline";
        self.send_raw(&[b'c', 0, 0, 0, 4], doing).await?;
        match self.next_timeline_or_stream(doing, false).await? {
            Some(end) => Ok(end),
            None => Err(self.invalid(doing, "the server started another stream".into())),
        }
    }

    /// Reads the server's answer to START_REPLICATION (`streaming`: CopyBothResponse starts
    /// the stream, `None`) or what follows the end of a stream: the next timeline and its start
    /// as a one-row result, CommandComplete and ReadyForQuery.
    async fn next_timeline_or_stream(
        &mut self,
        doing: &str,
        streaming: bool,
    ) -> Result<Option<StreamEvent>, ReplicationError> {
        let mut next: Option<(TimelineId, Lsn)> = None;
        let mut error = None;
        let mut columns: Vec<String> = Vec::new();
        loop {
            match self.recv(self.read_timeout(), doing).await? {
                BackendMessage::CopyBothResponse(_) if streaming => return Ok(None),
                // Data the server sent before it saw our CopyDone: nothing more is wanted.
                BackendMessage::CopyData(_) | BackendMessage::CopyDone if !streaming => {}
                BackendMessage::RowDescription(fields) => {
                    columns = fields.iter().map(|f| f.name.clone()).collect();
                }
                BackendMessage::DataRow(values) => {
                    let text = |name: &str| -> Option<String> {
                        let i = columns.iter().position(|c| c == name)?;
                        let v = values.get(i)?.as_ref()?;
                        Some(String::from_utf8_lossy(v).into_owned())
                    };
                    let tli = text("next_tli").and_then(|t| t.parse::<u32>().ok());
                    let start = text("next_tli_startpos").and_then(|p| p.parse::<Lsn>().ok());
                    if let (Some(t), Some(s)) = (tli, start) {
                        next = Some((TimelineId(t), s));
                    }
                }
                BackendMessage::CommandComplete(_) => {}
                BackendMessage::ErrorResponse(fields) => {
                    error = Some(self.server_error(doing, &fields));
                }
                BackendMessage::ReadyForQuery(_) => {
                    if let Some(e) = error {
                        return Err(e);
                    }
                    return match next {
                        Some((next_timeline, start)) => Ok(Some(StreamEvent::TimelineEnded {
                            next_timeline,
                            start,
                        })),
                        None => Err(self.invalid(
                            doing,
                            "the server neither streamed nor named the next timeline".into(),
                        )),
                    };
                }
                other => {
                    return Err(self.unexpected(
                        doing,
                        message_name(other.tag()),
                        if streaming {
                            "CopyBothResponse or the next timeline"
                        } else {
                            "the next timeline"
                        },
                    ));
                }
            }
        }
    }
}

/// Slot names: what PostgreSQL accepts (lower-case letters, digits, underscores, at most 63),
/// so that a name never needs quoting in a replication command.
fn check_slot_name(
    conn: &ReplicationConnection,
    name: &str,
    doing: &str,
) -> Result<(), ReplicationError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
    if ok {
        Ok(())
    } else {
        Err(conn.invalid(
            doing,
            format!(
                "replication slot name {name:?} is not valid: use lower-case letters, digits \
                 and underscores, at most 63"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn xlogdata(start: u64, end: u64, at: i64, data: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(start);
        b.put_u64(end);
        b.put_i64(at);
        b.put_slice(data);
        b.freeze()
    }

    #[test]
    fn wal_data_and_keepalives_parse() {
        let m = parse_server(xlogdata(0x1_0000_0000, 0x1_0000_2000, 42, b"abc")).expect("w");
        assert_eq!(
            m,
            ServerMessage::XLogData {
                start: Lsn(0x1_0000_0000),
                wal_end: Lsn(0x1_0000_2000),
                sent_at: 42,
                data: Bytes::from_static(b"abc"),
            }
        );
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(0x3000);
        k.put_i64(-5);
        k.put_u8(1);
        assert_eq!(
            parse_server(k.freeze()).expect("k"),
            ServerMessage::Keepalive {
                wal_end: Lsn(0x3000),
                sent_at: -5,
                reply_requested: true,
            }
        );
    }

    #[test]
    fn short_empty_and_unknown_messages_are_named() {
        assert_eq!(parse_server(Bytes::new()), Err(StreamProblem::Empty));
        assert_eq!(
            parse_server(Bytes::from_static(b"w\0\0")),
            Err(StreamProblem::Short {
                kind: 'w',
                len: 3,
                need: 25
            })
        );
        assert_eq!(
            parse_server(Bytes::from_static(b"k")),
            Err(StreamProblem::Short {
                kind: 'k',
                len: 1,
                need: 18
            })
        );
        let e = parse_server(Bytes::from_static(b"x123")).expect_err("unknown");
        assert_eq!(e, StreamProblem::UnknownKind(b'x'));
        assert!(e.to_string().contains("0x78"), "{e}");
    }

    #[test]
    fn a_status_update_is_34_bytes_in_network_order() {
        let u = StatusUpdate {
            write: Lsn(0x0102_0304_0506_0708),
            flush: Lsn(2),
            apply: Lsn(3),
            sent_at: 4,
            reply_requested: true,
        };
        let p = u.payload();
        assert_eq!(p.len(), 34);
        assert_eq!(p[0], b'r');
        assert_eq!(&p[1..9], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(p[33], 1);
        let mut frame = BytesMut::new();
        copy_data(&p, &mut frame);
        assert_eq!(&frame[..5], &[b'd', 0, 0, 0, 38]);
    }

    #[test]
    fn postgres_time_counts_from_2000() {
        let y2k = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
        assert_eq!(pg_time(y2k), 0);
        assert_eq!(pg_time(y2k + Duration::from_micros(1_500_000)), 1_500_000);
    }

    proptest! {
        /// Whatever the server sends inside CopyData, parsing answers or names the problem,
        /// and WAL data comes back whole.
        #[test]
        fn any_payload_parses_or_is_refused(payload in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_server(Bytes::from(payload));
        }

        #[test]
        fn wal_data_round_trips(start in any::<u64>(), end in any::<u64>(), at in any::<i64>(),
                                data in prop::collection::vec(any::<u8>(), 0..256)) {
            let m = parse_server(xlogdata(start, end, at, &data)).expect("parses");
            prop_assert_eq!(m, ServerMessage::XLogData {
                start: Lsn(start), wal_end: Lsn(end), sent_at: at, data: Bytes::from(data),
            });
        }
    }
}
