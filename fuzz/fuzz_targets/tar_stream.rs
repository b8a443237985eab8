//! Any bytes as a base backup's tar stream, fed whole or in pieces: entries or an error, never a
//! panic, and the same answer however the stream is split. The seeds run in walcore's tests too
//! (`backup::tar::tests::tar_stream_corpus`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    walcore::backup::tar::fuzz_tar_property(data);
});
