//! The index gives the answers of reading every object, whatever happened before: records
//! committed, removed, buried and corrupted, pins and unpins, index objects deleted or
//! garbled (property test on a local repository written through the library).

use std::time::{Duration, SystemTime};

use proptest::prelude::*;

use super::*;
use crate::backup::catalog::{catalog_key, sample_record};
use crate::codec::{Codec, Compression};
use crate::pg::WalSegmentSize;
use crate::repo::RepoMeta;
use crate::store::{LocalStore, Store};

const SYSTEM: u64 = 7_000_000_000_000_000_002;
const IDS: [&str; 5] = [
    "20260101T000000Z-0001",
    "20260201T000000Z-0002",
    "20260301T000000Z-0003",
    "20260401T000000Z-0004",
    "20260501T000000Z-0005",
];

#[derive(Debug, Clone)]
enum Op {
    Commit(usize),
    Remove(usize),
    Bury(usize),
    Corrupt(usize),
    Pin(usize),
    Unpin(usize),
    DeleteIndex,
    GarbleIndex,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..IDS.len()).prop_map(Op::Commit),
        1 => (0..IDS.len()).prop_map(Op::Remove),
        1 => (0..IDS.len()).prop_map(Op::Bury),
        1 => (0..IDS.len()).prop_map(Op::Corrupt),
        2 => (0..IDS.len()).prop_map(Op::Pin),
        1 => (0..IDS.len()).prop_map(Op::Unpin),
        1 => Just(Op::DeleteIndex),
        1 => Just(Op::GarbleIndex),
    ]
}

async fn repository(root: &std::path::Path) -> Repository {
    let repo = Repository::new(
        Store::Local(LocalStore::new(root.to_path_buf())),
        Codec::new(Compression::None, None),
        Duration::from_secs(1),
    );
    repo.init_meta(RepoMeta::new(
        SYSTEM,
        15,
        WalSegmentSize::new(16 << 20).expect("size"),
    ))
    .await
    .expect("meta");
    repo
}

/// What a listing answers, comparable.
fn answer(l: &Listing) -> (Vec<BackupRecord>, Vec<String>, Vec<String>) {
    (
        l.records.clone(),
        l.tombstones.clone(),
        l.unreadable_ids.clone(),
    )
}

async fn apply(repo: &Repository, root: &std::path::Path, op: &Op, clock: &mut SystemTime) {
    *clock += Duration::from_secs(1);
    match op {
        Op::Commit(i) => {
            let _ = catalog::commit(repo, &sample_record(IDS[*i], &SYSTEM.to_string())).await;
        }
        Op::Remove(i) => catalog::remove(repo, IDS[*i]).await.expect("remove"),
        Op::Bury(i) => {
            let _ = catalog::bury(repo, IDS[*i], "a test").await;
        }
        Op::Corrupt(i) => {
            let path = root.join(catalog_key(IDS[*i]));
            if path.exists() {
                std::fs::write(&path, b"not an envelope").expect("corrupt");
            }
        }
        Op::Pin(i) => {
            let _ = pins::pin_at(repo, IDS[*i], "kept", *clock).await;
        }
        Op::Unpin(i) => {
            let _ = pins::unpin_at(repo, IDS[*i], *clock).await;
        }
        Op::DeleteIndex => {
            for key in index_keys(repo).await.expect("index keys") {
                repo.store().delete(&key).await.expect("delete index");
            }
        }
        Op::GarbleIndex => {
            let key = next_name(INDEX_PREFIX, &[], *clock + Duration::from_secs(3600));
            let path = root.join(&key);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
            std::fs::write(&path, b"garbage").expect("garble");
        }
    }
}

async fn check(repo: &Repository) -> Result<(), TestCaseError> {
    let direct = catalog::scan_direct(repo).await.expect("scan_direct");
    let indexed = catalog::scan(repo).await.expect("scan");
    prop_assert_eq!(answer(&indexed), answer(&direct));
    // A second use answers from the index it just wrote: the same again.
    let again = catalog::scan(repo).await.expect("scan");
    prop_assert_eq!(answer(&again), answer(&direct));
    let pins_direct = pins::states_direct(repo).await.ok();
    let pins_indexed = pins::states(repo).await.ok();
    prop_assert_eq!(pins_indexed, pins_direct);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn index_answers_equal_reading_every_object(ops in prop::collection::vec(op(), 1..14)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("dir");
            let repo = repository(dir.path()).await;
            let mut clock = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            for op in &ops {
                apply(&repo, dir.path(), op, &mut clock).await;
                check(&repo).await?;
            }
            Ok::<(), TestCaseError>(())
        })?;
    }
}

