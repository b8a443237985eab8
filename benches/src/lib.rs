//! Real PostgreSQL WAL for the codec benches.
//!
//! The benches measure walcore on the bytes it will really archive: 16 MiB WAL segments written
//! by a PostgreSQL 15 cluster under a TPC-B-like `pgbench` load (heap and index records, commit
//! records, full-page images after a checkpoint). Synthetic data would get the compression ratio,
//! and so the zstd and AES-GCM throughput, wrong.
//!
//! [`load_or_generate`] returns segments from a cache directory ([`cache_dir`]: `target/bench-wal/`
//! or `$WALCORE_BENCH_WAL_DIR`), making them first when the cache is empty: `initdb` into a
//! temporary directory, start the server on its own Unix socket, `pgbench -i -s 20`, a
//! `CHECKPOINT` and `pg_switch_wal()`, then `pgbench -c 2 -j 2` in 5-second rounds until enough
//! segments are complete, and copy the last [`SEGMENTS_WANTED`] complete segments of the run out
//! of `pg_wal`. Segments written during `pgbench -i` (bulk `COPY`, index builds) and right after
//! `initdb` (mostly zeros) are never used. Every cached segment is checked page by page (magic
//! and page address) before use. A `MANIFEST` file, written last, marks the cache complete.
//!
//! When root, PostgreSQL programs run as the `postgres` user (they refuse root), and the
//! temporary directory is handed to that user.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bytes in a WAL segment (PostgreSQL's default `--wal-segsize`).
pub const SEGMENT_SIZE: usize = 16 * 1024 * 1024;
/// Bytes in a WAL page.
pub const WAL_PAGE_SIZE: usize = 8192;
/// Complete `pgbench` segments the cache holds.
pub const SEGMENTS_WANTED: usize = 6;
/// Fewer complete segments than this after the time limit is an error.
pub const SEGMENTS_MIN: usize = 4;
/// `pgbench -i` scale: 2 million accounts, about 300 MB of tables.
pub const PGBENCH_SCALE: u32 = 20;
/// Environment variable naming the cache directory.
pub const WAL_DIR_ENV: &str = "WALCORE_BENCH_WAL_DIR";
/// Environment variable naming the PostgreSQL `bin` directory.
pub const PG_BIN_ENV: &str = "WALCORE_BENCH_PG_BIN";
/// Where Debian's `postgresql-15` puts its programs.
pub const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// `XLOG_PAGE_MAGIC` of PostgreSQL 15 (`src/include/access/xlog_internal.h`).
const PG15_WAL_PAGE_MAGIC: u16 = 0xD110;
/// Segments per "xlogid" in a WAL file name, for 16 MiB segments.
const SEGMENTS_PER_XLOGID: u64 = 0x1_0000_0000 / SEGMENT_SIZE as u64;
/// Longest the `pgbench` run may take before giving up on more segments.
const RUN_LIMIT: Duration = Duration::from_secs(180);
const MANIFEST: &str = "MANIFEST";

/// One WAL segment: its file name (`000000010000000000000012`) and its 16 MiB.
#[derive(Debug, Clone)]
pub struct Segment {
    pub name: String,
    pub data: Vec<u8>,
}

/// Why real WAL could not be had. The message says what to do.
#[derive(Debug)]
pub struct WalError(String);

impl fmt::Display for WalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WalError {}

fn err(message: impl Into<String>) -> WalError {
    WalError(message.into())
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> WalError {
    err(format!("{what} {}: {e}", path.display()))
}

/// The cache directory: `$WALCORE_BENCH_WAL_DIR`, else `bench-wal/` in the cargo target
/// directory (`$CARGO_TARGET_DIR`, else the workspace's `target/`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(WAL_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        });
    target.join("bench-wal")
}

/// The cached segments, generating them first if the cache is empty or incomplete.
pub fn load_or_generate() -> Result<Vec<Segment>, WalError> {
    let dir = cache_dir();
    if let Some(segments) = load_cached(&dir)? {
        return Ok(segments);
    }
    eprintln!(
        "walcore-benches: no cached WAL in {}; generating it from a PostgreSQL cluster \
         (pgbench -i -s {PGBENCH_SCALE}, then pgbench -c 2; about a minute, once)",
        dir.display()
    );
    generate(&dir)?;
    load_cached(&dir)?.ok_or_else(|| {
        err(format!(
            "generated WAL but {} has no {MANIFEST}",
            dir.display()
        ))
    })
}

