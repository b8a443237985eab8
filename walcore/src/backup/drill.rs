//! `walcore drill`: a restore test that measures what a real disaster would cost.
//!
//! ```text
//! status ─▶ newest WAL stored          (the RPO's reference)
//! plan ─▶ restore into SCRATCH/data    download  ┐
//! postgres -D SCRATCH/data ─▶ accepts  start     ├ RTO
//!          ... replays, promotes       recovery  ┘
//! --query, pg_last_xact_replay_timestamp()       (the RPO)
//! fast shutdown, SCRATCH removed, report stored at drill/NAME
//! ```
//!
//! The server runs from the scratch directory on a private Unix socket (a directory only its
//! user may enter), with no TCP listener, no archiving, no replication and an HBA file of its
//! own, so a drill on the production host neither serves clients nor pushes a timeline into
//! the repository. The phases are timed back to back, so the RTO is exactly their sum:
//!
//! - **download**: planning and restoring the backup's files (fetch, decrypt, write, fsync);
//! - **start**: from starting PostgreSQL until it accepts a connection (it replays the WAL the
//!   backup needs to be consistent, fetched through `restore_command`);
//! - **recovery**: from then until it has replayed the archive up to the target and promoted.
//!
//! The RPO is how far the newest commit restored trails the newest WAL the repository held when
//! the drill began (a segment, or a piece the stream stored): on a database that commits
//! steadily, what a server lost right after its newest WAL was stored would take with it. With
//! `--target-time`, it trails the target instead.
//!
//! Every drill, passed or failed, stores its report (FORMAT.md §6.7); `walcore status` and the
//! metrics show the newest. *Does not* touch the server the backup came from, nor write to the
//! repository anything but the report.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::catalog::format_time;
use super::plan::{self, ArchiveMode, Request, Target, TargetAction};
use super::restore::{RestoreOptions, restore};
use crate::error::{Error, ErrorKind};
use crate::owner::Owner;
use crate::repo::Repository;

/// Where drill reports live (FORMAT.md §6.7).
pub const PREFIX: &str = "drill/";
/// Reports kept: two years of monthly drills; older ones are deleted after a new one is stored.
pub const KEPT_REPORTS: usize = 24;
/// The query run when `--query` does not say: it reads a catalog of every database.
pub const DEFAULT_QUERY: &str = "SELECT count(*) FROM pg_database";
/// How long PostgreSQL may take to stop after a fast shutdown before it is told to quit.
const STOP_TIME: Duration = Duration::from_secs(60);
/// How often the server is asked whether it accepts connections and whether it promoted.
const POLL: Duration = Duration::from_millis(100);
/// The most of the query's output a report keeps.
const OUTPUT_KEPT: usize = 4096;
/// Server log lines a failed drill's report keeps.
const LOG_LINES_KEPT: usize = 30;

/// What to drill.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// The directory the scratch directory is made in.
    pub scratch_parent: PathBuf,
    /// Backup, target and timeline as for a restore, with its `restore_command`; the archive
    /// mode and the action at the target are the drill's own (off, promote).
    pub request: Request,
    /// Where PostgreSQL's programs are (`--pg-bin`); else found for the backup's version.
    pub pg_bin: Option<PathBuf>,
    /// Run once the server promoted.
    pub query: String,
    pub database: String,
    /// The role to connect as; default: the name of the user the server runs as.
    pub user: Option<String>,
    /// More settings for the server (`--set NAME=VALUE`), after the drill's own.
    pub settings: Vec<(String, String)>,
    /// How long the whole drill may take.
    pub timeout: Duration,
    /// Leave the scratch directory (with the stopped server's files) for inspection.
    pub keep: bool,
    /// Who the server runs as when the drill runs as root.
    pub owner: Option<Owner>,
}

