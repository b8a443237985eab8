//! `walcore check`: is this setup archiving, into this repository, right now?
//!
//! ```text
//! server ──replication=true──▶ IDENTIFY_SYSTEM, SHOW wal_level, archive_mode, archive_command, …
//!        ──replication=database──▶ pg_is_in_recovery(), txid_current(), pg_switch_wal(),
//!                                  pg_stat_archiver
//! repository ──▶ meta/repository (the key, the cluster), check/HEX probe (write, read, delete)
//!            ──▶ HEAD of the switched segment's key, until it appears or the time is up
//! ```
//!
//! Each check is one [`Item`] of a [`Report`]: passed, failed (with what to change), or skipped
//! (with why). The facts are gathered first (the server's settings over a physical replication
//! connection, as `take` connects; the repository's metadata and a probe), the items are
//! decided from them by pure functions, and only when every earlier item passed on a primary
//! does the check switch WAL and wait for the segment, because waiting for a segment that
//! cannot be archived only spends the operator's time. Everything runs under one time limit
//! (`--timeout`), connections included.
//!
//! *Does not* change PostgreSQL's configuration, nor write anything to the repository but its
//! probe, which it deletes again (FORMAT.md §2, `check/`). The only write on the server is the
//! WAL switch (and the transaction ID that makes sure there is something to switch).

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::codec::envelope::{HEADER_LEN, Header};
use crate::config::{Config, KeySource, program_of};
use crate::error::{Error, ErrorKind};
use crate::pg::{Lsn, TimelineId, WalFileName, WalSegmentSize};
use crate::replication::conn::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT};
use crate::replication::{
    ConnConfig, ConnectOptions, ReplicationConnection, ReplicationError, ReplicationMode, Row,
    SystemInfo,
};
use crate::repo::{RepoMeta, Repository};
use crate::store::{META_KEY, PutOutcome, StoreError, wal_key};

/// The prefix of probe objects (FORMAT.md §2): `check/` and 32 random hexadecimal digits.
pub const PROBE_PREFIX: &str = "check/";

/// How long the whole check may take when `--timeout` does not say: enough for an archiver
/// that retries a failing command (three tries a second apart) to show its failures, and for a
/// store on another continent.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The first pause between two looks for the switched segment; it doubles up to
/// [`POLL_MAX`]. An archiver that works stores a segment within a fraction of a second on a
/// file system, so the first looks come quickly; later ones spare a cloud store's requests.
const POLL_FIRST: Duration = Duration::from_millis(100);
/// The longest pause between two looks for the switched segment.
const POLL_MAX: Duration = Duration::from_secs(1);
/// At most this much of the time limit is kept back, after waiting for the segment, to ask
/// `pg_stat_archiver` why it did not arrive.
const STATS_RESERVE: Duration = Duration::from_secs(2);

/// The program named in suggested `archive_command`s when the caller knows no better.
pub const DEFAULT_ARCHIVE_PROGRAM: &str = "/usr/local/bin/walcore-archive";

/// What to check, beyond the repository's configuration.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The connection string or URL (libpq style; `PG*` variables and `.pgpass` complete it).
    pub conninfo: String,
    /// The time limit of the whole check.
    pub timeout: Duration,
    /// The `walcore-archive` to name in a suggested `archive_command`.
    pub archive_program: String,
}

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Failed,
    Skipped,
}

/// One check: its name (stable, for scripts), how it came out, and a message that says what
/// was found and, on a failure, what to change.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub name: &'static str,
    pub status: Status,
    pub message: String,
    /// The kind of a failure, which decides the exit status (`docs/exit-codes.md`).
    #[serde(skip)]
    pub kind: Option<ErrorKind>,
}

impl Item {
    fn ok(name: &'static str, message: impl Into<String>) -> Item {
        Item {
            name,
            status: Status::Ok,
            message: message.into(),
            kind: None,
        }
    }

    fn failed(name: &'static str, kind: ErrorKind, message: impl Into<String>) -> Item {
        Item {
            name,
            status: Status::Failed,
            message: message.into(),
            kind: Some(kind),
        }
    }

    fn skipped(name: &'static str, message: impl Into<String>) -> Item {
        Item {
            name,
            status: Status::Skipped,
            message: message.into(),
            kind: None,
        }
    }
}

/// The names of the checks, in the order they are reported.
pub mod names {
    pub const CONNECTION: &str = "connection";
    pub const WAL_LEVEL: &str = "wal_level";
    pub const ARCHIVE_MODE: &str = "archive_mode";
    pub const ARCHIVE_COMMAND: &str = "archive_command";
    pub const SYSTEM_IDENTIFIER: &str = "system_identifier";
    pub const REPOSITORY: &str = "repository";
    pub const ARCHIVING: &str = "archiving";
}

/// Every check's outcome, in order. `passed` is true when none failed (a check skipped on a
/// standby, where WAL cannot be switched, is not a failure).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub passed: bool,
    pub checks: Vec<Item>,
}

impl Report {
    fn new(checks: Vec<Item>) -> Report {
        Report {
            passed: !checks.iter().any(|i| i.status == Status::Failed),
            checks,
        }
    }

    /// The first failed check.
    pub fn first_failure(&self) -> Option<&Item> {
        self.checks.iter().find(|i| i.status == Status::Failed)
    }

