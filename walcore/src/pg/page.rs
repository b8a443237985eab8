//! The header at the start of every WAL page (`XLogPageHeaderData`) and the long form at the
//! start of every segment (`XLogLongPageHeaderData`), from `access/xlog_internal.h`.
//!
//! Sans-IO: functions take the bytes a caller already has. Layout (little-endian, as PostgreSQL
//! writes it on x86-64 and aarch64; the fields are native-endian in PostgreSQL):
//!
//! | offset | size | field             |                                               |
//! |-------:|-----:|-------------------|-----------------------------------------------|
//! | 0      | 2    | `xlp_magic`       | `XLOG_PAGE_MAGIC`, changes with the WAL format |
//! | 2      | 2    | `xlp_info`        | flag bits, `XLP_LONG_HEADER` = 0x0002         |
//! | 4      | 4    | `xlp_tli`         | timeline of the first record on the page      |
//! | 8      | 8    | `xlp_pageaddr`    | LSN of the page                               |
//! | 16     | 4    | `xlp_rem_len`     | bytes of a record continued from before       |
//! | 20     | 4    | (padding)         | `SizeOfXLogShortPHD` = MAXALIGN(20) = 24      |
//! | 24     | 8    | `xlp_sysid`       | system identifier from `pg_control`           |
//! | 32     | 4    | `xlp_seg_size`    | `wal_segment_size`, as a cross-check          |
//! | 36     | 4    | `xlp_xlog_blcksz` | `XLOG_BLCKSZ`, as a cross-check               |
//!
//! `SizeOfXLogLongPHD` = 40.

use super::error::{HeaderProblem, PgError};
use super::lsn::{Lsn, TimelineId, WalSegmentSize};
use super::walname::{WalFileKind, WalFileName};

/// `SizeOfXLogShortPHD`: the header of every page but a segment's first.
pub const SIZE_OF_XLOG_SHORT_PHD: usize = 24;
/// `SizeOfXLogLongPHD`: the header of the first page of a segment.
pub const SIZE_OF_XLOG_LONG_PHD: usize = 40;
/// `XLP_LONG_HEADER`: the `xlp_info` bit saying the page has a long header.
pub const XLP_LONG_HEADER: u16 = 0x0002;

/// `XLOG_PAGE_MAGIC` of each supported PostgreSQL major version, from
/// `src/include/access/xlog_internal.h` of each release branch. PostgreSQL 15's value is also
/// checked against a segment written by a real PostgreSQL 15 in this module's tests.
const XLOG_PAGE_MAGICS: [(u16, u32); 6] = [
    (0xD106, 13),
    (0xD10D, 14),
    (0xD110, 15),
    (0xD113, 16),
    (0xD116, 17),
    (0xD118, 18),
];

/// The smallest and largest `XLOG_BLCKSZ` PostgreSQL can be built with (`--with-wal-blocksize`,
/// meson `wal_blocksize`: 1 to 64 KiB, powers of two).
const MIN_WAL_BLOCK_SIZE: u32 = 1024;
const MAX_WAL_BLOCK_SIZE: u32 = 64 * 1024;

/// The PostgreSQL major version whose WAL carries `magic` as `xlp_magic` (`XLOG_PAGE_MAGIC`),
/// for the supported versions 13 to 18; `None` for any other value.
pub fn pg_major_for_magic(magic: u16) -> Option<u32> {
    XLOG_PAGE_MAGICS
        .iter()
        .find(|(known, _)| *known == magic)
        .map(|(_, major)| *major)
}

/// The fields of `XLogLongPageHeaderData`, the header of the first page of every WAL segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LongPageHeader {
    /// `xlp_magic`: `XLOG_PAGE_MAGIC`, see [`pg_major_for_magic`].
    pub magic: u16,
    /// `xlp_info`: flag bits (`XLP_LONG_HEADER`, `XLP_FIRST_IS_CONTRECORD`, ...).
    pub info: u16,
    /// `xlp_tli`: timeline of the first record on the page.
    pub timeline: TimelineId,
    /// `xlp_pageaddr`: the LSN of this page.
    pub page_addr: Lsn,
    /// `xlp_rem_len`: bytes of a record begun on an earlier page.
    pub rem_len: u32,
    /// `xlp_sysid`: the cluster's system identifier (`pg_control_system()`).
    pub system_id: u64,
    /// `xlp_seg_size`: `wal_segment_size` in bytes.
    pub seg_size: u32,
    /// `xlp_xlog_blcksz`: `XLOG_BLCKSZ`, the WAL page size.
    pub block_size: u32,
}

