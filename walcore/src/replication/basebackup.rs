//! `BASE_BACKUP` on PostgreSQL 13 and later, as a stream of [`BackupEvent`]s.
//!
//! What a PostgreSQL 15+ server sends (`src/backend/backup/basebackup_copy.c`):
//!
//! ```text
//! RowDescription(recptr, tli)  DataRow(start LSN, timeline)  CommandComplete
//! RowDescription(spcoid, spclocation, size)  DataRow per tablespace (main last)  CommandComplete
//! CopyOutResponse
//!   CopyData 'n' archive name \0 tablespace location \0     a new archive (base.tar, <oid>.tar)
//!   CopyData 'd' bytes                                      archive (or manifest) data
//!   CopyData 'p' int64                                      bytes sent so far
//!   CopyData 'm'                                            the manifest follows (last)
//! CopyDone
//! RowDescription(recptr, tli)  DataRow(end LSN, timeline)  CommandComplete
//! CommandComplete("BASE_BACKUP")  ReadyForQuery
//! ```
//!
//! PostgreSQL 13 and 14 (`src/backend/replication/basebackup.c`) take the older option syntax
//! (bare keywords: `BASE_BACKUP LABEL '…' FAST NOWAIT …`) and answer with one COPY stream per
//! tablespace, in the order of the tablespace list (so the main directory last), each a bare
//! tar stream whose archive name is implied (`<oid>.tar`, `base.tar`), without the two zero
//! blocks that end a tar archive, and with no progress messages; the manifest, when asked for,
//! is one more COPY stream:
//!
//! ```text
//! RowDescription(recptr, tli)  DataRow(start LSN, timeline)  CommandComplete
//! RowDescription(spcoid, spclocation, size)  DataRow per tablespace (main last)  CommandComplete
//! per tablespace:  CopyOutResponse  CopyData (tar bytes)…  CopyDone
//! with MANIFEST:   CopyOutResponse  CopyData (JSON)…       CopyDone
//! RowDescription(recptr, tli)  DataRow(end LSN, timeline)  CommandComplete
//! CommandComplete  ReadyForQuery
//! ```
//!
//! Both come out as the same events: for 13/14 the decoder names each archive itself and ends
//! each tar stream with the two zero blocks the 15+ server sends (so every archive is a
//! complete tar file whichever the server); only `Progress` is absent there.
//!
//! Note that the data comes in **CopyOut** mode, not CopyBoth; NoticeResponses may appear
//! anywhere (when the server waits for WAL archiving, "all required WAL segments have been
//! archived" arrives between the last archive and the manifest).
//!
//! [`BaseBackupDecoder`] is the sans-IO state machine: backend messages in, events out, an error
//! naming what was expected otherwise; [`ReplyFormat`] says which of the two replies it reads.
//! [`BaseBackupStream`] drives it over a connection with time limits, choosing the syntax and
//! the format by the server's version.

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::pg::{Lsn, TimelineId};

use super::conn::ReplicationConnection;
use super::error::{ReplicationError, ServerError};
use super::message::{BackendMessage, message_name};

/// Events buffered between [`BaseBackupStream::spawn`]'s network task and its consumer. The
/// server sends archive data in CopyData messages of at most 32 KiB, so 32 events hold about
/// 1 MiB: enough to ride out a consumer's short stalls (a part upload finishing) without
/// holding a meaningful share of a backup in memory. When the queue is full the network task
/// stops reading, and TCP flow control slows the server down.
pub const EVENT_QUEUE: usize = 32;

/// How long to wait for the backup to start by default: the server first runs a checkpoint,
/// which with `CHECKPOINT 'spread'` is paced over `checkpoint_completion_target` of
/// `checkpoint_timeout` (minutes), and may even with `'fast'` take minutes on a busy server.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(3600);

/// `CHECKPOINT` option of BASE_BACKUP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// Checkpoint at full speed: the backup starts sooner, at the cost of an I/O burst.
    Fast,
    /// Paced like a regular checkpoint (PostgreSQL's default).
    Spread,
}

/// `MANIFEST_CHECKSUMS` option: the checksum of each file in the backup manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestChecksums {
    /// No file checksums.
    None,
    /// CRC-32C (PostgreSQL's default; cheap).
    Crc32c,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl ManifestChecksums {
    fn keyword(self) -> &'static str {
        match self {
            ManifestChecksums::None => "NONE",
            ManifestChecksums::Crc32c => "CRC32C",
            ManifestChecksums::Sha224 => "SHA224",
            ManifestChecksums::Sha256 => "SHA256",
            ManifestChecksums::Sha384 => "SHA384",
            ManifestChecksums::Sha512 => "SHA512",
        }
    }
}

/// The options of a base backup. By default the backup holds no WAL (walcore archives WAL
/// itself); [`BaseBackupOptions::include_wal`] asks for a self-contained one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseBackupOptions {
    /// `LABEL`: shown in `backup_label` and `pg_stat_progress_basebackup`.
    pub label: String,
    /// `CHECKPOINT`.
    pub checkpoint: Checkpoint,
    /// `MANIFEST 'yes'`: send a backup manifest after the archives.
    pub manifest: bool,
    /// `MANIFEST_CHECKSUMS` (ignored without a manifest).
    pub manifest_checksums: ManifestChecksums,
    /// `WAIT`: whether the server waits, at the end, until the WAL the backup needs has been
    /// archived. Off by default: the caller checks the archive itself (it knows the end LSN).
    pub wait_for_wal_archive: bool,
    /// `TABLESPACE_MAP`: put a `tablespace_map` file in the main archive instead of symbolic
    /// links under `pg_tblspc`.
    pub tablespace_map: bool,
    /// `PROGRESS`: compute each tablespace's size first (an extra pass over the files), for
    /// [`TablespaceInfo::size_kib`].
    pub progress: bool,
    /// `VERIFY_CHECKSUMS`: verify data page checksums while reading (when the cluster has them).
    pub verify_checksums: bool,
    /// `MAX_RATE` in kB/s (32 to 1048576), to limit the load on the server.
    pub max_rate_kb: Option<u32>,
    /// `WAL`: the server appends the WAL segments from the backup's start to its end to the
    /// main archive (under `pg_wal/`), so that the backup is consistent on its own, without a
    /// WAL archive. Off by default. Those segments must still be in the server's `pg_wal` when
    /// the backup ends, or the backup fails.
    pub include_wal: bool,
    /// How long the server may take to start the backup (its checkpoint); see
    /// [`DEFAULT_START_TIMEOUT`]. Once data flows, the connection's read timeout applies.
    pub start_timeout: Duration,
}

impl Default for BaseBackupOptions {
    fn default() -> BaseBackupOptions {
        BaseBackupOptions {
            label: "walcore base backup".to_owned(),
            checkpoint: Checkpoint::Spread,
            manifest: true,
            manifest_checksums: ManifestChecksums::Crc32c,
            wait_for_wal_archive: false,
            tablespace_map: true,
            progress: false,
            verify_checksums: true,
            max_rate_kb: None,
            include_wal: false,
            start_timeout: DEFAULT_START_TIMEOUT,
        }
    }
}

/// `MAX_RATE` bounds in kB/s (`MAX_RATE_LOWER`, `MAX_RATE_UPPER` in `basebackup.h`).
const MAX_RATE_RANGE: std::ops::RangeInclusive<u32> = 32..=1_048_576;

/// Which BASE_BACKUP syntax a server takes and which reply it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyFormat {
    /// PostgreSQL 13 and 14: bare option keywords; one COPY stream per tablespace, then one for
    /// the manifest.
    Pg13,
    /// PostgreSQL 15 and later: a parenthesised option list; one COPY stream of typed messages.
    Pg15,
}

impl ReplyFormat {
    /// The format of a server with this `server_version_num`; `None` before 13 (no backup
    /// manifests, a different reply).
    pub fn for_server(server_version_num: u32) -> Option<ReplyFormat> {
        match server_version_num {
            0..130_000 => None,
            130_000..150_000 => Some(ReplyFormat::Pg13),
            _ => Some(ReplyFormat::Pg15),
        }
    }
}

