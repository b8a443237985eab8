//! The one error type of the replication client, and the server's own errors.
//!
//! Every variant names the server (`/tmp/pg/.s.PGSQL.5432`, `db1:5432`) and what was being done,
//! so that a message read in a log says where and when without context added further up. The
//! server's errors keep PostgreSQL's words and SQLSTATE: "password authentication failed for
//! user "x"" and "must be superuser or replication role to start walsender" are already what a
//! DBA searches for.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::error::{Error, ErrorKind};

use super::basebackup::BackupProtocolError;
use super::conninfo::ConnInfoError;
use super::message::frontend::NulByte;
use super::message::{ErrorFields, ProtocolError};

/// An ErrorResponse from PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL` or `PANIC` (never localized).
    pub severity: String,
    /// The SQLSTATE, like `28P01` (invalid password) or `42501` (insufficient privilege).
    pub code: String,
    /// The primary message.
    pub message: String,
    /// The optional detail.
    pub detail: Option<String>,
    /// The optional hint.
    pub hint: Option<String>,
}

impl ServerError {
    /// The error carried by an ErrorResponse's fields; missing fields get placeholders that say
    /// so, since a server that omits them is still telling us something.
    pub fn from_fields(fields: &ErrorFields) -> ServerError {
        ServerError {
            severity: fields.severity().unwrap_or("ERROR").to_owned(),
            code: fields.code().unwrap_or("XX000").to_owned(),
            message: fields
                .message()
                .unwrap_or("(the server sent an error without a message)")
                .to_owned(),
            detail: fields.detail().map(str::to_owned),
            hint: fields.hint().map(str::to_owned),
        }
    }

    /// FATAL and PANIC errors end the session: the server closes the connection.
    pub fn ends_session(&self) -> bool {
        matches!(self.severity.as_str(), "FATAL" | "PANIC")
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(detail) = &self.detail {
            write!(f, "; DETAIL: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; HINT: {hint}")?;
        }
        Ok(())
    }
}

/// One failed attempt to open a socket to a server.
#[derive(Debug)]
pub struct ConnectAttempt {
    /// The socket path or `host:port`.
    pub address: String,
    /// Whether it is a Unix socket (for the hint).
    pub unix_socket: bool,
    /// Why it failed (`TimedOut` when the connect timeout expired).
    pub error: io::Error,
}

impl fmt::Display for ConnectAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at {}: {}", self.address, self.error)?;
        // libpq's hints, which DBAs know.
        match (self.error.kind(), self.unix_socket) {
            (io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused, true) => f.write_str(
                " (is the server running locally and accepting connections on that socket?)",
            ),
            (io::ErrorKind::ConnectionRefused, false) => f.write_str(
                " (is the server running on that host and accepting TCP/IP connections?)",
            ),
            _ => Ok(()),
        }
    }
}

/// An error of the replication client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The connection string, the environment or the password file is unusable.
    #[error(transparent)]
    ConnInfo(#[from] ConnInfoError),

    /// No server could be reached at any of the addresses tried.
    #[error("could not connect to the server {}", join_attempts(.attempts))]
    Connect {
        /// Every address tried, in order, and why it failed.
        attempts: Vec<ConnectAttempt>,
    },

    /// PostgreSQL answered with an ErrorResponse.
    #[error("{server}: {doing}: {error}")]
    Server {
        /// The server.
        server: String,
        /// What was being done.
        doing: String,
        /// The server's error.
        error: Box<ServerError>,
    },

    /// The server sent nothing for longer than allowed.
    #[error("{server}: {doing}: the server sent nothing for {}s", .waited.as_secs_f64())]
    Timeout {
        /// The server.
        server: String,
        /// What was being done.
        doing: String,
        /// How long we waited.
        waited: Duration,
    },

    /// The server closed the connection without an error message.
    #[error("{server}: {doing}: the server closed the connection unexpectedly")]
    Closed {
        /// The server.
        server: String,
        /// What was being done.
        doing: String,
    },

    /// Reading from or writing to the socket failed.
    #[error("{server}: {doing}: {source}")]
    Io {
        /// The server.
        server: String,
        /// What was being done.
        doing: String,
        /// The failure.
        source: io::Error,
    },

    /// The server's bytes are not valid protocol messages.
    #[error("{server}: {doing}: {source}")]
    Protocol {
        /// The server.
        server: String,
        /// What was being done.
        doing: String,
        /// Where and what.
        source: ProtocolError,
    },

    /// A valid message that makes no sense at this point of the conversation, or a reply whose
    /// content is unusable (an IDENTIFY_SYSTEM row without a system identifier, say).
    #[error("{server}: {doing}: {detail}")]
    InvalidReply {
        /// The server.
        server: String,
        /// What was being done.
        doing: String,
        /// What is wrong.
        detail: String,
    },

    /// The BASE_BACKUP response does not follow the protocol.
    #[error("{server}: receiving the base backup: {source}")]
    BaseBackup {
        /// The server.
        server: String,
        /// What is wrong.
        source: BackupProtocolError,
    },

    /// TLS could not be set up: the server does not accept it while `sslmode` demands it, its
    /// certificate is not trusted or does not name the host, a certificate or key file is
    /// unreadable or invalid, or the handshake failed. The configuration (of the client or the
    /// server) must change, so it is not worth retrying; a network failure in the middle of a
    /// handshake is an [`ReplicationError::Io`] or [`ReplicationError::Closed`] instead.
    #[error("{server}: {detail}")]
    Tls {
        /// The server.
        server: String,
        /// What went wrong, naming the files and settings involved.
        detail: String,
    },

    /// Something walcore does not support yet (an authentication method, an old server).
    #[error("{server}: {what}")]
    Unsupported {
        /// The server (or the connection string's target).
        server: String,
        /// What is not supported, and what to do instead.
        what: String,
    },

    /// The server asks for a password and none is configured.
    #[error(
        "{server}: the server asks for a password for user \"{user}\", but none was given \
         (set password= in the connection string, PGPASSWORD, or a line in the password file \
         {passfile})"
    )]
    PasswordRequired {
        /// The server.
        server: String,
        /// The user.
        user: String,
        /// The password file consulted, or a note that there was none.
        passfile: String,
    },

    /// Authentication could not be completed on our side (the server's SCRAM proof is wrong or
    /// missing: it may not be the server it claims to be).
    #[error("{server}: authenticating as \"{user}\": {reason}")]
    Authentication {
        /// The server.
        server: String,
        /// The user.
        user: String,
        /// What went wrong.
        reason: String,
    },

    /// A string given to the client cannot be sent.
    #[error(transparent)]
    NulByte(#[from] NulByte),

    /// The connection was left unusable by an earlier error (a timeout or a protocol error in
    /// the middle of a reply, or a stream that was abandoned).
    #[error("{server}: the connection is unusable after an earlier error; open a new one")]
    Unusable {
        /// The server.
        server: String,
    },
}

