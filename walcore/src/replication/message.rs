//! The messages of PostgreSQL's frontend/backend protocol (version 3.0) that a replication
//! client exchanges, as a sans-IO parser and builders.
//!
//! - [`parse_backend`]: bytes in; a complete [`BackendMessage`] and the number of bytes it took,
//!   `Ok(None)` when more bytes are needed, or a [`ProtocolError`] that names the message type and
//!   the byte offset of the problem. [`take_backend`] is the same parser over a `BytesMut` that
//!   splits the message off without copying (what the connection uses).
//! - [`BackendMessage::encode`]: the inverse, for round-trip tests, fuzzing and fake servers.
//! - [`frontend`]: the messages a client sends (startup, SSLRequest, passwords, SASL, Query,
//!   Terminate), built with `postgres_protocol`'s writers after checking for NUL bytes.
//!
//! Message formats are those of the PostgreSQL documentation, "Message Formats" (protocol 3.0).
//! `postgres_protocol` has a backend parser too, but it does not know `CopyBothResponse` (`'W'`),
//! which streaming replication starts with, and its errors do not say where; this one does both
//! and never allocates on a length it has not received: a message longer than
//! [`MAX_MESSAGE_LEN`] is an error as soon as its 5-byte header arrives.

use std::fmt;

use bytes::BufMut;
/// The buffer types of this module's API (CopyData and DataRow values are `Bytes`; the
/// splitting parser takes a `BytesMut`), re-exported so that callers need no `bytes` of their
/// own.
pub use bytes::{Bytes, BytesMut};

/// The longest message accepted, header included: 1 GiB, PostgreSQL's own limit on a field
/// (`MaxAllocSize`); the server never sends more in one message.
pub const MAX_MESSAGE_LEN: usize = 1 << 30;

/// Type byte and 4-byte length that start every backend message.
pub const HEADER_LEN: usize = 5;

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    /// `'R'`: a step of authentication.
    Authentication(Authentication),
    /// `'S'`: the current value of a run-time parameter the server reports (`server_version`,
    /// `integer_datetimes`, ...).
    ParameterStatus {
        /// The parameter's name.
        name: String,
        /// Its value.
        value: String,
    },
    /// `'K'`: what a CancelRequest for this session must carry.
    BackendKeyData {
        /// The backend's process id.
        process_id: i32,
        /// The secret key of the session.
        secret_key: i32,
    },
    /// `'Z'`: the server is ready for a new query.
    ReadyForQuery(TransactionStatus),
    /// `'T'`: the columns of the rows that follow.
    RowDescription(Vec<FieldDescription>),
    /// `'D'`: one row; `None` is SQL NULL. Values are in the format of the RowDescription
    /// (always text for the replication commands).
    DataRow(Vec<Option<Bytes>>),
    /// `'C'`: a command ended; its tag (`SELECT`, `IDENTIFY_SYSTEM`, `BASE_BACKUP`, ...).
    CommandComplete(String),
    /// `'I'`: the query string was empty.
    EmptyQueryResponse,
    /// `'E'`: the command (or the session, when FATAL) failed.
    ErrorResponse(ErrorFields),
    /// `'N'`: a warning or notice; the command goes on.
    NoticeResponse(ErrorFields),
    /// `'G'`: the server waits for COPY data from the client.
    CopyInResponse(CopyResponse),
    /// `'H'`: COPY data from the server follows (`BASE_BACKUP` streams in this mode).
    CopyOutResponse(CopyResponse),
    /// `'W'`: COPY data flows both ways (`START_REPLICATION` streams in this mode).
    CopyBothResponse(CopyResponse),
    /// `'d'`: a piece of COPY data.
    CopyData(Bytes),
    /// `'c'`: the end of the server's COPY data.
    CopyDone,
    /// `'A'`: a NOTIFY.
    NotificationResponse {
        /// The notifying backend's process id.
        process_id: i32,
        /// The channel.
        channel: String,
        /// The payload.
        payload: String,
    },
    /// `'v'`: the server does not support the requested minor protocol version or options.
    NegotiateProtocolVersion {
        /// The newest minor protocol version the server supports.
        newest_minor: i32,
        /// Protocol options the server did not recognise.
        unrecognized: Vec<String>,
    },
}

/// The steps of authentication (`'R'` messages), by their code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// 0: authentication succeeded.
    Ok,
    /// 2: Kerberos V5 (not supported by any current server).
    KerberosV5,
    /// 3: send the password in clear text.
    CleartextPassword,
    /// 5: send `md5(md5(password || user) || salt)`.
    Md5Password {
        /// The salt.
        salt: [u8; 4],
    },
    /// 7: GSSAPI.
    Gss,
    /// 8: GSSAPI or SSPI data.
    GssContinue(Bytes),
    /// 9: SSPI.
    Sspi,
    /// 10: SASL, with the mechanisms the server offers in its order of preference.
    Sasl {
        /// Mechanism names (`SCRAM-SHA-256`, `SCRAM-SHA-256-PLUS`).
        mechanisms: Vec<String>,
    },
    /// 11: a SASL challenge.
    SaslContinue(Bytes),
    /// 12: SASL outcome data (the server's proof, for SCRAM).
    SaslFinal(Bytes),
}

impl Authentication {
    /// The code of this step in an `'R'` message.
    pub fn code(&self) -> i32 {
        match self {
            Authentication::Ok => 0,
            Authentication::KerberosV5 => 2,
            Authentication::CleartextPassword => 3,
            Authentication::Md5Password { .. } => 5,
            Authentication::Gss => 7,
            Authentication::GssContinue(_) => 8,
            Authentication::Sspi => 9,
            Authentication::Sasl { .. } => 10,
            Authentication::SaslContinue(_) => 11,
            Authentication::SaslFinal(_) => 12,
        }
    }
}

