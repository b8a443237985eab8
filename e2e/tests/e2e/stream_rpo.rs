//! What a lost server costs with `walcore stream` beside `archive_command`, on real
//! PostgreSQL 15: a client commits rows one at a time and records each commit the server
//! acknowledged; at a random moment every server process is killed (SIGKILL) and the data
//! directory deleted; `walcore restore` of the latest state, recovery, then the acknowledged
//! commits that are missing are counted.
//!
//! - Default mode: the missing ones all committed within the last partial interval plus one
//!   second, whether the stream outlives the server (it stores what has arrived when the
//!   connection drops) or dies with it (then only the timed pieces count).
//! - `--synchronous` with `synchronous_standby_names` naming the stream: none missing, over ten
//!   crashes, half of them taking the stream down with the server.

use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use walcore_e2e::repo::{Codec, KEY_1};
use walcore_e2e::{Cluster, Moto, Repo, moto, sys};

use crate::backup::{Tool, conninfo, restore_and_recover};

const SLOT: &str = "walcore_rpo";

/// How one crash is set up.
#[derive(Debug, Clone, Copy)]
struct Crash {
    synchronous: bool,
    /// The stream is killed with the server (one machine lost), not left running.
    stream_dies_too: bool,
    partial_interval: Duration,
}

/// What one crash cost.
struct Loss {
    acknowledged: usize,
    /// How long before the kill each missing commit was acknowledged.
    missing: Vec<Duration>,
    tail_used: bool,
}

/// A small random number from the clock: where in the workload the kill falls.
fn jitter(max_ms: u64) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    Duration::from_millis(nanos % max_ms.max(1))
}

/// A client that commits one row per transaction until the server goes away; returns each
/// acknowledged id with when the acknowledgement arrived.
fn committer(cluster: &Cluster) -> (Arc<AtomicBool>, JoinHandle<Vec<(i64, Instant)>>) {
    let conn = format!(
        "host={} port=5432 user=postgres dbname=postgres",
        cluster.sock.display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let halt = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&conn, postgres::NoTls).expect("client");
        let mut acked = Vec::new();
        let mut id = 0i64;
        while !halt.load(Ordering::Relaxed) {
            id += 1;
            // A little WAL per commit, so segments fill during the test.
            match client.execute(
                "insert into acked (id, pad) values ($1, repeat(md5(random()::text), 40))",
                &[&id],
            ) {
                Ok(_) => acked.push((id, Instant::now())),
                Err(e) => {
                    eprintln!("the committer stops at {id}: {e}");
                    break;
                }
            }
        }
        acked
    });
    (stop, writer)
}

/// Every process of the server, killed at once: the postmaster and its children.
fn kill_server(cluster: &Cluster) {
    let pid_file = std::fs::read_to_string(cluster.data.join("postmaster.pid")).expect("pid file");
    let postmaster = pid_file.lines().next().expect("pid").trim().to_owned();
    let mut pids = vec![postmaster.clone()];
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the fields after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if ppid == Some(postmaster.as_str()) {
            pids.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    let out = sys::run(
        Command::new("kill").arg("-KILL").args(&pids),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "kill: {}", out.stderr);
}

/// A running `walcore stream`, killed if a test fails while it runs.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_stream(tool: &Tool, cluster: &Cluster, crash: Crash) -> Running {
    let conn = conninfo(cluster, "");
    let interval = format!("{}ms", crash.partial_interval.as_millis());
    let mut args = vec![
        "stream",
        "--dbname",
        &conn,
        "--slot",
        SLOT,
        "--partial-interval",
        &interval,
    ];
    if crash.synchronous {
        args.push("--synchronous");
    }
    let mut cmd = tool.command(&args);
    let log = std::fs::File::create(cluster.dir().join("stream.log")).expect("stream log");
    cmd.stdout(std::process::Stdio::null()).stderr(log);
    Running(cmd.spawn().expect("spawn walcore stream"))
}

fn stream_log(cluster: &Cluster) -> String {
    std::fs::read_to_string(cluster.dir().join("stream.log")).unwrap_or_default()
}