/// The segments listed in `dir/MANIFEST`, each checked; `None` when there is no manifest.
pub fn load_cached(dir: &Path) -> Result<Option<Vec<Segment>>, WalError> {
    let manifest_path = dir.join(MANIFEST);
    let manifest = match fs::read_to_string(&manifest_path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("reading", &manifest_path, e)),
    };
    let mut segments = Vec::new();
    for line in manifest.lines() {
        let Some(name) = line.strip_prefix("segment ") else {
            continue;
        };
        let path = dir.join(name);
        let data = fs::read(&path).map_err(|e| io_err("reading cached segment", &path, e))?;
        check_segment(name, &data).map_err(|e| {
            err(format!(
                "cached segment {} is not valid WAL ({e}); delete {} to regenerate",
                path.display(),
                dir.display()
            ))
        })?;
        segments.push(Segment {
            name: name.to_owned(),
            data,
        });
    }
    if segments.is_empty() {
        return Err(err(format!(
            "{} lists no segments; delete {} to regenerate",
            manifest_path.display(),
            dir.display()
        )));
    }
    Ok(Some(segments))
}

/// The segment number a WAL file name stands for (`TTTTTTTTXXXXXXXXYYYYYYYY`).
pub fn segment_number(name: &str) -> Option<u64> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let hi = u64::from_str_radix(&name[8..16], 16).ok()?;
    let lo = u64::from_str_radix(&name[16..24], 16).ok()?;
    (lo < SEGMENTS_PER_XLOGID).then_some(hi * SEGMENTS_PER_XLOGID + lo)
}

/// The WAL file name of segment `segno` on timeline `tli`.
pub fn segment_name(tli: u32, segno: u64) -> String {
    format!(
        "{tli:08X}{:08X}{:08X}",
        segno / SEGMENTS_PER_XLOGID,
        segno % SEGMENTS_PER_XLOGID
    )
}

