//! Long and interrupted transfers to and from S3 (moto behind the fault proxy).
//!
//! A download that keeps moving is never cut by `WALCORE_REQUEST_TIMEOUT`, however long it
//! takes; a body cut mid-stream is resumed from the next byte of the same object, within a
//! retry window counted from the last byte that arrived; an object replaced meanwhile is an
//! error, never a splice. A multipart upload that fails or is abandoned is aborted, and the
//! error a user reads is the store's.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use walcore_e2e::repo::{Codec, wal_key};
use walcore_e2e::workload::{create_table, fingerprint, insert_batch};
use walcore_e2e::{Cluster, Fault, FaultProxy, Moto, Repo, bins, http, moto};

use crate::archive_matrix::{describe, dest_dir, name_of, samples};
use crate::backup::{Tool, empty_cluster, prepare_restored};
use crate::scenario::{self, ARCHIVE_WAIT, assert_promoted};

/// The request limit of these tests: every download below takes several times longer.
const REQUEST_TIMEOUT: &str = "1s";

/// The environment of the binaries reaching `repo` through `proxy`, with the short limit.
fn slow_env(repo: &Repo, codec: &Codec, proxy: &FaultProxy) -> Vec<(String, String)> {
    let mut env = repo.env_at(codec, Some(&proxy.endpoint()));
    env.push((
        "WALCORE_REQUEST_TIMEOUT".to_string(),
        REQUEST_TIMEOUT.to_string(),
    ));
    env
}

/// Archives the first two sample segments uncompressed (so each object is a full 16 MiB) into
/// a fresh S3 repository; returns the repository, the codec and the first object's size.
fn wal_repository(moto: &Moto) -> (Repo, Codec, u64) {
    let s = samples();
    let repo = Repo::s3(moto);
    let codec = Codec::plain().compression("none");
    let env = repo.env(&codec);
    for seg in &s.segments[..2] {
        let out = bins::archive(&env, seg);
        assert_eq!(out.code(), Some(0), "{}", describe("archiving", &out));
    }
    let size = repo
        .read(&wal_key(&name_of(&s.segments[0])))
        .expect("the first segment is archived")
        .len() as u64;
    (repo, codec, size)
}

/// A restore of a WAL segment whose body is cut twice, on a link so slow that the download
/// takes longer than both the request limit and the retry window: resumed each time, and the
/// segment PostgreSQL gets is the archived one, byte for byte.
#[test]
fn wal_segment_cut_mid_download_is_resumed_byte_identical() {
    if !moto::s3_enabled("downloads::wal_segment_cut_mid_download_is_resumed_byte_identical") {
        return;
    }
    let s = samples();
    let moto = Moto::shared();
    let (repo, codec, size) = wal_repository(moto);
    let name = name_of(&s.segments[0]);
    let proxy = FaultProxy::start(moto.addr());
    // About 5 s for the whole object; cut after 2/5 of it, twice (at about 2 s and 4 s).
    proxy.throttle(Some(size / 5));
    proxy.cut(&name, size * 2 / 5, 2);
    let env = slow_env(&repo, &codec, &proxy);

    let dest = dest_dir();
    let target = dest.path().join("RECOVERYXLOG");
    let out = bins::restore(&env, &name, &target);
    assert_eq!(
        out.code(),
        Some(0),
        "{}",
        describe(
            "restoring through a slow link that cuts the body twice",
            &out
        )
    );
    assert_eq!(proxy.cuts(), 2, "the proxy did not cut the download twice");
    let restored = std::fs::read(&target).expect("the restored segment");
    let original = std::fs::read(&s.segments[0]).expect("the sample segment");
    assert!(
        restored == original,
        "the restored segment differs from the archived one ({} bytes, expected {})",
        restored.len(),
        original.len()
    );
    // The download outlasted the retry window (3 s) counted from its start: the window counts
    // from the last byte, and the request limit (1 s) from the last byte too.
    assert!(
        out.elapsed > Duration::from_secs(4),
        "the download took only {:?}: the test's link is not slow enough to mean anything",
        out.elapsed
    );
    eprintln!(
        "restored {size} bytes in {:?} with 2 cuts; stderr:\n{}",
        out.elapsed, out.stderr
    );
}

