//! An async replication connection (tokio): socket, startup, authentication, and the simple
//! query protocol that replication commands use.
//!
//! The connection only moves bytes: it fills a buffer from the socket and hands it to the
//! sans-IO parser of `message.rs`, and it writes what the builders of `message::frontend`
//! produce. Every read has a time limit, so a server that goes silent is an error
//! ([`ReplicationError::Timeout`]), never a hang; after such an error, or a protocol error, the
//! connection refuses further use ([`ReplicationError::Unusable`]) because its place in the
//! conversation is lost.
//!
//! TLS (rustls, see `conn/tls.rs`) follows libpq: on TCP only, never on Unix sockets; `sslmode`
//! decides whether to ask for it (an SSLRequest) and what to do when the server says no, and
//! the root certificates present decide how much of the server's certificate is checked. Under
//! `allow` and `prefer`, a session the server refuses during authentication is tried once more
//! with the other choice, as libpq does. SCRAM runs without channel binding over TLS too
//! (`SCRAM-SHA-256`, never `-PLUS`), which servers accept.
//!
//! What it does not do (yet): GSSAPI, Kerberos, SSPI, SCRAM channel binding, cancel requests,
//! direct TLS negotiation (`sslnegotiation=direct`; the SSLRequest works with every server).

mod tls;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;
use tracing::{debug, info, warn};

use crate::pg::{Lsn, TimelineId};

use super::conninfo::{ConnConfig, Host, PasswordSource, SslMode, Target};
use super::error::{ConnectAttempt, ReplicationError, ServerError};
use super::message::frontend::{self, ReplicationMode, Startup};
use super::message::{
    Authentication, BackendMessage, ErrorFields, FieldDescription, message_name, take_backend,
};
use super::pgpass;

/// How long opening a connection may take (socket, startup, authentication) when the
/// connection string sets no `connect_timeout`: long enough for a server busy forking, short
/// enough that an archiver notices a dead host within a minute.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the server may stay silent in the middle of a reply. PostgreSQL sends something at
/// least every few seconds while it works on a reply (and a base backup's data flows
/// continuously), so a minute of silence means a dead server or network.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How much room to make in the read buffer before each read: two of the 32 KiB CopyData
/// messages of a base backup, so that a read usually brings whole messages.
const READ_CHUNK: usize = 64 * 1024;

/// How to connect, beyond the connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Physical (`replication=true`, the default) or logical replication.
    pub mode: ReplicationMode,
    /// The time limit for opening the connection when the connection string has no
    /// `connect_timeout`.
    pub connect_timeout: Duration,
    /// The time limit for each wait for the server while a reply is expected.
    pub read_timeout: Duration,
    /// `application_name` when the connection string and `PGAPPNAME` give none.
    pub fallback_application_name: Option<String>,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            mode: ReplicationMode::Physical,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            fallback_application_name: Some("walcore".to_owned()),
        }
    }
}

/// The socket: Unix, TCP, or TLS over TCP.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read_buf(buf).await,
            Stream::Tcp(s) => s.read_buf(buf).await,
            Stream::Tls(s) => s.read_buf(buf).await,
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.write_all(bytes).await,
            Stream::Tcp(s) => s.write_all(bytes).await,
            Stream::Tls(s) => {
                // TLS records may wait in the session's buffer until flushed.
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown().await,
            Stream::Tcp(s) => s.shutdown().await,
            // Sends close_notify, then shuts the socket down.
            Stream::Tls(s) => s.shutdown().await,
        }
    }

    /// What TLS negotiated, when the stream is TLS.
    fn tls_session(&self) -> Option<TlsSession> {
        let Stream::Tls(s) = self else {
            return None;
        };
        let (_, session) = s.get_ref();
        let protocol = match session.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
            Some(other) => format!("{other:?}"),
            None => "?".to_owned(),
        };
        let cipher_suite = session
            .negotiated_cipher_suite()
            .map_or_else(|| "?".to_owned(), |s| format!("{:?}", s.suite()));
        Some(TlsSession {
            protocol,
            cipher_suite,
        })
    }
}

/// What the TLS handshake of a connection negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSession {
    /// The protocol version, as PostgreSQL's `pg_stat_ssl.version` names it (`TLSv1.3`).
    pub protocol: String,
    /// The cipher suite, as rustls names it (`TLS13_AES_256_GCM_SHA384`).
    pub cipher_suite: String,
}

/// The result of IDENTIFY_SYSTEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    /// The cluster's system identifier (`pg_control_system().system_identifier`).
    pub system_id: u64,
    /// The server's current timeline.
    pub timeline: TimelineId,
    /// The current WAL flush position.
    pub xlogpos: Lsn,
    /// The database of a logical replication connection; `None` for physical replication.
    pub dbname: Option<String>,
}

/// One row of a result, values in text format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    columns: Arc<[FieldDescription]>,
    values: Vec<Option<Bytes>>,
}

impl Row {
    /// The columns' descriptions.
    pub fn columns(&self) -> &[FieldDescription] {
        &self.columns
    }

    /// The raw value of column `index`: `None` if NULL or out of range.
    pub fn raw(&self, index: usize) -> Option<&[u8]> {
        self.values.get(index).and_then(|v| v.as_deref())
    }

    /// The text of the column named `name`: `Ok(None)` if NULL; an error message if there is no
    /// such column or its value is not UTF-8.
    pub fn text(&self, name: &str) -> Result<Option<&str>, String> {
        let index = self
            .columns
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| format!("the reply has no column \"{name}\""))?;
        match self.values.get(index).and_then(|v| v.as_deref()) {
            None => Ok(None),
            Some(bytes) => std::str::from_utf8(bytes)
                .map(Some)
                .map_err(|_| format!("column \"{name}\" is not valid UTF-8")),
        }
    }
}

/// A replication connection to PostgreSQL.
#[derive(Debug)]
pub struct ReplicationConnection {
    stream: Stream,
    /// The socket path or `host:port`, for messages.
    server: String,
    user: String,
    /// Bytes received and not yet parsed.
    read: BytesMut,
    /// Bytes to send.
    write: BytesMut,
    /// Bytes parsed so far, so that protocol errors give offsets in the whole stream.
    received: u64,
    parameters: BTreeMap<String, String>,
    backend_key: Option<(i32, i32)>,
    read_timeout: Duration,
    /// Set when the conversation's state is lost: every later call fails.
    broken: bool,
}

/// How one attempt on one address negotiates TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Negotiation {
    /// No SSLRequest: plain text (Unix sockets, `disable`, the first try of `allow`, the second
    /// of `prefer`).
    Plain,
    /// Ask; go on in plain text when the server says no or TLS fails (`prefer`).
    Prefer,
    /// Ask; fail when the server says no or TLS fails (`require` and stricter, the second try
    /// of `allow`).
    Require,
}

/// Why one attempt on one address gave no connection.
enum AttemptError {
    /// The socket could not be opened (or not within the connect timeout): try the next
    /// address.
    Unreachable(ConnectAttempt),
    /// The server answered the SSLRequest with "no" and TLS is required.
    TlsRefused(ReplicationError),
    /// The server refused the session during authentication (an ErrorResponse before
    /// AuthenticationOk: pg_hba.conf, a wrong password): libpq's cue, under `allow` and
    /// `prefer`, to try once more with the other TLS choice.
    Refused {
        error: ReplicationError,
        /// Whether the refused session was over TLS.
        tls: bool,
    },
    /// Final.
    Fatal(ReplicationError),
}