/// What a drill found (FORMAT.md §6.7). Times are RFC 3339 (UTC); durations in seconds, to
/// the millisecond.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DrillReport {
    pub format_version: u32,
    pub started_at: String,
    pub finished_at: String,
    pub host: String,
    pub passed: bool,
    /// Where it failed: `plan`, `download`, `start`, `recovery`, `query` or `stop`.
    pub failed_in: Option<String>,
    pub error: Option<String>,
    pub backup: Option<String>,
    /// The target, as a restore's plan names it.
    pub target: String,
    pub pg_bin: Option<String>,
    pub pg_version: Option<String>,
    pub restored_bytes: u64,
    /// download + start + recovery.
    pub rto_seconds: Option<f64>,
    pub download_seconds: Option<f64>,
    pub start_seconds: Option<f64>,
    pub recovery_seconds: Option<f64>,
    pub query_seconds: Option<f64>,
    /// `pg_last_xact_replay_timestamp()` once promoted: the newest commit restored.
    pub last_commit_restored: Option<String>,
    /// What the RPO is measured against: the newest WAL stored, or the target time.
    pub rpo_reference: Option<String>,
    pub rpo_reference_time: Option<String>,
    pub rpo_seconds: Option<f64>,
    pub query: String,
    pub query_output: Option<String>,
    /// The end of the server's log, when the drill failed after starting it.
    #[serde(default)]
    pub server_log: Vec<String>,
    pub scratch: String,
    pub scratch_removed: bool,
    pub created_by: String,
}

impl DrillReport {
    /// The report as the drill's exit: an error naming where and why it failed.
    pub fn outcome(&self) -> Result<(), Error> {
        if self.passed {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "the restore drill failed in {}: {}",
                self.failed_in.as_deref().unwrap_or("?"),
                self.error.as_deref().unwrap_or("no reason recorded")
            ),
        ))
    }
}

/// A phase that failed, and why.
struct Failure {
    phase: &'static str,
    error: String,
}

fn fail(phase: &'static str) -> impl Fn(Error) -> Failure {
    move |e| Failure {
        phase,
        error: format!("{e:#}"),
    }
}

/// Runs a drill as `options` say and returns its report; the report says whether it passed.
/// Only storing the report can fail the call itself (after the drill ran).
pub async fn drill(repo: &Repository, options: &DrillOptions) -> DrillReport {
    let started = SystemTime::now();
    let mut report = DrillReport {
        format_version: 1,
        started_at: format_time(started),
        host: crate::alert::hostname(),
        target: target_words(&options.request.target),
        query: options.query.clone(),
        created_by: format!("walcore {}", env!("CARGO_PKG_VERSION")),
        ..DrillReport::default()
    };
    let scratch = options.scratch_parent.join(scratch_name(started));
    report.scratch = scratch.display().to_string();
    let mut server = None;
    let result = match tokio::time::timeout(
        options.timeout,
        run(repo, options, &scratch, &mut report, &mut server),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(Failure {
            phase: phase_at_timeout(&report),
            error: format!(
                "the drill did not finish within its time limit ({:?}; --timeout)",
                options.timeout
            ),
        }),
    };
    let stopped = match server.take() {
        Some(s) => s.stop().await,
        None => Ok(()),
    };
    let result = result.and_then(|()| {
        stopped.map_err(|error| Failure {
            phase: "stop",
            error,
        })
    });
    if let Err(f) = result {
        report.failed_in = Some(f.phase.to_owned());
        report.error = Some(f.error);
        report.server_log = log_tail(&scratch.join("server.log"));
    } else {
        report.passed = true;
    }
    if !options.keep && scratch.exists() {
        match std::fs::remove_dir_all(&scratch) {
            Ok(()) => report.scratch_removed = true,
            Err(e) => tracing::warn!("removing the scratch directory {}: {e}", scratch.display()),
        }
    }
    report.finished_at = format_time(SystemTime::now());
    report
}

