//! Restores that stay where they are put, and the users that run them:
//! - a backup whose `base.tar` holds a link out of the data directory and a file below it, or a
//!   hard link to a file outside, is refused, with nothing written outside and no `pg_control`
//!   (the repository is crafted through the library, as a take would write it);
//! - `list` of a repository that does not exist is an error, not "no complete backups";
//! - a take run as root into a `file://` repository owned by `postgres` leaves objects
//!   `postgres` owns: `list` and `restore` run as `postgres` work, an unreadable catalog record
//!   does not hide the good ones, and a restore run as root gives the data directory to
//!   `postgres`, which starts on it with every row.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use walcore::backup::catalog::{self, BackupRecord, ObjectEntry, ObjectKind};
use walcore::backup::tar::{BLOCK, EntryKind, header_block};
use walcore::codec::{Codec as WalcoreCodec, Compression};
use walcore::pg::{Lsn, WalSegmentSize};
use walcore::repo::{RepoMeta, Repository};
use walcore::store::{LocalStore, Store};
use walcore_e2e::repo::{Codec, KEY_1};
use walcore_e2e::workload::{create_table, fingerprint, insert_batch};
use walcore_e2e::{Cluster, Repo, bins, sys};

use crate::backup::{BASEBACKUP, Tool, conninfo, empty_cluster, prepare_restored};
use crate::scenario::{self, ARCHIVE_WAIT, assert_promoted};

/// `walcore-basebackup` run as ourselves (root, in CI) with `env`.
fn as_me(env: &[(String, String)], args: &[&str]) -> sys::Output {
    let mut cmd = bins::clean_command(&bins::bin(BASEBACKUP), env);
    cmd.args(args);
    sys::run(&mut cmd, Duration::from_secs(300))
}

/// A tar stream of `entries` (path, type flag, content, link target), with the zero trailer.
fn tar(entries: &[(&str, u8, &[u8], &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (path, flag, data, link) in entries {
        let mut h = header_block(path, EntryKind::File, 0o600, data.len() as u64, link);
        h[156] = *flag;
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&x| u32::from(x)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.extend(std::iter::repeat_n(
            0u8,
            (BLOCK - data.len() % BLOCK) % BLOCK,
        ));
    }
    out.extend([0u8; 2 * BLOCK]);
    out
}

const SYSTEM_ID: u64 = 7_300_000_000_000_000_001;

/// Stores `base` as the `base.tar` of backup `id` and commits its catalog record, as a take
/// would.
async fn store_backup(repo: &Repository, id: &str, base: Vec<u8>) {
    let key = catalog::archive_key(id, "base.tar");
    let entry = ObjectEntry {
        key: key.clone(),
        kind: ObjectKind::Archive,
        name: "base.tar".into(),
        plaintext_len: base.len() as u64,
        plaintext_crc32: walcore_e2e::repo::crc32(&base),
        stored_len: 0,
    };
    repo.put_small(&key, base).await.expect("store base.tar");
    let record = BackupRecord {
        format_version: 1,
        id: id.to_owned(),
        label: "crafted".into(),
        system_identifier: SYSTEM_ID.to_string(),
        pg_version_num: 150_000,
        wal_segment_size: 16 << 20,
        start_lsn: Lsn(0x0200_0028),
        start_timeline: 1,
        stop_lsn: Lsn(0x0200_0100),
        stop_timeline: 1,
        start_time: "2026-11-30T01:00:00.000Z".into(),
        stop_time: "2026-11-30T01:00:05.000Z".into(),
        checkpoint: "fast".into(),
        wal_included: false,
        tablespaces: vec![],
        objects: vec![entry],
        created_by: "crafted by a test".into(),
    };
    catalog::commit(repo, &record).await.expect("commit");
}

#[test]
fn links_in_a_backup_cannot_write_outside_the_data_directory() {
    let repo = Repo::file();
    let env = repo.env(&Codec::plain());
    let work = sys::server_tempdir("wclink");
    let outside = sys::server_mkdir(&work.path().join("outside"));
    let secret = outside.join("secret");
    std::fs::write(&secret, "keep me").expect("write");
    let outside_text = outside.to_string_lossy().into_owned();
    let secret_text = secret.to_string_lossy().into_owned();

    let (symlink_id, hardlink_id) = ("20261130T010000Z-aaaa", "20261130T020000Z-bbbb");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let root = PathBuf::from(repo.url().trim_start_matches("file://"));
        let lib = Repository::new(
            Store::Local(LocalStore::new(root)),
            WalcoreCodec::new(Compression::None, None),
            Duration::from_secs(3),
        );
        let seg = WalSegmentSize::new(16 << 20).expect("size");
        lib.init_meta(RepoMeta::new(SYSTEM_ID, 15, seg))
            .await
            .expect("meta");
        let pg_control = vec![0u8; 8192];
        store_backup(
            &lib,
            symlink_id,
            tar(&[
                ("PG_VERSION", b'0', b"15\n", ""),
                ("x", b'2', b"", &outside_text),
                ("x/evil", b'0', b"written through a link", ""),
                ("global", b'5', b"", ""),
                ("global/pg_control", b'0', &pg_control, ""),
            ]),
        )
        .await;
        store_backup(
            &lib,
            hardlink_id,
            tar(&[
                ("PG_VERSION", b'0', b"15\n", ""),
                ("h", b'1', b"", &secret_text),
                ("global", b'5', b"", ""),
                ("global/pg_control", b'0', &pg_control, ""),
            ]),
        )
        .await;
    });

    for (id, entry) in [(symlink_id, "\"x\""), (hardlink_id, "\"h\"")] {
        let data = work.path().join(format!("data-{id}"));
        let data_text = data.to_string_lossy().into_owned();
        let out = as_me(
            &env,
            &[
                "restore",
                "--pgdata",
                &data_text,
                "--backup",
                id,
                "--restore-command",
                "false",
            ],
        );
        assert_eq!(
            std::fs::read_dir(&outside)
                .expect("outside")
                .map(|e| e.expect("entry").file_name())
                .collect::<Vec<_>>(),
            vec![std::ffi::OsString::from("secret")],
            "backup {id}: something was written outside"
        );
        assert_eq!(std::fs::read_to_string(&secret).expect("secret"), "keep me");
        assert!(
            !out.status.success(),
            "backup {id}: the restore succeeded:\n{}",
            out.stderr
        );
        let key = catalog::archive_key(id, "base.tar");
        assert!(
            out.stderr.contains(&key) && out.stderr.contains(entry),
            "backup {id}: the error names neither {key} nor the entry {entry}:\n{}",
            out.stderr
        );
        assert!(
            !data.join("global/pg_control").exists(),
            "backup {id}: a refused restore left a pg_control"
        );
        assert!(
            std::fs::symlink_metadata(data.join("x")).is_err(),
            "backup {id}: the link was made"
        );
    }

    // A repository that does not exist is an error, not an empty catalog.
    for url in [
        format!("file://{}", work.path().join("no-such-repo").display()),
        format!("file://{outside_text}"),
    ] {
        let mut env = env.clone();
        env.retain(|(k, _)| k != "WALCORE_REPO");
        env.push(("WALCORE_REPO".into(), url.clone()));
        let out = as_me(&env, &["list"]);
        assert!(
            !out.status.success() && !out.stdout.contains("no complete backups"),
            "list of {url} succeeded:\n{}{}",
            out.stdout,
            out.stderr
        );
    }
}