impl ReplicationConnection {
    /// Connects to the first of `config`'s addresses that accepts a connection, then starts up
    /// and authenticates. Addresses are tried in order while the socket cannot be opened; once
    /// one is open, any failure (TLS, authentication, permissions) is final, as in libpq, except
    /// for libpq's second try on the same address under `sslmode=allow` and `prefer` when the
    /// server refuses the session during authentication (see [`SslMode`]).
    pub async fn connect(
        config: &ConnConfig,
        options: &ConnectOptions,
    ) -> Result<ReplicationConnection, ReplicationError> {
        let limit = config.connect_timeout.unwrap_or(options.connect_timeout);
        let mut attempts = Vec::new();
        for target in &config.targets {
            let first = match (&target.host, config.sslmode) {
                (Host::Socket(_), _) | (_, SslMode::Disable | SslMode::Allow) => Negotiation::Plain,
                (_, SslMode::Prefer) => Negotiation::Prefer,
                _ => Negotiation::Require,
            };
            let (refusal, refused_tls) = match attempt(config, options, target, first, limit).await
            {
                Ok(conn) => return Ok(conn),
                Err(AttemptError::Unreachable(a)) => {
                    debug!("{a}");
                    attempts.push(a);
                    continue;
                }
                Err(AttemptError::TlsRefused(e) | AttemptError::Fatal(e)) => return Err(e),
                Err(AttemptError::Refused { error, tls }) => (error, tls),
            };
            let retry = match (config.sslmode, refused_tls, &target.host) {
                (SslMode::Allow, false, Host::Tcp(_)) => Negotiation::Require,
                (SslMode::Prefer, true, _) => Negotiation::Plain,
                _ => return Err(refusal),
            };
            info!(
                "{refusal}; trying again {} (sslmode={})",
                if refused_tls {
                    "without TLS"
                } else {
                    "with TLS"
                },
                config.sslmode
            );
            return match attempt(config, options, target, retry, limit).await {
                Ok(conn) => Ok(conn),
                // The server does not do TLS (allow) or went away: its refusal stands.
                Err(AttemptError::TlsRefused(_) | AttemptError::Unreachable(_)) => Err(refusal),
                Err(AttemptError::Refused { error, .. } | AttemptError::Fatal(error)) => {
                    Err(after_refusal(error, &refusal, refused_tls))
                }
            };
        }
        Err(ReplicationError::Connect { attempts })
    }

    /// What the TLS handshake negotiated; `None` for a connection without TLS.
    pub fn tls_session(&self) -> Option<TlsSession> {
        self.stream.tls_session()
    }

    /// The server, as a socket path or `host:port`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The user this connection authenticated as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The latest value the server reported for a run-time parameter (ParameterStatus).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// `server_version`, as the server reports it (`15.4 (Debian 15.4-1)`).
    pub fn server_version(&self) -> Option<&str> {
        self.parameter("server_version")
    }

    /// The server's version as a number like `server_version_num` (150004 for 15.4).
    pub fn server_version_num(&self) -> Option<u32> {
        self.server_version().and_then(parse_version_num)
    }

    /// `integer_datetimes` (always on since PostgreSQL 10; WAL and timestamps in the stream
    /// depend on it).
    pub fn integer_datetimes(&self) -> Option<bool> {
        self.parameter("integer_datetimes").map(|v| v == "on")
    }

