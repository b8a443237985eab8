//! A client of PostgreSQL's replication protocol: the source of base backups (and, later, of
//! streamed WAL).
//!
//! ```text
//! connection string ──conninfo──▶ ConnConfig ──conn──▶ ReplicationConnection ──basebackup──▶ BackupEvent…
//!   + PG* variables, .pgpass         (socket, startup, auth,      (BASE_BACKUP, 13+)
//!                                     simple query, timeouts)
//!                         bytes ◀──────── message (sans-IO parser and builders) ────────▶ bytes
//! ```
//!
//! - [`conninfo`]: libpq connection strings and URLs, the `PG*` environment and the defaults;
//!   [`pgpass`]: the password file.
//! - [`message`]: the protocol's messages, parsed sans-IO (bytes in; a message, "need more", or
//!   an error that says where) and built.
//! - [`conn`]: the async connection: Unix socket, TCP, or TLS over TCP (rustls, `sslmode` and
//!   certificate checks as in libpq), trust / password / MD5 / SCRAM-SHA-256, client
//!   certificates, `simple_query`, `IDENTIFY_SYSTEM`, a time limit on every wait.
//! - [`basebackup`]: `BASE_BACKUP` on PostgreSQL 13+ (the 13/14 reply and the 15+ one give the
//!   same events), as a sans-IO decoder and an event stream.
//! - [`stream`]: physical streaming replication: `CREATE_REPLICATION_SLOT … RESERVE_WAL`,
//!   `START_REPLICATION`, the WAL and keepalive messages, standby status updates, and the end
//!   of a timeline.
//!
//! What it does not do yet: GSSAPI/SSPI, SCRAM channel binding (also over TLS), encrypted client
//! keys (`sslpassword`), base backups from servers before PostgreSQL 13 (refused with a clear
//! error).

pub mod basebackup;
pub mod conn;
pub mod conninfo;
mod error;
pub mod fuzz;
pub mod message;
pub mod pgpass;
pub mod stream;

#[cfg(test)]
mod corpus;

pub use basebackup::{
    BackupEvent, BackupProtocolError, BaseBackupDecoder, BaseBackupOptions, BaseBackupStream,
    Checkpoint, ManifestChecksums, ReplyFormat, TablespaceInfo,
};
pub use conn::{ConnectOptions, ReplicationConnection, Row, SystemInfo};
pub use conninfo::{ConnConfig, ConnInfoError, ConnParams, Host, SslMode, Target};
pub use error::{ConnectAttempt, ReplicationError, ServerError};
pub use message::frontend::ReplicationMode;
pub use message::{BackendMessage, ProtocolError, parse_backend};