    /// `Ok` when every check passed; otherwise an error of the first failure's kind (the exit
    /// status) that counts the failures.
    pub fn outcome(&self) -> Result<(), Error> {
        let Some(first) = self.first_failure() else {
            return Ok(());
        };
        let failed = self
            .checks
            .iter()
            .filter(|i| i.status == Status::Failed)
            .count();
        Err(Error::new(
            first.kind.unwrap_or(ErrorKind::Internal),
            format!(
                "walcore check: {failed} of {} checks failed, first {}",
                self.checks.len(),
                first.name
            ),
        ))
    }
}

impl fmt::Display for Report {
    /// One line per check: `ok   wal_level = replica`, `FAIL archive_mode = off: …`,
    /// `skip archiving: …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for item in &self.checks {
            let tag = match item.status {
                Status::Ok => "ok",
                Status::Failed => "FAIL",
                Status::Skipped => "skip",
            };
            writeln!(f, "{tag:<4} {}", item.message)?;
        }
        Ok(())
    }
}

/// Runs every check against the server of `options.conninfo` and `repo` (opened with `config`).
/// Never fails as a whole: what goes wrong is an item of the report.
pub async fn check(repo: &Repository, config: &Config, options: &CheckOptions) -> Report {
    let deadline = Deadline::new(options.timeout);
    let (server, mut sql) = match ConnConfig::from_env(&options.conninfo) {
        Ok(conn_config) => {
            let server = inspect_server(&conn_config, &deadline).await;
            let sql = match &server {
                Ok(_) => Some(open_sql_session(&conn_config, &deadline).await),
                Err(_) => None,
            };
            (server, sql)
        }
        Err(e) => (
            Err(Item::failed(
                names::CONNECTION,
                ErrorKind::Configuration,
                format!(
                    "the connection string is not usable: {e}: fix --dbname or the PG* variables"
                ),
            )),
            None,
        ),
    };
    // Whether the server is a standby: from the SQL session when there is one, else from the
    // `in_hot_standby` the server reports at startup (PostgreSQL 14 and later).
    let mut standby = server.as_ref().ok().and_then(|s| s.in_hot_standby);
    if let Some(Ok(session)) = &mut sql {
        match ask_recovery(session, &deadline).await {
            Ok(in_recovery) => standby = Some(in_recovery),
            Err(e) => sql = Some(Err(e)),
        }
    }
    let (repository, meta) = inspect_repository(repo, config, &deadline).await;

    let mut items = Vec::new();
    match &server {
        Ok(s) => {
            items.push(Item::ok(
                names::CONNECTION,
                format!(
                    "connected to {} as {} for replication (PostgreSQL {})",
                    s.address, s.user, s.version
                ),
            ));
            items.push(wal_level_item(&s.wal_level));
            items.push(archive_mode_item(&s.archive_mode, standby == Some(true)));
            items.push(archive_command_item(
                &s.archive_command,
                s.archive_library.as_deref(),
                &s.archive_mode,
                &options.archive_program,
            ));
        }
        Err(failure) => {
            items.push(failure.clone());
            for name in [
                names::WAL_LEVEL,
                names::ARCHIVE_MODE,
                names::ARCHIVE_COMMAND,
            ] {
                items.push(Item::skipped(
                    name,
                    format!("{name}: not checked without a connection to the server"),
                ));
            }
        }
    }
    items.push(system_identifier_item(
        server.as_ref().ok(),
        meta.as_ref(),
        &repo.store().describe(),
    ));
    items.push(repository);

    let archiving = match (&server, sql) {
        (Err(_), _) | (_, None) => Item::skipped(
            names::ARCHIVING,
            "archiving: not checked without a connection to the server",
        ),
        (Ok(_), _) if standby == Some(true) => Item::skipped(
            names::ARCHIVING,
            "archiving: this server is a standby (in recovery), which cannot switch WAL, so \
             no segment was sent through archive_command: run walcore check against the primary",
        ),
        (Ok(s), _) if s.archive_mode == "off" => Item::skipped(
            names::ARCHIVING,
            "archiving: not tried with archive_mode = off (nothing would archive a switched \
             segment)",
        ),
        (Ok(_), _) if items.iter().any(|i| i.status == Status::Failed) => Item::skipped(
            names::ARCHIVING,
            "archiving: not tried until the failures above are fixed (a switched segment would \
             not arrive in this repository)",
        ),
        (Ok(_), Some(Err(failure))) => failure,
        (Ok(s), Some(Ok(mut session))) => {
            let item = check_archiving(&mut session, s, repo, &deadline).await;
            let _ = deadline.limit(session.close()).await;
            item
        }
    };
    items.push(archiving);
    Report::new(items)
}

/// One time limit for the whole check.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    total: Duration,
}