/// Checks that `data` is the complete segment `name` of PostgreSQL 15: 16 MiB, and every page
/// has the WAL page magic and the address it sits at (so no page is unwritten or recycled).
pub fn check_segment(name: &str, data: &[u8]) -> Result<(), WalError> {
    let segno =
        segment_number(name).ok_or_else(|| err(format!("'{name}' is not a WAL file name")))?;
    if data.len() != SEGMENT_SIZE {
        return Err(err(format!(
            "{} bytes, expected {SEGMENT_SIZE}",
            data.len()
        )));
    }
    let base = segno * SEGMENT_SIZE as u64;
    for (i, page) in data.chunks_exact(WAL_PAGE_SIZE).enumerate() {
        let magic = u16::from_le_bytes([page[0], page[1]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&page[8..16]);
        let addr = u64::from_le_bytes(addr);
        let want = base + (i * WAL_PAGE_SIZE) as u64;
        if magic != PG15_WAL_PAGE_MAGIC || addr != want {
            return Err(err(format!(
                "page {i}: magic {magic:#06x} address {addr:#x}, expected {PG15_WAL_PAGE_MAGIC:#06x} {want:#x}"
            )));
        }
    }
    Ok(())
}

/// Makes real WAL with a temporary PostgreSQL cluster and stores it in `dir` (see the crate
/// documentation).
pub fn generate(dir: &Path) -> Result<(), WalError> {
    let pg = PgBin::find()?;
    let cluster = Cluster::start(pg)?;
    cluster.pgbench(&["-i", "-q", "-s", &PGBENCH_SCALE.to_string()])?;

    // Start the measured run at a checkpoint and a fresh segment, as a server sees after every
    // checkpoint: the first change to each page logs a full-page image.
    cluster.sql("CHECKPOINT")?;
    cluster.sql("SELECT pg_switch_wal()")?;
    let tli: u32 = cluster
        .sql("SELECT timeline_id FROM pg_control_checkpoint()")?
        .parse()
        .map_err(|_| err("timeline_id is not a number"))?;
    let start_seg = cluster.insert_lsn()? / SEGMENT_SIZE as u64;

    // Segments before the one being written are complete. Keep pgbench running until enough
    // of them are, with one spare at the start.
    let began = Instant::now();
    let mut current_seg;
    let mut rounds = 0;
    loop {
        cluster.pgbench(&["-n", "-c", "2", "-j", "2", "-T", "5"])?;
        rounds += 1;
        current_seg = cluster.insert_lsn()? / SEGMENT_SIZE as u64;
        let complete = (current_seg - start_seg) as usize;
        if complete > SEGMENTS_WANTED || began.elapsed() > RUN_LIMIT {
            break;
        }
    }
    // Flushes everything before the current segment to pg_wal (and ends it).
    cluster.sql("SELECT pg_switch_wal()")?;
    let complete = (current_seg - start_seg) as usize;
    if complete < SEGMENTS_MIN {
        return Err(err(format!(
            "pgbench completed only {complete} WAL segments in {:?} ({rounds} rounds of 5 s); \
             need at least {SEGMENTS_MIN}",
            began.elapsed()
        )));
    }
    let first = current_seg - complete.min(SEGMENTS_WANTED) as u64;

    fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
    let mut manifest = format!(
        "# Real WAL for walcore's codec benches: PostgreSQL {}, pgbench -i -s {PGBENCH_SCALE}, \
         CHECKPOINT, then pgbench -c 2 -j 2 for {rounds} x 5 s (TPC-B-like); segments {} to {} \
         of the run.\n",
        cluster.sql("SHOW server_version")?,
        first - start_seg,
        current_seg - start_seg - 1,
    );
    for segno in first..current_seg {
        let name = segment_name(tli, segno);
        let src = cluster.dir.join("data/pg_wal").join(&name);
        let data = fs::read(&src).map_err(|e| io_err("reading", &src, e))?;
        check_segment(&name, &data).map_err(|e| err(format!("{}: {e}", src.display())))?;
        write_atomically(&dir.join(&name), &data)?;
        manifest.push_str(&format!("segment {name}\n"));
    }
    if let Some(stats) = cluster.waldump_totals(tli, first, current_seg - 1) {
        manifest.push_str(&format!(
            "# pg_waldump --stats of these segments: {stats}\n"
        ));
    }
    drop(cluster);
    write_atomically(&dir.join(MANIFEST), manifest.as_bytes())
}

/// The pgbench scale of the cached base backup (about 80 MiB of tables and indexes).
pub const BASE_TAR_SCALE: u32 = 5;

/// A real `base.tar` (`pg_basebackup -Ft -X none` of a `pgbench -i -s 5` database), from the
/// cache directory, made with a temporary cluster the first time.
pub fn load_or_generate_base_tar() -> Result<Vec<u8>, WalError> {
    let path = cache_dir().join(format!("base-pgbench-s{BASE_TAR_SCALE}.tar"));
    if let Ok(bytes) = fs::read(&path) {
        return Ok(bytes);
    }
    eprintln!(
        "walcore-benches: no cached base backup at {}; making one (pgbench -i -s \
         {BASE_TAR_SCALE}, pg_basebackup -Ft; a few seconds, once)",
        path.display()
    );
    let pg = PgBin::find()?;
    let cluster = Cluster::start(pg)?;
    cluster.pgbench(&["-i", "-q", "-s", &BASE_TAR_SCALE.to_string()])?;
    cluster.sql("CHECKPOINT")?;
    let out = cluster.dir.join("basebackup");
    let mut cmd = cluster.client("pg_basebackup");
    cmd.args(["-Ft", "-X", "none", "-c", "fast", "-D"])
        .arg(&out);
    run(cmd, "pg_basebackup -Ft")?;
    let tar = out.join("base.tar");
    let bytes = fs::read(&tar).map_err(|e| io_err("reading", &tar, e))?;
    drop(cluster);
    fs::create_dir_all(cache_dir()).map_err(|e| io_err("creating", &cache_dir(), e))?;
    write_atomically(&path, &bytes)?;
    Ok(bytes)
}

/// The comment lines of the cache's manifest: how its WAL was made.
pub fn cache_description(dir: &Path) -> String {
    fs::read_to_string(dir.join(MANIFEST))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<(), WalError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = fs::File::create(&tmp).map_err(|e| io_err("creating", &tmp, e))?;
    f.write_all(data).map_err(|e| io_err("writing", &tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| io_err("renaming into place", path, e))
}

/// The PostgreSQL programs.
#[derive(Debug)]
struct PgBin {
    dir: PathBuf,
    /// The uid and gid to run PostgreSQL programs as, when not ourselves.
    user: Option<(u32, u32)>,
}

impl PgBin {
    fn find() -> Result<PgBin, WalError> {
        let dir = std::env::var_os(PG_BIN_ENV)
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_PG_BIN), PathBuf::from);
        for program in ["initdb", "pg_ctl", "postgres", "pgbench", "psql"] {
            if !dir.join(program).is_file() {
                return Err(err(format!(
                    "PostgreSQL is not installed: {} not found. The codec benches need real WAL \
                     from PostgreSQL 15: `apt-get install -y postgresql-15`, or set {PG_BIN_ENV} \
                     to its bin directory, or set {WAL_DIR_ENV} to a directory of WAL segments \
                     cached by an earlier run (with its {MANIFEST}).",
                    dir.join(program).display()
                )));
            }
        }
        Ok(PgBin {
            dir,
            user: server_user()?,
        })
    }

    fn command(&self, program: &str, workdir: &Path) -> Command {
        let mut cmd = Command::new(self.dir.join(program));
        cmd.current_dir(workdir)
            .env("HOME", workdir)
            .env_remove("PGDATA");
        for var in [
            "PGHOST",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
            "PGPASSWORD",
            "PGOPTIONS",
        ] {
            cmd.env_remove(var);
        }
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }
}

