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
//! What it does not do (yet): TLS (`sslmode=require` and stricter fail with a clear error;
//! `prefer` asks the server and goes on in plain text), GSSAPI, Kerberos, SSPI, SCRAM channel
//! binding, cancel requests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
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

/// The socket: Unix or TCP.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read_buf(buf).await,
            Stream::Tcp(s) => s.read_buf(buf).await,
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.write_all(bytes).await,
            Stream::Tcp(s) => s.write_all(bytes).await,
        }
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown().await,
            Stream::Tcp(s) => s.shutdown().await,
        }
    }
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

/// Why opening a socket failed: try the next address, or stop.
enum OpenError {
    Next(ConnectAttempt),
    Stop(ReplicationError),
}

impl ReplicationConnection {
    /// Connects to the first of `config`'s addresses that accepts a connection, then starts up
    /// and authenticates. Addresses are tried in order while the socket cannot be opened; once
    /// one is open, any failure (authentication, permissions) is final, as in libpq.
    pub async fn connect(
        config: &ConnConfig,
        options: &ConnectOptions,
    ) -> Result<ReplicationConnection, ReplicationError> {
        let limit = config.connect_timeout.unwrap_or(options.connect_timeout);
        let mut attempts = Vec::new();
        for target in &config.targets {
            let server = target.to_string();
            let stream =
                match tokio::time::timeout(limit, open_socket(target, config.sslmode)).await {
                    Err(_) => {
                        attempts.push(ConnectAttempt {
                            address: server,
                            unix_socket: target.socket_path().is_some(),
                            error: std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("timed out after {}s", limit.as_secs_f64()),
                            ),
                        });
                        continue;
                    }
                    Ok(Err(OpenError::Next(attempt))) => {
                        debug!("{attempt}");
                        attempts.push(attempt);
                        continue;
                    }
                    Ok(Err(OpenError::Stop(e))) => return Err(e),
                    Ok(Ok(stream)) => stream,
                };
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
            return match tokio::time::timeout(limit, conn.startup(config, options, target)).await {
                Err(_) => Err(ReplicationError::Timeout {
                    server,
                    doing: format!("starting up and authenticating as \"{}\"", config.user),
                    waited: limit,
                }),
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => {
                    conn.read_timeout = options.read_timeout;
                    debug!(
                        server = %conn.server,
                        version = conn.server_version().unwrap_or("?"),
                        "replication connection ready"
                    );
                    Ok(conn)
                }
            };
        }
        Err(ReplicationError::Connect { attempts })
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

