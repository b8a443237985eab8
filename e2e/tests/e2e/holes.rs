//! A hole in the archive is not its end (DESIGN.md invariant 8).
//!
//! One segment object goes missing in the middle of the archive while later segments of the
//! same timeline are stored. PostgreSQL takes an absent file for the end of the archive and, at
//! the end of recovery, promotes: every row after the hole would be lost without a word. So
//! `walcore-restore` must stop recovery (exit above 125) naming the missing and the next stored
//! segment; once the object is back, the same data directory recovers every row.

use walcore_e2e::repo::{Codec, wal_key};
use walcore_e2e::{Cluster, Moto, Repo, moto};

use crate::faults::{ROWS, fatal_then_repaired_in};
use crate::scenario::FaultSource;

#[test]
fn a_hole_in_the_archive_stops_recovery_instead_of_losing_rows() {
    let repo = Repo::file();
    let codec = Codec::plain();
    let mut src = Cluster::new();
    src.archive_with_walcore();
    src.set_env(&repo.env(&codec));
    let source = FaultSource::new(src, ROWS);
    let seg = source.middle_segment().to_string();
    let at = source
        .segments
        .iter()
        .position(|s| *s == seg)
        .expect("the middle segment is one of them");
    let next = source.segments[at + 1].clone();

    // The object goes missing; later segments of timeline 1 stay.
    let path = repo.path(&wal_key(&seg));
    let aside = tempfile::tempdir().expect("tempdir");
    let kept = aside.path().join(&seg);
    std::fs::rename(&path, &kept)
        .unwrap_or_else(|e| panic!("{seg} not archived at {}: {e}", path.display()));

    let mut dst = Cluster::from_backup(&source.base);
    dst.set_env(&repo.env(&codec));
    dst.recover_with_walcore(None);
    // What a restore killed while writing leaves in pg_wal, and a file that only looks like it.
    let pg_wal = dst.dir().join("data/pg_wal");
    let stale = pg_wal.join(".RECOVERYXLOG.walcore-0123456789ab.tmp");
    let lookalike = pg_wal.join(".RECOVERYXLOG.walcore-notours.tmp");
    for f in [&stale, &lookalike] {
        std::fs::write(f, b"half a segment").expect("plant a temporary file");
    }

    let log = fatal_then_repaired_in(&dst, &source, (&seg, &seg), "a hole in the archive", || {
        std::fs::rename(&kept, &path).expect("put the object back");
    });
    let said = log
        .lines()
        .find(|l| l.contains("hole in the archive"))
        .unwrap_or_else(|| panic!("walcore did not report a hole\n--- server log ---\n{log}"));
    assert!(
        said.contains(&seg) && said.contains(&next),
        "the report names neither the missing segment {seg} nor the next stored {next}: {said}"
    );
    assert!(
        log.contains(&format!(
            "could not restore file \"{seg}\" from archive: child process exited with exit code 209"
        )),
        "restore of {seg} did not exit with the hole status 209\n--- server log ---\n{log}"
    );

    assert!(
        !stale.exists(),
        "the temporary file a killed restore left in pg_wal is still there"
    );
    assert!(lookalike.exists(), "a file that is not ours was removed");

    // The same archive in S3 (objects are bound to their keys, not to the store), the segment
    // missing again: the listing that finds the next segment now runs against S3.
    if !moto::s3_enabled("holes::a_hole_in_the_archive_stops_recovery_instead_of_losing_rows (S3)")
    {
        return;
    }
    let s3 = Repo::s3(Moto::shared());
    let missing = wal_key(&seg);
    for key in repo.keys() {
        if key != missing {
            s3.tamper(&key, &repo.read(&key).expect("stored object"));
        }
    }
    let mut dst = Cluster::from_backup(&source.base);
    dst.set_env(&s3.env(&codec));
    dst.recover_with_walcore(None);
    let log = fatal_then_repaired_in(&dst, &source, (&seg, &seg), "a hole in S3", || {
        s3.tamper(&missing, &repo.read(&missing).expect("the missing object"));
    });
    assert!(
        log.lines()
            .any(|l| l.contains("hole in the archive") && l.contains(&seg) && l.contains(&next)),
        "walcore did not report the hole in S3\n--- server log ---\n{log}"
    );
}
