//! Any bytes as a WAL file name: parsing never panics, and whatever parses displays as exactly
//! the input and parses back to the same value.
//!
//! The same property runs over `corpus/wal_name/` in walcore's tests (`pg::corpus`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    walcore::pg::fuzz::wal_name_property(data);
});