/// The effective uid, from `/proc/self/status` (`Uid: real effective saved fs`).
fn euid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
}

/// The `postgres` user's uid and gid when we are root (PostgreSQL refuses root), else `None`.
fn server_user() -> Result<Option<(u32, u32)>, WalError> {
    if euid() != Some(0) {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let ids = passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == "postgres" {
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    });
    match ids {
        Some(ids) => Ok(Some(ids)),
        None => Err(err(
            "running as root, so PostgreSQL must run as the `postgres` user, but /etc/passwd has \
             none (`apt-get install -y postgresql-15` creates it)",
        )),
    }
}

/// Runs `cmd`, returning its trimmed stdout, or an error quoting its stderr.
fn run(mut cmd: Command, what: &str) -> Result<String, WalError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| err(format!("{what}: cannot start {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A running temporary cluster; stopped and deleted on drop.
#[derive(Debug)]
struct Cluster {
    pg: PgBin,
    /// Holds `data/`, `sock/` and `server.log`. Short, so the socket path stays under 100 bytes.
    dir: PathBuf,
    started: bool,
}

impl Cluster {
    fn start(pg: PgBin) -> Result<Cluster, WalError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "walcore-bench-wal-{}-{nanos:x}",
            std::process::id()
        ));
        let mut cluster = Cluster {
            pg,
            dir,
            started: false,
        };
        let sock = cluster.dir.join("sock");
        fs::create_dir_all(&sock).map_err(|e| io_err("creating", &sock, e))?;
        for d in [&cluster.dir, &sock] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))
                .map_err(|e| io_err("chmod", d, e))?;
            if let Some((uid, gid)) = cluster.pg.user {
                std::os::unix::fs::chown(d, Some(uid), Some(gid))
                    .map_err(|e| io_err("chown", d, e))?;
            }
        }

        let data = cluster.dir.join("data");
        let mut initdb = cluster.pg.command("initdb", &cluster.dir);
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(initdb, "initdb")?;

        let conf = data.join("postgresql.conf");
        let settings = format!(
            "\n# walcore-benches\nlisten_addresses = ''\nunix_socket_directories = '{}'\n\
             # fsync only costs time; the WAL written is the same.\nfsync = off\n\
             # No checkpoint during the run: it would recycle the segments we copy.\n\
             max_wal_size = 16GB\ncheckpoint_timeout = 1h\n",
            sock.display()
        );
        fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| f.write_all(settings.as_bytes()))
            .map_err(|e| io_err("configuring", &conf, e))?;

        let mut start = cluster.pg.command("pg_ctl", &cluster.dir);
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(cluster.dir.join("server.log"))
            .args(["-w", "-t", "60", "start"]);
        cluster.started = true;
        run(start, "pg_ctl start").map_err(|e| {
            let log = fs::read_to_string(cluster.dir.join("server.log")).unwrap_or_default();
            err(format!("{e}\nserver log:\n{log}"))
        })?;
        Ok(cluster)
    }

    fn client(&self, program: &str) -> Command {
        let mut cmd = self.pg.command(program, &self.dir);
        cmd.arg("-h")
            .arg(self.dir.join("sock"))
            .args(["-U", "postgres"]);
        cmd
    }

    fn pgbench(&self, args: &[&str]) -> Result<String, WalError> {
        let mut cmd = self.client("pgbench");
        cmd.args(args).arg("postgres");
        run(cmd, &format!("pgbench {}", args.join(" ")))
    }

    fn sql(&self, query: &str) -> Result<String, WalError> {
        let mut cmd = self.client("psql");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            "postgres",
            "-c",
            query,
        ]);
        run(cmd, &format!("psql -c '{query}'"))
    }

    /// The `Total` line of `pg_waldump --stats` over segments `first..=last` (record count,
    /// record bytes and full-page-image bytes), when `pg_waldump` is there and works.
    fn waldump_totals(&self, tli: u32, first: u64, last: u64) -> Option<String> {
        let mut cmd = self.pg.command("pg_waldump", &self.dir);
        cmd.arg("--stats")
            .arg("-p")
            .arg(self.dir.join("data/pg_wal"))
            .arg(segment_name(tli, first))
            .arg(segment_name(tli, last));
        let out = run(cmd, "pg_waldump --stats").ok()?;
        let total = out.lines().find(|l| l.starts_with("Total"))?;
        let f: Vec<&str> = total.split_whitespace().collect();
        // Total N RECBYTES [x%] FPIBYTES [y%] COMBINED [100%]
        match f.as_slice() {
            [_, n, rec, rec_pct, fpi, fpi_pct, combined, ..] => Some(format!(
                "{n} records, {rec} bytes of records {rec_pct}, {fpi} bytes of full-page images \
                 {fpi_pct}, {combined} bytes in all"
            )),
            _ => None,
        }
    }

    /// The WAL insert position as a byte number.
    fn insert_lsn(&self) -> Result<u64, WalError> {
        let text = self.sql("SELECT pg_current_wal_insert_lsn()")?;
        let parse = |s: &str| u64::from_str_radix(s, 16).ok();
        text.split_once('/')
            .and_then(|(hi, lo)| Some((parse(hi)? << 32) | parse(lo)?))
            .ok_or_else(|| err(format!("'{text}' is not an LSN")))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.started {
            let mut stop = self.pg.command("pg_ctl", &self.dir);
            stop.arg("-D")
                .arg(self.dir.join("data"))
                .args(["-m", "immediate", "-w", "stop"]);
            let _ = run(stop, "pg_ctl stop");
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(segment_name(1, 3), "000000010000000000000003");
        assert_eq!(segment_name(1, 0x1_23), "000000010000000100000023");
        for segno in [0, 1, 255, 256, 0x1234_5678] {
            assert_eq!(segment_number(&segment_name(7, segno)), Some(segno));
        }
        assert_eq!(segment_number("000000010000000000000100"), None);
        assert_eq!(segment_number("00000001000000000000000"), None);
    }

    #[test]
    fn rejects_unwritten_pages() {
        let mut data = vec![0u8; SEGMENT_SIZE];
        let name = segment_name(1, 2);
        let base = 2 * SEGMENT_SIZE as u64;
        for (i, page) in data.chunks_exact_mut(WAL_PAGE_SIZE).enumerate() {
            page[..2].copy_from_slice(&PG15_WAL_PAGE_MAGIC.to_le_bytes());
            page[8..16].copy_from_slice(&(base + (i * WAL_PAGE_SIZE) as u64).to_le_bytes());
        }
        check_segment(&name, &data).unwrap();
        data[SEGMENT_SIZE - WAL_PAGE_SIZE..].fill(0);
        assert!(check_segment(&name, &data).is_err());
        assert!(check_segment(&segment_name(1, 3), &data[..]).is_err());
    }
}
