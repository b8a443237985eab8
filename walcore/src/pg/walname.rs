//! Names of the files PostgreSQL hands to `archive_command` and asks `restore_command` for.
//!
//! This is the only place in walcore that looks inside such a name; everything else holds a
//! [`WalFileName`].

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::error::{NameProblem, PgError, quoted};
use super::lsn::{SegmentNo, TimelineId, WalSegmentSize};

/// `XLOG_FNAME_LEN`: 8 hex digits each of timeline, log id and segment.
const XLOG_FNAME_LEN: usize = 24;
const PARTIAL_SUFFIX: &str = ".partial";
const BACKUP_SUFFIX: &str = ".backup";
const HISTORY_SUFFIX: &str = ".history";
/// `TTTTTTTTLLLLLLLLSSSSSSSS.XXXXXXXX.backup`.
const BACKUP_NAME_LEN: usize = XLOG_FNAME_LEN + 1 + 8 + BACKUP_SUFFIX.len();

/// What a [`WalFileName`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WalFileKind {
    /// A complete WAL segment, `000000010000000000000003` (`IsXLogFileName`).
    Segment,
    /// A segment that may be incomplete, `000000010000000000000003.partial`
    /// (`IsPartialXLogFileName`): written at the end of archive recovery for the last segment of
    /// the old timeline, and by `pg_receivewal`.
    Partial,
    /// A backup history file, `000000010000000000000004.00000028.backup`
    /// (`BackupHistoryFileName`, `IsBackupHistoryFileName`), written when a base backup ends.
    Backup {
        /// Where in the segment the backup started (`XLogSegmentOffset` of its start LSN).
        offset: u32,
    },
    /// A timeline history file, `00000002.history` (`TLHistoryFileName`,
    /// `IsTLHistoryFileName`).
    History,
}

impl WalFileKind {
    /// A short description for messages: "WAL segment", "timeline history file", ...
    pub fn describe(&self) -> &'static str {
        match self {
            WalFileKind::Segment => "WAL segment",
            WalFileKind::Partial => "partial WAL segment",
            WalFileKind::Backup { .. } => "backup history file",
            WalFileKind::History => "timeline history file",
        }
    }
}

/// The name of a file in `pg_wal` that gets archived: a segment, a `.partial` segment, a
/// `.backup` history file or a `.history` file.
///
/// [`WalFileName::parse`] accepts exactly what PostgreSQL writes (`XLogFileName`,
/// `BackupHistoryFileName`, `TLHistoryFileName`: `%08X`, so upper-case hex) and `Display` writes
/// it back byte for byte. The order is by timeline, then position, then kind.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalFileName {
    timeline: TimelineId,
    /// High 8 hex digits of the segment part: `segno / XLogSegmentsPerXLogId`. 0 for history.
    log: u32,
    /// Low 8 hex digits: `segno % XLogSegmentsPerXLogId`. 0 for history.
    seg: u32,
    kind: WalFileKind,
}

