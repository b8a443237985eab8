//! Real PostgreSQL clusters in temporary directories.
//!
//! Each cluster lives in its own directory (`data/`, `sock/` for its Unix socket, `bin/` for
//! copies of the binaries it runs, `server.log`), listens on no TCP port, and is a `cp -a` copy of
//! a template initialised once per test process.
//!
//! Clusters are PostgreSQL 15 unless made with [`Cluster::new_major`], which runs another major
//! installed by `scripts/install-pg-majors` ([`pg_major_bin`]); [`pg_majors_wanted`] is the list
//! a test that runs on every major iterates over.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::bins;
use crate::sys::{self, Output};

/// How long `pg_ctl` may wait for a server to start or stop.
const PG_CTL_WAIT: Duration = Duration::from_secs(60);
/// How long a query may take (inserting batches of tens of MiB included).
const QUERY_TIMEOUT: Duration = Duration::from_secs(180);

/// PostgreSQL's program directory: `$WALCORE_TEST_PG_BIN`, else PostgreSQL 15's.
pub fn pg_bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("WALCORE_TEST_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
        assert!(
            dir.join("initdb").is_file() && dir.join("psql").is_file(),
            "PostgreSQL programs not found in {} (apt-get install -y postgresql-15, or set \
             WALCORE_TEST_PG_BIN)",
            dir.display()
        );
        dir
    })
}

/// The majors a matrix test runs on when `WALCORE_TEST_PG_MATRIX` does not say.
const DEFAULT_MATRIX: &str = "13,14,16,17,18";

/// Where `scripts/install-pg-majors` puts the other majors: `$WALCORE_TEST_PG_MAJORS`, else
/// `<workspace>/target/test-tools/pg` (each major in `<major>/bin`, `lib`, `share`).
pub fn pg_majors_dir() -> PathBuf {
    std::env::var_os("WALCORE_TEST_PG_MAJORS")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("the e2e crate sits in the workspace")
                .join("target/test-tools/pg")
        })
}

/// The program directory of PostgreSQL `major`, or `None` when it is not installed: 15 is
/// [`pg_bin_dir`]; the others come from [`pg_majors_dir`]. When the tests run as root and the
/// installation is out of the server user's reach (a checkout under `/root`), the directory
/// returned is a copy (hard links where possible) in this process's scratch directory, made
/// once.
pub fn pg_major_bin(major: u32) -> Option<&'static Path> {
    if major == 15 {
        return Some(pg_bin_dir());
    }
    static FOUND: OnceLock<Mutex<HashMap<u32, Option<&'static Path>>>> = OnceLock::new();
    let mut found = FOUND
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    *found.entry(major).or_insert_with(|| {
        let install = pg_majors_dir().join(major.to_string());
        if !install.join("bin/initdb").is_file() || !install.join("bin/postgres").is_file() {
            return None;
        }
        let install = if sys::server_user().is_some() && !reachable_by_others(&install) {
            stage_install(major, &install)
        } else {
            install
        };
        Some(Box::leak(install.join("bin").into_boxed_path()))
    })
}

