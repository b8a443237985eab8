//! `walcore`, the operator command, end to end on real PostgreSQL: its help lists every
//! repository command; `take`, `list`, `pin`/`unpin` and `show` on `file://` and S3;
//! a `restore` that starts and has every committed row.

use std::time::Duration;

use walcore_e2e::repo::{Codec, KEY_1};
use walcore_e2e::sys;
use walcore_e2e::workload::{create_table, fingerprint, insert_batch};
use walcore_e2e::{Cluster, Moto, Repo, bins, moto};

use crate::backup::{Tool, empty_cluster, prepare_restored};
use crate::scenario::{self, ARCHIVE_WAIT, assert_promoted};

#[test]
fn walcore_help_lists_every_repository_command() {
    let mut cmd = bins::clean_command(&bins::bin(bins::WALCORE), &[]);
    cmd.arg("--help");
    let out = sys::run(&mut cmd, Duration::from_secs(30));
    assert!(out.status.success(), "walcore --help: {}", out.stderr);
    let commands: Vec<&str> = out
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for want in [
        "take", "list", "show", "restore", "pin", "unpin", "expire", "verify", "check", "stream",
        "status", "metrics", "serve", "drill",
    ] {
        assert!(commands.contains(&want), "no {want} in:\n{}", out.stdout);
    }
}

#[test]
fn a_plain_path_is_a_file_repository_and_a_missing_root_says_what_to_create() {
    let repo = Repo::file();
    let root: std::path::PathBuf = repo.path("").components().collect();
    let mut env = repo.env(&Codec::default());
    for (name, value) in &mut env {
        if name == "WALCORE_REPO" {
            *value = root.display().to_string();
        }
    }
    let src = Cluster::archiving_into(&env);
    create_table(&src);
    let name = src.switch_wal();
    src.wait_archived(&name, ARCHIVE_WAIT);
    assert!(
        repo.keys().contains(&walcore_e2e::repo::wal_key(&name)),
        "{name} is not in {}",
        root.display()
    );

    let missing = root.join("never-made");
    let mut cmd = bins::clean_command(
        &bins::bin(bins::WALCORE),
        &[("WALCORE_REPO".into(), missing.display().to_string())],
    );
    cmd.arg("status");
    let out = sys::run(&mut cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(8), "{}", out.stderr);
    assert!(
        out.stderr.contains("does not exist")
            && out.stderr.contains("install -d -m 0700 -o ")
            && out.stderr.contains(&missing.display().to_string()),
        "{}",
        out.stderr
    );
}

/// The `pinned`/`pin_note` of backup `id` in `list --json`.
fn listed_pin(tool: &Tool, id: &str) -> (serde_json::Value, serde_json::Value) {
    let list: serde_json::Value =
        serde_json::from_str(&tool.ok(&["list", "--json"])).expect("list --json");
    let entry = list
        .as_array()
        .expect("an array")
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed: {list}"));
    (entry["pinned"].clone(), entry["pin_note"].clone())
}

#[test]
fn pin_a_backup_and_restore_it_with_the_operator_command() {
    pin_and_restore(&Repo::file(), &Codec::plain());
}

/// The same on S3 (the emulator), encrypted: pin events are create-only objects there too.
#[test]
fn pin_a_backup_on_s3() {
    if !moto::s3_enabled("operator::pin_a_backup_on_s3") {
        return;
    }
    pin_and_restore(&Repo::s3(Moto::shared()), &Codec::encrypted(KEY_1));
}

/// A pinned backup stays pinned until unpinned, `list` and `show` say so with the note, and
/// the backup still restores through the same command.
fn pin_and_restore(repo: &Repo, codec: &Codec) {
    let env = repo.env(codec);
    let mut src = Cluster::new();
    src.archive_with_walcore();
    src.set_env(&env);
    src.start();
    create_table(&src);
    insert_batch(&src, "pre", 5_000);
    let tool = Tool {
        program: src.install(bins::WALCORE),
        env: env.clone(),
        cwd: src.dir().to_path_buf(),
    };
    let id = tool.take(&src, &["--label", "operator"]);
    assert_eq!(tool.list(), vec![id.clone()]);
    assert_eq!(
        listed_pin(&tool, &id),
        (false.into(), serde_json::Value::Null)
    );

    // An unknown backup cannot be pinned; nothing is written.
    let unknown = "20000101T000000Z-0000";
    let out = tool.run(&["pin", unknown]);
    assert_eq!(
        out.status.code(),
        Some(8),
        "pin of an unknown backup: {}",
        out.stderr
    );
    assert!(out.stderr.contains(unknown), "{}", out.stderr);
    assert!(!repo.keys().iter().any(|k| k.starts_with("pins/")));

    tool.ok(&["pin", &id, "--note", "before the migration"]);
    assert_eq!(
        listed_pin(&tool, &id),
        (true.into(), "before the migration".into())
    );
    let table = tool.ok(&["list"]);
    assert!(table.contains("before the migration"), "{table}");
    let show = tool.ok(&["show", &id]);
    assert!(
        show.contains("pinned            yes: before the migration"),
        "{show}"
    );

    tool.ok(&["unpin", &id]);
    let show: serde_json::Value =
        serde_json::from_str(&tool.ok(&["show", &id, "--json"])).expect("show --json");
    assert_eq!(show["pinned"], false);
    assert_eq!(show["pin_note"], serde_json::Value::Null);
    assert_eq!(show["label"], "operator");
    tool.ok(&["pin", &id, "--note", "again"]);
    assert_eq!(listed_pin(&tool, &id), (true.into(), "again".into()));
    // Three events, none overwritten.
    let events = repo
        .keys()
        .into_iter()
        .filter(|k| k.starts_with(&format!("pins/{id}/")))
        .count();
    assert_eq!(events, 3);

    insert_batch(&src, "after", 3_000);
    src.archive_all(ARCHIVE_WAIT);
    let want = fingerprint(&src);

    let mut dst = empty_cluster(15);
    let restore_bin = dst.install(bins::RESTORE);
    let data = dst.data.to_string_lossy().into_owned();
    let program = restore_bin.to_string_lossy().into_owned();
    let out = tool.ok(&["restore", "--pgdata", &data, "--restore-program", &program]);
    assert!(out.contains(&format!("restored backup {id}")), "{out}");
    prepare_restored(&mut dst, &env);
    let outcome = scenario::run_recovery(&dst);
    assert_promoted(&dst, outcome, "walcore restore");
    assert_eq!(fingerprint(&dst), want);
}