    /// The backend process id, for `pg_stat_replication` and the server log.
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_key.map(|(pid, _)| pid)
    }

    /// The current read time limit.
    pub fn read_timeout(&self) -> Duration {
        self.read_timeout
    }

    /// Changes the read time limit.
    pub fn set_read_timeout(&mut self, limit: Duration) {
        self.read_timeout = limit;
    }

    /// Runs a replication command (or, on a logical connection, SQL) with the simple query
    /// protocol and returns the rows of all its result sets. Fails with the server's error if
    /// it reports one; a command that starts a COPY is refused (use the streaming APIs).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, ReplicationError> {
        let doing = format!("running {}", command_name(sql));
        self.send_query(sql, &doing).await?;
        let mut columns: Option<Arc<[FieldDescription]>> = None;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.recv(self.read_timeout, &doing).await? {
                BackendMessage::RowDescription(fields) => columns = Some(fields.into()),
                BackendMessage::DataRow(values) => {
                    let Some(columns) = &columns else {
                        return Err(self.unexpected(&doing, "DataRow", "RowDescription first"));
                    };
                    if values.len() != columns.len() {
                        self.broken = true;
                        return Err(self.invalid(
                            &doing,
                            format!(
                                "a row has {} values for {} columns",
                                values.len(),
                                columns.len()
                            ),
                        ));
                    }
                    rows.push(Row {
                        columns: columns.clone(),
                        values,
                    });
                }
                BackendMessage::CommandComplete(_) | BackendMessage::EmptyQueryResponse => {
                    columns = None;
                }
                BackendMessage::ErrorResponse(fields) => {
                    let e = self.server_error(&doing, &fields);
                    if e.server_error().is_some_and(ServerError::ends_session) {
                        self.broken = true;
                        return Err(e);
                    }
                    // The server sends ReadyForQuery after an error; wait for it so that the
                    // connection stays usable.
                    error = Some(e);
                }
                BackendMessage::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                BackendMessage::CopyOutResponse(_)
                | BackendMessage::CopyBothResponse(_)
                | BackendMessage::CopyInResponse(_) => {
                    self.broken = true;
                    return Err(self.invalid(
                        &doing,
                        "the command started a COPY stream, which simple_query cannot \
                         receive; use the streaming API for it"
                            .to_owned(),
                    ));
                }
                other => {
                    return Err(self.unexpected(
                        &doing,
                        message_name(other.tag()),
                        "rows, CommandComplete or ReadyForQuery",
                    ));
                }
            }
        }
    }

    /// IDENTIFY_SYSTEM: the cluster's system identifier, the current timeline and WAL flush
    /// position.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, ReplicationError> {
        let doing = "running IDENTIFY_SYSTEM";
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let [row] = rows.as_slice() else {
            return Err(self.invalid(doing, format!("expected one row, got {}", rows.len())));
        };
        let field = |name: &str| -> Result<&str, ReplicationError> {
            row.text(name)
                .map_err(|detail| self.invalid(doing, detail))?
                .ok_or_else(|| self.invalid(doing, format!("column \"{name}\" is NULL")))
        };
        let system_id = field("systemid")?;
        let system_id = system_id.parse::<u64>().map_err(|_| {
            self.invalid(
                doing,
                format!("system identifier {system_id:?} is not a number"),
            )
        })?;
        let timeline = field("timeline")?;
        let timeline = timeline
            .parse::<u32>()
            .ok()
            .filter(|&t| t > 0)
            .ok_or_else(|| self.invalid(doing, format!("timeline {timeline:?} is not valid")))?;
        let xlogpos = field("xlogpos")?;
        let xlogpos = xlogpos
            .parse::<Lsn>()
            .map_err(|e| self.invalid(doing, e.to_string()))?;
        let dbname = row
            .text("dbname")
            .map_err(|detail| self.invalid(doing, detail))?
            .map(str::to_owned);
        Ok(SystemInfo {
            system_id,
            timeline: TimelineId(timeline),
            xlogpos,
            dbname,
        })
    }

    /// Says goodbye (Terminate) and closes the socket.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        frontend::terminate(&mut self.write);
        let sent = self.flush("closing the connection").await;
        let _ = self.stream.shutdown().await;
        sent
    }

    // ---- for the streaming commands (basebackup.rs) and the methods above ----

    /// Fails if the connection is unusable.
    pub(crate) fn check_usable(&self) -> Result<(), ReplicationError> {
        if self.broken {
            Err(ReplicationError::Unusable {
                server: self.server.clone(),
            })
        } else {
            Ok(())
        }
    }

    /// Marks the connection unusable (a stream was abandoned or went wrong).
    pub(crate) fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// Sends bytes already framed as messages (CopyData, CopyDone).
    pub(crate) async fn send_raw(
        &mut self,
        frames: &[u8],
        doing: &str,
    ) -> Result<(), ReplicationError> {
        self.check_usable()?;
        self.write.extend_from_slice(frames);
        self.flush(doing).await
    }

    /// Sends a Query message.
    pub(crate) async fn send_query(
        &mut self,
        sql: &str,
        doing: &str,
    ) -> Result<(), ReplicationError> {
        self.check_usable()?;
        frontend::query(sql, &mut self.write)?;
        self.flush(doing).await
    }

    /// The next message from the server, waiting at most `limit` for each piece of it.
    /// Notices are logged and ParameterStatus recorded here; everything else is returned.
    pub(crate) async fn recv(
        &mut self,
        limit: Duration,
        doing: &str,
    ) -> Result<BackendMessage, ReplicationError> {
        self.check_usable()?;
        loop {
            let before = self.read.len();
            match take_backend(&mut self.read) {
                Ok(Some(message)) => {
                    self.received += (before - self.read.len()) as u64;
                    match message {
                        BackendMessage::NoticeResponse(fields) => self.log_notice(&fields),
                        BackendMessage::ParameterStatus { name, value } => {
                            self.parameters.insert(name, value);
                        }
                        message => return Ok(message),
                    }
                }
                Ok(None) => self.fill(limit, doing).await?,
                Err(e) => {
                    self.broken = true;
                    return Err(ReplicationError::Protocol {
                        server: self.server.clone(),
                        doing: doing.to_owned(),
                        source: e.with_base(self.received),
                    });
                }
            }
        }
    }

    /// Whether bytes have arrived that are not yet parsed: another message may be ready
    /// without waiting.
    pub fn has_buffered(&self) -> bool {
        !self.read.is_empty()
    }

    /// The error for an ErrorResponse.
    pub(crate) fn server_error(&self, doing: &str, fields: &ErrorFields) -> ReplicationError {
        ReplicationError::Server {
            server: self.server.clone(),
            doing: doing.to_owned(),
            error: Box::new(ServerError::from_fields(fields)),
        }
    }

    /// The error for a reply whose content is unusable.
    pub(crate) fn invalid(&self, doing: &str, detail: String) -> ReplicationError {
        ReplicationError::InvalidReply {
            server: self.server.clone(),
            doing: doing.to_owned(),
            detail,
        }
    }

    /// The error for a message that does not belong here; the conversation is lost.
    pub(crate) fn unexpected(
        &mut self,
        doing: &str,
        got: &str,
        expected: &str,
    ) -> ReplicationError {
        self.broken = true;
        self.invalid(
            doing,
            format!("unexpected {got} from the server (expected {expected})"),
        )
    }

    // ---- internals ----

    async fn send_startup(
        &mut self,
        config: &ConnConfig,
        options: &ConnectOptions,
    ) -> Result<(), ReplicationError> {
        let application_name = config
            .application_name
            .as_deref()
            .or(options.fallback_application_name.as_deref());
        frontend::startup(
            &Startup {
                user: &config.user,
                mode: &options.mode,
                application_name,
                options: config.options.as_deref(),
            },
            &mut self.write,
        )?;
        self.flush("sending the startup message").await
    }

    /// After authentication: BackendKeyData, then ReadyForQuery.
    async fn finish_startup(&mut self, config: &ConnConfig) -> Result<(), ReplicationError> {
        let doing = "starting the session";
        loop {
            match self.recv(self.read_timeout, doing).await? {
                BackendMessage::BackendKeyData {
                    process_id,
                    secret_key,
                } => self.backend_key = Some((process_id, secret_key)),
                BackendMessage::ReadyForQuery(_) => return Ok(()),
                BackendMessage::ErrorResponse(fields) => {
                    // "must be superuser or replication role to start walsender", "database
                    // does not exist", "the database system is starting up", ...
                    self.broken = true;
                    return Err(self.server_error(
                        &format!("starting a replication session as \"{}\"", config.user),
                        &fields,
                    ));
                }
                BackendMessage::NegotiateProtocolVersion { .. } => {}
                other => {
                    return Err(self.unexpected(
                        doing,
                        message_name(other.tag()),
                        "BackendKeyData or ReadyForQuery",
                    ));
                }
            }
        }
    }

    async fn authenticate(
        &mut self,
        config: &ConnConfig,
        options: &ConnectOptions,
        target: &Target,
    ) -> Result<(), ReplicationError> {
        let doing = format!("authenticating as \"{}\"", config.user);
        // The SCRAM exchange in progress, and whether the server proved it knows the password.
        let mut scram: Option<ScramSha256> = None;
        let mut server_proved = false;
        loop {
            let auth = match self.recv(self.read_timeout, &doing).await? {
                BackendMessage::Authentication(auth) => auth,
                BackendMessage::ErrorResponse(fields) => {
                    // "password authentication failed for user", "no pg_hba.conf entry", ...
                    self.broken = true;
                    return Err(self.server_error(&doing, &fields));
                }
                BackendMessage::NegotiateProtocolVersion { .. } => continue,
                other => {
                    return Err(self.unexpected(
                        &doing,
                        message_name(other.tag()),
                        "an authentication request",
                    ));
                }
            };
            match auth {
                Authentication::Ok => {
                    if scram.is_some() && !server_proved {
                        self.broken = true;
                        return Err(self.auth_error(
                            "the server accepted the login without completing SCRAM (it never \
                             proved that it knows the password, so it may not be the server it \
                             claims to be)",
                        ));
                    }
                    return Ok(());
                }
                Authentication::CleartextPassword => {
                    let password = self.password(config, options, target)?;
                    frontend::password(password.as_bytes(), &mut self.write)?;
                    self.flush(&doing).await?;
                }
                Authentication::Md5Password { salt } => {
                    let password = self.password(config, options, target)?;
                    let hash = md5_hash(config.user.as_bytes(), password.as_bytes(), salt);
                    frontend::password(hash.as_bytes(), &mut self.write)?;
                    self.flush(&doing).await?;
                }
                Authentication::Sasl { mechanisms } => {
                    if scram.is_some() {
                        return Err(self.unexpected(
                            &doing,
                            "a second SASL request",
                            "SASLContinue",
                        ));
                    }
                    if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                        self.broken = true;
                        return Err(ReplicationError::Unsupported {
                            server: self.server.clone(),
                            what: format!(
                                "the server offers only the SASL mechanisms {mechanisms:?}; \
                                 walcore supports SCRAM-SHA-256 (without channel binding)"
                            ),
                        });
                    }
                    let password = self.password(config, options, target)?;
                    // No channel binding, also over TLS: the client says it does not support
                    // it ("n"), which servers accept whatever they offer.
                    let exchange =
                        ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        "SCRAM-SHA-256",
                        exchange.message(),
                        &mut self.write,
                    )?;
                    scram = Some(exchange);
                    self.flush(&doing).await?;
                }
                Authentication::SaslContinue(data) => {
                    let Some(exchange) = scram.as_mut() else {
                        return Err(self.unexpected(
                            &doing,
                            "SASLContinue",
                            "a SASL request first",
                        ));
                    };
                    if let Err(e) = exchange.update(&data) {
                        self.broken = true;
                        return Err(self
                            .auth_error(&format!("invalid SCRAM challenge from the server: {e}")));
                    }
                    // update() succeeded, so the exchange holds the client-final message.
                    frontend::sasl_response(exchange.message(), &mut self.write);
                    self.flush(&doing).await?;
                }
                Authentication::SaslFinal(data) => {
                    let Some(exchange) = scram.as_mut() else {
                        return Err(self.unexpected(&doing, "SASLFinal", "a SASL request first"));
                    };
                    if let Err(e) = exchange.finish(&data) {
                        self.broken = true;
                        return Err(self.auth_error(&format!(
                            "the server's SCRAM signature is wrong ({e}): it does not know the \
                             password, so it may not be the server it claims to be"
                        )));
                    }
                    server_proved = true;
                }
                Authentication::KerberosV5
                | Authentication::Gss
                | Authentication::GssContinue(_)
                | Authentication::Sspi => {
                    self.broken = true;
                    return Err(ReplicationError::Unsupported {
                        server: self.server.clone(),
                        what: "the server asks for Kerberos/GSSAPI/SSPI authentication, which \
                               walcore does not support; use scram-sha-256 in pg_hba.conf"
                            .to_owned(),
                    });
                }
            }
        }
    }

    fn auth_error(&self, reason: &str) -> ReplicationError {
        ReplicationError::Authentication {
            server: self.server.clone(),
            user: self.user.clone(),
            reason: reason.to_owned(),
        }
    }

    /// The password for `target`: given, or from the password file.
    fn password(
        &self,
        config: &ConnConfig,
        options: &ConnectOptions,
        target: &Target,
    ) -> Result<String, ReplicationError> {
        let missing = |passfile: String| ReplicationError::PasswordRequired {
            server: self.server.clone(),
            user: config.user.clone(),
            passfile,
        };
        match &config.password {
            PasswordSource::Given(password) => Ok(password.clone()),
            PasswordSource::File(path) => {
                // libpq matches the database field against "replication" for physical
                // replication connections.
                let database = match &options.mode {
                    ReplicationMode::Physical => "replication",
                    ReplicationMode::Logical { database } => database.as_str(),
                };
                pgpass::read_password(
                    path,
                    &target.passfile_host(),
                    &target.port.to_string(),
                    database,
                    &config.user,
                )
                .ok_or_else(|| missing(path.display().to_string()))
            }
            PasswordSource::None => Err(missing("(none: HOME is not set)".to_owned())),
        }
    }

    fn log_notice(&self, fields: &ErrorFields) {
        let severity = fields.severity().unwrap_or("NOTICE");
        let message = fields.message().unwrap_or("");
        match severity {
            "WARNING" => warn!(server = %self.server, "{severity}: {message}"),
            "NOTICE" | "INFO" => info!(server = %self.server, "{severity}: {message}"),
            _ => debug!(server = %self.server, "{severity}: {message}"),
        }
    }

    async fn fill(&mut self, limit: Duration, doing: &str) -> Result<(), ReplicationError> {
        if self.read.capacity() - self.read.len() < READ_CHUNK {
            self.read.reserve(READ_CHUNK);
        }
        let outcome = tokio::time::timeout(limit, self.stream.read_buf(&mut self.read)).await;
        let failure = match outcome {
            Ok(Ok(0)) => ReplicationError::Closed {
                server: self.server.clone(),
                doing: doing.to_owned(),
            },
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(source)) => self.io_failure(doing, source),
            Err(_) => ReplicationError::Timeout {
                server: self.server.clone(),
                doing: doing.to_owned(),
                waited: limit,
            },
        };
        self.broken = true;
        Err(failure)
    }

    /// A failed read or write: the server hung up, TLS failed (an alert from the server, which
    /// TLS 1.3 servers send after the handshake when they reject the client's certificate), or
    /// another I/O error.
    fn io_failure(&self, doing: &str, source: std::io::Error) -> ReplicationError {
        if let Some(error) = tls::rustls_error(&source) {
            ReplicationError::Tls {
                server: self.server.clone(),
                detail: format!("{doing}: {}", tls::describe(error)),
            }
        } else if is_disconnect(&source) {
            ReplicationError::Closed {
                server: self.server.clone(),
                doing: doing.to_owned(),
            }
        } else {
            ReplicationError::Io {
                server: self.server.clone(),
                doing: doing.to_owned(),
                source,
            }
        }
    }

    async fn flush(&mut self, doing: &str) -> Result<(), ReplicationError> {
        let bytes = std::mem::take(&mut self.write);
        let limit = self.read_timeout;
        let outcome = tokio::time::timeout(limit, self.stream.write_all(&bytes)).await;
        // Keep the buffer's allocation for the next message.
        self.write = bytes;
        self.write.clear();
        let failure = match outcome {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(source)) => self.io_failure(doing, source),
            Err(_) => ReplicationError::Timeout {
                server: self.server.clone(),
                doing: format!("{doing} (the server does not read what we send)"),
                waited: limit,
            },
        };
        self.broken = true;
        Err(failure)
    }
}