/// Whether every directory from `/` down to `path` lets other users through.
fn reachable_by_others(path: &Path) -> bool {
    path.ancestors().all(|dir| {
        std::fs::metadata(dir)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

/// A copy of a PostgreSQL installation in the process scratch directory (hard links when on
/// the same file system), for a server user that cannot reach the original.
fn stage_install(major: u32, install: &Path) -> PathBuf {
    let dst = sys::process_scratch().join(format!("pg{major}"));
    let linked = sys::run(
        Command::new("cp").arg("-al").arg(install).arg(&dst),
        Duration::from_secs(120),
    );
    if !linked.status.success() {
        let _ = std::fs::remove_dir_all(&dst);
        sys::copy_tree(install, &dst);
    }
    dst
}

/// Whether the tests run in CI (`CI` set, and not to `0` or `false`).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The majors a test running on every major covers: those of `WALCORE_TEST_PG_MATRIX` (a comma
/// list, default `13,14,16,17,18`) that are installed. A wanted major that is missing fails
/// the test in CI (`CI` set) and is skipped with a message otherwise; either way the message
/// names `scripts/install-pg-majors`.
pub fn pg_majors_wanted() -> Vec<u32> {
    let matrix = std::env::var("WALCORE_TEST_PG_MATRIX")
        .ok()
        .filter(|m| !m.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_MATRIX.to_owned());
    let wanted: Vec<u32> = matrix
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| {
            m.parse()
                .unwrap_or_else(|_| panic!("WALCORE_TEST_PG_MATRIX={matrix:?}: {m:?} is no major"))
        })
        .collect();
    let (present, missing): (Vec<u32>, Vec<u32>) =
        wanted.into_iter().partition(|&m| pg_major_bin(m).is_some());
    if !missing.is_empty() {
        let message = format!(
            "PostgreSQL {missing:?} not installed in {} (run ./scripts/install-pg-majors, or set \
             WALCORE_TEST_PG_MAJORS / WALCORE_TEST_PG_MATRIX)",
            pg_majors_dir().display()
        );
        assert!(!in_ci(), "{message}");
        eprintln!("SKIPPED: {message}");
    }
    present
}

/// The path of PostgreSQL program `name` for a cluster whose server programs are in `bin`: from
/// `bin` when it has it, else PostgreSQL 15's (an installation with server programs only
/// borrows 15's clients: psql, pg_basebackup, pg_verifybackup).
pub fn pg_program(bin: &Path, name: &str) -> PathBuf {
    let own = bin.join(name);
    if own.is_file() {
        own
    } else {
        pg_bin_dir().join(name)
    }
}

/// A command running PostgreSQL program `name` (from `bin`, see [`pg_program`]) as the server
/// user, with a clean environment.
fn pg_command(bin: &Path, name: &str, cwd: &Path) -> Command {
    let mut cmd = Command::new(pg_program(bin, name));
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C")
        .env("HOME", cwd)
        .current_dir(cwd);
    sys::as_server_user(&mut cmd);
    cmd
}

/// Settings every test cluster shares.
const BASE_CONF: &str = "
# walcore e2e harness
listen_addresses = ''
port = 5432
max_connections = 20
wal_level = replica
archive_mode = on
max_wal_senders = 4
fsync = off
max_wal_size = 1GB
checkpoint_timeout = 1h
log_line_prefix = '%m [%p] '
log_min_messages = info
";

/// Runs `bin`'s `initdb` into `dir/data` and writes the shared settings (every line of which
/// PostgreSQL 13 to 18 accept).
fn initdb(bin: &Path, dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let out = sys::run(
        pg_command(bin, "initdb", dir).arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--locale=C",
            "--encoding=UTF8",
            "--no-sync",
        ]),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "initdb failed ({:?}): {}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    append_conf(&data, BASE_CONF);
    data
}

fn append_conf(data: &Path, text: &str) {
    use std::io::Write;
    let path = data.join("postgresql.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

/// A stopped, freshly initialised cluster's data directory, made once per test process.
fn template(which: &str, bin: &Path, cell: &'static OnceLock<PathBuf>) -> &'static Path {
    cell.get_or_init(|| {
        let dir = sys::server_mkdir(&sys::process_scratch().join(which));
        initdb(bin, &dir)
    })
}

/// The template every [`Cluster::new`] copies.
pub fn main_template() -> &'static Path {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    template("template", pg_bin_dir(), &CELL)
}

/// A second, independently initialised template: another system identifier.
pub fn foreign_template() -> &'static Path {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    template("foreign", pg_bin_dir(), &CELL)
}

/// The template of PostgreSQL `major` (initialised once per major per test process; 15's is
/// [`main_template`]). Panics when the major is not installed.
pub fn major_template(major: u32) -> &'static Path {
    if major == 15 {
        return main_template();
    }
    let bin = pg_major_bin(major).unwrap_or_else(|| {
        panic!(
            "PostgreSQL {major} is not installed in {} (run ./scripts/install-pg-majors)",
            pg_majors_dir().display()
        )
    });
    static CELLS: OnceLock<Mutex<HashMap<u32, &'static OnceLock<PathBuf>>>> = OnceLock::new();
    let cell: &'static OnceLock<PathBuf> = CELLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(major)
        .or_insert_with(|| Box::leak(Box::new(OnceLock::new())));
    template(&format!("template{major}"), bin, cell)
}

/// Quotes a value for `postgresql.conf`.
pub fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The major of the data directory `data`, from its `PG_VERSION` ("15", or "9.6" before 10).
fn try_data_major(data: &Path) -> Option<u32> {
    let version = std::fs::read_to_string(data.join("PG_VERSION")).ok()?;
    version.trim().split('.').next()?.parse().ok()
}

/// [`try_data_major`], panicking when there is no readable `PG_VERSION`.
fn data_major(data: &Path) -> u32 {
    try_data_major(data)
        .unwrap_or_else(|| panic!("no PostgreSQL major in {}/PG_VERSION", data.display()))
}

/// How a recovery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// `pg_is_in_recovery()` became false: the server left recovery and promoted.
    Promoted,
    /// The server process went away before recovery ended.
    Stopped,
}