impl Deadline {
    fn new(total: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + total,
            total,
        }
    }

    fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// `limit`, or less when less time is left (never zero: a zero time limit means "none" to
    /// some callees).
    fn cap(&self, limit: Duration) -> Duration {
        limit.min(self.remaining()).max(Duration::from_millis(1))
    }

    /// `fut`'s output, or `None` when the time is up first.
    async fn limit<T>(&self, fut: impl Future<Output = T>) -> Option<T> {
        tokio::time::timeout(self.remaining(), fut).await.ok()
    }

    /// `fut`'s result, or an error saying that `doing` outlived the time limit.
    async fn run<T, E: Into<Error>>(
        &self,
        doing: &str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, Error> {
        match self.limit(fut).await {
            Some(r) => r.map_err(Into::into),
            None => Err(self.expired(doing)),
        }
    }

    fn expired(&self, doing: &str) -> Error {
        Error::new(
            ErrorKind::Transient,
            format!(
                "{doing}: no answer within the time limit of the check ({}, --timeout)",
                seconds(self.total)
            ),
        )
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// What the server said about itself over a physical replication connection.
#[derive(Debug, Clone)]
struct Server {
    address: String,
    user: String,
    version: String,
    system: SystemInfo,
    seg_size: WalSegmentSize,
    wal_level: String,
    archive_mode: String,
    archive_command: String,
    /// `None` before PostgreSQL 15, which has no archive modules.
    archive_library: Option<String>,
    /// `in_hot_standby` as reported at startup (PostgreSQL 14 and later).
    in_hot_standby: Option<bool>,
}

/// Connects for physical replication, as `take` does, and reads the settings archiving depends
/// on. A failure is the connection item, with what to change.
async fn inspect_server(conn_config: &ConnConfig, deadline: &Deadline) -> Result<Server, Item> {
    let failed = |kind, message: String| Item::failed(names::CONNECTION, kind, message);
    let options = ConnectOptions {
        mode: ReplicationMode::Physical,
        connect_timeout: deadline.cap(DEFAULT_CONNECT_TIMEOUT),
        read_timeout: deadline.cap(DEFAULT_READ_TIMEOUT),
        fallback_application_name: Some("walcore check".to_owned()),
    };
    let mut conn = match deadline
        .limit(ReplicationConnection::connect(conn_config, &options))
        .await
    {
        Some(Ok(conn)) => conn,
        Some(Err(e)) => {
            let hint = connection_hint(&e, &conn_config.user);
            return Err(failed(
                e.kind(),
                format!("cannot connect to PostgreSQL for replication: {e}{hint}"),
            ));
        }
        None => {
            return Err(failed(
                ErrorKind::Transient,
                deadline
                    .expired("connecting to PostgreSQL for replication")
                    .to_string(),
            ));
        }
    };
    let address = conn.server().to_owned();
    let asking = |e: Error| failed(e.kind(), format!("{address}: {e}"));
    let system = deadline
        .run("IDENTIFY_SYSTEM", conn.identify_system())
        .await
        .map_err(asking)?;
    let version_num = conn.server_version_num().unwrap_or(0);
    let mut settings = Vec::new();
    let mut wanted = vec![
        "wal_level",
        "archive_mode",
        "archive_command",
        "wal_segment_size",
    ];
    if version_num >= 150_000 {
        wanted.push("archive_library");
    }
    for name in wanted {
        let value = show(&mut conn, name, deadline).await.map_err(asking)?;
        settings.push(value);
    }
    let seg_size = crate::config::parse_bytes(&settings[3])
        .ok()
        .and_then(|b| u32::try_from(b).ok())
        .and_then(|b| WalSegmentSize::new(b).ok())
        .ok_or_else(|| {
            failed(
                ErrorKind::InvalidInput,
                format!(
                    "{address}: wal_segment_size '{}' is not a WAL segment size",
                    settings[3]
                ),
            )
        })?;
    let server = Server {
        address: address.clone(),
        user: conn.user().to_owned(),
        version: conn
            .server_version()
            .unwrap_or("of unknown version")
            .to_owned(),
        system,
        seg_size,
        wal_level: settings[0].clone(),
        archive_mode: settings[1].clone(),
        archive_command: settings[2].clone(),
        archive_library: settings.get(4).cloned(),
        in_hot_standby: conn.parameter("in_hot_standby").map(|v| v == "on"),
    };
    let _ = deadline.limit(conn.close()).await;
    Ok(server)
}

/// `SHOW name` over a replication connection.
async fn show(
    conn: &mut ReplicationConnection,
    name: &str,
    deadline: &Deadline,
) -> Result<String, Error> {
    let doing = format!("SHOW {name}");
    let rows = deadline.run(&doing, conn.simple_query(&doing)).await?;
    first_text(&rows).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{doing}: the server sent no value"),
        )
    })
}