/// One try on one address: the socket (and TLS, as `negotiation` says), startup and
/// authentication, each step within `limit`.
async fn attempt(
    config: &ConnConfig,
    options: &ConnectOptions,
    target: &Target,
    negotiation: Negotiation,
    limit: Duration,
) -> Result<ReplicationConnection, AttemptError> {
    let server = target.to_string();
    let stream = match tokio::time::timeout(limit, open_socket(target, config, negotiation)).await {
        Err(_) => {
            return Err(AttemptError::Unreachable(ConnectAttempt {
                address: server,
                unix_socket: target.socket_path().is_some(),
                error: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("timed out after {}s", limit.as_secs_f64()),
                ),
            }));
        }
        Ok(result) => result?,
    };
    let tls = matches!(stream, Stream::Tls(_));
    let mut conn = ReplicationConnection {
        stream,
        server: server.clone(),
        user: config.user.clone(),
        read: BytesMut::with_capacity(READ_CHUNK),
        write: BytesMut::new(),
        received: 0,
        parameters: BTreeMap::new(),
        backend_key: None,
        read_timeout: options.read_timeout.min(limit),
        broken: false,
    };
    let started = tokio::time::timeout(limit, async {
        conn.send_startup(config, options)
            .await
            .map_err(AttemptError::Fatal)?;
        conn.authenticate(config, options, target)
            .await
            .map_err(|e| match e {
                e @ ReplicationError::Server { .. } => AttemptError::Refused { error: e, tls },
                e => AttemptError::Fatal(e),
            })?;
        conn.finish_startup(config)
            .await
            .map_err(AttemptError::Fatal)
    })
    .await;
    match started {
        Err(_) => Err(AttemptError::Fatal(ReplicationError::Timeout {
            server,
            doing: format!("starting up and authenticating as \"{}\"", config.user),
            waited: limit,
        })),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) => {
            conn.read_timeout = options.read_timeout;
            debug!(
                server = %conn.server,
                version = conn.server_version().unwrap_or("?"),
                tls = ?conn.tls_session(),
                "replication connection ready"
            );
            Ok(conn)
        }
    }
}

/// The error of libpq's second try, saying that it was one: the server's refusal of the first
/// try stays in the message.
fn after_refusal(
    mut error: ReplicationError,
    first: &ReplicationError,
    first_tls: bool,
) -> ReplicationError {
    if let (ReplicationError::Server { doing, .. }, Some(refused)) =
        (&mut error, first.server_error())
    {
        *doing = format!(
            "{doing} {}, after the server refused the session {} ({refused})",
            if first_tls { "without TLS" } else { "over TLS" },
            if first_tls { "over TLS" } else { "without TLS" },
        );
    } else {
        warn!("{first}");
    }
    error
}

