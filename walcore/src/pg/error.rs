//! The one error type of the `pg` module.
//!
//! Every variant carries the input it is about (an LSN string, a file name, a segment name), so a
//! message read in PostgreSQL's log names the object without any context added further up.

use std::fmt;

use super::lsn::{Lsn, TimelineId, WalSegmentSize};
use super::walname::WalFileName;

/// Inputs quoted in error messages are cut to this many characters, so that a hostile or corrupt
/// input of megabytes does not become a megabyte log line.
const MAX_QUOTED_CHARS: usize = 64;

/// An error from parsing or checking PostgreSQL vocabulary: LSNs, WAL file names, segment sizes,
/// WAL page headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// Text that is not an LSN in PostgreSQL's `%X/%X` form (as `pg_lsn_in` would reject it).
    #[error(
        "invalid LSN {input:?}: {problem} (expected two groups of 1 to 8 hexadecimal digits \
         separated by '/', like 16/B374D848)"
    )]
    InvalidLsn {
        /// The input, shortened if long.
        input: String,
        /// What is wrong with it.
        problem: LsnProblem,
    },

    /// A segment size that PostgreSQL's `IsValidWalSegSize` rejects.
    #[error(
        "invalid WAL segment size {bytes} bytes: PostgreSQL allows only a power of two from \
         1 MiB to 1 GiB (wal_segment_size)"
    )]
    InvalidSegmentSize {
        /// The rejected size in bytes.
        bytes: u32,
    },

    /// Text that is not one of the WAL file names PostgreSQL writes.
    #[error("invalid WAL file name {name:?}: {problem}")]
    InvalidWalFileName {
        /// The input, shortened if long.
        name: String,
        /// What is wrong with it.
        problem: NameProblem,
    },

    /// The segment part of a file name (its last 8 hex digits) is too large for the segment size,
    /// so the name cannot have been written by a cluster with that `wal_segment_size`.
    #[error(
        "{name}: segment part {seg_id:08X} is out of range for {seg_size} segments \
         (at most {max:08X}); was the file written with another wal_segment_size?"
    )]
    SegmentOutOfRange {
        /// The file name.
        name: WalFileName,
        /// The segment part of the name.
        seg_id: u32,
        /// The largest valid segment part for `seg_size`.
        max: u32,
        /// The segment size the name was interpreted with.
        seg_size: WalSegmentSize,
    },

    /// A timeline history or backup history file was used where a WAL segment is needed.
    #[error("{name} is a {kind}, not a WAL segment")]
    NotASegment {
        /// The file name.
        name: WalFileName,
        /// Human description of what it is instead.
        kind: &'static str,
    },

    /// Fewer bytes than a long WAL page header (`SizeOfXLogLongPHD`).
    #[error("WAL page header: need {needed} bytes, got {got}")]
    TruncatedPageHeader {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        got: usize,
    },

    /// A timeline history file that `readTimeLineHistory` would reject. The line is not
    /// quoted: a damaged file may hold anything.
    #[error("{:08X}.history, line {line}: {problem}", timeline.0)]
    InvalidHistory {
        /// The timeline whose history file it is.
        timeline: TimelineId,
        /// The line (from 1; 0 for the whole file).
        line: usize,
        /// What is wrong with it.
        problem: HistoryProblem,
    },

    /// The first page of a WAL segment contradicts its file name or the expectations.
    #[error("{name}: {problem}")]
    SegmentHeader {
        /// The file the page was read from.
        name: WalFileName,
        /// The first failed check.
        problem: HeaderProblem,
    },
}

/// Why a string is not an LSN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LsnProblem {
    /// There is no '/' after the first group of hex digits.
    MissingSlash,
    /// The part before '/' is not 1 to 8 hexadecimal digits.
    BadHighPart,
    /// The part after '/' is not 1 to 8 hexadecimal digits, or there is trailing text.
    BadLowPart,
}

impl fmt::Display for LsnProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LsnProblem::MissingSlash => "no '/' after the first hexadecimal group",
            LsnProblem::BadHighPart => "the part before '/' is not 1 to 8 hexadecimal digits",
            LsnProblem::BadLowPart => {
                "the part after '/' is not 1 to 8 hexadecimal digits (or text follows it)"
            }
        })
    }
}

/// Why a string is not a WAL file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameProblem {
    /// The name contains '/', '\\' or NUL: a path was given where a bare file name belongs.
    PathSeparator,
    /// Hex digits in lower case; PostgreSQL always writes file names in upper case.
    LowerCaseHex,
    /// A character that is not a hex digit where the name needs one.
    NotHex,
    /// Timeline 0, which PostgreSQL never uses (timelines start at 1).
    TimelineZero,
    /// Not one of the shapes PostgreSQL writes (wrong length or suffix).
    UnrecognizedForm,
}

impl fmt::Display for NameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameProblem::PathSeparator => "a bare file name is needed, not a path",
            NameProblem::LowerCaseHex => {
                "hexadecimal digits must be upper case, as PostgreSQL writes them"
            }
            NameProblem::NotHex => "contains a character that is not a hexadecimal digit",
            NameProblem::TimelineZero => "timeline 0 does not exist (timelines start at 1)",
            NameProblem::UnrecognizedForm => {
                "expected a WAL segment (24 hex digits), optionally with .partial or \
                 .XXXXXXXX.backup, or a timeline history file (8 hex digits + .history)"
            }
        })
    }
}

