//! The object envelope, byte by byte (FORMAT.md §3): header, chunk records, trailer.
//!
//! Everything here is sans-IO: bytes in, a complete frame / "need more bytes" (`Ok(None)`) / an
//! error that says where. The streaming encoder and decoder in `stream.rs` only move buffers.

use bytes::{Buf, Bytes, BytesMut};

use super::CodecError;
use super::key::{FINGERPRINT_LEN, Fingerprint};

/// `"WALCORE\0"`.
pub const MAGIC: [u8; 8] = *b"WALCORE\0";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 68;
/// Chunk record prefix: payload length (4) and flags (1).
pub const CHUNK_PREFIX_LEN: usize = 5;
/// `"WEND"`.
pub const TRAILER_MAGIC: [u8; 4] = *b"WEND";
/// Trailer length in bytes.
pub const TRAILER_LEN: usize = 20;
/// Flag bit of the last chunk.
pub const FLAG_FINAL: u8 = 0x01;
/// Smallest and largest chunk sizes a header may declare.
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 64 * 1024 * 1024;
/// Slack a stored chunk may have over its plaintext (zstd's worst-case expansion is far less
/// than this for chunks up to 64 MiB), plus the tag or CRC.
pub const PAYLOAD_SLACK: u32 = 128 * 1024 + 16;
/// Length of a GCM tag.
pub const TAG_LEN: usize = 16;

/// Codec identifiers in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecId {
    None = 0,
    Zstd = 1,
}

/// Cipher identifiers in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherId {
    None = 0,
    Aes256Gcm = 1,
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub codec: CodecId,
    pub cipher: CipherId,
    pub chunk_size: u32,
    pub fingerprint: Option<Fingerprint>,
    pub salt: [u8; 32],
}

impl Header {
    /// The 68 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..10].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        h[10] = self.codec as u8;
        h[11] = self.cipher as u8;
        h[12..16].copy_from_slice(&self.chunk_size.to_be_bytes());
        if let Some(fp) = self.fingerprint {
            h[16..32].copy_from_slice(&fp.0);
        }
        h[32..64].copy_from_slice(&self.salt);
        let crc = crc32fast::hash(&h[0..64]);
        h[64..68].copy_from_slice(&crc.to_be_bytes());
        h
    }

    /// Parses a header from the start of `buf`; `Ok(None)` if fewer than 68 bytes are there.
    pub fn parse(buf: &[u8]) -> Result<Option<Header>, CodecError> {
        // Check the magic on what we have so far, so that "not an object" is reported early.
        let have = buf.len().min(MAGIC.len());
        if buf[..have] != MAGIC[..have] {
            return Err(CodecError::NotAnObject);
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let version = u16::from_be_bytes([buf[8], buf[9]]);
        if version != FORMAT_VERSION {
            return Err(CodecError::UnsupportedVersion(version));
        }
        let stored_crc = u32::from_be_bytes([buf[64], buf[65], buf[66], buf[67]]);
        if crc32fast::hash(&buf[0..64]) != stored_crc {
            return Err(CodecError::HeaderChecksum);
        }
        let codec = match buf[10] {
            0 => CodecId::None,
            1 => CodecId::Zstd,
            other => return Err(CodecError::UnknownCodec(other)),
        };
        let cipher = match buf[11] {
            0 => CipherId::None,
            1 => CipherId::Aes256Gcm,
            other => return Err(CodecError::UnknownCipher(other)),
        };
        let chunk_size = u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]);
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(CodecError::ChunkSize(chunk_size));
        }
        let mut fp = [0u8; FINGERPRINT_LEN];
        fp.copy_from_slice(&buf[16..32]);
        let mut salt = [0u8; 32];
        salt.copy_from_slice(&buf[32..64]);
        let fingerprint = match cipher {
            CipherId::None => {
                if fp != [0; FINGERPRINT_LEN] || salt != [0; 32] {
                    return Err(CodecError::HeaderField(
                        "key fingerprint and salt must be zero without encryption",
                    ));
                }
                None
            }
            CipherId::Aes256Gcm => Some(Fingerprint(fp)),
        };
        Ok(Some(Header {
            codec,
            cipher,
            chunk_size,
            fingerprint,
            salt,
        }))
    }

    /// The largest payload a chunk record of this object may declare.
    pub fn max_payload(&self) -> u32 {
        self.chunk_size + PAYLOAD_SLACK
    }
}

