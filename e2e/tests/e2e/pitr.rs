//! Point-in-time recovery through walcore: a cluster archives with `walcore-archive`, a base
//! backup taken before batch A is restored with `walcore-restore` as `restore_command` to a
//! target time between batch A and batch B, and the restored rows are exactly batch A.
//!
//! Four configurations: {file, S3} × {no encryption, encryption}, with the compression varied
//! too (default `zstd:3`, and `none` on S3 without encryption).

use walcore_e2e::repo::{self, Codec, KEY_1, wal_key};
use walcore_e2e::workload::fingerprint;
use walcore_e2e::{Cluster, Moto, Repo, moto, sys};

use crate::scenario::{self, ROWS_A, assert_promoted, assert_restored_from_archive};

/// The envelope's magic (FORMAT.md §3.1).
const MAGIC: &[u8] = b"WALCORE\0";

fn pitr(repo: &Repo, codec: &Codec) {
    let mut src = Cluster::new();
    src.archive_with_walcore();
    src.set_env(&repo.env(codec));
    let s = scenario::pitr_source(src, ROWS_A);
    assert!(
        s.a_segments.len() >= 3,
        "batch A should span several segments: {:?}",
        s.a_segments
    );

    // The archive holds every segment of batch A, as envelopes, encrypted when asked to be.
    for seg in &s.a_segments {
        let obj = repo
            .read(&wal_key(seg))
            .unwrap_or_else(|| panic!("{seg} is not in the repository: {:?}", repo.keys()));
        assert!(
            obj.starts_with(MAGIC),
            "{seg}: stored object is not a walcore envelope"
        );
        assert_eq!(
            obj.get(11).copied(),
            Some(u8::from(codec.key.is_some())),
            "{seg}: cipher byte of the envelope header"
        );
        if let Some(key) = codec.key {
            assert!(
                !repo::contains_ascii(&obj, key),
                "{seg}: the key itself is in the object"
            );
        }
    }
    check_plaintext_at_rest(repo, codec, &s.cluster, &s.a_segments);
    let keys = repo.keys();
    assert!(
        keys.iter().any(|k| k == repo::META_KEY),
        "no repository metadata at {}: {keys:?}",
        repo::META_KEY
    );
    assert!(
        keys.iter().any(|k| k.ends_with(".backup")),
        "the base backup's history file (.backup) was not archived: {keys:?}"
    );

    let mut dst = Cluster::from_backup(&s.base);
    dst.set_env(&repo.env(codec));
    dst.recover_with_walcore(Some(&s.target_time));
    let outcome = scenario::run_recovery(&dst);
    assert_promoted(&dst, outcome, "PITR with walcore-restore");
    assert_restored_from_archive(&dst, &s.a_segments);
    let log = dst.server_log();
    assert!(
        log.contains("recovery stopping before commit of transaction"),
        "recovery did not stop at the target\n{}",
        sys::tail(&log, 60)
    );
    assert_eq!(
        fingerprint(&dst),
        s.expected,
        "restored rows differ from the rows as of {} (the source ended with {})",
        s.target_time,
        s.all_rows
    );
    assert!(
        !dst.recovery_pending(),
        "recovery.signal left after promotion"
    );
}

/// With compression off, a payload of batch A is visible in the stored objects exactly when
/// encryption is off. (`archive_matrix::*::encryption_hides_the_plaintext` checks the encrypted
/// side on one segment: encrypting uncompressed segments is slow in debug builds.)
fn check_plaintext_at_rest(repo: &Repo, codec: &Codec, src: &Cluster, segments: &[String]) {
    if codec.compression != Some("none") {
        return;
    }
    let needle = src.psql(&format!("select md5('A' || {})", ROWS_A / 2));
    let found = segments.iter().any(|seg| {
        repo.read(&wal_key(seg))
            .is_some_and(|obj| repo::contains_ascii(&obj, &needle))
    });
    assert_eq!(
        found,
        codec.key.is_none(),
        "row payload {needle} {} in the stored objects (encryption {})",
        if found { "visible" } else { "not found" },
        if codec.key.is_some() { "on" } else { "off" }
    );
}

#[test]
fn file_zstd_no_encryption() {
    pitr(&Repo::file(), &Codec::plain());
}

#[test]
fn file_zstd_encrypted() {
    pitr(&Repo::file(), &Codec::encrypted(KEY_1));
}

#[test]
fn s3_uncompressed_no_encryption() {
    if !moto::s3_enabled("pitr::s3_uncompressed_no_encryption") {
        return;
    }
    pitr(
        &Repo::s3(Moto::shared()),
        &Codec::plain().compression("none"),
    );
}

#[test]
fn s3_zstd_encrypted() {
    if !moto::s3_enabled("pitr::s3_zstd_encrypted") {
        return;
    }
    pitr(&Repo::s3(Moto::shared()), &Codec::encrypted(KEY_1));
}
