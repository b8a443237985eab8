//! WAL positions and segment arithmetic: `XLogRecPtr`, `TimeLineID`, `XLogSegNo` and
//! `wal_segment_size`, with the macros of `access/xlog_internal.h` as methods.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::error::{LsnProblem, PgError, quoted};

/// A position in the WAL stream: PostgreSQL's `XLogRecPtr` (SQL type `pg_lsn`).
///
/// Displays as PostgreSQL does with `LSN_FORMAT_ARGS` and `"%X/%X"` (high and low 32 bits in
/// upper-case hex, without leading zeros: `0/16B3748`), parses what `pg_lsn_in` accepts (1 to 8
/// hex digits of either case on each side of '/') and serializes as that string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `InvalidXLogRecPtr`: PostgreSQL's "no position" (no record starts at 0/0).
    pub const INVALID: Lsn = Lsn(0);

    /// The segment holding the byte at this position: `XLByteToSeg`.
    ///
    /// A position exactly on a segment boundary belongs to the segment that *starts* there. Note
    /// that SQL's `pg_walfile_name()` uses `XLByteToPrevSeg` instead (a boundary belongs to the
    /// segment before), because it is meant for end-of-record positions.
    pub fn segment(self, size: WalSegmentSize) -> SegmentNo {
        SegmentNo(self.0 / u64::from(size.bytes()))
    }

    /// The offset of this position inside its segment: `XLogSegmentOffset`.
    pub fn segment_offset(self, size: WalSegmentSize) -> u32 {
        // The mask is below 2^30, so the result fits in u32.
        (self.0 & (u64::from(size.bytes()) - 1)) as u32
    }

    /// True unless this is [`Lsn::INVALID`] (`XLogRecPtrIsInvalid`, negated).
    pub fn is_valid(self) -> bool {
        self != Lsn::INVALID
    }
}

impl fmt::Display for Lsn {
    /// `"%X/%X", LSN_FORMAT_ARGS(lsn)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = PgError;

    /// Parses like PostgreSQL's `pg_lsn_in_internal`: 1 to 8 hex digits, '/', 1 to 8 hex digits,
    /// nothing else (no spaces, no sign).
    fn from_str(input: &str) -> Result<Lsn, PgError> {
        let fail = |problem| PgError::InvalidLsn {
            input: quoted(input),
            problem,
        };
        let (high, low) = input
            .split_once('/')
            .ok_or_else(|| fail(LsnProblem::MissingSlash))?;
        let high = parse_hex_group(high).ok_or_else(|| fail(LsnProblem::BadHighPart))?;
        let low = parse_hex_group(low).ok_or_else(|| fail(LsnProblem::BadLowPart))?;
        Ok(Lsn(u64::from(high) << 32 | u64::from(low)))
    }
}

