//! Codec properties and golden vectors (FORMAT.md): round trips, and every kind of damage the
//! format promises to detect.

use std::path::PathBuf;
use std::sync::Arc;

use proptest::prelude::*;

use super::envelope::{HEADER_LEN, MIN_CHUNK_SIZE};
use super::*;

const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const OTHER_KEY_HEX: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";
const NAME: &str = "wal/00000001/00000000/000000010000000000000003";
const OTHER_NAME: &str = "wal/00000001/00000000/000000010000000000000004";

fn key(hex: &str) -> Option<Arc<MasterKey>> {
    Some(Arc::new(MasterKey::from_hex(hex).expect("valid test key")))
}

fn codec(compression: Compression, key: Option<Arc<MasterKey>>) -> Codec {
    Codec::new(compression, key).with_chunk_size(MIN_CHUNK_SIZE)
}

/// Plaintext that looks a little like WAL: runs of structure and runs of noise.
fn sample(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if (i / 512) % 3 == 0 {
                (x & 0xff) as u8
            } else {
                (i % 251) as u8
            }
        })
        .collect()
}

fn all_codecs() -> Vec<Codec> {
    let mut v = Vec::new();
    for compression in [Compression::None, Compression::Zstd { level: 1 }] {
        for k in [None, key(KEY_HEX)] {
            for threads in [1, 3] {
                v.push(codec(compression, k.clone()).with_threads(threads));
            }
        }
    }
    v
}

#[test]
fn round_trips_at_chunk_boundaries() {
    let cs = MIN_CHUNK_SIZE as usize;
    for c in all_codecs() {
        for len in [0, 1, cs - 1, cs, cs + 1, 3 * cs, 3 * cs + 7] {
            let plain = sample(len);
            let stored = c.encode_to_vec(NAME, &plain).expect("encode");
            let back = c.decode_to_vec(NAME, &stored).expect("decode");
            assert_eq!(back, plain, "len {len} with {c:?}");
        }
    }
}

#[test]
fn summary_matches_the_trailer() {
    let c = codec(Compression::default(), key(KEY_HEX));
    let plain = sample(200_000);
    let mut stored = Vec::new();
    let s = c.encode(NAME, &plain[..], &mut stored).expect("encode");
    assert_eq!(s.plaintext_len, plain.len() as u64);
    assert_eq!(s.plaintext_crc, crc32fast::hash(&plain));
    assert_eq!(s.stored_len, stored.len() as u64);
    let d = c
        .decode(NAME, &stored[..], std::io::sink())
        .expect("decode");
    assert_eq!(d, s);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_plaintext_round_trips(plain in proptest::collection::vec(any::<u8>(), 0..300_000), which in 0usize..8) {
        let c = &all_codecs()[which];
        let stored = c.encode_to_vec(NAME, &plain).expect("encode");
        prop_assert_eq!(c.decode_to_vec(NAME, &stored).expect("decode"), plain);
    }

    #[test]
    fn any_bytes_give_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), which in 0usize..8) {
        let c = &all_codecs()[which];
        let _ = c.decode_to_vec(NAME, &bytes);
        // With a valid header in front, the chunk parser gets exercised too.
        let mut framed = c.encode_to_vec(NAME, b"")?.into_iter().take(HEADER_LEN).collect::<Vec<_>>();
        framed.extend_from_slice(&bytes);
        prop_assert!(c.decode_to_vec(NAME, &framed).is_err() || bytes.len() >= 25);
    }

    #[test]
    fn any_single_byte_flip_is_detected(pos_frac in 0.0f64..1.0, bit in 0u8..8, which in 0usize..8) {
        let c = &all_codecs()[which];
        let plain = sample(150_000);
        let mut stored = c.encode_to_vec(NAME, &plain).expect("encode");
        let pos = ((stored.len() - 1) as f64 * pos_frac) as usize;
        stored[pos] ^= 1 << bit;
        prop_assert!(c.decode_to_vec(NAME, &stored).is_err(), "flip at {} of {}", pos, stored.len());
    }
}

#[test]
fn compression_setting_parses() {
    assert_eq!("none".parse::<Compression>(), Ok(Compression::None));
    assert_eq!(
        "zstd:7".parse::<Compression>(),
        Ok(Compression::Zstd { level: 7 })
    );
    assert_eq!("zstd".parse::<Compression>(), Ok(Compression::default()));
    for bad in ["zstd:0", "zstd:23", "gzip", "zstd:x", ""] {
        let e = bad.parse::<Compression>().unwrap_err();
        assert!(e.contains("not a compression setting"), "{e}");
    }
}

// ---- Golden vectors -------------------------------------------------------------------------

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/envelope")
}

/// One committed vector: a file, how to read it, and what must come out.
struct Vector {
    file: &'static str,
    key: Option<&'static str>,
    name: &'static str,
    /// `Ok(plaintext length)` or the error it must give.
    expect: Result<usize, fn(&CodecError) -> bool>,
}

