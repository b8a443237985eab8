//! Look-ahead archiving, restore prefetch and the progress timeout, against real PostgreSQL.
//!
//! - Look-ahead under SIGKILL: while a WAL-heavy workload runs, `walcore-archive` processes
//!   (PostgreSQL's foreground calls and their `--lookahead-worker`s) are killed at random
//!   moments. Afterwards every segment is in the repository exactly once, with no temporary
//!   file left, and restores byte for byte.
//! - Prefetch across a timeline switch: recoveries with prefetch off and on reach the same rows,
//!   also when the archive holds a newer timeline and timeline 1 went on diverging; the spool
//!   never holds a `.history` or `.partial` file and is never part of a base backup.
//! - A stalled S3 endpoint (connections accepted, never answered): both commands fail within
//!   the progress timeout although the retry window and the request timeout are long.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use walcore_e2e::repo::{self, Codec, KEY_1, segments_between, wal_key};
use walcore_e2e::workload::{create_table, fingerprint, insert_batch};
use walcore_e2e::{BaseBackup, Cluster, Fault, FaultProxy, Moto, Repo, bins, moto, sys};

use crate::archive_matrix::{self, assert_empty, describe, dest_dir, name_of};
use crate::scenario::{self, ARCHIVE_WAIT, assert_promoted};

/// The spool's directory name inside the data directory (walcore's default).
const SPOOL: &str = "pgsql_tmp_walcore";

/// `env` with `name` set to `value` (replacing an earlier value).
fn with_var(env: &[(String, String)], name: &str, value: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = env.iter().filter(|(k, _)| k != name).cloned().collect();
    v.push((name.to_string(), value.to_string()));
    v
}

/// A small xorshift generator: random moments without a dependency. The seed is printed so that
/// a failing run can be told apart from another.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn seeded() -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng((nanos ^ (u64::from(std::process::id()) << 32)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Every file under `dir`, as paths relative to `root`, added to `out` (quietly skipping what
/// vanishes meanwhile).
fn list_files(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => list_files(root, &p, out),
            Ok(_) => {
                if let Ok(rel) = p.strip_prefix(root) {
                    out.insert(rel.to_string_lossy().into_owned());
                }
            }
            Err(_) => {}
        }
    }
}

/// Polls a directory tree every 10 ms in a thread and remembers every file ever seen in it.
struct Watch {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<BTreeSet<String>>>,
}

impl Watch {
    fn start(root: PathBuf) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            while !flag.load(Ordering::SeqCst) {
                list_files(&root, &root, &mut seen);
                std::thread::sleep(Duration::from_millis(10));
            }
            list_files(&root, &root, &mut seen);
            seen
        });
        Watch {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops watching; every file seen.
    fn finish(mut self) -> BTreeSet<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("a running watch")
            .join()
            .expect("the watch thread")
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Whether `text` holds a WAL segment name (24 hexadecimal digits in a row).
fn mentions_segment(text: &str) -> bool {
    let mut run = 0;
    for c in text.chars() {
        if c.is_ascii_hexdigit() {
            run += 1;
            if run == 24 {
                return true;
            }
        } else {
            run = 0;
        }
    }
    false
}

// ---- look-ahead under SIGKILL ----

/// A `walcore-archive` process of one cluster.
#[derive(Debug, Clone)]
struct ArchiveProcess {
    pid: u32,
    /// Started as `walcore-archive --lookahead-worker …`.
    worker: bool,
}

/// The live `walcore-archive` processes of the cluster whose binaries are in `bin` and whose
/// data directory is `data`, from `/proc`. A process counts as the cluster's when it runs the
/// cluster's copy of the binary, names the data directory in its arguments, or works in it
/// (PostgreSQL runs `archive_command` in the data directory): other tests' archivers, running
/// in parallel in this process, are left alone.
fn archive_processes(bin: &Path, data: &Path) -> Vec<ArchiveProcess> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    let data_text = data.to_string_lossy();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let dir = e.path();
        let Ok(raw) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        // Kernel threads and zombies have no command line.
        let Some(argv0) = args.first() else {
            continue;
        };
        let exe = std::fs::read_link(dir.join("exe")).ok();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let is_archive = Path::new(argv0)
            .file_name()
            .is_some_and(|n| n == bins::ARCHIVE)
            || comm.trim() == bins::ARCHIVE
            || exe
                .as_deref()
                .and_then(Path::file_name)
                .is_some_and(|n| n == bins::ARCHIVE);
        if !is_archive {
            continue;
        }
        let cwd = std::fs::read_link(dir.join("cwd")).ok();
        let ours = Path::new(argv0).starts_with(bin)
            || exe.as_deref().is_some_and(|p| p.starts_with(bin))
            || args.iter().any(|a| a.contains(data_text.as_ref()))
            || cwd.as_deref() == Some(data);
        if ours {
            out.push(ArchiveProcess {
                pid,
                worker: args.iter().any(|a| a == "--lookahead-worker"),
            });
        }
    }
    out
}

