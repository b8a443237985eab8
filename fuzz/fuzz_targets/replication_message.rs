//! Any bytes as what a PostgreSQL server sends on a replication connection: parsing never
//! panics; the slice parser and the splitting parser agree message by message; every message
//! re-encodes to the bytes it came from (error and notice texts that are not UTF-8 aside, which
//! are decoded with replacement characters and must then re-parse to the same message); a
//! partial message or an error consumes nothing. The messages then go through the base backup
//! layer: every CopyData payload parses as a BASE_BACKUP sub-message or fails cleanly (and
//! re-encodes exactly when it parses), and the BASE_BACKUP decoder, fed the whole sequence,
//! never panics and is done after its first error. Every CopyData payload also goes through
//! the WAL stream parser of `START_REPLICATION`.
//!
//! The same property runs over `corpus/replication_message/` in walcore's tests
//! (`replication::corpus`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    walcore::replication::fuzz::replication_message_property(data);
});