/// Every file and directory under `dir` with its owner's uid, when that is not `uid`.
fn not_owned_by(dir: &Path, uid: u32) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let m = std::fs::symlink_metadata(e.path()).expect("stat");
            if m.uid() != uid {
                out.push((e.path(), m.uid()));
            }
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

#[test]
fn a_take_as_root_then_list_and_restore_as_postgres() {
    let Some(postgres) = sys::server_user() else {
        eprintln!("*** SKIPPED restore_safety: not running as root ***");
        return;
    };
    let repo = Repo::file();
    let codec = Codec::encrypted(KEY_1);
    let env = repo.env(&codec);
    let mut src = Cluster::new();
    src.archive_with_walcore();
    src.set_env(&env);
    src.start();
    create_table(&src);
    insert_batch(&src, "pre", 20_000);

    // The take runs as root, from root's own copy of the program.
    let out = as_me(&env, &["take", "--dbname", &conninfo(&src, "")]);
    assert!(out.status.success(), "take as root failed:\n{}", out.stderr);
    let id = out.stdout.trim().to_owned();
    insert_batch(&src, "post", 5_000);
    let rows = fingerprint(&src);
    src.archive_all(ARCHIVE_WAIT);
    let root = PathBuf::from(repo.url().trim_start_matches("file://"));
    let foreign = not_owned_by(&root, postgres.uid);
    assert!(
        foreign.is_empty(),
        "files in the repository not owned by postgres after a take as root: {foreign:?}"
    );

    // A record postgres cannot read (what a take as root used to leave) does not hide the
    // others from list, and restore still works.
    let bad = "20200101T000000Z-dead";
    let bad_path = repo.path(&catalog::catalog_key(bad));
    std::fs::write(&bad_path, b"root's garbage").expect("write");
    std::fs::set_permissions(
        &bad_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o400),
    )
    .expect("chmod");
    let tool = Tool::new(&src, env.clone());
    let out = tool.run(&["list"]);
    assert!(
        out.status.success(),
        "list as postgres failed:\n{}",
        out.stderr
    );
    assert!(out.stdout.contains(&id), "{}", out.stdout);
    assert!(
        out.stderr.contains(&catalog::catalog_key(bad)),
        "list does not warn about the unreadable record:\n{}",
        out.stderr
    );
    assert_eq!(tool.list(), vec![id.clone()]);

    // Restored as postgres, and as root (the files then go to postgres): both start.
    for as_root in [false, true] {
        let what = if as_root {
            "restore as root"
        } else {
            "restore as postgres"
        };
        let mut dst = empty_cluster(15);
        let restore_bin = dst.install(bins::RESTORE);
        let data = dst.data.to_string_lossy().into_owned();
        let program = restore_bin.to_string_lossy().into_owned();
        let args = ["restore", "--pgdata", &data, "--restore-program", &program];
        let out = if as_root {
            as_me(&env, &args)
        } else {
            tool.run(&args)
        };
        assert!(out.status.success(), "{what} failed:\n{}", out.stderr);
        if as_root {
            assert!(
                out.stdout.contains("belong to postgres"),
                "{what}: the summary does not say who owns the files:\n{}",
                out.stdout
            );
        }
        let foreign = not_owned_by(&dst.data, postgres.uid);
        assert!(foreign.is_empty(), "{what}: not postgres's: {foreign:?}");
        assert_eq!(
            std::fs::metadata(&dst.data).expect("data").uid(),
            postgres.uid
        );
        prepare_restored(&mut dst, &env);
        let outcome = scenario::run_recovery(&dst);
        assert_promoted(&dst, outcome, what);
        assert_eq!(fingerprint(&dst), rows, "{what}: rows differ");
    }
}