/// Sends SIGKILL to `pid`; whether it was delivered.
fn sigkill(pid: u32) -> bool {
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What the killer did.
#[derive(Debug, Default)]
struct Kills {
    foreground: AtomicU32,
    worker: AtomicU32,
    /// Moments at which a look-ahead worker of the cluster was running.
    worker_seen: AtomicU32,
    ticks: AtomicU32,
}

impl Kills {
    fn summary(&self) -> String {
        format!(
            "{} foreground calls and {} look-ahead workers killed in {} moments (a worker was \
             running at {} of them)",
            self.foreground.load(Ordering::SeqCst),
            self.worker.load(Ordering::SeqCst),
            self.ticks.load(Ordering::SeqCst),
            self.worker_seen.load(Ordering::SeqCst)
        )
    }
}

/// Least time between two kills of foreground calls, and between the start of the killer (the
/// cluster's start) and the first. A killed `archive_command` makes PostgreSQL 15's archiver
/// exit (FATAL); the postmaster starts a new one at once only if the old one ran for 10 s or
/// more, else at its first wake-up (a connection, a child's exit) after those 10 s. Killing
/// foreground calls faster would stall archiving, and the workers with it.
const FOREGROUND_KILL_GAP: Duration = Duration::from_secs(12);

/// Until `stop`: every 50 to 500 ms (at random), SIGKILLs one of the cluster's
/// `walcore-archive` processes: a look-ahead worker if one runs, else a foreground call if the
/// last one killed is [`FOREGROUND_KILL_GAP`] ago (and, every other time, a foreground call
/// first when both kinds run).
fn kill_archivers(bin: &Path, data: &Path, stop: &AtomicBool, kills: &Kills, mut rng: Rng) {
    let mut prefer_foreground = rng.below(2) == 1;
    let mut last_foreground = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        // A foreground call answered from a record lives for milliseconds: once one may be
        // killed and too few were, look for one closely instead of at random moments.
        let hunting = last_foreground.elapsed() >= FOREGROUND_KILL_GAP
            && kills.foreground.load(Ordering::SeqCst) < KILLS_WANTED.0;
        std::thread::sleep(if hunting {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(50 + rng.below(451))
        });
        kills.ticks.fetch_add(1, Ordering::SeqCst);
        let (workers, mut foreground): (Vec<_>, Vec<_>) = archive_processes(bin, data)
            .into_iter()
            .partition(|p| p.worker);
        if !workers.is_empty() {
            kills.worker_seen.fetch_add(1, Ordering::SeqCst);
        }
        if last_foreground.elapsed() < FOREGROUND_KILL_GAP {
            foreground.clear();
        }
        let pool =
            if ((prefer_foreground || hunting) && !foreground.is_empty()) || workers.is_empty() {
                foreground
            } else {
                workers
            };
        if pool.is_empty() {
            continue;
        }
        let victim = &pool[rng.below(pool.len() as u64) as usize];
        if sigkill(victim.pid) {
            if victim.worker {
                kills.worker.fetch_add(1, Ordering::SeqCst);
            } else {
                kills.foreground.fetch_add(1, Ordering::SeqCst);
                last_foreground = Instant::now();
            }
            prefer_foreground = victim.worker;
        }
    }
}