const GOLDEN_PLAIN_LEN: usize = 2 * 65536 + 1000;

fn vectors() -> Vec<Vector> {
    use CodecError as E;
    vec![
        Vector {
            file: "plain-none.wco",
            key: None,
            name: NAME,
            expect: Ok(GOLDEN_PLAIN_LEN),
        },
        Vector {
            file: "zstd-none.wco",
            key: None,
            name: NAME,
            expect: Ok(GOLDEN_PLAIN_LEN),
        },
        Vector {
            file: "zstd-aes.wco",
            key: Some(KEY_HEX),
            name: NAME,
            expect: Ok(GOLDEN_PLAIN_LEN),
        },
        Vector {
            file: "empty-aes.wco",
            key: Some(KEY_HEX),
            name: NAME,
            expect: Ok(0),
        },
        Vector {
            file: "truncated-aes.wco",
            key: Some(KEY_HEX),
            name: NAME,
            expect: Err(|e| matches!(e, E::Truncated(_))),
        },
        Vector {
            file: "missing-final-aes.wco",
            key: Some(KEY_HEX),
            name: NAME,
            expect: Err(|e| matches!(e, E::ChunkAuth { index: 1 })),
        },
        Vector {
            file: "bad-tag-chunk2-aes.wco",
            key: Some(KEY_HEX),
            name: NAME,
            expect: Err(|e| matches!(e, E::ChunkAuth { index: 1 })),
        },
        Vector {
            file: "trailing-garbage-aes.wco",
            key: Some(KEY_HEX),
            name: NAME,
            expect: Err(|e| matches!(e, E::TrailingGarbage { .. })),
        },
        Vector {
            file: "unknown-version.wco",
            key: Some(KEY_HEX),
            name: NAME,
            expect: Err(|e| matches!(e, E::UnsupportedVersion(2))),
        },
        Vector {
            file: "zstd-aes.wco",
            key: Some(OTHER_KEY_HEX),
            name: NAME,
            expect: Err(|e| matches!(e, E::WrongKey { .. })),
        },
        Vector {
            file: "zstd-aes.wco",
            key: Some(KEY_HEX),
            name: OTHER_NAME,
            expect: Err(|e| matches!(e, E::ChunkAuth { index: 0 })),
        },
        Vector {
            file: "zstd-none.wco",
            key: None,
            name: OTHER_NAME,
            expect: Err(|e| matches!(e, E::ChunkChecksum { index: 0 })),
        },
        Vector {
            file: "swapped-chunks-aes.wco",
            key: Some(KEY_HEX),
            name: NAME,
            expect: Err(|e| matches!(e, E::ChunkAuth { index: 0 })),
        },
        Vector {
            file: "bad-crc-chunk2-none.wco",
            key: None,
            name: NAME,
            expect: Err(|e| matches!(e, E::ChunkChecksum { index: 1 })),
        },
        Vector {
            file: "zstd-aes.wco",
            key: None,
            name: NAME,
            expect: Err(|e| matches!(e, E::KeyMissing { .. })),
        },
        Vector {
            file: "zstd-none.wco",
            key: Some(KEY_HEX),
            name: NAME,
            expect: Err(|e| matches!(e, E::Unencrypted)),
        },
    ]
}

/// Byte offsets of the chunk records of a valid vector: (start, end) of each record.
fn chunk_spans(stored: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut at = HEADER_LEN;
    loop {
        let len = u32::from_be_bytes([stored[at], stored[at + 1], stored[at + 2], stored[at + 3]])
            as usize;
        let end = at + 5 + len;
        spans.push((at, end));
        if stored[at + 4] & 1 == 1 {
            return spans;
        }
        at = end;
    }
}