fn join_attempts(attempts: &[ConnectAttempt]) -> String {
    match attempts {
        [] => "(no address to try)".to_owned(),
        [one] => one.to_string(),
        many => many
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    }
}

impl ReplicationError {
    /// The SQLSTATE when the server reported the error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { error, .. } => Some(&error.code),
            _ => None,
        }
    }

    /// The server's error, when it reported one.
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            ReplicationError::Server { error, .. } => Some(error),
            _ => None,
        }
    }

    /// What a caller can do about it (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            ReplicationError::ConnInfo(_)
            | ReplicationError::Unsupported { .. }
            | ReplicationError::Tls { .. }
            | ReplicationError::PasswordRequired { .. }
            | ReplicationError::Authentication { .. }
            | ReplicationError::NulByte(_) => ErrorKind::Configuration,
            ReplicationError::Connect { .. }
            | ReplicationError::Timeout { .. }
            | ReplicationError::Closed { .. }
            | ReplicationError::Io { .. }
            | ReplicationError::Unusable { .. } => ErrorKind::Transient,
            ReplicationError::Protocol { .. }
            | ReplicationError::InvalidReply { .. }
            | ReplicationError::BaseBackup { .. } => ErrorKind::InvalidInput,
            ReplicationError::Server { error, .. } => sqlstate_kind(&error.code),
        }
    }

    /// Worth trying again after a pause (the server may be restarting, overloaded, or the
    /// network may come back).
    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }
}

/// The kind of a server error, by SQLSTATE class (PostgreSQL's Appendix A).
fn sqlstate_kind(code: &str) -> ErrorKind {
    match code.get(..2) {
        // connection exception, insufficient resources (too many connections), operator
        // intervention (shutdown, starting up), transaction rollback
        Some("08" | "53" | "57" | "40") => ErrorKind::Transient,
        // invalid authorization, insufficient privilege / syntax, invalid catalog name, feature
        // not supported: the configuration must change
        Some("28" | "42" | "3D" | "0A") => ErrorKind::Configuration,
        _ => ErrorKind::InvalidInput,
    }
}

impl From<ReplicationError> for Error {
    fn from(e: ReplicationError) -> Error {
        Error::new(e.kind(), e.to_string()).with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_read_like_postgresql() {
        let fields = ErrorFields(vec![
            (b'S', "FATAL".into()),
            (b'V', "FATAL".into()),
            (b'C', "28P01".into()),
            (
                b'M',
                "password authentication failed for user \"bob\"".into(),
            ),
        ]);
        let e = ReplicationError::Server {
            server: "/tmp/s/.s.PGSQL.5432".into(),
            doing: "authenticating as \"bob\"".into(),
            error: Box::new(ServerError::from_fields(&fields)),
        };
        assert_eq!(
            e.to_string(),
            "/tmp/s/.s.PGSQL.5432: authenticating as \"bob\": FATAL: password authentication \
             failed for user \"bob\" (SQLSTATE 28P01)"
        );
        assert_eq!(e.sqlstate(), Some("28P01"));
        assert_eq!(e.kind(), ErrorKind::Configuration);
        assert!(!e.is_retryable());
    }

    #[test]
    fn connect_errors_carry_libpq_hints() {
        let e = ReplicationError::Connect {
            attempts: vec![ConnectAttempt {
                address: "/tmp/x/.s.PGSQL.5432".into(),
                unix_socket: true,
                error: io::Error::from(io::ErrorKind::NotFound),
            }],
        };
        let text = e.to_string();
        assert!(
            text.starts_with("could not connect to the server at /tmp/x/.s.PGSQL.5432: "),
            "{text}"
        );
        assert!(
            text.contains("accepting connections on that socket"),
            "{text}"
        );
        assert!(e.is_retryable());
    }

    #[test]
    fn sqlstate_classes() {
        assert_eq!(sqlstate_kind("57P03"), ErrorKind::Transient);
        assert_eq!(sqlstate_kind("53300"), ErrorKind::Transient);
        assert_eq!(sqlstate_kind("42501"), ErrorKind::Configuration);
        assert_eq!(sqlstate_kind("28000"), ErrorKind::Configuration);
        assert_eq!(sqlstate_kind("58P01"), ErrorKind::InvalidInput);
        assert_eq!(sqlstate_kind(""), ErrorKind::InvalidInput);
    }
}