/// The look-ahead workload comes in bursts, 2.5 s apart: a batch of 60 000 rows (a full
/// segment of WAL) and then 3 segments ended at once, so that segments wait for the archiver
/// together and a worker starts. At least [`MIN_BURSTS`], and more until both kinds of
/// processes were killed often enough, at most [`MAX_BURSTS`].
const BATCH_ROWS: u32 = 60_000;
const BURST_SWITCHES: usize = 3;
const BURST_PAUSE: Duration = Duration::from_millis(2500);
const MIN_BURSTS: u32 = 4;
const MAX_BURSTS: u32 = 14;
/// Kills wanted of each kind: foreground calls, workers.
const KILLS_WANTED: (u32, u32) = (2, 3);

/// Ends `n` segments in quick succession: a row, then a switch, `n` times in one round trip.
fn quick_switches(c: &Cluster, n: usize) {
    c.psql(&"insert into t values (0, 'S', 'switch'); select pg_switch_wal();".repeat(n));
}

/// Sets its flag when dropped: a panicking workload stops the killer too (a scoped thread
/// still running would keep the scope, and the test, from ending).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Lines of the server log saying an archive command failed or was killed.
fn archive_failures_logged(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.contains("archive command failed") || l.contains("archive command was terminated")
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn lookahead_archives_every_segment_once_under_kills() {
    let repo = Repo::file();
    let codec = Codec::encrypted(KEY_1);
    let env = repo.env(&codec);
    let mut c = Cluster::new();
    c.archive_with_walcore();
    c.set_env(&env);
    // Keep every segment in pg_wal, to compare the restored ones with.
    c.set("wal_keep_size", "4GB");
    c.start();
    create_table(&c);
    let spool = c.data.join(SPOOL);
    let records = Watch::start(spool.join("archive"));

    let t0 = Instant::now();
    let rng = Rng::seeded();
    let seed = rng.0;
    let kills = Kills::default();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let killer = s.spawn(|| kill_archivers(&c.bin, &c.data, &stop, &kills, rng));
        let stop_killer = StopOnDrop(&stop);
        let mut bursts = 0;
        while bursts < MIN_BURSTS
            || (bursts < MAX_BURSTS
                && (kills.foreground.load(Ordering::SeqCst) < KILLS_WANTED.0
                    || kills.worker.load(Ordering::SeqCst) < KILLS_WANTED.1))
        {
            insert_batch(&c, &format!("K{bursts}"), BATCH_ROWS);
            quick_switches(&c, BURST_SWITCHES);
            bursts += 1;
            std::thread::sleep(BURST_PAUSE);
        }
        eprintln!(
            "[{:?}] {bursts} bursts written up to {}; {}",
            t0.elapsed(),
            c.current_wal_file(),
            kills.summary()
        );
        drop(stop_killer);
        killer.join().expect("the killer thread");
    });
    eprintln!(
        "[{:?}] killing stopped (seed {seed:#x}): {}",
        t0.elapsed(),
        kills.summary()
    );
    let last = c.archive_all(ARCHIVE_WAIT);
    eprintln!("[{:?}] archived up to {last}", t0.elapsed());

    // Workers end about a second after they run out of work; then nothing writes any more.
    sys::wait_for(Duration::from_secs(60), Duration::from_millis(200), || {
        let left = archive_processes(&c.bin, &c.data);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "walcore-archive processes still running after everything was archived: {left:?}"
            ))
        }
    });
    let records = records.finish();

    let log = c.server_log();
    let stats = c.psql(
        "select failed_count || '|' || archived_count || '|' || coalesce(last_failed_wal, '') \
         from pg_stat_archiver",
    );
    let failed_count: u64 = stats
        .split('|')
        .next()
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    let logged = archive_failures_logged(&log);
    let (fg_kills, worker_kills) = (
        kills.foreground.load(Ordering::SeqCst),
        kills.worker.load(Ordering::SeqCst),
    );
    assert!(
        fg_kills + worker_kills > 0,
        "the killer hit nothing: {} (seed {seed:#x}); the test proves nothing without kills\n--- \
         server log ---\n{}",
        kills.summary(),
        sys::tail(&log, 60)
    );
    assert!(
        fg_kills > 0,
        "no foreground call was killed: {} (seed {seed:#x})\n--- server log ---\n{}",
        kills.summary(),
        sys::tail(&log, 60)
    );
    assert!(
        worker_kills > 0,
        "no look-ahead worker was killed: {} (seed {seed:#x}); is look-ahead on?\n--- server \
         log ---\n{}",
        kills.summary(),
        sys::tail(&log, 60)
    );
    // PostgreSQL counts an archive command killed by a signal in the server log (and restarts
    // the archiver), not in pg_stat_archiver: both are evidence of failed calls.
    assert!(
        failed_count > 0 || !logged.is_empty(),
        "{} (seed {seed:#x}), yet PostgreSQL saw no archive command fail: pg_stat_archiver \
         (failed|archived|last_failed) = {stats}\n--- server log ---\n{}",
        kills.summary(),
        sys::tail(&log, 60)
    );
    eprintln!(
        "pg_stat_archiver (failed|archived|last_failed) = {stats}; {} failed or killed calls in \
         the server log, e.g. {:?}",
        logged.len(),
        logged.first()
    );

    // Evidence that the worker, not only the foreground calls, archived segments: it records
    // each segment it archived in the spool, and a call finding such a record says so.
    let worker_log = std::fs::read_to_string(spool.join("archive-worker.log")).unwrap_or_default();
    let recorded: Vec<&String> = records.iter().filter(|r| r.ends_with(".done")).collect();
    let fast_calls = log
        .lines()
        .filter(|l| l.contains("archived ahead by the look-ahead worker"))
        .count();
    assert!(
        fast_calls > 0 || !recorded.is_empty(),
        "no segment was archived by a look-ahead worker: no call answered from a worker's record, \
         and none was ever seen in {} (files seen there: {records:?})\n--- archive-worker.log \
         ---\n{}\n--- server log ---\n{}",
        spool.join("archive").display(),
        sys::tail(&worker_log, 30),
        sys::tail(&log, 40)
    );
    eprintln!(
        "{fast_calls} calls answered from look-ahead records; {} records seen in the spool; \
         archive-worker.log has {} lines",
        recorded.len(),
        worker_log.lines().count()
    );

    // The repository: metadata, and each segment once, nothing else.
    let keys = repo.keys();
    let mut segments: Vec<String> = Vec::new();
    let mut temporary: Vec<&String> = Vec::new();
    let mut other: Vec<&String> = Vec::new();
    for k in &keys {
        let name = k.rsplit('/').next().unwrap_or(k);
        if k == repo::META_KEY {
            continue;
        }
        if name.len() == 24 && mentions_segment(name) && *k == wal_key(name) {
            segments.push(name.to_string());
        } else if name.starts_with('.') {
            temporary.push(k);
        } else {
            other.push(k);
        }
    }
    assert!(
        other.is_empty(),
        "the repository holds files that are neither segments nor its metadata: {other:?}"
    );
    let first = segments
        .first()
        .unwrap_or_else(|| panic!("no segment in the repository: {keys:?}"))
        .clone();
    let expected = segments_between(&first, &last);
    assert!(
        expected.len() >= 12,
        "the workload should have filled at least 12 segments: {first} to {last}"
    );
    let mut sorted = segments.clone();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        segments.len(),
        "a segment is stored more than once: {segments:?}"
    );
    assert_eq!(
        segments, expected,
        "the repository should hold every segment from {first} to {last}, once"
    );

    // Each restores byte for byte as it is in pg_wal.
    let restore_env = with_var(&env, "WALCORE_PREFETCH", "0");
    for seg in &expected {
        let original = std::fs::read(c.data.join("pg_wal").join(seg))
            .unwrap_or_else(|e| panic!("{seg} is not in pg_wal any more (wal_keep_size): {e}"));
        let dest = dest_dir();
        let target = dest.path().join("RECOVERYXLOG");
        let out = bins::restore(&restore_env, seg, &target);
        assert_eq!(
            out.code(),
            Some(0),
            "{}",
            describe(&format!("restoring {seg}"), &out)
        );
        let restored = std::fs::read(&target).expect("the restored file");
        assert!(
            restored == original,
            "{seg}: restored bytes differ from pg_wal's ({} vs {} bytes, CRC {:08x} vs {:08x})",
            restored.len(),
            original.len(),
            repo::crc32(&restored),
            repo::crc32(&original)
        );
    }
    eprintln!(
        "[{:?}] {} segments ({first} to {last}) stored once each and restored byte for byte",
        t0.elapsed(),
        expected.len()
    );
    assert!(
        temporary.is_empty(),
        "{} temporary files left in the repository by killed writers ({}): {temporary:?}",
        temporary.len(),
        kills.summary()
    );
}