/// The transaction state a ReadyForQuery reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// `'I'`: not in a transaction block.
    Idle,
    /// `'T'`: in a transaction block.
    InTransaction,
    /// `'E'`: in a failed transaction block.
    Failed,
}

impl TransactionStatus {
    fn byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        }
    }
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    /// The column name.
    pub name: String,
    /// The table's OID, or 0.
    pub table_oid: u32,
    /// The column's attribute number, or 0.
    pub column_id: i16,
    /// The data type's OID (25 text, 20 int8, 23 int4, 26 oid, ...).
    pub type_oid: u32,
    /// The data type's size (`pg_type.typlen`), negative for variable width.
    pub type_size: i16,
    /// The type modifier (`pg_attribute.atttypmod`).
    pub type_modifier: i32,
    /// 0 for text, 1 for binary.
    pub format: i16,
}

/// The columns of an ErrorResponse or NoticeResponse, in the order the server sent them: a
/// field type byte (`'S'` severity, `'C'` SQLSTATE, `'M'` message, `'D'` detail, `'H'` hint, ...)
/// and its text.
///
/// Texts that are not valid UTF-8 (a server whose messages are in another encoding) are
/// decoded with replacement characters rather than rejected: the error must reach the user.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields(pub Vec<(u8, String)>);

impl ErrorFields {
    /// The first field of type `code`.
    pub fn get(&self, code: u8) -> Option<&str> {
        self.0
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    }

    /// The severity, never localized when the server sends `'V'` (9.6+), else `'S'`.
    pub fn severity(&self) -> Option<&str> {
        self.get(b'V').or_else(|| self.get(b'S'))
    }

    /// The SQLSTATE (`'C'`), like `28P01`.
    pub fn code(&self) -> Option<&str> {
        self.get(b'C')
    }

    /// The primary message (`'M'`).
    pub fn message(&self) -> Option<&str> {
        self.get(b'M')
    }

    /// The detail (`'D'`).
    pub fn detail(&self) -> Option<&str> {
        self.get(b'D')
    }

    /// The hint (`'H'`).
    pub fn hint(&self) -> Option<&str> {
        self.get(b'H')
    }
}

/// The body of CopyInResponse, CopyOutResponse and CopyBothResponse.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyResponse {
    /// 0: textual COPY; 1: binary.
    pub format: u8,
    /// The format of each column (0 text, 1 binary); empty for the replication streams.
    pub column_formats: Vec<i16>,
}

/// Why bytes from the server are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolProblem {
    /// The type byte is not one of a backend message this parser knows.
    UnknownMessageType,
    /// The length field is below 4 (it counts itself).
    LengthTooShort {
        /// The length field.
        length: i32,
    },
    /// The length field is above [`MAX_MESSAGE_LEN`].
    MessageTooLong {
        /// The length field.
        length: u64,
    },
    /// The message ends before a field does.
    Truncated {
        /// The field.
        what: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the message.
        left: usize,
    },
    /// A string has no terminating NUL before the end of the message.
    UnterminatedString {
        /// The field.
        what: &'static str,
    },
    /// A string that must be UTF-8 is not.
    InvalidUtf8 {
        /// The field.
        what: &'static str,
    },
    /// Bytes are left after the last field of the message.
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// An authentication request code that does not exist.
    UnknownAuthentication {
        /// The code.
        code: i32,
    },
    /// A negative count or length where only -1 (NULL) or a count is allowed.
    InvalidLength {
        /// The field.
        what: &'static str,
        /// The value.
        value: i32,
    },
    /// A ReadyForQuery status other than `I`, `T`, `E`.
    InvalidTransactionStatus {
        /// The byte.
        status: u8,
    },
}

impl fmt::Display for ProtocolProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolProblem::UnknownMessageType => f.write_str(
                "unknown message type (is this a PostgreSQL server, and is the stream in step?)",
            ),
            ProtocolProblem::LengthTooShort { length } => {
                write!(f, "length field {length} is below the minimum of 4")
            }
            ProtocolProblem::MessageTooLong { length } => write!(
                f,
                "length field {length} exceeds the limit of {MAX_MESSAGE_LEN} bytes"
            ),
            ProtocolProblem::Truncated { what, needed, left } => write!(
                f,
                "{what} needs {needed} bytes but the message has only {left} left"
            ),
            ProtocolProblem::UnterminatedString { what } => {
                write!(f, "{what} is not NUL-terminated within the message")
            }
            ProtocolProblem::InvalidUtf8 { what } => write!(f, "{what} is not valid UTF-8"),
            ProtocolProblem::TrailingBytes { count } => {
                write!(f, "{count} unexpected bytes after the last field")
            }
            ProtocolProblem::UnknownAuthentication { code } => {
                write!(f, "unknown authentication request code {code}")
            }
            ProtocolProblem::InvalidLength { what, value } => {
                write!(f, "invalid {what} {value}")
            }
            ProtocolProblem::InvalidTransactionStatus { status } => write!(
                f,
                "transaction status {:?} is not 'I', 'T' or 'E'",
                char::from(*status)
            ),
        }
    }
}

