//! Any bytes as a stored object: decoding never panics; one and several decoder threads agree
//! on the outcome; whatever decodes re-encodes and decodes back to the same plaintext.
//!
//! The same property runs over `corpus/envelope/` in walcore's tests (`codec::tests`). The seeds
//! are encrypted with the key `000102…1f` under the name below, as the golden vectors are.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    walcore::codec::fuzz_envelope_property(data);
});
