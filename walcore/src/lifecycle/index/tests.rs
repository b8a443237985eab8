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
            let key = new_index_key(*clock + Duration::from_secs(3600));
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
