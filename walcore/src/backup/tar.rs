//! A sans-IO reader of the tar streams PostgreSQL's `BASE_BACKUP` sends.
//!
//! PostgreSQL writes plain ustar (`src/port/tar.c`): 512-byte headers with octal fields (a size
//! of 8 GiB or more in base-256), names of at most 99 bytes, regular files, directories and
//! symbolic links, each file padded to a whole block. PostgreSQL 15+ ends an archive with two
//! zero blocks; 13 and 14 end it after the last entry and leave the zero blocks to the client.
//! Anything else (pax or GNU extension headers, hard links, devices) is refused with an error
//! that says where: a backup's tar stream is outside input.

use std::fmt;

/// Bytes in a tar block.
pub const BLOCK: usize = 512;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
}

/// One entry's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The path inside the archive, without a trailing `/`; relative, no `..`.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
    /// Bytes of content (files only).
    pub size: u64,
    /// The target of a symbolic link.
    pub link: String,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
}

/// Where a tar stream went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarError {
    /// Offset of the block (or byte) in the stream.
    pub offset: u64,
    pub problem: String,
}

impl fmt::Display for TarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tar stream at byte {}: {}", self.offset, self.problem)
    }
}

impl std::error::Error for TarError {}

/// What receives the entries of a stream. An error from the sink stops the reader and is
/// returned as it is.
pub trait TarSink {
    type Error: From<TarError>;
    /// A new entry starts; for a file, its content follows through [`TarSink::data`].
    fn entry(&mut self, entry: &Entry) -> Result<(), Self::Error>;
    /// A piece of the current file's content.
    fn data(&mut self, bytes: &[u8]) -> Result<(), Self::Error>;
    /// The current entry's content is complete.
    fn end_entry(&mut self) -> Result<(), Self::Error>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a header block.
    Header,
    /// Inside a file: content bytes left, then padding bytes.
    Content { left: u64, pad: usize },
    /// Skipping a finished file's padding.
    Padding { left: usize },
    /// After the first zero block: only zeros may follow.
    Trailer,
}

/// The reader: feed it the stream in pieces of any size.
#[derive(Debug)]
pub struct TarReader {
    state: State,
    header: Vec<u8>,
    offset: u64,
    entries: u64,
}

impl Default for TarReader {
    fn default() -> TarReader {
        TarReader::new()
    }
}

impl TarReader {
    pub fn new() -> TarReader {
        TarReader {
            state: State::Header,
            header: Vec::with_capacity(BLOCK),
            offset: 0,
            entries: 0,
        }
    }

    /// Entries seen so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    fn fail(&self, problem: impl Into<String>) -> TarError {
        TarError {
            offset: self.offset,
            problem: problem.into(),
        }
    }

    /// Consumes `bytes`, calling `sink` for what they complete.
    pub fn feed<S: TarSink>(&mut self, mut bytes: &[u8], sink: &mut S) -> Result<(), S::Error> {
        while !bytes.is_empty() {
            match self.state {
                State::Header => {
                    let want = BLOCK - self.header.len();
                    let n = want.min(bytes.len());
                    self.header.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if self.header.len() < BLOCK {
                        return Ok(());
                    }
                    let block = std::mem::take(&mut self.header);
                    self.header = Vec::with_capacity(BLOCK);
                    if block.iter().all(|&b| b == 0) {
                        self.state = State::Trailer;
                        self.offset += BLOCK as u64;
                        continue;
                    }
                    let entry = parse_header(&block).map_err(|p| self.fail(p))?;
                    self.offset += BLOCK as u64;
                    self.entries += 1;
                    sink.entry(&entry)?;
                    if entry.kind == EntryKind::File && entry.size > 0 {
                        let pad =
                            ((BLOCK as u64 - entry.size % BLOCK as u64) % BLOCK as u64) as usize;
                        self.state = State::Content {
                            left: entry.size,
                            pad,
                        };
                    } else {
                        sink.end_entry()?;
                    }
                }
                State::Content { left, pad } => {
                    let n = (left.min(bytes.len() as u64)) as usize;
                    sink.data(&bytes[..n])?;
                    bytes = &bytes[n..];
                    self.offset += n as u64;
                    let left = left - n as u64;
                    if left == 0 {
                        sink.end_entry()?;
                        self.state = if pad > 0 {
                            State::Padding { left: pad }
                        } else {
                            State::Header
                        };
                    } else {
                        self.state = State::Content { left, pad };
                    }
                }
                State::Padding { left } => {
                    let n = left.min(bytes.len());
                    bytes = &bytes[n..];
                    self.offset += n as u64;
                    self.state = if left == n {
                        State::Header
                    } else {
                        State::Padding { left: left - n }
                    };
                }
                State::Trailer => {
                    if let Some(i) = bytes.iter().position(|&b| b != 0) {
                        self.offset += i as u64;
                        return Err(self.fail("data after the end-of-archive zero block").into());
                    }
                    self.offset += bytes.len() as u64;
                    bytes = &[];
                }
            }
        }
        Ok(())
    }

    /// The stream has ended: it must end between entries (or inside the zero trailer).
    pub fn finish(&self) -> Result<(), TarError> {
        match self.state {
            State::Header if self.header.is_empty() => Ok(()),
            State::Trailer => Ok(()),
            State::Header => Err(self.fail("the stream ends inside a header")),
            State::Content { left, .. } => Err(self.fail(format!(
                "the stream ends {left} bytes before the end of a file"
            ))),
            State::Padding { .. } => Err(self.fail("the stream ends inside a file's padding")),
        }
    }
}

