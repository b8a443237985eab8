//! Restores that cannot lie about where they stop: the restored data directory's own recovery
//! settings never survive, the backup is chosen on the target timeline's history, a clone
//! restored with `--archive-mode off` never archives into the repository, and a target the
//! archive does not reach yet is refused before anything is written.
//!
//! One scenario on one `file://` repository, on real PostgreSQL 15:
//! - A (timeline 1) archives; backup 1; more rows.
//! - B: backup 1 restored with `--target-immediate`, promoted (timeline 2), archiving into the
//!   same repository; its `postgresql.auto.conf` now says `recovery_target = 'immediate'`.
//!   Backup 2 of B, then more rows on B.
//! - A goes on writing on timeline 1; backup 3 of A (newest, but not on timeline 2's history).
//! - Restores of that repository are checked against the rows each should bring back.

use std::time::Duration;

use walcore_e2e::repo::Codec;
use walcore_e2e::workload::{create_table, fingerprint, insert_batch};
use walcore_e2e::{Cluster, Repo, bins};

use crate::backup::{Tool, empty_cluster};
use crate::scenario::{self, ARCHIVE_WAIT, assert_promoted};

/// Restores with `args` into a new cluster of 15 whose socket is its own and whose environment
/// is `env`; returns it (not started) and the tool's stdout.
fn restore_into(tool: &Tool, env: &[(String, String)], args: &[&str]) -> (Cluster, String) {
    let mut dst = empty_cluster(15);
    let program = dst.install(bins::RESTORE).to_string_lossy().into_owned();
    let data = dst.data.to_string_lossy().into_owned();
    let mut all = vec!["restore", "--pgdata", &data, "--restore-program", &program];
    all.extend_from_slice(args);
    let out = tool.ok(&all);
    dst.set("unix_socket_directories", &dst.sock.to_string_lossy());
    dst.set_env(env);
    (dst, out)
}

fn auto_conf(c: &Cluster) -> String {
    std::fs::read_to_string(c.data.join("postgresql.auto.conf")).expect("postgresql.auto.conf")
}