// ---- prefetch across a timeline switch ----

/// Rows on timeline 1 before the fork: about 6 segments.
const ROWS_A: u32 = 360_000;
/// Rows timeline 1 goes on with after the fork (never on timeline 2): about 2 segments.
const ROWS_Z: u32 = 120_000;
/// Rows of timeline 2: about 4 segments.
const ROWS_B: u32 = 240_000;

/// A cluster recovering `base` with walcore and `env`, not started.
fn recovering(base: &BaseBackup, env: &[(String, String)]) -> Cluster {
    let mut c = Cluster::from_backup(base);
    c.set_env(env);
    c.recover_with_walcore(None);
    c
}

/// The WAL files PostgreSQL restored, from the server log, in order.
fn restored_files(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split("restored log file \"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect()
}

/// The server log's lines in which walcore says it served a prefetched segment (not its
/// warnings about a prefetched file it would not serve).
fn prefetched_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("prefetched") && !l.contains("WARN"))
        .map(str::to_string)
        .collect()
}

/// Asserts that a prefetch-on recovery served segments from the spool, and that the spool never
/// held a timeline history or partial segment.
fn assert_prefetched(c: &Cluster, spool_seen: &BTreeSet<String>, what: &str) {
    let log = c.server_log();
    let lines = prefetched_lines(&log);
    assert!(
        !lines.is_empty(),
        "{what}: no segment was served from the prefetch spool (no INFO line with \
         'prefetched'); files seen in the spool: {spool_seen:?}\n--- restore-worker.log ---\n{}\n\
         --- server log ---\n{}",
        sys::tail(&worker_log(c), 30),
        sys::tail(&log, 60)
    );
    let bad: Vec<&String> = spool_seen
        .iter()
        .filter(|f| f.contains(".history") || f.contains(".partial"))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: the prefetch spool held history or partial files: {bad:?}"
    );
    assert!(
        spool_seen.iter().any(|f| mentions_segment(f)),
        "{what}: {} segments served as prefetched, but the watch never saw one in the spool: \
         {spool_seen:?}",
        lines.len()
    );
    eprintln!(
        "{what}: {} segments served from the spool; {} files seen there, e.g. {:?}",
        lines.len(),
        spool_seen.len(),
        spool_seen.iter().take(4).collect::<Vec<_>>()
    );
}