/// Opens the socket to `target`, negotiating TLS on TCP as `negotiation` says.
async fn open_socket(
    target: &Target,
    config: &ConnConfig,
    negotiation: Negotiation,
) -> Result<Stream, AttemptError> {
    let address = target.to_string();
    let next = |unix_socket, error| {
        AttemptError::Unreachable(ConnectAttempt {
            address: address.clone(),
            unix_socket,
            error,
        })
    };
    let name = match &target.host {
        Host::Socket(_) => {
            // TLS never applies to Unix sockets (libpq never uses it on them).
            let path = target.socket_path().unwrap_or_default();
            return UnixStream::connect(&path)
                .await
                .map(Stream::Unix)
                .map_err(|e| next(true, e));
        }
        Host::Tcp(name) => name.as_str(),
    };
    let mut stream = tcp_connect(name, target.port)
        .await
        .map_err(|e| next(false, e))?;
    if negotiation == Negotiation::Plain {
        return Ok(Stream::Tcp(stream));
    }
    let sslmode = config.sslmode;
    let tls_error = |detail: String| ReplicationError::Tls {
        server: address.clone(),
        detail,
    };

    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    stream
        .write_all(&request)
        .await
        .map_err(|e| next(false, e))?;
    // One byte, read from the socket itself: anything the server (or someone in between) sent
    // after it stays in the socket and fails the handshake, instead of passing as if it had
    // been encrypted.
    let answer = stream.read_u8().await.map_err(|e| next(false, e))?;
    match answer {
        b'S' => {}
        b'N' if negotiation == Negotiation::Prefer => return Ok(Stream::Tcp(stream)),
        b'N' => {
            return Err(AttemptError::TlsRefused(tls_error(format!(
                "the server does not accept TLS (sslmode={sslmode}): turn ssl on in its \
                 postgresql.conf, or use sslmode=prefer (or disable) on a trusted network"
            ))));
        }
        other => {
            return Err(AttemptError::Fatal(ReplicationError::InvalidReply {
                server: address.clone(),
                doing: format!("negotiating TLS (sslmode={sslmode})"),
                detail: format!(
                    "the server answered the SSLRequest with byte 0x{other:02X} instead of \
                     'S' or 'N' (use sslmode=disable for servers that predate SSL)"
                ),
            }));
        }
    }

    // The files are read once the server has agreed, as libpq does; a broken one is reported
    // like a failed handshake.
    let failure = match tls::TlsClient::new(&config.ssl, sslmode, name) {
        Err(detail) => tls_error(detail),
        Ok(client) => match client.handshake(stream).await {
            Ok(tls) => {
                debug!(
                    server = %address,
                    verification = ?client.verification(),
                    "TLS handshake done"
                );
                return Ok(Stream::Tls(Box::new(tls)));
            }
            Err(e) => match tls::rustls_error(&e) {
                Some(error) => tls_error(client.explain(error)),
                None if negotiation == Negotiation::Prefer => {
                    tls_error(format!("the TLS handshake failed: {e}"))
                }
                None if is_disconnect(&e) => {
                    return Err(AttemptError::Fatal(ReplicationError::Closed {
                        server: address.clone(),
                        doing: "negotiating TLS".to_owned(),
                    }));
                }
                None => {
                    return Err(AttemptError::Fatal(ReplicationError::Io {
                        server: address.clone(),
                        doing: "negotiating TLS".to_owned(),
                        source: e,
                    }));
                }
            },
        },
    };
    if negotiation != Negotiation::Prefer {
        return Err(AttemptError::Fatal(failure));
    }
    // prefer: what libpq does when TLS fails, a new connection in plain text.
    warn!("{failure}; connecting again without TLS (sslmode=prefer)");
    tcp_connect(name, target.port)
        .await
        .map(Stream::Tcp)
        .map_err(|e| next(false, e))
}

/// A TCP connection to `name:port` (every address the name resolves to, in turn), without
/// Nagle's delay.
async fn tcp_connect(name: &str, port: u16) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect((name, port)).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Errors that mean the server went away (crashed, was killed, or closed on us).
fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof
    )
}

/// The first word of a command, for messages (never the whole text: it may hold a label).
fn command_name(sql: &str) -> String {
    let word: String = sql
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(40)
        .collect();
    if word.is_empty() {
        "a query".to_owned()
    } else {
        word
    }
}

