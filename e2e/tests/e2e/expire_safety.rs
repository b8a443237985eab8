//! `walcore expire` where it can lose data: killed with SIGKILL at random points and run again
//! (S3 through a throttling proxy, so that the kill points land inside the run), run in two
//! loops at once beside `archive_command` pushes and takes while pgbench writes (file and S3),
//! and its orphan sweep of a killed take and of a stalled one, beside a running one.
//!
//! After every kill the repository must still be one in which every listed backup restores and
//! the restorable window holds: each listed backup has its catalog record, its objects and the
//! WAL from its start to its stop, the backups the plan keeps are all listed, and no segment of
//! a WAL range the plan keeps (the window among them) is missing. Kills follow one another on
//! the same repository; once a run has finished the job (or waits for the orphan grace), what
//! it deleted is put back, so that every kill lands in real work. A final complete run must
//! leave exactly the plan, and its oldest and newest backups must restore.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use walcore_e2e::cluster::pg_bin_dir;
use walcore_e2e::repo::{Codec, KEY_1, wal_key};
use walcore_e2e::workload::{create_table, fingerprint, insert_batch};
use walcore_e2e::{Cluster, Fault, FaultProxy, Moto, Repo, bins, moto, sys};

use crate::backup::{Tool, conninfo, empty_cluster, prepare_restored};
use crate::scenario::{self, ARCHIVE_WAIT, assert_promoted};

/// The shortest orphan grace `expire` accepts; every run here uses it, so that the objects of
/// a backup whose catalog record a killed run already deleted are swept by the next one.
const GRACE: &str = "15s";
const GRACE_TIME: Duration = Duration::from_secs(15);
/// Bytes per second through the proxy in front of the killed runs: slow enough that a request
/// takes tens of milliseconds, so that a kill lands inside one.
const THROTTLE: u64 = 4 * 1024;
/// Kills the loop makes, and how many of them must land once the run has started writing.
const KILLS: (u32, u32) = (10, 4);

/// A small xorshift generator. The seed comes from `WALCORE_TEST_SEED` when set (to replay a
/// failing run) and is always printed.
struct Rng(u64);

impl Rng {
    fn from_env_or_clock(test: &str) -> Rng {
        let seed = std::env::var("WALCORE_TEST_SEED")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or_else(|| {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                nanos ^ (u64::from(std::process::id()) << 32)
            })
            | 1;
        eprintln!("{test}: seed {seed} (replay with WALCORE_TEST_SEED={seed})");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n.max(1)
    }
}

/// `walcore` (the operator command) installed into `cluster`'s `bin/`, with `env`.
fn walcore(cluster: &Cluster, env: Vec<(String, String)>) -> Tool {
    Tool {
        program: cluster.install(bins::WALCORE),
        env,
        cwd: cluster.dir().to_path_buf(),
    }
}

/// A source cluster archiving with `walcore-archive` into `repo`, started, with table `t`.
fn source(repo: &Repo, codec: &Codec) -> Cluster {
    let mut src = Cluster::new();
    src.archive_with_walcore();
    src.set_env(&repo.env(codec));
    src.start();
    create_table(&src);
    src
}

// ---------------------------------------------------------------------------------------------
// WAL positions and segment names (16 MiB segments unless the record says otherwise).

/// `X/Y` → the 64-bit LSN.
fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text
        .split_once('/')
        .unwrap_or_else(|| panic!("not an LSN: {text:?}"));
    let hi = u64::from_str_radix(hi, 16).unwrap_or_else(|_| panic!("not an LSN: {text:?}"));
    let lo = u64::from_str_radix(lo, 16).unwrap_or_else(|_| panic!("not an LSN: {text:?}"));
    (hi << 32) | lo
}

const SEGMENT: u64 = 16 * 1024 * 1024;

/// The segment number holding `lsn`.
fn segment_of(lsn: u64, seg_size: u64) -> u64 {
    lsn / seg_size
}

/// PostgreSQL's `XLogFileName`: the name of segment `seg` of `timeline`.
fn segment_name(timeline: u32, seg: u64, seg_size: u64) -> String {
    let per_log = 0x1_0000_0000 / seg_size;
    format!("{timeline:08X}{:08X}{:08X}", seg / per_log, seg % per_log)
}