#[tokio::test]
async fn a_second_listing_reads_no_record_again() {
    let dir = tempfile::tempdir().expect("dir");
    let repo = repository(dir.path()).await;
    for id in IDS {
        catalog::commit(&repo, &sample_record(id, &SYSTEM.to_string()))
            .await
            .expect("commit");
    }
    let first = catalog::scan(&repo).await.expect("scan");
    assert_eq!(first.records.len(), IDS.len());
    assert_eq!(index_keys(&repo).await.expect("keys").len(), 1);
    // Records the index holds are not read: make them unreadable behind its back, keeping
    // size and time, and the answer comes from the index.
    for id in IDS {
        let path = dir.path().join(catalog_key(id));
        let meta = std::fs::metadata(&path).expect("stat");
        let len = meta.len() as usize;
        let mtime = meta.modified().expect("mtime");
        std::fs::write(&path, vec![0u8; len]).expect("rewrite");
        let f = std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open");
        f.set_modified(mtime).expect("set mtime");
    }
    let second = catalog::scan(&repo).await.expect("scan");
    assert_eq!(second.records, first.records);
    assert!(second.unreadable.is_empty());
    // With the index gone, every record is read again, and found unreadable.
    for key in index_keys(&repo).await.expect("keys") {
        repo.store().delete(&key).await.expect("delete");
    }
    let third = catalog::scan(&repo).await.expect("scan");
    assert_eq!(third.unreadable.len(), IDS.len());
}

#[tokio::test]
async fn reindex_replaces_every_older_index() {
    let dir = tempfile::tempdir().expect("dir");
    let repo = repository(dir.path()).await;
    catalog::commit(&repo, &sample_record(IDS[0], &SYSTEM.to_string()))
        .await
        .expect("commit");
    catalog::scan(&repo).await.expect("scan");
    let done = reindex(&repo).await.expect("reindex");
    assert_eq!(done.records, 1);
    assert_eq!(done.removed, 1);
    let keys = index_keys(&repo).await.expect("keys");
    assert_eq!(keys, vec![done.key.expect("a key")]);
}

#[derive(Debug, Clone)]
enum WalOp {
    /// A segment `back` behind the newest of timeline `tli` (look-ahead archiving stores
    /// segments a little out of order), or a new newest one when `back` is 0.
    Push {
        tli: u32,
        back: u64,
        size: u64,
    },
    /// The next segment after a jump of `ahead` (new log directories).
    Jump {
        tli: u32,
        ahead: u64,
    },
    /// A `.partial` or a `.backup` beside the newest segment.
    Beside {
        tli: u32,
        backup: bool,
    },
    /// `expire` deleting the oldest `n` objects of a timeline.
    Expire {
        tli: u32,
        n: usize,
    },
    DeleteIndex,
}

fn wal_op() -> impl Strategy<Value = WalOp> {
    prop_oneof![
        6 => (1..=2u32, prop_oneof![3 => Just(0u64), 1 => 1..48u64], 1..5000u64)
            .prop_map(|(tli, back, size)| WalOp::Push { tli, back, size }),
        1 => (1..=2u32, 1..700u64).prop_map(|(tli, ahead)| WalOp::Jump { tli, ahead }),
        1 => (1..=2u32, any::<bool>()).prop_map(|(tli, backup)| WalOp::Beside { tli, backup }),
        1 => (1..=2u32, 1..40usize).prop_map(|(tli, n)| WalOp::Expire { tli, n }),
        1 => Just(WalOp::DeleteIndex),
    ]
}

fn seg_name(tli: u32, segno: u64) -> crate::pg::WalFileName {
    crate::pg::WalFileName::segment(
        crate::pg::TimelineId(tli),
        crate::pg::SegmentNo(segno),
        WalSegmentSize::new(16 << 20).expect("size"),
    )
}