/// Bytes from the server that are not a valid message: which message, where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid message from the server{} at byte {offset}: {problem}", tag_description(*.tag))]
pub struct ProtocolError {
    /// The message's type byte, when known.
    pub tag: Option<u8>,
    /// Offset of the problem: in the buffer given to the parser, or (once the connection has
    /// added what it consumed before) in the whole stream from the server.
    pub offset: u64,
    /// What is wrong.
    pub problem: ProtocolProblem,
}

impl ProtocolError {
    /// The same error with `base` added to its offset.
    pub fn with_base(mut self, base: u64) -> ProtocolError {
        self.offset = self.offset.saturating_add(base);
        self
    }
}

fn tag_description(tag: Option<u8>) -> String {
    let Some(tag) = tag else {
        return String::new();
    };
    let name = message_name(tag);
    if tag.is_ascii_graphic() {
        format!(" ({:?} {name})", char::from(tag))
    } else {
        format!(" (type byte 0x{tag:02X} {name})")
    }
}

/// The protocol's name of a backend message type.
pub fn message_name(tag: u8) -> &'static str {
    match tag {
        b'R' => "Authentication",
        b'S' => "ParameterStatus",
        b'K' => "BackendKeyData",
        b'Z' => "ReadyForQuery",
        b'T' => "RowDescription",
        b'D' => "DataRow",
        b'C' => "CommandComplete",
        b'I' => "EmptyQueryResponse",
        b'E' => "ErrorResponse",
        b'N' => "NoticeResponse",
        b'G' => "CopyInResponse",
        b'H' => "CopyOutResponse",
        b'W' => "CopyBothResponse",
        b'd' => "CopyData",
        b'c' => "CopyDone",
        b'A' => "NotificationResponse",
        b'v' => "NegotiateProtocolVersion",
        _ => "unknown message",
    }
}

fn is_known_tag(tag: u8) -> bool {
    message_name(tag) != "unknown message"
}

/// Where the next complete message lies: `Some((tag, total length))` once `buf` holds it all.
///
/// Checks the type byte as soon as it arrives and the length as soon as the header has, so that
/// garbage or a lying length is reported without waiting for (or buffering) more bytes.
fn frame(buf: &[u8]) -> Result<Option<(u8, usize)>, ProtocolError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    let fail = |offset, problem| ProtocolError {
        tag: Some(tag),
        offset,
        problem,
    };
    if !is_known_tag(tag) {
        return Err(fail(0, ProtocolProblem::UnknownMessageType));
    }
    let Some(len_bytes) = buf.get(1..HEADER_LEN) else {
        return Ok(None);
    };
    let length = i32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    if length < 4 {
        return Err(fail(1, ProtocolProblem::LengthTooShort { length }));
    }
    // `length` is positive, so it fits in usize on every platform walcore builds on.
    let length = length.unsigned_abs() as usize;
    if length + 1 > MAX_MESSAGE_LEN {
        return Err(fail(
            1,
            ProtocolProblem::MessageTooLong {
                length: length as u64,
            },
        ));
    }
    if buf.len() < length + 1 {
        return Ok(None);
    }
    Ok(Some((tag, length + 1)))
}

/// Parses the first message in `buf`.
///
/// Returns the message and the number of bytes it took (header included), `Ok(None)` when
/// `buf` holds only part of a message, or an error whose offset is relative to `buf`. Copies
/// the variable parts (use [`take_backend`] to avoid that).
pub fn parse_backend(buf: &[u8]) -> Result<Option<(BackendMessage, usize)>, ProtocolError> {
    let Some((tag, total)) = frame(buf)? else {
        return Ok(None);
    };
    let body = Bytes::copy_from_slice(&buf[HEADER_LEN..total]);
    Ok(Some((decode_body(tag, body)?, total)))
}

/// Parses the first message in `buf` and removes its bytes from `buf`; the message's variable
/// parts (CopyData, DataRow values) share `buf`'s storage instead of being copied.
///
/// `Ok(None)` leaves `buf` untouched; on error, `buf` is left as it was too (offsets are
/// relative to its start).
pub fn take_backend(buf: &mut BytesMut) -> Result<Option<BackendMessage>, ProtocolError> {
    let Some((tag, total)) = frame(buf)? else {
        return Ok(None);
    };
    let frame = buf.split_to(total).freeze();
    match decode_body(tag, frame.slice(HEADER_LEN..)) {
        Ok(message) => Ok(Some(message)),
        Err(e) => {
            // Put the bytes back (a copy, on this rare path) so that the caller's view of the
            // stream is unchanged and the offsets in the error stay true.
            let mut restored = BytesMut::with_capacity(frame.len() + buf.len());
            restored.extend_from_slice(&frame);
            restored.extend_from_slice(buf);
            *buf = restored;
            Err(e)
        }
    }
}

/// A cursor over a message body, whose errors carry the offset from the message start.
struct Reader {
    tag: u8,
    body: Bytes,
    pos: usize,
}

impl Reader {
    fn new(tag: u8, body: Bytes) -> Reader {
        Reader { tag, body, pos: 0 }
    }

    fn error_at(&self, pos: usize, problem: ProtocolProblem) -> ProtocolError {
        ProtocolError {
            tag: Some(self.tag),
            offset: (HEADER_LEN + pos) as u64,
            problem,
        }
    }