/// The first column of the first row, as text.
fn first_text(rows: &[Row]) -> Option<String> {
    rows.first()
        .and_then(|r| r.raw(0))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// What to change when the replication connection is refused, by SQLSTATE.
fn connection_hint(e: &ReplicationError, user: &str) -> String {
    match e.sqlstate() {
        // "no pg_hba.conf entry for replication connection from host …"
        Some("28000") => "; add a line for database 'replication' (physical replication), this \
                          user and this host to pg_hba.conf, then reload PostgreSQL"
            .to_owned(),
        // "must be superuser or replication role to start walsender"
        Some("42501") => {
            format!("; give the user the REPLICATION attribute: ALTER ROLE \"{user}\" REPLICATION")
        }
        Some("28P01") => {
            "; check the password (PGPASSWORD, ~/.pgpass or the connection string)".to_owned()
        }
        // "number of requested standby connections exceeds max_wal_senders"
        Some("53300") => "; raise max_wal_senders (a restart) or end other walsenders".to_owned(),
        _ => String::new(),
    }
}

/// A SQL session (`replication=database`): the database of the connection string, else
/// libpq's default, the user's name. Switching WAL and reading `pg_stat_archiver` need one.
/// A failure is the archiving item.
async fn open_sql_session(
    conn_config: &ConnConfig,
    deadline: &Deadline,
) -> Result<ReplicationConnection, Item> {
    let database = conn_config
        .dbname
        .clone()
        .unwrap_or_else(|| conn_config.user.clone());
    let options = ConnectOptions {
        mode: ReplicationMode::Logical {
            database: database.clone(),
        },
        connect_timeout: deadline.cap(DEFAULT_CONNECT_TIMEOUT),
        read_timeout: deadline.cap(DEFAULT_READ_TIMEOUT),
        fallback_application_name: Some("walcore check".to_owned()),
    };
    deadline
        .run(
            "connecting",
            ReplicationConnection::connect(conn_config, &options),
        )
        .await
        .map_err(|e| {
            Item::failed(
                names::ARCHIVING,
                e.kind(),
                format!(
                    "archiving: cannot open a SQL session (replication=database) on database \
                     \"{database}\" to switch WAL: {e}; let this user connect to that database \
                     in pg_hba.conf, or name another database in --dbname"
                ),
            )
        })
}

/// `pg_is_in_recovery()`.
async fn ask_recovery(
    session: &mut ReplicationConnection,
    deadline: &Deadline,
) -> Result<bool, Item> {
    let rows = deadline
        .run(
            "SELECT pg_is_in_recovery()",
            session.simple_query("SELECT pg_is_in_recovery()"),
        )
        .await
        .map_err(|e| Item::failed(names::ARCHIVING, e.kind(), format!("archiving: {e}")))?;
    Ok(first_text(&rows).as_deref() == Some("t"))
}

fn wal_level_item(wal_level: &str) -> Item {
    match wal_level {
        "replica" | "logical" => Item::ok(names::WAL_LEVEL, format!("wal_level = {wal_level}")),
        other => Item::failed(
            names::WAL_LEVEL,
            ErrorKind::Configuration,
            format!(
                "wal_level = {other}: set wal_level = replica in postgresql.conf and restart \
                 PostgreSQL (WAL at level minimal cannot be archived or restored)"
            ),
        ),
    }
}

fn archive_mode_item(archive_mode: &str, standby: bool) -> Item {
    match (archive_mode, standby) {
        ("always", _) | ("on", false) => Item::ok(
            names::ARCHIVE_MODE,
            format!("archive_mode = {archive_mode}"),
        ),
        ("on", true) => Item::ok(
            names::ARCHIVE_MODE,
            "archive_mode = on: this server is a standby, which does not archive with 'on' \
             (it will once promoted): the primary archives; set archive_mode = always here \
             (and restart) for this standby to archive too",
        ),
        (other, _) => Item::failed(
            names::ARCHIVE_MODE,
            ErrorKind::Configuration,
            format!(
                "archive_mode = {other}: set archive_mode = on in postgresql.conf (always on \
                 a standby that should archive) and restart PostgreSQL: archive_mode changes \
                 only at a restart"
            ),
        ),
    }
}

fn archive_command_item(
    command: &str,
    library: Option<&str>,
    archive_mode: &str,
    program: &str,
) -> Item {
    let expected = format!("archive_command = '{program} %p'");
    let failed =
        |message: String| Item::failed(names::ARCHIVE_COMMAND, ErrorKind::Configuration, message);
    // SHOW archive_command says only this while archiving is off.
    if archive_mode == "off" && command == "(disabled)" {
        return Item::skipped(
            names::ARCHIVE_COMMAND,
            format!(
                "archive_command: PostgreSQL shows '(disabled)' while archive_mode = off; it \
                 must be {expected}: run walcore check again after the restart"
            ),
        );
    }
    if let Some(library) = library.filter(|l| !l.is_empty()) {
        return failed(format!(
            "archive_library = '{library}' is set, so PostgreSQL ignores archive_command: set \
             archive_library = '' and {expected} in postgresql.conf and reload PostgreSQL \
             (SELECT pg_reload_conf())"
        ));
    }
    match archive_command_problem(command) {
        None => Item::ok(
            names::ARCHIVE_COMMAND,
            format!("archive_command = '{command}'"),
        ),
        Some(problem) => failed(format!(
            "archive_command = '{command}' {problem}: set {expected} in postgresql.conf and \
             reload PostgreSQL (SELECT pg_reload_conf())"
        )),
    }
}

/// Why `command` is not an archive_command that runs walcore-archive on `%p`, or `None`.
///
/// The command is read as words separated by white space (quotes around a word removed), up
/// to the first shell operator after it (`;`, `&&`, `||`, `|`): a word whose file name is
/// `walcore-archive` must come, followed by the word `%p`; `%f` must not follow it, since
/// walcore-archive takes one file and refuses a second argument.
pub fn archive_command_problem(command: &str) -> Option<&'static str> {
    if command.trim().is_empty() {
        return Some("is empty");
    }
    let spaced = command
        .replace(';', " ; ")
        .replace("&&", " && ")
        .replace('|', " | ");
    let words: Vec<&str> = spaced
        .split_whitespace()
        .map(|w| w.trim_matches(|c| c == '\'' || c == '"'))
        .collect();
    let Some(at) = words.iter().position(|w| {
        std::path::Path::new(w)
            .file_name()
            .is_some_and(|n| n == "walcore-archive")
    }) else {
        return Some("does not run walcore-archive");
    };
    let arguments: Vec<&str> = words[at + 1..]
        .iter()
        .copied()
        .take_while(|w| !matches!(*w, ";" | "&&" | "|"))
        .collect();
    if arguments.contains(&"%f") {
        return Some("passes %f, which walcore-archive refuses (it takes %p only)");
    }
    if !arguments.contains(&"%p") {
        return Some("does not pass %p to walcore-archive");
    }
    None
}