impl BaseBackupOptions {
    /// The BASE_BACKUP command in PostgreSQL 15's option syntax (see
    /// [`BaseBackupOptions::command_for`]).
    pub fn command(&self) -> Result<String, String> {
        self.command_for(ReplyFormat::Pg15)
    }

    /// The BASE_BACKUP command for a server of `format`. Quoted values are the replication
    /// grammar's `SCONST` (`''` for a quote, backslashes literal) in both syntaxes.
    ///
    /// PostgreSQL 15's syntax states every option. PostgreSQL 13/14's grammar (`repl_gram.y`)
    /// has only keywords that turn something on, so an option at its default there is left
    /// out: `FAST` for a fast checkpoint, `NOWAIT` for not waiting for WAL archiving,
    /// `NOVERIFY_CHECKSUMS` for not verifying, no `MANIFEST` for no manifest (and then no
    /// `MANIFEST_CHECKSUMS`, which 13/14 refuse without a manifest).
    pub fn command_for(&self, format: ReplyFormat) -> Result<String, String> {
        if self.label.contains('\0') {
            return Err("the backup label contains a NUL character".to_owned());
        }
        if let Some(rate) = self.max_rate_kb
            && !MAX_RATE_RANGE.contains(&rate)
        {
            return Err(format!(
                "MAX_RATE {rate} kB/s is outside PostgreSQL's range {}..={} kB/s",
                MAX_RATE_RANGE.start(),
                MAX_RATE_RANGE.end()
            ));
        }
        Ok(match format {
            ReplyFormat::Pg15 => self.command_pg15(),
            ReplyFormat::Pg13 => self.command_pg13(),
        })
    }

    fn command_pg15(&self) -> String {
        let bool_word = |b: bool| if b { "'true'" } else { "'false'" };
        let mut options = vec![
            format!("LABEL {}", sql_quote(&self.label)),
            format!(
                "CHECKPOINT {}",
                match self.checkpoint {
                    Checkpoint::Fast => "'fast'",
                    Checkpoint::Spread => "'spread'",
                }
            ),
            format!("WAIT {}", bool_word(self.wait_for_wal_archive)),
            format!("WAL {}", bool_word(self.include_wal)),
            format!("TABLESPACE_MAP {}", bool_word(self.tablespace_map)),
            format!("PROGRESS {}", bool_word(self.progress)),
            format!("VERIFY_CHECKSUMS {}", bool_word(self.verify_checksums)),
        ];
        if self.manifest {
            options.push("MANIFEST 'yes'".to_owned());
            options.push(format!(
                "MANIFEST_CHECKSUMS '{}'",
                self.manifest_checksums.keyword()
            ));
        } else {
            options.push("MANIFEST 'no'".to_owned());
        }
        if let Some(rate) = self.max_rate_kb {
            options.push(format!("MAX_RATE {rate}"));
        }
        format!("BASE_BACKUP ( {} )", options.join(", "))
    }

    fn command_pg13(&self) -> String {
        let mut command = format!("BASE_BACKUP LABEL {}", sql_quote(&self.label));
        let mut keyword = |on: bool, word: &str| {
            if on {
                command.push(' ');
                command.push_str(word);
            }
        };
        keyword(self.progress, "PROGRESS");
        keyword(self.checkpoint == Checkpoint::Fast, "FAST");
        keyword(self.include_wal, "WAL");
        keyword(!self.wait_for_wal_archive, "NOWAIT");
        keyword(self.tablespace_map, "TABLESPACE_MAP");
        keyword(!self.verify_checksums, "NOVERIFY_CHECKSUMS");
        if let Some(rate) = self.max_rate_kb {
            command.push_str(&format!(" MAX_RATE {rate}"));
        }
        if self.manifest {
            command.push_str(&format!(
                " MANIFEST 'yes' MANIFEST_CHECKSUMS '{}'",
                self.manifest_checksums.keyword()
            ));
        }
        command
    }
}

/// A string as the replication grammar's `SCONST`.
fn sql_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A tablespace of the backup, from the list the server sends first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablespaceInfo {
    /// The tablespace's OID; `None` for the main data directory (always listed last).
    pub oid: Option<u32>,
    /// Its directory on the server; `None` for the main data directory.
    pub location: Option<PathBuf>,
    /// Its approximate size in KiB, when the backup was asked for `PROGRESS`.
    pub size_kib: Option<u64>,
}

/// What a base backup delivers, in order: `Started`, then for each tablespace an `Archive`
/// followed by its `Data` (a tar stream) with `Progress` now and then, then (if asked for)
/// `Manifest` followed by the manifest's `Data`, then `Finished`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEvent {
    /// The server has checkpointed and started the backup.
    Started {
        /// Where WAL replay must start (the backup's `START WAL LOCATION`).
        start_lsn: Lsn,
        /// The timeline at the start.
        timeline: TimelineId,
        /// Every tablespace, the main data directory last.
        tablespaces: Vec<TablespaceInfo>,
    },
    /// A new archive begins; the `Data` that follows is its content.
    Archive {
        /// The archive's name: `base.tar` for the main data directory, `<oid>.tar` for a
        /// tablespace.
        name: String,
        /// The tablespace's directory on the server; `None` for the main data directory.
        location: Option<PathBuf>,
    },
    /// A piece of the current archive or of the manifest.
    Data(Bytes),
    /// The backup manifest begins; the `Data` that follows is its JSON.
    Manifest,
    /// Bytes of archive data the server has sent so far.
    Progress(u64),
    /// The backup is complete and the server has left backup mode.
    Finished {
        /// Where WAL replay must at least reach for the backup to be consistent.
        end_lsn: Lsn,
        /// The timeline at the end.
        timeline: TimelineId,
    },
}

/// A CopyData message of the base backup stream, by its first byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyMessage {
    /// `'n'`: a new archive, with the tablespace's location (empty for the main directory).
    NewArchive {
        /// The archive's name.
        name: String,
        /// The location; `None` when empty.
        location: Option<PathBuf>,
    },
    /// `'m'`: the manifest begins.
    Manifest,
    /// `'d'`: data.
    Data(Bytes),
    /// `'p'`: progress, bytes done.
    Progress(u64),
}

impl CopyMessage {
    /// The message as the server sends it (inside a CopyData).
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        match self {
            CopyMessage::NewArchive { name, location } => {
                out.put_u8(b'n');
                out.put_slice(name.as_bytes());
                out.put_u8(0);
                if let Some(location) = location {
                    out.put_slice(location.as_os_str().as_bytes());
                }
                out.put_u8(0);
            }
            CopyMessage::Manifest => out.put_u8(b'm'),
            CopyMessage::Data(data) => {
                out.put_u8(b'd');
                out.put_slice(data);
            }
            CopyMessage::Progress(done) => {
                out.put_u8(b'p');
                out.put_u64(*done);
            }
        }
        out.freeze()
    }
}

/// Why a CopyData message of the base backup stream is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CopyMessageError {
    /// A CopyData without even a type byte.
    #[error("empty CopyData message")]
    Empty,
    /// An unknown type byte.
    #[error(
        "unknown CopyData message type 0x{0:02X} (a newer server, or not a PostgreSQL 15+ \
         BASE_BACKUP stream?)"
    )]
    UnknownType(u8),
    /// A string without its NUL.
    #[error("the {0} of a new-archive message is not NUL-terminated")]
    Unterminated(&'static str),
    /// An archive name that is not UTF-8.
    #[error("the archive name is not valid UTF-8")]
    NameNotUtf8,
    /// Bytes after the last field.
    #[error("{count} unexpected bytes at the end of a '{kind}' message")]
    Trailing {
        /// The message type.
        kind: char,
        /// How many.
        count: usize,
    },
    /// A progress message whose body is not 8 bytes.
    #[error("a progress message has {0} bytes instead of 8")]
    ProgressLength(usize),
}

