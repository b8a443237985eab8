//! Repositories under test (`file://` directories and S3 buckets) and the configuration the
//! binaries get for them; reading and tampering with stored objects from outside.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::moto::{self, Moto};
use crate::sys;

/// Bounded retry window for transient storage errors, short so that faults fail fast.
pub const RETRY_TIME: &str = "3s";

/// A 256-bit key (64 hex digits) for tests.
pub const KEY_1: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0";
/// Another key.
pub const KEY_2: &str = "a0b1c2d3e4f5061728394a5b6c7d8e9ff9e8d7c6b5a4938271605f4e3d2c1b0a";

/// The key of a WAL file in a repository (`docs/FORMAT.md` §2): `wal/<timeline>/<log>/<name>`,
/// or `wal/history/<name>` for a timeline history file.
pub fn wal_key(name: &str) -> String {
    if name.ends_with(".history") {
        format!("wal/history/{name}")
    } else {
        assert!(name.len() >= 24, "not a WAL file name: {name}");
        format!("wal/{}/{}/{name}", &name[..8], &name[8..16])
    }
}

/// The 16 MiB segments from `first` to `last` inclusive (same timeline), by name.
pub fn segments_between(first: &str, last: &str) -> Vec<String> {
    let parse = |n: &str| -> (String, u64) {
        assert!(
            n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit()),
            "not a WAL segment name: {n}"
        );
        let log = u64::from_str_radix(&n[8..16], 16).expect("hex");
        let seg = u64::from_str_radix(&n[16..24], 16).expect("hex");
        (n[..8].to_string(), log * 0x100 + seg)
    };
    let (tli, a) = parse(first);
    let (tli_b, b) = parse(last);
    assert_eq!(tli, tli_b, "segments of different timelines");
    (a..=b)
        .map(|n| format!("{tli}{:08X}{:08X}", n / 0x100, n % 0x100))
        .collect()
}

/// The repository metadata key.
pub const META_KEY: &str = "meta/repository";

/// How the binaries encode objects.
#[derive(Debug, Clone, Default)]
pub struct Codec {
    /// `WALCORE_COMPRESSION`, unset when `None` (the default, `zstd:3`).
    pub compression: Option<&'static str>,
    /// `WALCORE_ENCRYPTION_KEY`, unset when `None` (no encryption).
    pub key: Option<&'static str>,
}

impl Codec {
    pub fn plain() -> Codec {
        Codec::default()
    }
    pub fn encrypted(key: &'static str) -> Codec {
        Codec {
            compression: None,
            key: Some(key),
        }
    }
    pub fn compression(mut self, c: &'static str) -> Codec {
        self.compression = Some(c);
        self
    }
}

#[derive(Debug)]
enum Store {
    File {
        root: PathBuf,
        _dir: tempfile::TempDir,
    },
    S3 {
        addr: SocketAddr,
        bucket: String,
        prefix: String,
    },
}

/// A repository.
#[derive(Debug)]
pub struct Repo {
    store: Store,
}

impl Repo {
    /// A `file://` repository in a fresh directory writable by the server user.
    pub fn file() -> Repo {
        let dir = sys::server_tempdir("wcrepo");
        let root = sys::server_mkdir(&dir.path().join("repo"));
        Repo {
            store: Store::File { root, _dir: dir },
        }
    }

    /// An `s3://` repository: a fresh bucket on `moto`, under a prefix (many clusters share a
    /// bucket by prefix).
    pub fn s3(moto: &Moto) -> Repo {
        Repo {
            store: Store::S3 {
                addr: moto.addr(),
                bucket: moto.create_bucket(),
                prefix: "cluster-a".to_string(),
            },
        }
    }

    pub fn is_s3(&self) -> bool {
        matches!(self.store, Store::S3 { .. })
    }