/// A base backup taken with `pg_basebackup -X none` (plain format).
#[derive(Debug)]
pub struct BaseBackup {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

/// One PostgreSQL cluster in a temporary directory. Dropping it stops the server (immediate
/// mode) and removes the directory.
#[derive(Debug)]
pub struct Cluster {
    pub data: PathBuf,
    pub sock: PathBuf,
    pub bin: PathBuf,
    pub log: PathBuf,
    /// Where this cluster's server programs (initdb, pg_ctl, postgres) come from.
    pg_bin: &'static Path,
    /// Its PostgreSQL major (`PG_VERSION`).
    major: u32,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A copy of the main template (same system identifier as every other `new()` cluster).
    pub fn new() -> Cluster {
        Cluster::copy_of(main_template(), pg_bin_dir())
    }

    /// A copy of the foreign template: a cluster with another system identifier.
    pub fn foreign() -> Cluster {
        Cluster::copy_of(foreign_template(), pg_bin_dir())
    }

    /// A cluster of PostgreSQL `major`, a copy of that major's template; 15 is
    /// [`Cluster::new`]. Panics when the major is not installed (see [`pg_majors_wanted`]).
    pub fn new_major(major: u32) -> Cluster {
        if major == 15 {
            return Cluster::new();
        }
        let template = major_template(major);
        let bin = pg_major_bin(major).expect("installed: its template exists");
        Cluster::copy_of(template, bin)
    }

    /// A cluster whose data directory is a copy of `backup`, with archiving off (set
    /// recovery up with [`Cluster::recover_with`]). It runs the backup's major: 15's programs,
    /// or another installed major's for a backup of that major.
    pub fn from_backup(backup: &BaseBackup) -> Cluster {
        let bin = match try_data_major(&backup.path) {
            Some(other) if other != 15 => pg_major_bin(other).unwrap_or_else(pg_bin_dir),
            _ => pg_bin_dir(),
        };
        let c = Cluster::copy_of(&backup.path, bin);
        c.set("archive_mode", "off");
        c
    }

    fn copy_of(src: &Path, pg_bin: &'static Path) -> Cluster {
        let dir = sys::server_tempdir("wc");
        let data = dir.path().join("data");
        sys::copy_tree(src, &data);
        let sock = sys::server_mkdir(&dir.path().join("sock"));
        let bin = sys::server_mkdir(&dir.path().join("bin"));
        let log = dir.path().join("server.log");
        std::fs::write(&log, "").expect("create server.log");
        sys::give_to_server_user(&log, 0o644);
        assert!(
            sock.join(".s.PGSQL.5432").as_os_str().len() < 100,
            "socket path too long"
        );
        let major = data_major(&data);
        let c = Cluster {
            data,
            sock,
            bin,
            log,
            pg_bin,
            major,
            env: Vec::new(),
            dir,
        };
        c.set("unix_socket_directories", &c.sock.to_string_lossy());
        c
    }

    /// A streaming standby of `primary` (running), from a base backup of it, started.
    pub fn standby_of(primary: &Cluster) -> Cluster {
        let backup = primary.base_backup();
        let standby = Cluster::from_backup(&backup);
        standby.set(
            "primary_conninfo",
            &format!("host={} port=5432 user=postgres", primary.sock.display()),
        );
        std::fs::write(standby.data.join("standby.signal"), "").expect("standby.signal");
        standby.start();
        standby
    }

