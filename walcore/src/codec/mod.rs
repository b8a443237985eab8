//! The codec: plaintext ⇄ envelope (FORMAT.md §3–4). Compress, then encrypt, per chunk; chunks
//! of one object are processed on all cores and written in order.
//!
//! - `envelope`: the byte layout, sans-IO.
//! - `key`: the master key, fingerprints, per-object keys.
//! - `chunk`: sealing and opening one chunk.
//! - `stream`: the ordered parallel encoder and decoder over `Read`/`Write`.

mod chunk;
pub mod envelope;
pub mod key;
mod parallel;
mod stream;

use std::sync::Arc;

pub use key::{Fingerprint, KeyError, MasterKey};
pub use stream::Summary;

/// Default plaintext bytes per chunk: 1 MiB keeps 16 chunks in a 16 MiB segment (both cores
/// stay busy) while storing about 1 % more than whole-file zstd on real pgbench WAL (4 MiB: 0.2 %,
/// 256 KiB: 6 %; docs/BENCHMARKS.md).
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
/// Default zstd level, chosen by measurement on real WAL (docs/BENCHMARKS.md).
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// How chunks are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd { level: i32 },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd {
            level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;

    /// `none`, `zstd` (default level) or `zstd:N` with N from 1 to 22 (negative levels down to
    /// -7 are zstd's fast modes).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "none" => return Ok(Compression::None),
            "zstd" => return Ok(Compression::default()),
            _ => {}
        }
        let bad = || {
            format!(
                "'{s}' is not a compression setting; use 'none', 'zstd' or 'zstd:N' (N from -7 to 22)"
            )
        };
        let level = s
            .strip_prefix("zstd:")
            .ok_or_else(bad)?
            .parse::<i32>()
            .map_err(|_| bad())?;
        if !(-7..=22).contains(&level) || level == 0 {
            return Err(bad());
        }
        Ok(Compression::Zstd { level })
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

/// Everything that can go wrong encoding or decoding an object. Decoding errors say where.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not a walcore object (bad magic)")]
    NotAnObject,
    #[error("unsupported format version {0} (this walcore reads version 1)")]
    UnsupportedVersion(u16),
    #[error("header checksum mismatch: the object header is corrupted")]
    HeaderChecksum,
    #[error("unknown codec {0} in the object header")]
    UnknownCodec(u8),
    #[error("unknown cipher {0} in the object header")]
    UnknownCipher(u8),
    #[error("chunk size {0} in the object header is out of range")]
    ChunkSize(u32),
    #[error("invalid object header: {0}")]
    HeaderField(&'static str),
    #[error(
        "wrong key: the object was encrypted with the key of fingerprint {object}, the configured key has fingerprint {configured}"
    )]
    WrongKey {
        object: Fingerprint,
        configured: Fingerprint,
    },
    #[error(
        "the object is encrypted (key fingerprint {object}) but no encryption key is configured"
    )]
    KeyMissing { object: Fingerprint },
    #[error(
        "the object is not encrypted but an encryption key is configured; refusing an unauthenticated object"
    )]
    Unencrypted,
    #[error("chunk {index}: unknown flags {flags:#04x}")]
    ChunkFlags { index: u64, flags: u8 },
    #[error("chunk {index}: stored length {len} exceeds the maximum {max}")]
    ChunkTooLarge { index: u64, len: u32, max: u32 },
    #[error("chunk {index}: checksum mismatch (corrupted)")]
    ChunkChecksum { index: u64 },
    #[error(
        "chunk {index}: authentication failed (corrupted, truncated, reordered, or stored under another name)"
    )]
    ChunkAuth { index: u64 },
    #[error("chunk {index}: payload shorter than its tag or checksum")]
    ChunkShort { index: u64 },
    #[error("chunk {index}: decompression failed: {message}")]
    Decompress { index: u64, message: String },
    #[error("chunk {index}: holds {got} bytes, expected {expected}")]
    ChunkLength {
        index: u64,
        got: usize,
        expected: String,
    },
    #[error("object truncated {0}")]
    Truncated(&'static str),
    #[error("trailer missing or corrupted after the final chunk")]
    TrailerMissing,
    #[error("trailer checksum mismatch")]
    TrailerChecksum,
    #[error(
        "trailer says {expected_len} bytes with CRC-32 {expected_crc:08x}, decoded {got_len} bytes with CRC-32 {got_crc:08x}"
    )]
    TrailerMismatch {
        expected_len: u64,
        expected_crc: u32,
        got_len: u64,
        got_crc: u32,
    },
    #[error("trailing garbage after the trailer at byte {offset}")]
    TrailingGarbage { offset: u64 },
    #[error("compression failed: {0}")]
    Compress(String),
    #[error("encryption failed")]
    Encrypt,
    #[error("reading input: {0}")]
    Read(#[source] std::io::Error),
    #[error("writing output: {0}")]
    Write(#[source] std::io::Error),
}

impl CodecError {
    /// True for errors that mean "these bytes are not a valid object" (as opposed to I/O, or a
    /// key problem).
    pub fn is_integrity(&self) -> bool {
        !matches!(
            self,
            CodecError::WrongKey { .. }
                | CodecError::KeyMissing { .. }
                | CodecError::Read(_)
                | CodecError::Write(_)
                | CodecError::Compress(_)
                | CodecError::Encrypt
        )
    }
}

/// Encoding and decoding settings. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Codec {
    compression: Compression,
    key: Option<Arc<MasterKey>>,
    chunk_size: u32,
    threads: usize,
}