/// The trailer (FORMAT.md §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub plaintext_len: u64,
    pub plaintext_crc: u32,
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut t = [0u8; TRAILER_LEN];
        t[0..4].copy_from_slice(&TRAILER_MAGIC);
        t[4..12].copy_from_slice(&self.plaintext_len.to_be_bytes());
        t[12..16].copy_from_slice(&self.plaintext_crc.to_be_bytes());
        let crc = crc32fast::hash(&t[0..16]);
        t[16..20].copy_from_slice(&crc.to_be_bytes());
        t
    }

    /// Parses a trailer; `Ok(None)` if fewer than 20 bytes are there.
    pub fn parse(buf: &[u8]) -> Result<Option<Trailer>, CodecError> {
        if buf.len() < TRAILER_LEN {
            return Ok(None);
        }
        if buf[0..4] != TRAILER_MAGIC {
            return Err(CodecError::TrailerMissing);
        }
        let stored_crc = u32::from_be_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if crc32fast::hash(&buf[0..16]) != stored_crc {
            return Err(CodecError::TrailerChecksum);
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&buf[4..12]);
        Ok(Some(Trailer {
            plaintext_len: u64::from_be_bytes(len),
            plaintext_crc: u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]),
        }))
    }
}

/// One stored chunk, as framed (not yet verified or decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRecord {
    pub index: u64,
    pub flags: u8,
    pub payload: Bytes,
}

impl ChunkRecord {
    pub fn is_final(&self) -> bool {
        self.flags & FLAG_FINAL != 0
    }

    /// The 5-byte prefix of this record.
    pub fn prefix(payload_len: usize, flags: u8) -> [u8; CHUNK_PREFIX_LEN] {
        let mut p = [0u8; CHUNK_PREFIX_LEN];
        // Payloads are bounded by `max_payload`, far below 4 GiB.
        p[0..4].copy_from_slice(&(payload_len as u32).to_be_bytes());
        p[4] = flags;
        p
    }
}

/// What the deframer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Header(Header),
    Chunk(ChunkRecord),
    Trailer(Trailer),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Chunks,
    Trailer,
    Done,
}

/// Splits an object's bytes into frames. Push bytes in any pieces with [`Deframer::push`], take
/// frames with [`Deframer::next_frame`], and call [`Deframer::finish`] at the end of the object.
#[derive(Debug)]
pub struct Deframer {
    buf: BytesMut,
    state: State,
    header: Option<Header>,
    next_index: u64,
    offset: u64,
}

impl Default for Deframer {
    fn default() -> Self {
        Deframer::new()
    }
}

impl Deframer {
    pub fn new() -> Deframer {
        Deframer {
            buf: BytesMut::new(),
            state: State::Header,
            header: None,
            next_index: 0,
            offset: 0,
        }
    }

    /// Adds bytes read from the object.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed (or after the trailer).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, CodecError> {
        match self.state {
            State::Header => {
                let Some(h) = Header::parse(&self.buf)? else {
                    return Ok(None);
                };
                self.consume(HEADER_LEN);
                self.header = Some(h.clone());
                self.state = State::Chunks;
                Ok(Some(Frame::Header(h)))
            }
            State::Chunks => {
                if self.buf.len() < CHUNK_PREFIX_LEN {
                    return Ok(None);
                }
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                let flags = self.buf[4];
                let index = self.next_index;
                if flags & !FLAG_FINAL != 0 {
                    return Err(CodecError::ChunkFlags { index, flags });
                }
                let max = self.header.as_ref().map_or(0, Header::max_payload);
                if len > max {
                    return Err(CodecError::ChunkTooLarge { index, len, max });
                }
                let total = CHUNK_PREFIX_LEN + len as usize;
                if self.buf.len() < total {
                    self.buf.reserve(total - self.buf.len());
                    return Ok(None);
                }
                self.consume(CHUNK_PREFIX_LEN);
                let payload = self.buf.split_to(len as usize).freeze();
                self.offset += u64::from(len);
                self.next_index += 1;
                if flags & FLAG_FINAL != 0 {
                    self.state = State::Trailer;
                }
                Ok(Some(Frame::Chunk(ChunkRecord {
                    index,
                    flags,
                    payload,
                })))
            }
            State::Trailer => {
                let Some(t) = Trailer::parse(&self.buf)? else {
                    return Ok(None);
                };
                self.consume(TRAILER_LEN);
                self.state = State::Done;
                Ok(Some(Frame::Trailer(t)))
            }
            State::Done => {
                if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(CodecError::TrailingGarbage {
                        offset: self.offset,
                    })
                }
            }
        }
    }

    /// Call at the end of the object: checks that it was complete and that nothing followed.
    pub fn finish(&mut self) -> Result<(), CodecError> {
        // Surface any error a complete frame still held in the buffer would give.
        match self.state {
            State::Done if self.buf.is_empty() => Ok(()),
            State::Done => Err(CodecError::TrailingGarbage {
                offset: self.offset,
            }),
            State::Header => Err(CodecError::Truncated("in the header")),
            State::Chunks => Err(CodecError::Truncated("before the final chunk")),
            State::Trailer => Err(CodecError::Truncated("in the trailer")),
        }
    }

    fn consume(&mut self, n: usize) {
        self.buf.advance(n);
        self.offset += n as u64;
    }
}