/// `XLogFromFileName`: (timeline, segment number) of a segment name.
fn parse_segment(name: &str, seg_size: u64) -> Option<(u32, u64)> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let tl = u32::from_str_radix(&name[..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some((tl, log * (0x1_0000_0000 / seg_size) + seg))
}

/// The segments of `timeline` stored in the repository (from its keys).
fn stored_segments(keys: &BTreeSet<String>, timeline: u32, seg_size: u64) -> BTreeSet<u64> {
    keys.iter()
        .filter_map(|k| k.strip_prefix("wal/"))
        .filter_map(|k| k.rsplit('/').next())
        .filter_map(|name| parse_segment(name, seg_size))
        .filter(|(tl, _)| *tl == timeline)
        .map(|(_, seg)| seg)
        .collect()
}

/// The segments of `timeline` from `first` to `last` that the repository lacks, by name.
fn missing_segments(
    keys: &BTreeSet<String>,
    timeline: u32,
    (first, last): (u64, u64),
    seg_size: u64,
) -> Vec<String> {
    (first..=last)
        .map(|seg| segment_name(timeline, seg, seg_size))
        .filter(|name| !keys.contains(&wal_key(name)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// What `list` shows, and what must hold of it.

/// A backup as `walcore list --json` shows it.
#[derive(Debug, Clone)]
struct Listed {
    id: String,
    start: (u32, u64),
    stop: (u32, u64),
    seg_size: u64,
    wal_included: bool,
    objects: Vec<String>,
    pinned: bool,
}

fn listed(tool: &Tool) -> Vec<Listed> {
    let out = tool.ok(&["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("walcore list --json is not JSON ({e}): {out}"));
    v.as_array()
        .unwrap_or_else(|| panic!("walcore list --json: not an array: {v}"))
        .iter()
        .map(|r| {
            let s = |f: &str| {
                r[f].as_str()
                    .unwrap_or_else(|| panic!("list --json: no {f} in {r}"))
                    .to_owned()
            };
            let n = |f: &str| {
                r[f].as_u64()
                    .unwrap_or_else(|| panic!("list --json: no {f} in {r}"))
            };
            Listed {
                id: s("id"),
                start: (n("start_timeline") as u32, parse_lsn(&s("start_lsn"))),
                stop: (n("stop_timeline") as u32, parse_lsn(&s("stop_lsn"))),
                seg_size: r["wal_segment_size"].as_u64().unwrap_or(SEGMENT),
                wal_included: r["wal_included"].as_bool().unwrap_or(false),
                objects: r["objects"]
                    .as_array()
                    .unwrap_or_else(|| panic!("list --json: no objects in {r}"))
                    .iter()
                    .map(|o| {
                        o["key"]
                            .as_str()
                            .unwrap_or_else(|| panic!("list --json: object without key: {o}"))
                            .to_owned()
                    })
                    .collect(),
                pinned: r["pinned"].as_bool().unwrap_or(false),
            }
        })
        .collect()
}

fn ids(backups: &[Listed]) -> BTreeSet<String> {
    backups.iter().map(|b| b.id.clone()).collect()
}

/// What backup `b` lacks of what a restore of it reads: its catalog record, its objects, and
/// (unless it carries its own WAL) every segment from its start to its stop. Empty when it
/// restores.
fn backup_lacks(keys: &BTreeSet<String>, b: &Listed) -> Vec<String> {
    let mut lacks: Vec<String> = std::iter::once(format!("catalog/{}", b.id))
        .chain(b.objects.iter().cloned())
        .filter(|k| !keys.contains(k))
        .collect();
    if !b.wal_included {
        assert_eq!(
            b.start.0, b.stop.0,
            "backup {} spans timelines; this test makes none",
            b.id
        );
        let range = (
            segment_of(b.start.1, b.seg_size),
            segment_of(b.stop.1, b.seg_size),
        );
        lacks.extend(
            missing_segments(keys, b.start.0, range, b.seg_size)
                .iter()
                .map(|n| wal_key(n)),
        );
    }
    lacks
}

/// Asserts that every listed backup has everything a restore of it reads.
fn assert_listed_backups_intact(keys: &BTreeSet<String>, backups: &[Listed], when: &str) {
    for b in backups {
        let lacks = backup_lacks(keys, b);
        assert!(
            lacks.is_empty(),
            "{when}: backup {} is listed but a restore of it would fail: the repository lacks \
             {lacks:?}",
            b.id
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The plan `expire --dry-run --json` prints.

/// What an expire plan promises: the backups it keeps and the WAL ranges it keeps, per
/// timeline (`None`: to the end of the archive).
#[derive(Debug, Clone)]
struct Promise {
    kept: BTreeSet<String>,
    expired: BTreeSet<String>,
    wal: BTreeMap<u32, Vec<(u64, Option<u64>)>>,
    window: serde_json::Value,
}

/// Reads the plan out of an `ExpireReport` (`expire --json`).
fn promise(report: &serde_json::Value) -> Promise {
    let plan = &report["plan"];
    let mut kept = BTreeSet::new();
    let mut expired = BTreeSet::new();
    for b in plan["backups"]
        .as_array()
        .unwrap_or_else(|| panic!("no plan.backups in {report}"))
    {
        let id = b["id"].as_str().expect("a backup id").to_owned();
        match b["verdict"].as_str() {
            Some("keep") => kept.insert(id),
            Some("expire") => expired.insert(id),
            other => panic!("verdict {other:?} of {b}"),
        };
    }
    let mut wal = BTreeMap::new();
    for (tl, ranges) in plan["wal"]
        .as_object()
        .unwrap_or_else(|| panic!("no plan.wal in {report}"))
    {
        let tl: u32 = tl.parse().unwrap_or_else(|_| panic!("timeline {tl:?}"));
        let ranges = ranges
            .as_array()
            .expect("ranges")
            .iter()
            .map(|r| {
                let from = parse_lsn(r["from"].as_str().expect("range from"));
                let to = r["to"].as_str().map(parse_lsn);
                (from, to)
            })
            .collect();
        wal.insert(tl, ranges);
    }
    Promise {
        kept,
        expired,
        wal,
        window: plan["window"].clone(),
    }
}

/// Runs `walcore expire` with `args` and `--json`; returns the report.
fn expire_json(tool: &Tool, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["expire", "--json"];
    all.extend_from_slice(args);
    let out = tool.ok(&all);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("walcore {all:?}: stdout is not JSON ({e}): {out}"))
}

/// Asserts what must hold after any run of `expire`, complete or killed, of a plan made when
/// the archive ended at segment `last` (timeline 1):
/// - every listed backup has everything its restore reads;
/// - every backup the plan keeps is listed, and nothing unknown is;
/// - no segment of a WAL range the plan keeps is missing (open ranges: up to `last`).
fn assert_promise_holds(
    tool: &Tool,
    repo: &Repo,
    promise: &Promise,
    all: &BTreeSet<String>,
    last: u64,
    when: &str,
) -> Vec<Listed> {
    let backups = listed(tool);
    let keys: BTreeSet<String> = repo.keys().into_iter().collect();
    assert_listed_backups_intact(&keys, &backups, when);
    let shown = ids(&backups);
    let gone: Vec<&String> = promise.kept.difference(&shown).collect();
    assert!(
        gone.is_empty(),
        "{when}: backups the plan kept are no longer listed: {gone:?} (listed: {shown:?})"
    );
    let strangers: Vec<&String> = shown.difference(all).collect();
    assert!(
        strangers.is_empty(),
        "{when}: unknown backups {strangers:?}"
    );
    for (tl, ranges) in &promise.wal {
        for (from, to) in ranges {
            let first = segment_of(*from, SEGMENT);
            let end = to.map_or(last, |to| segment_of(to, SEGMENT));
            let missing = missing_segments(&keys, *tl, (first, end), SEGMENT);
            assert!(
                missing.is_empty(),
                "{when}: a hole in WAL the plan keeps (timeline {tl}, {} .. {}): {missing:?} \
                 are gone",
                segment_name(*tl, first, SEGMENT),
                segment_name(*tl, end, SEGMENT)
            );
        }
    }
    backups
}

// ---------------------------------------------------------------------------------------------
// Restores.

/// Restores `backup` with `target` (`--target-immediate`, or nothing for the end of the
/// archive) into a new cluster, recovers it and returns it.
fn restore(tool: &Tool, env: &[(String, String)], backup: &str, target: &[&str]) -> Cluster {
    let mut dst = empty_cluster(15);
    let program = dst.install(bins::RESTORE).to_string_lossy().into_owned();
    let data = dst.data.to_string_lossy().into_owned();
    let mut args = vec![
        "restore",
        "--pgdata",
        &data,
        "--restore-program",
        &program,
        "--backup",
        backup,
    ];
    args.extend_from_slice(target);
    let out = tool.ok(&args);
    assert!(
        out.contains(&format!("restored backup {backup}")),
        "restore {backup}: {out}"
    );
    prepare_restored(&mut dst, env);
    let outcome = scenario::run_recovery(&dst);
    assert_promoted(&dst, outcome, &format!("restore of {backup} {target:?}"));
    dst
}

// ---------------------------------------------------------------------------------------------
// 1. expire killed with SIGKILL at random points.

/// What one round of the kill loop did.
#[derive(Debug)]
enum Round {
    /// Killed after it had sent `requests` requests, `writes` of them writes (batch deletes,
    /// tombstones).
    Killed { requests: usize, writes: usize },
    /// Ran to its end, having made `writes` writes.
    Finished { writes: usize },
}

/// Whether a request line is a write (anything but a read: `POST ...?delete`, `PUT`,
/// `DELETE`).
fn is_write(line: &str) -> bool {
    !line.starts_with("GET ") && !line.starts_with("HEAD ")
}

/// Where a run is killed.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// Once its `n`th request has gone through, every later request is held (the proxy
    /// answers nothing) and the run is killed while it waits: killed exactly after `n`
    /// requests took effect.
    AfterRequest(usize),
    /// The same, once its `n`th write (a batch delete, a tombstone) has gone through.
    AfterWrite(usize),
    /// After `pause` past the moment its `n`th request was sent: inside a throttled request,
    /// or between two.
    Inside(usize, Duration),
}

/// Draws a kill point for a run of `reads` reads then `writes` writes (batch deletes,
/// tombstones), each taking about `pause` through the proxy: three in four exactly between
/// two requests (most of those right after a write), one in four at a random moment.
fn kill_point((reads, writes): (usize, usize), pause: Duration, rng: &mut Rng) -> KillAt {
    let all = (reads + writes) as u64;
    match rng.below(4) {
        0 => KillAt::AfterRequest(1 + rng.below(all) as usize),
        1 | 2 => KillAt::AfterWrite(1 + rng.below(writes as u64) as usize),
        _ => KillAt::Inside(
            1 + rng.below(all) as usize,
            Duration::from_millis(rng.below(pause.as_millis() as u64 + 1)),
        ),
    }
}

/// Starts `expire` through the throttled proxy and kills it with SIGKILL at `at`.
fn expire_and_kill(tool: &Tool, proxy: &FaultProxy, args: &[&str], at: KillAt) -> Round {
    let seen_before = proxy.request_lines().len();
    let mut child = tool
        .command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn walcore expire");
    let held_before = proxy.faulted();
    // Requests (and writes among them) that reached the store: the held ones, last, did not.
    let sent = |proxy: &FaultProxy| {
        let lines = proxy.request_lines();
        let new = &lines[seen_before.min(lines.len())..];
        let held = usize::try_from(proxy.faulted() - held_before).unwrap_or(usize::MAX);
        let through = &new[..new.len().saturating_sub(held)];
        (
            through.len(),
            through.iter().filter(|l| is_write(l)).count(),
        )
    };
    let reached = |proxy: &FaultProxy| {
        let (requests, writes) = sent(proxy);
        match at {
            KillAt::AfterRequest(n) | KillAt::Inside(n, _) => requests >= n,
            KillAt::AfterWrite(n) => writes >= n,
        }
    };
    let started = Instant::now();
    let mut done = None;
    while done.is_none() && !reached(proxy) {
        done = child.try_wait().expect("wait for expire");
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "expire neither finished nor reached its kill point"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    if done.is_none() {
        match at {
            KillAt::AfterRequest(_) | KillAt::AfterWrite(_) => {
                // Every request from here on is held; wait until the run is stuck on one.
                proxy.fail_each("HTTP/", Fault::Stall);
                while done.is_none() && proxy.stalled() == 0 {
                    done = child.try_wait().expect("wait for expire");
                    assert!(
                        started.elapsed() < Duration::from_secs(120),
                        "expire neither finished nor made another request"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            KillAt::Inside(_, pause) => {
                std::thread::sleep(pause);
                done = child.try_wait().expect("wait for expire");
            }
        }
    }
    let round = match done {
        Some(status) => {
            let out = child.wait_with_output().expect("expire's output");
            assert!(
                status.success(),
                "expire failed on its own ({status:?}):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Round::Finished {
                writes: sent(proxy).1,
            }
        }
        None => {
            child.kill().expect("SIGKILL expire");
            let out = child
                .wait_with_output()
                .expect("wait for the killed expire");
            match out.status.signal() {
                Some(9) => {
                    let (requests, writes) = sent(proxy);
                    Round::Killed { requests, writes }
                }
                // It finished between the last look and the kill.
                _ if out.status.success() => Round::Finished {
                    writes: sent(proxy).1,
                },
                _ => panic!(
                    "expire failed on its own ({:?}):\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
        }
    };
    proxy.disarm();
    let what = match round {
        Round::Killed { requests, writes } => {
            format!("killed after {requests} requests, {writes} of them writes")
        }
        Round::Finished { writes } => format!("finished before the kill, after {writes} writes"),
    };
    eprintln!("  kill point {at:?}: {what}");
    round
}

/// Deletes `key` from the S3 repository `repo` on `moto`, as a run killed right after that
/// delete would leave it.
fn delete_object(moto: &Moto, repo: &Repo, key: &str) {
    let path = repo
        .url()
        .strip_prefix("s3://")
        .map(|bucket_prefix| format!("/{bucket_prefix}/{key}"))
        .expect("an S3 repository");
    let r = walcore_e2e::http::request(moto.addr(), "DELETE", &path, b"")
        .unwrap_or_else(|e| panic!("DELETE {path}: {e}"));
    assert!(
        r.status == 204 || r.status == 200,
        "DELETE {path}: HTTP {}",
        r.status
    );
}

/// What a complete run of `promise` has still to delete: listed backups it expires, objects
/// and pin events of expired backups, and stored segments of timeline 1 that no kept range
/// needs. Empty once the job is done.
fn work_left(keys: &BTreeSet<String>, shown: &BTreeSet<String>, promise: &Promise) -> Vec<String> {
    let mut left: Vec<String> = promise
        .expired
        .intersection(shown)
        .map(|id| format!("listed backup {id}"))
        .collect();
    for id in &promise.expired {
        // A tombstone may stay at catalog/ID while a sweep is under way; it is no backup.
        left.extend(
            keys.iter()
                .filter(|k| {
                    k.starts_with(&format!("backup/{id}/")) || k.starts_with(&format!("pins/{id}/"))
                })
                .cloned(),
        );
    }
    let needed = |seg: u64| {
        promise.wal.get(&1).is_some_and(|ranges| {
            ranges.iter().any(|(from, to)| {
                segment_of(*from, SEGMENT) <= seg
                    && to.is_none_or(|to| seg <= segment_of(to, SEGMENT))
            })
        })
    };
    left.extend(
        stored_segments(keys, 1, SEGMENT)
            .into_iter()
            .filter(|s| !needed(*s))
            .map(|s| wal_key(&segment_name(1, s, SEGMENT))),
    );
    left
}

/// Every object of a repository, to put back what a run deleted.
struct Snapshot(Vec<(String, Vec<u8>)>);

impl Snapshot {
    fn take(repo: &Repo) -> Snapshot {
        Snapshot(
            repo.keys()
                .into_iter()
                .map(|k| {
                    let bytes = repo.read(&k).unwrap_or_else(|| panic!("{k} vanished"));
                    (k, bytes)
                })
                .collect(),
        )
    }

    /// Puts back every object that is gone, and every catalog entry as it was (a tombstone a
    /// sweep left at `catalog/ID` goes). Returns how many objects were written.
    fn rewind(&self, repo: &Repo) -> usize {
        let now: BTreeSet<String> = repo.keys().into_iter().collect();
        let mut n = 0;
        for (key, bytes) in &self.0 {
            if !now.contains(key) || key.starts_with("catalog/") {
                repo.tamper(key, bytes);
                n += 1;
            }
        }
        n
    }
}

/// `expire` killed at random points, then run again: no listed backup, no WAL of the window and
/// no backup the plan kept is ever lost, and the completed run leaves exactly the plan.
#[test]
fn expire_killed_anywhere_loses_no_listed_backup_and_no_window_wal() {
    if !moto::s3_enabled("expire_safety::expire_killed_anywhere_loses_no_listed_backup") {
        return;
    }
    let t0 = Instant::now();
    let moto = Moto::shared();
    let repo = Repo::s3(moto);
    let codec = Codec::encrypted(KEY_1);
    let env = repo.env(&codec);
    let src = source(&repo, &codec);
    let tool = walcore(&src, env.clone());
    let mut rng = Rng::from_env_or_clock("expire_killed_anywhere");

    // Five backups with WAL between them: each gap is several segments (switches are cheap:
    // a switched segment is mostly zeros).
    let mut taken = Vec::new();
    let mut rows_at = BTreeMap::new();
    for b in 0..5 {
        for s in 0..6 {
            insert_batch(&src, &format!("b{b}s{s}"), 500);
            src.switch_wal();
        }
        let id = tool.take(&src, &[]);
        rows_at.insert(id.clone(), fingerprint(&src));
        taken.push(id);
    }
    for s in 0..4 {
        insert_batch(&src, &format!("tail{s}"), 500);
        src.switch_wal();
    }
    let last_name = src.archive_all(ARCHIVE_WAIT);
    let last = parse_segment(&last_name, SEGMENT).expect("a segment").1;
    let end_rows = fingerprint(&src);
    // Backup 1 is pinned: kept, with the WAL from its start to its stop only.
    tool.ok(&["pin", &taken[1], "--note", "kept for its own sake"]);
    eprintln!(
        "[{:?}] backups {taken:?}, archive up to {last_name}",
        t0.elapsed()
    );
    let all: BTreeSet<String> = taken.iter().cloned().collect();

    let proxy = FaultProxy::start(moto.addr());
    proxy.throttle(Some(THROTTLE));
    let slow = Tool {
        program: tool.program.clone(),
        env: repo.env_at(&codec, Some(&proxy.endpoint())),
        cwd: tool.cwd.clone(),
    };
    let policy = ["--keep-last", "2", "--orphan-grace", GRACE];

    // The plan, before anything is deleted.
    let before = proxy.request_lines().len();
    let mut dry = vec!["--dry-run"];
    dry.extend_from_slice(&policy);
    let dry_started = Instant::now();
    let report = expire_json(&slow, &dry);
    let reads = proxy.request_lines().len() - before;
    // About how long one request takes through the proxy: the longest pause after a kill
    // point.
    let pause = dry_started.elapsed() / u32::try_from(reads.max(1)).unwrap_or(1);
    let promise = promise(&report);
    eprintln!(
        "[{:?}] plan ({reads} requests, {pause:?} each): keeps {:?}, expires {:?}, WAL {:?}, window {}",
        t0.elapsed(),
        promise.kept,
        promise.expired,
        promise.wal,
        promise.window
    );
    // What keep-last 2 and a pin mean, independently of the plan: the plan must say the same.
    let want_kept: BTreeSet<String> = [&taken[1], &taken[3], &taken[4]]
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(promise.kept, want_kept, "the plan keeps other backups");
    assert_eq!(
        promise.expired,
        [&taken[0], &taken[2]].into_iter().cloned().collect(),
        "the plan expires other backups"
    );
    let shown = assert_promise_holds(&tool, &repo, &promise, &all, last, "before expire");
    assert!(shown.iter().any(|b| b.id == taken[1] && b.pinned));
    // The window, as keep-last 2 means it: from the start of the older of the two newest
    // backups to the end of the archive; and the pinned backup's own WAL.
    let by_id: BTreeMap<String, Listed> = shown.into_iter().map(|b| (b.id.clone(), b)).collect();
    let window_from = segment_of(by_id[&taken[3]].start.1, SEGMENT);
    let pinned_range = (
        segment_of(by_id[&taken[1]].start.1, SEGMENT),
        segment_of(by_id[&taken[1]].stop.1, SEGMENT),
    );
    let stored_before = stored_segments(&repo.keys().into_iter().collect(), 1, SEGMENT);
    assert!(
        stored_before.iter().filter(|s| **s < window_from).count() >= 20,
        "too little WAL before the window for expire to delete: {stored_before:?}"
    );

    // Kill after kill on the same repository; once a run has finished the job, the objects
    // it deleted are put back so that the next kill points land in real work again.
    let snapshot = Snapshot::take(&repo);
    let mut run = vec!["expire"];
    run.extend_from_slice(&policy);
    // One complete run through the proxy, put back afterwards: how many reads and writes a
    // run makes.
    let before = proxy.request_lines().len();
    slow.ok(&run);
    let writes = proxy.request_lines()[before..]
        .iter()
        .filter(|l| is_write(l))
        .count();
    let reads = proxy.request_lines().len() - before - writes;
    eprintln!(
        "[{:?}] a complete run: {reads} reads, {writes} writes",
        t0.elapsed()
    );
    assert!(writes > 0, "a complete run deleted nothing");
    let shown = assert_promise_holds(&tool, &repo, &promise, &all, last, "a complete run");
    let keys: BTreeSet<String> = repo.keys().into_iter().collect();
    let left = work_left(&keys, &ids(&shown), &promise);
    assert!(left.is_empty(), "a complete run left {left:?}");
    snapshot.rewind(&repo);
    let (mut kills, mut kills_writing, mut rounds, mut rewinds) = (0, 0, 0, 0);
    while kills < KILLS.0 || kills_writing < KILLS.1 {
        rounds += 1;
        assert!(
            rounds <= 40,
            "only {kills} of 40 runs could be killed before they finished, {kills_writing} \
             once they wrote"
        );
        let at = kill_point((reads, writes), pause, &mut rng);
        let round = expire_and_kill(&slow, &proxy, &run, at);
        let when = format!("after round {rounds} ({round:?})");
        let shown = assert_promise_holds(&tool, &repo, &promise, &all, last, &when);
        let keys: BTreeSet<String> = repo.keys().into_iter().collect();
        let window_missing = missing_segments(&keys, 1, (window_from, last), SEGMENT);
        assert!(
            window_missing.is_empty(),
            "{when}: the window lost {window_missing:?}"
        );
        let pinned_missing = missing_segments(&keys, 1, pinned_range, SEGMENT);
        assert!(
            pinned_missing.is_empty(),
            "{when}: the pinned backup lost {pinned_missing:?}"
        );
        if let Round::Killed { writes, .. } = round {
            kills += 1;
            if writes > 0 {
                kills_writing += 1;
            }
        }
        // Done, or waiting: the objects of backups whose records a killed run deleted are
        // leftovers the next runs leave alone (and hold WAL back for) until the orphan grace
        // has passed since they were written.
        let waiting = matches!(round, Round::Finished { writes: 0 });
        if waiting || work_left(&keys, &ids(&shown), &promise).is_empty() {
            let n = snapshot.rewind(&repo);
            rewinds += 1;
            eprintln!("  {n} objects put back");
        }
    }
    eprintln!(
        "[{:?}] {kills} kills in {rounds} rounds, {kills_writing} after the run began \
         writing; {rewinds} rewinds",
        t0.elapsed()
    );

    // Then the sweep: a run killed right after its first write (the expired backups' records)
    // leaves their objects as leftovers, which runs sweep behind a tombstone once the grace
    // has passed since they were written; kill those runs too.
    snapshot.rewind(&repo);
    let fresh_since = Instant::now();
    for id in &promise.expired {
        delete_object(moto, &repo, &format!("catalog/{id}"));
    }
    let shown = assert_promise_holds(&tool, &repo, &promise, &all, last, "records deleted");
    assert_eq!(ids(&shown), promise.kept, "records deleted");
    if let Some(wait) = (GRACE_TIME + Duration::from_secs(1)).checked_sub(fresh_since.elapsed()) {
        std::thread::sleep(wait);
    }
    for sweep_round in 1..=4 {
        let at = kill_point((reads, writes + 6), pause, &mut rng);
        let round = expire_and_kill(&slow, &proxy, &run, at);
        let when = format!("after sweep round {sweep_round} ({round:?})");
        let shown = assert_promise_holds(&tool, &repo, &promise, &all, last, &when);
        let keys: BTreeSet<String> = repo.keys().into_iter().collect();
        if matches!(round, Round::Killed { .. }) {
            kills += 1;
        }
        if work_left(&keys, &ids(&shown), &promise).is_empty() {
            break;
        }
    }
    eprintln!("[{:?}] {kills} kills in all", t0.elapsed());
    let report = expire_json(&tool, &policy);
    eprintln!(
        "[{:?}] final run: deleted {}",
        t0.elapsed(),
        report["deleted"]
    );
    let final_backups = assert_promise_holds(&tool, &repo, &promise, &all, last, "final run");
    assert_eq!(
        ids(&final_backups),
        promise.kept,
        "after a complete run, list must show exactly the plan's kept backups"
    );
    let keys: BTreeSet<String> = repo.keys().into_iter().collect();
    let left = work_left(&keys, &ids(&final_backups), &promise);
    assert!(
        left.is_empty(),
        "a complete run left what the plan expires: {left:?}"
    );
    let again = expire_json(&tool, &policy);
    assert_eq!(
        again["deleted"]["wal_objects"].as_u64(),
        Some(0),
        "a second complete run found WAL to delete: {again}"
    );

    // The newest backup restores to the end of the archive; the oldest kept one (pinned, with
    // only its own WAL left) restores consistently.
    let newest = restore(&tool, &env, &taken[4], &[]);
    assert_eq!(fingerprint(&newest), end_rows, "newest backup to the end");
    drop(newest);
    let oldest = restore(&tool, &env, &taken[1], &["--target-immediate"]);
    assert_eq!(
        fingerprint(&oldest),
        rows_at[&taken[1]],
        "pinned backup's rows"
    );
    eprintln!("[{:?}] done", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 2. expire in a loop beside pgbench, archive_command and takes.

/// A pgbench run as the server user on `cluster`, until killed.
fn pgbench(cluster: &Cluster, args: &[&str]) -> Command {
    let mut cmd = Command::new(pg_bin_dir().join("pgbench"));
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C")
        .current_dir(cluster.dir())
        .arg("-h")
        .arg(&cluster.sock)
        .args(["-p", "5432", "-U", "postgres"])
        .args(args)
        .arg("postgres");
    sys::as_server_user(&mut cmd);
    cmd
}

/// A child process killed (SIGKILL) when dropped, so that a failing test leaves no pgbench or
/// take running behind it.
struct Reaped(Option<Child>);

impl Reaped {
    fn new(child: Child) -> Reaped {
        Reaped(Some(child))
    }

    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    fn kill(mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it has not ended yet.
    fn is_running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for it to end on its own; its output.
    fn output(mut self) -> std::process::Output {
        self.0
            .take()
            .expect("a child")
            .wait_with_output()
            .expect("wait for a child")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut()
            && let Ok(None) = c.try_wait()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What pgbench committed: one history row per transaction, and the balances they moved.
fn pgbench_rows(c: &Cluster) -> String {
    c.psql(
        "select (select count(*) || ' transactions, delta ' || coalesce(sum(delta), 0) \
                 from pgbench_history) || ', balance ' || \
                (select sum(abalance) from pgbench_accounts)",
    )
}

/// Two `expire --keep-last 2` loops at once, over and over while pgbench commits, the
/// archiver pushes and backups are taken: a restore to the end of the archive afterwards has
/// every committed transaction.
#[test]
fn expire_beside_archiving_and_takes_loses_no_committed_transaction() {
    expire_beside_archiving_and_takes(&Repo::file(), &Codec::plain());
}

/// The same on S3 (the emulator), encrypted.
#[test]
fn expire_beside_archiving_and_takes_on_s3_loses_no_committed_transaction() {
    if !moto::s3_enabled("expire_safety::expire_beside_archiving_and_takes_on_s3") {
        return;
    }
    expire_beside_archiving_and_takes(&Repo::s3(Moto::shared()), &Codec::encrypted(KEY_1));
}

/// How many `expire` loops run at once.
const LOOPS: usize = 2;

fn expire_beside_archiving_and_takes(repo: &Repo, codec: &Codec) {
    let t0 = Instant::now();
    let env = repo.env(codec);
    let mut src = Cluster::new();
    src.archive_with_walcore();
    src.set_env(&env);
    // A segment a second while pgbench runs: the archiver pushes all the time.
    src.set("archive_timeout", "1s");
    src.start();
    let init = sys::run(
        &mut pgbench(&src, &["-i", "-s", "2", "-q"]),
        Duration::from_secs(120),
    );
    assert!(init.status.success(), "pgbench -i: {}", init.stderr);
    let tool = walcore(&src, env.clone());
    let first = tool.take(&src, &[]);

    let bench = Reaped::new(
        pgbench(&src, &["-n", "-c", "2", "-j", "2", "-T", "600"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pgbench"),
    );

    // expire in loops, each in a thread, until told to stop; every run must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU32::new(0));
    let loopers: Vec<_> = (0..LOOPS)
        .map(|n| {
            let stop = stop.clone();
            let runs = runs.clone();
            let tool = Tool {
                program: tool.program.clone(),
                env: env.clone(),
                cwd: tool.cwd.clone(),
            };
            std::thread::spawn(move || {
                let mut deleted_wal = 0;
                let mut rng = Rng::from_env_or_clock(&format!("expire loop {n}"));
                while !stop.load(Ordering::SeqCst) {
                    let report = expire_json(&tool, &["--keep-last", "2"]);
                    deleted_wal += report["deleted"]["wal_objects"].as_u64().unwrap_or(0);
                    runs.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(rng.below(300)));
                }
                deleted_wal
            })
        })
        .collect();
    // Backups a few archived segments apart, while expire runs: each new one lets an older
    // one and its WAL go.
    let archived = || -> u64 {
        src.psql("select archived_count from pg_stat_archiver")
            .parse()
            .expect("a count")
    };
    let mut taken = vec![first];
    for _ in 0..4 {
        let before = archived();
        sys::wait_for(Duration::from_secs(60), Duration::from_millis(100), || {
            if archived() >= before + 3 {
                Ok(())
            } else {
                Err("waiting for the archiver to push 3 segments".to_owned())
            }
        });
        taken.push(tool.take(&src, &[]));
    }
    // A few more runs after the last take, with the archiver still pushing.
    let runs_after_takes = runs.load(Ordering::SeqCst);
    sys::wait_for(Duration::from_secs(120), Duration::from_millis(100), || {
        if runs.load(Ordering::SeqCst) >= runs_after_takes + 4
            || loopers.iter().any(|l| l.is_finished())
        {
            Ok(())
        } else {
            Err("waiting for expire runs after the last take".to_owned())
        }
    });
    bench.kill();
    stop.store(true, Ordering::SeqCst);
    let deleted_wal: u64 = loopers
        .into_iter()
        .map(|l| l.join().expect("an expire loop"))
        .sum();
    let runs = runs.load(Ordering::SeqCst);
    eprintln!(
        "[{:?}] {runs} expire runs ({LOOPS} at a time) deleted {deleted_wal} WAL objects beside \
         takes {taken:?}",
        t0.elapsed()
    );
    assert!(
        deleted_wal >= 6,
        "the expire loops deleted only {deleted_wal} WAL objects"
    );

    let last_name = src.archive_all(ARCHIVE_WAIT);
    let last = parse_segment(&last_name, SEGMENT).expect("a segment").1;
    let want = pgbench_rows(&src);
    let backups = listed(&tool);
    let keys: BTreeSet<String> = repo.keys().into_iter().collect();
    assert_listed_backups_intact(&keys, &backups, "after the loop");
    assert_eq!(
        ids(&backups),
        taken[taken.len() - 2..].iter().cloned().collect(),
        "keep-last 2 keeps the two newest"
    );
    let oldest = &backups[0];
    let missing = missing_segments(
        &keys,
        1,
        (segment_of(oldest.start.1, SEGMENT), last),
        SEGMENT,
    );
    assert!(
        missing.is_empty(),
        "the window from {} to the end of the archive has holes: {missing:?}",
        oldest.id
    );
    // The oldest kept backup replays every transaction since it, to the end of the archive.
    let dst = restore(&tool, &env, &oldest.id, &[]);
    assert_eq!(pgbench_rows(&dst), want, "committed transactions lost");
    eprintln!("[{:?}] done: {want}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 3. The orphan sweep.

/// Bytes of every database of `c` (about what `base.tar` will hold).
fn cluster_bytes(c: &Cluster) -> u64 {
    c.psql("select sum(pg_database_size(oid)) from pg_database")
        .parse()
        .expect("a size")
}

/// The backup IDs with objects under `backup/` and no catalog record.
fn unrecorded(keys: &[String]) -> BTreeSet<String> {
    let recorded: BTreeSet<&str> = keys
        .iter()
        .filter_map(|k| k.strip_prefix("catalog/"))
        .collect();
    keys.iter()
        .filter_map(|k| k.strip_prefix("backup/"))
        .filter_map(|k| k.split('/').next())
        .filter(|id| !recorded.contains(id))
        .map(str::to_owned)
        .collect()
}

fn under(keys: &[String], id: &str) -> Vec<String> {
    let prefix = format!("backup/{id}/");
    keys.iter()
        .filter(|k| k.starts_with(&prefix))
        .cloned()
        .collect()
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let out = sys::run(
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string()),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "kill -{signal} {pid}: {}", out.stderr);
}

/// Starts a take slowed to `rate` kB/s and returns it with its backup ID, once its first
/// object is in the repository.
fn slow_take(tool: &Tool, repo: &Repo, info: &str, rate: &str) -> (Reaped, String) {
    let before = unrecorded(&repo.keys());
    let child = tool
        .command(&["take", "--dbname", info, "--max-rate", rate])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn take");
    let id = sys::wait_for(Duration::from_secs(60), Duration::from_millis(50), || {
        let keys = repo.keys();
        unrecorded(&keys)
            .difference(&before)
            .next()
            .cloned()
            .ok_or_else(|| format!("waiting for the take's first object: {keys:?}"))
    });
    (Reaped::new(child), id)
}

/// A take killed while `base.tar` uploads leaves objects; `expire` leaves them alone while
/// they are recent and removes them once the grace is over, while a take that runs during that
/// expire, longer than the grace, is untouched, completes and restores. A take stalled (SIGSTOP)
/// for longer than the grace is swept like a dead one: when it wakes up it must fail, never
/// record a backup whose objects are gone.
#[test]
fn orphan_sweep_removes_a_killed_take_and_never_a_running_one() {
    let t0 = Instant::now();
    let repo = Repo::file();
    let codec = Codec::encrypted(KEY_1);
    let env = repo.env(&codec);
    let src = source(&repo, &codec);
    insert_batch(&src, "pre", 20_000);
    src.archive_all(ARCHIVE_WAIT);
    let tool = walcore(&src, env.clone());
    let size = cluster_bytes(&src);
    let policy = ["--keep-last", "100", "--orphan-grace", GRACE];
    let info = conninfo(&src, "");

    // The killed take and the stalled one: slow enough that base.tar is still uploading.
    let rate = (size / 1024 / 8).max(32).to_string();
    let (killed, orphan) = slow_take(&tool, &repo, &info, &rate);
    let (stalled, stalled_id) = slow_take(&tool, &repo, &info, &rate);
    std::thread::sleep(Duration::from_secs(3));
    killed.kill();
    signal(stalled.id(), "STOP");
    let killed_at = Instant::now();
    let left = under(&repo.keys(), &orphan);
    let stalled_left = under(&repo.keys(), &stalled_id);
    eprintln!(
        "[{:?}] take {orphan} killed, take {stalled_id} stopped (--max-rate {rate} for {size} \
         bytes), leaving {left:?} and {stalled_left:?}",
        t0.elapsed()
    );
    assert!(!left.is_empty() && !stalled_left.is_empty());
    assert!(
        listed(&tool).is_empty(),
        "a take that did not finish is listed"
    );

    // Right away: too recent to be swept.
    let report = expire_json(&tool, &policy);
    assert_eq!(
        (
            under(&repo.keys(), &orphan),
            under(&repo.keys(), &stalled_id)
        ),
        (left, stalled_left),
        "expire swept a take that stopped less than the grace ago: {report}"
    );

    // A take that lasts longer than the grace, running while the next expire sweeps.
    let slow_rate = (size / 1024 / 30).max(32).to_string();
    let (mut running, running_id) = slow_take(&tool, &repo, &info, &slow_rate);
    let running_started = Instant::now();
    // Past the grace for the killed take, and the running one has run longer than the grace.
    let wait = (GRACE_TIME + Duration::from_secs(3))
        .saturating_sub(killed_at.elapsed())
        .max((GRACE_TIME + Duration::from_secs(2)).saturating_sub(running_started.elapsed()));
    std::thread::sleep(wait);
    let running_before = under(&repo.keys(), &running_id);
    assert!(
        running.is_running(),
        "the long take ended before the grace was over: slow it more"
    );
    let report = expire_json(&tool, &policy);
    assert!(
        running.is_running(),
        "the long take ended during expire: slow it more"
    );
    eprintln!(
        "[{:?}] expire beside take {running_id} (running for {:?}): orphans {}",
        t0.elapsed(),
        running_started.elapsed(),
        report["orphans"]
    );
    let action = |id: &str| {
        report["orphans"]
            .as_array()
            .and_then(|o| o.iter().find(|o| o["id"] == id))
            .map(|o| o["action"].clone())
    };
    assert_eq!(action(&running_id), Some("running".into()), "{report}");
    assert_eq!(action(&orphan), Some("sweep".into()), "{report}");
    assert_eq!(action(&stalled_id), Some("sweep".into()), "{report}");
    let keys = repo.keys();
    // A file store writes an object under a temporary name first (`.tmp.…` beside it, which
    // listings skip): a take killed mid-upload leaves its partial archive there. Those are
    // checked last, so that everything else is checked even while they stay.
    let is_temp = |k: &String| k.rsplit('/').next().is_some_and(|n| n.starts_with(".tmp."));
    for id in [&orphan, &stalled_id] {
        let left: Vec<String> = under(&keys, id)
            .into_iter()
            .filter(|k| !is_temp(k))
            .collect();
        assert_eq!(
            left,
            Vec::<String>::new(),
            "the objects of take {id} outlived the grace"
        );
    }
    let killed_temp = under(&keys, &orphan);
    // What may stay is the tombstone at catalog/ID, which fails the take if it was only
    // stalled; it must not be a backup.
    assert!(
        keys.iter().all(|k| !k.contains(orphan.as_str())
            || *k == format!("catalog/{orphan}")
            || killed_temp.contains(k)),
        "something of the killed take is left: {keys:?}"
    );
    let running_after = under(&keys, &running_id);
    for k in &running_before {
        // The take itself replaces its heartbeats as it goes.
        assert!(
            running_after.contains(k) || k.contains("/heartbeat/"),
            "expire deleted {k} of the running take"
        );
    }

    // The stalled take wakes up after the sweep: it must fail and record nothing.
    signal(stalled.id(), "CONT");
    let out = running.output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the take running during expire failed:\n{stderr}"
    );
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(printed, running_id);
    let woke = stalled.output();
    eprintln!(
        "[{:?}] the stalled take ended ({:?}): {}",
        t0.elapsed(),
        woke.status,
        sys::tail(&String::from_utf8_lossy(&woke.stderr), 3)
    );
    assert!(
        !woke.status.success(),
        "a take swept while stalled recorded backup {}",
        String::from_utf8_lossy(&woke.stdout)
    );
    assert_eq!(
        ids(&listed(&tool)),
        BTreeSet::from([running_id.clone()]),
        "list after the sweep"
    );
    let stalled_left = under(&repo.keys(), &stalled_id);

    insert_batch(&src, "post", 3_000);
    src.archive_all(ARCHIVE_WAIT);
    let want = fingerprint(&src);
    let dst = restore(&tool, &env, &running_id, &[]);
    assert_eq!(fingerprint(&dst), want);
    eprintln!("[{:?}] done", t0.elapsed());

    assert_eq!(
        stalled_left,
        Vec::<String>::new(),
        "the swept take left files when it failed"
    );
    assert_eq!(
        killed_temp,
        Vec::<String>::new(),
        "a take killed mid-upload left its partial archive in the repository after the sweep \
         (a file store's temporary name, which listings skip): the disk space is never freed"
    );
}