/// Decodes one CopyData payload of the base backup stream.
pub fn parse_copy_message(data: Bytes) -> Result<CopyMessage, CopyMessageError> {
    let Some(&kind) = data.first() else {
        return Err(CopyMessageError::Empty);
    };
    let body = data.slice(1..);
    match kind {
        b'n' => {
            let name_end = body
                .iter()
                .position(|&b| b == 0)
                .ok_or(CopyMessageError::Unterminated("archive name"))?;
            let name = std::str::from_utf8(&body[..name_end])
                .map_err(|_| CopyMessageError::NameNotUtf8)?
                .to_owned();
            let rest = &body[name_end + 1..];
            let loc_end = rest
                .iter()
                .position(|&b| b == 0)
                .ok_or(CopyMessageError::Unterminated("tablespace location"))?;
            if loc_end + 1 != rest.len() {
                return Err(CopyMessageError::Trailing {
                    kind: 'n',
                    count: rest.len() - loc_end - 1,
                });
            }
            let location = (loc_end > 0)
                .then(|| PathBuf::from(std::ffi::OsString::from_vec(rest[..loc_end].to_vec())));
            Ok(CopyMessage::NewArchive { name, location })
        }
        b'm' => {
            if body.is_empty() {
                Ok(CopyMessage::Manifest)
            } else {
                Err(CopyMessageError::Trailing {
                    kind: 'm',
                    count: body.len(),
                })
            }
        }
        b'd' => Ok(CopyMessage::Data(body)),
        b'p' => {
            let bytes: [u8; 8] = body[..]
                .try_into()
                .map_err(|_| CopyMessageError::ProgressLength(body.len()))?;
            Ok(CopyMessage::Progress(u64::from_be_bytes(bytes)))
        }
        other => Err(CopyMessageError::UnknownType(other)),
    }
}

/// The BASE_BACKUP reply does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackupProtocolError {
    /// The server reported an error (the backup failed on its side).
    #[error("{0}")]
    Server(Box<ServerError>),
    /// A message that does not belong at this point.
    #[error("unexpected {got} from the server while {state} (expected {expected})")]
    Unexpected {
        /// The message received.
        got: &'static str,
        /// What the decoder was doing.
        state: &'static str,
        /// What was expected.
        expected: &'static str,
    },
    /// A result row that cannot be used.
    #[error("invalid {what}: {detail}")]
    BadRow {
        /// Which row.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// An invalid CopyData message (at the given message number of the COPY stream).
    #[error("CopyData message {index} of the backup stream: {source}")]
    CopyMessage {
        /// 0-based index of the CopyData message.
        index: u64,
        /// What is wrong.
        source: CopyMessageError,
    },
    /// Archive data before any archive or manifest began.
    #[error("archive data arrived before any archive began")]
    DataOutsideArchive,
    /// An archive after the manifest, or a second manifest.
    #[error("{0} after the backup manifest, which must come last")]
    AfterManifest(&'static str),
    /// More archives than tablespaces listed.
    #[error("the server sent more archives than the {0} tablespaces it listed")]
    TooManyArchives(usize),
    /// A message after ReadyForQuery ended the backup.
    #[error("a message arrived after the backup had finished")]
    AfterEnd,
}

/// Where a base backup is, for time limits and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the server's checkpoint and the start position.
    Starting,
    /// Receiving archives and the manifest.
    Streaming,
    /// Waiting for the end position and the command's completion.
    Finishing,
    /// Finished (or failed).
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    StartColumns,
    StartRow,
    StartComplete,
    TablespaceColumns,
    TablespaceRows,
    // PostgreSQL 15+: the one COPY stream.
    CopyStart,
    Copy,
    // PostgreSQL 13/14: a COPY stream per archive, then perhaps one for the manifest.
    ArchiveStart,
    ArchiveCopy,
    AfterArchives,
    ManifestCopy,
    EndColumns,
    EndRow,
    EndComplete,
    CommandComplete,
    Ready,
    Done,
}

impl State {
    /// What the decoder is doing, for messages.
    fn doing(self) -> &'static str {
        match self {
            State::StartColumns | State::StartRow | State::StartComplete => {
                "waiting for the backup to start"
            }
            State::TablespaceColumns | State::TablespaceRows => "reading the tablespace list",
            State::CopyStart
            | State::Copy
            | State::ArchiveStart
            | State::ArchiveCopy
            | State::AfterArchives
            | State::ManifestCopy => "receiving the backup data",
            State::EndColumns | State::EndRow | State::EndComplete => {
                "reading the backup's end position"
            }
            State::CommandComplete | State::Ready => "waiting for BASE_BACKUP to complete",
            State::Done => "the backup had finished",
        }
    }

    fn expected(self) -> &'static str {
        match self {
            State::StartColumns | State::TablespaceColumns | State::EndColumns => "RowDescription",
            State::StartRow | State::EndRow => "DataRow",
            State::TablespaceRows => "DataRow or CommandComplete",
            State::StartComplete | State::EndComplete => "CommandComplete",
            State::CopyStart | State::ArchiveStart => "CopyOutResponse",
            State::Copy | State::ArchiveCopy | State::ManifestCopy => "CopyData or CopyDone",
            State::AfterArchives => "CopyOutResponse or RowDescription",
            State::CommandComplete => "CommandComplete or ReadyForQuery",
            State::Ready => "ReadyForQuery",
            State::Done => "nothing",
        }
    }
}

/// Which part of the COPY stream the data belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    Archive,
    Manifest,
}

/// The two zero blocks that end a tar archive, which PostgreSQL 13/14 leave to the client.
static TAR_END: [u8; 1024] = [0; 1024];

/// The sans-IO state machine of a BASE_BACKUP reply: feed it every backend message after the
/// command was sent; it returns the events, the same for either [`ReplyFormat`].
#[derive(Debug)]
pub struct BaseBackupDecoder {
    format: ReplyFormat,
    state: State,
    start: Option<(Lsn, TimelineId)>,
    tablespaces: Vec<TablespaceInfo>,
    end: Option<(Lsn, TimelineId)>,
    archives: usize,
    section: Section,
    copy_messages: u64,
}

impl Default for BaseBackupDecoder {
    fn default() -> Self {
        BaseBackupDecoder::new()
    }
}

impl BaseBackupDecoder {
    /// A decoder of a PostgreSQL 15+ reply, waiting for its first message.
    pub fn new() -> BaseBackupDecoder {
        BaseBackupDecoder::with_format(ReplyFormat::Pg15)
    }

    /// A decoder of the reply of a server with this `server_version_num`: PostgreSQL 13/14's
    /// below 150000, else 15's. (Servers before 13 have no BASE_BACKUP walcore can use; refuse
    /// them before sending the command, see [`ReplyFormat::for_server`].)
    pub fn new_for(server_version_num: u32) -> BaseBackupDecoder {
        BaseBackupDecoder::with_format(
            ReplyFormat::for_server(server_version_num).unwrap_or(ReplyFormat::Pg13),
        )
    }

    /// A decoder of a reply in `format`.
    pub fn with_format(format: ReplyFormat) -> BaseBackupDecoder {
        BaseBackupDecoder {
            format,
            state: State::StartColumns,
            start: None,
            tablespaces: Vec::new(),
            end: None,
            archives: 0,
            section: Section::None,
            copy_messages: 0,
        }
    }

    /// The reply format this decoder reads.
    pub fn format(&self) -> ReplyFormat {
        self.format
    }