fn worker_log(c: &Cluster) -> String {
    std::fs::read_to_string(c.data.join(SPOOL).join("restore-worker.log")).unwrap_or_default()
}

/// Asserts that a prefetch-off recovery did not use the spool.
fn assert_not_prefetched(c: &Cluster, what: &str) {
    let lines = prefetched_lines(&c.server_log());
    assert!(
        lines.is_empty(),
        "{what}: WALCORE_PREFETCH=0, yet segments were served as prefetched: {lines:?}"
    );
}

/// The timeline a running primary writes (from the name of its current WAL file).
fn timeline(c: &Cluster) -> String {
    c.current_wal_file()[..8].to_string()
}

#[test]
fn prefetch_reaches_the_same_rows_across_a_timeline_switch() {
    let t0 = Instant::now();
    let repo = Repo::file();
    let codec = Codec::encrypted(KEY_1);
    let env_on = repo.env(&codec);
    let env_off = with_var(&env_on, "WALCORE_PREFETCH", "0");

    // Timeline 1: base backup, batch A, archived.
    let mut a = Cluster::new();
    a.archive_with_walcore();
    a.set_env(&env_on);
    a.start();
    create_table(&a);
    let base = a.base_backup();
    // Batch A in two transactions, with a recovery target between them.
    insert_batch(&a, "A", ROWS_A / 2);
    let f_half = fingerprint(&a);
    let mid_lsn = a.psql("select pg_current_wal_lsn()");
    insert_batch(&a, "A", ROWS_A / 2);
    let f1 = fingerprint(&a);
    let a_last = a.archive_all(ARCHIVE_WAIT);
    eprintln!("[{:?}] timeline 1 archived up to {a_last}", t0.elapsed());

    // Round 1: to the end of the archive, prefetch off, then on.
    let off = recovering(&base, &env_off);
    let outcome = scenario::run_recovery(&off);
    assert_promoted(&off, outcome, "round 1, prefetch off");
    assert_eq!(fingerprint(&off), f1, "round 1, prefetch off: rows");
    assert_not_prefetched(&off, "round 1, prefetch off");
    drop(off);

    // The prefetch-on one becomes timeline 2's primary: archiving to the same repository, on
    // already at promotion so that 00000002.history is archived too.
    let on = recovering(&base, &env_on);
    on.set("archive_mode", "on");
    on.archive_with_walcore();
    let watch = Watch::start(on.data.join(SPOOL).join("restore"));
    let outcome = scenario::run_recovery(&on);
    assert_promoted(&on, outcome, "round 1, prefetch on");
    assert_eq!(fingerprint(&on), f1, "round 1, prefetch on: rows");
    let restored = restored_files(&on.server_log());
    assert!(
        restored.contains(&a_last),
        "round 1, prefetch on: {a_last} (the end of the archive) was not restored: {restored:?}"
    );
    assert_eq!(
        timeline(&on),
        "00000002",
        "round 1: the promoted cluster's timeline"
    );
    eprintln!("[{:?}] round 1 done: both promoted with F1", t0.elapsed());

    // Timeline 1 goes on in the source: batch Z, archived, on segments timeline 2 also has.
    insert_batch(&a, "Z", ROWS_Z);
    let with_z = fingerprint(&a);
    let z_last = a.archive_all(ARCHIVE_WAIT);
    a.stop();

    // Timeline 2: batch B, archived.
    insert_batch(&on, "B", ROWS_B);
    let f2 = fingerprint(&on);
    let b_last = on.archive_all(ARCHIVE_WAIT);
    assert_prefetched(&on, &watch.finish(), "round 1, prefetch on");
    let keys = repo.keys();
    assert!(
        keys.iter().any(|k| k == &wal_key("00000002.history")),
        "00000002.history was not archived: {keys:?}"
    );
    eprintln!(
        "[{:?}] timeline 1 archived up to {z_last} ({with_z}), timeline 2 up to {b_last} ({f2})",
        t0.elapsed()
    );
    drop(on);

    // Round 2: from the same base backup to the latest timeline, prefetch off, then on.
    for prefetch in [false, true] {
        let what = format!(
            "round 2 (recovery_target_timeline = latest), prefetch {}",
            if prefetch { "on" } else { "off" }
        );
        let c = recovering(&base, if prefetch { &env_on } else { &env_off });
        c.set("recovery_target_timeline", "latest");
        let watch = prefetch.then(|| Watch::start(c.data.join(SPOOL).join("restore")));
        let outcome = scenario::run_recovery(&c);
        assert_promoted(&c, outcome, &what);
        let log = c.server_log();
        let rows = fingerprint(&c);
        assert_eq!(
            rows,
            f2,
            "{what}: rows differ from timeline 2's (timeline 1 ended with {with_z})\n--- server \
             log ---\n{}",
            sys::tail(&log, 60)
        );
        let restored = restored_files(&log);
        assert!(
            restored.iter().any(|f| f == "00000002.history")
                && restored.contains(&b_last)
                && restored.iter().any(|f| f.starts_with("00000001")),
            "{what}: expected timeline 1's segments, 00000002.history and timeline 2's segments \
             up to {b_last} restored: {restored:?}"
        );
        let Some(watch) = watch else {
            assert_not_prefetched(&c, &what);
            continue;
        };

        assert_backup_skips_spool(&c, &what, false);
        assert_prefetched(&c, &watch.finish(), &what);
    }
    eprintln!("[{:?}] round 2 done: both reached F2", t0.elapsed());

    // Round 3: to a point in the middle of timeline 1, prefetch on. The worker fetched segments
    // past the target that PostgreSQL never asks for: they wait in the spool (until the worker
    // gives up), and a base backup taken meanwhile must leave them out.
    let what = "round 3 (recovery_target_lsn on timeline 1), prefetch on";
    let c = recovering(&base, &env_on);
    c.set("recovery_target_timeline", "current");
    c.set("recovery_target_lsn", &mid_lsn);
    c.set("recovery_target_action", "promote");
    let watch = Watch::start(c.data.join(SPOOL).join("restore"));
    let outcome = scenario::run_recovery(&c);
    assert_promoted(&c, outcome, what);
    assert_eq!(
        fingerprint(&c),
        f_half,
        "{what}: rows as of {mid_lsn}\n--- server log ---\n{}",
        sys::tail(&c.server_log(), 60)
    );
    assert_backup_skips_spool(&c, what, true);
    assert_prefetched(&c, &watch.finish(), what);
    eprintln!("[{:?}] round 3 done", t0.elapsed());
}