impl Codec {
    /// A codec with the given compression and optional key, default chunk size, and one worker
    /// thread per available core.
    pub fn new(compression: Compression, key: Option<Arc<MasterKey>>) -> Codec {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Codec {
            compression,
            key,
            chunk_size: DEFAULT_CHUNK_SIZE,
            threads,
        }
    }

    /// Sets the plaintext chunk size (clamped to the range the format allows).
    pub fn with_chunk_size(mut self, size: u32) -> Codec {
        self.chunk_size = size.clamp(envelope::MIN_CHUNK_SIZE, envelope::MAX_CHUNK_SIZE);
        self
    }

    /// The same key and chunk size with another compression.
    pub fn with_compression(mut self, compression: Compression) -> Codec {
        self.compression = compression;
        self
    }

    /// Sets how many threads encode or decode the chunks of one object.
    pub fn with_threads(mut self, threads: usize) -> Codec {
        self.threads = threads.max(1);
        self
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    pub fn key(&self) -> Option<&MasterKey> {
        self.key.as_deref()
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

#[cfg(test)]
mod tests;

/// The property of the `envelope` fuzz target (and of the corpus replay test): any bytes as a
/// stored object decode or fail without panicking, one and two decoder threads agree, and what
/// decodes round-trips. Not part of the stable API.
#[doc(hidden)]
pub fn fuzz_envelope_property(data: &[u8]) {
    const KEY: [u8; 32] = [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
        25, 26, 27, 28, 29, 30, 31,
    ];
    const NAME: &str = "wal/00000001/00000000/000000010000000000000003";
    // Objects without encryption are read by a codec without a key; others with the key.
    let encrypted = data.get(11).is_some_and(|&c| c != 0);
    let key = encrypted.then(|| Arc::new(MasterKey::from_bytes(KEY)));
    let one = Codec::new(Compression::None, key.clone()).with_threads(1);
    let two = Codec::new(Compression::None, key.clone()).with_threads(2);
    let a = one.decode_to_vec(NAME, data);
    let b = two.decode_to_vec(NAME, data);
    match (a, b) {
        (Ok(x), Ok(y)) => {
            assert_eq!(x, y, "thread counts disagree on the plaintext");
            let again = Codec::new(Compression::default(), key)
                .encode_to_vec(NAME, &x)
                .expect("re-encode");
            assert_eq!(one.decode_to_vec(NAME, &again).expect("decode again"), x);
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!("thread counts disagree: {a:?} vs {b:?}"),
    }
}
