//! Any bytes as a WAL file name: parsing never panics, and whatever parses displays as exactly
//! the input and parses back to the same value.
//!
//! The same property runs over `corpus/wal_name/` in walcore's tests (`pg::corpus`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use walcore::pg::WalFileName;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(name) = WalFileName::parse(text) {
        assert_eq!(name.to_string(), text);
        assert_eq!(WalFileName::parse(&name.to_string()).as_ref(), Ok(&name));
    }
});