/// Takes `pg_basebackup -Ft` of `c` (promoted after a prefetch-on recovery) while its spool
/// holds files (prefetched segments among them when `with_segments`), and asserts that no
/// member of `base.tar` comes from the spool.
fn assert_backup_skips_spool(c: &Cluster, what: &str, with_segments: bool) {
    let spool = c.data.join(SPOOL);
    let mut spool_files = BTreeSet::new();
    list_files(&spool, &spool, &mut spool_files);
    let segments: Vec<&String> = spool_files
        .iter()
        .filter(|f| {
            let name = f.rsplit('/').next().unwrap_or(f);
            name.len() == 24 && mentions_segment(name)
        })
        .collect();
    assert!(
        !spool_files.is_empty() && (!with_segments || !segments.is_empty()),
        "{what}: right after recovery the spool holds {}; nothing to keep out of a backup: \
         {spool_files:?}",
        if with_segments {
            "no prefetched segment"
        } else {
            "no file"
        }
    );
    let backup = c.base_backup_tar();
    let tar = backup.path.join("base.tar");
    let out = sys::run(
        Command::new("tar").arg("-tf").arg(&tar),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "tar -tf {}: {}",
        tar.display(),
        out.stderr
    );
    let members: Vec<&str> = out.stdout.lines().collect();
    assert!(
        members.iter().any(|m| m.ends_with("global/pg_control")),
        "{what}: base.tar lists no global/pg_control: {} members",
        members.len()
    );
    let leaked: Vec<&&str> = members.iter().filter(|m| m.contains(SPOOL)).collect();
    assert!(
        leaked.is_empty(),
        "{what}: the base backup holds spool files: {leaked:?} (spool then: {spool_files:?})"
    );
    // The spool still had them after the backup: they were there to be left out.
    let mut after = BTreeSet::new();
    list_files(&spool, &spool, &mut after);
    eprintln!(
        "{what}: base.tar has {} members, none from the spool ({} files there before the \
         backup, {} after; segments: {segments:?})",
        members.len(),
        spool_files.len(),
        after.len()
    );
}

