//! Sealing and opening one chunk (FORMAT.md §3.2).

use std::cell::RefCell;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};

use super::envelope::{ChunkRecord, FLAG_FINAL, HEADER_LEN, Header, TAG_LEN};
use super::{CodecError, Compression};

thread_local! {
    // One zstd context per thread and level: a context allocates its tables once, not per chunk.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// What one object's chunks share: the header bytes and name (the associated data), the
/// cipher, and the codec.
pub(crate) struct ChunkContext {
    header: Header,
    /// `H || N`: the associated data of every chunk (and the start of the CRC input).
    aad: Vec<u8>,
    /// CRC state after `H || N`, cloned per chunk.
    crc_base: crc32fast::Hasher,
    cipher: Option<Aes256Gcm>,
}

impl std::fmt::Debug for ChunkContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkContext")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

fn nonce(index: u64, flags: u8) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    // u88 big-endian: the top three bytes of the index are always zero for a u64 index.
    n[3..11].copy_from_slice(&index.to_be_bytes());
    n[11] = flags;
    Nonce::from(n)
}

impl ChunkContext {
    pub(crate) fn new(
        header: Header,
        header_bytes: &[u8; HEADER_LEN],
        name: &str,
        object_key: Option<super::key::ObjectKey>,
    ) -> ChunkContext {
        let mut aad = Vec::with_capacity(HEADER_LEN + name.len());
        aad.extend_from_slice(header_bytes);
        aad.extend_from_slice(name.as_bytes());
        let mut crc_base = crc32fast::Hasher::new();
        crc_base.update(&aad);
        // The cipher keeps its own expanded key (wiped on drop: aes-gcm's `zeroize` feature);
        // `object_key` is wiped when it goes out of scope here.
        let cipher = object_key.map(|k| Aes256Gcm::new((&*k).into()));
        ChunkContext {
            header,
            aad,
            crc_base,
            cipher,
        }
    }

    fn chunk_crc(&self, index: u64, flags: u8, data: &[u8]) -> u32 {
        let mut h = self.crc_base.clone();
        h.update(&index.to_be_bytes());
        h.update(&[flags]);
        h.update(data);
        h.finalize()
    }

    /// Compresses and protects one chunk's plaintext; returns the payload.
    pub(crate) fn seal(
        &self,
        compression: Compression,
        index: u64,
        flags: u8,
        plain: &[u8],
    ) -> Result<Vec<u8>, CodecError> {
        let mut z = match compression {
            Compression::None => {
                let mut v = Vec::with_capacity(plain.len() + TAG_LEN);
                v.extend_from_slice(plain);
                v
            }
            Compression::Zstd { level } => compress(level, plain)?,
        };
        match &self.cipher {
            None => {
                let crc = self.chunk_crc(index, flags, &z);
                z.extend_from_slice(&crc.to_be_bytes());
            }
            Some(cipher) => {
                cipher
                    .encrypt_in_place(&nonce(index, flags), &self.aad, &mut z)
                    .map_err(|_| CodecError::Encrypt)?;
            }
        }
        Ok(z)
    }

    /// Verifies, decrypts and decompresses one chunk; checks its plaintext length.
    pub(crate) fn open(&self, record: ChunkRecord) -> Result<Vec<u8>, CodecError> {
        let ChunkRecord {
            index,
            flags,
            payload,
        } = record;
        let mut data = Vec::from(payload);
        match &self.cipher {
            None => {
                if data.len() < 4 {
                    return Err(CodecError::ChunkShort { index });
                }
                let split = data.len() - 4;
                let stored = u32::from_be_bytes([
                    data[split],
                    data[split + 1],
                    data[split + 2],
                    data[split + 3],
                ]);
                data.truncate(split);
                if self.chunk_crc(index, flags, &data) != stored {
                    return Err(CodecError::ChunkChecksum { index });
                }
            }
            Some(cipher) => {
                if data.len() < TAG_LEN {
                    return Err(CodecError::ChunkShort { index });
                }
                cipher
                    .decrypt_in_place(&nonce(index, flags), &self.aad, &mut data)
                    .map_err(|_| CodecError::ChunkAuth { index })?;
            }
        }
        let cs = self.header.chunk_size as usize;
        let plain = match self.header.codec {
            super::envelope::CodecId::None => data,
            super::envelope::CodecId::Zstd => decompress(index, &data, cs)?,
        };
        let is_final = flags & FLAG_FINAL != 0;
        let ok = if is_final {
            plain.len() <= cs && (!plain.is_empty() || index == 0)
        } else {
            plain.len() == cs
        };
        if !ok {
            let expected = if is_final {
                format!("1 to {cs} (final chunk)")
            } else {
                cs.to_string()
            };
            return Err(CodecError::ChunkLength {
                index,
                got: plain.len(),
                expected,
            });
        }
        Ok(plain)
    }
}

fn compress(level: i32, plain: &[u8]) -> Result<Vec<u8>, CodecError> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            let c = zstd::bulk::Compressor::new(level)
                .map_err(|e| CodecError::Compress(e.to_string()))?;
            *slot = Some((level, c));
        }
        let Some((_, c)) = slot.as_mut() else {
            return Err(CodecError::Compress("no compression context".into()));
        };
        // Room for the compressed data plus the tag or CRC, so sealing never reallocates.
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(plain.len()) + TAG_LEN);
        c.compress_to_buffer(plain, &mut out)
            .map_err(|e| CodecError::Compress(e.to_string()))?;
        Ok(out)
    })
}

fn decompress(index: u64, data: &[u8], limit: usize) -> Result<Vec<u8>, CodecError> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let d = zstd::bulk::Decompressor::new().map_err(|e| CodecError::Decompress {
                index,
                message: e.to_string(),
            })?;
            *slot = Some(d);
        }
        let Some(d) = slot.as_mut() else {
            return Err(CodecError::Decompress {
                index,
                message: "no decompression context".into(),
            });
        };
        let mut out = Vec::with_capacity(limit);
        d.decompress_to_buffer(data, &mut out)
            .map_err(|e| CodecError::Decompress {
                index,
                message: e.to_string(),
            })?;
        Ok(out)
    })
}