#[test]
fn a_backup_of_a_restored_cluster_restores_every_row_on_the_right_timeline() {
    let repo = Repo::file();
    let env = repo.env(&Codec::plain());

    // A, timeline 1.
    let mut a = Cluster::new();
    a.archive_with_walcore();
    // Recovery settings left in postgresql.conf (a primary ignores them; every restored copy
    // would obey them unless the restore overrides them).
    a.set("recovery_target_name", "never_created");
    a.set("recovery_min_apply_delay", "1h");
    a.set_env(&env);
    a.start();
    create_table(&a);
    insert_batch(&a, "a", 20_000);
    let tool_a = Tool::new(&a, env.clone());
    let backup1 = tool_a.take(&a, &[]);
    insert_batch(&a, "b", 20_000);
    a.archive_all(ARCHIVE_WAIT);

    // B: backup 1 restored to the end of the backup, promoted onto timeline 2, archiving into
    // the same repository (its configuration is A's: archive_mode on, walcore-archive).
    let (b, out) = restore_into(&tool_a, &env, &["--target-immediate"]);
    assert!(out.contains(&backup1), "{out}");
    assert!(
        out.contains("archive_command runs walcore-archive"),
        "the summary must say the restored server archives into the repository:\n{out}"
    );
    b.archive_with_walcore();
    assert_promoted(&b, scenario::run_recovery(&b), "B (immediate)");
    assert_eq!(b.psql("select count(*) from t"), "20000");
    assert!(auto_conf(&b).contains("recovery_target = 'immediate'"));
    insert_batch(&b, "c", 20_000);
    let tool_b = Tool::new(&b, env.clone());
    let backup2 = tool_b.take(&b, &[]);
    insert_batch(&b, "d", 20_000);
    b.archive_all(ARCHIVE_WAIT);
    let b_rows = fingerprint(&b);

    // A goes on, on timeline 1: backup 3 is the newest backup, but timeline 2 left timeline 1
    // before it.
    insert_batch(&a, "e", 20_000);
    let backup3 = tool_a.take(&a, &[]);
    insert_batch(&a, "f", 1_000);
    a.archive_all(ARCHIVE_WAIT);
    let a_rows = fingerprint(&a);
    assert!(tool_a.list().contains(&backup3));

    // The plan, printed without writing anything.
    let empty = empty_cluster(15);
    let data = empty.data.to_string_lossy().into_owned();
    let program = a.install(bins::RESTORE).to_string_lossy().into_owned();
    let plan = tool_a.ok(&[
        "restore",
        "--pgdata",
        &data,
        "--restore-program",
        &program,
        "--dry-run",
    ]);
    assert!(plan.contains(&format!("backup:    {backup2}")), "{plan}");
    assert!(plan.contains(&format!("{backup3} (timeline 1)")), "{plan}");
    assert!(
        plan.contains("timeline:  2 (recovery_target_timeline = 'latest')"),
        "{plan}"
    );
    assert!(plan.contains("recovery_target = ''"), "{plan}");
    assert!(!empty.data.exists(), "--dry-run created the data directory");

    // To the end of timeline 2: backup 2, its stale 'immediate' gone, every row of B.
    let (c, out) = restore_into(&tool_a, &env, &[]);
    assert!(out.contains(&backup2), "{out}");
    assert!(
        out.contains("removed from the backup's postgresql.auto.conf"),
        "{out}"
    );
    let conf = auto_conf(&c);
    assert!(!conf.contains("'immediate'"), "{conf}");
    assert!(
        conf.contains(&format!("backup {backup2}, target the end")),
        "{conf}"
    );
    c.set("archive_mode", "off");
    assert_promoted(&c, scenario::run_recovery(&c), "latest from backup 2");
    assert_eq!(
        fingerprint(&c),
        b_rows,
        "a restore to the end lost rows of timeline 2"
    );
    drop(c);

    // Along timeline 1: backup 3, every row A has.
    let (c, out) = restore_into(&tool_a, &env, &["--target-timeline", "1"]);
    assert!(out.contains(&backup3), "{out}");
    c.set("archive_mode", "off");
    assert_promoted(&c, scenario::run_recovery(&c), "timeline 1 from backup 3");
    assert_eq!(fingerprint(&c), a_rows);
    drop(c);

    // A clone for a drill, with archive_mode as B had it (on, walcore-archive) but
    // --archive-mode off: it promotes onto timeline 3, writes, switches WAL, and the
    // repository does not change.
    let before = repo.keys();
    let (d, out) = restore_into(&tool_a, &env, &["--archive-mode", "off"]);
    assert!(out.contains("archive_mode = off"), "{out}");
    d.archive_with_walcore();
    assert_promoted(&d, scenario::run_recovery(&d), "clone");
    assert_eq!(d.psql("show archive_mode"), "off");
    insert_batch(&d, "clone", 5_000);
    d.switch_wal();
    d.psql("checkpoint");
    std::thread::sleep(Duration::from_secs(3));
    let after = repo.keys();
    assert_eq!(
        before, after,
        "a clone restored with --archive-mode off wrote into the repository"
    );
    drop(d);

    // A target the archive does not reach yet: refused before anything is written, naming the
    // way past it; once the segment is archived, the same restore is planned.
    insert_batch(&b, "late", 100);
    std::thread::sleep(Duration::from_millis(1100));
    let late = b.psql("select now()");
    let empty = empty_cluster(15);
    let data = empty.data.to_string_lossy().into_owned();
    let refused = tool_a.run(&[
        "restore",
        "--pgdata",
        &data,
        "--restore-program",
        &program,
        "--target-time",
        &late,
    ]);
    assert!(!refused.status.success(), "{}", refused.stdout);
    assert!(
        refused.stderr.contains("does not reach the target"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("pg_switch_wal()"),
        "{}",
        refused.stderr
    );
    assert!(
        !empty.data.exists(),
        "a refused restore created the data directory"
    );
    b.archive_all(ARCHIVE_WAIT);
    let plan = tool_a.ok(&[
        "restore",
        "--pgdata",
        &data,
        "--target-time",
        &late,
        "--dry-run",
    ]);
    assert!(plan.contains(&backup2), "{plan}");
}