/// `server_version_num` from `server_version`: 150004 for "15.4 (Debian 15.4-1)", 160000 for
/// "16beta1", 90624 for "9.6.24".
pub fn parse_version_num(version: &str) -> Option<u32> {
    fn number(s: &str) -> (Option<u32>, &str) {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        (s[..end].parse().ok(), &s[end..])
    }
    let (major, rest) = number(version.trim_start());
    let major = major?;
    let (minor, rest) = match rest.strip_prefix('.') {
        Some(r) => number(r),
        None => (None, rest),
    };
    if major >= 10 {
        return major
            .checked_mul(10000)?
            .checked_add(minor.unwrap_or(0).min(9999));
    }
    let (patch, _) = match rest.strip_prefix('.') {
        Some(r) => number(r),
        None => (None, rest),
    };
    major
        .checked_mul(10000)?
        .checked_add(minor.unwrap_or(0).min(99) * 100 + patch.unwrap_or(0).min(99))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::basebackup::{BackupEvent, BaseBackupOptions};
    use crate::replication::conninfo::ConnParams;
    use crate::replication::message::{CopyResponse, TransactionStatus};
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A fake server on a Unix socket in a temporary directory. For each chunk of `script` it
    /// waits until the client has sent something (the startup message first), then sends the
    /// chunk; after the script it stays connected, silent, until the client leaves. Returns
    /// everything the client sent.
    struct FakeServer {
        dir: tempfile::TempDir,
        task: tokio::task::JoinHandle<Vec<u8>>,
    }

    impl FakeServer {
        fn start(script: Vec<Vec<u8>>) -> FakeServer {
            FakeServer::run(script, false)
        }

        /// Like `start`, but closes the connection after the script.
        fn start_closing(script: Vec<Vec<u8>>) -> FakeServer {
            FakeServer::run(script, true)
        }

        fn run(script: Vec<Vec<u8>>, close: bool) -> FakeServer {
            let dir = tempfile::tempdir().unwrap();
            let listener = UnixListener::bind(dir.path().join(".s.PGSQL.5432")).unwrap();
            let task = tokio::spawn(async move {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut received = Vec::new();
                let mut buf = [0u8; 65536];
                for chunk in script {
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    received.extend_from_slice(&buf[..n]);
                    if n == 0 || socket.write_all(&chunk).await.is_err() {
                        return received;
                    }
                }
                if close {
                    return received;
                }
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    received.extend_from_slice(&buf[..n]);
                }
                received
            });
            FakeServer { dir, task }
        }

        fn config(&self, extra: &str) -> ConnConfig {
            ConnParams::parse(&format!(
                "host={} user=tester {extra}",
                self.dir.path().display()
            ))
            .unwrap()
            .resolve(&|_| None)
            .unwrap()
        }
    }

    fn options(read_ms: u64) -> ConnectOptions {
        ConnectOptions {
            read_timeout: Duration::from_millis(read_ms),
            connect_timeout: Duration::from_secs(5),
            ..ConnectOptions::default()
        }
    }

    fn bytes(messages: &[BackendMessage]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for m in messages {
            m.encode(&mut out);
        }
        out.to_vec()
    }

    fn ready(version: &str) -> Vec<u8> {
        bytes(&[
            BackendMessage::Authentication(Authentication::Ok),
            BackendMessage::ParameterStatus {
                name: "server_version".into(),
                value: version.into(),
            },
            BackendMessage::ParameterStatus {
                name: "integer_datetimes".into(),
                value: "on".into(),
            },
            BackendMessage::BackendKeyData {
                process_id: 42,
                secret_key: 7,
            },
            BackendMessage::ReadyForQuery(TransactionStatus::Idle),
        ])
    }

    #[tokio::test]
    async fn a_silent_server_is_a_timeout_not_a_hang() {
        // Accepts, reads the startup message, says nothing.
        let server = FakeServer::start(vec![]);
        let config = server.config("connect_timeout=2");
        let started = std::time::Instant::now();
        let err = ReplicationConnection::connect(&config, &options(60_000))
            .await
            .unwrap_err();
        assert!(matches!(err, ReplicationError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(4));
        assert!(err.is_retryable());

        // Silent in the middle of a reply: the read timeout.
        let server = FakeServer::start(vec![ready("15.4")]);
        let mut conn = ReplicationConnection::connect(&server.config(""), &options(200))
            .await
            .unwrap();
        assert_eq!(conn.server_version_num(), Some(150004));
        assert_eq!(conn.integer_datetimes(), Some(true));
        assert_eq!(conn.backend_pid(), Some(42));
        let err = conn.identify_system().await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("running IDENTIFY_SYSTEM: the server sent nothing for 0.2s"),
            "{text}"
        );
        let again = conn.identify_system().await.unwrap_err();
        assert!(
            matches!(again, ReplicationError::Unusable { .. }),
            "{again}"
        );
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error_with_its_offset() {
        let mut reply = ready("15.4");
        let offset = reply.len();
        reply.extend_from_slice(b"HTTP/1.1 400 Bad Request\r\n");
        let server = FakeServer::start(vec![reply]);
        let mut conn = ReplicationConnection::connect(&server.config(""), &options(2000))
            .await
            .unwrap();
        let err = conn.simple_query("IDENTIFY_SYSTEM").await.unwrap_err();
        let ReplicationError::Protocol { source, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(source.offset, offset as u64 + 1, "{err}");
        assert!(err.to_string().contains("length field"), "{err}");
    }

    #[tokio::test]
    async fn a_closed_connection_and_a_fatal_error_are_told_apart() {
        // Closed after the startup message, without a word.
        let server = FakeServer::start_closing(vec![]);
        let err = ReplicationConnection::connect(&server.config(""), &options(2000))
            .await
            .unwrap_err();
        assert!(matches!(err, ReplicationError::Closed { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("closed the connection unexpectedly"),
            "{err}"
        );
        assert!(err.is_retryable());

        let server2 = FakeServer::start(vec![bytes(&[BackendMessage::ErrorResponse(
            crate::replication::message::ErrorFields(vec![
                (b'S', "FATAL".into()),
                (b'V', "FATAL".into()),
                (b'C', "42501".into()),
                (
                    b'M',
                    "must be superuser or replication role to start walsender".into(),
                ),
            ]),
        )])]);
        let err = ReplicationConnection::connect(&server2.config(""), &options(2000))
            .await
            .unwrap_err();
        assert_eq!(err.sqlstate(), Some("42501"));
        assert!(
            err.to_string().contains(
                "authenticating as \"tester\": FATAL: must be superuser or replication role"
            ),
            "{err}"
        );
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn scram_must_be_completed_by_the_server() {
        // The server asks for SCRAM, then declares success without sending its proof.
        let server = FakeServer::start(vec![
            bytes(&[BackendMessage::Authentication(Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256".into()],
            })]),
            bytes(&[BackendMessage::Authentication(Authentication::Ok)]),
        ]);
        let err = ReplicationConnection::connect(&server.config("password=pw"), &options(2000))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ReplicationError::Authentication { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("without completing SCRAM"),
            "{err}"
        );
        let sent = server.task.await.unwrap();
        assert!(
            sent.windows(13).any(|w| w == b"SCRAM-SHA-256"),
            "SASLInitialResponse names the mechanism"
        );
    }

    #[tokio::test]
    async fn md5_and_the_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let passfile = dir.path().join("pgpass");
        std::fs::write(&passfile, "*:*:replication:tester:password\n").unwrap();
        std::fs::set_permissions(
            &passfile,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let server = FakeServer::start(vec![
            bytes(&[BackendMessage::Authentication(
                Authentication::Md5Password {
                    salt: [0x2a, 0x3d, 0x8f, 0xe0],
                },
            )]),
            ready("15.4"),
        ]);
        let config = server.config(&format!("passfile={}", passfile.display()));
        let conn = ReplicationConnection::connect(&config, &options(2000))
            .await
            .unwrap();
        conn.close().await.unwrap();
        let sent = server.task.await.unwrap();
        let expected = md5_hash(b"tester", b"password", [0x2a, 0x3d, 0x8f, 0xe0]);
        assert!(
            sent.windows(expected.len())
                .any(|w| w == expected.as_bytes()),
            "the MD5 response"
        );
        assert!(sent.ends_with(b"X\0\0\0\x04"), "Terminate on close");

        // No password anywhere: a clear error naming the file.
        let server = FakeServer::start(vec![bytes(&[BackendMessage::Authentication(
            Authentication::CleartextPassword,
        )])]);
        let config = server.config("passfile=/nonexistent/pgpass");
        let err = ReplicationConnection::connect(&config, &options(2000))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ReplicationError::PasswordRequired { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("/nonexistent/pgpass"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_socket_lists_the_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let config = ConnParams::parse(&format!("host={} user=u", dir.path().display()))
            .unwrap()
            .resolve(&|_| None)
            .unwrap();
        let err = ReplicationConnection::connect(&config, &options(2000))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "could not connect to the server at {}/.s.PGSQL.5432: No such file",
                dir.path().display()
            )),
            "{text}"
        );
    }

    /// A fake server on 127.0.0.1 for TLS: it serves `sessions` connections in turn, answers
    /// an SSLRequest with `answer`, runs the handshake with `tls` when it says 'S', and replies
    /// to the startup message with `tls_reply` or `plain_reply`. It reports what each session
    /// saw.
    struct TlsServer {
        port: u16,
        task: tokio::task::JoinHandle<Vec<Session>>,
    }

    #[derive(Debug, Default)]
    struct Session {
        ssl_request: bool,
        tls: bool,
        handshake_error: Option<String>,
        sni: Option<String>,
        alpn: Option<Vec<u8>>,
        client_certificate: bool,
        startup: bool,
    }

    const SSL_REQUEST: [u8; 8] = *b"\0\0\0\x08\x04\xd2\x16\x2f";

    fn server_tls(cert: &str, key: &str, client_ca: Option<&str>) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = CertificateDer::pem_file_iter(tls::tests::fixture(cert))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(tls::tests::fixture(key)).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_file(tls::tests::fixture(ca)).unwrap())
                    .unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Arc::new(config)
    }

    impl TlsServer {
        async fn start(
            answer: u8,
            tls: Option<Arc<rustls::ServerConfig>>,
            tls_reply: Vec<u8>,
            plain_reply: Vec<u8>,
            sessions: usize,
        ) -> TlsServer {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let task = tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..sessions {
                    let (mut tcp, _) = listener.accept().await.unwrap();
                    let mut session = Session::default();
                    let mut head = [0u8; 8];
                    if tcp.read_exact(&mut head).await.is_err() {
                        seen.push(session);
                        continue;
                    }
                    if head != SSL_REQUEST {
                        session.startup = reply(&mut tcp, &plain_reply, true).await;
                    } else {
                        session.ssl_request = true;
                        tcp.write_all(&[answer]).await.unwrap();
                        match (answer, &tls) {
                            (b'S', Some(config)) => {
                                let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
                                match acceptor.accept(tcp).await {
                                    Ok(mut stream) => {
                                        let (_, conn) = stream.get_ref();
                                        session.tls = true;
                                        session.sni = conn.server_name().map(str::to_owned);
                                        session.alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
                                        session.client_certificate =
                                            conn.peer_certificates().is_some_and(|c| !c.is_empty());
                                        session.startup =
                                            reply(&mut stream, &tls_reply, false).await;
                                    }
                                    Err(e) => session.handshake_error = Some(e.to_string()),
                                }
                            }
                            // 'S' without TLS: hang up, as a server whose TLS is broken.
                            (b'S', None) => drop(tcp),
                            _ => session.startup = reply(&mut tcp, &plain_reply, false).await,
                        }
                    }
                    seen.push(session);
                }
                seen
            });
            TlsServer { port, task }
        }

        fn config(&self, host: &str, extra: &str) -> ConnConfig {
            ConnParams::parse(&format!(
                "host={host} port={} user=tester {extra}",
                self.port
            ))
            .unwrap()
            .resolve(&|_| None)
            .unwrap()
        }
    }

    /// Reads the startup message (the rest of it when `started`), sends `reply`, then reads
    /// until the client leaves.
    async fn reply<S>(stream: &mut S, reply: &[u8], started: bool) -> bool
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut buf = vec![0u8; 8192];
        let n = stream.read(&mut buf).await.unwrap_or(0);
        if !started && (n < 8 || buf[4..8] != *b"\0\x03\0\0") {
            return false;
        }
        if stream.write_all(reply).await.is_err() || stream.flush().await.is_err() {
            return false;
        }
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        true
    }

    fn refusal(message: &str) -> Vec<u8> {
        bytes(&[BackendMessage::ErrorResponse(
            crate::replication::message::ErrorFields(vec![
                (b'S', "FATAL".into()),
                (b'V', "FATAL".into()),
                (b'C', "28000".into()),
                (b'M', message.into()),
            ]),
        )])
    }

    fn fixture(name: &str) -> String {
        tls::tests::fixture(name).display().to_string()
    }

    #[tokio::test]
    async fn sslmode_prefer_and_require_when_the_server_has_no_tls() {
        // 'N': prefer goes on in plain text on the same socket.
        let server = TlsServer::start(b'N', None, vec![], ready("16.1"), 1).await;
        let conn = ReplicationConnection::connect(&server.config("127.0.0.1", ""), &options(2000))
            .await
            .unwrap();
        assert_eq!(conn.server(), format!("127.0.0.1:{}", server.port));
        assert_eq!(conn.server_version_num(), Some(160001));
        assert_eq!(conn.tls_session(), None);
        conn.close().await.unwrap();
        let seen = server.task.await.unwrap();
        assert!(
            seen[0].ssl_request && seen[0].startup && !seen[0].tls,
            "{seen:?}"
        );

        // 'S', then the handshake fails: prefer connects again in plain text.
        let server = TlsServer::start(b'S', None, vec![], ready("16.1"), 2).await;
        let conn = ReplicationConnection::connect(&server.config("127.0.0.1", ""), &options(2000))
            .await
            .unwrap();
        assert_eq!(conn.tls_session(), None);
        conn.close().await.unwrap();
        let seen = server.task.await.unwrap();
        assert!(seen[0].ssl_request && !seen[0].startup, "{seen:?}");
        assert!(!seen[1].ssl_request && seen[1].startup, "{seen:?}");

        // disable never asks.
        let server = TlsServer::start(b'N', None, vec![], ready("16.1"), 1).await;
        let config = server.config("127.0.0.1", "sslmode=disable");
        let conn = ReplicationConnection::connect(&config, &options(2000))
            .await
            .unwrap();
        conn.close().await.unwrap();
        assert!(!server.task.await.unwrap()[0].ssl_request);

        // require and stricter: a clear, final error.
        for mode in ["require", "verify-ca", "verify-full"] {
            let server = TlsServer::start(b'N', None, vec![], ready("16.1"), 1).await;
            let config = server.config(
                "127.0.0.1",
                &format!("sslmode={mode} sslrootcert={}", fixture("ca.crt")),
            );
            let err = ReplicationConnection::connect(&config, &options(2000))
                .await
                .unwrap_err();
            assert!(matches!(err, ReplicationError::Tls { .. }), "{err}");
            assert_eq!(
                err.to_string(),
                format!(
                    "127.0.0.1:{}: the server does not accept TLS (sslmode={mode}): turn ssl on \
                     in its postgresql.conf, or use sslmode=prefer (or disable) on a trusted \
                     network",
                    server.port
                )
            );
            assert!(!err.is_retryable());
        }
    }

    #[tokio::test]
    async fn tls_verify_full_checks_the_name_and_sends_sni() {
        let tls = server_tls("server.crt", "server.key", None);
        let verify = format!("sslmode=verify-full sslrootcert={}", fixture("ca.crt"));
        for (host, extra, sni) in [
            ("localhost", "", Some("localhost")),
            ("127.0.0.1", "", None),
            ("localhost", "sslsni=0", None),
        ] {
            let server = TlsServer::start(b'S', Some(tls.clone()), ready("15.4"), vec![], 1).await;
            let config = server.config(host, &format!("{verify} {extra}"));
            let conn = ReplicationConnection::connect(&config, &options(2000))
                .await
                .unwrap_or_else(|e| panic!("{host} {extra}: {e}"));
            let session = conn.tls_session().expect("a TLS connection");
            assert_eq!(session.protocol, "TLSv1.3");
            assert!(session.cipher_suite.starts_with("TLS13_"), "{session:?}");
            assert_eq!(conn.server_version_num(), Some(150004));
            conn.close().await.unwrap();
            let seen = server.task.await.unwrap();
            assert!(seen[0].tls && seen[0].startup, "{seen:?}");
            assert_eq!(seen[0].sni.as_deref(), sni, "{host} {extra}");
            assert_eq!(seen[0].alpn.as_deref(), Some(&b"postgresql"[..]));
            assert!(!seen[0].client_certificate);
        }

        // A certificate for another name: verify-full refuses it, verify-ca takes it.
        let elsewhere = server_tls("elsewhere.crt", "elsewhere.key", None);
        let server = TlsServer::start(b'S', Some(elsewhere.clone()), vec![], vec![], 1).await;
        let err =
            ReplicationConnection::connect(&server.config("localhost", &verify), &options(2000))
                .await
                .unwrap_err();
        assert!(matches!(err, ReplicationError::Tls { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "localhost:{}: the server's certificate does not match the host name \
                 \"localhost\" (sslmode=verify-full): certificate not valid for name \
                 \"localhost\"; certificate is only valid for DnsName(\"db.example.test\")",
                server.port
            )),
            "{text}"
        );
        assert!(!err.is_retryable());
        assert!(server.task.await.unwrap()[0].handshake_error.is_some());

        let server = TlsServer::start(b'S', Some(elsewhere), ready("15.4"), vec![], 1).await;
        let config = server.config(
            "localhost",
            &format!("sslmode=verify-ca sslrootcert={}", fixture("ca.crt")),
        );
        let conn = ReplicationConnection::connect(&config, &options(2000))
            .await
            .unwrap();
        assert!(conn.tls_session().is_some());
        conn.close().await.unwrap();
    }

    #[tokio::test]
    async fn tls_untrusted_certificates_name_the_root_file() {
        // Signed by another CA, and for another name: the chain is checked first, so even
        // verify-ca (which ignores names) refuses it as untrusted.
        let stranger = server_tls("stranger.crt", "stranger.key", None);
        let root = fixture("ca.crt");
        for mode in ["verify-ca", "verify-full", "require"] {
            let server = TlsServer::start(b'S', Some(stranger.clone()), vec![], vec![], 1).await;
            let config = server.config("localhost", &format!("sslmode={mode} sslrootcert={root}"));
            let err = ReplicationConnection::connect(&config, &options(2000))
                .await
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "localhost:{}: the server's certificate is not trusted: it is not signed by a \
                     CA of root certificate file \"{root}\" (sslmode={mode})",
                    server.port
                )
            );
            assert!(!err.is_retryable());
        }

        // require without root certificates checks nothing.
        let server = TlsServer::start(b'S', Some(stranger.clone()), ready("15.4"), vec![], 1).await;
        let config = server.config("localhost", "sslmode=require");
        let conn = ReplicationConnection::connect(&config, &options(2000))
            .await
            .unwrap();
        assert!(conn.tls_session().is_some());
        conn.close().await.unwrap();

        // prefer with a root file: TLS fails, so (as libpq) plain text on a new connection.
        let server = TlsServer::start(b'S', Some(stranger), vec![], ready("15.4"), 2).await;
        let config = server.config("localhost", &format!("sslrootcert={root}"));
        let conn = ReplicationConnection::connect(&config, &options(2000))
            .await
            .unwrap();
        assert_eq!(conn.tls_session(), None);
        conn.close().await.unwrap();
        let seen = server.task.await.unwrap();
        assert!(seen[0].handshake_error.is_some(), "{seen:?}");
        assert!(!seen[1].ssl_request && seen[1].startup, "{seen:?}");

        // A CA certificate served as the server's own.
        let misuse = server_tls("ca.crt", "ca-as-server.key", None);
        let server = TlsServer::start(b'S', Some(misuse), vec![], vec![], 1).await;
        let config = server.config(
            "localhost",
            &format!("sslmode=verify-ca sslrootcert={root}"),
        );
        let err = ReplicationConnection::connect(&config, &options(2000))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains(
                "the server's certificate is a CA certificate (basicConstraints CA:TRUE)"
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn tls_client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("client.key");
        std::fs::copy(tls::tests::fixture("client.key"), &key).unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let tls = server_tls("server.crt", "server.key", Some("ca.crt"));
        let verify = format!("sslmode=verify-full sslrootcert={}", fixture("ca.crt"));

        let server = TlsServer::start(b'S', Some(tls.clone()), ready("15.4"), vec![], 1).await;
        let config = server.config(
            "localhost",
            &format!(
                "{verify} sslcert={} sslkey={}",
                fixture("client.crt"),
                key.display()
            ),
        );
        let conn = ReplicationConnection::connect(&config, &options(2000))
            .await
            .unwrap();
        conn.close().await.unwrap();
        let seen = server.task.await.unwrap();
        assert!(seen[0].client_certificate && seen[0].startup, "{seen:?}");

        // Without one, the server ends TLS (under TLS 1.3, after the client's handshake is
        // done, so the alert arrives with the first reply).
        let server = TlsServer::start(b'S', Some(tls), ready("15.4"), vec![], 1).await;
        let config = server.config(
            "localhost",
            &format!(
                "{verify} sslcertmode=disable sslcert={}",
                fixture("client.crt")
            ),
        );
        let err = ReplicationConnection::connect(&config, &options(2000))
            .await
            .unwrap_err();
        assert!(matches!(err, ReplicationError::Tls { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("does it require a client certificate (sslcert, sslkey)"),
            "{err}"
        );
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn a_refused_session_is_tried_again_with_the_other_tls_choice() {
        let tls = server_tls("server.crt", "server.key", None);
        // allow: plain text first; refused, then TLS.
        let server = TlsServer::start(
            b'S',
            Some(tls.clone()),
            ready("15.4"),
            refusal("no pg_hba.conf entry for replication connection, no encryption"),
            2,
        )
        .await;
        let conn = ReplicationConnection::connect(
            &server.config("127.0.0.1", "sslmode=allow"),
            &options(2000),
        )
        .await
        .unwrap();
        assert!(conn.tls_session().is_some());
        conn.close().await.unwrap();
        let seen = server.task.await.unwrap();
        assert!(!seen[0].ssl_request && seen[1].tls, "{seen:?}");

        // prefer: TLS first; refused, then plain text; refused again, both refusals told.
        let server = TlsServer::start(
            b'S',
            Some(tls.clone()),
            refusal("password authentication failed for user \"tester\""),
            refusal("no pg_hba.conf entry for replication connection, no encryption"),
            2,
        )
        .await;
        let err = ReplicationConnection::connect(&server.config("127.0.0.1", ""), &options(2000))
            .await
            .unwrap_err();
        assert_eq!(err.sqlstate(), Some("28000"));
        assert_eq!(
            err.to_string(),
            format!(
                "127.0.0.1:{}: authenticating as \"tester\" without TLS, after the server \
                 refused the session over TLS (FATAL: password authentication failed for user \
                 \"tester\" (SQLSTATE 28000)): FATAL: no pg_hba.conf entry for replication \
                 connection, no encryption (SQLSTATE 28000)",
                server.port
            )
        );

        // require: no second try.
        let server = TlsServer::start(
            b'S',
            Some(tls),
            refusal("password authentication failed for user \"tester\""),
            ready("15.4"),
            1,
        )
        .await;
        let err = ReplicationConnection::connect(
            &server.config("127.0.0.1", "sslmode=require"),
            &options(2000),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().ends_with(
                "authenticating as \"tester\": FATAL: password authentication failed for user \
                 \"tester\" (SQLSTATE 28000)"
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn unix_sockets_never_use_tls() {
        let server = FakeServer::start(vec![ready("15.4")]);
        let config = server.config("sslmode=verify-full sslrootcert=/nonexistent/root.crt");
        let conn = ReplicationConnection::connect(&config, &options(2000))
            .await
            .unwrap();
        assert_eq!(conn.tls_session(), None);
        conn.close().await.unwrap();
        let sent = server.task.await.unwrap();
        assert_eq!(
            &sent[4..8],
            b"\0\x03\0\0",
            "a StartupMessage, no SSLRequest"
        );
    }

    #[tokio::test]
    async fn old_servers_are_refused_for_base_backups() {
        let server = FakeServer::start(vec![ready("12.22")]);
        let conn = ReplicationConnection::connect(&server.config(""), &options(2000))
            .await
            .unwrap();
        let err = conn
            .base_backup(&BaseBackupOptions::default())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains(
                "PostgreSQL 12.22 is too old for walcore base backups (13 or later is needed)"
            ),
            "{err}"
        );
    }

    /// The captured PostgreSQL 15 reply to BASE_BACKUP, replayed by the fake server in pieces
    /// of awkward sizes, through the whole async stack and the spawned task.
    #[tokio::test]
    async fn a_real_base_backup_reply_streams_as_events() {
        let reply = crate::pg::corpus::corpus_files("replication_message")
            .into_iter()
            .find(|(f, _)| f == "pg15-base-backup-short")
            .map(|(_, d)| d)
            .unwrap();
        let mut script = vec![ready("15.18 (Debian 15.18-0+deb12u1)")];
        script.push(reply);
        let server = FakeServer::start(script);
        let conn = ReplicationConnection::connect(&server.config(""), &options(2000))
            .await
            .unwrap();
        let stream = conn
            .base_backup(&BaseBackupOptions::default())
            .await
            .unwrap();
        let (mut events, task) = stream.spawn();
        let mut seen = Vec::new();
        while let Some(event) = events.recv().await {
            seen.push(event.unwrap());
        }
        assert!(matches!(seen.first(), Some(BackupEvent::Started { .. })));
        assert!(matches!(seen.last(), Some(BackupEvent::Finished { .. })));
        assert_eq!(seen.len(), 8, "{seen:?}");
        let conn = task.await.unwrap();
        conn.check_usable().unwrap();
        conn.close().await.unwrap();
        let sent = server.task.await.unwrap();
        let sent = String::from_utf8_lossy(&sent);
        assert!(
            sent.contains("BASE_BACKUP ( LABEL 'walcore base backup'"),
            "{sent}"
        );
    }

    #[tokio::test]
    async fn a_server_error_mid_backup_leaves_the_connection_usable() {
        let error = BackendMessage::ErrorResponse(crate::replication::message::ErrorFields(vec![
            (b'V', "ERROR".into()),
            (b'C', "58P01".into()),
            (
                b'M',
                "could not stat file \"base/1/1234\": No such file or directory".into(),
            ),
        ]));
        let mut reply = crate::replication::basebackup::tests::pg15_reply();
        reply.truncate(10);
        reply.push(error);
        reply.push(BackendMessage::ReadyForQuery(TransactionStatus::Idle));
        let rows = bytes(&[
            BackendMessage::RowDescription(vec![FieldDescription {
                name: "x".into(),
                table_oid: 0,
                column_id: 0,
                type_oid: 25,
                type_size: -1,
                type_modifier: -1,
                format: 0,
            }]),
            BackendMessage::DataRow(vec![Some(Bytes::from_static(b"1"))]),
            BackendMessage::CommandComplete("SHOW".into()),
            BackendMessage::ReadyForQuery(TransactionStatus::Idle),
        ]);
        let server = FakeServer::start(vec![ready("15.4"), bytes(&reply), rows]);
        let conn = ReplicationConnection::connect(&server.config(""), &options(2000))
            .await
            .unwrap();
        let mut stream = conn
            .base_backup(&BaseBackupOptions::default())
            .await
            .unwrap();
        let mut events = 0;
        let err = loop {
            match stream.next_event().await {
                Ok(Some(_)) => events += 1,
                Ok(None) => panic!("the backup cannot finish"),
                Err(e) => break e,
            }
        };
        assert_eq!(events, 3, "Started, Archive, Data");
        assert_eq!(err.sqlstate(), Some("58P01"));
        assert!(
            err.to_string()
                .contains("taking a base backup: ERROR: could not stat"),
            "{err}"
        );
        let mut conn = stream.into_connection();
        let rows = conn.simple_query("SHOW x").await.unwrap();
        assert_eq!(rows[0].text("x"), Ok(Some("1")));
        let _ = CopyResponse::default();
    }

    #[test]
    fn version_numbers() {
        assert_eq!(
            parse_version_num("15.18 (Debian 15.18-0+deb12u1)"),
            Some(150018)
        );
        assert_eq!(parse_version_num("16beta1"), Some(160000));
        assert_eq!(parse_version_num("18devel"), Some(180000));
        assert_eq!(parse_version_num("9.6.24"), Some(90624));
        assert_eq!(parse_version_num("13.0"), Some(130000));
        assert_eq!(parse_version_num("x"), None);
        assert_eq!(parse_version_num("99999999999"), None);
    }

    #[test]
    fn command_names_never_quote_arguments() {
        assert_eq!(
            command_name("BASE_BACKUP ( LABEL 'secret' )"),
            "BASE_BACKUP"
        );
        assert_eq!(command_name("  IDENTIFY_SYSTEM"), "IDENTIFY_SYSTEM");
        assert_eq!(command_name("'x'"), "a query");
    }
}