impl WalFileName {
    /// Parses a bare file name PostgreSQL writes into `pg_wal` and passes as `%f`.
    ///
    /// Accepts exactly:
    /// - `TTTTTTTTLLLLLLLLSSSSSSSS` (`IsXLogFileName`),
    /// - that + `.partial` (`IsPartialXLogFileName`),
    /// - that + `.XXXXXXXX.backup` (`IsBackupHistoryFileName`, restricted to the form
    ///   `BackupHistoryFileName` writes),
    /// - `TTTTTTTT.history` (`IsTLHistoryFileName`),
    ///
    /// with upper-case hex digits and a timeline other than 0. Paths, lower case and anything
    /// else are rejected with a [`NameProblem`] saying why.
    pub fn parse(name: &str) -> Result<WalFileName, PgError> {
        let fail = |problem| PgError::InvalidWalFileName {
            name: quoted(name),
            problem,
        };
        if name.contains(['/', '\\', '\0']) {
            return Err(fail(NameProblem::PathSeparator));
        }
        // Only ASCII names can match; checking first makes the byte slicing below safe.
        if !name.is_ascii() {
            return Err(fail(NameProblem::UnrecognizedForm));
        }
        let (tli, rest, kind) = if name.len() == 8 + HISTORY_SUFFIX.len()
            && name.ends_with(HISTORY_SUFFIX)
        {
            let tli = hex8(&name[..8]).map_err(fail)?;
            (tli, None, WalFileKind::History)
        } else {
            let kind = match name.len() {
                XLOG_FNAME_LEN => WalFileKind::Segment,
                len if len == XLOG_FNAME_LEN + PARTIAL_SUFFIX.len()
                    && name.ends_with(PARTIAL_SUFFIX) =>
                {
                    WalFileKind::Partial
                }
                BACKUP_NAME_LEN
                    if name.ends_with(BACKUP_SUFFIX) && name.as_bytes()[XLOG_FNAME_LEN] == b'.' =>
                {
                    let offset = hex8(&name[XLOG_FNAME_LEN + 1..XLOG_FNAME_LEN + 9]);
                    WalFileKind::Backup {
                        offset: offset.map_err(fail)?,
                    }
                }
                _ => return Err(fail(NameProblem::UnrecognizedForm)),
            };
            let tli = hex8(&name[..8]).map_err(fail)?;
            let log = hex8(&name[8..16]).map_err(fail)?;
            let seg = hex8(&name[16..24]).map_err(fail)?;
            (tli, Some((log, seg)), kind)
        };
        if tli == 0 {
            return Err(fail(NameProblem::TimelineZero));
        }
        let (log, seg) = rest.unwrap_or((0, 0));
        Ok(WalFileName {
            timeline: TimelineId(tli),
            log,
            seg,
            kind,
        })
    }

    /// The name of segment `segno` on `timeline`: `XLogFileName`.
    ///
    /// Segment numbers past the end of the 64-bit LSN space (at or beyond `2^64 / size`) are cut
    /// to 32 bits as PostgreSQL's `(uint32)` cast does.
    pub fn segment(timeline: TimelineId, segno: SegmentNo, size: WalSegmentSize) -> WalFileName {
        let per_id = size.segments_per_xlog_id();
        WalFileName {
            timeline,
            log: (segno.0 / per_id) as u32,
            seg: (segno.0 % per_id) as u32,
            kind: WalFileKind::Segment,
        }
    }

    /// The history file of `timeline`: `TLHistoryFileName`.
    pub fn history(timeline: TimelineId) -> WalFileName {
        WalFileName {
            timeline,
            log: 0,
            seg: 0,
            kind: WalFileKind::History,
        }
    }

    /// The timeline in the name (its first 8 hex digits).
    pub fn timeline(&self) -> TimelineId {
        self.timeline
    }

    /// What the name names.
    pub fn kind(&self) -> &WalFileKind {
        &self.kind
    }

    /// The middle 8 hex digits ("log id", `segno / XLogSegmentsPerXLogId`); 0 for history files.
    pub fn log_id(&self) -> u32 {
        self.log
    }

    /// The last 8 hex digits of the segment part (`segno % XLogSegmentsPerXLogId`); 0 for
    /// history files.
    pub fn seg_id(&self) -> u32 {
        self.seg
    }

    /// The segment number the name denotes under segment size `size`: `XLogFromFileName`.
    ///
    /// For `.partial` and `.backup` names, the segment they belong to. Fails for history files,
    /// and when the segment part is too large for `size` (PostgreSQL never writes such a name,
    /// so the file comes from a cluster with another `wal_segment_size`).
    pub fn segno(&self, size: WalSegmentSize) -> Result<SegmentNo, PgError> {
        if self.kind == WalFileKind::History {
            return Err(PgError::NotASegment {
                name: self.clone(),
                kind: self.kind.describe(),
            });
        }
        let per_id = size.segments_per_xlog_id();
        if u64::from(self.seg) >= per_id {
            return Err(PgError::SegmentOutOfRange {
                name: self.clone(),
                seg_id: self.seg,
                // per_id is at most 4096.
                max: (per_id - 1) as u32,
                seg_size: size,
            });
        }
        Ok(SegmentNo(
            u64::from(self.log) * per_id + u64::from(self.seg),
        ))
    }

    /// True for a complete segment ([`WalFileKind::Segment`]).
    pub fn is_segment(&self) -> bool {
        self.kind == WalFileKind::Segment
    }