    /// Where the backup is.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::StartColumns
            | State::StartRow
            | State::StartComplete
            | State::TablespaceColumns
            | State::TablespaceRows => Phase::Starting,
            State::CopyStart
            | State::Copy
            | State::ArchiveStart
            | State::ArchiveCopy
            | State::AfterArchives
            | State::ManifestCopy => Phase::Streaming,
            State::EndColumns
            | State::EndRow
            | State::EndComplete
            | State::CommandComplete
            | State::Ready => Phase::Finishing,
            State::Done => Phase::Done,
        }
    }

    /// What the decoder waits for, for messages ("receiving the backup data").
    pub fn doing(&self) -> &'static str {
        self.state.doing()
    }

    /// Feeds the next backend message; returns the event it completes, if any. An
    /// ErrorResponse becomes [`BackupProtocolError::Server`]; after any error the decoder is
    /// done.
    pub fn feed(
        &mut self,
        message: BackendMessage,
    ) -> Result<Option<BackupEvent>, BackupProtocolError> {
        let result = self.step(message);
        if result.is_err() {
            self.state = State::Done;
        }
        result
    }

    fn step(
        &mut self,
        message: BackendMessage,
    ) -> Result<Option<BackupEvent>, BackupProtocolError> {
        use BackendMessage as M;
        let unexpected = |state: State, message: &BackendMessage| BackupProtocolError::Unexpected {
            got: message_name(message.tag()),
            state: state.doing(),
            expected: state.expected(),
        };
        match (&self.state, message) {
            (State::Done, _) => Err(BackupProtocolError::AfterEnd),
            (_, M::ErrorResponse(fields)) => Err(BackupProtocolError::Server(Box::new(
                ServerError::from_fields(&fields),
            ))),
            // Notices are logged by the connection; parameters are recorded there.
            (_, M::NoticeResponse(_) | M::ParameterStatus { .. }) => Ok(None),

            (State::StartColumns, M::RowDescription(fields)) => {
                expect_columns(&fields, 2, "start position")?;
                self.state = State::StartRow;
                Ok(None)
            }
            (State::StartRow, M::DataRow(values)) => {
                self.start = Some(position_row(&values, "start position")?);
                self.state = State::StartComplete;
                Ok(None)
            }
            (State::StartComplete, M::CommandComplete(_)) => {
                self.state = State::TablespaceColumns;
                Ok(None)
            }
            (State::TablespaceColumns, M::RowDescription(fields)) => {
                expect_columns(&fields, 3, "tablespace list")?;
                self.state = State::TablespaceRows;
                Ok(None)
            }
            (State::TablespaceRows, M::DataRow(values)) => {
                self.tablespaces.push(tablespace_row(&values)?);
                Ok(None)
            }
            (State::TablespaceRows, M::CommandComplete(_)) => {
                self.state = match self.format {
                    ReplyFormat::Pg15 => State::CopyStart,
                    ReplyFormat::Pg13 if self.tablespaces.is_empty() => State::AfterArchives,
                    ReplyFormat::Pg13 => State::ArchiveStart,
                };
                let (start_lsn, timeline) = self.start.ok_or(BackupProtocolError::BadRow {
                    what: "start position",
                    detail: "missing".to_owned(),
                })?;
                Ok(Some(BackupEvent::Started {
                    start_lsn,
                    timeline,
                    tablespaces: self.tablespaces.clone(),
                }))
            }
            (State::CopyStart, M::CopyOutResponse(_)) => {
                self.state = State::Copy;
                Ok(None)
            }
            (State::Copy, M::CopyData(data)) => {
                let index = self.copy_messages;
                self.copy_messages += 1;
                let message = parse_copy_message(data)
                    .map_err(|source| BackupProtocolError::CopyMessage { index, source })?;
                self.copy_event(message).map(Some)
            }
            (State::Copy, M::CopyDone) => {
                self.state = State::EndColumns;
                Ok(None)
            }

            // PostgreSQL 13/14: the archives in the order of the tablespace list.
            (State::ArchiveStart, M::CopyOutResponse(_)) => {
                let Some(tablespace) = self.tablespaces.get(self.archives) else {
                    return Err(BackupProtocolError::TooManyArchives(self.tablespaces.len()));
                };
                self.archives += 1;
                self.state = State::ArchiveCopy;
                Ok(Some(BackupEvent::Archive {
                    name: match tablespace.oid {
                        Some(oid) => format!("{oid}.tar"),
                        None => "base.tar".to_owned(),
                    },
                    location: tablespace.location.clone(),
                }))
            }
            (State::ArchiveCopy | State::ManifestCopy, M::CopyData(data)) => {
                self.copy_messages += 1;
                Ok(Some(BackupEvent::Data(data)))
            }
            (State::ArchiveCopy, M::CopyDone) => {
                self.state = if self.archives < self.tablespaces.len() {
                    State::ArchiveStart
                } else {
                    State::AfterArchives
                };
                Ok(Some(BackupEvent::Data(Bytes::from_static(&TAR_END))))
            }
            (State::AfterArchives, M::CopyOutResponse(_)) => {
                self.state = State::ManifestCopy;
                Ok(Some(BackupEvent::Manifest))
            }
            (State::AfterArchives, M::RowDescription(fields)) => {
                expect_columns(&fields, 2, "end position")?;
                self.state = State::EndRow;
                Ok(None)
            }
            (State::ManifestCopy, M::CopyDone) => {
                self.state = State::EndColumns;
                Ok(None)
            }

            (State::EndColumns, M::RowDescription(fields)) => {
                expect_columns(&fields, 2, "end position")?;
                self.state = State::EndRow;
                Ok(None)
            }
            (State::EndRow, M::DataRow(values)) => {
                self.end = Some(position_row(&values, "end position")?);
                self.state = State::EndComplete;
                Ok(None)
            }
            (State::EndComplete, M::CommandComplete(_)) => {
                self.state = State::CommandComplete;
                Ok(None)
            }
            // The command's own CommandComplete ("BASE_BACKUP"); some versions send none.
            (State::CommandComplete, M::CommandComplete(_)) => {
                self.state = State::Ready;
                Ok(None)
            }
            (State::CommandComplete | State::Ready, M::ReadyForQuery(_)) => {
                self.state = State::Done;
                let (end_lsn, timeline) = self.end.ok_or(BackupProtocolError::BadRow {
                    what: "end position",
                    detail: "missing".to_owned(),
                })?;
                Ok(Some(BackupEvent::Finished { end_lsn, timeline }))
            }
            (state, message) => Err(unexpected(*state, &message)),
        }
    }

    fn copy_event(&mut self, message: CopyMessage) -> Result<BackupEvent, BackupProtocolError> {
        Ok(match message {
            CopyMessage::NewArchive { name, location } => {
                if self.section == Section::Manifest {
                    return Err(BackupProtocolError::AfterManifest("an archive"));
                }
                if self.archives == self.tablespaces.len() {
                    return Err(BackupProtocolError::TooManyArchives(self.tablespaces.len()));
                }
                self.archives += 1;
                self.section = Section::Archive;
                BackupEvent::Archive { name, location }
            }
            CopyMessage::Manifest => {
                if self.section == Section::Manifest {
                    return Err(BackupProtocolError::AfterManifest("a second manifest"));
                }
                self.section = Section::Manifest;
                BackupEvent::Manifest
            }
            CopyMessage::Data(data) => {
                if self.section == Section::None {
                    return Err(BackupProtocolError::DataOutsideArchive);
                }
                BackupEvent::Data(data)
            }
            CopyMessage::Progress(done) => BackupEvent::Progress(done),
        })
    }
}

fn expect_columns(
    fields: &[super::message::FieldDescription],
    at_least: usize,
    what: &'static str,
) -> Result<(), BackupProtocolError> {
    if fields.len() < at_least {
        return Err(BackupProtocolError::BadRow {
            what,
            detail: format!("{} columns instead of {at_least}", fields.len()),
        });
    }
    Ok(())
}

fn text<'a>(
    values: &'a [Option<Bytes>],
    index: usize,
    what: &'static str,
) -> Result<Option<&'a str>, BackupProtocolError> {
    match values.get(index) {
        None => Err(BackupProtocolError::BadRow {
            what,
            detail: format!("{} values, column {} missing", values.len(), index + 1),
        }),
        Some(None) => Ok(None),
        Some(Some(bytes)) => {
            std::str::from_utf8(bytes)
                .map(Some)
                .map_err(|_| BackupProtocolError::BadRow {
                    what,
                    detail: format!("column {} is not valid UTF-8", index + 1),
                })
        }
    }
}

