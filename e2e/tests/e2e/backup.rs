//! `walcore-basebackup` end to end, walcore tools only: `take` while a workload writes, `list`
//! and `show`, then `restore` to a time, an LSN, a restore point, a transaction, `immediate`
//! and the end of the archive, each checked against the rows committed before its target,
//! with `pg_verifybackup` run on every restored directory before PostgreSQL starts on it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use walcore_e2e::cluster::pg_bin_dir;
use walcore_e2e::repo::{Codec, KEY_1};
use walcore_e2e::sys::{self, Output};
use walcore_e2e::workload::{create_table, fingerprint, insert_batch};
use walcore_e2e::{Cluster, Moto, Repo, bins, moto};

use crate::scenario::{self, ARCHIVE_WAIT, assert_promoted};

pub const BASEBACKUP: &str = "walcore-basebackup";

/// `walcore-basebackup` as the server user, with a repository's environment.
pub struct Tool {
    pub program: PathBuf,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
}

impl Tool {
    /// The tool installed into `cluster`'s `bin/`, with `env`.
    pub fn new(cluster: &Cluster, env: Vec<(String, String)>) -> Tool {
        Tool {
            program: cluster.install(BASEBACKUP),
            env,
            cwd: cluster.dir().to_path_buf(),
        }
    }

