//! `expire` on a local repository written through the library: what goes, what stays, and in
//! which state a take without a record is left. (End to end on real PostgreSQL: e2e.)

use std::path::Path;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, TimeZone, Utc};

use super::*;
use crate::backup::catalog::{BackupRecord, archive_key, catalog_key, sample_record};
use crate::backup::heartbeat::{self, Beat};
use crate::codec::{Codec, Compression};
use crate::pg::SegmentNo;
use crate::repo::RepoMeta;
use crate::store::{LocalStore, Store, wal_key};

const SYSTEM: u64 = 7_000_000_000_000_000_001;
const B1: &str = "20260101T000000Z-0001";
const B2: &str = "20260601T000000Z-0002";
const B3: &str = "20261130T000000Z-0003";

fn seg_size() -> WalSegmentSize {
    WalSegmentSize::new(16 << 20).expect("size")
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0)
        .single()
        .expect("time")
}

fn segment_key(tli: u32, segno: u64) -> String {
    wal_key(&WalFileName::segment(
        TimelineId(tli),
        SegmentNo(segno),
        seg_size(),
    ))
}

fn lsn_of(segno: u64) -> Lsn {
    Lsn(segno * (16 << 20) + 0x28)
}

async fn put(repo: &Repository, key: &str) {
    repo.put_small(key, b"x".to_vec()).await.expect("put");
}

/// A repository with timeline 1 segments 1..=20, a history file of timeline 2 (which nothing
/// uses), and backups B1 (segments 2..3), B2 (8..9), B3 (15..16).
async fn setup(root: &Path) -> Repository {
    let repo = Repository::new(
        Store::Local(LocalStore::new(root.to_path_buf())),
        Codec::new(Compression::None, None),
        Duration::from_secs(1),
    );
    repo.init_meta(RepoMeta::new(SYSTEM, 15, seg_size()))
        .await
        .expect("meta");
    for segno in 1..=20 {
        put(&repo, &segment_key(1, segno)).await;
    }
    repo.put_small(
        "wal/history/00000002.history",
        b"1\t0/1C000000\tno recovery target specified\n".to_vec(),
    )
    .await
    .expect("history");
    for (id, start, stop, time) in [
        (B1, 2, 3, "2026-01-01T00:10:00.000Z"),
        (B2, 8, 9, "2026-06-01T00:10:00.000Z"),
        (B3, 15, 16, "2026-11-30T00:10:00.000Z"),
    ] {
        commit(&repo, record(id, start, stop, time)).await;
    }
    repo
}

fn record(id: &str, start: u64, stop: u64, stop_time: &str) -> BackupRecord {
    let mut r = sample_record(id, &SYSTEM.to_string());
    r.start_lsn = lsn_of(start);
    r.stop_lsn = lsn_of(stop);
    r.start_time = stop_time.replace(":10:", ":00:");
    r.stop_time = stop_time.into();
    r
}

async fn commit(repo: &Repository, r: BackupRecord) {
    for o in &r.objects {
        put(repo, &o.key).await;
    }
    put(repo, &crate::backup::catalog::manifest_key(&r.id)).await;
    catalog::commit(repo, &r).await.expect("commit");
}

/// The repository's keys but the index's (a cache any command may refresh).
async fn keys(repo: &Repository) -> Vec<String> {
    let mut keys = repo.store().list("").await.expect("list");
    keys.retain(|k| !k.starts_with(crate::lifecycle::index::INDEX_PREFIX));
    keys
}

fn policy_last(n: u32) -> Policy {
    Policy {
        keep_last: n,
        ..Policy::default()
    }
}

fn wal_segments(keys: &[String], tli: u32) -> Vec<u64> {
    keys.iter()
        .filter_map(|k| {
            let name = WalFileName::parse(k.rsplit('/').next()?).ok()?;
            (k.starts_with("wal/0") && name.is_segment() && name.timeline() == TimelineId(tli))
                .then(|| name.segno(seg_size()).ok().map(|s| s.0))
                .flatten()
        })
        .collect()
}

fn age(root: &Path, key: &str, by: Duration) {
    let file = std::fs::File::options()
        .write(true)
        .open(root.join(key))
        .expect("open");
    file.set_modified(SystemTime::from(now()) - by)
        .expect("set mtime");
}

