//! Faults during recovery must stop PostgreSQL, not end recovery early.
//!
//! A segment in the middle of the archive is made unreadable, corrupted, forbidden, or the S3
//! endpoint goes away when PostgreSQL asks for it. `walcore-restore` must then exit above 125,
//! so that PostgreSQL stops with FATAL instead of taking the failure for the end of the archive
//! and promoting with rows missing. After the fault is repaired, the same data directory
//! recovers to the end and every row is back.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use walcore_e2e::repo::{Codec, KEY_1, flip_byte, wal_key};
use walcore_e2e::workload::fingerprint;
use walcore_e2e::{Cluster, Fault, FaultProxy, Moto, Recovery, Repo, moto, sys};

use crate::scenario::{self, FaultSource, assert_promoted};

/// Rows for the fault tests: about 4 segments of WAL after the base backup.
pub(crate) const ROWS: u32 = 220_000;

/// Restores `source`'s base backup with `env`, expects the recovery to stop with FATAL at
/// `segment` (or at a segment from `earliest` on, when the fault may strike before PostgreSQL
/// gets there) while `fault` holds, then calls `repair` and expects a complete recovery.
fn fatal_then_repaired(
    source: &FaultSource,
    env: &[(String, String)],
    segments: (&str, &str),
    fault: &str,
    repair: impl FnOnce(),
) {
    let mut dst = Cluster::from_backup(&source.base);
    dst.set_env(env);
    dst.recover_with_walcore(None);
    fatal_then_repaired_in(&dst, source, segments, fault, repair);
}

/// [`fatal_then_repaired`] in `dst`, a copy of `source`'s base backup set up for recovery.
/// Returns the server log of the stopped recovery.
pub(crate) fn fatal_then_repaired_in(
    dst: &Cluster,
    source: &FaultSource,
    (earliest, segment): (&str, &str),
    fault: &str,
    repair: impl FnOnce(),
) -> String {
    let outcome = scenario::run_recovery(dst);
    if outcome == Recovery::Promoted {
        panic!(
            "{fault}: PostgreSQL ended recovery and promoted although {segment} could not be \
             restored; rows now: {} (expected {})\n--- server log ---\n{}",
            fingerprint(dst),
            source.expected,
            sys::tail(&dst.server_log(), 60)
        );
    }
    let log = dst.server_log();
    let line = log
        .lines()
        .find(|l| {
            l.split("could not restore file \"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .is_some_and(|f| earliest <= f && f <= segment)
        })
        .unwrap_or_else(|| {
            let which = if earliest == segment {
                segment.to_string()
            } else {
                format!("a segment from {earliest} to {segment}")
            };
            panic!(
                "{fault}: the server stopped, but not on a failed restore of {which}\n--- \
                 server log ---\n{}",
                sys::tail(&log, 60)
            )
        });
    assert!(line.contains("FATAL"), "{fault}: not FATAL: {line}");
    // What walcore said, for the test's output.
    let said: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    eprintln!("{fault}: walcore: {said:?}\n{fault}: PostgreSQL: {line}");
    if let Some(code) = line
        .split("exit code ")
        .nth(1)
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        assert!(code > 125, "{fault}: restore exited {code}: {line}");
    }
    assert!(!dst.is_running(), "{fault}: server still running");
    assert!(
        dst.recovery_pending(),
        "{fault}: recovery.signal was removed although recovery did not end"
    );

    repair();
    let outcome = scenario::run_recovery(dst);
    assert_promoted(dst, outcome, &format!("{fault}, repaired"));
    assert_eq!(
        fingerprint(dst),
        source.expected,
        "{fault}, repaired: rows after recovery"
    );
    log
}

#[test]
fn file_repository() {
    let repo = Repo::file();
    let codec = Codec::plain();
    let mut src = Cluster::new();
    src.archive_with_walcore();
    src.set_env(&repo.env(&codec));
    let source = FaultSource::new(src, ROWS);
    let seg = source.middle_segment().to_string();
    let path = repo.path(&wal_key(&seg));
    let env = repo.env(&codec);

    // Unreadable object (the server runs as `postgres`, the object is its own, mode 000).
    let mode = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{seg} not archived at {}: {e}", path.display()))
        .permissions()
        .mode();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).expect("chmod 000");
    fatal_then_repaired(&source, &env, (&seg, &seg), "unreadable object", || {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .expect("restore the mode");
    });

    // A flipped byte in the middle of the object.
    let original = std::fs::read(&path).expect("read the object");
    repo.tamper(&wal_key(&seg), &flip_byte(&original, original.len() / 2));
    fatal_then_repaired(&source, &env, (&seg, &seg), "corrupted object", || {
        repo.tamper(&wal_key(&seg), &original);
    });
}

#[test]
fn s3_repository() {
    if !moto::s3_enabled("faults::s3_repository") {
        return;
    }
    let moto = Moto::shared();
    let repo = Repo::s3(moto);
    let codec = Codec::encrypted(KEY_1);
    let mut src = Cluster::new();
    src.archive_with_walcore();
    src.set_env(&repo.env(&codec));
    let source = FaultSource::new(src, ROWS);
    let seg = source.middle_segment().to_string();
    let key = wal_key(&seg);
    let proxy = FaultProxy::start(moto.addr());
    let env = repo.env_at(&codec, Some(&proxy.endpoint()));

    // A flipped byte in the middle of the stored object.
    let original = repo
        .read(&key)
        .unwrap_or_else(|| panic!("{seg} not archived: {:?}", repo.keys()));
    repo.tamper(&key, &flip_byte(&original, original.len() / 2));
    fatal_then_repaired(&source, &env, (&seg, &seg), "corrupted S3 object", || {
        repo.tamper(&key, &original);
    });

    // The proxy trips on the first request naming the segment. With restore prefetch on, the
    // prefetch worker asks for it while PostgreSQL still replays an earlier one, which may then
    // be the one whose restore fails.
    let earliest = source.segments[0].as_str();

    // Access withdrawn (403) from the moment the segment is asked for.
    proxy.arm(&seg, Fault::Forbidden);
    fatal_then_repaired(&source, &env, (earliest, &seg), "S3 answers 403", || {
        assert!(
            proxy.faulted() > 0,
            "the proxy never saw a request for {seg}"
        );
        proxy.disarm();
    });

    // The endpoint goes away from the moment the segment is asked for.
    let before = proxy.faulted();
    proxy.arm(&seg, Fault::Drop);
    let started = std::time::Instant::now();
    fatal_then_repaired(&source, &env, (earliest, &seg), "S3 endpoint gone", || {
        assert!(
            proxy.faulted() > before,
            "the proxy never saw a request for {seg}"
        );
        proxy.disarm();
    });
    assert!(
        started.elapsed() < Duration::from_secs(150),
        "with WALCORE_RETRY_TIME=3s the failure and the repaired recovery took {:?}",
        started.elapsed()
    );
}