    /// The same timeline and position with another kind, e.g. a segment's `.partial` name.
    /// Turning a name into [`WalFileKind::History`] gives its timeline's history file; turning a
    /// history name into another kind gives position 0 (log id and segment 0).
    pub fn with_kind(&self, kind: WalFileKind) -> WalFileName {
        if kind == WalFileKind::History {
            return WalFileName::history(self.timeline);
        }
        WalFileName {
            kind,
            ..self.clone()
        }
    }
}

/// 8 upper-case hex digits (one `%08X` field), or why not.
fn hex8(field: &str) -> Result<u32, NameProblem> {
    let mut value = 0u32;
    for b in field.bytes() {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'A'..=b'F' => b - b'A' + 10,
            b'a'..=b'f' => return Err(NameProblem::LowerCaseHex),
            _ => return Err(NameProblem::NotHex),
        };
        value = value << 4 | u32::from(digit);
    }
    Ok(value)
}

impl fmt::Display for WalFileName {
    /// Exactly the name PostgreSQL writes (`XLogFileName`, `TLHistoryFileName`,
    /// `BackupHistoryFileName`, + `.partial`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (tli, log, seg) = (self.timeline.0, self.log, self.seg);
        match self.kind {
            WalFileKind::History => write!(f, "{tli:08X}{HISTORY_SUFFIX}"),
            WalFileKind::Segment => write!(f, "{tli:08X}{log:08X}{seg:08X}"),
            WalFileKind::Partial => write!(f, "{tli:08X}{log:08X}{seg:08X}{PARTIAL_SUFFIX}"),
            WalFileKind::Backup { offset } => {
                write!(f, "{tli:08X}{log:08X}{seg:08X}.{offset:08X}{BACKUP_SUFFIX}")
            }
        }
    }
}

impl FromStr for WalFileName {
    type Err = PgError;

    /// [`WalFileName::parse`].
    fn from_str(name: &str) -> Result<WalFileName, PgError> {
        WalFileName::parse(name)
    }
}

impl Serialize for WalFileName {
    /// As the file name.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WalFileName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<WalFileName, D::Error> {
        let text = Cow::<'de, str>::deserialize(deserializer)?;
        WalFileName::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::Lsn;
    use proptest::prelude::*;