    fn left(&self) -> usize {
        self.body.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, ProtocolError> {
        if self.left() < n {
            return Err(self.error_at(
                self.pos,
                ProtocolProblem::Truncated {
                    what,
                    needed: n,
                    left: self.left(),
                },
            ));
        }
        let out = self.body.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ProtocolError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, ProtocolError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, ProtocolError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    /// A count that must not be negative.
    fn count16(&mut self, what: &'static str) -> Result<usize, ProtocolError> {
        let at = self.pos;
        let value = self.i16(what)?;
        usize::try_from(value).map_err(|_| {
            self.error_at(
                at,
                ProtocolProblem::InvalidLength {
                    what,
                    value: i32::from(value),
                },
            )
        })
    }

    /// A NUL-terminated string's bytes (without the NUL).
    fn cstr_bytes(&mut self, what: &'static str) -> Result<Bytes, ProtocolError> {
        let rest = &self.body[self.pos..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(self.error_at(self.pos, ProtocolProblem::UnterminatedString { what }));
        };
        let out = self.body.slice(self.pos..self.pos + nul);
        self.pos += nul + 1;
        Ok(out)
    }

    /// A NUL-terminated UTF-8 string.
    fn cstr(&mut self, what: &'static str) -> Result<String, ProtocolError> {
        let at = self.pos;
        let bytes = self.cstr_bytes(what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.error_at(at, ProtocolProblem::InvalidUtf8 { what }))
    }

    fn rest(&mut self) -> Bytes {
        let out = self.body.slice(self.pos..);
        self.pos = self.body.len();
        out
    }

    fn finish(self) -> Result<(), ProtocolError> {
        if self.left() == 0 {
            Ok(())
        } else {
            Err(self.error_at(
                self.pos,
                ProtocolProblem::TrailingBytes { count: self.left() },
            ))
        }
    }
}

/// Decodes the body of a message of type `tag` (the bytes after the length field).
fn decode_body(tag: u8, body: Bytes) -> Result<BackendMessage, ProtocolError> {
    let mut r = Reader::new(tag, body);
    let message = match tag {
        b'R' => BackendMessage::Authentication(decode_authentication(&mut r)?),
        b'S' => BackendMessage::ParameterStatus {
            name: r.cstr("parameter name")?,
            value: r.cstr("parameter value")?,
        },
        b'K' => BackendMessage::BackendKeyData {
            process_id: r.i32("process id")?,
            secret_key: r.i32("secret key")?,
        },
        b'Z' => {
            let at = r.pos;
            let status = match r.u8("transaction status")? {
                b'I' => TransactionStatus::Idle,
                b'T' => TransactionStatus::InTransaction,
                b'E' => TransactionStatus::Failed,
                status => {
                    return Err(
                        r.error_at(at, ProtocolProblem::InvalidTransactionStatus { status })
                    );
                }
            };
            BackendMessage::ReadyForQuery(status)
        }
        b'T' => {
            let n = r.count16("field count")?;
            // Each field takes at least 19 bytes: a count beyond what the body can hold is
            // caught by the reads below, and the vector grows only with fields actually read.
            let mut fields = Vec::with_capacity(n.min(r.left() / 19));
            for _ in 0..n {
                fields.push(FieldDescription {
                    name: r.cstr("field name")?,
                    table_oid: r.u32("table OID")?,
                    column_id: r.i16("column attribute number")?,
                    type_oid: r.u32("type OID")?,
                    type_size: r.i16("type size")?,
                    type_modifier: r.i32("type modifier")?,
                    format: r.i16("format code")?,
                });
            }
            BackendMessage::RowDescription(fields)
        }
        b'D' => {
            let n = r.count16("column count")?;
            let mut values = Vec::with_capacity(n.min(r.left() / 4));
            for _ in 0..n {
                let at = r.pos;
                let len = r.i32("column length")?;
                if len == -1 {
                    values.push(None);
                } else {
                    let len = usize::try_from(len).map_err(|_| {
                        r.error_at(
                            at,
                            ProtocolProblem::InvalidLength {
                                what: "column length",
                                value: len,
                            },
                        )
                    })?;
                    values.push(Some(r.take(len, "column value")?));
                }
            }
            BackendMessage::DataRow(values)
        }
        b'C' => BackendMessage::CommandComplete(r.cstr("command tag")?),
        b'I' => BackendMessage::EmptyQueryResponse,
        b'E' => BackendMessage::ErrorResponse(decode_error_fields(&mut r)?),
        b'N' => BackendMessage::NoticeResponse(decode_error_fields(&mut r)?),
        b'G' => BackendMessage::CopyInResponse(decode_copy_response(&mut r)?),
        b'H' => BackendMessage::CopyOutResponse(decode_copy_response(&mut r)?),
        b'W' => BackendMessage::CopyBothResponse(decode_copy_response(&mut r)?),
        b'd' => BackendMessage::CopyData(r.rest()),
        b'c' => BackendMessage::CopyDone,
        b'A' => BackendMessage::NotificationResponse {
            process_id: r.i32("process id")?,
            channel: r.cstr("channel")?,
            payload: r.cstr("payload")?,
        },
        b'v' => {
            let newest_minor = r.i32("newest minor version")?;
            let at = r.pos;
            let n = r.i32("option count")?;
            let n = usize::try_from(n).map_err(|_| {
                r.error_at(
                    at,
                    ProtocolProblem::InvalidLength {
                        what: "option count",
                        value: n,
                    },
                )
            })?;
            let mut unrecognized = Vec::with_capacity(n.min(r.left()));
            for _ in 0..n {
                unrecognized.push(r.cstr("option name")?);
            }
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            }
        }
        _ => return Err(r.error_at(0, ProtocolProblem::UnknownMessageType)),
    };
    r.finish()?;
    Ok(message)
}

fn decode_authentication(r: &mut Reader) -> Result<Authentication, ProtocolError> {
    let at = r.pos;
    let code = r.i32("authentication code")?;
    Ok(match code {
        0 => Authentication::Ok,
        2 => Authentication::KerberosV5,
        3 => Authentication::CleartextPassword,
        5 => Authentication::Md5Password {
            salt: r.array("MD5 salt")?,
        },
        7 => Authentication::Gss,
        8 => Authentication::GssContinue(r.rest()),
        9 => Authentication::Sspi,
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let name = r.cstr("SASL mechanism name")?;
                if name.is_empty() {
                    break;
                }
                mechanisms.push(name);
            }
            Authentication::Sasl { mechanisms }
        }
        11 => Authentication::SaslContinue(r.rest()),
        12 => Authentication::SaslFinal(r.rest()),
        code => return Err(r.error_at(at, ProtocolProblem::UnknownAuthentication { code })),
    })
}