    async fn startup(
        &mut self,
        config: &ConnConfig,
        options: &ConnectOptions,
        target: &Target,
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
        self.flush("sending the startup message").await?;
        self.authenticate(config, options, target).await?;
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
                    // No TLS, so no channel binding: the client says it does not support it.
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

    /// A failed read or write: the server hung up, or another I/O error.
    fn io_failure(&self, doing: &str, source: std::io::Error) -> ReplicationError {
        if is_disconnect(&source) {
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

/// Opens the socket to `target`, negotiating (away) TLS as `sslmode` says.
async fn open_socket(target: &Target, sslmode: SslMode) -> Result<Stream, OpenError> {
    let address = target.to_string();
    let next = |unix_socket, error| {
        OpenError::Next(ConnectAttempt {
            address: address.clone(),
            unix_socket,
            error,
        })
    };
    match &target.host {
        Host::Socket(_) => {
            // sslmode does not apply to Unix sockets (libpq never uses TLS on them).
            let path = target.socket_path().unwrap_or_default();
            UnixStream::connect(&path)
                .await
                .map(Stream::Unix)
                .map_err(|e| next(true, e))
        }
        Host::Tcp(name) => {
            if sslmode.requires_tls() {
                return Err(OpenError::Stop(ReplicationError::Unsupported {
                    server: address.clone(),
                    what: format!(
                        "sslmode={sslmode} needs TLS, which walcore does not support yet; use a \
                         Unix socket, or sslmode=prefer or disable on a trusted network"
                    ),
                }));
            }
            let tcp = |name: String, port: u16| async move {
                let stream = TcpStream::connect((name.as_str(), port)).await?;
                stream.set_nodelay(true)?;
                Ok::<TcpStream, std::io::Error>(stream)
            };
            let mut stream = tcp(name.clone(), target.port)
                .await
                .map_err(|e| next(false, e))?;
            if sslmode != SslMode::Prefer {
                return Ok(Stream::Tcp(stream));
            }
            // prefer: ask; go on in plain text when the server says no. When it says yes we
            // cannot take it up yet, and reconnect in plain text (what libpq does when the
            // TLS handshake fails under prefer).
            let mut request = BytesMut::new();
            frontend::ssl_request(&mut request);
            stream
                .write_all(&request)
                .await
                .map_err(|e| next(false, e))?;
            let answer = stream.read_u8().await.map_err(|e| next(false, e))?;
            match answer {
                b'N' => Ok(Stream::Tcp(stream)),
                b'S' => {
                    debug!(
                        "{address} offers TLS, which walcore does not support yet; \
                         reconnecting without it (sslmode=prefer)"
                    );
                    drop(stream);
                    tcp(name.clone(), target.port)
                        .await
                        .map(Stream::Tcp)
                        .map_err(|e| next(false, e))
                }
                other => Err(OpenError::Stop(ReplicationError::InvalidReply {
                    server: address.clone(),
                    doing: "negotiating TLS (sslmode=prefer)".to_owned(),
                    detail: format!(
                        "the server answered the SSLRequest with byte 0x{other:02X} instead of \
                         'S' or 'N' (use sslmode=disable for servers that predate SSL)"
                    ),
                })),
            }
        }
    }
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

    #[tokio::test]
    async fn sslmode_prefer_over_tcp_falls_back_to_plain() {
        for answer in [b'N', b'S'] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let (mut s, _) = listener.accept().await.unwrap();
                let n = s.read(&mut buf).await.unwrap();
                assert_eq!(&buf[..n], b"\0\0\0\x08\x04\xd2\x16\x2f", "SSLRequest");
                s.write_all(&[answer]).await.unwrap();
                if answer == b'S' {
                    // The client cannot do TLS: it comes back without asking.
                    let (s2, _) = listener.accept().await.unwrap();
                    s = s2;
                }
                let n = s.read(&mut buf).await.unwrap();
                assert_eq!(&buf[4..8], b"\0\x03\0\0", "StartupMessage");
                assert!(n > 8);
                s.write_all(&ready("16.1")).await.unwrap();
                let _ = s.read(&mut buf).await;
            });
            let config = ConnParams::parse(&format!("host=127.0.0.1 port={port} user=u"))
                .unwrap()
                .resolve(&|_| None)
                .unwrap();
            let conn = ReplicationConnection::connect(&config, &options(2000))
                .await
                .unwrap();
            assert_eq!(conn.server(), format!("127.0.0.1:{port}"));
            assert_eq!(conn.server_version_num(), Some(160001));
            conn.close().await.unwrap();
            server.await.unwrap();
        }
        let config = ConnParams::parse("host=127.0.0.1 port=1 user=u sslmode=require")
            .unwrap()
            .resolve(&|_| None)
            .unwrap();
        let err = ReplicationConnection::connect(&config, &options(2000))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("TLS, which walcore does not support yet"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn old_servers_are_refused_for_base_backups() {
        let server = FakeServer::start(vec![ready("14.9")]);
        let conn = ReplicationConnection::connect(&server.config(""), &options(2000))
            .await
            .unwrap();
        let err = conn
            .base_backup(&BaseBackupOptions::default())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains(
                "PostgreSQL 13/14 base backups are not supported yet (the server is 14.9)"
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
