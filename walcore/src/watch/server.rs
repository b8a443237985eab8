//! What the server says about archiving and streaming, read over one SQL session: the
//! segments waiting for `archive_command` (`pg_ls_archive_statusdir()`), the archiver's
//! failures (`pg_stat_archiver`), and the stream's slot (`pg_replication_slots`) with its
//! connection (`pg_stat_replication`).
//!
//! The repository shows what arrived; only the server shows what is waiting. A repository
//! whose newest segment is an hour old is fine on a quiet database and a disaster on a busy
//! one: `.ready` files an hour old say which. `walcore check --alert` and `walcore serve
//! --dbname` alert on it ([`crate::alert::evaluate_server`]); `status` and the metrics show it.
//!
//! The session is a `replication=database` connection, as `walcore check` opens: the role needs
//! the REPLICATION attribute, and `pg_monitor` (or superuser) to list the archive status
//! directory. *Does not* write anything on the server.

use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, ErrorKind};
use crate::replication::conn::DEFAULT_CONNECT_TIMEOUT;
use crate::replication::{ConnConfig, ConnectOptions, ReplicationConnection, ReplicationMode, Row};

/// The slot `walcore stream` uses unless told otherwise.
pub const DEFAULT_SLOT: &str = "walcore";

/// What to read, and where.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// The connection string or URL (libpq style; `PG*` variables and `.pgpass` complete it).
    pub conninfo: String,
    /// The stream's replication slot.
    pub slot: String,
    /// How long connecting and every query together may take.
    pub timeout: Duration,
}

/// The server's side of archiving and streaming, at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerWatch {
    /// When it was read (the server's clock, RFC 3339).
    pub observed_at: String,
    pub in_recovery: bool,
    /// Segments and other files waiting for `archive_command`.
    pub ready_files: u64,
    /// How long the oldest of them has waited, in seconds.
    pub oldest_ready_age_seconds: Option<f64>,
    /// `pg_stat_archiver`: failed calls since the statistics were reset, and the last ones.
    pub archiver_failed_count: u64,
    pub archiver_last_failed_wal: Option<String>,
    pub archiver_last_failed_time: Option<String>,
    pub archiver_last_archived_time: Option<String>,
    /// The stream's slot; `None` when the server has no slot of that name.
    pub slot: Option<SlotWatch>,
}

/// The stream's replication slot and its connection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlotWatch {
    pub name: String,
    /// Whether a connection streams from it now.
    pub active: bool,
    /// `reserved`, `extended`, `unreserved` or `lost` (invalidated by `max_slot_wal_keep_size`).
    pub wal_status: Option<String>,
    /// WAL the slot keeps on the server, in bytes: from its restart position to the server's.
    pub retained_bytes: Option<u64>,
    /// How far the stream's flushed (stored) position is behind the server's, in bytes (from
    /// the slot's restart position while the stream has reported none, or is not connected).
    pub lag_bytes: Option<u64>,
    /// `pg_stat_replication.flush_lag`: how long the last commits waited for the stream's
    /// flush, in seconds (none when nothing was written lately).
    pub flush_lag_seconds: Option<f64>,
    /// The connection's `application_name` and `sync_state` (`async`, `sync`, …).
    pub application_name: Option<String>,
    pub sync_state: Option<String>,
}

/// Reads the server's side of archiving and streaming.
pub async fn observe(options: &WatchOptions) -> Result<ServerWatch, Error> {
    tokio::time::timeout(options.timeout, observe_unbounded(options))
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Transient,
                format!(
                    "reading the server's archiving state took more than {:?}",
                    options.timeout
                ),
            )
        })?
}

async fn observe_unbounded(options: &WatchOptions) -> Result<ServerWatch, Error> {
    let config = ConnConfig::from_env(&options.conninfo).map_err(|e| {
        Error::new(
            ErrorKind::Configuration,
            format!("the connection string is not usable: {e}"),
        )
    })?;
    let database = config.dbname.clone().unwrap_or_else(|| config.user.clone());
    let connect = ConnectOptions {
        mode: ReplicationMode::Logical { database },
        connect_timeout: DEFAULT_CONNECT_TIMEOUT.min(options.timeout),
        read_timeout: options.timeout,
        fallback_application_name: Some("walcore watch".to_owned()),
    };
    let mut session = ReplicationConnection::connect(&config, &connect)
        .await
        .map_err(|e| Error::from(e).context("connecting to the server"))?;
    let result = read_all(&mut session, &options.slot).await;
    let _ = session.close().await;
    result
}