    /// The operator binary `walcore` installed into `cluster`'s `bin/`, with `env`.
    pub fn walcore(cluster: &Cluster, env: Vec<(String, String)>) -> Tool {
        Tool {
            program: cluster.install(bins::WALCORE),
            env,
            cwd: cluster.dir().to_path_buf(),
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = bins::clean_command(&self.program, &self.env);
        cmd.args(args).current_dir(&self.cwd);
        sys::as_server_user(&mut cmd);
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        sys::run(&mut self.command(args), Duration::from_secs(300))
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "walcore-basebackup {args:?} failed ({:?}):\n{}{}",
            out.status,
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// `take` from `cluster`; returns the backup ID.
    pub fn take(&self, cluster: &Cluster, extra: &[&str]) -> String {
        let conninfo = conninfo(cluster, "");
        let mut args = vec!["take", "--dbname", &conninfo];
        args.extend_from_slice(extra);
        self.ok(&args).trim().to_owned()
    }

    /// The IDs `list --json` shows.
    pub fn list(&self) -> Vec<String> {
        let out = self.ok(&["list", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("list --json is JSON");
        v.as_array()
            .expect("an array")
            .iter()
            .map(|r| r["id"].as_str().expect("an id").to_owned())
            .collect()
    }
}

pub fn conninfo(cluster: &Cluster, extra: &str) -> String {
    format!(
        "host={} port=5432 user=postgres {extra}",
        cluster.sock.display()
    )
}

/// A cluster of `major` with an empty data directory for a restore to fill: a fresh one's data
/// directory, removed.
pub fn empty_cluster(major: u32) -> Cluster {
    let c = Cluster::new_major(major);
    std::fs::remove_dir_all(&c.data).expect("remove the template copy");
    c
}

/// `restore` of `tool`'s repository into a new PostgreSQL 15 cluster whose restore_command is
/// its own copy of walcore-restore, with `extra` arguments (a target); not started.
pub fn restore_into_new(tool: &Tool, extra: &[&str]) -> Cluster {
    let dst = empty_cluster(15);
    let program = dst.install(bins::RESTORE).to_string_lossy().into_owned();
    let data = dst.data.to_string_lossy().into_owned();
    let mut args = vec!["restore", "--pgdata", &data, "--restore-program", &program];
    args.extend_from_slice(extra);
    tool.ok(&args);
    dst
}

/// [`restore_into_new`], then recovery, which must end in a promotion.
pub fn restore_and_recover(
    tool: &Tool,
    env: &[(String, String)],
    extra: &[&str],
    what: &str,
) -> Cluster {
    let mut dst = restore_into_new(tool, extra);
    prepare_restored(&mut dst, env);
    let outcome = scenario::run_recovery(&dst);
    assert_promoted(&dst, outcome, what);
    dst
}

/// After a restore: this cluster's own socket, no archiving, the repository's environment.
pub fn prepare_restored(c: &mut Cluster, env: &[(String, String)]) {
    c.set("unix_socket_directories", &c.sock.to_string_lossy());
    c.set("archive_mode", "off");
    c.set_env(env);
}

/// `pg_verifybackup` of the cluster's major on its restored data directory (the WAL is in the
/// repository, not in pg_wal).
pub fn verify_backup(cluster: &Cluster) {
    let dir = &cluster.data;
    let mut cmd = Command::new(cluster.pg_program("pg_verifybackup"));
    cmd.arg("-n").arg(dir);
    sys::as_server_user(&mut cmd);
    let out = sys::run(&mut cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "pg_verifybackup {} failed:\n{}{}",
        dir.display(),
        out.stdout,
        out.stderr
    );
}

/// A key file the server user can read.
fn key_file(dir: &Path) -> PathBuf {
    let path = dir.join("walcore.key");
    std::fs::write(&path, KEY_1).expect("write key file");
    sys::give_to_server_user(&path, 0o600);
    path
}

/// What each target should bring back: the table's fingerprint when the target was set.
struct Marks {
    xid: (String, String),
    name: (String, String),
    lsn: (String, String),
    time: (String, String),
    end: String,
    pre: String,
}

/// Writes batches on `src` one after another, noting a target of each kind between them.
fn write_marks(src: &Cluster) -> Marks {
    let xid_out = src.psql(
        "begin; insert into t select g, 'X', repeat(md5('X' || g), 6) from \
         generate_series(1, 3000) g; select txid_current(); commit;",
    );
    let xid = xid_out
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_else(|| panic!("no xid in {xid_out:?}"))
        .to_owned();
    let at_xid = fingerprint(src);
    insert_batch(src, "N", 3000);
    src.psql("select pg_create_restore_point('before_L')");
    let at_name = fingerprint(src);
    insert_batch(src, "L", 3000);
    let lsn = src.psql("select pg_current_wal_insert_lsn()");
    let at_lsn = fingerprint(src);
    insert_batch(src, "T", 3000);
    std::thread::sleep(Duration::from_millis(1100));
    let time = src.psql("select now()");
    let at_time = fingerprint(src);
    std::thread::sleep(Duration::from_millis(1100));
    insert_batch(src, "E", 3000);
    let end = fingerprint(src);
    src.archive_all(ARCHIVE_WAIT);
    Marks {
        xid: (xid, at_xid),
        name: ("before_L".to_owned(), at_name),
        lsn: (lsn, at_lsn),
        time: (time, at_time),
        end,
        pre: String::new(),
    }
}

/// Restores with `args` into a new cluster, verifies it, starts it and returns its rows.
fn restore_and_start(
    tool: &Tool,
    env: &[(String, String)],
    (major, tablespace): (u32, &Path),
    args: &[&str],
    what: &str,
) -> (Cluster, String) {
    let mut dst = empty_cluster(major);
    let restore_bin = dst.install(bins::RESTORE);
    let ts_new = sys::server_mkdir(&dst.dir().join("ts"));
    std::fs::remove_dir(&ts_new).expect("the restore creates it");
    let data = dst.data.to_string_lossy().into_owned();
    let map = format!("{}={}", tablespace.display(), ts_new.display());
    let program = restore_bin.to_string_lossy().into_owned();
    let mut all = vec![
        "restore",
        "--pgdata",
        &data,
        "--restore-program",
        &program,
        "--tablespace-map",
        &map,
    ];
    all.extend_from_slice(args);
    let out = tool.ok(&all);
    assert!(out.contains("restored backup"), "{what}: {out}");
    verify_backup(&dst);
    assert!(
        dst.data.join("recovery.signal").exists(),
        "{what}: no recovery.signal"
    );
    let link = std::fs::read_link(dst.data.join("pg_tblspc").join(tablespace_oid(&dst.data)))
        .expect("pg_tblspc link");
    assert_eq!(link, ts_new, "{what}: tablespace link not re-pointed");
    prepare_restored(&mut dst, env);
    let outcome = scenario::run_recovery(&dst);
    assert_promoted(&dst, outcome, what);
    let rows = fingerprint(&dst);
    (dst, rows)
}

/// The OID of the one tablespace under `data/pg_tblspc`.
fn tablespace_oid(data: &Path) -> String {
    std::fs::read_dir(data.join("pg_tblspc"))
        .expect("pg_tblspc")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .expect("one tablespace")
}

/// A writer inserting small transactions until stopped: the backup is taken under load.
fn background_writer(src: &Cluster) -> (Arc<AtomicBool>, std::thread::JoinHandle<u32>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let sock = src.sock.clone();
    let handle = std::thread::spawn(move || {
        let mut n = 0;
        while !flag.load(Ordering::Relaxed) {
            let mut cmd = Command::new(pg_bin_dir().join("psql"));
            cmd.args(["-X", "-q", "-h"]).arg(&sock).args([
                "-p",
                "5432",
                "-U",
                "postgres",
                "-c",
                "insert into t select g, 'W', repeat(md5('W' || g), 6) from \
                 generate_series(1, 2000) g",
            ]);
            sys::as_server_user(&mut cmd);
            let out = sys::run(&mut cmd, Duration::from_secs(60));
            assert!(out.status.success(), "writer: {}", out.stderr);
            n += 1;
        }
        n
    });
    (stop, handle)
}

/// Starts `src` archiving into the repository of `env`, with table `t` holding `pre` rows of
/// batch `pre` and a tablespace `ts1` holding table `in_ts`; returns the tablespace's location.
fn start_source(src: &mut Cluster, env: &[(String, String)], pre: u32) -> PathBuf {
    src.archive_with_walcore();
    src.set_env(env);
    src.start();
    create_table(src);
    let ts = sys::server_mkdir(&src.dir().join("ts1"));
    src.psql(&format!(
        "create tablespace ts1 location '{}'",
        ts.display()
    ));
    src.psql("create table in_ts (id int, v text) tablespace ts1");
    src.psql("insert into in_ts select g, md5(g::text) from generate_series(1, 3000) g");
    insert_batch(src, "pre", pre);
    ts
}

/// The rows of the table in the tablespace, as a fingerprint.
fn in_ts(c: &Cluster) -> String {
    c.psql("select count(*), sum(hashtext(v)) from in_ts")
}

/// The whole cycle on one repository.
fn cycle(repo: &Repo, env: Vec<(String, String)>) {
    let mut src = Cluster::new();
    let ts = start_source(&mut src, &env, 30_000);

    let tool = Tool::new(&src, env.clone());
    let (stop, writer) = background_writer(&src);
    let id = tool.take(&src, &["--label", "e2e under load"]);
    stop.store(true, Ordering::Relaxed);
    let batches = writer.join().expect("writer thread");
    eprintln!("backup {id} taken while {batches} insert batches ran");

    assert_eq!(tool.list(), vec![id.clone()]);
    let show: serde_json::Value =
        serde_json::from_str(&tool.ok(&["show", &id, "--json"])).expect("show --json");
    assert_eq!(show["label"], "e2e under load");
    assert_eq!(show["tablespaces"].as_array().map(Vec::len), Some(1));
    let table = tool.ok(&["list"]);
    assert!(
        table.contains(&id) && table.contains("e2e under load"),
        "{table}"
    );
    assert!(
        repo.keys()
            .iter()
            .any(|k| k.starts_with(&format!("backup/{id}/data/base.tar"))),
        "no base.tar object: {:?}",
        repo.keys()
    );
    let mut marks = write_marks(&src);
    marks.pre = src.psql("select count(*) from t where batch = 'pre'");
    let ts_rows = in_ts(&src);

    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "xid",
            vec!["--target-xid".into(), marks.xid.0.clone()],
            &marks.xid.1,
        ),
        (
            "name",
            vec!["--target-name".into(), marks.name.0.clone()],
            &marks.name.1,
        ),
        (
            "lsn",
            vec!["--target-lsn".into(), marks.lsn.0.clone()],
            &marks.lsn.1,
        ),
        (
            "time",
            vec!["--target-time".into(), marks.time.0.clone()],
            &marks.time.1,
        ),
        ("end", vec![], &marks.end),
    ];
    for (what, args, want) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (dst, rows) = restore_and_start(&tool, &env, (15, &ts), &args, what);
        assert_eq!(&rows, want, "restore to {what}: rows differ");
        assert_eq!(
            in_ts(&dst),
            ts_rows,
            "restore to {what}: tablespace rows differ"
        );
    }
    // Immediate: consistent as of the backup's end; every row of `pre`, none written later.
    let (dst, _) = restore_and_start(&tool, &env, (15, &ts), &["--target-immediate"], "immediate");
    assert_eq!(
        dst.psql("select count(*) from t where batch = 'pre'"),
        marks.pre
    );
    assert_eq!(
        dst.psql("select count(*) from t where batch in ('X', 'N', 'L', 'T', 'E')"),
        "0",
        "immediate recovery went past the backup"
    );
}

#[test]
fn file_encrypted_with_a_key_file() {
    let repo = Repo::file();
    let keys = sys::server_tempdir("wckey");
    let key = key_file(keys.path());
    let mut env = repo.env(&Codec::plain());
    env.push((
        "WALCORE_ENCRYPTION_KEY_FILE".into(),
        key.to_string_lossy().into_owned(),
    ));
    cycle(&repo, env);
}

#[test]
fn s3_encrypted() {
    if !moto::s3_enabled("backup::s3_encrypted") {
        return;
    }
    let repo = Repo::s3(Moto::shared());
    let env = repo.env(&Codec::encrypted(KEY_1));
    cycle(&repo, env);
}

/// `--include-wal`: a self-contained backup of a cluster that archives nothing. The take does
/// not wait for the archive, `pg_verifybackup` parses the WAL inside it, and the restored copy
/// reaches consistency from that WAL alone.
#[test]
fn self_contained_backup_without_an_archive() {
    let repo = Repo::file();
    let codec = Codec::encrypted(KEY_1);
    let env = repo.env(&codec);
    let src = Cluster::new();
    src.set("archive_mode", "off");
    src.start();
    create_table(&src);
    insert_batch(&src, "pre", 20_000);
    let tool = Tool::new(&src, env.clone());
    let (stop, writer) = background_writer(&src);
    let id = tool.take(&src, &["--include-wal", "--wal-timeout", "1s"]);
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread");
    let show: serde_json::Value =
        serde_json::from_str(&tool.ok(&["show", &id, "--json"])).expect("show --json");
    assert_eq!(show["wal_included"], true);
    let pre = src.psql("select count(*) from t where batch = 'pre'");

    let mut dst = empty_cluster(15);
    let data = dst.data.to_string_lossy().into_owned();
    tool.ok(&[
        "restore",
        "--pgdata",
        &data,
        "--target-immediate",
        "--restore-command",
        "false",
    ]);
    let mut cmd = Command::new(pg_bin_dir().join("pg_verifybackup"));
    cmd.arg(&dst.data);
    sys::as_server_user(&mut cmd);
    let out = sys::run(&mut cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "pg_verifybackup (with WAL) failed:\n{}{}",
        out.stdout,
        out.stderr
    );
    prepare_restored(&mut dst, &env);
    let outcome = scenario::run_recovery(&dst);
    assert_promoted(&dst, outcome, "self-contained backup");
    assert_eq!(dst.psql("select count(*) from t where batch = 'pre'"), pre);
}

/// The take / restore-to-a-time cycle on every other supported major (13, 14, 16, 17, 18; 15
/// is covered above): 13 and 14 send one tar stream per tablespace, 15 and later one stream
/// with typed messages.
#[test]
fn take_and_restore_on_every_major() {
    for major in walcore_e2e::cluster::pg_majors_wanted() {
        eprintln!("PostgreSQL {major}");
        let repo = Repo::file();
        let env = repo.env(&Codec::encrypted(KEY_1));
        let mut src = Cluster::new_major(major);
        let ts = start_source(&mut src, &env, 10_000);
        let tool = Tool::new(&src, env.clone());
        let id = tool.take(&src, &[]);
        let show: serde_json::Value =
            serde_json::from_str(&tool.ok(&["show", &id, "--json"])).expect("show --json");
        assert_eq!(
            show["pg_version_num"].as_u64().map(|v| v / 10_000),
            Some(u64::from(major)),
            "PostgreSQL {major}: version in the catalog"
        );
        insert_batch(&src, "A", 5_000);
        std::thread::sleep(Duration::from_millis(1100));
        let target = src.psql("select now()");
        let want = fingerprint(&src);
        let ts_rows = in_ts(&src);
        std::thread::sleep(Duration::from_millis(1100));
        insert_batch(&src, "B", 5_000);
        src.archive_all(ARCHIVE_WAIT);

        let what = format!("PostgreSQL {major}");
        let (dst, rows) = restore_and_start(
            &tool,
            &env,
            (major, &ts),
            &["--target-time", &target],
            &what,
        );
        assert_eq!(rows, want, "{what}: rows at the target");
        assert_eq!(in_ts(&dst), ts_rows, "{what}: tablespace rows");
    }
}