/// Builds every vector file. Valid ones come from the encoder with a fixed salt; damaged ones
/// are edits of those.
fn build_vectors() -> Vec<(&'static str, Vec<u8>)> {
    let plain = sample(GOLDEN_PLAIN_LEN);
    let salt = [7u8; 32];
    let enc = |compression, k: Option<&str>, data: &[u8]| {
        let mut out = Vec::new();
        codec(compression, k.and_then(key))
            .with_threads(1)
            .encode_with_salt(NAME, salt, data, &mut out)
            .expect("encode");
        out
    };
    let plain_none = enc(Compression::None, None, &plain);
    let zstd_none = enc(Compression::Zstd { level: 3 }, None, &plain);
    let zstd_aes = enc(Compression::Zstd { level: 3 }, Some(KEY_HEX), &plain);
    let empty_aes = enc(Compression::Zstd { level: 3 }, Some(KEY_HEX), b"");
    let spans = chunk_spans(&zstd_aes);
    assert_eq!(spans.len(), 3);

    let truncated = zstd_aes[..spans[1].1].to_vec();
    // Cut after chunk 2 and append a trailer: the last chunk present is not marked final.
    let mut missing_final = zstd_aes[..spans[1].1].to_vec();
    missing_final.extend_from_slice(&zstd_aes[spans[2].1..]);
    // Mark chunk 2 final by hand too: the flag is in the nonce, so authentication fails.
    missing_final[spans[1].0 + 4] = 1;
    let mut bad_tag = zstd_aes.clone();
    bad_tag[spans[1].1 - 3] ^= 0x40;
    let mut garbage = zstd_aes.clone();
    garbage.extend_from_slice(b"\0\0\0\0extra");
    let mut unknown_version = zstd_aes.clone();
    unknown_version[9] = 2;
    let crc = crc32fast::hash(&unknown_version[..64]);
    unknown_version[64..68].copy_from_slice(&crc.to_be_bytes());
    let mut swapped = zstd_aes[..HEADER_LEN].to_vec();
    swapped.extend_from_slice(&zstd_aes[spans[1].0..spans[1].1]);
    swapped.extend_from_slice(&zstd_aes[spans[0].0..spans[0].1]);
    swapped.extend_from_slice(&zstd_aes[spans[2].0..]);
    let none_spans = chunk_spans(&zstd_none);
    let mut bad_crc = zstd_none.clone();
    bad_crc[none_spans[1].1 - 1] ^= 0x01;

    vec![
        ("plain-none.wco", plain_none),
        ("zstd-none.wco", zstd_none),
        ("zstd-aes.wco", zstd_aes),
        ("empty-aes.wco", empty_aes),
        ("truncated-aes.wco", truncated),
        ("missing-final-aes.wco", missing_final),
        ("bad-tag-chunk2-aes.wco", bad_tag),
        ("trailing-garbage-aes.wco", garbage),
        ("unknown-version.wco", unknown_version),
        ("swapped-chunks-aes.wco", swapped),
        ("bad-crc-chunk2-none.wco", bad_crc),
    ]
}

/// `WALCORE_REGENERATE_VECTORS=1 cargo test -p walcore golden` rewrites the committed files;
/// only do that with a format version change.
#[test]
fn golden_vectors() {
    let dir = vectors_dir();
    if std::env::var_os("WALCORE_REGENERATE_VECTORS").is_some() {
        std::fs::create_dir_all(&dir).expect("mkdir");
        for (file, bytes) in build_vectors() {
            std::fs::write(dir.join(file), bytes).expect("write vector");
        }
    }
    let plain = sample(GOLDEN_PLAIN_LEN);
    for v in vectors() {
        let stored = std::fs::read(dir.join(v.file)).unwrap_or_else(|e| panic!("{}: {e}", v.file));
        let c = Codec::new(Compression::None, v.key.and_then(key));
        let result = c.decode_to_vec(v.name, &stored);
        match (v.expect, result) {
            (Ok(len), Ok(out)) => {
                assert_eq!(out.len(), len, "{}", v.file);
                assert_eq!(out, plain[..len], "{}", v.file);
            }
            (Err(check), Err(e)) => assert!(
                check(&e),
                "{} ({:?}, {}): wrong error: {e}",
                v.file,
                v.key.map(|_| "key"),
                v.name
            ),
            (Ok(_), Err(e)) => panic!("{}: expected to decode, got {e}", v.file),
            (Err(_), Ok(_)) => panic!("{} with {}: decoded but must fail", v.file, v.name),
        }
    }
    // The uncompressed vectors do not depend on the zstd library: they must be reproduced
    // byte for byte, or the format changed.
    for (file, bytes) in build_vectors() {
        if file.ends_with("-none.wco") && file.starts_with("plain") {
            assert_eq!(
                std::fs::read(dir.join(file)).expect("read"),
                bytes,
                "{file} changed"
            );
        }
    }
}

#[test]
fn wrong_key_names_both_fingerprints() {
    let stored = codec(Compression::default(), key(KEY_HEX))
        .encode_to_vec(NAME, b"x")
        .expect("encode");
    let e = codec(Compression::default(), key(OTHER_KEY_HEX))
        .decode_to_vec(NAME, &stored)
        .unwrap_err();
    let msg = e.to_string();
    let a = MasterKey::from_hex(KEY_HEX)
        .expect("key")
        .fingerprint()
        .to_string();
    let b = MasterKey::from_hex(OTHER_KEY_HEX)
        .expect("key")
        .fingerprint()
        .to_string();
    assert!(
        msg.contains(&a) && msg.contains(&b) && msg.contains("wrong key"),
        "{msg}"
    );
    assert!(!e.is_integrity());
}

/// Replays `fuzz/corpus/envelope/` with the fuzz target's property.
#[test]
fn envelope_corpus() {
    for (file, bytes) in crate::pg::corpus::corpus_files("envelope") {
        let r = std::panic::catch_unwind(|| fuzz_envelope_property(&bytes));
        assert!(r.is_ok(), "seed {file} broke the property");
    }
}