/// The bytes of a NUL-terminated (or full-width) text field.
fn field(block: &[u8], start: usize, len: usize) -> &[u8] {
    let f = &block[start..start + len];
    let end = f.iter().position(|&b| b == 0).unwrap_or(len);
    &f[..end]
}

fn text(block: &[u8], start: usize, len: usize, what: &str) -> Result<String, String> {
    String::from_utf8(field(block, start, len).to_vec())
        .map_err(|_| format!("the {what} field is not UTF-8"))
}

/// An octal number field (spaces and NULs around it allowed), or base-256 when the first
/// byte's high bit is set.
fn number(block: &[u8], start: usize, len: usize, what: &str) -> Result<u64, String> {
    let f = &block[start..start + len];
    if f[0] & 0x80 != 0 {
        if f[0] & 0x40 != 0 {
            return Err(format!("the {what} field is negative"));
        }
        let mut v: u64 = u64::from(f[0] & 0x3f);
        for &b in &f[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(b)))
                .ok_or_else(|| format!("the {what} field overflows"))?;
        }
        return Ok(v);
    }
    let t: Vec<u8> = f
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if t.is_empty() {
        return Ok(0);
    }
    let mut v: u64 = 0;
    for b in t {
        if !(b'0'..=b'7').contains(&b) {
            return Err(format!("the {what} field is not an octal number"));
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or_else(|| format!("the {what} field overflows"))?;
    }
    Ok(v)
}

/// Whether `path` stays inside the directory it is extracted into.
fn is_safe_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != ".." && c != ".")
}

fn parse_header(block: &[u8]) -> Result<Entry, String> {
    let stored = number(block, 148, 8, "checksum")?;
    let sum: u64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    if stored != sum {
        return Err(format!(
            "header checksum {stored} does not match the header ({sum}): not a tar header, or \
             a damaged one"
        ));
    }
    let name = text(block, 0, 100, "name")?;
    let ustar = &block[257..263] == b"ustar\0" || &block[257..263] == b"ustar ";
    let prefix = if ustar && &block[257..263] == b"ustar\0" {
        text(block, 345, 155, "prefix")?
    } else {
        String::new()
    };
    let mut path = if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    };
    let typeflag = block[156];
    let kind = match typeflag {
        b'0' | 0 | b'7' => EntryKind::File,
        b'5' => EntryKind::Directory,
        b'2' => EntryKind::Symlink,
        b'1' => {
            let target = String::from_utf8_lossy(field(block, 157, 100)).into_owned();
            return Err(format!(
                "entry {path:?} is a hard link to {target:?}, which PostgreSQL never sends; \
                 refused"
            ));
        }
        b'x' | b'g' | b'L' | b'K' => {
            return Err(format!(
                "entry {path:?} is an extension header (type '{}'), which PostgreSQL never sends",
                char::from(typeflag)
            ));
        }
        other => {
            return Err(format!(
                "entry {path:?} has type {:?}, which is not a file, directory or symbolic link",
                char::from(other)
            ));
        }
    };
    while path.ends_with('/') {
        path.pop();
    }
    if let Some(p) = path.strip_prefix("./") {
        path = p.to_owned();
    }
    if !is_safe_path(&path) {
        return Err(format!(
            "entry path {path:?} is absolute, empty or leaves the directory"
        ));
    }
    let mode = number(block, 100, 8, "mode")? as u32 & 0o7777;
    let size = number(block, 124, 12, "size")?;
    let mtime = number(block, 136, 12, "mtime")?;
    let link = text(block, 157, 100, "link name")?;
    if kind != EntryKind::File && size != 0 {
        return Err(format!("entry {path:?} is not a file but has size {size}"));
    }
    if kind == EntryKind::Symlink && link.is_empty() {
        return Err(format!("symbolic link {path:?} has no target"));
    }
    Ok(Entry {
        path,
        kind,
        mode,
        size,
        link,
        mtime,
    })
}