async fn run(
    repo: &Repository,
    options: &DrillOptions,
    scratch: &Path,
    report: &mut DrillReport,
    server: &mut Option<Server>,
) -> Result<(), Failure> {
    let deadline = Instant::now() + options.timeout;
    // The reference for the RPO: read before anything is timed (not part of a real restore).
    let status = crate::lifecycle::status::status(repo)
        .await
        .map_err(fail("plan"))?;
    let newest_wal = [
        status.last_archived.as_ref().map(|a| a.stored_at.as_str()),
        status.stream_tail.as_ref().map(|t| t.stored_at.as_str()),
    ]
    .into_iter()
    .flatten()
    .filter_map(parse_time)
    .max();

    let t0 = Instant::now();
    let mut request = options.request.clone();
    request.archive_mode = ArchiveMode::Off;
    request.action = TargetAction::Promote;
    let facts = plan::gather(repo, &request).await.map_err(fail("plan"))?;
    let chosen = plan::plan(&facts, &request).map_err(fail("plan"))?;
    report.backup = Some(chosen.backup.id.clone());
    let major = chosen.backup.pg_version_num / 10000;
    let (bin, version) = find_pg_bin(options.pg_bin.as_deref(), major).map_err(fail("plan"))?;
    report.pg_bin = Some(bin.display().to_string());
    report.pg_version = Some(version);
    make_scratch(scratch, options.owner, chosen.backup.data_bytes()).map_err(fail("plan"))?;

    request.backup = Some(chosen.backup.id.clone());
    let restored = restore(
        repo,
        &RestoreOptions {
            pgdata: scratch.join("data"),
            request,
            tablespace_map: chosen
                .backup
                .tablespaces
                .iter()
                .map(|t| {
                    (
                        t.location.clone(),
                        scratch.join("tablespaces").join(t.oid.to_string()),
                    )
                })
                .collect(),
            dry_run: false,
            owner: options.owner,
        },
    )
    .await
    .map_err(fail("download"))?;
    report.restored_bytes = restored.bytes;
    let t1 = Instant::now();
    report.download_seconds = Some(seconds(t1 - t0));

    let user = match &options.user {
        Some(u) => u.clone(),
        None => server_user_name(options.owner),
    };
    prepare_config(scratch, options.owner).map_err(|error| Failure {
        phase: "start",
        error,
    })?;
    let started = Server::start(&bin, scratch, options, &user, major).map_err(|error| Failure {
        phase: "start",
        error,
    })?;
    let live = server.insert(started);
    live.wait_until(deadline, "accepting connections", |out| out.is_some())
        .await
        .map_err(|error| Failure {
            phase: "start",
            error,
        })?;
    let t2 = Instant::now();
    report.start_seconds = Some(seconds(t2 - t1));
    live.wait_until(deadline, "promoted (out of recovery)", |out| {
        out.is_some_and(|o| o == "f")
    })
    .await
    .map_err(|error| Failure {
        phase: "recovery",
        error,
    })?;
    let t3 = Instant::now();
    report.recovery_seconds = Some(seconds(t3 - t2));
    report.rto_seconds = Some(
        [
            report.download_seconds,
            report.start_seconds,
            report.recovery_seconds,
        ]
        .into_iter()
        .flatten()
        .map(|s| (s * 1000.0).round() as u64)
        .sum::<u64>() as f64
            / 1000.0,
    );

    let last_commit = live
        .psql(
            "postgres",
            "SELECT extract(epoch FROM pg_last_xact_replay_timestamp())",
            deadline,
        )
        .await
        .map_err(|error| Failure {
            phase: "query",
            error,
        })?;
    let last_commit: Option<DateTime<Utc>> = last_commit
        .trim()
        .parse::<f64>()
        .ok()
        .and_then(|s| DateTime::from_timestamp_micros((s * 1e6).round() as i64));
    report.last_commit_restored = last_commit.map(|t| format_time(t.into()));
    let reference = match &options.request.target {
        Target::Time(t) => Some(("target time", t.with_timezone(&Utc))),
        _ => newest_wal.map(|t| ("newest WAL stored", t)),
    };
    if let Some((what, at)) = reference {
        report.rpo_reference = Some(what.to_owned());
        report.rpo_reference_time = Some(format_time(at.into()));
        if let Some(commit) = last_commit {
            let behind = (at - commit).num_milliseconds().max(0) as f64 / 1000.0;
            report.rpo_seconds = Some(behind);
        }
    }

    let t4 = Instant::now();
    let output = live
        .psql(&options.database, &options.query, deadline)
        .await
        .map_err(|error| Failure {
            phase: "query",
            error,
        })?;
    report.query_seconds = Some(seconds(t4.elapsed()));
    let mut output = output.trim_end().to_owned();
    if output.len() > OUTPUT_KEPT {
        let mut cut = OUTPUT_KEPT;
        while !output.is_char_boundary(cut) {
            cut -= 1;
        }
        output.truncate(cut);
        output.push_str("\n…");
    }
    report.query_output = Some(output);
    Ok(())
}

