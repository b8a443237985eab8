//! `walcore-archive` and `walcore-restore` run by hand on real WAL, for the cases PostgreSQL
//! rarely produces on its own: pushing twice, conflicting content, another cluster's WAL, absent
//! files, wrong keys, corrupted objects. Every case runs against a `file://` and an S3
//! repository.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use walcore_e2e::repo::{Codec, KEY_1, KEY_2, contains_ascii, crc32, flip_byte, wal_key};
use walcore_e2e::sys::{self, Output};
use walcore_e2e::workload::{create_table, insert_batch};
use walcore_e2e::{Cluster, Fault, FaultProxy, Moto, Repo, bins, moto};

/// Real WAL, made once per test process: full 16 MiB segments of one cluster, and a segment of
/// another cluster (another system identifier).
pub(crate) struct Samples {
    /// Segments of the main cluster, in order (at least 3).
    pub(crate) segments: Vec<PathBuf>,
    system_id: String,
    /// The first segment of the foreign cluster.
    foreign: PathBuf,
    foreign_system_id: String,
}

/// Starts `cluster` archiving with `cp` into `dir`, writes `rows` rows, archives everything,
/// stops; returns the archived segments and the system identifier.
fn collect_wal(cluster: Cluster, dir: &Path, rows: u32) -> (Vec<PathBuf>, String) {
    sys::server_mkdir(dir);
    cluster.set(
        "archive_command",
        &format!("test ! -f {0}/%f && cp %p {0}/%f", dir.display()),
    );
    cluster.start();
    let system_id = cluster.psql("select system_identifier from pg_control_system()");
    create_table(&cluster);
    insert_batch(&cluster, "A", rows);
    cluster.archive_all(Duration::from_secs(120));
    cluster.stop();
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read the sample WAL directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                n.len() == 24 && n.to_string_lossy().chars().all(|c| c.is_ascii_hexdigit())
            })
        })
        .collect();
    segments.sort();
    (segments, system_id)
}

pub(crate) fn samples() -> &'static Samples {
    static SAMPLES: OnceLock<Samples> = OnceLock::new();
    SAMPLES.get_or_init(|| {
        let scratch = sys::process_scratch();
        let (segments, system_id) = collect_wal(Cluster::new(), &scratch.join("wal-main"), 120_000);
        assert!(segments.len() >= 3, "sample WAL: {segments:?}");
        let (foreign, foreign_system_id) =
            collect_wal(Cluster::foreign(), &scratch.join("wal-foreign"), 10);
        assert_ne!(
            system_id, foreign_system_id,
            "two initdb runs, two system identifiers"
        );
        Samples {
            segments,
            system_id,
            foreign: foreign.into_iter().next().expect("a foreign segment"),
            foreign_system_id,
        }
    })
}

pub(crate) fn name_of(path: &Path) -> String {
    path.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

pub(crate) fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what}: exit {:?}{}\n--- stderr ---\n{}",
        out.code(),
        if out.timed_out { " (timed out)" } else { "" },
        out.stderr
    )
}

fn push(env: &[(String, String)], path: &Path) -> Output {
    bins::archive(env, path)
}

fn push_ok(env: &[(String, String)], path: &Path) {
    let out = push(env, path);
    assert_eq!(
        out.code(),
        Some(0),
        "{}",
        describe(&format!("archiving {}", path.display()), &out)
    );
}

/// An archive failure must be an exit code PostgreSQL retries: 1..=125.
fn assert_push_refused(out: &Output, what: &str) {
    assert!(
        matches!(out.code(), Some(1..=125)),
        "{}",
        describe(
            &format!("{what}: expected a refusal with exit 1..=125"),
            out
        )
    );
}

/// A restore failure other than "absent" must stop PostgreSQL: exit above 125.
fn assert_restore_fatal(out: &Output, what: &str) {
    assert!(
        out.code().is_some_and(|c| c > 125),
        "{}",
        describe(&format!("{what}: expected exit > 125"), out)
    );
}

/// A fresh directory for restore destinations.
pub(crate) fn dest_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("wcdest")
        .tempdir_in("/tmp")
        .expect("temporary directory")
}

pub(crate) fn assert_empty(dir: &Path, what: &str) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .expect("read destination directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.is_empty(),
        "{what}: files left at the destination: {left:?}"
    );
}

/// A copy of `src` under the same file name in a fresh directory, with one byte changed in the
/// middle (past the page header: still a valid-looking segment of the same name).
fn altered_copy(src: &Path, dir: &Path) -> PathBuf {
    let bytes = std::fs::read(src).expect("read sample");
    let dst = dir.join(name_of(src));
    std::fs::write(&dst, flip_byte(&bytes, bytes.len() / 2 + 1000)).expect("write altered copy");
    dst
}