/// A row of (recptr text, tli int8).
fn position_row(
    values: &[Option<Bytes>],
    what: &'static str,
) -> Result<(Lsn, TimelineId), BackupProtocolError> {
    let bad = |detail: String| BackupProtocolError::BadRow { what, detail };
    let lsn = text(values, 0, what)?.ok_or_else(|| bad("the LSN is NULL".to_owned()))?;
    let lsn = lsn.parse::<Lsn>().map_err(|e| bad(e.to_string()))?;
    let tli = text(values, 1, what)?.ok_or_else(|| bad("the timeline is NULL".to_owned()))?;
    let tli = tli
        .parse::<u32>()
        .ok()
        .filter(|&t| t > 0)
        .ok_or_else(|| bad(format!("timeline {tli:?} is not valid")))?;
    Ok((lsn, TimelineId(tli)))
}

/// A row of (spcoid oid, spclocation text, size int8 in KiB), NULLs for the main directory.
fn tablespace_row(values: &[Option<Bytes>]) -> Result<TablespaceInfo, BackupProtocolError> {
    let what = "tablespace list";
    let bad = |detail: String| BackupProtocolError::BadRow { what, detail };
    let oid = match text(values, 0, what)? {
        None => None,
        Some(oid) => Some(
            oid.parse::<u32>()
                .map_err(|_| bad(format!("tablespace OID {oid:?} is not a number")))?,
        ),
    };
    // A location is a path: keep its bytes exactly, whatever the encoding.
    let location = match values.get(1) {
        None => return Err(bad(format!("{} values instead of 3", values.len()))),
        Some(None) => None,
        Some(Some(bytes)) => Some(PathBuf::from(std::ffi::OsString::from_vec(bytes.to_vec()))),
    };
    let size_kib = match text(values, 2, what)? {
        None => None,
        Some(size) => Some(
            size.parse::<u64>()
                .map_err(|_| bad(format!("size {size:?} is not a number")))?,
        ),
    };
    Ok(TablespaceInfo {
        oid,
        location,
        size_kib,
    })
}

/// A base backup in progress on a connection it owns. Pull events with
/// [`BaseBackupStream::next_event`], or hand the stream to a task with
/// [`BaseBackupStream::spawn`].
///
/// Dropping the stream before `Finished` closes the connection, and the server aborts the
/// backup (`do_pg_abort_backup`): that is how a backup is cancelled.
#[derive(Debug)]
pub struct BaseBackupStream {
    conn: ReplicationConnection,
    decoder: BaseBackupDecoder,
    start_timeout: Duration,
    /// The limit while data flows: the connection's read timeout, or the start timeout when the
    /// server is asked to wait for WAL archiving (it then goes silent before the manifest).
    copy_timeout: Duration,
    finished: bool,
    failed: bool,
}

impl ReplicationConnection {
    /// Starts `BASE_BACKUP` with `options` (PostgreSQL 13 or later, in the syntax of the
    /// server's version) and returns the stream of its events, the same whatever the version.
    /// The connection belongs to the stream until the backup finishes
    /// ([`BaseBackupStream::into_connection`]); if starting fails (an older server, say), it is
    /// closed.
    pub async fn base_backup(
        mut self,
        options: &BaseBackupOptions,
    ) -> Result<BaseBackupStream, ReplicationError> {
        self.check_usable()?;
        let version = self.server_version().unwrap_or("unknown").to_owned();
        let Some(num) = self.server_version_num() else {
            return Err(self.invalid(
                "starting BASE_BACKUP",
                format!("the server reports no usable server_version ({version:?})"),
            ));
        };
        let Some(format) = ReplyFormat::for_server(num) else {
            return Err(ReplicationError::Unsupported {
                server: self.server().to_owned(),
                what: format!(
                    "PostgreSQL {version} is too old for walcore base backups (13 or later is \
                     needed)"
                ),
            });
        };
        let command = options
            .command_for(format)
            .map_err(|detail| self.invalid("preparing BASE_BACKUP", detail))?;
        self.send_query(&command, "starting BASE_BACKUP").await?;
        let copy_timeout = if options.wait_for_wal_archive {
            options.start_timeout.max(self.read_timeout())
        } else {
            self.read_timeout()
        };
        Ok(BaseBackupStream {
            conn: self,
            decoder: BaseBackupDecoder::with_format(format),
            start_timeout: options.start_timeout,
            copy_timeout,
            finished: false,
            failed: false,
        })
    }
}

impl BaseBackupStream {
    /// The next event; `Ok(None)` after `Finished`. After an error the stream is over: a server
    /// error (the backup failed on the server) leaves the connection usable, anything else
    /// does not.
    pub async fn next_event(&mut self) -> Result<Option<BackupEvent>, ReplicationError> {
        if self.finished {
            return Ok(None);
        }
        if self.failed {
            return Err(ReplicationError::Unusable {
                server: self.conn.server().to_owned(),
            });
        }
        loop {
            let limit = match self.decoder.phase() {
                Phase::Starting => self.start_timeout,
                _ => self.copy_timeout,
            };
            let message = match self.conn.recv(limit, self.decoder.doing()).await {
                Ok(message) => message,
                Err(e) => {
                    self.failed = true;
                    return Err(e);
                }
            };
            match self.decoder.feed(message) {
                Ok(None) => continue,
                Ok(Some(event)) => {
                    if matches!(event, BackupEvent::Finished { .. }) {
                        self.finished = true;
                    }
                    return Ok(Some(event));
                }
                Err(BackupProtocolError::Server(error)) => {
                    self.failed = true;
                    let failure = ReplicationError::Server {
                        server: self.conn.server().to_owned(),
                        doing: "taking a base backup".to_owned(),
                        error,
                    };
                    if failure
                        .server_error()
                        .is_some_and(ServerError::ends_session)
                    {
                        self.conn.mark_broken();
                    } else {
                        self.drain_to_ready().await;
                    }
                    return Err(failure);
                }
                Err(source) => {
                    self.failed = true;
                    self.conn.mark_broken();
                    return Err(ReplicationError::BaseBackup {
                        server: self.conn.server().to_owned(),
                        source,
                    });
                }
            }
        }
    }

