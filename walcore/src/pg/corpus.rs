//! Replays the committed seed corpora of the fuzz targets in `fuzz/` as ordinary tests, checking
//! the same property as each target (keep the two in step: `fuzz/fuzz_targets/<target>.rs`).
//!
//! `cargo fuzz` needs a nightly toolchain; these tests need only `cargo test`, so every seed
//! (and every crash input added to a corpus as a regression) runs in CI.

use std::path::PathBuf;

use super::{
    SegmentExpectations, WalFileName, WalSegmentSize, check_segment_header, parse_long_page_header,
    pg_major_for_magic,
};

/// `fuzz/corpus/<target>/` in this checkout.
pub(crate) fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Every file of `fuzz/corpus/<target>/` as (file name, contents), sorted by name. Panics if the
/// corpus is missing or empty, so that a moved corpus cannot silently test nothing.
pub(crate) fn corpus_files(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()));
    let mut files: Vec<(String, Vec<u8>)> = entries
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let bytes =
                std::fs::read(&path).unwrap_or_else(|e| panic!("seed {}: {e}", path.display()));
            (
                path.file_name()
                    .expect("file name")
                    .to_string_lossy()
                    .into_owned(),
                bytes,
            )
        })
        .collect();
    assert!(!files.is_empty(), "seed corpus {} is empty", dir.display());
    files.sort();
    files
}

#[test]
fn wal_name_corpus() {
    let mut parsed = 0;
    for (file, data) in corpus_files("wal_name") {
        super::fuzz::wal_name_property(&data);
        // Seeds named after their content are valid names; "invalid-*" seeds are not.
        let ok = std::str::from_utf8(&data).is_ok_and(|t| WalFileName::parse(t).is_ok());
        assert_eq!(ok, !file.starts_with("invalid-"), "{file}");
        parsed += usize::from(ok);
    }
    assert!(parsed > 0);
}

#[test]
fn wal_page_header_corpus() {
    for (file, data) in corpus_files("wal_page_header") {
        super::fuzz::wal_page_header_property(&data);
        if let Some(real) = file.strip_prefix("pg15-") {
            let header = parse_long_page_header(&data).expect("real header");
            assert_eq!(pg_major_for_magic(header.magic), Some(15), "{file}");
            let name = real.strip_prefix("recycled-as-").unwrap_or(real);
            let expect = SegmentExpectations {
                name: WalFileName::parse(name).expect("seed file name"),
                system_id: Some(super::test_fixtures::PG15_SYSTEM_ID),
                seg_size: Some(WalSegmentSize::DEFAULT),
            };
            let recycled = real.starts_with("recycled-as-");
            assert_eq!(
                check_segment_header(&data, &expect).is_err(),
                recycled,
                "{file}"
            );
        }
    }
}
