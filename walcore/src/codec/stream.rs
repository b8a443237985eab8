//! Streaming encode and decode over `Read`/`Write`, chunks in parallel, output in order.
//! Memory is bounded by the window: a few chunks, whatever the object's size.

use std::io::{Read, Write};

use super::chunk::ChunkContext;
use super::envelope::{
    ChunkRecord, CipherId, CodecId, Deframer, FLAG_FINAL, Frame, Header, Trailer,
};
use super::parallel::ordered_map;
use super::{Codec, CodecError, Compression};

/// Chunks in flight per worker thread: one being processed, one read ahead.
const WINDOW_PER_THREAD: usize = 2;
/// Bytes read from a stored object at a time while decoding.
const READ_BUF: usize = 256 * 1024;

/// What an encode or decode saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Plaintext bytes.
    pub plaintext_len: u64,
    /// CRC-32 of the plaintext (the trailer's checksum).
    pub plaintext_crc: u32,
    /// Bytes of the stored envelope.
    pub stored_len: u64,
}

/// Reads until `buf` holds `want` bytes or the input ends.
fn read_up_to(input: &mut impl Read, want: usize) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::with_capacity(want);
    let mut limited = input.take(want as u64);
    limited.read_to_end(&mut buf).map_err(CodecError::Read)?;
    Ok(buf)
}

impl Codec {
    /// Encodes `input` as the object named `name` (its key) into `output`.
    pub fn encode(
        &self,
        name: &str,
        input: impl Read,
        output: impl Write,
    ) -> Result<Summary, CodecError> {
        let mut salt = [0u8; 32];
        if self.key.is_some() {
            getrandom::fill(&mut salt).map_err(|_| CodecError::Encrypt)?;
        }
        self.encode_with_salt(name, salt, input, output)
    }

    /// [`Codec::encode`] with a given salt: for golden test vectors only. Reusing a salt under
    /// one key reuses nonces; never do that for real objects.
    #[doc(hidden)]
    pub fn encode_with_salt(
        &self,
        name: &str,
        salt: [u8; 32],
        mut input: impl Read,
        mut output: impl Write,
    ) -> Result<Summary, CodecError> {
        let header = Header {
            codec: match self.compression {
                Compression::None => CodecId::None,
                Compression::Zstd { .. } => CodecId::Zstd,
            },
            cipher: if self.key.is_some() {
                CipherId::Aes256Gcm
            } else {
                CipherId::None
            },
            chunk_size: self.chunk_size,
            fingerprint: self.key.as_ref().map(|k| k.fingerprint()),
            salt: if self.key.is_some() { salt } else { [0; 32] },
        };
        let header_bytes = header.encode();
        let object_key = self.key.as_ref().map(|k| k.object_key(&header.salt));
        let ctx = ChunkContext::new(header, &header_bytes, name, object_key);
        output.write_all(&header_bytes).map_err(CodecError::Write)?;

        let cs = self.chunk_size as usize;
        let mut crc = crc32fast::Hasher::new();
        let mut plain_len = 0u64;
        let mut stored_len = header_bytes.len() as u64;
        let mut index = 0u64;
        let mut current = Some(read_up_to(&mut input, cs)?);
        let compression = self.compression;

        ordered_map(
            self.threads,
            self.threads * WINDOW_PER_THREAD,
            || {
                let Some(chunk) = current.take() else {
                    return Ok(None);
                };
                // Look one chunk ahead to know whether this one is the last.
                let next = if chunk.len() == cs {
                    read_up_to(&mut input, cs)?
                } else {
                    Vec::new()
                };
                let flags = if next.is_empty() { FLAG_FINAL } else { 0 };
                if !next.is_empty() {
                    current = Some(next);
                }
                crc.update(&chunk);
                plain_len += chunk.len() as u64;
                let item = (index, flags, chunk);
                index += 1;
                Ok(Some(item))
            },
            |(index, flags, chunk): (u64, u8, Vec<u8>)| {
                ctx.seal(compression, index, flags, &chunk)
                    .map(|p| (flags, p))
            },
            |(flags, payload): (u8, Vec<u8>)| {
                output
                    .write_all(&ChunkRecord::prefix(payload.len(), flags))
                    .map_err(CodecError::Write)?;
                output.write_all(&payload).map_err(CodecError::Write)?;
                stored_len += (5 + payload.len()) as u64;
                Ok(())
            },
        )?;

        let trailer = Trailer {
            plaintext_len: plain_len,
            plaintext_crc: crc.finalize(),
        };
        output
            .write_all(&trailer.encode())
            .map_err(CodecError::Write)?;
        output.flush().map_err(CodecError::Write)?;
        stored_len += super::envelope::TRAILER_LEN as u64;
        Ok(Summary {
            plaintext_len: trailer.plaintext_len,
            plaintext_crc: trailer.plaintext_crc,
            stored_len,
        })
    }