fn system_identifier_item(
    server: Option<&Server>,
    meta: Option<&Option<RepoMeta>>,
    repo_url: &str,
) -> Item {
    let name = names::SYSTEM_IDENTIFIER;
    let Some(server) = server else {
        return Item::skipped(
            name,
            "system identifier: not compared without a connection to the server",
        );
    };
    let ours = server.system.system_id;
    let Some(meta) = meta else {
        return Item::skipped(
            name,
            format!(
                "system identifier {ours}: not compared, the repository's metadata could not be \
                 read (see the repository check)"
            ),
        );
    };
    let Some(meta) = meta else {
        return Item::ok(
            name,
            format!(
                "system identifier {ours}: repository {repo_url} has no metadata yet; the first \
                 archived segment will create it for this cluster"
            ),
        );
    };
    let theirs = match meta.system_id() {
        Ok(id) => id,
        Err(e) => return Item::failed(name, e.kind(), e.to_string()),
    };
    if theirs != ours {
        return Item::failed(
            name,
            ErrorKind::InvalidInput,
            format!(
                "system identifier {ours} of the server is not {theirs}, the cluster of \
                 repository {repo_url}: this repository belongs to another cluster; use another \
                 WALCORE_REPO prefix for this one"
            ),
        );
    }
    if meta.wal_segment_size != server.seg_size.bytes() {
        return Item::failed(
            name,
            ErrorKind::InvalidInput,
            format!(
                "system identifier {ours} matches, but the server's wal_segment_size is {} \
                 bytes and repository {repo_url} records {}: use another WALCORE_REPO prefix",
                server.seg_size.bytes(),
                meta.wal_segment_size
            ),
        );
    }
    Item::ok(
        name,
        format!("system identifier {ours} matches repository {repo_url}"),
    )
}

/// Reads the metadata (the key and the cluster) and writes, reads back and deletes a probe.
/// Returns the repository item and the metadata when it could be read (`Some(None)`: none yet).
async fn inspect_repository(
    repo: &Repository,
    config: &Config,
    deadline: &Deadline,
) -> (Item, Option<Option<RepoMeta>>) {
    let url = repo.store().describe();
    let name = names::REPOSITORY;
    let meta = match deadline
        .run("reading the repository metadata", repo.read_meta())
        .await
    {
        Ok(meta) => meta,
        Err(e) if matches!(e.kind(), ErrorKind::WrongKey | ErrorKind::Integrity) => {
            let item = match key_mismatch(repo, config, deadline).await {
                Some(message) => Item::failed(name, ErrorKind::WrongKey, message),
                None => Item::failed(name, e.kind(), format!("repository {url}: {e}")),
            };
            return (item, None);
        }
        Err(e) => {
            let message = store_failure(&url, &e);
            return (Item::failed(name, e.kind(), message), None);
        }
    };
    if let Err(e) = deadline.run("writing a probe", probe(repo)).await {
        let message = store_failure(&url, &e);
        return (Item::failed(name, e.kind(), message), Some(meta));
    }
    let key = match (&config.key, &meta) {
        (None, Some(_)) => "its objects are not encrypted".to_owned(),
        (None, None) => "objects will not be encrypted (no key is configured)".to_owned(),
        (Some(k), Some(_)) => format!("key {} reads its metadata", k.fingerprint()),
        (Some(k), None) => format!(
            "no metadata yet to try key {} on; the first archived segment will be encrypted \
             with it",
            k.fingerprint()
        ),
    };
    let item = Item::ok(
        name,
        format!(
            "repository {url} is reachable and writable (a probe under {PROBE_PREFIX} was written, read back and deleted); {key}"
        ),
    );
    (item, Some(meta))
}

/// The message for metadata that the configured key cannot read, from the fingerprint in its
/// header; `None` when the header does not show a key problem (corruption, then).
async fn key_mismatch(repo: &Repository, config: &Config, deadline: &Deadline) -> Option<String> {
    let stored = deadline.limit(repo.store().get(META_KEY)).await?.ok()?;
    let header = Header::parse(stored.get(..HEADER_LEN)?).ok()??;
    let configured = config.key.as_ref().map(|k| k.fingerprint());
    let source = key_source(&config.key_source);
    match (header.fingerprint, configured) {
        (Some(written), Some(given)) if written != given => Some(format!(
            "wrong key: the repository was written with key {written}, {source} gives {given}: \
             configure the key of fingerprint {written}, or use another WALCORE_REPO prefix for \
             a new repository"
        )),
        (Some(written), None) => Some(format!(
            "wrong key: the repository was written with key {written}, and no key is \
             configured: set WALCORE_ENCRYPTION_KEY, WALCORE_ENCRYPTION_KEY_FILE or \
             WALCORE_ENCRYPTION_KEY_COMMAND to that key"
        )),
        (None, Some(given)) => Some(format!(
            "wrong key: the repository is not encrypted, but {source} gives key {given}: remove \
             the key setting to use this repository, or use another WALCORE_REPO prefix for an \
             encrypted one"
        )),
        _ => None,
    }
}