fn mentions_crc(stderr: &str, crc: u32) -> bool {
    let s = stderr.to_ascii_lowercase();
    s.contains(&format!("{crc:08x}")) || s.contains(&crc.to_string())
}

// ---- the cases ----

fn round_trip_is_byte_exact(new_repo: fn() -> Repo) {
    let s = samples();
    let seg = &s.segments[1];
    let name = name_of(seg);
    let original = std::fs::read(seg).expect("read sample");
    for codec in [
        Codec::plain(),
        Codec::plain().compression("none"),
        Codec::encrypted(KEY_1).compression("zstd:3"),
    ] {
        let repo = new_repo();
        let repo_env = repo.env(&codec);
        push_ok(&repo_env, seg);
        let dest = dest_dir();
        let out = bins::restore(&repo_env, &name, &dest.path().join("RECOVERYXLOG"));
        assert_eq!(
            out.code(),
            Some(0),
            "{}",
            describe(&format!("restore with {codec:?}"), &out)
        );
        let restored = std::fs::read(dest.path().join("RECOVERYXLOG")).expect("restored file");
        assert!(
            restored == original,
            "restored bytes differ from the segment ({codec:?})"
        );
        assert_eq!(
            std::fs::read_dir(dest.path()).expect("dest").count(),
            1,
            "only the restored file at the destination"
        );
    }
}

/// The first run of `len` lowercase hex digits in `bytes` (a row payload in a segment).
fn hex_run(bytes: &[u8], len: usize) -> Option<String> {
    let mut run = 0;
    for (i, b) in bytes.iter().enumerate() {
        if b.is_ascii_digit() || (b'a'..=b'f').contains(b) {
            run += 1;
            if run == len {
                return Some(String::from_utf8_lossy(&bytes[i + 1 - len..=i]).into_owned());
            }
        } else {
            run = 0;
        }
    }
    None
}

fn encryption_hides_the_plaintext(new_repo: fn() -> Repo) {
    let s = samples();
    let seg = &s.segments[1];
    let key = wal_key(&name_of(seg));
    let needle = hex_run(&std::fs::read(seg).expect("read sample"), 64)
        .expect("a row payload in the sample segment");
    let plain = new_repo();
    push_ok(&plain.env(&Codec::plain().compression("none")), seg);
    assert!(
        contains_ascii(&plain.read(&key).expect("stored"), &needle),
        "without compression or encryption the payload {needle} should be visible"
    );
    let encrypted = new_repo();
    push_ok(
        &encrypted.env(&Codec::encrypted(KEY_1).compression("none")),
        seg,
    );
    let obj = encrypted.read(&key).expect("stored");
    assert!(
        !contains_ascii(&obj, &needle),
        "encrypted object shows the payload {needle}"
    );
    assert!(!contains_ascii(&obj, KEY_1), "the key is in the object");
}

fn same_segment_twice_is_quiet(new_repo: fn() -> Repo) {
    let repo = new_repo();
    let s = samples();
    let env = repo.env(&Codec::encrypted(KEY_1));
    let seg = &s.segments[1];
    let key = wal_key(&name_of(seg));
    push_ok(&env, seg);
    let stored = repo.read(&key).expect("object stored");
    let mtime = (!repo.is_s3()).then(|| {
        std::fs::metadata(repo.path(&key))
            .and_then(|m| m.modified())
            .expect("mtime")
    });
    std::thread::sleep(Duration::from_millis(20));
    push_ok(&env, seg);
    assert!(
        repo.read(&key).expect("object still stored") == stored,
        "the second push rewrote the object (an encrypted rewrite has a new salt)"
    );
    if let Some(mtime) = mtime {
        let now = std::fs::metadata(repo.path(&key))
            .and_then(|m| m.modified())
            .expect("mtime");
        assert_eq!(now, mtime, "the second push touched the stored file");
    }
}

fn different_content_same_name_is_refused(new_repo: fn() -> Repo) {
    let repo = new_repo();
    let s = samples();
    let env = repo.env(&Codec::encrypted(KEY_1));
    let seg = &s.segments[1];
    let key = wal_key(&name_of(seg));
    push_ok(&env, seg);
    let stored = repo.read(&key).expect("object stored");
    let scratch = dest_dir();
    let altered = altered_copy(seg, scratch.path());
    let out = push(&env, &altered);
    assert_push_refused(&out, "pushing different content under an archived name");
    let (a, b) = (
        crc32(&std::fs::read(seg).expect("read")),
        crc32(&std::fs::read(&altered).expect("read")),
    );
    assert!(
        mentions_crc(&out.stderr, a) && mentions_crc(&out.stderr, b),
        "the error should name both checksums ({a:08x} stored, {b:08x} offered):\n{}",
        out.stderr
    );
    assert!(
        repo.read(&key).expect("object still stored") == stored,
        "stored object changed"
    );
}