/// The phase a drill was in when its time ran out: the first without a duration.
fn phase_at_timeout(report: &DrillReport) -> &'static str {
    if report.backup.is_none() {
        "plan"
    } else if report.download_seconds.is_none() {
        "download"
    } else if report.start_seconds.is_none() {
        "start"
    } else if report.recovery_seconds.is_none() {
        "recovery"
    } else {
        "query"
    }
}

/// A duration in seconds, to the millisecond (so that the parts of the RTO add up as shown).
fn seconds(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn target_words(target: &Target) -> String {
    match target {
        Target::End => "the end of the archive".into(),
        Target::Time(t) => format!("time {}", t.to_rfc3339()),
        Target::Lsn(l) => format!("LSN {l}"),
        Target::Xid(x) => format!("transaction {x}"),
        Target::Name(n) => format!("restore point {n}"),
        Target::Immediate => "the backup's consistent point".into(),
    }
}

fn scratch_name(now: SystemTime) -> String {
    let t: DateTime<Utc> = now.into();
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    format!(
        "walcore-drill-{}-{}",
        t.format("%Y%m%dT%H%M%SZ"),
        hex::encode(r)
    )
}

/// Makes the scratch directory (private to the server's user) with its socket directory, after
/// checking that the file system has room for the backup's files.
fn make_scratch(scratch: &Path, owner: Option<Owner>, needed: u64) -> Result<(), Error> {
    let parent = scratch.parent().unwrap_or(Path::new("/"));
    let io = |what: &str, e: std::io::Error| {
        Error::new(
            ErrorKind::LocalIo,
            format!("{what} {}: {e}", scratch.display()),
        )
    };
    if !parent.is_dir() {
        return Err(Error::new(
            ErrorKind::Configuration,
            format!(
                "the scratch location {} is not a directory (give --scratch-dir)",
                parent.display()
            ),
        ));
    }
    if let Ok(fs) = rustix::fs::statvfs(parent) {
        let free = fs.f_bavail.saturating_mul(fs.f_frsize);
        if free < needed {
            return Err(Error::new(
                ErrorKind::LocalIo,
                format!(
                    "{} has {} free, and the backup's files take {}: give --scratch-dir on a \
                     larger file system",
                    parent.display(),
                    super::progress::human(free),
                    super::progress::human(needed)
                ),
            ));
        }
    }
    std::fs::create_dir(scratch).map_err(|e| io("making", e))?;
    let socket = scratch.join("socket");
    std::fs::create_dir(&socket).map_err(|e| io("making the socket directory in", e))?;
    for dir in [scratch, socket.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("setting the mode of", e))?;
        if let Some(o) = owner {
            o.give_path(dir).map_err(|e| io("giving", e))?;
        }
    }
    Ok(())
}

/// The HBA and ident files the drill's server uses (trust, on its private socket alone), and
/// an empty `postgresql.conf` when the backup has none (a cluster whose configuration lives
/// outside its data directory, as Debian's do).
fn prepare_config(scratch: &Path, owner: Option<Owner>) -> Result<(), String> {
    let write = |path: PathBuf, text: &str| -> Result<(), String> {
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        if let Some(o) = owner {
            o.give_path(&path)
                .map_err(|e| format!("giving {} to {o}: {e}", path.display()))?;
        }
        Ok(())
    };
    write(
        scratch.join("pg_hba.conf"),
        "# walcore drill: only the server's own user can reach its private socket.\n\
         local all all trust\n",
    )?;
    write(scratch.join("pg_ident.conf"), "")?;
    let conf = scratch.join("data/postgresql.conf");
    if !conf.exists() {
        write(conf, "# written by walcore drill: the backup had none\n")?;
    }
    Ok(())
}

/// The name of the user the server runs as: the default role to connect as (initdb names the
/// first superuser after the user who ran it).
fn server_user_name(owner: Option<Owner>) -> String {
    let uid = owner.map_or_else(|| rustix::process::geteuid().as_raw(), |o| o.uid);
    crate::owner::user_name(uid).unwrap_or_else(|| "postgres".to_owned())
}