    fn parse(name: &str) -> WalFileName {
        WalFileName::parse(name).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn problem(name: &str) -> NameProblem {
        match WalFileName::parse(name) {
            Err(PgError::InvalidWalFileName { problem, .. }) => problem,
            other => panic!("{name:?} gave {other:?}"),
        }
    }

    #[test]
    fn names_from_pg_walfile_name() {
        // SELECT pg_walfile_name(lsn) on PostgreSQL 15, timeline 1, 16 MiB segments.
        // pg_walfile_name uses XLByteToPrevSeg, which equals XLByteToSeg off a boundary.
        let size = WalSegmentSize::DEFAULT;
        for (lsn, expected) in [
            ("0/16B3748", "000000010000000000000001"),
            ("16/B374D848", "0000000100000016000000B3"),
            ("0/1500790", "000000010000000000000001"),
            ("FFFFFFFF/FFFFFFFF", "00000001FFFFFFFF000000FF"),
        ] {
            let lsn: Lsn = lsn.parse().expect("lsn");
            let name = WalFileName::segment(TimelineId(1), lsn.segment(size), size);
            assert_eq!(name.to_string(), expected);
            assert_eq!(parse(expected), name);
            assert_eq!(name.segno(size), Ok(lsn.segment(size)));
        }
    }

    #[test]
    fn names_and_offsets_for_other_segment_sizes() {
        // SELECT pg_walfile_name(lsn) / pg_walfile_name_offset(lsn) on PostgreSQL 15 clusters
        // made with initdb --wal-segsize=1, 16, 64 and 1024. (The offsets of the last LSN and of
        // 0/16B3748 at 1 MiB were not asked of PostgreSQL: they follow from the size.)
        const MIB: u32 = 1024 * 1024;
        for (mib, lsn, expected, offset) in [
            (1, "16/B374D848", "000000010000001600000B37", 317_512),
            (1, "0/16B3748", "000000010000000000000016", 0xB_3748),
            (1, "FFFFFFFF/FFFFFFFF", "00000001FFFFFFFF00000FFF", 0xF_FFFF),
            (16, "16/B374D848", "0000000100000016000000B3", 7_657_544),
            (16, "0/16B3748", "000000010000000000000001", 7_026_504),
            (64, "16/B374D848", "00000001000000160000002C", 57_989_192),
            (
                64,
                "FFFFFFFF/FFFFFFFF",
                "00000001FFFFFFFF0000003F",
                0x3FF_FFFF,
            ),
            (1024, "16/B374D848", "000000010000001600000002", 863_295_560),
            (
                1024,
                "FFFFFFFF/FFFFFFFF",
                "00000001FFFFFFFF00000003",
                0x3FFF_FFFF,
            ),
        ] {
            let size = WalSegmentSize::new(mib * MIB).expect("size");
            let lsn: Lsn = lsn.parse().expect("lsn");
            let name = WalFileName::segment(TimelineId(1), lsn.segment(size), size);
            assert_eq!(name.to_string(), expected, "{lsn} at {size}");
            assert_eq!(lsn.segment_offset(size), offset, "{lsn} at {size}");
            assert_eq!(parse(expected).segno(size), Ok(lsn.segment(size)));
        }
    }

    #[test]
    fn every_kind_parses_and_displays() {
        let seg = parse("0000000100000016000000B3");
        assert_eq!(seg.timeline(), TimelineId(1));
        assert_eq!((seg.log_id(), seg.seg_id()), (0x16, 0xB3));
        assert_eq!(seg.kind(), &WalFileKind::Segment);
        assert!(seg.is_segment());

        let partial = parse("000000020000000000000009.partial");
        assert_eq!(partial.kind(), &WalFileKind::Partial);
        assert!(!partial.is_segment());
        assert_eq!(partial.segno(WalSegmentSize::DEFAULT), Ok(SegmentNo(9)));
        assert_eq!(
            partial.with_kind(WalFileKind::Segment).to_string(),
            "000000020000000000000009"
        );

        // Written by pg_basebackup against PostgreSQL 15 (START WAL LOCATION: 0/4000028).
        let backup = parse("000000010000000000000004.00000028.backup");
        assert_eq!(backup.kind(), &WalFileKind::Backup { offset: 0x28 });
        assert_eq!(backup.segno(WalSegmentSize::DEFAULT), Ok(SegmentNo(4)));

        let history = parse("0000000A.history");
        assert_eq!(history, WalFileName::history(TimelineId(10)));
        assert_eq!((history.log_id(), history.seg_id()), (0, 0));
        assert_eq!(
            seg.with_kind(WalFileKind::History).to_string(),
            "00000001.history"
        );
        assert!(matches!(
            history.segno(WalSegmentSize::DEFAULT),
            Err(PgError::NotASegment { .. })
        ));
    }

    #[test]
    fn rejects_with_precise_problem() {
        use NameProblem::*;
        for (name, expected) in [
            ("", UnrecognizedForm),
            ("0000000100000000000000", UnrecognizedForm),
            ("0000000100000000000000010", UnrecognizedForm),
            ("000000010000000000000001.PARTIAL", UnrecognizedForm),
            ("000000010000000000000001.partial.gz", UnrecognizedForm),
            (
                "000000010000000000000001.00000028.backup.gz",
                UnrecognizedForm,
            ),
            ("000000010000000000000001.0000028.backup", UnrecognizedForm),
            ("000000010000000000000001_00000028.backup", UnrecognizedForm),
            ("1.history", UnrecognizedForm),
            ("00000001.HISTORY", UnrecognizedForm),
            ("00000001000000000000000é", UnrecognizedForm),
            ("00000001000000000000000a", LowerCaseHex),
            ("0000000a.history", LowerCaseHex),
            ("000000010000000000000001.0000002a.backup", LowerCaseHex),
            ("00000001000000000000000G", NotHex),
            ("0000000100000000 0000001", NotHex),
            ("+0000001.history", NotHex),
            ("000000010000000000000001.0000002X.backup", NotHex),
            ("000000000000000000000001", TimelineZero),
            ("00000000.history", TimelineZero),
            ("pg_wal/000000010000000000000001", PathSeparator),
            ("..\\000000010000000000000001", PathSeparator),
            ("000000010000000000000001\0", PathSeparator),
        ] {
            assert_eq!(problem(name), expected, "{name:?}");
        }
    }

    #[test]
    fn error_messages_name_the_file() {
        let err = WalFileName::parse("00000001000000000000000a").expect_err("lower case");
        assert_eq!(
            err.to_string(),
            "invalid WAL file name \"00000001000000000000000a\": hexadecimal digits must be \
             upper case, as PostgreSQL writes them"
        );
        let name = parse("0000000100000000000000FF");
        let size = WalSegmentSize::new(64 * 1024 * 1024).expect("size");
        let err = name.segno(size).expect_err("out of range");
        assert!(matches!(
            err,
            PgError::SegmentOutOfRange {
                seg_id: 0xFF,
                max: 0x3F,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "0000000100000000000000FF: segment part 000000FF is out of range for 64 MiB \
             segments (at most 0000003F); was the file written with another wal_segment_size?"
        );
    }

    #[test]
    fn segno_range_per_size() {
        for size in WalSegmentSize::all() {
            let last = (size.segments_per_xlog_id() - 1) as u32;
            let ok = WalFileName::segment(TimelineId(1), SegmentNo(u64::from(last)), size);
            assert_eq!(ok.seg_id(), last);
            let over = parse(&format!("00000001FFFFFFFF{:08X}", last + 1));
            assert!(over.segno(size).is_err(), "{size}");
            // The last segment of the LSN space ends exactly at 2^64.
            let end = parse(&format!("00000001FFFFFFFF{last:08X}"));
            let segno = end.segno(size).expect("last segment");
            assert_eq!(
                segno.start_lsn(size).0,
                0u64.wrapping_sub(u64::from(size.bytes()))
            );
        }
    }

    #[test]
    fn serde_as_file_name() {
        let name = parse("000000010000000000000004.00000028.backup");
        let json = serde_json::to_string(&name).expect("ser");
        assert_eq!(json, "\"000000010000000000000004.00000028.backup\"");
        assert_eq!(
            serde_json::from_str::<WalFileName>(&json).expect("de"),
            name
        );
        assert!(serde_json::from_str::<WalFileName>("\"00000000.history\"").is_err());
    }

    fn any_kind() -> impl Strategy<Value = WalFileKind> {
        prop_oneof![
            Just(WalFileKind::Segment),
            Just(WalFileKind::Partial),
            any::<u32>().prop_map(|offset| WalFileKind::Backup { offset }),
            Just(WalFileKind::History),
        ]
    }

    fn any_name() -> impl Strategy<Value = WalFileName> {
        (1..=u32::MAX, any::<u32>(), any::<u32>(), any_kind()).prop_map(|(tli, log, seg, kind)| {
            WalFileName {
                timeline: TimelineId(tli),
                log,
                seg,
                kind,
            }
            .with_kind(kind)
        })
    }

    fn any_size() -> impl Strategy<Value = WalSegmentSize> {
        (20u32..=30).prop_map(|shift| WalSegmentSize::new(1 << shift).expect("valid"))
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(name in any_name()) {
            let text = name.to_string();
            prop_assert_eq!(WalFileName::parse(&text), Ok(name.clone()));
            prop_assert_eq!(text.parse::<WalFileName>(), Ok(name));
        }

        #[test]
        fn segment_segno_round_trip(tli in 1..=u32::MAX, size in any_size(), raw in any::<u64>()) {
            // Every segment number that has a start LSN.
            let segno = SegmentNo(raw % (u64::MAX / u64::from(size.bytes()) + 1));
            let name = WalFileName::segment(TimelineId(tli), segno, size);
            prop_assert_eq!(name.segno(size), Ok(segno));
            prop_assert_eq!(WalFileName::parse(&name.to_string()), Ok(name));
        }

        #[test]
        fn parse_any_string_never_panics(s in any::<String>()) {
            let _ = WalFileName::parse(&s);
        }

        #[test]
        fn parse_name_like_string_never_panics(s in "[0-9A-Fa-fG./\\\\]{0,48}(partial|backup|history)?") {
            if let Ok(name) = WalFileName::parse(&s) {
                prop_assert_eq!(name.to_string(), s);
            }
        }
    }
}