impl LongPageHeader {
    /// The 40 bytes PostgreSQL writes for these fields, the padding after `xlp_rem_len` zeroed
    /// (PostgreSQL zeroes a page before filling it). The inverse of [`parse_long_page_header`].
    pub fn encode(&self) -> [u8; SIZE_OF_XLOG_LONG_PHD] {
        let mut out = [0u8; SIZE_OF_XLOG_LONG_PHD];
        out[0..2].copy_from_slice(&self.magic.to_le_bytes());
        out[2..4].copy_from_slice(&self.info.to_le_bytes());
        out[4..8].copy_from_slice(&self.timeline.0.to_le_bytes());
        out[8..16].copy_from_slice(&self.page_addr.0.to_le_bytes());
        out[16..20].copy_from_slice(&self.rem_len.to_le_bytes());
        out[24..32].copy_from_slice(&self.system_id.to_le_bytes());
        out[32..36].copy_from_slice(&self.seg_size.to_le_bytes());
        out[36..40].copy_from_slice(&self.block_size.to_le_bytes());
        out
    }

    /// True if `xlp_info` has `XLP_LONG_HEADER`.
    pub fn is_long(&self) -> bool {
        self.info & XLP_LONG_HEADER != 0
    }

    /// The PostgreSQL major version that wrote the page, if the magic is known.
    pub fn pg_major(&self) -> Option<u32> {
        pg_major_for_magic(self.magic)
    }
}

/// Decodes the fields of an `XLogLongPageHeaderData` from the first 40 bytes of `bytes`
/// (more may follow; they are ignored). Checks nothing but the length: see
/// [`check_segment_header`] for validation. Never panics.
pub fn parse_long_page_header(bytes: &[u8]) -> Result<LongPageHeader, PgError> {
    let Some(header) = bytes.first_chunk::<SIZE_OF_XLOG_LONG_PHD>() else {
        return Err(PgError::TruncatedPageHeader {
            needed: SIZE_OF_XLOG_LONG_PHD,
            got: bytes.len(),
        });
    };
    let u16_at = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
    let u32_at = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let u64_at = |at: usize| u64::from(u32_at(at)) | u64::from(u32_at(at + 4)) << 32;
    Ok(LongPageHeader {
        magic: u16_at(0),
        info: u16_at(2),
        timeline: TimelineId(u32_at(4)),
        page_addr: Lsn(u64_at(8)),
        rem_len: u32_at(16),
        system_id: u64_at(24),
        seg_size: u32_at(32),
        block_size: u32_at(36),
    })
}

/// What [`check_segment_header`] compares a segment's first page with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentExpectations {
    /// The name the file was archived or requested under (a segment or `.partial`).
    pub name: WalFileName,
    /// The cluster's system identifier, if known (walcore records it in the repository).
    pub system_id: Option<u64>,
    /// The cluster's `wal_segment_size`, if known; otherwise the header's own value is used.
    pub seg_size: Option<WalSegmentSize>,
}