    /// The `WALCORE_REPO` URL.
    pub fn url(&self) -> String {
        match &self.store {
            Store::File { root, .. } => format!("file://{}", root.display()),
            Store::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}"),
        }
    }

    /// The environment of a binary using this repository with `codec`.
    pub fn env(&self, codec: &Codec) -> Vec<(String, String)> {
        let endpoint = match &self.store {
            Store::S3 { addr, .. } => Some(format!("http://{addr}")),
            Store::File { .. } => None,
        };
        self.env_at(codec, endpoint.as_deref())
    }

    /// Like [`Repo::env`], reaching S3 through `endpoint` (a proxy) instead.
    pub fn env_at(&self, codec: &Codec, endpoint: Option<&str>) -> Vec<(String, String)> {
        let mut v = vec![
            ("WALCORE_REPO".to_string(), self.url()),
            ("WALCORE_RETRY_TIME".to_string(), RETRY_TIME.to_string()),
            ("WALCORE_LOG".to_string(), "info".to_string()),
        ];
        if let Some(c) = codec.compression {
            v.push(("WALCORE_COMPRESSION".to_string(), c.to_string()));
        }
        if let Some(k) = codec.key {
            v.push(("WALCORE_ENCRYPTION_KEY".to_string(), k.to_string()));
        }
        if let (Store::S3 { .. }, Some(endpoint)) = (&self.store, endpoint) {
            for (k, val) in [
                ("AWS_ACCESS_KEY_ID", "test"),
                ("AWS_SECRET_ACCESS_KEY", "test"),
                ("AWS_REGION", "us-east-1"),
                ("AWS_ENDPOINT_URL", endpoint),
                ("AWS_ALLOW_HTTP", "true"),
            ] {
                v.push((k.to_string(), val.to_string()));
            }
        }
        v
    }

    /// The file holding `key` (file repositories only).
    pub fn path(&self, key: &str) -> PathBuf {
        match &self.store {
            Store::File { root, .. } => root.join(key),
            Store::S3 { .. } => panic!("path() of an S3 repository"),
        }
    }

    /// The stored bytes of `key`, `None` when absent.
    pub fn read(&self, key: &str) -> Option<Vec<u8>> {
        match &self.store {
            Store::File { root, .. } => match std::fs::read(root.join(key)) {
                Ok(b) => Some(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => panic!("read {key}: {e}"),
            },
            Store::S3 {
                addr,
                bucket,
                prefix,
            } => moto::object_get(*addr, bucket, &format!("{prefix}/{key}")),
        }
    }

    /// Replaces the stored bytes of `key` behind the binaries' back.
    pub fn tamper(&self, key: &str, bytes: &[u8]) {
        match &self.store {
            Store::File { root, .. } => {
                let path = root.join(key);
                // Rewrite in place, keeping the file's owner and mode. Stored objects may be
                // read-only: root writes anyway, an ordinary owner lifts the mode for a moment.
                let mode = std::fs::metadata(&path)
                    .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
                    .permissions()
                    .mode();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode | 0o200))
                    .unwrap_or_else(|e| panic!("chmod u+w {}: {e}", path.display()));
                std::fs::write(&path, bytes)
                    .unwrap_or_else(|e| panic!("rewrite {}: {e}", path.display()));
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .unwrap_or_else(|e| panic!("chmod back {}: {e}", path.display()));
            }
            Store::S3 {
                addr,
                bucket,
                prefix,
            } => moto::object_put(*addr, bucket, &format!("{prefix}/{key}"), bytes),
        }
    }

    /// Deletes `key` behind the binaries' back (an object lost by the store or a person).
    pub fn remove(&self, key: &str) {
        match &self.store {
            Store::File { root, .. } => {
                std::fs::remove_file(root.join(key)).unwrap_or_else(|e| panic!("remove {key}: {e}"))
            }
            Store::S3 {
                addr,
                bucket,
                prefix,
            } => moto::object_delete(*addr, bucket, &format!("{prefix}/{key}")),
        }
    }

    /// Every key in the repository, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys = match &self.store {
            Store::File { root, .. } => {
                let mut out = Vec::new();
                walk(root, root, &mut out);
                out
            }
            Store::S3 {
                addr,
                bucket,
                prefix,
            } => moto::object_list(*addr, bucket, &format!("{prefix}/"))
                .into_iter()
                .filter_map(|k| k.strip_prefix(&format!("{prefix}/")).map(str::to_string))
                .collect(),
        };
        keys.sort();
        keys
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

/// Whether `haystack` contains the ASCII text `needle` (std's optimised string search, fast
/// even in the unoptimised test build: 16 MiB objects).
pub fn contains_ascii(haystack: &[u8], needle: &str) -> bool {
    assert!(needle.is_ascii(), "ASCII needles only");
    // Lossy decoding never swallows an ASCII byte into a replacement character.
    String::from_utf8_lossy(haystack).contains(needle)
}

/// `bytes` with the byte at `at` inverted.
pub fn flip_byte(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at] ^= 0xFF;
    b
}

/// CRC-32 (IEEE, as zlib's `crc32`), to name checksums the way FORMAT.md does.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn ascii_search_in_binary() {
        assert!(contains_ascii(b"\xff\xfeabc\xc3def", "abc"));
        assert!(contains_ascii(b"\xe2\x82abc", "abc"));
        assert!(!contains_ascii(b"\xe2\x82ab", "abc"));
    }

    #[test]
    fn wal_keys() {
        assert_eq!(
            wal_key("0000000200000013000000A7"),
            "wal/00000002/00000013/0000000200000013000000A7"
        );
        assert_eq!(wal_key("00000002.history"), "wal/history/00000002.history");
    }

    #[test]
    fn segment_ranges() {
        assert_eq!(
            segments_between("0000000100000000000000FE", "000000010000000100000001"),
            [
                "0000000100000000000000FE",
                "0000000100000000000000FF",
                "000000010000000100000000",
                "000000010000000100000001"
            ]
        );
    }
}