/// Where the configured key came from, for messages (never the key).
fn key_source(source: &KeySource) -> String {
    match source {
        KeySource::None => "the configuration".to_owned(),
        KeySource::Inline => "WALCORE_ENCRYPTION_KEY (or encryption_key)".to_owned(),
        KeySource::File(path) => format!("WALCORE_ENCRYPTION_KEY_FILE {path}"),
        KeySource::Command(c) => {
            format!("WALCORE_ENCRYPTION_KEY_COMMAND (program {})", program_of(c))
        }
    }
}

/// A failure of the store, with what to look at.
fn store_failure(url: &str, e: &Error) -> String {
    let local = url.starts_with("file://");
    let what = match (e.kind(), local) {
        (ErrorKind::Transient, false) => {
            "the store did not answer: check the host in WALCORE_REPO, the endpoint \
             (AWS_ENDPOINT_URL and the like), the network and firewalls"
        }
        (ErrorKind::Storage, false) => {
            "the store refused: check that the bucket or container exists and that the \
             credentials may read, write and delete under the repository's prefix"
        }
        (ErrorKind::Configuration, _) => "check WALCORE_REPO and the store's settings",
        (_, true) => {
            "check that the directory exists and that this user may read, write and delete \
             in it"
        }
        _ => "see the error above",
    };
    format!("repository {url}: {e:#}; {what}")
}

/// Writes `check/HEX` create-only, reads it back through the codec, and deletes it.
async fn probe(repo: &Repository) -> Result<(), Error> {
    let mut random = [0u8; 16];
    getrandom::fill(&mut random)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("drawing a probe name: {e}")))?;
    let key = format!("{PROBE_PREFIX}{}", hex::encode(random));
    let created = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let body = serde_json::to_vec(&serde_json::json!({
        "probe": "walcore check",
        "created_at_unix": created,
    }))
    .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    match repo.put_small(&key, body.clone()).await? {
        PutOutcome::Created => {}
        PutOutcome::AlreadyExists => {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("probe {key} already exists: is another check writing the same names?"),
            ));
        }
    }
    let read = repo.get_small(&key).await;
    let store = repo.store().describe();
    let deleted = repo
        .store()
        .delete(&key)
        .await
        .map_err(|e| e.into_error("deleting the probe", &key, &store));
    let read = read?;
    if read != body {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!("probe {key} in {store} read back different from what was written"),
        ));
    }
    deleted
}

/// The segment `pg_switch_wal()` completed, from the position it returned: the segment holding
/// the byte before it (`XLByteToPrevSeg`, as `pg_walfile_name()` computes it).
pub fn switched_segment(returned: Lsn, timeline: TimelineId, size: WalSegmentSize) -> WalFileName {
    let before = Lsn(returned.0.saturating_sub(1));
    WalFileName::segment(timeline, before.segment(size), size)
}

/// `pg_stat_archiver`, as text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiverStats {
    pub failed_count: u64,
    pub last_failed_wal: Option<String>,
    pub last_failed_time: Option<String>,
    pub last_archived_wal: Option<String>,
    pub last_archived_time: Option<String>,
}

async fn archiver_stats(
    session: &mut ReplicationConnection,
    deadline: &Deadline,
) -> Result<ArchiverStats, Error> {
    let sql = "SELECT failed_count, last_failed_wal, last_failed_time, last_archived_wal, \
               last_archived_time FROM pg_stat_archiver";
    let rows = deadline
        .run("reading pg_stat_archiver", session.simple_query(sql))
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "pg_stat_archiver returned no row"))?;
    let text = |name: &str| -> Result<Option<String>, Error> {
        row.text(name)
            .map(|v| v.map(str::to_owned))
            .map_err(|e| Error::new(ErrorKind::InvalidInput, format!("pg_stat_archiver: {e}")))
    };
    Ok(ArchiverStats {
        failed_count: text("failed_count")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        last_failed_wal: text("last_failed_wal")?,
        last_failed_time: text("last_failed_time")?,
        last_archived_wal: text("last_archived_wal")?,
        last_archived_time: text("last_archived_time")?,
    })
}

