//! Synthetic WAL for the unit tests of the operations.

use crate::pg::{LongPageHeader, Lsn, TimelineId};

/// Size of the synthetic segments: PostgreSQL's default.
pub const SEG: u32 = 16 << 20;

/// A 16 MiB segment `no` of timeline 1 of cluster `system_id`: a valid first page, `fill`
/// elsewhere, and its number at offset 8192 so that every segment differs.
pub fn segment(no: u64, system_id: u64, fill: u8) -> Vec<u8> {
    let mut seg = vec![fill; SEG as usize];
    let header = LongPageHeader {
        magic: 0xD110,
        info: 0x0006,
        timeline: TimelineId(1),
        page_addr: Lsn(no * u64::from(SEG)),
        rem_len: 0,
        system_id,
        seg_size: SEG,
        block_size: 8192,
    };
    seg[..40].copy_from_slice(&header.encode());
    seg[8192..8200].copy_from_slice(&no.to_le_bytes());
    seg
}

/// The file name of segment `no` of timeline 1 (16 MiB segments).
pub fn seg_name(no: u64) -> String {
    format!("00000001{:08X}{:08X}", no >> 8, no & 0xff)
}
