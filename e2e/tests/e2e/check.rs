//! `walcore check` end to end on real PostgreSQL 15: it passes on a good setup, and the segment
//! it switched is in the repository; each broken setup fails with a message that names the fix
//! and a non-zero exit (a wrong archive_command, archive_mode off, a wrong key, a store out of
//! reach, a repository of another cluster); and `--timeout` bounds the wait for a segment that
//! archive_command cannot store, explained from pg_stat_archiver.
//!
//! Each test runs on its own copy of the cluster template (a copy and a start take well under
//! a second); nothing here waits longer than the check's own time limit.

use std::time::Duration;

use walcore::codec::MasterKey;
use walcore_e2e::repo::{Codec, KEY_1, KEY_2, RETRY_TIME, wal_key};
use walcore_e2e::sys::Output;
use walcore_e2e::{Cluster, Repo, bins};

use crate::backup::{Tool, conninfo};
use crate::scenario::ARCHIVE_WAIT;

/// `walcore` installed in `cluster`'s `bin/` (beside its `walcore-archive`, if any), run as
/// the server user with `env`.
fn walcore(cluster: &Cluster, env: Vec<(String, String)>) -> Tool {
    Tool {
        program: cluster.install(bins::WALCORE),
        env,
        cwd: cluster.dir().to_path_buf(),
    }
}

/// `walcore check` against `cluster`, with `extra` arguments.
fn check(tool: &Tool, cluster: &Cluster, extra: &[&str]) -> Output {
    let conninfo = conninfo(cluster, "");
    let mut args = vec!["check", "--dbname", &conninfo];
    args.extend_from_slice(extra);
    tool.run(&args)
}

/// The report of a `check --json` run.
fn report(out: &Output) -> serde_json::Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check --json printed no JSON report ({e}):\n{}\n{}",
            out.stdout, out.stderr
        )
    })
}

/// The status and message of check `name` in a JSON report.
fn item(report: &serde_json::Value, name: &str) -> (String, String) {
    let item = report["checks"]
        .as_array()
        .expect("a list of checks")
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report}"));
    (
        item["status"].as_str().unwrap_or("").to_owned(),
        item["message"].as_str().unwrap_or("").to_owned(),
    )
}

/// Asserts that `out` exited with `code` and printed a line starting with `line`.
fn assert_fails(out: &Output, code: i32, line: &str, what: &str) {
    assert_eq!(
        out.code(),
        Some(code),
        "{what}: exit status\n{}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.lines().any(|l| l.starts_with(line)),
        "{what}: no line starting with {line:?} in:\n{}{}",
        out.stdout,
        out.stderr
    );
}

/// The cluster's system identifier.
fn system_identifier(cluster: &Cluster) -> String {
    cluster.psql("select system_identifier from pg_control_system()")
}

fn fingerprint(hex: &str) -> String {
    MasterKey::from_hex(hex)
        .expect("a test key")
        .fingerprint()
        .to_string()
}