/// Builds one header block (for tests and fuzz seeds): ustar, octal fields.
pub fn header_block(path: &str, kind: EntryKind, mode: u32, size: u64, link: &str) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    let put = |b: &mut [u8; BLOCK], at: usize, bytes: &[u8]| {
        b[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(&mut b, 0, path.as_bytes());
    put(&mut b, 100, format!("{mode:07o}\0").as_bytes());
    put(&mut b, 108, b"0000000\0");
    put(&mut b, 116, b"0000000\0");
    put(&mut b, 124, format!("{size:011o}\0").as_bytes());
    put(&mut b, 136, b"14715260000\0");
    b[156] = match kind {
        EntryKind::File => b'0',
        EntryKind::Directory => b'5',
        EntryKind::Symlink => b'2',
    };
    put(&mut b, 157, link.as_bytes());
    put(&mut b, 257, b"ustar\0");
    put(&mut b, 263, b"00");
    put(&mut b, 148, b"        ");
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    put(&mut b, 148, format!("{sum:06o}\0 ").as_bytes());
    b
}

/// A sink that records what it receives (tests and the fuzz property).
#[derive(Debug, Default)]
pub struct Recorder {
    pub entries: Vec<(Entry, Vec<u8>)>,
    open: bool,
}

impl TarSink for Recorder {
    type Error = TarError;
    fn entry(&mut self, entry: &Entry) -> Result<(), TarError> {
        assert!(!self.open, "entry inside an entry");
        self.entries.push((entry.clone(), Vec::new()));
        self.open = true;
        Ok(())
    }
    fn data(&mut self, bytes: &[u8]) -> Result<(), TarError> {
        assert!(self.open, "data outside an entry");
        if let Some((_, d)) = self.entries.last_mut() {
            d.extend_from_slice(bytes);
        }
        Ok(())
    }
    fn end_entry(&mut self) -> Result<(), TarError> {
        assert!(self.open, "end outside an entry");
        self.open = false;
        Ok(())
    }
}

/// The fuzz property: any bytes, in pieces of any size, give entries or an error, never a
/// panic, and the same result however they are split.
pub fn fuzz_tar_property(data: &[u8]) {
    let whole = {
        let mut r = TarReader::new();
        let mut s = Recorder::default();
        let res = r.feed(data, &mut s).and_then(|()| r.finish());
        (res, s.entries)
    };
    let split = {
        let mut r = TarReader::new();
        let mut s = Recorder::default();
        let step = 1 + data.first().map_or(0, |&b| usize::from(b) % 97);
        let mut res = Ok(());
        for piece in data.chunks(step) {
            res = r.feed(piece, &mut s);
            if res.is_err() {
                break;
            }
        }
        let res = res.and_then(|()| r.finish());
        (res, s.entries)
    };
    assert_eq!(whole.0.is_ok(), split.0.is_ok());
    if whole.0.is_ok() {
        assert_eq!(whole.1, split.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn archive(entries: &[(&str, EntryKind, &[u8], &str)], trailer: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, kind, data, link) in entries {
            out.extend_from_slice(&header_block(path, *kind, 0o600, data.len() as u64, link));
            out.extend_from_slice(data);
            let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
            out.extend(std::iter::repeat_n(0u8, pad));
        }
        if trailer {
            out.extend([0u8; 2 * BLOCK]);
        }
        out
    }

    fn read(bytes: &[u8]) -> Result<Vec<(Entry, Vec<u8>)>, TarError> {
        let mut r = TarReader::new();
        let mut s = Recorder::default();
        r.feed(bytes, &mut s)?;
        r.finish()?;
        Ok(s.entries)
    }

    #[test]
    fn reads_what_postgresql_writes() {
        let big = vec![7u8; 1300];
        let tar = archive(
            &[
                ("PG_VERSION", EntryKind::File, b"15\n", ""),
                ("global", EntryKind::Directory, b"", ""),
                ("global/pg_control", EntryKind::File, &big, ""),
                ("pg_tblspc/16390", EntryKind::Symlink, b"", "/srv/ts1"),
                ("empty", EntryKind::File, b"", ""),
            ],
            true,
        );
        let entries = read(&tar).expect("valid archive");
        assert_eq!(entries.len(), 5);
        assert_eq!(entries[0].1, b"15\n");
        assert_eq!(entries[1].0.kind, EntryKind::Directory);
        assert_eq!(entries[2].1, big);
        assert_eq!(entries[3].0.link, "/srv/ts1");
        // 13 and 14 send no trailer.
        let no_trailer = archive(&[("PG_VERSION", EntryKind::File, b"13\n", "")], false);
        assert_eq!(read(&no_trailer).expect("valid").len(), 1);
    }

    #[test]
    fn refuses_what_is_not_a_backup_archive() {
        let mut tar = archive(&[("PG_VERSION", EntryKind::File, b"15\n", "")], true);
        tar[10] ^= 1;
        assert!(read(&tar).unwrap_err().problem.contains("checksum"));

        let truncated = archive(&[("base/1/1259", EntryKind::File, &[1u8; 2000], "")], false);
        let e = read(&truncated[..1500]).unwrap_err();
        assert!(e.problem.contains("before the end of a file"), "{e}");

        for evil in ["../etc/passwd", "/etc/passwd", "a/../../b"] {
            let t = archive(&[(evil, EntryKind::File, b"x", "")], true);
            assert!(read(&t).unwrap_err().problem.contains("leaves"), "{evil}");
        }
        let mut after = archive(&[("a", EntryKind::File, b"x", "")], true);
        after.push(1);
        assert!(read(&after).unwrap_err().problem.contains("after the end"));
    }

    #[test]
    fn base_256_sizes() {
        let mut b = header_block("big", EntryKind::File, 0o600, 0, "");
        b[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0]);
        b[148..156].copy_from_slice(b"        ");
        let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
        b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let e = parse_header(&b).expect("valid header");
        assert_eq!(e.size, 8u64 << 30);
    }

    #[test]
    fn tar_stream_corpus() {
        for (file, data) in crate::pg::corpus::corpus_files("tar_stream") {
            fuzz_tar_property(&data);
            assert_eq!(read(&data).is_ok(), file.starts_with("valid-"), "{file}");
        }
    }

    proptest! {
        #[test]
        fn any_bytes_are_an_answer_not_a_panic(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            fuzz_tar_property(&data);
        }

        #[test]
        fn any_split_reads_the_same(sizes in proptest::collection::vec(0usize..3000, 1..5), step in 1usize..700) {
            let datas: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| vec![i as u8; n]).collect();
            let names: Vec<String> = (0..datas.len()).map(|i| format!("f{i}")).collect();
            let entries: Vec<(&str, EntryKind, &[u8], &str)> = names.iter().zip(&datas)
                .map(|(n, d)| (n.as_str(), EntryKind::File, d.as_slice(), "")).collect();
            let tar = archive(&entries, true);
            let mut r = TarReader::new();
            let mut s = Recorder::default();
            for piece in tar.chunks(step) {
                r.feed(piece, &mut s).expect("valid");
            }
            r.finish().expect("complete");
            prop_assert_eq!(s.entries.len(), datas.len());
            for ((_, got), want) in s.entries.iter().zip(&datas) {
                prop_assert_eq!(got, want);
            }
        }
    }
}
