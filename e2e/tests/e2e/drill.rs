//! `walcore drill` on real PostgreSQL: a backup restored into a scratch directory, started on
//! a private socket, promoted and queried. The report's RTO parts add up; its RPO is right for
//! a workload whose last commit is known; the scratch directory is gone afterwards; the drill's
//! server pushed nothing into the repository; status and the metrics show the drill. Then the
//! backup is corrupted: the drill fails, says where, stores that, and alerts.

use std::time::Duration;

use walcore_e2e::cluster::pg_bin_dir;
use walcore_e2e::repo::{Codec, KEY_1, flip_byte};
use walcore_e2e::sys;
use walcore_e2e::workload::{create_table, insert_batch};
use walcore_e2e::{Cluster, Repo, bins};

use crate::backup::Tool;
use crate::metrics::{AlertSink, events, promtool_accepts, samples, unix};
use crate::scenario::ARCHIVE_WAIT;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The report a drill printed, or a panic with what it said instead.
fn report_of(out: &sys::Output) -> serde_json::Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the drill printed no report ({e}; {:?}):\n{}{}",
            out.status, out.stdout, out.stderr
        )
    })
}

fn secs(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn a_drill_measures_rto_and_rpo_and_a_corrupted_backup_fails_it_with_an_alert() {
    let repo = Repo::file();
    let env = repo.env(&Codec::encrypted(KEY_1));
    let src = Cluster::archiving_into(&env);
    create_table(&src);
    insert_batch(&src, "before", 500);
    let sink = AlertSink::new();
    let alerts = sink.file.clone();
    let mut tool_env = env.clone();
    tool_env.extend(sink.env());
    let tool = Tool::walcore(&src, tool_env);
    // The drill's restore_command runs the walcore-restore beside walcore.
    src.install(bins::RESTORE);
    let id = tool.take(&src, &[]);

    // After the backup: rows, then one commit whose time is known, then nothing for 3 s
    // before the segment holding it is switched out and archived.
    insert_batch(&src, "after", 500);
    src.psql("create table mark (at timestamptz)");
    let committed: f64 = src
        .psql("insert into mark select clock_timestamp() returning extract(epoch from at)")
        .trim()
        .parse()
        .expect("the mark's time");
    std::thread::sleep(Duration::from_secs(3));
    let last = src.switch_wal();
    src.wait_archived(&last, ARCHIVE_WAIT);
    let keys_before = repo.keys();

    let scratch = sys::server_tempdir("walcore-drill-test");
    let scratch_dir = scratch.path().to_string_lossy().into_owned();
    let mut args = vec!["drill", "--json", "--scratch-dir", scratch_dir.as_str()];
    // The drill finds /usr/lib/postgresql/15/bin by itself; another location is given.
    let bin = pg_bin_dir().to_string_lossy().into_owned();
    if bin != "/usr/lib/postgresql/15/bin" {
        args.extend(["--pg-bin", bin.as_str()]);
    }
    // Run as root when the tests are: the drill then starts the server as its owner, the
    // postgres user (PostgreSQL refuses root).
    let out = if sys::is_root() {
        let mut cmd = bins::clean_command(&tool.program, &tool.env);
        cmd.args(&args).current_dir(&tool.cwd);
        sys::run(&mut cmd, Duration::from_secs(300))
    } else {
        tool.run(&args)
    };
    let report = report_of(&out);
    assert!(
        out.status.success() && report["passed"] == true,
        "the drill failed ({:?}): {report:#}\n{}",
        out.status,
        out.stderr
    );
    assert_eq!(report["backup"], id.as_str());

    // RTO: three positive parts that add up.
    let parts = ["download_seconds", "start_seconds", "recovery_seconds"].map(|p| secs(&report[p]));
    assert!(parts.iter().all(|p| *p > 0.0), "{report:#}");
    let rto = secs(&report["rto_seconds"]);
    assert!(
        (rto - parts.iter().sum::<f64>()).abs() < 0.003,
        "RTO {rto} is not the sum of {parts:?}"
    );
    assert!(secs(&report["restored_bytes"]) > 1e6, "{report:#}");

    // RPO: the newest commit restored is the mark; it trails the newest segment stored by
    // the 3 s pause and the archiving after it.
    let restored = unix(&report["last_commit_restored"]);
    assert!(
        (restored - committed).abs() < 0.5,
        "the newest commit restored ({restored}) is not the mark ({committed}): {report:#}"
    );
    let status = json(&tool.ok(&["status", "--json"]));
    assert_eq!(report["rpo_reference"], "newest WAL stored");
    assert!(
        (unix(&report["rpo_reference_time"]) - unix(&status["last_archived"]["stored_at"])).abs()
            < 0.003,
        "{report:#}\n{status:#}"
    );
    let rpo = secs(&report["rpo_seconds"]);
    assert!(
        (rpo - (unix(&report["rpo_reference_time"]) - restored)).abs() < 0.003
            && (2.9..ARCHIVE_WAIT.as_secs_f64()).contains(&rpo),
        "RPO {rpo}: {report:#}"
    );

    // The query ran on the restored database.
    assert_eq!(
        report["query_output"].as_str().map(str::trim),
        Some(src.psql("select count(*) from pg_database").trim())
    );
    // Nothing is left, nothing was pushed: no new timeline, no new WAL in the repository.
    assert_eq!(report["scratch_removed"], true);
    let left: Vec<_> = std::fs::read_dir(scratch.path())
        .expect("scratch parent")
        .collect();
    assert!(left.is_empty(), "left in the scratch directory: {left:?}");
    let new: Vec<String> = repo
        .keys()
        .into_iter()
        .filter(|k| !keys_before.contains(k) && !k.starts_with("drill/"))
        .collect();
    assert!(
        new.iter()
            .all(|k| k.starts_with("verify/") || k.starts_with("index/")),
        "the drill's server wrote into the repository: {new:?}"
    );
    assert!(src.is_running(), "the production server is untouched");

    // status and the metrics show it.
    let d = &status["last_drill"];
    assert_eq!(d["passed"], true, "{status:#}");
    assert_eq!(d["rto_seconds"], report["rto_seconds"]);
    let text = tool.ok(&["metrics"]);
    promtool_accepts(&text);
    let m = samples(&text);
    assert_eq!(m.get("walcore_last_drill_success"), Some(&1.0), "{text}");
    // The exposition gives seconds to the millisecond.
    let near = |name: &str, want: f64| {
        let got = m.get(name).copied();
        assert!(
            got.is_some_and(|g| (g - want).abs() < 0.0015),
            "{name}: {got:?}, not {want}\n{text}"
        );
    };
    near("walcore_last_drill_rto_seconds", rto);
    near(
        r#"walcore_last_drill_rto_phase_seconds{phase="recovery"}"#,
        parts[2],
    );
    assert!(events(&alerts).is_empty(), "an alert with nothing wrong");

    // The backup's data is corrupted in the middle: the drill fails in the download, stores
    // that, alerts once, and leaves nothing behind.
    let base = format!("backup/{id}/data/base.tar");
    let stored = repo.read(&base).expect("the backup's base.tar");
    repo.tamper(&base, &flip_byte(&stored, stored.len() / 2));
    let out = tool.run(&["drill", "--json", "--scratch-dir", scratch_dir.as_str()]);
    let report = report_of(&out);
    assert_eq!(out.status.code(), Some(5), "{report:#}\n{}", out.stderr);
    assert_eq!(report["passed"], false);
    assert_eq!(report["failed_in"], "download", "{report:#}");
    assert!(
        report["error"].as_str().is_some_and(|e| e.contains(&base)),
        "the error names the damaged object: {report:#}"
    );
    let left: Vec<_> = std::fs::read_dir(scratch.path())
        .expect("scratch parent")
        .collect();
    assert!(left.is_empty(), "left in the scratch directory: {left:?}");
    let fired: Vec<_> = events(&alerts)
        .into_iter()
        .filter(|e| e["condition"] == "drill" && e["status"] == "firing")
        .collect();
    assert_eq!(fired.len(), 1, "{:#?}", events(&alerts));
    assert!(
        fired[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("download")),
        "{fired:#?}"
    );
    let status = json(&tool.ok(&["status", "--json"]));
    assert_eq!(status["last_drill"]["passed"], false, "{status:#}");
    let m = samples(&tool.ok(&["metrics"]));
    assert_eq!(m.get("walcore_last_drill_success"), Some(&0.0));
    assert_eq!(
        m.get(r#"walcore_failures_total{command="drill"}"#),
        Some(&1.0)
    );
    assert_eq!(
        m.get(r#"walcore_alert_firing{condition="drill"}"#),
        Some(&1.0)
    );
}
