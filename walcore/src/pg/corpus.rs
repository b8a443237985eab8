//! Replays the committed seed corpora of the fuzz targets in `fuzz/` as ordinary tests, checking
//! the same property as each target (keep the two in step: `fuzz/fuzz_targets/<target>.rs`).
//!
//! `cargo fuzz` needs a nightly toolchain; these tests need only `cargo test`, so every seed
//! (and every crash input added to a corpus as a regression) runs in CI.

use std::path::PathBuf;

use super::{
    SegmentExpectations, TimelineId, WalFileName, WalSegmentSize, check_segment_header,
    parse_long_page_header, pg_major_for_magic,
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

/// The property of `fuzz/fuzz_targets/wal_name.rs`: whatever parses displays as the same text
/// and parses back to the same value.
fn wal_name_property(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(name) = WalFileName::parse(text) {
        assert_eq!(name.to_string(), text);
        assert_eq!(WalFileName::parse(&name.to_string()).as_ref(), Ok(&name));
    }
}

/// The property of `fuzz/fuzz_targets/wal_page_header.rs`: parsing never panics; what parses
/// re-encodes to the same 40 bytes (padding after `xlp_rem_len` aside, which PostgreSQL zeroes
/// and never reads); and checking it against the segment its own fields name passes exactly when
/// the self-contained checks pass.
fn wal_page_header_property(data: &[u8]) {
    let Ok(header) = parse_long_page_header(data) else {
        assert!(data.len() < 40);
        return;
    };
    let mut expected = [0u8; 40];
    expected.copy_from_slice(&data[..40]);
    expected[20..24].fill(0);
    assert_eq!(header.encode(), expected);

    let (Ok(size), 1..) = (WalSegmentSize::new(header.seg_size), header.timeline.0) else {
        return;
    };
    let segno = header.page_addr.segment(size);
    let expect = SegmentExpectations {
        name: WalFileName::segment(header.timeline, segno, size),
        system_id: Some(header.system_id),
        seg_size: Some(size),
    };
    let self_consistent = pg_major_for_magic(header.magic).is_some()
        && header.is_long()
        && header.block_size.is_power_of_two()
        && (1024..=65536).contains(&header.block_size)
        && header.page_addr.segment_offset(size) == 0;
    let checked = check_segment_header(data, &expect);
    assert_eq!(checked.is_ok(), self_consistent, "{checked:?}");
    // A later timeline in the name is always acceptable (the segment was copied forward).
    if self_consistent && header.timeline.0 < u32::MAX {
        let later = SegmentExpectations {
            name: WalFileName::segment(TimelineId(header.timeline.0 + 1), segno, size),
            ..expect
        };
        assert_eq!(check_segment_header(data, &later), Ok(header));
    }
}

#[test]
fn wal_name_corpus() {
    let mut parsed = 0;
    for (file, data) in corpus_files("wal_name") {
        wal_name_property(&data);
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
        wal_page_header_property(&data);
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
