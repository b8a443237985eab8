//! Any bytes as a catalog record: a checked record or an error, never a panic; a valid record
//! survives a JSON round trip. The seeds run in walcore's tests too
//! (`backup::catalog::tests::catalog_corpus`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = walcore::backup::catalog::fuzz_catalog_property(data);
});