    /// The cluster's temporary directory (owned by the server user).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster's PostgreSQL major (from its `PG_VERSION`).
    pub fn major(&self) -> u32 {
        self.major
    }

    /// The directory of the server programs this cluster runs.
    pub fn pg_bin(&self) -> &'static Path {
        self.pg_bin
    }

    /// The path of PostgreSQL program `name` for this cluster: its own major's, or 15's for a
    /// client program its installation lacks (see [`pg_program`]).
    pub fn pg_program(&self, name: &str) -> PathBuf {
        pg_program(self.pg_bin, name)
    }

    /// Appends `name = 'value'` to `postgresql.conf` (later lines win; takes effect at the
    /// next start).
    pub fn set(&self, name: &str, value: &str) {
        append_conf(&self.data, &format!("{name} = {}\n", conf_quote(value)));
    }

    /// Copies binary `name` into this cluster's `bin/` and returns the copy's path.
    pub fn install(&self, name: &str) -> PathBuf {
        bins::install(name, &self.bin)
    }

    /// A copy of the template, started, archiving with `walcore-archive` into the repository
    /// `env` names.
    pub fn archiving_into(env: &[(String, String)]) -> Cluster {
        let mut c = Cluster::new();
        c.archive_with_walcore();
        c.set_env(env);
        c.start();
        c
    }

    /// Sets `archive_command` to this cluster's copy of `walcore-archive`.
    pub fn archive_with_walcore(&self) {
        let bin = self.install(bins::ARCHIVE);
        self.set("archive_command", &format!("{} %p", bin.display()));
    }

    /// The environment given to `pg_ctl start` (and so to archive and restore commands);
    /// replaces earlier values of the same names.
    pub fn set_env(&mut self, vars: &[(String, String)]) {
        for (k, v) in vars {
            self.env.retain(|(ek, _)| ek != k);
            self.env.push((k.clone(), v.clone()));
        }
    }

    fn pg_ctl(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = pg_command(self.pg_bin, "pg_ctl", self.dir.path());
        cmd.arg("-D").arg(&self.data).args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        sys::run(&mut cmd, timeout)
    }