fn decode_error_fields(r: &mut Reader) -> Result<ErrorFields, ProtocolError> {
    let mut fields = Vec::new();
    loop {
        let code = r.u8("error field type")?;
        if code == 0 {
            return Ok(ErrorFields(fields));
        }
        let text = r.cstr_bytes("error field")?;
        fields.push((code, String::from_utf8_lossy(&text).into_owned()));
    }
}

fn decode_copy_response(r: &mut Reader) -> Result<CopyResponse, ProtocolError> {
    let format = r.u8("copy format")?;
    let n = r.count16("column count")?;
    let mut column_formats = Vec::with_capacity(n.min(r.left() / 2));
    for _ in 0..n {
        column_formats.push(r.i16("column format")?);
    }
    Ok(CopyResponse {
        format,
        column_formats,
    })
}

impl BackendMessage {
    /// The message's type byte.
    pub fn tag(&self) -> u8 {
        match self {
            BackendMessage::Authentication(_) => b'R',
            BackendMessage::ParameterStatus { .. } => b'S',
            BackendMessage::BackendKeyData { .. } => b'K',
            BackendMessage::ReadyForQuery(_) => b'Z',
            BackendMessage::RowDescription(_) => b'T',
            BackendMessage::DataRow(_) => b'D',
            BackendMessage::CommandComplete(_) => b'C',
            BackendMessage::EmptyQueryResponse => b'I',
            BackendMessage::ErrorResponse(_) => b'E',
            BackendMessage::NoticeResponse(_) => b'N',
            BackendMessage::CopyInResponse(_) => b'G',
            BackendMessage::CopyOutResponse(_) => b'H',
            BackendMessage::CopyBothResponse(_) => b'W',
            BackendMessage::CopyData(_) => b'd',
            BackendMessage::CopyDone => b'c',
            BackendMessage::NotificationResponse { .. } => b'A',
            BackendMessage::NegotiateProtocolVersion { .. } => b'v',
        }
    }

    /// Appends the message as the server would send it. For tests, fuzzing and fake servers;
    /// counts and lengths are truncated to the protocol's field widths, so only messages that
    /// [`parse_backend`] could have produced encode faithfully.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(self.tag());
        let start = out.len();
        out.put_i32(0);
        match self {
            BackendMessage::Authentication(auth) => {
                out.put_i32(auth.code());
                match auth {
                    Authentication::Md5Password { salt } => out.put_slice(salt),
                    Authentication::GssContinue(data)
                    | Authentication::SaslContinue(data)
                    | Authentication::SaslFinal(data) => out.put_slice(data),
                    Authentication::Sasl { mechanisms } => {
                        for m in mechanisms {
                            put_cstr(out, m.as_bytes());
                        }
                        out.put_u8(0);
                    }
                    _ => {}
                }
            }
            BackendMessage::ParameterStatus { name, value } => {
                put_cstr(out, name.as_bytes());
                put_cstr(out, value.as_bytes());
            }
            BackendMessage::BackendKeyData {
                process_id,
                secret_key,
            } => {
                out.put_i32(*process_id);
                out.put_i32(*secret_key);
            }
            BackendMessage::ReadyForQuery(status) => out.put_u8(status.byte()),
            BackendMessage::RowDescription(fields) => {
                out.put_i16(fields.len() as i16);
                for f in fields {
                    put_cstr(out, f.name.as_bytes());
                    out.put_u32(f.table_oid);
                    out.put_i16(f.column_id);
                    out.put_u32(f.type_oid);
                    out.put_i16(f.type_size);
                    out.put_i32(f.type_modifier);
                    out.put_i16(f.format);
                }
            }
            BackendMessage::DataRow(values) => {
                out.put_i16(values.len() as i16);
                for v in values {
                    match v {
                        None => out.put_i32(-1),
                        Some(v) => {
                            out.put_i32(v.len() as i32);
                            out.put_slice(v);
                        }
                    }
                }
            }
            BackendMessage::CommandComplete(tag) => put_cstr(out, tag.as_bytes()),
            BackendMessage::EmptyQueryResponse | BackendMessage::CopyDone => {}
            BackendMessage::ErrorResponse(fields) | BackendMessage::NoticeResponse(fields) => {
                for (code, text) in &fields.0 {
                    out.put_u8(*code);
                    put_cstr(out, text.as_bytes());
                }
                out.put_u8(0);
            }
            BackendMessage::CopyInResponse(c)
            | BackendMessage::CopyOutResponse(c)
            | BackendMessage::CopyBothResponse(c) => {
                out.put_u8(c.format);
                out.put_i16(c.column_formats.len() as i16);
                for f in &c.column_formats {
                    out.put_i16(*f);
                }
            }
            BackendMessage::CopyData(data) => out.put_slice(data),
            BackendMessage::NotificationResponse {
                process_id,
                channel,
                payload,
            } => {
                out.put_i32(*process_id);
                put_cstr(out, channel.as_bytes());
                put_cstr(out, payload.as_bytes());
            }
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            } => {
                out.put_i32(*newest_minor);
                out.put_i32(unrecognized.len() as i32);
                for o in unrecognized {
                    put_cstr(out, o.as_bytes());
                }
            }
        }
        let len = (out.len() - start) as i32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(s);
    out.put_u8(0);
}

