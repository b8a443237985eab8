//! Any bytes as the first page of a WAL segment: parsing and checking never panic; what parses
//! re-encodes to the same 40 bytes (the 4 padding bytes after `xlp_rem_len` aside: PostgreSQL
//! zeroes them and never reads them); and checking the header against the segment its own
//! fields name passes exactly when the checks that need no outside knowledge pass.
//!
//! The same property runs over `corpus/wal_page_header/` in walcore's tests (`pg::corpus`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    walcore::pg::fuzz::wal_page_header_property(data);
});