    /// Starts the server and waits until it accepts connections; `Err` carries pg_ctl's output
    /// and the server log when it failed to start or exited.
    pub fn try_start(&self) -> Result<(), String> {
        let secs = PG_CTL_WAIT.as_secs().to_string();
        let log = self.log.to_string_lossy().into_owned();
        let out = self.pg_ctl(
            &["-w", "-t", &secs, "-l", &log, "start"],
            PG_CTL_WAIT + Duration::from_secs(10),
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start failed ({:?}): {}{}\n--- server log ---\n{}",
                out.status,
                out.stdout,
                out.stderr,
                sys::tail(&self.server_log(), 60)
            ))
        }
    }

    /// Starts the server; panics with the server log if it does not come up.
    pub fn start(&self) {
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    /// Starts the server without waiting for connections (for recoveries, which may end either
    /// way), but until the postmaster holds its data directory (`postmaster.pid`), so that
    /// [`Cluster::is_running`] means something right away (or until the log shows the
    /// postmaster already gave up).
    pub fn start_no_wait(&self) {
        let log_before = self.server_log().len();
        let log = self.log.to_string_lossy().into_owned();
        let out = self.pg_ctl(&["-W", "-l", &log, "start"], PG_CTL_WAIT);
        assert!(
            out.status.success(),
            "pg_ctl start -W failed ({:?}): {}{}",
            out.status,
            out.stdout,
            out.stderr
        );
        sys::wait_for(PG_CTL_WAIT, Duration::from_millis(20), || {
            if self.data.join("postmaster.pid").exists() {
                return Ok(());
            }
            let log = self.server_log();
            let new = log.get(log_before..).unwrap_or("");
            if new.contains("FATAL") || new.contains("shut down") {
                return Ok(());
            }
            Err(format!(
                "waiting for the postmaster to start\n{}",
                sys::tail(new, 40)
            ))
        });
    }

    /// Stops the server (fast mode), panicking if it will not stop.
    pub fn stop(&self) {
        let secs = PG_CTL_WAIT.as_secs().to_string();
        let out = self.pg_ctl(
            &["-w", "-t", &secs, "-m", "fast", "stop"],
            PG_CTL_WAIT + Duration::from_secs(10),
        );
        assert!(
            out.status.success() || !self.is_running(),
            "pg_ctl stop failed: {}{}",
            out.stdout,
            out.stderr
        );
    }

    /// Whether a postmaster is running on this data directory (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        self.pg_ctl(&["status"], Duration::from_secs(10))
            .status
            .success()
    }

    /// The server log so far.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `sql` with psql (unaligned, tuples only); `Err` has psql's stderr.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let mut cmd = pg_command(self.pg_bin, "psql", self.dir.path());
        cmd.arg("-X")
            .args(["-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.sock)
            .args(["-p", "5432", "-U", "postgres", "-d", "postgres", "-c", sql]);
        let out = sys::run(&mut cmd, QUERY_TIMEOUT);
        if out.status.success() {
            Ok(out.stdout.trim_end_matches('\n').to_string())
        } else {
            Err(format!(
                "psql {sql:?} failed ({:?}{}): {}",
                out.status,
                if out.timed_out { ", timed out" } else { "" },
                out.stderr.trim()
            ))
        }
    }

    /// Runs `sql` and returns its output; panics (with the server log) on failure.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql).unwrap_or_else(|e| {
            panic!(
                "{e}\n--- server log ---\n{}",
                sys::tail(&self.server_log(), 40)
            )
        })
    }

    /// The WAL file being written now (`pg_walfile_name(pg_current_wal_lsn())`).
    pub fn current_wal_file(&self) -> String {
        self.psql("select pg_walfile_name(pg_current_wal_lsn())")
    }

    /// Ends the current WAL segment and returns the name of the one just completed (which the
    /// archiver will now archive).
    pub fn switch_wal(&self) -> String {
        // pg_switch_wal() returns a position inside the segment it completed (or, when nothing
        // was written since the last switch, the boundary after it: the previous segment).
        self.psql("select pg_walfile_name(pg_switch_wal())")
    }

    /// Waits until every WAL file up to and including `name` has been archived: the archiver
    /// reports `last_archived_wal >= name` and no `.ready` file at or before `name` is left.
    /// Panics with the archiver's failures and the server log on timeout, or as soon as the
    /// archive command is failing and has failed twice more since the wait began (PostgreSQL
    /// tries three times a second apart, then pauses a minute).
    pub fn wait_archived(&self, name: &str, timeout: Duration) {
        let status_dir = self.data.join("pg_wal/archive_status");
        let mut failed_before: Option<u64> = None;
        sys::wait_for(timeout, Duration::from_millis(100), || {
            let state = self.psql(
                "select coalesce(last_archived_wal, '') || '|' || failed_count || '|' || \
                 coalesce(last_failed_wal, '') || '|' || \
                 (coalesce(last_failed_time, '-infinity') > \
                  coalesce(last_archived_time, '-infinity')) from pg_stat_archiver",
            );
            let fields: Vec<&str> = state.split('|').collect();
            let last = fields.first().copied().unwrap_or("");
            let failed: u64 = fields.get(1).and_then(|f| f.parse().ok()).unwrap_or(0);
            let failing_now = fields.get(3) == Some(&"true");
            let before = *failed_before.get_or_insert(failed);
            assert!(
                !(failing_now && failed >= before + 2),
                "the archive command keeps failing while waiting for {name}; pg_stat_archiver \
                 (last_archived|failed_count|last_failed|failing) = {state}\n--- server log \
                 ---\n{}",
                sys::tail(&self.server_log(), 60)
            );
            let pending = std::fs::read_dir(&status_dir)
                .map(|d| {
                    d.flatten().any(|e| {
                        let f = e.file_name().to_string_lossy().into_owned();
                        f.strip_suffix(".ready")
                            .is_some_and(|w| w.get(..24).unwrap_or(w) <= name)
                    })
                })
                .unwrap_or(false);
            if last >= name && !pending {
                Ok(())
            } else {
                Err(format!(
                    "waiting for {name} to be archived; pg_stat_archiver \
                     (last_archived|failed_count|last_failed|failing) = {state}\n--- server log ---\n{}",
                    sys::tail(&self.server_log(), 60)
                ))
            }
        });
    }

    /// Switches WAL and waits until everything written so far is archived; returns the last
    /// archived segment.
    pub fn archive_all(&self, timeout: Duration) -> String {
        let last = self.switch_wal();
        self.wait_archived(&last, timeout);
        last
    }

    /// `pg_basebackup -X none -c fast` (plain format) into a new temporary directory. Waits for
    /// the backup's WAL to be archived (pg_basebackup does that without `-X`).
    pub fn base_backup(&self) -> BaseBackup {
        let dir = sys::server_tempdir("wcbb");
        let path = dir.path().join("data");
        let mut cmd = pg_command(self.pg_bin, "pg_basebackup", dir.path());
        cmd.arg("-h")
            .arg(&self.sock)
            .args(["-p", "5432", "-U", "postgres", "-X", "none", "-c", "fast"])
            .arg("-D")
            .arg(&path);
        let out = sys::run(&mut cmd, Duration::from_secs(180));
        assert!(
            out.status.success(),
            "pg_basebackup failed ({:?}{}): {}{}\n--- server log ---\n{}",
            out.status,
            if out.timed_out {
                ", timed out: is the archive_command failing?"
            } else {
                ""
            },
            out.stdout,
            out.stderr,
            sys::tail(&self.server_log(), 60)
        );
        BaseBackup { path, _dir: dir }
    }

    /// `pg_basebackup -Ft -X none -c fast` (tar format) into a new temporary directory; the
    /// returned path is that directory, holding `base.tar`.
    pub fn base_backup_tar(&self) -> BaseBackup {
        let dir = sys::server_tempdir("wcbt");
        let path = sys::server_mkdir(&dir.path().join("tar"));
        let mut cmd = pg_command(self.pg_bin, "pg_basebackup", dir.path());
        cmd.arg("-h")
            .arg(&self.sock)
            .args([
                "-p", "5432", "-U", "postgres", "-Ft", "-X", "none", "-c", "fast",
            ])
            .arg("-D")
            .arg(&path);
        let out = sys::run(&mut cmd, Duration::from_secs(180));
        assert!(
            out.status.success(),
            "pg_basebackup -Ft failed ({:?}{}): {}{}\n--- server log ---\n{}",
            out.status,
            if out.timed_out { ", timed out" } else { "" },
            out.stdout,
            out.stderr,
            sys::tail(&self.server_log(), 60)
        );
        BaseBackup { path, _dir: dir }
    }

    /// Prepares an archive recovery: `recovery.signal`, `restore_command`, and when given, a
    /// `recovery_target_time` with `recovery_target_action = 'promote'`.
    pub fn recover_with(&self, restore_command: &str, target_time: Option<&str>) {
        let signal = self.data.join("recovery.signal");
        std::fs::write(&signal, "").expect("write recovery.signal");
        sys::give_to_server_user(&signal, 0o600);
        self.set("restore_command", restore_command);
        if let Some(t) = target_time {
            self.set("recovery_target_time", t);
            self.set("recovery_target_action", "promote");
        }
    }

    /// Sets `restore_command` to this cluster's copy of `walcore-restore` and prepares recovery.
    pub fn recover_with_walcore(&self, target_time: Option<&str>) {
        let bin = self.install(bins::RESTORE);
        self.recover_with(&format!("{} %f %p", bin.display()), target_time);
    }

    /// Whether `recovery.signal` is still there (it is removed when recovery ends).
    pub fn recovery_pending(&self) -> bool {
        self.data.join("recovery.signal").exists()
    }

    /// Waits until recovery ends (`pg_is_in_recovery()` false) or the server process is gone.
    pub fn wait_recovery_end(&self, timeout: Duration) -> Recovery {
        let start = Instant::now();
        loop {
            if let Ok(v) = self.try_psql("select pg_is_in_recovery()")
                && v == "f"
            {
                return Recovery::Promoted;
            }
            if !self.is_running() {
                return Recovery::Stopped;
            }
            assert!(
                start.elapsed() < timeout,
                "recovery neither ended nor stopped within {timeout:?}\n--- server log ---\n{}",
                sys::tail(&self.server_log(), 80)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster::new()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = self.pg_ctl(&["-w", "-m", "immediate", "stop"], Duration::from_secs(30));
        }
    }
}