/// Why a timeline history file is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HistoryProblem {
    /// The file is not UTF-8 text.
    NotText,
    /// The line does not start with a decimal timeline ID.
    BadTimeline,
    /// The timeline ID is not followed by a switch point in `%X/%X` form.
    BadSwitchPoint,
    /// A timeline ID not above the one on the line before.
    NotIncreasing,
    /// A parent timeline not below the timeline of the file.
    NotBelowTimeline,
}

impl fmt::Display for HistoryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HistoryProblem::NotText => "not text",
            HistoryProblem::BadTimeline => "expected a numeric timeline ID",
            HistoryProblem::BadSwitchPoint => "expected a switch point (an LSN such as 0/5000060)",
            HistoryProblem::NotIncreasing => "timeline IDs must be in increasing sequence",
            HistoryProblem::NotBelowTimeline => {
                "a parent timeline ID must be less than the file's own"
            }
        })
    }
}

/// The first check that the first page of a WAL segment failed, in `check_segment_header`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderProblem {
    /// Fewer bytes than a long page header.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// `xlp_magic` is not the `XLOG_PAGE_MAGIC` of a supported PostgreSQL major version.
    UnknownMagic {
        /// The value found.
        magic: u16,
    },
    /// `xlp_info` lacks `XLP_LONG_HEADER`: this is not the first page of a segment.
    NotLongHeader {
        /// The `xlp_info` found.
        info: u16,
    },
    /// `xlp_seg_size` fails `IsValidWalSegSize`.
    InvalidSegmentSize {
        /// The value found.
        bytes: u32,
    },
    /// `xlp_seg_size` differs from the expected segment size.
    SegmentSizeMismatch {
        /// The size in the header.
        found: WalSegmentSize,
        /// The size expected.
        expected: WalSegmentSize,
    },
    /// `xlp_xlog_blcksz` is not a WAL block size PostgreSQL can be built with.
    InvalidBlockSize {
        /// The value found.
        bytes: u32,
    },
    /// `xlp_sysid` differs from the expected system identifier.
    SystemIdMismatch {
        /// The system identifier in the header.
        found: u64,
        /// The system identifier expected.
        expected: u64,
    },
    /// `xlp_pageaddr` is not where the segment named by the file starts.
    PageAddressMismatch {
        /// The page address in the header.
        found: Lsn,
        /// The start of the segment the file name denotes.
        expected: Lsn,
    },
    /// `xlp_tli` is 0.
    TimelineZero,
    /// `xlp_tli` is later than the timeline in the file name.
    TimelineAfterName {
        /// The timeline in the header.
        found: TimelineId,
        /// The timeline in the file name.
        name_timeline: TimelineId,
    },
}

impl fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderProblem::Truncated { needed, got } => {
                write!(f, "WAL page header: need {needed} bytes, got {got}")
            }
            HeaderProblem::UnknownMagic { magic } => write!(
                f,
                "unknown WAL page magic 0x{magic:04X}: not WAL from a supported PostgreSQL \
                 version (13 to 18), or not a WAL file at all"
            ),
            HeaderProblem::NotLongHeader { info } => write!(
                f,
                "first page has no long header (xlp_info 0x{info:04X} lacks XLP_LONG_HEADER), \
                 so it is not the start of a WAL segment"
            ),
            HeaderProblem::InvalidSegmentSize { bytes } => write!(
                f,
                "page header gives segment size {bytes} bytes, which is not a valid \
                 wal_segment_size"
            ),
            HeaderProblem::SegmentSizeMismatch { found, expected } => write!(
                f,
                "segment size in the page header is {found}, but {expected} was expected"
            ),
            HeaderProblem::InvalidBlockSize { bytes } => write!(
                f,
                "page header gives WAL block size {bytes} bytes, not a power of two from \
                 1 KiB to 64 KiB"
            ),
            HeaderProblem::SystemIdMismatch { found, expected } => write!(
                f,
                "WAL is from database system {found}, but system {expected} was expected \
                 (a segment from another cluster?)"
            ),
            HeaderProblem::PageAddressMismatch { found, expected } => write!(
                f,
                "page address {found} does not match the file name (expected {expected})"
            ),
            HeaderProblem::TimelineZero => {
                f.write_str("page header timeline is 0, which PostgreSQL never writes")
            }
            HeaderProblem::TimelineAfterName {
                found,
                name_timeline,
            } => write!(
                f,
                "page header timeline {found} is later than the file name's timeline \
                 {name_timeline}"
            ),
        }
    }
}

/// `input`, cut to [`MAX_QUOTED_CHARS`] characters with a marker, for quoting in an error.
pub(crate) fn quoted(input: &str) -> String {
    match input.char_indices().nth(MAX_QUOTED_CHARS) {
        None => input.to_owned(),
        Some((cut, _)) => format!("{}… ({} bytes)", &input[..cut], input.len()),
    }
}