    /// Encodes a byte slice into a new vector.
    pub fn encode_to_vec(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(plain.len() / 4 + 128);
        self.encode(name, plain, &mut out)?;
        Ok(out)
    }

    /// Decodes the object named `name` from `input`, writing plaintext to `output` as chunks are
    /// verified. The plaintext is only known good when this returns `Ok`: callers write to a
    /// temporary place and publish it after.
    pub fn decode(
        &self,
        name: &str,
        mut input: impl Read,
        mut output: impl Write,
    ) -> Result<Summary, CodecError> {
        let mut frames = FrameReader {
            input: &mut input,
            deframer: Deframer::new(),
            buf: vec![0u8; READ_BUF],
            eof: false,
            stored_len: 0,
        };

        let header = match frames.next_frame()? {
            Some(Frame::Header(h)) => h,
            _ => return Err(CodecError::Truncated("in the header")),
        };
        let object_key = match (header.fingerprint, self.key.as_deref()) {
            (None, None) => None,
            (None, Some(_)) => return Err(CodecError::Unencrypted),
            (Some(object), None) => return Err(CodecError::KeyMissing { object }),
            (Some(object), Some(key)) if object != key.fingerprint() => {
                return Err(CodecError::WrongKey {
                    object,
                    configured: key.fingerprint(),
                });
            }
            (Some(_), Some(key)) => Some(key.object_key(&header.salt)),
        };
        let header_bytes = header.encode();
        let ctx = ChunkContext::new(header, &header_bytes, name, object_key);

        let mut crc = crc32fast::Hasher::new();
        let mut plain_len = 0u64;
        let mut trailer = None;
        let mut seen_final = false;
        ordered_map(
            self.threads,
            self.threads * WINDOW_PER_THREAD,
            || {
                if seen_final {
                    return Ok(None);
                }
                match frames.next_frame()? {
                    Some(Frame::Chunk(record)) => {
                        seen_final = record.is_final();
                        Ok(Some(record))
                    }
                    // The deframer only yields a header first and a trailer after the final
                    // chunk, and reports an early end itself.
                    _ => Err(CodecError::Truncated("before the final chunk")),
                }
            },
            |record| ctx.open(record),
            |plain: Vec<u8>| {
                crc.update(&plain);
                plain_len += plain.len() as u64;
                output.write_all(&plain).map_err(CodecError::Write)
            },
        )?;
        if let Some(Frame::Trailer(t)) = frames.next_frame()? {
            trailer = Some(t);
        }
        let Some(trailer) = trailer else {
            return Err(CodecError::Truncated("in the trailer"));
        };
        // Everything after the trailer must be the end of the input.
        if frames.next_frame()?.is_some() {
            return Err(CodecError::TrailingGarbage {
                offset: frames.stored_len,
            });
        }
        let got_crc = crc.finalize();
        if trailer.plaintext_len != plain_len || trailer.plaintext_crc != got_crc {
            return Err(CodecError::TrailerMismatch {
                expected_len: trailer.plaintext_len,
                expected_crc: trailer.plaintext_crc,
                got_len: plain_len,
                got_crc,
            });
        }
        output.flush().map_err(CodecError::Write)?;
        Ok(Summary {
            plaintext_len: plain_len,
            plaintext_crc: got_crc,
            stored_len: frames.stored_len,
        })
    }

    /// Decodes a stored object held in memory.
    pub fn decode_to_vec(&self, name: &str, stored: &[u8]) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::new();
        self.decode(name, stored, &mut out)?;
        Ok(out)
    }
}

/// Pulls bytes from a stored object into the deframer until it yields a frame.
struct FrameReader<'a, R: Read> {
    input: &'a mut R,
    deframer: Deframer,
    buf: Vec<u8>,
    eof: bool,
    stored_len: u64,
}

impl<R: Read> FrameReader<'_, R> {
    /// The next frame; `None` at the end of the input, after checking the object was complete.
    fn next_frame(&mut self) -> Result<Option<Frame>, CodecError> {
        loop {
            if let Some(frame) = self.deframer.next_frame()? {
                return Ok(Some(frame));
            }
            if self.eof {
                self.deframer.finish()?;
                return Ok(None);
            }
            let n = self.input.read(&mut self.buf).map_err(CodecError::Read)?;
            if n == 0 {
                self.eof = true;
            } else {
                self.stored_len += n as u64;
                self.deframer.push(&self.buf[..n]);
            }
        }
    }
}