#[test]
fn check_passes_on_a_good_setup_and_the_switched_segment_is_stored() {
    let repo = Repo::file();
    let env = repo.env(&Codec::encrypted(KEY_1));
    let c = Cluster::archiving_into(&env);
    let tool = walcore(&c, env);

    // A repository nothing was archived to yet: the first switched segment creates it.
    let out = check(&tool, &c, &[]);
    assert!(
        out.status.success(),
        "check on a good setup failed ({:?}):\n{}{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 7, "one line per check:\n{}", out.stdout);
    assert!(
        lines.iter().all(|l| l.starts_with("ok   ")),
        "{}",
        out.stdout
    );
    for want in [
        "ok   wal_level = replica",
        "ok   archive_mode = on",
        "ok   archive_command = '",
        "ok   archiving: pg_switch_wal() completed segment ",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "no line {want:?}:\n{}",
            out.stdout
        );
    }
    assert!(
        out.stdout
            .contains("the first archived segment will create it"),
        "{}",
        out.stdout
    );

    // Again, as JSON, now that the repository records the cluster and the key.
    let out = check(&tool, &c, &["--json", "--timeout", "30s"]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    let report = report(&out);
    assert_eq!(report["passed"], true, "{report}");
    let (status, message) = item(&report, "system_identifier");
    assert_eq!(status, "ok");
    assert!(
        message.contains(&format!("{} matches", system_identifier(&c))),
        "{message}"
    );
    let (_, message) = item(&report, "repository");
    assert!(
        message.contains(&format!("key {} reads its metadata", fingerprint(KEY_1))),
        "{message}"
    );
    let (status, message) = item(&report, "archiving");
    assert_eq!(status, "ok", "{message}");
    let segment = message
        .split_whitespace()
        .map(|w| w.trim_end_matches(','))
        .find(|w| w.len() == 24 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no segment named in {message:?}"));
    assert!(
        repo.read(&wal_key(segment)).is_some(),
        "the switched segment {segment} is not in the repository"
    );
    // PostgreSQL's own account agrees: the segment was archived by archive_command.
    c.wait_archived(segment, ARCHIVE_WAIT);
    assert!(
        !repo.keys().iter().any(|k| k.starts_with("check/")),
        "a probe was left behind: {:?}",
        repo.keys()
    );
}

#[test]
fn check_names_the_archive_command_to_set() {
    let repo = Repo::file();
    let env = repo.env(&Codec::plain());
    let c = Cluster::new();
    c.set("archive_command", "/bin/true");
    c.start();
    let tool = walcore(&c, env);
    let out = check(&tool, &c, &[]);
    assert_fails(
        &out,
        2,
        "FAIL archive_command = '/bin/true' does not run walcore-archive: set archive_command = '",
        "archive_command = /bin/true",
    );
    assert!(
        out.stdout
            .contains("walcore-archive %p' in postgresql.conf and reload PostgreSQL"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("skip archiving"), "{}", out.stdout);
}

#[test]
fn check_names_archive_mode_off_and_the_restart() {
    let repo = Repo::file();
    let env = repo.env(&Codec::plain());
    let mut c = Cluster::new();
    c.archive_with_walcore();
    c.set("archive_mode", "off");
    c.set_env(&env);
    c.start();
    let tool = walcore(&c, env);
    let out = check(&tool, &c, &[]);
    assert_fails(
        &out,
        2,
        "FAIL archive_mode = off: set archive_mode = on in postgresql.conf",
        "archive_mode = off",
    );
    assert!(out.stdout.contains("restart PostgreSQL"), "{}", out.stdout);
}

#[test]
fn check_names_both_keys_when_the_key_is_wrong() {
    let repo = Repo::file();
    let env_a = repo.env(&Codec::encrypted(KEY_1));
    let c = Cluster::archiving_into(&env_a);
    // The repository is written with key A.
    c.archive_all(ARCHIVE_WAIT);

    let tool = walcore(&c, repo.env(&Codec::encrypted(KEY_2)));
    let out = check(&tool, &c, &[]);
    assert_fails(
        &out,
        6,
        &format!(
            "FAIL wrong key: the repository was written with key {}, WALCORE_ENCRYPTION_KEY",
            fingerprint(KEY_1)
        ),
        "key B on a repository of key A",
    );
    assert!(
        out.stdout
            .contains(&format!("gives {}: configure the key", fingerprint(KEY_2))),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains(KEY_1) && !out.stdout.contains(KEY_2),
        "a key was printed"
    );
}

#[test]
fn check_says_what_to_check_when_the_store_is_out_of_reach() {
    // A loopback port nothing listens on: connections are refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let url = "s3://walcore-check/cluster-a";
    let env: Vec<(String, String)> = [
        ("WALCORE_REPO", url.to_owned()),
        ("WALCORE_RETRY_TIME", RETRY_TIME.to_owned()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let c = Cluster::new();
    c.archive_with_walcore();
    c.start();
    let tool = walcore(&c, env);
    let out = check(&tool, &c, &["--timeout", "30s"]);
    assert_fails(
        &out,
        7,
        &format!("FAIL repository {url}: "),
        "a store that refuses connections",
    );
    assert!(
        out.stdout
            .contains("the store did not answer: check the host in WALCORE_REPO, the endpoint"),
        "{}",
        out.stdout
    );
    // The server's own checks still pass.
    assert!(
        out.stdout.contains("ok   wal_level = replica"),
        "{}",
        out.stdout
    );
}

#[test]
fn check_refuses_a_repository_of_another_cluster() {
    let repo = Repo::file();
    let env = repo.env(&Codec::plain());
    let a = Cluster::archiving_into(&env);
    a.archive_all(ARCHIVE_WAIT);
    let a_id = system_identifier(&a);

    let mut b = Cluster::foreign();
    b.archive_with_walcore();
    b.set_env(&env);
    b.start();
    let b_id = system_identifier(&b);
    assert_ne!(a_id, b_id, "the foreign template is another cluster");

    let tool = walcore(&b, env);
    let out = check(&tool, &b, &[]);
    assert_fails(
        &out,
        3,
        &format!(
            "FAIL system identifier {b_id} of the server is not {a_id}, the cluster of repository \
             {}: this repository belongs to another cluster; use another WALCORE_REPO prefix",
            repo.url()
        ),
        "cluster B against cluster A's repository",
    );
}

#[test]
fn check_gives_up_at_its_timeout_and_reads_the_archivers_failures() {
    let repo = Repo::file();
    // The server runs walcore-archive without any configuration: every call fails.
    let c = Cluster::new();
    c.archive_with_walcore();
    c.start();
    let tool = walcore(&c, repo.env(&Codec::plain()));
    let out = check(&tool, &c, &["--timeout", "3s"]);
    assert!(
        out.elapsed < Duration::from_secs(30),
        "check with --timeout 3s took {:?}",
        out.elapsed
    );
    assert_fails(
        &out,
        7,
        "FAIL archiving: segment ",
        "an archive_command that always fails",
    );
    assert!(
        out.stdout.contains("archive_command has failed")
            && out.stdout.contains("see the PostgreSQL log"),
        "{}",
        out.stdout
    );
}

#[test]
fn check_on_a_standby_skips_the_switch_and_says_to_run_it_on_the_primary() {
    let repo = Repo::file();
    let env = repo.env(&Codec::plain());
    let primary = Cluster::archiving_into(&env);
    let base = primary.base_backup();

    let mut standby = Cluster::from_backup(&base);
    standby.set("archive_mode", "on");
    standby.archive_with_walcore();
    let restore = standby.install(bins::RESTORE);
    standby.set("restore_command", &format!("{} %f %p", restore.display()));
    standby.set("primary_conninfo", &conninfo(&primary, ""));
    let signal = standby.data.join("standby.signal");
    std::fs::write(&signal, "").expect("write standby.signal");
    walcore_e2e::sys::give_to_server_user(&signal, 0o600);
    standby.set_env(&env);
    standby.start();
    assert_eq!(standby.psql("select pg_is_in_recovery()"), "t");

    let tool = walcore(&standby, env);
    let out = check(&tool, &standby, &[]);
    assert!(
        out.status.success(),
        "check on a standby ({:?}):\n{}{}",
        out.status,
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains(
            "ok   archive_mode = on: this server is a standby, which does not archive with 'on'"
        ) && out.stdout.contains("archive_mode = always"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.lines().any(
            |l| l.starts_with("skip archiving: this server is a standby")
                && l.contains("run walcore check against the primary")
        ),
        "{}",
        out.stdout
    );
}