/// A body cut while the object is replaced (a repository rewritten behind walcore's back) is
/// not resumed from the new object (`If-Match` fails, walcore says the object was replaced).
/// A retry of the whole restore may read the new object from its start; here it holds another
/// segment, which verification refuses: the restore fails above 125 and PostgreSQL gets
/// nothing.
#[test]
fn an_object_replaced_mid_download_is_never_spliced() {
    if !moto::s3_enabled("downloads::an_object_replaced_mid_download_is_never_spliced") {
        return;
    }
    let s = samples();
    let moto = Moto::shared();
    let (repo, codec, size) = wal_repository(moto);
    let first = wal_key(&name_of(&s.segments[0]));
    let other = repo
        .read(&wal_key(&name_of(&s.segments[1])))
        .expect("the second segment is archived");
    let proxy = FaultProxy::start(moto.addr());
    let name = name_of(&s.segments[0]);
    let replace = {
        let url = repo.url();
        let bucket = url
            .strip_prefix("s3://")
            .and_then(|r| r.split('/').next())
            .expect("an s3:// URL")
            .to_string();
        let key = format!("cluster-a/{first}");
        let addr = moto.addr();
        move || moto::object_put(addr, &bucket, &key, &other)
    };
    proxy.cut_then(&name, size / 2, 1, Some(Box::new(replace)));
    let env = slow_env(&repo, &codec, &proxy);
    let dest = dest_dir();
    let target = dest.path().join("RECOVERYXLOG");
    let out = bins::restore(&env, &name, &target);
    assert_eq!(proxy.cuts(), 1, "the proxy did not cut the download");
    assert!(
        out.code().is_some_and(|c| c > 125),
        "{}",
        describe("restoring an object replaced mid-download", &out)
    );
    assert!(
        out.stderr.contains("replaced"),
        "walcore does not say the object was replaced:\n{}",
        out.stderr
    );
    assert!(
        !target.exists(),
        "a spliced segment was handed to PostgreSQL"
    );
    eprintln!("replaced mid-download: {}", out.stderr);
}

/// A base backup whose archive takes several times `WALCORE_REQUEST_TIMEOUT` (and twice the
/// retry window) to download restores, and the cluster starts with every row.
#[test]
fn backup_download_slower_than_the_request_limit_restores_every_row() {
    if !moto::s3_enabled(
        "downloads::backup_download_slower_than_the_request_limit_restores_every_row",
    ) {
        return;
    }
    let moto = Moto::shared();
    let repo = Repo::s3(moto);
    let codec = Codec::plain().compression("none");
    let env = repo.env(&codec);
    let mut src = Cluster::new();
    src.archive_with_walcore();
    src.set_env(&env);
    src.start();
    create_table(&src);
    insert_batch(&src, "pre", 30_000);
    let tool = Tool::new(&src, env.clone());
    let id = tool.take(&src, &[]);
    insert_batch(&src, "post", 3_000);
    let expected = fingerprint(&src);
    src.archive_all(ARCHIVE_WAIT);

    let key = format!("backup/{id}/data/base.tar");
    let size = repo
        .read(&key)
        .unwrap_or_else(|| panic!("no {key}: {:?}", repo.keys()))
        .len() as u64;
    let proxy = FaultProxy::start(moto.addr());
    // About 6 s for the archive: six times the request limit, twice the retry window.
    proxy.throttle(Some((size / 6).max(1)));
    // The same installed program with the slow environment (installing it twice into one
    // directory would copy the binary onto its own hard link).
    let slow = Tool {
        program: tool.program.clone(),
        env: slow_env(&repo, &codec, &proxy),
        cwd: tool.cwd.clone(),
    };
    let mut dst = empty_cluster(15);
    let restore_bin = dst.install(bins::RESTORE);
    let data = dst.data.to_string_lossy().into_owned();
    let program = restore_bin.to_string_lossy().into_owned();
    let started = Instant::now();
    let out = slow.run(&["restore", "--pgdata", &data, "--restore-program", &program]);
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "restoring a {size}-byte archive at {} bytes/s with a {REQUEST_TIMEOUT} request limit \
         failed after {took:?}:\n{}{}",
        size / 6,
        out.stdout,
        out.stderr
    );
    assert!(
        proxy.request_lines().iter().any(|l| l.contains(&key)),
        "the archive {key} was not downloaded through the slow proxy; requests: {:?}\n{}",
        proxy.request_lines(),
        out.stdout
    );
    assert!(
        took > Duration::from_secs(4),
        "the restore took only {took:?}: the link is not slow enough to mean anything"
    );
    eprintln!("restored backup {id} ({size}-byte archive) in {took:?}");

    // Recovery reads the WAL straight from the store.
    prepare_restored(&mut dst, &env);
    let outcome = scenario::run_recovery(&dst);
    assert_promoted(&dst, outcome, "restored through a slow link");
    assert_eq!(fingerprint(&dst), expected, "rows after the restore");
}