/// Switches WAL on the primary and waits until the completed segment is in the repository.
async fn check_archiving(
    session: &mut ReplicationConnection,
    server: &Server,
    repo: &Repository,
    deadline: &Deadline,
) -> Item {
    let name = names::ARCHIVING;
    let failed = |e: Error| Item::failed(name, e.kind(), format!("archiving: {e}"));
    let before = archiver_stats(session, deadline).await.ok();
    // pg_switch_wal() does nothing when nothing was written since the last switch: a
    // transaction ID makes sure something was (its commit record).
    if let Err(e) = deadline
        .run(
            "SELECT txid_current()",
            session.simple_query("SELECT txid_current()"),
        )
        .await
    {
        return failed(e);
    }
    let switched = match deadline
        .limit(session.simple_query("SELECT pg_switch_wal()"))
        .await
    {
        None => return failed(deadline.expired("SELECT pg_switch_wal()")),
        Some(Err(e)) if e.sqlstate() == Some("42501") => {
            return Item::failed(
                name,
                ErrorKind::Configuration,
                format!(
                    "archiving: {e}: the check needs to switch WAL: GRANT EXECUTE ON FUNCTION \
                     pg_switch_wal() TO \"{}\", or run walcore check as a superuser",
                    server.user
                ),
            );
        }
        Some(Err(e)) => return failed(e.into()),
        Some(Ok(rows)) => rows,
    };
    let lsn = match first_text(&switched).map(|t| t.parse::<Lsn>()) {
        Some(Ok(lsn)) => lsn,
        other => {
            return failed(Error::new(
                ErrorKind::InvalidInput,
                format!("pg_switch_wal() returned no position: {other:?}"),
            ));
        }
    };
    let segment = switched_segment(lsn, server.system.timeline, server.seg_size);
    let key = wal_key(&segment);
    let store = repo.store().describe();
    tracing::info!(segment = %segment, key = %key, "switched WAL; waiting for the segment");

    let started = Instant::now();
    let reserve = STATS_RESERVE.min(deadline.remaining() / 4);
    let until = deadline.at.checked_sub(reserve).unwrap_or(deadline.at);
    let mut pause = POLL_FIRST;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, repo.store().head(&key)).await {
            Ok(Ok(Some(_))) => {
                return Item::ok(
                    name,
                    format!(
                        "archiving: pg_switch_wal() completed segment {segment}, and \
                         archive_command stored it as {key} within {}",
                        seconds(started.elapsed())
                    ),
                );
            }
            Ok(Ok(None)) => {}
            Ok(Err(StoreError::Unavailable(e))) => {
                tracing::debug!("looking for {key}: {e}; looking again");
            }
            Ok(Err(e)) => return failed(e.into_error("looking for", &key, &store)),
            Err(_) => break,
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(POLL_MAX);
    }
    let after = archiver_stats(session, deadline).await;
    Item::failed(
        name,
        ErrorKind::Transient,
        explain_missing(
            &segment,
            &key,
            started.elapsed(),
            before.as_ref(),
            after.as_ref(),
        ),
    )
}