#[tokio::test]
async fn a_dry_run_deletes_nothing_and_a_run_deletes_what_it_planned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = setup(dir.path()).await;
    pins::pin(&repo, B1, "").await.expect("pin");
    pins::unpin(&repo, B1).await.expect("unpin");
    let before = keys(&repo).await;
    let mut options = ExpireOptions::new(policy_last(1), now());
    options.dry_run = true;
    let planned = expire(&repo, &options).await.expect("dry run");
    assert_eq!(keys(&repo).await, before, "a dry run deleted something");
    assert_eq!(planned.plan.expired().collect::<Vec<_>>(), vec![B2, B1]);
    assert_eq!(planned.wal.delete, 14, "segments 1..=14 go");
    assert_eq!(
        planned.wal.runs,
        vec![WalRun {
            timeline: 1,
            first: "000000010000000000000001".into(),
            last: "00000001000000000000000E".into(),
            files: 14
        }]
    );
    assert_eq!(planned.deleted, Deleted::default());

    options.dry_run = false;
    let done = expire(&repo, &options).await.expect("expire");
    assert_eq!(done.plan, planned.plan, "the plan did not change");
    let after = keys(&repo).await;
    assert_eq!(wal_segments(&after, 1), (15..=20).collect::<Vec<_>>());
    assert!(after.contains(&"wal/history/00000002.history".to_string()));
    for gone in [B1, B2] {
        assert!(
            !after.iter().any(|k| k.contains(gone)),
            "an object of expired backup {gone} is left: {after:?}"
        );
        assert!(!dir.path().join(format!("backup/{gone}")).exists());
        assert!(!dir.path().join(format!("pins/{gone}")).exists());
    }
    assert!(after.contains(&catalog_key(B3)));
    assert!(after.contains(&archive_key(B3, "base.tar")));
    assert_eq!(done.deleted.backups, 2);
    assert_eq!(done.deleted.wal_objects, 14);
    assert_eq!(
        catalog::list(&repo).await.expect("list").len(),
        1,
        "only B3 is listed"
    );

    // Run again: nothing more to do.
    let again = expire(&repo, &options).await.expect("again");
    assert_eq!(again.deleted.backups + again.deleted.wal_objects, 0);
    assert_eq!(keys(&repo).await, after);
}

#[tokio::test]
async fn a_pinned_old_backup_keeps_only_its_own_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = setup(dir.path()).await;
    pins::pin(&repo, B1, "before the migration")
        .await
        .expect("pin");
    let done = expire(&repo, &ExpireOptions::new(policy_last(1), now()))
        .await
        .expect("expire");
    assert_eq!(done.plan.expired().collect::<Vec<_>>(), vec![B2]);
    let after = keys(&repo).await;
    let mut expected: Vec<u64> = vec![2, 3];
    expected.extend(15..=20);
    assert_eq!(wal_segments(&after, 1), expected);
    assert!(after.iter().any(|k| k.starts_with(&pins::pins_prefix(B1))));
}

#[tokio::test]
async fn leftovers_are_swept_and_a_running_take_keeps_its_objects_and_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = setup(dir.path()).await;
    // A take killed two hours ago.
    let dead = "20261130T220000Z-dead";
    for key in [archive_key(dead, "base.tar"), heartbeat::key(dead, 0)] {
        put(&repo, &key).await;
        age(dir.path(), &key, Duration::from_secs(7200));
    }
    // Its partial archive, which no listing shows.
    let partial = dir.path().join(format!(
        "backup/{dead}/data/{}base.tar.9f3c",
        crate::store::local::TEMP_PREFIX
    ));
    std::fs::write(&partial, b"half an archive").expect("partial");
    // A take running now, started at segment 5 (which the policy would expire).
    let live = "20261130T230000Z-11fe";
    put(&repo, &archive_key(live, "base.tar")).await;
    let beat = Beat {
        format_version: 1,
        backup_id: live.into(),
        seq: 1,
        time: "2026-11-30T23:59:59.000Z".into(),
        start_lsn: Some(lsn_of(5)),
        start_timeline: Some(1),
        pid: 1,
    };
    repo.put_small(
        &heartbeat::key(live, 1),
        serde_json::to_vec(&beat).expect("json"),
    )
    .await
    .expect("beat");
    for key in [archive_key(live, "base.tar"), heartbeat::key(live, 1)] {
        age(dir.path(), &key, Duration::from_secs(3));
    }

    let done = expire(&repo, &ExpireOptions::new(policy_last(1), now()))
        .await
        .expect("expire");
    let by_id = |id: &str| {
        done.orphans
            .iter()
            .find(|o| o.id == id)
            .unwrap_or_else(|| panic!("{id} is not reported: {:?}", done.orphans))
            .clone()
    };
    assert_eq!(by_id(dead).action, OrphanAction::Sweep);
    assert_eq!(by_id(live).action, OrphanAction::Running);
    assert_eq!(by_id(live).start_lsn, Some(lsn_of(5)));
    let after = keys(&repo).await;
    assert!(!after.iter().any(|k| k.contains(dead)), "{after:?}");
    assert!(
        !dir.path().join(format!("backup/{dead}")).exists(),
        "the partial archive of the killed take is left"
    );
    assert!(after.contains(&archive_key(live, "base.tar")));
    assert_eq!(
        wal_segments(&after, 1),
        (5..=20).collect::<Vec<_>>(),
        "the running take's WAL from its start is kept"
    );
    // The dead take's ID is buried for good: its record can no longer be written.
    assert!(
        !after.contains(&catalog_key(dead)),
        "the tombstone is removed"
    );
    assert!(
        !heartbeat::Heartbeat::survives(&repo, dead)
            .await
            .expect("head")
    );
}