/// Uploads in progress in `bucket` (S3's ListMultipartUploads), as their upload IDs.
fn multipart_uploads(addr: SocketAddr, bucket: &str) -> Vec<String> {
    let r = http::request(addr, "GET", &format!("/{bucket}?uploads"), b"")
        .unwrap_or_else(|e| panic!("list the multipart uploads of {bucket}: {e}"));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    String::from_utf8_lossy(&r.body)
        .split("<UploadId>")
        .skip(1)
        .filter_map(|s| s.split_once("</UploadId>").map(|(id, _)| id.to_string()))
        .collect()
}

/// Waits until no multipart upload is left in `bucket` (an abort may be on its way); panics
/// with `what` and the uploads left.
fn assert_no_upload_left(addr: SocketAddr, bucket: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = multipart_uploads(addr, bucket);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: multipart uploads left in the store (parts kept and billed): {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A store reaching moto through `proxy`, as an embedding program would open it.
fn store_through(
    proxy: &FaultProxy,
    bucket: &str,
    request_timeout: Duration,
) -> walcore::store::Store {
    let options = walcore::store::StoreOptions {
        retry_time: Duration::from_secs(3),
        request_timeout,
        cloud_options: vec![
            ("aws_endpoint".into(), proxy.endpoint()),
            ("aws_allow_http".into(), "true".into()),
            ("aws_access_key_id".into(), "test".into()),
            ("aws_secret_access_key".into(), "test".into()),
            ("aws_region".into(), "us-east-1".into()),
        ],
        ..Default::default()
    };
    walcore::store::Store::from_url(&format!("s3://{bucket}/cluster-a"), &options)
        .expect("S3 store")
}

/// Writes `mib` MiB through `store` under `key`; the producer fails at the end when `fail`.
async fn put_large(
    store: &walcore::store::Store,
    key: &str,
    mib: usize,
    fail: bool,
) -> Result<walcore::store::PutOutcome, walcore::Error> {
    use walcore::{Error, ErrorKind};
    let (outcome, ()) = store
        .put_create_with(key, move |w| {
            let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
            for _ in 0..mib {
                w.write_all(&block)
                    .map_err(|e| Error::new(ErrorKind::LocalIo, e.to_string()))?;
            }
            if fail {
                return Err(Error::new(ErrorKind::InvalidInput, "producer failed late"));
            }
            Ok(())
        })
        .await?;
    Ok(outcome)
}

/// A part upload the store refuses stops the upload, which is aborted (no parts left behind),
/// and the error names the store's refusal, not the encoder's "the upload stopped". Likewise
/// for a producer that fails, and for an upload abandoned mid-way (its future dropped).
#[test]
fn failed_multipart_uploads_are_aborted_and_report_the_store_error() {
    if !moto::s3_enabled(
        "downloads::failed_multipart_uploads_are_aborted_and_report_the_store_error",
    ) {
        return;
    }
    let moto = Moto::shared();
    let bucket = moto.create_bucket();
    let proxy = FaultProxy::start(moto.addr());
    let store = store_through(&proxy, &bucket, Duration::from_secs(5));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let key = "backup/b1/data/base.tar";

    // The store refuses the second part.
    proxy.fail_each("partNumber=2", Fault::Forbidden);
    let err = rt
        .block_on(put_large(&store, key, 40, false))
        .expect_err("an upload whose part was refused succeeded");
    let text = format!("{err:#}");
    eprintln!("refused part: {text}");
    assert!(proxy.faulted() > 0, "the proxy never refused a part");
    assert!(
        !text.contains("the upload stopped"),
        "the error hides the store's: {text}"
    );
    assert!(
        text.contains("403") || text.contains("Access Denied") || text.contains("AccessDenied"),
        "the error does not name the store's refusal: {text}"
    );
    assert!(text.contains(key), "the error does not name {key}: {text}");
    assert_no_upload_left(moto.addr(), &bucket, "a refused part");
    assert_eq!(moto.get(&bucket, &format!("cluster-a/{key}")), None);
    proxy.disarm();

    // The producer fails after several parts.
    let err = rt
        .block_on(put_large(&store, key, 30, true))
        .expect_err("a failing producer was reported as success");
    assert!(err.to_string().contains("producer failed late"), "{err:#}");
    assert_no_upload_left(moto.addr(), &bucket, "a failing producer");

    // The upload is abandoned (its future dropped, as a watchdog or a shutdown would) while a
    // part hangs.
    proxy.fail_each("partNumber=3", Fault::Stall);
    let abandoned = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(3), put_large(&store, key, 40, false)).await
    });
    assert!(
        abandoned.is_err(),
        "the stalled upload finished: {abandoned:?}"
    );
    // The runtime lives on, so the abort scheduled on drop can run.
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !multipart_uploads(moto.addr(), &bucket).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert_no_upload_left(moto.addr(), &bucket, "an abandoned upload");
    proxy.disarm();

    // And a clean upload still works through the same store.
    let outcome = rt
        .block_on(put_large(&store, key, 30, false))
        .expect("a clean upload");
    assert_eq!(outcome, walcore::store::PutOutcome::Created);
    assert_no_upload_left(moto.addr(), &bucket, "a completed upload");
}