fn history_conflict_is_refused(new_repo: fn() -> Repo) {
    let repo = new_repo();
    let s = samples();
    let env = repo.env(&Codec::plain());
    push_ok(&env, &s.segments[1]);
    let dir = dest_dir();
    let first = dir.path().join("a");
    let second = dir.path().join("b");
    std::fs::create_dir(&first).expect("mkdir");
    std::fs::create_dir(&second).expect("mkdir");
    let name = "00000002.history";
    std::fs::write(
        first.join(name),
        "1\t0/3000000\tno recovery target specified\n",
    )
    .expect("write");
    std::fs::write(
        second.join(name),
        "1\t0/4000000\tno recovery target specified\n",
    )
    .expect("write");
    push_ok(&env, &first.join(name));
    let key = wal_key(name);
    let stored = repo.read(&key).expect("history file stored");
    push_ok(&env, &first.join(name));
    let out = push(&env, &second.join(name));
    assert_push_refused(&out, "pushing another 00000002.history");
    assert!(
        repo.read(&key).expect("still stored") == stored,
        "stored history file changed"
    );
    let restored = dest_dir();
    let out = bins::restore(&env, name, &restored.path().join(name));
    assert_eq!(
        out.code(),
        Some(0),
        "{}",
        describe("restoring the history file", &out)
    );
    assert_eq!(
        std::fs::read_to_string(restored.path().join(name)).expect("restored"),
        "1\t0/3000000\tno recovery target specified\n",
        "the first history file is the one kept"
    );
}

fn foreign_cluster_is_refused(new_repo: fn() -> Repo) {
    let repo = new_repo();
    let s = samples();
    let env = repo.env(&Codec::plain());
    // The repository records the main cluster; the foreign segment's name is not in it, so
    // only the system identifier can refuse it.
    push_ok(&env, &s.segments[1]);
    let foreign_name = name_of(&s.foreign);
    assert!(
        repo.read(&wal_key(&foreign_name)).is_none(),
        "test setup: {foreign_name} already stored"
    );
    let out = push(&env, &s.foreign);
    assert_push_refused(&out, "pushing another cluster's segment");
    let msg = out.stderr.to_ascii_lowercase();
    assert!(
        msg.contains("system identifier")
            && out.stderr.contains(&s.system_id)
            && out.stderr.contains(&s.foreign_system_id),
        "the error should say the system identifiers differ and name both ({} in the repository, \
         {} offered):\n{}",
        s.system_id,
        s.foreign_system_id,
        out.stderr
    );
    assert!(
        repo.read(&wal_key(&foreign_name)).is_none(),
        "the foreign segment was stored"
    );
}

fn absent_file_exits_1(new_repo: fn() -> Repo) {
    let repo = new_repo();
    let s = samples();
    let env = repo.env(&Codec::plain());
    push_ok(&env, &s.segments[1]);
    let dest = dest_dir();
    for name in [name_of(&s.segments[2]), "00000005.history".to_string()] {
        let out = bins::restore(&env, &name, &dest.path().join("RECOVERYXLOG"));
        assert_eq!(
            out.code(),
            Some(1),
            "{}",
            describe(&format!("restoring absent {name}"), &out)
        );
        assert_empty(dest.path(), "absent file");
    }
}

fn wrong_key_is_fatal(new_repo: fn() -> Repo) {
    let repo = new_repo();
    let s = samples();
    let seg = &s.segments[1];
    let name = name_of(seg);
    push_ok(&repo.env(&Codec::encrypted(KEY_1)), seg);
    let dest = dest_dir();
    let out = bins::restore(
        &repo.env(&Codec::encrypted(KEY_2)),
        &name,
        &dest.path().join("RECOVERYXLOG"),
    );
    assert_restore_fatal(&out, "restore with the wrong key");
    let msg = out.stderr.to_ascii_lowercase();
    assert!(
        msg.contains("key") && msg.contains("fingerprint"),
        "a wrong key is reported as a wrong key, by fingerprint:\n{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains(KEY_1) && !out.stderr.contains(KEY_2),
        "a key was logged"
    );
    assert_empty(dest.path(), "wrong key");

    let out = bins::restore(
        &repo.env(&Codec::plain()),
        &name,
        &dest.path().join("RECOVERYXLOG"),
    );
    assert_restore_fatal(&out, "restore of an encrypted object without a key");
    assert_empty(dest.path(), "no key");
}