#[tokio::test]
async fn a_running_take_that_has_not_started_holds_back_all_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = setup(dir.path()).await;
    let live = "20261130T230000Z-11fe";
    put(&repo, &heartbeat::key(live, 0)).await;
    age(dir.path(), &heartbeat::key(live, 0), Duration::from_secs(1));
    let done = expire(&repo, &ExpireOptions::new(policy_last(1), now()))
        .await
        .expect("expire");
    assert!(done.wal.held_back.is_some());
    assert_eq!(done.deleted.wal_objects, 0);
    assert_eq!(done.deleted.backups, 2, "backups still expire");
    assert_eq!(wal_segments(&keys(&repo).await, 1).len(), 20);
}

#[tokio::test]
async fn without_a_backup_no_wal_is_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = setup(dir.path()).await;
    for id in [B1, B2, B3] {
        catalog::remove(&repo, id).await.expect("remove");
    }
    let done = expire(&repo, &ExpireOptions::new(policy_last(1), now()))
        .await
        .expect("expire");
    assert!(done.wal.held_back.is_some());
    assert_eq!(wal_segments(&keys(&repo).await, 1).len(), 20);
}

#[tokio::test]
async fn no_rule_and_a_short_grace_are_refused_before_anything_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = setup(dir.path()).await;
    let before = keys(&repo).await;
    let e = expire(&repo, &ExpireOptions::new(Policy::default(), now()))
        .await
        .expect_err("no rule");
    assert_eq!(e.kind(), ErrorKind::Configuration);
    let mut options = ExpireOptions::new(policy_last(1), now());
    options.orphan_grace = Duration::from_secs(5);
    let e = expire(&repo, &options).await.expect_err("short grace");
    assert!(e.to_string().contains("orphan grace"), "{e}");
    assert_eq!(keys(&repo).await, before);
}

#[tokio::test]
async fn a_take_swept_while_stalled_cannot_record_its_backup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = setup(dir.path()).await;
    let id = "20261130T230000Z-5a11";
    assert_eq!(
        catalog::bury(&repo, id, "test").await.expect("bury"),
        Burial::Buried
    );
    assert_eq!(
        catalog::bury(&repo, id, "test").await.expect("again"),
        Burial::AlreadyBuried
    );
    assert_eq!(
        catalog::bury(&repo, B3, "test").await.expect("recorded"),
        Burial::Recorded
    );
    let e = catalog::commit(&repo, &record(id, 17, 18, "2026-11-30T23:10:00.000Z"))
        .await
        .expect_err("a buried ID cannot be recorded");
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(e.to_string().contains("was not recorded"), "{e}");
    // The tombstone is not a backup, and not an unreadable record.
    let listing = catalog::scan(&repo).await.expect("scan");
    assert_eq!(listing.records.len(), 3);
    assert!(listing.unreadable.is_empty());
    assert_eq!(listing.tombstones, vec![id.to_string()]);
}

/// A log directory whose every segment expired goes too, on a file system; the directory
/// that still holds kept WAL stays, and the index forgets the one that went.
#[tokio::test]
async fn a_log_directory_left_empty_by_expiry_is_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = setup(dir.path()).await;
    for segno in 256..=262 {
        put(&repo, &segment_key(1, segno)).await;
    }
    commit(
        &repo,
        record(
            "20261130T120000Z-0004",
            257,
            258,
            "2026-11-30T12:10:00.000Z",
        ),
    )
    .await;
    let done = expire(&repo, &ExpireOptions::new(policy_last(1), now()))
        .await
        .expect("expire");
    assert_eq!(done.deleted.wal_objects, 21, "segments 1..=20 and 256 go");
    assert!(
        !dir.path().join("wal/00000001/00000000").exists(),
        "the emptied log directory is left"
    );
    assert_eq!(
        wal_segments(&keys(&repo).await, 1),
        (257..=262).collect::<Vec<_>>()
    );
    let (dirs, _) = crate::lifecycle::index::wal_summary(&repo)
        .await
        .expect("index");
    assert_eq!(
        dirs.get("00000001")
            .map(|logs| logs.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["00000001".to_string()])
    );
}