// ---- a stalled endpoint ----

/// `out` is a call that gave up on a stalled endpoint: exit `code`, within `bound`, saying why.
fn assert_gave_up(out: &sys::Output, doing: &str, code: i32, bound: Duration) {
    assert_eq!(
        out.code(),
        Some(code),
        "{}",
        describe(
            &format!(
                "{doing} while the endpoint stalls (expected exit {code} within the progress timeout)"
            ),
            out
        )
    );
    assert!(
        out.elapsed < bound,
        "{doing} gave up only after {:?} with WALCORE_PROGRESS_TIMEOUT=3s",
        out.elapsed
    );
    assert!(
        out.stderr.to_ascii_lowercase().contains("no progress"),
        "{}",
        describe(&format!("{doing}: the error should say 'no progress'"), out)
    );
}

#[test]
fn stalled_endpoint_fails_both_commands_within_the_timeout() {
    if !moto::s3_enabled("throughput::stalled_endpoint_fails_both_commands_within_the_timeout") {
        return;
    }
    let samples = archive_matrix::samples();
    let moto = Moto::shared();
    let repo = Repo::s3(moto);
    let proxy = FaultProxy::start(moto.addr());
    let mut env = repo.env_at(&Codec::encrypted(KEY_1), Some(&proxy.endpoint()));
    // Only the progress timeout can end a call: the retry window and each request's own limit
    // are far longer than the bound checked below.
    for (k, v) in [
        ("WALCORE_PROGRESS_TIMEOUT", "3s"),
        ("WALCORE_RETRY_TIME", "60s"),
        ("WALCORE_REQUEST_TIMEOUT", "120s"),
    ] {
        env = with_var(&env, k, v);
    }
    let bound = Duration::from_secs(30);

    // A first segment normally: the repository and its metadata exist.
    let first = &samples.segments[0];
    let out = bins::archive(&env, first);
    assert_eq!(
        out.code(),
        Some(0),
        "{}",
        describe("archiving the first segment through the proxy", &out)
    );

    proxy.arm("/", Fault::Stall);
    let second = &samples.segments[1];
    let out = bins::archive(&env, second);
    assert_gave_up(&out, "archiving", 7, bound);
    assert!(
        proxy.faulted() > 0,
        "the proxy stalled no request: {:?}",
        proxy.request_lines()
    );
    eprintln!(
        "archive: exit 7 after {:?}: {}",
        out.elapsed,
        out.stderr.trim()
    );

    let dest = dest_dir();
    let out = bins::restore(&env, &name_of(first), &dest.path().join("RECOVERYXLOG"));
    assert_gave_up(&out, "restoring", 204, bound);
    assert_empty(dest.path(), "restore while the endpoint stalls");
    eprintln!(
        "restore: exit 204 after {:?}: {}",
        out.elapsed,
        out.stderr.trim()
    );

    // Disarmed, the held connections are let go, and the stall stored nothing.
    assert!(
        proxy.stalled() > 0,
        "no connection was held open by the stall"
    );
    proxy.disarm();
    sys::wait_for(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || match proxy.stalled() {
            0 => Ok(()),
            n => Err(format!("{n} connections still held after disarming")),
        },
    );
    assert!(
        repo.read(&wal_key(&name_of(second))).is_none(),
        "{} was stored although every request stalled",
        name_of(second)
    );
}
