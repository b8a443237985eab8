//! The properties the fuzz targets in `fuzz/` check, here so that the targets and the corpus
//! replay tests (`corpus.rs`) run the very same code. Not part of the stable API.

use super::{
    SegmentExpectations, TimelineId, WalFileName, WalSegmentSize, check_segment_header,
    parse_long_page_header, pg_major_for_magic,
};

/// The property of `fuzz/fuzz_targets/wal_name.rs`: whatever parses displays as the same text
/// and parses back to the same value.
pub fn wal_name_property(data: &[u8]) {
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
pub fn wal_page_header_property(data: &[u8]) {
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