fn corrupted_object_is_fatal(new_repo: fn() -> Repo) {
    let repo = new_repo();
    let s = samples();
    let env = repo.env(&Codec::plain());
    let (seg, other) = (&s.segments[1], &s.segments[2]);
    let (name, other_name) = (name_of(seg), name_of(other));
    push_ok(&env, seg);
    push_ok(&env, other);
    let key = wal_key(&name);
    let original = repo.read(&key).expect("stored");
    let other_obj = repo.read(&wal_key(&other_name)).expect("stored");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a byte flipped in the middle",
            flip_byte(&original, original.len() / 2),
        ),
        ("a byte flipped in the header", flip_byte(&original, 20)),
        (
            "the last byte flipped",
            flip_byte(&original, original.len() - 1),
        ),
        ("truncated to half", original[..original.len() / 2].to_vec()),
        (
            "trailing garbage",
            [original.as_slice(), b"garbage"].concat(),
        ),
        ("another segment's object", other_obj),
    ];
    for (what, bytes) in cases {
        repo.tamper(&key, &bytes);
        let dest = dest_dir();
        let out = bins::restore(&env, &name, &dest.path().join("RECOVERYXLOG"));
        assert_restore_fatal(&out, &format!("restore of an object with {what}"));
        assert_empty(dest.path(), what);
    }
    repo.tamper(&key, &original);
    let dest = dest_dir();
    let out = bins::restore(&env, &name, &dest.path().join("RECOVERYXLOG"));
    assert_eq!(
        out.code(),
        Some(0),
        "{}",
        describe("restore after repair", &out)
    );
}

fn restore_replaces_a_stale_destination(new_repo: fn() -> Repo) {
    let repo = new_repo();
    let s = samples();
    let env = repo.env(&Codec::plain());
    let seg = &s.segments[1];
    push_ok(&env, seg);
    let dest = dest_dir();
    let target = dest.path().join("RECOVERYXLOG");
    std::fs::write(&target, b"stale bytes of an earlier attempt").expect("write");
    let out = bins::restore(&env, &name_of(seg), &target);
    assert_eq!(
        out.code(),
        Some(0),
        "{}",
        describe("restore over a stale file", &out)
    );
    assert!(
        std::fs::read(&target).expect("read") == std::fs::read(seg).expect("read"),
        "content"
    );
}

macro_rules! on_every_backend {
    ($($case:ident),* $(,)?) => {
        mod file {
            $(
                #[test]
                fn $case() {
                    super::$case(walcore_e2e::Repo::file);
                }
            )*
        }
        mod s3 {
            $(
                #[test]
                fn $case() {
                    if !walcore_e2e::moto::s3_enabled(concat!("archive_matrix::s3::", stringify!($case))) {
                        return;
                    }
                    super::$case(|| walcore_e2e::Repo::s3(walcore_e2e::Moto::shared()));
                }
            )*
        }
    };
}

on_every_backend!(
    round_trip_is_byte_exact,
    encryption_hides_the_plaintext,
    same_segment_twice_is_quiet,
    different_content_same_name_is_refused,
    history_conflict_is_refused,
    foreign_cluster_is_refused,
    absent_file_exits_1,
    wrong_key_is_fatal,
    corrupted_object_is_fatal,
    restore_replaces_a_stale_destination,
);

/// With the S3 endpoint gone, archiving fails (PostgreSQL will retry) within the bounded retry
/// time, and restoring fails fatally: never "absent".
#[test]
fn s3_unreachable_fails_within_the_retry_window() {
    if !moto::s3_enabled("archive_matrix::s3_unreachable_fails_within_the_retry_window") {
        return;
    }
    let s = samples();
    let moto = Moto::shared();
    let repo = Repo::s3(moto);
    let codec = Codec::plain();
    let proxy = FaultProxy::start(moto.addr());
    let env = repo.env_at(&codec, Some(&proxy.endpoint()));
    push_ok(&env, &s.segments[0]);
    proxy.arm("/", Fault::Drop);
    let out = push(&env, &s.segments[1]);
    assert_push_refused(&out, "archiving while the endpoint is gone");
    assert!(
        out.elapsed < Duration::from_secs(30),
        "archive gave up after {:?}",
        out.elapsed
    );
    let dest = dest_dir();
    let out = bins::restore(
        &env,
        &name_of(&s.segments[0]),
        &dest.path().join("RECOVERYXLOG"),
    );
    assert_restore_fatal(&out, "restoring while the endpoint is gone");
    assert!(
        out.elapsed < Duration::from_secs(30),
        "restore gave up after {:?}",
        out.elapsed
    );
    assert_empty(dest.path(), "endpoint gone");
    proxy.disarm();
    assert!(
        repo.read(&wal_key(&name_of(&s.segments[1]))).is_none(),
        "nothing stored while gone"
    );
}