/// The directory of PostgreSQL's programs for major version `major`, and `postgres
/// --version`'s version: `given` (which must be that version), else the first of `PATH`,
/// `pg_config --bindir`, `/usr/lib/postgresql/MAJOR/bin` and `/usr/pgsql-MAJOR/bin` that is.
fn find_pg_bin(given: Option<&Path>, major: u32) -> Result<(PathBuf, String), Error> {
    if let Some(dir) = given {
        let version = postgres_version(dir).ok_or_else(|| {
            Error::new(
                ErrorKind::Configuration,
                format!("--pg-bin {}: no working postgres there", dir.display()),
            )
        })?;
        if version_major(&version) != Some(major) {
            return Err(Error::new(
                ErrorKind::Configuration,
                format!(
                    "--pg-bin {} is PostgreSQL {version}; the backup needs PostgreSQL {major}",
                    dir.display()
                ),
            ));
        }
        return Ok((dir.to_path_buf(), version));
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        && out.status.success()
    {
        candidates.push(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        ));
    }
    candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
    candidates.push(PathBuf::from(format!("/usr/pgsql-{major}/bin")));
    let mut seen = Vec::new();
    for dir in candidates {
        if !dir.join("postgres").is_file() || seen.contains(&dir) {
            continue;
        }
        seen.push(dir.clone());
        if let Some(version) = postgres_version(&dir)
            && version_major(&version) == Some(major)
            && dir.join("psql").is_file()
        {
            return Ok((dir, version));
        }
    }
    Err(Error::new(
        ErrorKind::Configuration,
        format!(
            "no PostgreSQL {major} programs (postgres and psql) found in PATH, pg_config \
             --bindir, /usr/lib/postgresql/{major}/bin or /usr/pgsql-{major}/bin{}: give \
             --pg-bin DIR",
            if seen.is_empty() {
                String::new()
            } else {
                format!(
                    " (other versions in {})",
                    seen.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ),
    ))
}

/// `postgres --version` of `dir`'s postgres: "15.10" of "postgres (PostgreSQL) 15.10 (…)".
fn postgres_version(dir: &Path) -> Option<String> {
    let out = std::process::Command::new(dir.join("postgres"))
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rest = text.split_once("(PostgreSQL)")?.1.trim();
    rest.split_whitespace().next().map(str::to_owned)
}

fn version_major(version: &str) -> Option<u32> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The drill's PostgreSQL, running.
struct Server {
    child: tokio::process::Child,
    bin: PathBuf,
    socket: PathBuf,
    user: String,
    owner: Option<Owner>,
}

impl Server {
    fn start(
        bin: &Path,
        scratch: &Path,
        options: &DrillOptions,
        user: &str,
        major: u32,
    ) -> Result<Server, String> {
        let socket = scratch.join("socket");
        let log_path = scratch.join("server.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let mut settings: Vec<(String, String)> = [
            ("listen_addresses", String::new()),
            ("unix_socket_directories", socket.display().to_string()),
            ("port", "5432".to_owned()),
            (
                "hba_file",
                scratch.join("pg_hba.conf").display().to_string(),
            ),
            (
                "ident_file",
                scratch.join("pg_ident.conf").display().to_string(),
            ),
            ("archive_mode", "off".to_owned()),
            ("hot_standby", "on".to_owned()),
            ("ssl", "off".to_owned()),
            ("logging_collector", "off".to_owned()),
            ("log_destination", "stderr".to_owned()),
            ("synchronous_standby_names", String::new()),
            ("cluster_name", "walcore-drill".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        // The restore fsynced every file it wrote; PostgreSQL's own pass over the data
        // directory at the start of recovery (one fsync per file) would only add to the RTO.
        // One syncfs of the file system does the same (PostgreSQL 14 and later).
        if major >= 14 {
            settings.push(("recovery_init_sync_method".into(), "syncfs".into()));
        }
        settings.extend(options.settings.iter().cloned());
        let mut cmd = tokio::process::Command::new(bin.join("postgres"));
        cmd.arg("-D").arg(scratch.join("data"));
        for (name, value) in &settings {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
        cmd.current_dir(scratch)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true);
        if let Some(o) = options.owner {
            cmd.uid(o.uid).gid(o.gid);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.join("postgres").display()))?;
        Ok(Server {
            child,
            bin: bin.to_path_buf(),
            socket,
            user: user.to_owned(),
            owner: options.owner,
        })
    }

    /// Asks `SELECT NOT pg_is_in_recovery()`… until `done` says yes for what it answered
    /// (`None`: no answer yet); fails when the server exits or the deadline passes.
    async fn wait_until(
        &mut self,
        deadline: Instant,
        what: &str,
        done: impl Fn(Option<&str>) -> bool,
    ) -> Result<(), String> {
        let mut last_error = String::new();
        loop {
            if let Ok(Some(exit)) = self.child.try_wait() {
                return Err(format!(
                    "PostgreSQL exited ({exit}) before it was {what}; its log is in the report"
                ));
            }
            let answer = match self
                .psql("postgres", "SELECT pg_is_in_recovery()", deadline)
                .await
            {
                Ok(out) => Some(out.trim().to_owned()),
                Err(e) => {
                    last_error = e;
                    None
                }
            };
            if done(answer.as_deref()) {
                return Ok(());
            }
            if Instant::now() + POLL >= deadline {
                return Err(format!(
                    "not {what} within the drill's time limit{}",
                    if last_error.is_empty() {
                        String::new()
                    } else {
                        format!(" (last: {last_error})")
                    }
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Runs `sql` in `database` with `psql` on the private socket; its output, unaligned.
    async fn psql(&self, database: &str, sql: &str, deadline: Instant) -> Result<String, String> {
        let mut cmd = tokio::process::Command::new(self.bin.join("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket)
            .args(["-p", "5432", "-U", &self.user, "-d", database, "-c", sql])
            .env_remove("PGOPTIONS")
            .env_remove("PGSERVICE")
            .env_remove("PGSERVICEFILE")
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(o) = self.owner {
            cmd.uid(o.uid).gid(o.gid);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let out = tokio::time::timeout(left, cmd.output())
            .await
            .map_err(|_| "psql: the drill's time limit passed".to_owned())?
            .map_err(|e| format!("running {}: {e}", self.bin.join("psql").display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "psql: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Fast shutdown; after [`STOP_TIME`], immediate; then killed.
    async fn stop(mut self) -> Result<(), String> {
        if let Ok(Some(_)) = self.child.try_wait() {
            return Ok(());
        }
        let Some(pid) = self
            .child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(id as i32))
        else {
            return Ok(());
        };
        for (signal, wait) in [
            (rustix::process::Signal::INT, STOP_TIME),
            (rustix::process::Signal::QUIT, Duration::from_secs(10)),
        ] {
            let _ = rustix::process::kill_process(pid, signal);
            if tokio::time::timeout(wait, self.child.wait()).await.is_ok() {
                return Ok(());
            }
        }
        let _ = self.child.kill().await;
        Err("PostgreSQL did not stop after a fast and an immediate shutdown; killed".into())
    }
}

/// The last lines of the server's log.
fn log_tail(path: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_LINES_KEPT)..]
        .iter()
        .map(|l| (*l).to_owned())
        .collect()
}

/// Stores `report` create-only under [`PREFIX`] and deletes reports beyond the newest
/// [`KEPT_REPORTS`]; returns its key.
pub async fn save(repo: &Repository, report: &DrillReport) -> Result<String, Error> {
    let old = plan::listing(repo, PREFIX, |s| s.list(PREFIX)).await?;
    let key = crate::lifecycle::index::next_name(PREFIX, &old, SystemTime::now());
    let body = serde_json::to_vec(report)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("encoding the report: {e}")))?;
    repo.put_small(&key, body).await?;
    let mut reports: Vec<&String> = old.iter().filter(|k| is_report_key(k)).collect();
    reports.sort();
    let excess = (reports.len() + 1).saturating_sub(KEPT_REPORTS);
    for old in reports.into_iter().take(excess) {
        if let Err(e) = repo.store().delete(old).await {
            tracing::warn!("deleting the old drill report {old}: {e}");
        }
    }
    Ok(key)
}

fn is_report_key(key: &str) -> bool {
    crate::lifecycle::index::is_timed_name(PREFIX, key)
}

/// The newest drill report; `None` when no drill ran (or its report cannot be read).
pub async fn last(repo: &Repository) -> Result<Option<DrillReport>, Error> {
    let keys = plan::listing(repo, PREFIX, |s| s.list(PREFIX)).await?;
    let Some(newest) = keys.iter().filter(|k| is_report_key(k)).max() else {
        return Ok(None);
    };
    match repo.get_small(newest).await {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == ErrorKind::Transient => Err(e),
        Err(_) => Ok(None),
    }
}

impl fmt::Display for DrillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{s:.3} s"));
        if self.passed {
            writeln!(f, "drill passed")?;
        } else {
            writeln!(
                f,
                "drill FAILED in {}: {}",
                self.failed_in.as_deref().unwrap_or("?"),
                self.error.as_deref().unwrap_or("?")
            )?;
        }
        writeln!(
            f,
            "backup         {} to {}",
            self.backup.as_deref().unwrap_or("-"),
            self.target
        )?;
        if let (Some(bin), Some(v)) = (&self.pg_bin, &self.pg_version) {
            writeln!(f, "postgres       {v} ({bin})")?;
        }
        writeln!(
            f,
            "RTO            {} = download {} + start {} + recovery {}",
            secs(self.rto_seconds),
            secs(self.download_seconds),
            secs(self.start_seconds),
            secs(self.recovery_seconds)
        )?;
        writeln!(
            f,
            "restored       {}",
            super::progress::human(self.restored_bytes)
        )?;
        if let Some(rpo) = self.rpo_seconds {
            writeln!(
                f,
                "RPO            {rpo:.3} s: newest commit restored {} against the {} {}",
                self.last_commit_restored.as_deref().unwrap_or("-"),
                self.rpo_reference.as_deref().unwrap_or("-"),
                self.rpo_reference_time.as_deref().unwrap_or("-"),
            )?;
        } else if self.passed {
            writeln!(
                f,
                "RPO            - (no transaction was replayed after the backup)"
            )?;
        }
        if let Some(out) = &self.query_output {
            writeln!(
                f,
                "query          {} ({})",
                self.query,
                secs(self.query_seconds)
            )?;
            for line in out.lines().take(10) {
                writeln!(f, "  {line}")?;
            }
        }
        for line in &self.server_log {
            writeln!(f, "  log: {line}")?;
        }
        writeln!(
            f,
            "scratch        {}{}",
            self.scratch,
            if self.scratch_removed {
                " (removed)"
            } else {
                " (kept)"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_as_postgres_prints_them() {
        assert_eq!(version_major("15.10"), Some(15));
        assert_eq!(version_major("18beta1"), Some(18));
        assert_eq!(version_major(""), None);
    }

    #[test]
    fn only_report_names_count_as_reports() {
        assert!(is_report_key("drill/20261206T043000.123Z-0a1b2c3d"));
        assert!(!is_report_key("drill/notes"));
        assert!(!is_report_key("verify/20261206T043000.123Z-0a1b2c3d"));
    }

    #[test]
    fn a_failed_report_is_an_error_naming_the_phase() {
        let report = DrillReport {
            failed_in: Some("download".into()),
            error: Some("backup/X/data/base.tar: authentication failed".into()),
            ..DrillReport::default()
        };
        let e = report.outcome().expect_err("failed");
        assert!(e.to_string().contains("in download"), "{e}");
        assert!(e.to_string().contains("authentication failed"), "{e}");
        assert!(
            DrillReport {
                passed: true,
                ..report
            }
            .outcome()
            .is_ok()
        );
    }

    #[test]
    fn a_timeout_is_blamed_on_the_phase_that_was_running() {
        let mut r = DrillReport::default();
        assert_eq!(phase_at_timeout(&r), "plan");
        r.backup = Some("B".into());
        assert_eq!(phase_at_timeout(&r), "download");
        r.download_seconds = Some(1.0);
        r.start_seconds = Some(1.0);
        assert_eq!(phase_at_timeout(&r), "recovery");
    }

    #[test]
    fn a_report_reads_back_as_written() {
        let report = DrillReport {
            format_version: 1,
            passed: true,
            rto_seconds: Some(3.5),
            download_seconds: Some(1.0),
            start_seconds: Some(2.0),
            recovery_seconds: Some(0.5),
            ..DrillReport::default()
        };
        let text = serde_json::to_string(&report).expect("json");
        let back: DrillReport = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, report);
        assert!(report.to_string().contains("3.500 s = download 1.000 s"));
    }
}