/// SIGTERM, and the exit it leads to.
fn terminate(child: &mut Child, cluster: &Cluster) {
    let out = sys::run(
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string()),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "kill -TERM: {}", out.stderr);
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            assert!(
                status.success(),
                "the stream failed: {status:?}\n{}",
                stream_log(cluster)
            );
            return;
        }
        assert!(
            Instant::now() < until,
            "the stream did not stop on SIGTERM\n{}",
            stream_log(cluster)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_until(what: &str, cluster: &Cluster, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            Instant::now() < until,
            "{what} did not happen; stream log:\n{}",
            stream_log(cluster)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One crash on a fresh cluster and repository environment `env`.
fn crash_once(env: &[(String, String)], crash: Crash) -> Loss {
    let mut src = Cluster::new();
    src.archive_with_walcore();
    src.set_env(env);
    src.set("wal_sender_timeout", "10s");
    src.start();
    src.psql("create table acked (id bigint primary key, pad text)");
    let tool = Tool::walcore(&src, env.to_vec());

    let mut stream = spawn_stream(&tool, &src, crash);
    wait_until("streaming", &src, || {
        src.psql("select count(*) from pg_stat_replication where application_name = 'walcore' and state = 'streaming'") == "1"
    });
    tool.take(&src, &[]);
    if crash.synchronous {
        src.psql("alter system set synchronous_standby_names = 'walcore'");
        src.psql("select pg_reload_conf()");
        wait_until("a synchronous stream", &src, || {
            src.psql(
                "select sync_state from pg_stat_replication where application_name = 'walcore'",
            ) == "sync"
        });
    }

    let (_stop, writer) = committer(&src);
    std::thread::sleep(Duration::from_millis(1500) + jitter(2500));
    let killed_at = Instant::now();
    kill_server(&src);
    if crash.stream_dies_too {
        drop(stream);
    } else {
        // The stream finds the connection gone, stores what had arrived, and keeps trying to
        // connect; stopped, it exits cleanly.
        wait_until("the stream noticing the loss", &src, || {
            stream_log(&src).contains("streaming stopped")
        });
        terminate(&mut stream.0, &src);
    }
    let acked = writer.join().expect("committer");
    std::fs::remove_dir_all(&src.data).expect("delete the data directory");

    let dst = restore_and_recover(&tool, env, &[], "restore of the latest state");
    let present: std::collections::HashSet<i64> = dst
        .psql("select id from acked")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let missing = acked
        .iter()
        .filter(|(id, _)| !present.contains(id))
        .map(|(_, at)| killed_at.saturating_duration_since(*at))
        .collect();
    Loss {
        acknowledged: acked.len(),
        missing,
        tail_used: dst.server_log().contains("restored the streamed tail"),
    }
}

/// `n` crashes, each on a fresh repository from `repo`, every other one taking the stream down
/// with the server; what each cost, after checking that the workload committed.
fn crashes(repo: impl Fn() -> Repo, n: usize, crash: Crash) -> Vec<Loss> {
    (0..n)
        .map(|i| {
            let crash = Crash {
                stream_dies_too: i % 2 == 1,
                ..crash
            };
            let repo = repo();
            let loss = crash_once(&repo.env(&Codec::encrypted(KEY_1)), crash);
            eprintln!(
                "crash {i} {crash:?}: {} acknowledged, {} missing (oldest {:?} before the kill), \
                 tail used: {}",
                loss.acknowledged,
                loss.missing.len(),
                loss.missing.iter().max(),
                loss.tail_used
            );
            assert!(
                loss.acknowledged > 0,
                "crash {i}: the workload committed nothing"
            );
            loss
        })
        .collect()
}

/// Default mode: what is missing was acknowledged within the partial interval plus a second.
fn default_mode(repo: impl Fn() -> Repo, n: usize) {
    let interval = Duration::from_secs(2);
    let crash = Crash {
        synchronous: false,
        stream_dies_too: false,
        partial_interval: interval,
    };
    let losses = crashes(repo, n, crash);
    let bound = interval + Duration::from_secs(1);
    for (i, loss) in losses.iter().enumerate() {
        assert!(
            loss.missing.iter().all(|d| *d <= bound),
            "crash {i}: commits acknowledged up to {:?} before the kill are missing (bound {bound:?})",
            loss.missing.iter().max()
        );
    }
    assert!(
        losses.iter().any(|l| l.tail_used),
        "no recovery used the streamed tail"
    );
}

/// Synchronous mode: nothing acknowledged is missing.
fn synchronous(repo: impl Fn() -> Repo, n: usize) {
    let crash = Crash {
        synchronous: true,
        stream_dies_too: false,
        partial_interval: Duration::from_secs(10),
    };
    for (i, loss) in crashes(repo, n, crash).iter().enumerate() {
        assert!(
            loss.missing.is_empty(),
            "crash {i}: {} acknowledged commits lost (acknowledged {:?} before the kill)",
            loss.missing.len(),
            loss.missing
        );
    }
}

#[test]
fn a_lost_server_costs_at_most_the_partial_interval_file() {
    default_mode(Repo::file, 2);
}

#[test]
fn a_lost_server_costs_at_most_the_partial_interval_s3() {
    if !moto::s3_enabled("stream_rpo::a_lost_server_costs_at_most_the_partial_interval_s3") {
        return;
    }
    default_mode(|| Repo::s3(Moto::shared()), 2);
}

#[test]
fn a_synchronous_stream_loses_no_acknowledged_commit_in_ten_crashes() {
    synchronous(Repo::file, 10);
}

#[test]
fn a_synchronous_stream_into_s3_loses_no_acknowledged_commit() {
    if !moto::s3_enabled("stream_rpo::a_synchronous_stream_into_s3_loses_no_acknowledged_commit") {
        return;
    }
    synchronous(|| Repo::s3(Moto::shared()), 2);
}