/// The messages a replication client sends.
pub mod frontend {
    use bytes::BytesMut;
    use postgres_protocol::message::frontend as pp;

    /// A string the protocol cannot carry: it would be cut at its NUL byte.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("{what} contains a NUL byte, which the PostgreSQL protocol cannot carry")]
    pub struct NulByte {
        /// What the string is (`user name`, `query`, ...).
        pub what: &'static str,
    }

    fn check(what: &'static str, s: &[u8]) -> Result<(), NulByte> {
        if s.contains(&0) {
            Err(NulByte { what })
        } else {
            Ok(())
        }
    }

    /// What kind of replication connection a startup message asks for.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum ReplicationMode {
        /// `replication=true`: a physical walsender (IDENTIFY_SYSTEM, BASE_BACKUP,
        /// START_REPLICATION PHYSICAL), not connected to a database.
        Physical,
        /// `replication=database`: a logical walsender connected to `database`.
        Logical {
            /// The database.
            database: String,
        },
    }

    /// The parameters of a StartupMessage.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Startup<'a> {
        /// The role to connect as.
        pub user: &'a str,
        /// Physical or logical replication.
        pub mode: &'a ReplicationMode,
        /// `application_name`, shown in `pg_stat_replication` and the server log.
        pub application_name: Option<&'a str>,
        /// Command-line options for the backend (`options`, as libpq's `PGOPTIONS`).
        pub options: Option<&'a str>,
    }

    /// StartupMessage for protocol 3.0. Also asks for `client_encoding=UTF8`, so that the
    /// server's messages arrive in UTF-8 whatever its own encoding.
    pub fn startup(s: &Startup<'_>, out: &mut BytesMut) -> Result<(), NulByte> {
        check("user name", s.user.as_bytes())?;
        let mut params: Vec<(&str, &str)> = vec![("user", s.user)];
        match s.mode {
            ReplicationMode::Physical => params.push(("replication", "true")),
            ReplicationMode::Logical { database } => {
                check("database name", database.as_bytes())?;
                params.push(("replication", "database"));
                params.push(("database", database));
            }
        }
        if let Some(name) = s.application_name {
            check("application_name", name.as_bytes())?;
            params.push(("application_name", name));
        }
        if let Some(options) = s.options {
            check("options", options.as_bytes())?;
            params.push(("options", options));
        }
        params.push(("client_encoding", "UTF8"));
        pp::startup_message(params, out).map_err(|_| NulByte {
            what: "startup parameter",
        })
    }

    /// SSLRequest: the server answers with one byte, `S` (go on with TLS) or `N`.
    pub fn ssl_request(out: &mut BytesMut) {
        pp::ssl_request(out);
    }

    /// PasswordMessage carrying a clear-text password or an MD5 hash.
    pub fn password(password: &[u8], out: &mut BytesMut) -> Result<(), NulByte> {
        check("password", password)?;
        pp::password_message(password, out).map_err(|_| NulByte { what: "password" })
    }

    /// SASLInitialResponse: the chosen mechanism and the client's first message.
    pub fn sasl_initial_response(
        mechanism: &str,
        data: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), NulByte> {
        check("SASL mechanism", mechanism.as_bytes())?;
        pp::sasl_initial_response(mechanism, data, out).map_err(|_| NulByte {
            what: "SASL mechanism",
        })
    }

    /// SASLResponse: the client's next SASL message.
    pub fn sasl_response(data: &[u8], out: &mut BytesMut) {
        // Raw bytes, no string: cannot fail.
        let _ = pp::sasl_response(data, out);
    }

    /// Query (simple query protocol), which replication connections use for their commands.
    pub fn query(sql: &str, out: &mut BytesMut) -> Result<(), NulByte> {
        check("query", sql.as_bytes())?;
        pp::query(sql, out).map_err(|_| NulByte { what: "query" })
    }

    /// Terminate: the client is leaving.
    pub fn terminate(out: &mut BytesMut) {
        pp::terminate(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::fuzz::message_stream_property;
    use proptest::prelude::*;

    fn encoded(m: &BackendMessage) -> Vec<u8> {
        let mut out = BytesMut::new();
        m.encode(&mut out);
        out.to_vec()
    }

    #[test]
    fn real_startup_reply_of_postgresql_15() {
        // AuthenticationOk, then part of what a PostgreSQL 15 walsender sends after it.
        let mut bytes = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
        bytes.extend_from_slice(b"S\0\0\0\x19integer_datetimes\0on\0");
        bytes.extend_from_slice(b"K\0\0\0\x0c\0\0D\xf9d\x82aE");
        bytes.extend_from_slice(b"Z\0\0\0\x05I");
        let messages = message_stream_property(&bytes);
        assert_eq!(
            messages,
            vec![
                BackendMessage::Authentication(Authentication::Ok),
                BackendMessage::ParameterStatus {
                    name: "integer_datetimes".into(),
                    value: "on".into()
                },
                BackendMessage::BackendKeyData {
                    process_id: 0x44f9,
                    secret_key: 0x6482_6145
                },
                BackendMessage::ReadyForQuery(TransactionStatus::Idle),
            ]
        );
    }

    #[test]
    fn copy_both_response_is_parsed() {
        // As sent by PostgreSQL 15 for START_REPLICATION.
        let bytes = b"W\0\0\0\x07\0\0\0";
        assert_eq!(
            parse_backend(bytes),
            Ok(Some((
                BackendMessage::CopyBothResponse(CopyResponse::default()),
                8
            )))
        );
        // One byte short: need more.
        assert_eq!(parse_backend(&bytes[..7]), Ok(None));
    }

    #[test]
    fn error_fields_are_all_kept() {
        let m = BackendMessage::ErrorResponse(ErrorFields(vec![
            (b'S', "FATAL".into()),
            (b'V', "FATAL".into()),
            (b'C', "28P01".into()),
            (b'M', "password authentication failed for user \"x\"".into()),
            (b'D', "some detail".into()),
            (b'H', "some hint".into()),
        ]));
        let bytes = encoded(&m);
        let (parsed, used) = parse_backend(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        let BackendMessage::ErrorResponse(f) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(f.severity(), Some("FATAL"));
        assert_eq!(f.code(), Some("28P01"));
        assert_eq!(
            f.message(),
            Some("password authentication failed for user \"x\"")
        );
        assert_eq!(f.detail(), Some("some detail"));
        assert_eq!(f.hint(), Some("some hint"));
    }

    #[test]
    fn non_utf8_error_text_is_kept_readable() {
        let bytes = b"E\0\0\0\x11SFATAL\0M\xe9t\xe9\0\0";
        let (m, _) = parse_backend(bytes).unwrap().unwrap();
        let BackendMessage::ErrorResponse(f) = m else {
            panic!()
        };
        assert_eq!(f.message(), Some("\u{fffd}t\u{fffd}"));
    }

    #[test]
    fn lying_length_is_rejected_from_the_header_alone() {
        // CopyData claiming 2 GiB - 1: rejected with only 5 bytes in hand.
        let err = parse_backend(b"d\x7f\xff\xff\xff").unwrap_err();
        assert_eq!(err.offset, 1);
        assert!(matches!(
            err.problem,
            ProtocolProblem::MessageTooLong { .. }
        ));
        assert!(err.to_string().contains("'d' CopyData"), "{err}");
        let err = parse_backend(b"d\xff\xff\xff\xff").unwrap_err();
        assert!(matches!(
            err.problem,
            ProtocolProblem::LengthTooShort { length: -1 }
        ));
        let err = parse_backend(b"Z\0\0\0\x03").unwrap_err();
        assert!(matches!(
            err.problem,
            ProtocolProblem::LengthTooShort { length: 3 }
        ));
    }

    #[test]
    fn unknown_type_is_rejected_at_once() {
        let err = parse_backend(b"x").unwrap_err();
        assert_eq!(err.offset, 0);
        assert_eq!(err.problem, ProtocolProblem::UnknownMessageType);
        // The first byte of an HTTP reply, say.
        assert!(parse_backend(b"HTTP/1.1 400").is_err());
    }

    #[test]
    fn errors_say_where() {
        // DataRow with one column whose length runs past the end.
        let bytes = b"D\0\0\0\x0a\0\x01\0\0\0\x09";
        let err = parse_backend(bytes).unwrap_err();
        assert_eq!(err.offset, 11);
        assert_eq!(
            err.to_string(),
            "invalid message from the server ('D' DataRow) at byte 11: column value needs 9 \
             bytes but the message has only 0 left"
        );
        // Negative column length other than -1.
        let err = parse_backend(b"D\0\0\0\x0a\0\x01\xff\xff\xff\xfe").unwrap_err();
        assert_eq!(err.offset, 7);
        // ReadyForQuery with trailing bytes.
        let err = parse_backend(b"Z\0\0\0\x06IX").unwrap_err();
        assert_eq!(err.problem, ProtocolProblem::TrailingBytes { count: 1 });
        assert_eq!(err.offset, 6);
        // Unknown authentication code.
        let err = parse_backend(b"R\0\0\0\x08\0\0\0\x06").unwrap_err();
        assert_eq!(
            err.problem,
            ProtocolProblem::UnknownAuthentication { code: 6 }
        );
        // Unterminated string.
        let err = parse_backend(b"C\0\0\0\x08SELE").unwrap_err();
        assert!(matches!(
            err.problem,
            ProtocolProblem::UnterminatedString { .. }
        ));
    }

    #[test]
    fn take_backend_leaves_the_buffer_alone_on_error() {
        let mut buf = BytesMut::from(&b"Z\0\0\0\x05IZ\0\0\0\x05QZ"[..]);
        assert_eq!(
            take_backend(&mut buf),
            Ok(Some(BackendMessage::ReadyForQuery(TransactionStatus::Idle)))
        );
        let before = buf.clone();
        assert!(take_backend(&mut buf).is_err());
        assert_eq!(buf, before);
    }

    #[test]
    fn frontend_builders_reject_nul() {
        let mut out = BytesMut::new();
        assert!(frontend::query("a\0b", &mut out).is_err());
        assert!(frontend::password(b"a\0b", &mut out).is_err());
        let mode = frontend::ReplicationMode::Physical;
        let s = frontend::Startup {
            user: "x\0",
            mode: &mode,
            application_name: None,
            options: None,
        };
        assert!(frontend::startup(&s, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn startup_asks_for_a_physical_walsender() {
        let mut out = BytesMut::new();
        let mode = frontend::ReplicationMode::Physical;
        frontend::startup(
            &frontend::Startup {
                user: "postgres",
                mode: &mode,
                application_name: Some("walcore"),
                options: None,
            },
            &mut out,
        )
        .unwrap();
        let expected: &[u8] = b"\0\x03\0\0user\0postgres\0replication\0true\0\
            application_name\0walcore\0client_encoding\0UTF8\0\0";
        assert_eq!(&out[4..], expected);
        assert_eq!(
            u32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize,
            out.len()
        );
    }

    fn any_bytes(max: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
    }

    fn any_text() -> impl Strategy<Value = String> {
        "[^\u{0}]{0,12}"
    }

    fn any_auth() -> impl Strategy<Value = Authentication> {
        prop_oneof![
            Just(Authentication::Ok),
            Just(Authentication::KerberosV5),
            Just(Authentication::CleartextPassword),
            any::<[u8; 4]>().prop_map(|salt| Authentication::Md5Password { salt }),
            Just(Authentication::Gss),
            any_bytes(16).prop_map(Authentication::GssContinue),
            Just(Authentication::Sspi),
            proptest::collection::vec("[^\u{0}]{1,12}", 0..3)
                .prop_map(|mechanisms| Authentication::Sasl { mechanisms }),
            any_bytes(16).prop_map(Authentication::SaslContinue),
            any_bytes(16).prop_map(Authentication::SaslFinal),
        ]
    }

    fn any_copy() -> impl Strategy<Value = CopyResponse> {
        (any::<u8>(), proptest::collection::vec(any::<i16>(), 0..4)).prop_map(
            |(format, column_formats)| CopyResponse {
                format,
                column_formats,
            },
        )
    }

    fn any_fields() -> impl Strategy<Value = ErrorFields> {
        proptest::collection::vec((1u8..=255, any_text()), 0..5).prop_map(ErrorFields)
    }

    fn any_message() -> impl Strategy<Value = BackendMessage> {
        prop_oneof![
            any_auth().prop_map(BackendMessage::Authentication),
            (any_text(), any_text())
                .prop_map(|(name, value)| BackendMessage::ParameterStatus { name, value }),
            (any::<i32>(), any::<i32>()).prop_map(|(process_id, secret_key)| {
                BackendMessage::BackendKeyData {
                    process_id,
                    secret_key,
                }
            }),
            prop_oneof![
                Just(TransactionStatus::Idle),
                Just(TransactionStatus::InTransaction),
                Just(TransactionStatus::Failed)
            ]
            .prop_map(BackendMessage::ReadyForQuery),
            proptest::collection::vec(
                (
                    any_text(),
                    any::<u32>(),
                    any::<i16>(),
                    any::<u32>(),
                    any::<i16>(),
                    any::<i32>(),
                    any::<i16>()
                ),
                0..4
            )
            .prop_map(|fields| BackendMessage::RowDescription(
                fields
                    .into_iter()
                    .map(
                        |(
                            name,
                            table_oid,
                            column_id,
                            type_oid,
                            type_size,
                            type_modifier,
                            format,
                        )| {
                            FieldDescription {
                                name,
                                table_oid,
                                column_id,
                                type_oid,
                                type_size,
                                type_modifier,
                                format,
                            }
                        }
                    )
                    .collect()
            )),
            proptest::collection::vec(proptest::option::of(any_bytes(12)), 0..5)
                .prop_map(BackendMessage::DataRow),
            any_text().prop_map(BackendMessage::CommandComplete),
            Just(BackendMessage::EmptyQueryResponse),
            any_fields().prop_map(BackendMessage::ErrorResponse),
            any_fields().prop_map(BackendMessage::NoticeResponse),
            any_copy().prop_map(BackendMessage::CopyInResponse),
            any_copy().prop_map(BackendMessage::CopyOutResponse),
            any_copy().prop_map(BackendMessage::CopyBothResponse),
            any_bytes(64).prop_map(BackendMessage::CopyData),
            Just(BackendMessage::CopyDone),
            (any::<i32>(), any_text(), any_text()).prop_map(|(process_id, channel, payload)| {
                BackendMessage::NotificationResponse {
                    process_id,
                    channel,
                    payload,
                }
            }),
            (any::<i32>(), proptest::collection::vec(any_text(), 0..3)).prop_map(
                |(newest_minor, unrecognized)| BackendMessage::NegotiateProtocolVersion {
                    newest_minor,
                    unrecognized
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_cleanly(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            message_stream_property(&data);
        }

        #[test]
        fn any_message_sequence_with_garbage_never_panics(
            messages in proptest::collection::vec(any_message(), 0..6),
            garbage in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut bytes = BytesMut::new();
            for m in &messages {
                m.encode(&mut bytes);
            }
            bytes.extend_from_slice(&garbage);
            message_stream_property(&bytes);
        }

        #[test]
        fn encode_parse_round_trip(messages in proptest::collection::vec(any_message(), 1..6)) {
            let mut bytes = BytesMut::new();
            for m in &messages {
                m.encode(&mut bytes);
            }
            let parsed = message_stream_property(&bytes);
            prop_assert_eq!(parsed, messages);
        }

        #[test]
        fn every_prefix_of_a_message_needs_more(m in any_message()) {
            let bytes = encoded(&m);
            for cut in 0..bytes.len() {
                prop_assert_eq!(parse_backend(&bytes[..cut]), Ok(None));
            }
            prop_assert_eq!(parse_backend(&bytes), Ok(Some((m, bytes.len()))));
        }
    }
}
