//! PostgreSQL vocabulary: WAL positions, timelines, segments, WAL file names and WAL page
//! headers, as types that parse and display exactly as PostgreSQL does.
//!
//! This module is pure (no I/O, no async) and is the only place in walcore that knows how
//! PostgreSQL spells these things: nothing else slices a 24-character file name or reads a page
//! header by hand. Each item names the PostgreSQL macro or function it mirrors, mostly from
//! `src/include/access/xlog_internal.h`.
//!
//! - [`Lsn`], [`TimelineId`], [`SegmentNo`], [`WalSegmentSize`]: positions and segment
//!   arithmetic (`XLogRecPtr`, `XLByteToSeg`, `XLogSegmentOffset`, ...).
//! - [`WalFileName`]: the names in `pg_wal` that `archive_command` receives and
//!   `restore_command` is asked for (`XLogFileName`, `XLogFromFileName`, `IsXLogFileName`, ...).
//! - [`TimelineHistory`]: a timeline history file, where a timeline branched off its ancestors
//!   (`readTimeLineHistory`).
//! - [`parse_long_page_header`], [`check_segment_header`]: the header of a segment's first page
//!   (`XLogLongPageHeaderData`), checked against the file's name before a segment is archived
//!   or handed back to PostgreSQL.
//!
//! What it does not do: read files, decode WAL records, or know about the repository.

mod error;
#[doc(hidden)]
pub mod fuzz;
mod history;
mod lsn;
mod page;
mod walname;

#[cfg(test)]
pub(crate) mod corpus;

pub use error::{HeaderProblem, HistoryProblem, LsnProblem, NameProblem, PgError};
pub use history::{HistoryEntry, TimelineHistory};
pub use lsn::{Lsn, SegmentNo, TimelineId, WalSegmentSize};
pub use page::{
    LongPageHeader, SIZE_OF_XLOG_LONG_PHD, SIZE_OF_XLOG_SHORT_PHD, SegmentExpectations,
    XLP_LONG_HEADER, check_segment_header, parse_long_page_header, pg_major_for_magic,
};
pub use walname::{WalFileKind, WalFileName};

/// Real PostgreSQL output used by the tests of several submodules.
#[cfg(test)]
pub(crate) mod test_fixtures {
    /// `SELECT system_identifier FROM pg_control_system()` of the PostgreSQL 15 cluster that
    /// wrote the headers in `fuzz/corpus/wal_page_header/`.
    pub(crate) const PG15_SYSTEM_ID: u64 = 7_710_833_890_326_936_449;

    /// The first 40 bytes of a segment archived by that cluster, committed as a seed of the
    /// `wal_page_header` fuzz target (`fuzz/corpus/wal_page_header/pg15-<file>`).
    pub(crate) fn pg15_header(file: &str) -> Vec<u8> {
        let path = super::corpus::corpus_dir("wal_page_header").join(format!("pg15-{file}"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}