/// A multipart upload that takes longer in total than the request limit, on a link where each
/// part takes well under it, completes: the limit bounds each request, not the whole upload.
#[test]
fn multipart_upload_longer_than_the_request_limit_completes() {
    if !moto::s3_enabled("downloads::multipart_upload_longer_than_the_request_limit_completes") {
        return;
    }
    let moto = Moto::shared();
    let bucket = moto.create_bucket();
    let proxy = FaultProxy::start(moto.addr());
    // 8 MiB parts at 6 MiB/s: about 1.3 s each, four at a time; 96 MiB in about 4 s.
    proxy.throttle(Some(6 << 20));
    let limit = Duration::from_secs(3);
    let store = store_through(&proxy, &bucket, limit);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let key = "backup/b2/data/base.tar";
    let started = Instant::now();
    let outcome = rt
        .block_on(put_large(&store, key, 96, false))
        .unwrap_or_else(|e| {
            panic!(
                "a slow 96 MiB upload failed after {:?}: {e:#}",
                started.elapsed()
            )
        });
    let took = started.elapsed();
    assert_eq!(outcome, walcore::store::PutOutcome::Created);
    assert!(
        took > limit,
        "the upload took only {took:?}: the link is not slow enough to mean anything"
    );
    let size = rt
        .block_on(store.head(key))
        .expect("head")
        .expect("the object is stored");
    assert_eq!(size, 96 << 20);
    assert_no_upload_left(moto.addr(), &bucket, "a completed slow upload");
    eprintln!("uploaded 96 MiB in {took:?} with a {limit:?} request limit");
}