/// 1 to 8 hex digits of either case, as one `%X` group of an LSN.
fn parse_hex_group(group: &str) -> Option<u32> {
    if group.is_empty() || group.len() > 8 || !group.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(group, 16).ok()
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Lsn, D::Error> {
        let text = Cow::<'de, str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A timeline: PostgreSQL's `TimeLineID`. Timelines start at 1; a promotion or a point-in-time
/// recovery starts a new one. Displays in decimal as PostgreSQL's messages do; serializes as a
/// number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The number of a WAL segment counted from the start of WAL: PostgreSQL's `XLogSegNo`.
///
/// Its meaning depends on the segment size: segment `n` starts at LSN `n * size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SegmentNo(pub u64);

impl SegmentNo {
    /// The LSN where this segment starts: `XLogSegNoOffsetToRecPtr(segno, 0, size, dest)`.
    ///
    /// Segment numbers past the end of the 64-bit LSN space (at or beyond `2^64 / size`, never
    /// produced by [`Lsn::segment`] or [`WalFileName::segno`](super::WalFileName::segno)) wrap
    /// around as the C macro does.
    pub fn start_lsn(self, size: WalSegmentSize) -> Lsn {
        Lsn(self.0.wrapping_mul(u64::from(size.bytes())))
    }

    /// The following segment (`segno + 1`, as PostgreSQL's loops over `XLogSegNo` do).
    pub fn next(self) -> SegmentNo {
        SegmentNo(self.0.wrapping_add(1))
    }
}

impl fmt::Display for SegmentNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The size of every WAL segment file of a cluster (`wal_segment_size`, set by
/// `initdb --wal-segsize`): a power of two from 1 MiB to 1 GiB, as PostgreSQL's
/// `IsValidWalSegSize` requires. Serializes as the number of bytes; displays as `16 MiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct WalSegmentSize(u32);

impl WalSegmentSize {
    /// PostgreSQL's default and most common size, 16 MiB (`DEFAULT_XLOG_SEG_SIZE`).
    pub const DEFAULT: WalSegmentSize = WalSegmentSize(16 * 1024 * 1024);
    /// The smallest size PostgreSQL allows (`WalSegMinSize`, 1 MiB).
    pub const MIN: WalSegmentSize = WalSegmentSize(1024 * 1024);
    /// The largest size PostgreSQL allows (`WalSegMaxSize`, 1 GiB).
    pub const MAX: WalSegmentSize = WalSegmentSize(1024 * 1024 * 1024);

    /// A segment size, if `IsValidWalSegSize(bytes)`.
    pub fn new(bytes: u32) -> Result<WalSegmentSize, PgError> {
        if bytes.is_power_of_two() && (Self::MIN.0..=Self::MAX.0).contains(&bytes) {
            Ok(WalSegmentSize(bytes))
        } else {
            Err(PgError::InvalidSegmentSize { bytes })
        }
    }

    /// The size in bytes.
    pub fn bytes(self) -> u32 {
        self.0
    }

    /// How many segments make one 4 GiB "log id" (the middle 8 hex digits of a file name):
    /// `XLogSegmentsPerXLogId`, `0x100000000 / size`. 256 for 16 MiB.
    pub fn segments_per_xlog_id(self) -> u64 {
        0x1_0000_0000 / u64::from(self.0)
    }

    /// Every valid segment size, smallest first.
    pub fn all() -> impl Iterator<Item = WalSegmentSize> {
        (20..=30).map(|shift| WalSegmentSize(1 << shift))
    }
}

impl Default for WalSegmentSize {
    fn default() -> WalSegmentSize {
        WalSegmentSize::DEFAULT
    }
}

impl TryFrom<u32> for WalSegmentSize {
    type Error = PgError;

    fn try_from(bytes: u32) -> Result<WalSegmentSize, PgError> {
        WalSegmentSize::new(bytes)
    }
}

impl From<WalSegmentSize> for u32 {
    fn from(size: WalSegmentSize) -> u32 {
        size.0
    }
}

impl fmt::Display for WalSegmentSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: u32 = 1024 * 1024;
        if self.0 >= 1024 * MIB {
            write!(f, "{} GiB", self.0 / (1024 * MIB))
        } else {
            write!(f, "{} MiB", self.0 / MIB)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_size() -> impl Strategy<Value = WalSegmentSize> {
        (20u32..=30).prop_map(|shift| WalSegmentSize(1 << shift))
    }

    #[test]
    fn lsn_display_matches_postgresql() {
        assert_eq!(Lsn(0x16B3748).to_string(), "0/16B3748");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn lsn_parses_what_pg_lsn_in_accepts() {
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("16/b374d848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("0/0".parse::<Lsn>(), Ok(Lsn::INVALID));
        assert_eq!("00000000/00000001".parse::<Lsn>(), Ok(Lsn(1)));
    }

    #[test]
    fn lsn_rejects_with_precise_problem() {
        let problem = |s: &str| match s.parse::<Lsn>() {
            Err(PgError::InvalidLsn { problem, input }) => {
                assert_eq!(input, s);
                problem
            }
            other => panic!("{s:?} gave {other:?}"),
        };
        assert_eq!(problem(""), LsnProblem::MissingSlash);
        assert_eq!(problem("16B374D848"), LsnProblem::MissingSlash);
        assert_eq!(problem("/1"), LsnProblem::BadHighPart);
        assert_eq!(problem("123456789/0"), LsnProblem::BadHighPart);
        assert_eq!(problem("+1/0"), LsnProblem::BadHighPart);
        assert_eq!(problem(" 1/0"), LsnProblem::BadHighPart);
        assert_eq!(problem("1/"), LsnProblem::BadLowPart);
        assert_eq!(problem("1/0 "), LsnProblem::BadLowPart);
        assert_eq!(problem("1/0/0"), LsnProblem::BadLowPart);
        assert_eq!(problem("1/123456789"), LsnProblem::BadLowPart);
        assert_eq!(problem("1/G"), LsnProblem::BadLowPart);
    }

    #[test]
    fn lsn_error_names_the_input() {
        let err = "16B374D848".parse::<Lsn>().expect_err("no slash");
        assert!(
            err.to_string()
                .starts_with("invalid LSN \"16B374D848\": no '/'"),
            "{err}"
        );
        let long = "x".repeat(10_000);
        let err = long.parse::<Lsn>().expect_err("garbage");
        assert!(
            err.to_string().len() < 400,
            "a huge input must not make a huge message"
        );
    }

    #[test]
    fn segment_arithmetic_matches_postgresql() {
        let size = WalSegmentSize::DEFAULT;
        // SELECT pg_walfile_name_offset('16/B374D848') on PostgreSQL 15, 16 MiB segments:
        // (0000000100000016000000B3, 7657544)
        let lsn = Lsn(0x16_B374_D848);
        assert_eq!(lsn.segment(size), SegmentNo(0x16 * 256 + 0xB3));
        assert_eq!(lsn.segment_offset(size), 7_657_544);
        assert_eq!(SegmentNo(3).start_lsn(size).to_string(), "0/3000000");
        // A boundary belongs to the segment that starts there (XLByteToSeg).
        assert_eq!(Lsn(0x300_0000).segment(size), SegmentNo(3));
        assert_eq!(SegmentNo(3).next(), SegmentNo(4));
        assert_eq!(size.segments_per_xlog_id(), 256);
        assert_eq!(WalSegmentSize::MIN.segments_per_xlog_id(), 4096);
        assert_eq!(WalSegmentSize::MAX.segments_per_xlog_id(), 4);
    }

    #[test]
    fn segment_sizes_are_those_of_is_valid_wal_seg_size() {
        let valid: Vec<u32> = WalSegmentSize::all().map(WalSegmentSize::bytes).collect();
        assert_eq!(valid.len(), 11);
        for bytes in [
            0,
            1,
            512 * 1024,
            3 * 1024 * 1024,
            2048 * 1024 * 1024,
            u32::MAX,
        ] {
            assert_eq!(
                WalSegmentSize::new(bytes),
                Err(PgError::InvalidSegmentSize { bytes })
            );
        }
        for bytes in valid {
            assert_eq!(
                WalSegmentSize::new(bytes).map(WalSegmentSize::bytes),
                Ok(bytes)
            );
        }
        assert_eq!(WalSegmentSize::DEFAULT.to_string(), "16 MiB");
        assert_eq!(WalSegmentSize::MAX.to_string(), "1 GiB");
    }

    #[test]
    fn serde_forms() {
        let lsn = Lsn(0x16_B374_D848);
        assert_eq!(serde_json::to_string(&lsn).expect("ser"), "\"16/B374D848\"");
        assert_eq!(
            serde_json::from_str::<Lsn>("\"16/b374d848\"").expect("de"),
            lsn
        );
        assert!(serde_json::from_str::<Lsn>("\"16\"").is_err());
        assert!(serde_json::from_str::<Lsn>("5").is_err());
        assert_eq!(serde_json::to_string(&TimelineId(3)).expect("ser"), "3");
        assert_eq!(
            serde_json::from_str::<TimelineId>("3").expect("de"),
            TimelineId(3)
        );
        let size = WalSegmentSize::DEFAULT;
        assert_eq!(serde_json::to_string(&size).expect("ser"), "16777216");
        assert_eq!(
            serde_json::from_str::<WalSegmentSize>("16777216").expect("de"),
            size
        );
        assert!(serde_json::from_str::<WalSegmentSize>("1000").is_err());
    }

    proptest! {
        #[test]
        fn lsn_display_parse_round_trip(raw in any::<u64>()) {
            let lsn = Lsn(raw);
            prop_assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
            prop_assert_eq!(lsn.to_string().to_lowercase().parse::<Lsn>(), Ok(lsn));
        }

        #[test]
        fn lsn_from_any_string_never_panics(s in any::<String>()) {
            let _ = s.parse::<Lsn>();
        }

        #[test]
        fn lsn_from_lsn_like_string_never_panics(s in "[0-9a-fA-F/ +-]{0,20}") {
            if let Ok(lsn) = s.parse::<Lsn>() {
                // Whatever parses denotes the same value as its canonical form.
                prop_assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
            }
        }

        #[test]
        fn lsn_lies_in_its_segment(raw in any::<u64>(), size in any_size()) {
            let lsn = Lsn(raw);
            let segno = lsn.segment(size);
            let start = segno.start_lsn(size);
            prop_assert!(start <= lsn);
            prop_assert_eq!(lsn.0 - start.0, u64::from(lsn.segment_offset(size)));
            // The next segment starts after lsn, unless lsn is in the very last segment.
            if let Some(next_start) = start.0.checked_add(u64::from(size.bytes())) {
                prop_assert_eq!(segno.next().start_lsn(size), Lsn(next_start));
                prop_assert!(lsn.0 < next_start);
            }
        }
    }
}