    /// After a server error the server sends ReadyForQuery; read up to it so the connection
    /// can be used again. If that fails, the connection is unusable (recv marked it).
    async fn drain_to_ready(&mut self) {
        let limit = self.conn.read_timeout();
        loop {
            match self
                .conn
                .recv(limit, "recovering from a failed backup")
                .await
            {
                Ok(BackendMessage::ReadyForQuery(_)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// The connection (for its server name, version, backend pid).
    pub fn connection(&self) -> &ReplicationConnection {
        &self.conn
    }

    /// Where the backup is.
    pub fn phase(&self) -> Phase {
        self.decoder.phase()
    }

    /// Gives the connection back. Usable after `Finished` or a server error; otherwise the
    /// backup was abandoned mid-stream, and the connection is marked unusable (close it).
    pub fn into_connection(mut self) -> ReplicationConnection {
        if !self.finished && self.decoder.phase() != Phase::Done {
            self.conn.mark_broken();
        }
        self.conn
    }

    /// Moves the stream into a task that reads the network and sends each event into a
    /// channel of [`EVENT_QUEUE`] events, so that the network and the consumer's disk or
    /// upload work overlap. The channel ends after `Finished` or after an error (sent as the
    /// last item).
    ///
    /// To cancel: drop the receiver (the task stops at its next event and the backup is
    /// abandoned) or abort the task; either way drop the connection the task returns, and the
    /// server aborts the backup.
    pub fn spawn(
        mut self,
    ) -> (
        mpsc::Receiver<Result<BackupEvent, ReplicationError>>,
        JoinHandle<ReplicationConnection>,
    ) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let task = tokio::spawn(async move {
            loop {
                match self.next_event().await {
                    Ok(Some(event)) => {
                        if tx.send(Ok(event)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                }
            }
            self.into_connection()
        });
        (rx, task)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::replication::message::{
        CopyResponse, ErrorFields, FieldDescription, TransactionStatus,
    };
    use proptest::prelude::*;

    fn column(name: &str) -> FieldDescription {
        FieldDescription {
            name: name.to_owned(),
            table_oid: 0,
            column_id: 0,
            type_oid: 25,
            type_size: -1,
            type_modifier: -1,
            format: 0,
        }
    }

    fn row(values: &[Option<&str>]) -> BackendMessage {
        BackendMessage::DataRow(
            values
                .iter()
                .map(|v| v.map(|s| Bytes::copy_from_slice(s.as_bytes())))
                .collect(),
        )
    }

    fn copy(m: CopyMessage) -> BackendMessage {
        BackendMessage::CopyData(m.encode())
    }

    /// The message sequence of a PostgreSQL 15 base backup of one tablespace plus the main
    /// directory, as `basebackup_copy.c` sends it.
    pub(crate) fn pg15_reply() -> Vec<BackendMessage> {
        use BackendMessage as M;
        let mut reply = start_and_tablespaces();
        reply.extend([
            M::CopyOutResponse(CopyResponse::default()),
            copy(CopyMessage::NewArchive {
                name: "16384.tar".into(),
                location: Some("/srv/ts1".into()),
            }),
            copy(CopyMessage::Data(Bytes::from_static(b"ts data"))),
            copy(CopyMessage::Progress(7)),
            copy(CopyMessage::NewArchive {
                name: "base.tar".into(),
                location: None,
            }),
            copy(CopyMessage::Data(Bytes::from_static(b"base data"))),
            copy(CopyMessage::Progress(16)),
            M::NoticeResponse(ErrorFields(vec![(
                b'M',
                "all required WAL segments".into(),
            )])),
            copy(CopyMessage::Manifest),
            copy(CopyMessage::Data(Bytes::from_static(b"{}"))),
            M::CopyDone,
        ]);
        reply.extend(end_position());
        reply.extend([
            M::CommandComplete("BASE_BACKUP".into()),
            M::ReadyForQuery(TransactionStatus::Idle),
        ]);
        reply
    }

    /// The start position and tablespace list every reply begins with: `/srv/ts1` (OID 16384)
    /// and the main directory.
    fn start_and_tablespaces() -> Vec<BackendMessage> {
        use BackendMessage as M;
        vec![
            M::RowDescription(vec![column("recptr"), column("tli")]),
            row(&[Some("0/2000028"), Some("1")]),
            M::CommandComplete("SELECT".into()),
            M::RowDescription(vec![
                column("spcoid"),
                column("spclocation"),
                column("size"),
            ]),
            row(&[Some("16384"), Some("/srv/ts1"), None]),
            row(&[None, None, None]),
            M::CommandComplete("SELECT".into()),
        ]
    }

    /// The end position result set.
    fn end_position() -> Vec<BackendMessage> {
        use BackendMessage as M;
        vec![
            M::RowDescription(vec![column("recptr"), column("tli")]),
            row(&[Some("0/2000100"), Some("1")]),
            M::CommandComplete("SELECT".into()),
        ]
    }

    #[test]
    fn pg15_sequence_gives_the_events_in_order() {
        let mut d = BaseBackupDecoder::new();
        let mut events = Vec::new();
        assert_eq!(d.phase(), Phase::Starting);
        for m in pg15_reply() {
            if let Some(e) = d.feed(m).unwrap() {
                events.push(e);
            }
        }
        assert_eq!(d.phase(), Phase::Done);
        assert_eq!(
            events,
            vec![
                BackupEvent::Started {
                    start_lsn: Lsn(0x200_0028),
                    timeline: TimelineId(1),
                    tablespaces: vec![
                        TablespaceInfo {
                            oid: Some(16384),
                            location: Some("/srv/ts1".into()),
                            size_kib: None
                        },
                        TablespaceInfo {
                            oid: None,
                            location: None,
                            size_kib: None
                        },
                    ]
                },
                BackupEvent::Archive {
                    name: "16384.tar".into(),
                    location: Some("/srv/ts1".into())
                },
                BackupEvent::Data(Bytes::from_static(b"ts data")),
                BackupEvent::Progress(7),
                BackupEvent::Archive {
                    name: "base.tar".into(),
                    location: None
                },
                BackupEvent::Data(Bytes::from_static(b"base data")),
                BackupEvent::Progress(16),
                BackupEvent::Manifest,
                BackupEvent::Data(Bytes::from_static(b"{}")),
                BackupEvent::Finished {
                    end_lsn: Lsn(0x200_0100),
                    timeline: TimelineId(1)
                },
            ]
        );
        assert_eq!(
            d.feed(BackendMessage::CopyDone),
            Err(BackupProtocolError::AfterEnd)
        );
    }

    #[test]
    fn server_errors_and_disorder_are_reported() {
        let mut d = BaseBackupDecoder::new();
        let err = d
            .feed(BackendMessage::ErrorResponse(ErrorFields(vec![
                (b'V', "ERROR".into()),
                (b'C', "55000".into()),
                (
                    b'M',
                    "a backup is already in progress in this session".into(),
                ),
            ])))
            .unwrap_err();
        assert!(matches!(err, BackupProtocolError::Server(ref e) if e.code == "55000"));
        assert_eq!(d.phase(), Phase::Done);

        // Data before any archive.
        let mut d = BaseBackupDecoder::new();
        let reply = pg15_reply();
        for m in reply[..8].iter().cloned() {
            d.feed(m).unwrap();
        }
        assert_eq!(
            d.feed(copy(CopyMessage::Data(Bytes::new()))),
            Err(BackupProtocolError::DataOutsideArchive)
        );

        // A CopyBothResponse where CopyOutResponse belongs.
        let mut d = BaseBackupDecoder::new();
        for m in reply[..7].iter().cloned() {
            d.feed(m).unwrap();
        }
        let err = d
            .feed(BackendMessage::CopyBothResponse(CopyResponse::default()))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unexpected CopyBothResponse from the server while receiving the backup data \
             (expected CopyOutResponse)"
        );

        // An archive after the manifest; more archives than tablespaces.
        let mut d = BaseBackupDecoder::new();
        for m in reply[..16].iter().cloned() {
            d.feed(m).unwrap();
        }
        assert_eq!(
            d.feed(copy(CopyMessage::NewArchive {
                name: "x.tar".into(),
                location: None
            })),
            Err(BackupProtocolError::AfterManifest("an archive"))
        );
        let mut d = BaseBackupDecoder::new();
        for m in reply[..12].iter().cloned() {
            d.feed(m).unwrap();
        }
        assert_eq!(
            d.feed(copy(CopyMessage::NewArchive {
                name: "x.tar".into(),
                location: None
            })),
            Err(BackupProtocolError::TooManyArchives(2))
        );
    }

    #[test]
    fn bad_rows_are_named() {
        let mut d = BaseBackupDecoder::new();
        d.feed(BackendMessage::RowDescription(vec![
            column("recptr"),
            column("tli"),
        ]))
        .unwrap();
        let err = d.feed(row(&[Some("nope"), Some("1")])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid start position: invalid LSN"),
            "{err}"
        );
        let mut d = BaseBackupDecoder::new();
        d.feed(BackendMessage::RowDescription(vec![
            column("recptr"),
            column("tli"),
        ]))
        .unwrap();
        let err = d.feed(row(&[Some("0/1"), Some("0")])).unwrap_err();
        assert!(err.to_string().contains("timeline \"0\""), "{err}");
    }

    #[test]
    fn copy_messages_parse_exactly() {
        assert_eq!(
            parse_copy_message(Bytes::from_static(b"nbase.tar\0\0")),
            Ok(CopyMessage::NewArchive {
                name: "base.tar".into(),
                location: None
            })
        );
        assert_eq!(
            parse_copy_message(Bytes::from_static(b"p\0\0\0\0\x01\x66\xa6\0")),
            Ok(CopyMessage::Progress(0x0166_a600))
        );
        assert_eq!(
            parse_copy_message(Bytes::new()),
            Err(CopyMessageError::Empty)
        );
        assert_eq!(
            parse_copy_message(Bytes::from_static(b"p\0")),
            Err(CopyMessageError::ProgressLength(1))
        );
        assert_eq!(
            parse_copy_message(Bytes::from_static(b"nbase.tar\0")),
            Err(CopyMessageError::Unterminated("tablespace location"))
        );
        assert_eq!(
            parse_copy_message(Bytes::from_static(b"nb\0\0x")),
            Err(CopyMessageError::Trailing {
                kind: 'n',
                count: 1
            })
        );
        assert_eq!(
            parse_copy_message(Bytes::from_static(b"mx")),
            Err(CopyMessageError::Trailing {
                kind: 'm',
                count: 1
            })
        );
        assert_eq!(
            parse_copy_message(Bytes::from_static(b"w...")),
            Err(CopyMessageError::UnknownType(b'w'))
        );
    }

    #[test]
    fn command_uses_pg15_option_syntax() {
        let options = BaseBackupOptions {
            label: "it's".into(),
            checkpoint: Checkpoint::Fast,
            max_rate_kb: Some(1024),
            ..BaseBackupOptions::default()
        };
        assert_eq!(
            options.command().unwrap(),
            "BASE_BACKUP ( LABEL 'it''s', CHECKPOINT 'fast', WAIT 'false', WAL 'false', \
             TABLESPACE_MAP 'true', PROGRESS 'false', VERIFY_CHECKSUMS 'true', MANIFEST 'yes', \
             MANIFEST_CHECKSUMS 'CRC32C', MAX_RATE 1024 )"
        );
        let options = BaseBackupOptions {
            manifest: false,
            max_rate_kb: Some(1),
            ..BaseBackupOptions::default()
        };
        assert!(options.command().unwrap_err().contains("MAX_RATE"));
        let options = BaseBackupOptions {
            manifest: false,
            ..BaseBackupOptions::default()
        };
        let command = options.command().unwrap();
        assert!(command.contains("MANIFEST 'no'") && !command.contains("MANIFEST_CHECKSUMS"));
        let options = BaseBackupOptions {
            include_wal: true,
            ..BaseBackupOptions::default()
        };
        assert!(options.command().unwrap().contains(", WAL 'true',"));
    }

    #[test]
    fn command_uses_pg13_keywords() {
        let options = BaseBackupOptions {
            label: "it's".into(),
            checkpoint: Checkpoint::Fast,
            max_rate_kb: Some(1024),
            ..BaseBackupOptions::default()
        };
        assert_eq!(
            options.command_for(ReplyFormat::Pg13).unwrap(),
            "BASE_BACKUP LABEL 'it''s' FAST NOWAIT TABLESPACE_MAP MAX_RATE 1024 MANIFEST 'yes' \
             MANIFEST_CHECKSUMS 'CRC32C'"
        );
        // Every option turned the other way: only the keywords that turn something on.
        let options = BaseBackupOptions {
            label: "x".into(),
            checkpoint: Checkpoint::Spread,
            manifest: false,
            manifest_checksums: ManifestChecksums::Sha256,
            wait_for_wal_archive: true,
            tablespace_map: false,
            progress: true,
            verify_checksums: false,
            max_rate_kb: None,
            include_wal: true,
            start_timeout: DEFAULT_START_TIMEOUT,
        };
        assert_eq!(
            options.command_for(ReplyFormat::Pg13).unwrap(),
            "BASE_BACKUP LABEL 'x' PROGRESS WAL NOVERIFY_CHECKSUMS"
        );
        let options = BaseBackupOptions {
            manifest_checksums: ManifestChecksums::Sha512,
            ..BaseBackupOptions::default()
        };
        assert!(
            options
                .command_for(ReplyFormat::Pg13)
                .unwrap()
                .ends_with(" MANIFEST 'yes' MANIFEST_CHECKSUMS 'SHA512'")
        );
        // The same checks as for 15.
        let options = BaseBackupOptions {
            max_rate_kb: Some(2_000_000),
            ..BaseBackupOptions::default()
        };
        assert!(
            options
                .command_for(ReplyFormat::Pg13)
                .unwrap_err()
                .contains("MAX_RATE")
        );
        let options = BaseBackupOptions {
            label: "a\0b".into(),
            ..BaseBackupOptions::default()
        };
        assert!(
            options
                .command_for(ReplyFormat::Pg13)
                .unwrap_err()
                .contains("NUL")
        );
    }

    #[test]
    fn formats_by_server_version() {
        assert_eq!(ReplyFormat::for_server(120_017), None);
        assert_eq!(ReplyFormat::for_server(130_000), Some(ReplyFormat::Pg13));
        assert_eq!(ReplyFormat::for_server(140_023), Some(ReplyFormat::Pg13));
        assert_eq!(ReplyFormat::for_server(150_000), Some(ReplyFormat::Pg15));
        assert_eq!(ReplyFormat::for_server(180_006), Some(ReplyFormat::Pg15));
        assert_eq!(
            BaseBackupDecoder::new_for(130_023).format(),
            ReplyFormat::Pg13
        );
        assert_eq!(
            BaseBackupDecoder::new_for(140_000).format(),
            ReplyFormat::Pg13
        );
        assert_eq!(
            BaseBackupDecoder::new_for(160_000).format(),
            ReplyFormat::Pg15
        );
        assert_eq!(BaseBackupDecoder::new().format(), ReplyFormat::Pg15);
    }

    /// The message sequence of a PostgreSQL 13/14 base backup of one tablespace plus the main
    /// directory with a manifest, as 13/14's `basebackup.c` sends it: the same backup as
    /// [`pg15_reply`].
    pub(crate) fn pg13_reply() -> Vec<BackendMessage> {
        use BackendMessage as M;
        let copy_out = || M::CopyOutResponse(CopyResponse::default());
        let data = |d: &'static [u8]| M::CopyData(Bytes::from_static(d));
        let mut reply = start_and_tablespaces();
        reply.extend([
            copy_out(),
            data(b"ts data"),
            M::CopyDone,
            copy_out(),
            data(b"base "),
            data(b"data"),
            M::CopyDone,
            M::NoticeResponse(ErrorFields(vec![(
                b'M',
                "all required WAL segments".into(),
            )])),
            copy_out(),
            data(b"{}"),
            M::CopyDone,
        ]);
        reply.extend(end_position());
        reply.extend([
            M::CommandComplete("SELECT".into()),
            M::ReadyForQuery(TransactionStatus::Idle),
        ]);
        reply
    }

    fn decode(mut d: BaseBackupDecoder, reply: Vec<BackendMessage>) -> Vec<BackupEvent> {
        let mut events = Vec::new();
        for m in reply {
            if let Some(e) = d.feed(m).unwrap() {
                events.push(e);
            }
        }
        assert_eq!(d.phase(), Phase::Done);
        events
    }

    fn tar_end() -> BackupEvent {
        BackupEvent::Data(Bytes::from(vec![0; 1024]))
    }

    #[test]
    fn pg13_sequence_gives_the_events_of_pg15() {
        let legacy = decode(BaseBackupDecoder::new_for(140_023), pg13_reply());
        let started = BackupEvent::Started {
            start_lsn: Lsn(0x200_0028),
            timeline: TimelineId(1),
            tablespaces: vec![
                TablespaceInfo {
                    oid: Some(16384),
                    location: Some("/srv/ts1".into()),
                    size_kib: None,
                },
                TablespaceInfo {
                    oid: None,
                    location: None,
                    size_kib: None,
                },
            ],
        };
        assert_eq!(
            legacy,
            vec![
                started,
                BackupEvent::Archive {
                    name: "16384.tar".into(),
                    location: Some("/srv/ts1".into())
                },
                BackupEvent::Data(Bytes::from_static(b"ts data")),
                tar_end(),
                BackupEvent::Archive {
                    name: "base.tar".into(),
                    location: None
                },
                BackupEvent::Data(Bytes::from_static(b"base ")),
                BackupEvent::Data(Bytes::from_static(b"data")),
                tar_end(),
                BackupEvent::Manifest,
                BackupEvent::Data(Bytes::from_static(b"{}")),
                BackupEvent::Finished {
                    end_lsn: Lsn(0x200_0100),
                    timeline: TimelineId(1)
                },
            ]
        );

        // The 15 decoder's events for the same backup, less its progress reports, carry the
        // same archives, bytes and manifest (there the server itself ends each tar stream).
        let modern: Vec<BackupEvent> = decode(BaseBackupDecoder::new(), pg15_reply())
            .into_iter()
            .filter(|e| !matches!(e, BackupEvent::Progress(_)))
            .collect();
        let shape = |events: &[BackupEvent]| -> Vec<(String, Vec<u8>)> {
            let mut parts: Vec<(String, Vec<u8>)> = Vec::new();
            for e in events {
                match e {
                    BackupEvent::Archive { name, .. } => parts.push((name.clone(), Vec::new())),
                    BackupEvent::Manifest => parts.push(("manifest".into(), Vec::new())),
                    BackupEvent::Data(d) => parts.last_mut().unwrap().1.extend_from_slice(d),
                    _ => {}
                }
            }
            parts
        };
        let mut expected = shape(&modern);
        for part in &mut expected[..2] {
            part.1.extend_from_slice(&[0; 1024]);
        }
        assert_eq!(shape(&legacy), expected);
        assert_eq!(legacy.first(), modern.first());
        assert_eq!(legacy.last(), modern.last());
    }

    #[test]
    fn pg13_without_manifest_or_tablespaces() {
        use BackendMessage as M;
        let mut reply = pg13_reply();
        // No manifest: the end position follows the last archive directly.
        reply.drain(14..18);
        // Only the main directory: no tablespace row, no tablespace stream.
        reply.remove(4);
        reply.drain(6..9);
        assert!(matches!(reply[6], M::CopyOutResponse(_)), "{reply:?}");
        let events = decode(BaseBackupDecoder::with_format(ReplyFormat::Pg13), reply);
        assert_eq!(events.len(), 6, "{events:?}");
        assert_eq!(
            events[1],
            BackupEvent::Archive {
                name: "base.tar".into(),
                location: None
            }
        );
        assert_eq!(events[4], tar_end());
        assert!(matches!(events[5], BackupEvent::Finished { .. }));
        assert!(!events.contains(&BackupEvent::Manifest));
    }

    #[test]
    fn pg13_server_error_mid_stream() {
        let error = BackendMessage::ErrorResponse(ErrorFields(vec![
            (b'V', "ERROR".into()),
            (b'C', "58P01".into()),
            (
                b'M',
                "could not stat file \"base/1/1234\": No such file or directory".into(),
            ),
        ]));
        // In the tablespace's stream, between two archives, in the manifest.
        for at in [9, 10, 12, 16] {
            let mut d = BaseBackupDecoder::with_format(ReplyFormat::Pg13);
            let mut reply = pg13_reply();
            reply.truncate(at);
            for m in reply {
                d.feed(m).unwrap();
            }
            assert_eq!(d.phase(), Phase::Streaming);
            let err = d.feed(error.clone()).unwrap_err();
            assert!(
                matches!(err, BackupProtocolError::Server(ref e) if e.code == "58P01"),
                "{err}"
            );
            assert_eq!(d.phase(), Phase::Done);
            assert_eq!(
                d.feed(BackendMessage::ReadyForQuery(TransactionStatus::Idle)),
                Err(BackupProtocolError::AfterEnd)
            );
        }
    }

    #[test]
    fn pg13_disorder_is_reported() {
        use BackendMessage as M;
        let reply = pg13_reply();
        let after = |n: usize| {
            let mut d = BaseBackupDecoder::with_format(ReplyFormat::Pg13);
            for m in reply[..n].iter().cloned() {
                d.feed(m).unwrap();
            }
            d
        };
        // Data before the first stream began.
        let err = after(7).feed(M::CopyData(Bytes::new())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unexpected CopyData from the server while receiving the backup data (expected \
             CopyOutResponse)"
        );
        // The end position while an archive is still due.
        let err = after(10)
            .feed(M::RowDescription(vec![column("recptr"), column("tli")]))
            .unwrap_err();
        assert!(
            err.to_string().contains("(expected CopyOutResponse)"),
            "{err}"
        );
        // Data between the last archive and the manifest.
        let err = after(14).feed(M::CopyData(Bytes::new())).unwrap_err();
        assert!(
            err.to_string()
                .contains("(expected CopyOutResponse or RowDescription)"),
            "{err}"
        );
        // A 15+ typed stream fed to the 13/14 decoder passes as data but cannot end well.
        let mut d = BaseBackupDecoder::with_format(ReplyFormat::Pg13);
        let err = pg15_reply()
            .into_iter()
            .find_map(|m| d.feed(m).err())
            .expect("a 15+ reply is not a 13/14 one");
        assert!(err.to_string().contains("unexpected"), "{err}");
        // And a 13/14 reply fed to the 15+ decoder fails at its first bare CopyData.
        let mut d = BaseBackupDecoder::new();
        let err = pg13_reply()
            .into_iter()
            .find_map(|m| d.feed(m).err())
            .expect("a 13/14 reply is not a 15+ one");
        assert!(
            matches!(err, BackupProtocolError::CopyMessage { index: 0, .. }),
            "{err}"
        );
    }

    fn any_copy_message() -> impl Strategy<Value = CopyMessage> {
        prop_oneof![
            ("[^\u{0}]{0,12}", proptest::option::of("[^\u{0}]{1,12}")).prop_map(
                |(name, location)| CopyMessage::NewArchive {
                    name,
                    location: location.map(PathBuf::from)
                }
            ),
            Just(CopyMessage::Manifest),
            proptest::collection::vec(any::<u8>(), 0..32)
                .prop_map(|d| CopyMessage::Data(Bytes::from(d))),
            any::<u64>().prop_map(CopyMessage::Progress),
        ]
    }

    proptest! {
        #[test]
        fn copy_message_round_trip(m in any_copy_message()) {
            prop_assert_eq!(parse_copy_message(m.encode()), Ok(m));
        }

        #[test]
        fn any_copy_payload_never_panics(data in proptest::collection::vec(any::<u8>(), 0..32)) {
            if let Ok(m) = parse_copy_message(Bytes::from(data.clone())) {
                prop_assert_eq!(&m.encode()[..], &data[..]);
            }
        }

        #[test]
        fn any_prefix_or_corruption_of_a_reply_never_panics(
            legacy in any::<bool>(), cut in 0usize..24, drop_at in 0usize..24, flip in any::<u8>(),
        ) {
            let (mut reply, format) = if legacy {
                (pg13_reply(), ReplyFormat::Pg13)
            } else {
                (pg15_reply(), ReplyFormat::Pg15)
            };
            let whole = reply.len();
            reply.truncate(cut.max(1));
            let mut changed = false;
            if drop_at < reply.len() {
                changed = true;
                if flip % 2 == 0 {
                    reply.remove(drop_at);
                } else {
                    reply.insert(drop_at, BackendMessage::CopyDone);
                }
            }
            let mut d = BaseBackupDecoder::with_format(format);
            let mut failed = false;
            for m in reply {
                if d.feed(m).is_err() {
                    prop_assert_eq!(d.phase(), Phase::Done);
                    failed = true;
                    break;
                }
            }
            // An untouched prefix never fails, and only the whole reply finishes.
            if !changed {
                prop_assert!(!failed);
                prop_assert_eq!(d.phase() == Phase::Done, cut >= whole);
            }
        }

        /// Any sequence of plausible messages, for either format: events or an error that
        /// ends the decoder, never a panic, and nothing but `AfterEnd` once it is done.
        #[test]
        fn any_message_sequence_gives_an_error_never_a_panic(
            legacy in any::<bool>(),
            picks in proptest::collection::vec(0usize..60, 0..40),
        ) {
            let pool: Vec<BackendMessage> = pg13_reply().into_iter().chain(pg15_reply()).collect();
            let format = if legacy { ReplyFormat::Pg13 } else { ReplyFormat::Pg15 };
            let mut d = BaseBackupDecoder::with_format(format);
            let mut done = false;
            for pick in picks {
                let m = pool[pick % pool.len()].clone();
                let result = d.feed(m);
                if done {
                    prop_assert_eq!(result, Err(BackupProtocolError::AfterEnd));
                } else if result.is_err() || d.phase() == Phase::Done {
                    prop_assert_eq!(d.phase(), Phase::Done);
                    done = true;
                }
            }
        }
    }
}