/// Checks that `first_page` (at least the first 40 bytes of a WAL segment file) is the start of
/// the segment `expect.name` names, from the expected cluster. The checks mirror what
/// PostgreSQL's `XLogReaderValidatePageHeader` does for a segment's first page; the first that
/// fails is returned, naming the file:
///
/// 1. `xlp_magic` is a known `XLOG_PAGE_MAGIC` ([`pg_major_for_magic`]);
/// 2. `xlp_info` has `XLP_LONG_HEADER`;
/// 3. `xlp_seg_size` passes `IsValidWalSegSize` and equals `expect.seg_size` if given;
/// 4. `xlp_xlog_blcksz` is a power of two from 1 to 64 KiB;
/// 5. `xlp_sysid` equals `expect.system_id` if given;
/// 6. `xlp_pageaddr` is the start of the segment named (`XLogFromFileName`, then
///    `XLogSegNoOffsetToRecPtr`): a recycled or renamed segment fails here;
/// 7. `xlp_tli` is at least 1 and at most the name's timeline. (It may be lower: the first
///    segment of a new timeline is a copy of the old timeline's segment up to the switch point,
///    so its first page carries the old timeline.)
///
/// `.partial` names are checked like segments; history and backup history files have no page
/// header and give [`PgError::NotASegment`].
pub fn check_segment_header(
    first_page: &[u8],
    expect: &SegmentExpectations,
) -> Result<LongPageHeader, PgError> {
    let name = &expect.name;
    if !matches!(name.kind(), WalFileKind::Segment | WalFileKind::Partial) {
        return Err(PgError::NotASegment {
            name: name.clone(),
            kind: name.kind().describe(),
        });
    }
    let fail = |problem| PgError::SegmentHeader {
        name: name.clone(),
        problem,
    };
    let header = parse_long_page_header(first_page).map_err(|_| {
        fail(HeaderProblem::Truncated {
            needed: SIZE_OF_XLOG_LONG_PHD,
            got: first_page.len(),
        })
    })?;

    if pg_major_for_magic(header.magic).is_none() {
        return Err(fail(HeaderProblem::UnknownMagic {
            magic: header.magic,
        }));
    }
    if !header.is_long() {
        return Err(fail(HeaderProblem::NotLongHeader { info: header.info }));
    }
    let seg_size = WalSegmentSize::new(header.seg_size).map_err(|_| {
        fail(HeaderProblem::InvalidSegmentSize {
            bytes: header.seg_size,
        })
    })?;
    if let Some(expected) = expect.seg_size
        && expected != seg_size
    {
        return Err(fail(HeaderProblem::SegmentSizeMismatch {
            found: seg_size,
            expected,
        }));
    }
    if !header.block_size.is_power_of_two()
        || !(MIN_WAL_BLOCK_SIZE..=MAX_WAL_BLOCK_SIZE).contains(&header.block_size)
    {
        return Err(fail(HeaderProblem::InvalidBlockSize {
            bytes: header.block_size,
        }));
    }
    if let Some(expected) = expect.system_id
        && expected != header.system_id
    {
        return Err(fail(HeaderProblem::SystemIdMismatch {
            found: header.system_id,
            expected,
        }));
    }
    let expected_addr = name.segno(seg_size)?.start_lsn(seg_size);
    if header.page_addr != expected_addr {
        return Err(fail(HeaderProblem::PageAddressMismatch {
            found: header.page_addr,
            expected: expected_addr,
        }));
    }
    if header.timeline.0 == 0 {
        return Err(fail(HeaderProblem::TimelineZero));
    }
    if header.timeline > name.timeline() {
        return Err(fail(HeaderProblem::TimelineAfterName {
            found: header.timeline,
            name_timeline: name.timeline(),
        }));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::test_fixtures::{PG15_SYSTEM_ID, pg15_header};
    use proptest::prelude::*;

    const MIB: u32 = 1024 * 1024;

    fn name(text: &str) -> WalFileName {
        WalFileName::parse(text).expect("valid name")
    }

    /// A hand-built first page of segment 3 on timeline 1, 16 MiB, PostgreSQL 15.
    fn valid_header() -> [u8; SIZE_OF_XLOG_LONG_PHD] {
        let mut b = [0u8; SIZE_OF_XLOG_LONG_PHD];
        b[0..2].copy_from_slice(&0xD110u16.to_le_bytes()); // xlp_magic
        b[2..4].copy_from_slice(&0x0006u16.to_le_bytes()); // XLP_LONG_HEADER | XLP_BKP_REMOVABLE
        b[4..8].copy_from_slice(&1u32.to_le_bytes()); // xlp_tli
        b[8..16].copy_from_slice(&0x300_0000u64.to_le_bytes()); // xlp_pageaddr 0/3000000
        b[16..20].copy_from_slice(&0u32.to_le_bytes()); // xlp_rem_len
        b[24..32].copy_from_slice(&PG15_SYSTEM_ID.to_le_bytes()); // xlp_sysid
        b[32..36].copy_from_slice(&(16 * MIB).to_le_bytes()); // xlp_seg_size
        b[36..40].copy_from_slice(&8192u32.to_le_bytes()); // xlp_xlog_blcksz
        b
    }

    fn expect(file: &str) -> SegmentExpectations {
        SegmentExpectations {
            name: name(file),
            system_id: Some(PG15_SYSTEM_ID),
            seg_size: Some(WalSegmentSize::DEFAULT),
        }
    }

    fn problem_of(bytes: &[u8], expect: &SegmentExpectations) -> HeaderProblem {
        match check_segment_header(bytes, expect) {
            Err(PgError::SegmentHeader { name, problem }) => {
                assert_eq!(name, expect.name);
                problem
            }
            other => panic!("expected a header problem, got {other:?}"),
        }
    }

    #[test]
    fn magic_table() {
        assert_eq!(pg_major_for_magic(0xD106), Some(13));
        assert_eq!(pg_major_for_magic(0xD10D), Some(14));
        assert_eq!(pg_major_for_magic(0xD110), Some(15));
        assert_eq!(pg_major_for_magic(0xD113), Some(16));
        assert_eq!(pg_major_for_magic(0xD116), Some(17));
        assert_eq!(pg_major_for_magic(0xD118), Some(18));
        assert_eq!(pg_major_for_magic(0xD101), None); // PostgreSQL 12: unsupported
        assert_eq!(pg_major_for_magic(0), None);
    }

    #[test]
    fn parses_the_hand_built_header() {
        let header = parse_long_page_header(&valid_header()).expect("parse");
        assert_eq!(
            header,
            LongPageHeader {
                magic: 0xD110,
                info: 0x0006,
                timeline: TimelineId(1),
                page_addr: Lsn(0x300_0000),
                rem_len: 0,
                system_id: PG15_SYSTEM_ID,
                seg_size: 16 * MIB,
                block_size: 8192,
            }
        );
        assert_eq!(header.encode(), valid_header());
        assert_eq!(header.pg_major(), Some(15));
        let checked = check_segment_header(&valid_header(), &expect("000000010000000000000003"));
        assert_eq!(checked, Ok(header));
    }

    #[test]
    fn truncated_input_says_how_much() {
        let err = parse_long_page_header(&[0; 12]).expect_err("short");
        assert_eq!(err.to_string(), "WAL page header: need 40 bytes, got 12");
        let e = expect("000000010000000000000003");
        assert_eq!(
            problem_of(&valid_header()[..39], &e),
            HeaderProblem::Truncated {
                needed: 40,
                got: 39
            }
        );
    }

    #[test]
    fn each_field_fails_on_its_own() {
        let e = expect("000000010000000000000003");
        let with = |at: usize, bytes: &[u8]| {
            let mut h = valid_header();
            h[at..at + bytes.len()].copy_from_slice(bytes);
            h
        };

        let bad_magic = with(0, &0xD0FFu16.to_le_bytes());
        assert_eq!(
            problem_of(&bad_magic, &e),
            HeaderProblem::UnknownMagic { magic: 0xD0FF }
        );

        let short_flag = with(2, &0x0004u16.to_le_bytes());
        assert_eq!(
            problem_of(&short_flag, &e),
            HeaderProblem::NotLongHeader { info: 0x0004 }
        );

        let bad_size = with(32, &(3 * MIB).to_le_bytes());
        assert_eq!(
            problem_of(&bad_size, &e),
            HeaderProblem::InvalidSegmentSize { bytes: 3 * MIB }
        );

        let other_size = with(32, &(64 * MIB).to_le_bytes());
        let found = WalSegmentSize::new(64 * MIB).expect("size");
        assert_eq!(
            problem_of(&other_size, &e),
            HeaderProblem::SegmentSizeMismatch {
                found,
                expected: WalSegmentSize::DEFAULT
            }
        );

        for bytes in [0u32, 512, 3000, 128 * 1024] {
            let bad_block = with(36, &bytes.to_le_bytes());
            assert_eq!(
                problem_of(&bad_block, &e),
                HeaderProblem::InvalidBlockSize { bytes }
            );
        }

        let other_system = with(24, &42u64.to_le_bytes());
        assert_eq!(
            problem_of(&other_system, &e),
            HeaderProblem::SystemIdMismatch {
                found: 42,
                expected: PG15_SYSTEM_ID
            }
        );

        let wrong_addr = with(8, &0x200_0000u64.to_le_bytes());
        assert_eq!(
            problem_of(&wrong_addr, &e),
            HeaderProblem::PageAddressMismatch {
                found: Lsn(0x200_0000),
                expected: Lsn(0x300_0000)
            }
        );

        let tli_zero = with(4, &0u32.to_le_bytes());
        assert_eq!(problem_of(&tli_zero, &e), HeaderProblem::TimelineZero);

        let later_tli = with(4, &2u32.to_le_bytes());
        assert_eq!(
            problem_of(&later_tli, &e),
            HeaderProblem::TimelineAfterName {
                found: TimelineId(2),
                name_timeline: TimelineId(1)
            }
        );
    }

    #[test]
    fn messages_name_the_file_and_both_values() {
        let mut wrong_addr = valid_header();
        wrong_addr[8..16].copy_from_slice(&0x200_0000u64.to_le_bytes());
        let err = check_segment_header(&wrong_addr, &expect("000000010000000000000003"))
            .expect_err("mismatch");
        assert_eq!(
            err.to_string(),
            "000000010000000000000003: page address 0/2000000 does not match the file name \
             (expected 0/3000000)"
        );
    }

    #[test]
    fn optional_expectations_and_other_sizes() {
        // Without expectations, the header's own segment size interprets the name.
        let mut h = valid_header();
        h[32..36].copy_from_slice(&(64 * MIB).to_le_bytes());
        h[8..16].copy_from_slice(&(3 * u64::from(64 * MIB)).to_le_bytes());
        h[24..32].copy_from_slice(&42u64.to_le_bytes());
        let loose = SegmentExpectations {
            name: name("000000010000000000000003"),
            system_id: None,
            seg_size: None,
        };
        assert!(check_segment_header(&h, &loose).is_ok());
        // Larger block sizes PostgreSQL can be built with.
        h[36..40].copy_from_slice(&(64 * 1024u32).to_le_bytes());
        assert!(check_segment_header(&h, &loose).is_ok());
        // A name whose segment part is impossible for that size.
        let impossible = SegmentExpectations {
            name: name("0000000100000000000000FF"),
            ..loose
        };
        assert!(matches!(
            check_segment_header(&h, &impossible),
            Err(PgError::SegmentOutOfRange { .. })
        ));
    }

    #[test]
    fn partial_is_checked_like_a_segment_and_history_is_refused() {
        let partial = expect("000000010000000000000003.partial");
        assert!(check_segment_header(&valid_header(), &partial).is_ok());
        for file in [
            "00000001.history",
            "000000010000000000000003.00000028.backup",
        ] {
            assert!(matches!(
                check_segment_header(&valid_header(), &expect(file)),
                Err(PgError::NotASegment { .. })
            ));
        }
    }

    #[test]
    fn real_postgresql_15_segments() {
        // Archived by a PostgreSQL 15 cluster (initdb defaults, then a promotion to timeline 2
        // at 0/6000000 and a streaming standby promoted to timeline 3 at 0/9009348).
        for file in [
            "000000010000000000000003",
            "000000020000000000000006",
            "000000020000000000000009.partial",
            // The first segment of timeline 3, copied from timeline 2: its page says timeline 2.
            "000000030000000000000009",
        ] {
            let header = check_segment_header(&pg15_header(file), &expect(file))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(header.magic, 0xD110, "PostgreSQL 15's XLOG_PAGE_MAGIC");
            assert_eq!(header.encode().as_slice(), pg15_header(file).as_slice());
        }
        let copied =
            parse_long_page_header(&pg15_header("000000030000000000000009")).expect("parse");
        assert_eq!(copied.timeline, TimelineId(2));

        // A segment file recycled by the server still holds an older segment's first page until it is
        // overwritten: its header must not pass for the new name.
        // (Taken from pg_wal after a checkpoint recycled segment 5 as segment 8.)
        let recycled = pg15_header("recycled-as-000000010000000000000008");
        assert_eq!(
            problem_of(&recycled, &expect("000000010000000000000008")),
            HeaderProblem::PageAddressMismatch {
                found: Lsn(0x500_0000),
                expected: Lsn(0x800_0000)
            }
        );
        // The right segment under another name.
        assert!(matches!(
            problem_of(
                &pg15_header("000000010000000000000003"),
                &expect("000000010000000000000004")
            ),
            HeaderProblem::PageAddressMismatch { .. }
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            match parse_long_page_header(&bytes) {
                Ok(header) => {
                    let mut expected = [0u8; SIZE_OF_XLOG_LONG_PHD];
                    expected.copy_from_slice(&bytes[..SIZE_OF_XLOG_LONG_PHD]);
                    expected[20..24].fill(0);
                    prop_assert_eq!(header.encode(), expected);
                }
                Err(e) => prop_assert_eq!(
                    e,
                    PgError::TruncatedPageHeader { needed: 40, got: bytes.len() }
                ),
            }
            let _ = check_segment_header(&bytes, &expect("000000010000000000000003"));
        }

        #[test]
        fn mutated_valid_headers_never_panic(
            at in 0..SIZE_OF_XLOG_LONG_PHD,
            byte in any::<u8>(),
            file in "0000000[1-3]000000000000000[0-9A-F](\\.partial)?",
        ) {
            let mut h = valid_header();
            h[at] = byte;
            let e = SegmentExpectations { name: name(&file), system_id: None, seg_size: None };
            if let Ok(header) = check_segment_header(&h, &e) {
                prop_assert!(header.timeline <= e.name.timeline());
                prop_assert!(header.is_long());
            }
        }

        #[test]
        fn encode_parse_round_trip(
            magic in any::<u16>(), info in any::<u16>(), tli in any::<u32>(), addr in any::<u64>(),
            rem_len in any::<u32>(), system_id in any::<u64>(), seg_size in any::<u32>(),
            block_size in any::<u32>(),
        ) {
            let header = LongPageHeader {
                magic, info, timeline: TimelineId(tli), page_addr: Lsn(addr), rem_len,
                system_id, seg_size, block_size,
            };
            prop_assert_eq!(parse_long_page_header(&header.encode()), Ok(header));
        }
    }
}
