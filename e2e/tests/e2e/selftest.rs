//! The harness proves itself with plain shell commands (`cp`) as archive and restore commands:
//! if this fails, the harness or the machine is broken, not walcore.

use walcore_e2e::workload::fingerprint;
use walcore_e2e::{Cluster, sys};

use crate::scenario::{self, assert_promoted, assert_restored_from_archive};

#[test]
fn shell_cp_archive_then_point_in_time_recovery() {
    let store = sys::server_tempdir("wccp");
    let dir = store.path().display();
    let src = Cluster::new();
    src.set(
        "archive_command",
        &format!("test ! -f {dir}/%f && cp %p {dir}/%f"),
    );
    let s = scenario::pitr_source(src, 70_000);
    assert!(s.a_segments.len() >= 2, "batch A spans {:?}", s.a_segments);

    let dst = Cluster::from_backup(&s.base);
    dst.recover_with(&format!("cp {dir}/%f %p"), Some(&s.target_time));
    let outcome = scenario::run_recovery(&dst);
    assert_promoted(&dst, outcome, "cp restore_command");
    assert_restored_from_archive(&dst, &s.a_segments);
    assert_eq!(fingerprint(&dst), s.expected, "rows as of the target time");
    assert_ne!(s.expected, s.all_rows, "batch B came after the target");
    assert!(
        !dst.recovery_pending(),
        "recovery.signal removed at promotion"
    );
}

/// A failing archive command is reported within seconds, with PostgreSQL's view of it, instead
/// of a wait until the timeout.
#[test]
fn failing_archive_command_is_reported_fast() {
    let src = Cluster::new();
    src.set(
        "archive_command",
        "echo 'archiving refused by the test' >&2; exit 3",
    );
    src.start();
    walcore_e2e::workload::create_table(&src);
    let started = std::time::Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        src.archive_all(std::time::Duration::from_secs(120));
    }));
    let message = outcome
        .expect_err("archiving cannot succeed")
        .downcast::<String>()
        .map(|s| *s)
        .unwrap_or_default();
    assert!(
        message.contains("keeps failing") && message.contains("archiving refused by the test"),
        "{message}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}