async fn apply_wal(repo: &Repository, op: &WalOp, heads: &mut [u64; 3]) {
    let put = |key: String, size: u64| async move {
        repo.put_small(&key, vec![7u8; size as usize])
            .await
            .expect("put");
    };
    match op {
        WalOp::Push { tli, back, size } => {
            let head = &mut heads[*tli as usize];
            let segno = if *back == 0 {
                *head += 1;
                *head
            } else {
                head.saturating_sub(*back)
            };
            put(crate::store::wal_key(&seg_name(*tli, segno)), *size).await;
        }
        WalOp::Jump { tli, ahead } => {
            let head = &mut heads[*tli as usize];
            *head += ahead;
            put(crate::store::wal_key(&seg_name(*tli, *head)), 10).await;
        }
        WalOp::Beside { tli, backup } => {
            let name = seg_name(*tli, heads[*tli as usize]).to_string();
            let name = if *backup {
                format!("{name}.00000028.backup")
            } else {
                format!("{name}.partial")
            };
            let name = crate::pg::WalFileName::parse(&name).expect("name");
            put(crate::store::wal_key(&name), 3).await;
        }
        WalOp::Expire { tli, n } => {
            let prefix = format!("wal/{tli:08X}/");
            let keys: Vec<String> = repo
                .store()
                .list(&prefix)
                .await
                .expect("list")
                .into_iter()
                .take(*n)
                .collect();
            repo.store().delete_many(&keys).await.expect("delete");
            forget_wal(repo, &keys).await;
        }
        WalOp::DeleteIndex => {
            for key in index_keys(repo).await.expect("index keys") {
                repo.store().delete(&key).await.expect("delete index");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The WAL through the index is the WAL a full listing shows, after pushes in look-ahead
    /// order, jumps to new directories, `.partial` and `.backup` files, expiries and lost
    /// index objects.
    #[test]
    fn wal_through_the_index_equals_a_full_listing(ops in prop::collection::vec(wal_op(), 1..30)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("dir");
            let repo = repository(dir.path()).await;
            repo.put_small("wal/history/00000002.history", b"1\t0/5000000\tx\n".to_vec())
                .await
                .expect("history");
            let mut heads = [0u64, 100, 100];
            for op in &ops {
                apply_wal(&repo, op, &mut heads).await;
                let listed: Vec<WalObject> = repo
                    .store()
                    .list_info("wal/")
                    .await
                    .expect("list")
                    .into_iter()
                    .map(|o| WalObject { key: o.key, size: o.size })
                    .collect();
                let indexed = wal_objects(&repo).await.expect("wal_objects");
                prop_assert_eq!(&indexed, &listed, "after {:?}", op);
                // What verify anchors from its full listing is what the index holds, and
                // status's view of the summary is the listing's.
                let all = repo.store().list_info("wal/").await.expect("list");
                let from_listing = crate::lifecycle::verify::StoredWal::from_listing(all);
                let (dirs, history) = wal_summary(&repo).await.expect("wal_summary");
                // A file system keeps a directory that expiry emptied; a listing of objects
                // cannot show it (and it holds nothing).
                let mut held = dirs.clone();
                held.values_mut().for_each(|logs| logs.retain(|_, d| *d != WalDir::default()));
                held.retain(|_, logs| !logs.is_empty());
                prop_assert_eq!(&from_listing.directories(), &held, "after {:?}", op);
                let from_index = crate::lifecycle::verify::StoredWal::from_index(&dirs, history, None);
                prop_assert_eq!(
                    from_index.segments().collect::<Vec<_>>(),
                    from_listing.segments().collect::<Vec<_>>(),
                    "after {:?}", op
                );
            }
            Ok::<(), TestCaseError>(())
        })?;
    }
}

#[test]
fn a_name_written_in_the_same_millisecond_sorts_after_the_older_one() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
    let first = next_name(INDEX_PREFIX, &[], now);
    for _ in 0..50 {
        let second = next_name(INDEX_PREFIX, std::slice::from_ref(&first), now);
        assert!(second > first, "{second} after {first}");
        assert!(is_index_key(&second), "{second}");
    }
    // An older clock than the newest name still sorts after it.
    let earlier = now - Duration::from_secs(60);
    assert!(next_name(INDEX_PREFIX, std::slice::from_ref(&first), earlier) > first);
}