/// Why the switched segment did not arrive, from `pg_stat_archiver` before the switch and after
/// the wait.
pub fn explain_missing(
    segment: &WalFileName,
    key: &str,
    waited: Duration,
    before: Option<&ArchiverStats>,
    after: Result<&ArchiverStats, &Error>,
) -> String {
    let head = format!(
        "archiving: segment {segment} was not stored as {key} within {} after pg_switch_wal()",
        seconds(waited)
    );
    let stats = match after {
        Ok(s) => s,
        Err(e) => {
            return format!(
                "{head}; pg_stat_archiver could not be read ({e}): see the PostgreSQL log"
            );
        }
    };
    let name = segment.to_string();
    if stats.failed_count > 0
        && let Some(wal) = &stats.last_failed_wal
    {
        let at = stats
            .last_failed_time
            .as_deref()
            .unwrap_or("an unknown time");
        let during = match before {
            Some(b) => format!(
                " ({} during this check)",
                stats.failed_count.saturating_sub(b.failed_count)
            ),
            None => String::new(),
        };
        return format!(
            "{head}: archive_command has failed {} times{during}, last for segment {wal} at \
             {at}: see the PostgreSQL log for its error",
            stats.failed_count
        );
    }
    match &stats.last_archived_wal {
        Some(last) if last.len() == name.len() && *last >= name => format!(
            "{head}, although PostgreSQL reports it archived (last_archived_wal = {last}): \
             archive_command stores into another repository; check WALCORE_REPO (or \
             WALCORE_CONFIG) in PostgreSQL's environment"
        ),
        last => format!(
            "{head}; the archiver reports no failure (last archived: {}): it may still be \
             working through a backlog of segments, or archive_command is slow: see the \
             PostgreSQL log and pg_wal/archive_status",
            last.as_deref().unwrap_or("none")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(name: &str) -> WalFileName {
        WalFileName::parse(name).expect("a segment name")
    }

    #[test]
    fn the_switched_segment_is_the_one_before_the_returned_position() {
        let size = WalSegmentSize::default();
        let tl = TimelineId(1);
        // A switch inside segment 3 returns a position inside it (end of the switch record).
        assert_eq!(
            switched_segment("0/3000120".parse().expect("lsn"), tl, size),
            seg("000000010000000000000003")
        );
        // Nothing to switch: the start of the current segment, so the previous one.
        assert_eq!(
            switched_segment("0/4000000".parse().expect("lsn"), tl, size),
            seg("000000010000000000000003")
        );
        assert_eq!(
            switched_segment("1/0".parse().expect("lsn"), TimelineId(2), size),
            seg("0000000200000000000000FF")
        );
    }

    #[test]
    fn archive_commands_must_run_walcore_archive_on_p() {
        for good in [
            "/usr/local/bin/walcore-archive %p",
            "walcore-archive %p",
            "env WALCORE_REPO=s3://b/db1 /opt/walcore-archive --repo x %p",
            "'/usr/bin/walcore-archive' '%p'",
            "/usr/bin/walcore-archive %p && echo %f",
        ] {
            assert_eq!(archive_command_problem(good), None, "{good}");
        }
        for (bad, why) in [
            ("", "is empty"),
            ("   ", "is empty"),
            ("/bin/true", "does not run walcore-archive"),
            ("cp %p /mnt/archive/%f", "does not run walcore-archive"),
            (
                "/usr/bin/walcore-archive-old %p",
                "does not run walcore-archive",
            ),
            ("/usr/bin/walcore-archive %p %f", "passes %f"),
            ("/usr/bin/walcore-archive", "does not pass %p"),
            ("/usr/bin/walcore-archive; echo %p", "does not pass %p"),
        ] {
            let problem = archive_command_problem(bad).unwrap_or("(none)");
            assert!(problem.starts_with(why), "{bad:?}: {problem}");
        }
    }

    #[test]
    fn settings_items_name_the_fix() {
        assert_eq!(wal_level_item("replica").status, Status::Ok);
        assert_eq!(wal_level_item("logical").status, Status::Ok);
        let minimal = wal_level_item("minimal");
        assert_eq!(minimal.kind, Some(ErrorKind::Configuration));
        assert!(
            minimal
                .message
                .contains("set wal_level = replica in postgresql.conf and restart"),
            "{}",
            minimal.message
        );

        assert_eq!(archive_mode_item("on", false).status, Status::Ok);
        assert_eq!(archive_mode_item("always", true).status, Status::Ok);
        let standby = archive_mode_item("on", true);
        assert!(standby.message.contains("always"), "{}", standby.message);
        let off = archive_mode_item("off", false);
        assert_eq!(off.status, Status::Failed);
        assert!(
            off.message.contains("set archive_mode = on") && off.message.contains("restart"),
            "{}",
            off.message
        );

        let program = "/usr/local/bin/walcore-archive";
        assert_eq!(
            archive_command_item("/x/walcore-archive %p", Some(""), "on", program).status,
            Status::Ok
        );
        let wrong = archive_command_item("/bin/true", None, "on", program);
        assert!(
            wrong.message.contains("'/bin/true'")
                && wrong
                    .message
                    .contains("archive_command = '/usr/local/bin/walcore-archive %p'"),
            "{}",
            wrong.message
        );
        let library = archive_command_item(
            "/x/walcore-archive %p",
            Some("basic_archive"),
            "on",
            program,
        );
        assert_eq!(library.status, Status::Failed);
        assert!(
            library.message.contains("archive_library = ''"),
            "{}",
            library.message
        );
        let off = archive_command_item("(disabled)", None, "off", program);
        assert_eq!(off.status, Status::Skipped, "{}", off.message);
    }

    #[test]
    fn a_missing_segment_is_explained_by_the_archivers_failures() {
        let segment = seg("000000010000000000000003");
        let key = wal_key(&segment);
        let before = ArchiverStats {
            failed_count: 1,
            ..ArchiverStats::default()
        };
        let failing = ArchiverStats {
            failed_count: 4,
            last_failed_wal: Some("000000010000000000000003".into()),
            last_failed_time: Some("2026-01-01 00:00:00+00".into()),
            ..ArchiverStats::default()
        };
        let text = explain_missing(
            &segment,
            &key,
            Duration::from_secs(3),
            Some(&before),
            Ok(&failing),
        );
        assert!(
            text.contains(
                "archive_command has failed 4 times (3 during this check), last for segment \
                 000000010000000000000003 at 2026-01-01 00:00:00+00: see the PostgreSQL log"
            ),
            "{text}"
        );
        let elsewhere = ArchiverStats {
            last_archived_wal: Some("000000010000000000000003".into()),
            ..ArchiverStats::default()
        };
        let text = explain_missing(&segment, &key, Duration::from_secs(3), None, Ok(&elsewhere));
        assert!(text.contains("another repository"), "{text}");
        let quiet = explain_missing(
            &segment,
            &key,
            Duration::from_secs(3),
            None,
            Ok(&ArchiverStats::default()),
        );
        assert!(quiet.contains("no failure"), "{quiet}");
    }

    #[test]
    fn the_report_fails_with_the_first_failures_kind() {
        let report = Report::new(vec![
            Item::ok(names::WAL_LEVEL, "wal_level = replica"),
            Item::failed(names::REPOSITORY, ErrorKind::WrongKey, "wrong key: …"),
            Item::failed(
                names::ARCHIVE_MODE,
                ErrorKind::Configuration,
                "archive_mode = off",
            ),
            Item::skipped(names::ARCHIVING, "archiving: not tried"),
        ]);
        assert!(!report.passed);
        let e = report.outcome().expect_err("failed");
        assert_eq!(e.kind(), ErrorKind::WrongKey);
        assert!(e.to_string().contains("2 of 4 checks failed"), "{e}");
        assert_eq!(
            report.to_string(),
            "ok   wal_level = replica\nFAIL wrong key: …\nFAIL archive_mode = off\nskip \
             archiving: not tried\n"
        );
        let json = serde_json::to_value(&report).expect("JSON");
        assert_eq!(json["checks"][1]["status"], "failed");
        assert_eq!(json["checks"][1]["name"], "repository");

        let standby = Report::new(vec![
            Item::ok(names::WAL_LEVEL, "wal_level = replica"),
            Item::skipped(names::ARCHIVING, "standby"),
        ]);
        assert!(standby.passed);
        assert!(standby.outcome().is_ok());
    }
}
