//! The steps the tests share: a source cluster that archives, a base backup, batches of rows,
//! and recoveries from the base backup.

use std::time::Duration;

use walcore_e2e::repo::segments_between;
use walcore_e2e::workload::{create_table, fingerprint, insert_batch};
use walcore_e2e::{BaseBackup, Cluster, Recovery, sys};

/// How long archiving may take to catch up.
pub const ARCHIVE_WAIT: Duration = Duration::from_secs(180);
/// How long a recovery may take to end one way or the other.
pub const RECOVERY_WAIT: Duration = Duration::from_secs(180);

/// Rows in batch A: about 3.5 segments of WAL.
pub const ROWS_A: u32 = 200_000;
/// Rows in batch B (after the target time).
pub const ROWS_B: u32 = 5_000;

/// A source cluster after the PITR scenario: base backup, batch A, target time, batch B, all
/// archived.
pub struct PitrSource {
    pub cluster: Cluster,
    pub base: BaseBackup,
    /// `clock_timestamp()` between the commits of batch A and batch B.
    pub target_time: String,
    /// Rows as of the target time: batch A only.
    pub expected: String,
    /// The rows at the end: A and B.
    pub all_rows: String,
    /// The segments batch A was written to.
    pub a_segments: Vec<String>,
}

/// Runs the PITR scenario on `cluster` (configured, not started): table, base backup (before
/// batch A, so that recovery must replay batch A from the archive), batch A, target time, batch
/// B, switch and wait until archived.
pub fn pitr_source(cluster: Cluster, rows_a: u32) -> PitrSource {
    let t0 = std::time::Instant::now();
    cluster.start();
    create_table(&cluster);
    let base = cluster.base_backup();
    eprintln!("[{:?}] base backup taken", t0.elapsed());
    let a_first = cluster.current_wal_file();
    insert_batch(&cluster, "A", rows_a);
    let a_last = cluster.current_wal_file();
    eprintln!(
        "[{:?}] batch A written ({a_first} to {a_last})",
        t0.elapsed()
    );
    let expected = fingerprint(&cluster);
    std::thread::sleep(Duration::from_millis(1100));
    let target_time = cluster.psql("select clock_timestamp()");
    std::thread::sleep(Duration::from_millis(1100));
    insert_batch(&cluster, "B", ROWS_B);
    let all_rows = fingerprint(&cluster);
    let last = cluster.archive_all(ARCHIVE_WAIT);
    eprintln!("[{:?}] archived up to {last}", t0.elapsed());
    PitrSource {
        cluster,
        base,
        target_time,
        expected,
        all_rows,
        a_segments: segments_between(&a_first, &a_last),
    }
}

/// A source for fault tests: table, base backup, one batch of `rows` spread over several
/// segments, all archived, server stopped.
pub struct FaultSource {
    pub base: BaseBackup,
    pub expected: String,
    /// The segments written after the base backup, in order.
    pub segments: Vec<String>,
}

impl FaultSource {
    pub fn new(cluster: Cluster, rows: u32) -> FaultSource {
        cluster.start();
        create_table(&cluster);
        let base = cluster.base_backup();
        let first = cluster.current_wal_file();
        insert_batch(&cluster, "A", rows);
        let expected = fingerprint(&cluster);
        let last = cluster.archive_all(ARCHIVE_WAIT);
        cluster.stop();
        FaultSource {
            base,
            expected,
            segments: segments_between(&first, &last),
        }
    }

    /// A segment in the middle of the archived run (neither the first nor the last).
    pub fn middle_segment(&self) -> &str {
        assert!(
            self.segments.len() >= 3,
            "need at least 3 segments after the base backup, got {:?}",
            self.segments
        );
        &self.segments[self.segments.len() / 2]
    }
}

/// Starts `cluster` (prepared for recovery) and waits for the outcome.
pub fn run_recovery(cluster: &Cluster) -> Recovery {
    let t0 = std::time::Instant::now();
    cluster.start_no_wait();
    let outcome = cluster.wait_recovery_end(RECOVERY_WAIT);
    eprintln!("recovery: {outcome:?} after {:?}", t0.elapsed());
    outcome
}

/// Asserts that a recovery promoted, showing the server log if not.
pub fn assert_promoted(cluster: &Cluster, outcome: Recovery, what: &str) {
    assert_eq!(
        outcome,
        Recovery::Promoted,
        "{what}: recovery did not complete\n--- server log ---\n{}",
        sys::tail(&cluster.server_log(), 80)
    );
}

/// Asserts that the server log shows each of `segments` restored from the archive.
pub fn assert_restored_from_archive(cluster: &Cluster, segments: &[String]) {
    let log = cluster.server_log();
    for seg in segments {
        assert!(
            log.contains(&format!("restored log file \"{seg}\" from archive")),
            "{seg} was not restored from the archive\n--- server log ---\n{}",
            sys::tail(&log, 80)
        );
    }
}