async fn read_all(session: &mut ReplicationConnection, slot: &str) -> Result<ServerWatch, Error> {
    let row = one_row(
        session,
        "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS now, \
                pg_is_in_recovery() AS in_recovery, \
                CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() \
                     ELSE pg_current_wal_lsn() END AS lsn",
        "reading the server's position",
    )
    .await?;
    let observed_at = text(&row, "now")?.unwrap_or_default();
    let in_recovery = text(&row, "in_recovery")?.as_deref() == Some("t");
    let lsn = text(&row, "lsn")?;

    let row = one_row(
        session,
        "SELECT count(*) AS ready, \
                extract(epoch FROM now() - min(modification)) AS oldest \
         FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'",
        "listing pg_wal/archive_status (pg_ls_archive_statusdir(): grant the role pg_monitor)",
    )
    .await?;
    let ready_files = number(&row, "ready")?.unwrap_or(0.0) as u64;
    let oldest_ready_age_seconds = number(&row, "oldest")?.map(|s| s.max(0.0));

    let row = one_row(
        session,
        "SELECT failed_count, last_failed_wal, \
                to_char(last_failed_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') \
                    AS last_failed_time, \
                to_char(last_archived_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') \
                    AS last_archived_time \
         FROM pg_stat_archiver",
        "reading pg_stat_archiver",
    )
    .await?;
    let archiver_failed_count = number(&row, "failed_count")?.unwrap_or(0.0) as u64;
    let archiver_last_failed_wal = text(&row, "last_failed_wal")?;
    let archiver_last_failed_time = text(&row, "last_failed_time")?;
    let archiver_last_archived_time = text(&row, "last_archived_time")?;

    let here = lsn.map_or_else(|| "NULL".to_owned(), |l| format!("'{l}'::pg_lsn"));
    let sql = format!(
        "SELECT s.active, s.wal_status, \
                pg_wal_lsn_diff({here}, s.restart_lsn)::bigint AS retained, \
                pg_wal_lsn_diff({here}, coalesce(r.flush_lsn, s.restart_lsn))::bigint AS lag, \
                extract(epoch FROM r.flush_lag) AS flush_lag, \
                r.application_name, r.sync_state \
         FROM pg_replication_slots s \
         LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
         WHERE s.slot_name = {}",
        quote(slot)
    );
    let rows = session
        .simple_query(&sql)
        .await
        .map_err(|e| Error::from(e).context("reading pg_replication_slots"))?;
    let slot = match rows.first() {
        None => None,
        Some(row) => Some(SlotWatch {
            name: slot.to_owned(),
            active: text(row, "active")?.as_deref() == Some("t"),
            wal_status: text(row, "wal_status")?,
            retained_bytes: number(row, "retained")?.map(|b| b.max(0.0) as u64),
            lag_bytes: number(row, "lag")?.map(|b| b.max(0.0) as u64),
            flush_lag_seconds: number(row, "flush_lag")?,
            application_name: text(row, "application_name")?,
            sync_state: text(row, "sync_state")?,
        }),
    };
    Ok(ServerWatch {
        observed_at,
        in_recovery,
        ready_files,
        oldest_ready_age_seconds,
        archiver_failed_count,
        archiver_last_failed_wal,
        archiver_last_failed_time,
        archiver_last_archived_time,
        slot,
    })
}

/// A SQL string literal.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

async fn one_row(
    session: &mut ReplicationConnection,
    sql: &str,
    doing: &str,
) -> Result<Row, Error> {
    let rows = session
        .simple_query(sql)
        .await
        .map_err(|e| Error::from(e).context(doing.to_owned()))?;
    rows.into_iter()
        .next()
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, format!("{doing}: no row")))
}

fn text(row: &Row, column: &str) -> Result<Option<String>, Error> {
    row.text(column)
        .map(|v| v.map(str::to_owned))
        .map_err(|e| Error::new(ErrorKind::InvalidInput, format!("column {column}: {e}")))
}

fn number(row: &Row, column: &str) -> Result<Option<f64>, Error> {
    match text(row, column)? {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("column {column}: '{v}' is not a number"),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn a_slot_name_is_quoted_as_a_literal() {
        assert_eq!(quote("walcore"), "'walcore'");
        assert_eq!(quote("it's"), "'it''s'");
    }
}
