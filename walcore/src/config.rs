//! One configuration for every binary. Each setting is looked up, first found wins, in:
//! command-line flags, `WALCORE_*` environment variables, then the TOML file named by
//! `WALCORE_CONFIG` (keys are the variable names without the prefix, in lower case:
//! `repo = "s3://bucket/db1"`).
//!
//! | setting | variable | default |
//! | --- | --- | --- |
//! | repository URL | `WALCORE_REPO` | none: required |
//! | compression | `WALCORE_COMPRESSION` | `zstd:3` |
//! | key, 64 hex digits | `WALCORE_ENCRYPTION_KEY` | no encryption |
//! | file holding the key | `WALCORE_ENCRYPTION_KEY_FILE` | |
//! | command printing the key | `WALCORE_ENCRYPTION_KEY_COMMAND` | |
//! | retry window for store faults | `WALCORE_RETRY_TIME` | `60s` |
//! | longest a store request may go without progress | `WALCORE_REQUEST_TIMEOUT` | `60s` |
//! | plaintext bytes per chunk | `WALCORE_CHUNK_SIZE` | `1048576` |
//! | log level (`error` … `trace`) | `WALCORE_LOG` | `info` |
//! | a call fails after this long without progress | `WALCORE_PROGRESS_TIMEOUT` | `60s` |
//! | segments archived ahead at once (0: off) | `WALCORE_LOOKAHEAD` | `2` |
//! | bytes of WAL prefetched during recovery (0: off) | `WALCORE_PREFETCH` | `256MiB` |
//! | spool directory for look-ahead and prefetch | `WALCORE_SPOOL` | `<data dir>/pgsql_tmp_walcore` |
//!
//! Cloud credentials and endpoints are not walcore settings: they come from the variables the
//! cloud's own tools read (`AWS_ACCESS_KEY_ID`, `AWS_REGION`, `AWS_ENDPOINT_URL`, …).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::codec::{Codec, Compression, DEFAULT_CHUNK_SIZE, MasterKey};
use crate::error::{Error, ErrorKind};
use crate::store::StoreOptions;

/// Every setting, by its key (`repo`, `compression`, …).
pub const KEYS: &[&str] = &[
    "repo",
    "compression",
    "encryption_key",
    "encryption_key_file",
    "encryption_key_command",
    "retry_time",
    "request_timeout",
    "chunk_size",
    "log",
    "progress_timeout",
    "lookahead",
    "prefetch",
    "spool",
];

/// The environment variable of a setting.
pub fn env_name(key: &str) -> String {
    format!("WALCORE_{}", key.to_ascii_uppercase())
}

/// Raw settings from one source, by key.
#[derive(Debug, Clone, Default)]
pub struct Layer {
    values: BTreeMap<String, String>,
    /// Where the values came from, for messages (`--repo`, `WALCORE_REPO`, `/etc/walcore.toml`).
    origin: BTreeMap<String, String>,
}

impl Layer {
    /// Sets a value given on the command line as `flag`.
    pub fn set_flag(&mut self, key: &str, flag: &str, value: Option<impl Into<String>>) {
        if let Some(v) = value {
            self.values.insert(key.into(), v.into());
            self.origin.insert(key.into(), flag.into());
        }
    }

    /// The `WALCORE_*` variables found through `lookup`.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Layer {
        let mut layer = Layer::default();
        for key in KEYS {
            let name = env_name(key);
            if let Some(v) = lookup(&name).filter(|v| !v.is_empty()) {
                layer.values.insert((*key).into(), v);
                layer.origin.insert((*key).into(), name);
            }
        }
        layer
    }

    /// The settings of a TOML file; unknown keys are an error (a typo must not silently
    /// disable encryption).
    pub fn from_toml(path: &str, text: &str) -> Result<Layer, Error> {
        let bad = |why: String| {
            Error::new(
                ErrorKind::Configuration,
                format!("configuration file {path}: {why}"),
            )
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut layer = Layer::default();
        for (key, value) in table {
            if !KEYS.contains(&key.as_str()) {
                return Err(bad(format!(
                    "unknown setting '{key}' (known: {})",
                    KEYS.join(", ")
                )));
            }
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                other => {
                    return Err(bad(format!(
                        "'{key}' must be a string or an integer, not {}",
                        other.type_str()
                    )));
                }
            };
            layer.origin.insert(key.clone(), format!("{key} in {path}"));
            layer.values.insert(key, text);
        }
        Ok(layer)
    }
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub repo: String,
    pub compression: Compression,
    pub key: Option<Arc<MasterKey>>,
    pub retry_time: Duration,
    pub request_timeout: Duration,
    pub chunk_size: u32,
    pub log: String,
    /// A call that moves no byte to or from the store for this long fails.
    pub progress_timeout: Duration,
    /// Segments a look-ahead worker archives at once; 0 turns look-ahead off.
    pub lookahead: u32,
    /// Bytes of WAL the restore spool may hold; 0 turns prefetch off.
    pub prefetch: u64,
    /// Spool directory; `None`: `pgsql_tmp_walcore` in the data directory.
    pub spool: Option<std::path::PathBuf>,
    /// Where the encryption key came from (to hand the same source to another process).
    pub key_source: KeySource,
    /// The `WALCORE_CONFIG` file, if one was read.
    pub config_file: Option<String>,
}

/// Where the encryption key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    None,
    /// The key itself, from a flag, `WALCORE_ENCRYPTION_KEY` or the configuration file.
    Inline,
    /// `encryption_key_file`: the path.
    File(String),
    /// `encryption_key_command`: the command.
    Command(String),
}

/// Default byte bound of the restore spool.
pub const DEFAULT_PREFETCH: u64 = 256 * 1024 * 1024;

/// Looks a setting up through the layers, first found wins; returns value and origin.
struct Resolver {
    layers: Vec<Layer>,
}

impl Resolver {
    fn get<'a>(&'a self, key: &'a str) -> Option<(&'a str, &'a str)> {
        self.layers.iter().find_map(|l| {
            l.values
                .get(key)
                .map(|v| (v.as_str(), l.origin.get(key).map_or(key, String::as_str)))
        })
    }

    fn parse<T>(
        &self,
        key: &str,
        default: T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, Error> {
        match self.get(key) {
            None => Ok(default),
            Some((v, origin)) => parse(v)
                .map_err(|why| Error::new(ErrorKind::Configuration, format!("{origin}: {why}"))),
        }
    }
}

impl Config {
    /// Resolves the configuration from command-line `flags`, the process environment and the
    /// `WALCORE_CONFIG` file.
    pub fn load(flags: Layer) -> Result<Config, Error> {
        Config::load_with(flags, |name| std::env::var(name).ok())
    }

    /// [`Config::load`] with another environment (for tests and embedding programs).
    pub fn load_with(flags: Layer, env: impl Fn(&str) -> Option<String>) -> Result<Config, Error> {
        let mut layers = vec![flags, Layer::from_env(&env)];
        let config_file = env("WALCORE_CONFIG").filter(|p| !p.is_empty());
        if let Some(path) = config_file.clone() {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Error::new(
                    ErrorKind::Configuration,
                    format!("WALCORE_CONFIG: cannot read {path}: {e}"),
                )
            })?;
            layers.push(Layer::from_toml(&path, &text)?);
        }
        let r = Resolver { layers };

        let repo = r
            .get("repo")
            .map(|(v, _)| v.to_string())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Configuration,
                    "no repository configured: set WALCORE_REPO (e.g. file:///var/lib/walcore or s3://bucket/prefix), --repo, or repo in the WALCORE_CONFIG file",
                )
            })?;
        let compression = r.parse("compression", Compression::default(), |v| v.parse())?;
        let retry_time = r.parse("retry_time", Duration::from_secs(60), parse_duration)?;
        let request_timeout =
            r.parse("request_timeout", Duration::from_secs(60), parse_duration)?;
        let chunk_size = r.parse("chunk_size", DEFAULT_CHUNK_SIZE, |v| {
            let n: u32 = v
                .trim()
                .parse()
                .map_err(|_| format!("'{v}' is not a number of bytes"))?;
            if !(crate::codec::envelope::MIN_CHUNK_SIZE..=crate::codec::envelope::MAX_CHUNK_SIZE)
                .contains(&n)
            {
                return Err(format!("chunk size {n} is outside 65536..=67108864"));
            }
            Ok(n)
        })?;
        let log = r.parse("log", "info".to_string(), |v| Ok(v.to_string()))?;
        let progress_timeout = r.parse("progress_timeout", Duration::from_secs(60), |v| {
            parse_duration(v).and_then(|d| {
                if d.is_zero() {
                    Err("a progress timeout of 0 would fail every call".into())
                } else {
                    Ok(d)
                }
            })
        })?;
        let lookahead = r.parse("lookahead", 2, |v| {
            v.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= 64)
                .ok_or_else(|| format!("'{v}' is not a number of segments from 0 to 64"))
        })?;
        let prefetch = r.parse("prefetch", DEFAULT_PREFETCH, parse_bytes)?;
        let spool = r.parse("spool", None, |v| {
            let p = std::path::PathBuf::from(v);
            if p.is_absolute() {
                Ok(Some(p))
            } else {
                Err(format!("'{v}' is not an absolute path"))
            }
        })?;
        let key = load_key(&r)?;
        let key_source = if r.get("encryption_key_file").is_some() {
            KeySource::File(
                r.get("encryption_key_file")
                    .map_or("", |(v, _)| v)
                    .to_owned(),
            )
        } else if let Some((v, _)) = r.get("encryption_key_command") {
            KeySource::Command(v.to_owned())
        } else if key.is_some() {
            KeySource::Inline
        } else {
            KeySource::None
        };
        Ok(Config {
            repo,
            compression,
            key,
            retry_time,
            request_timeout,
            chunk_size,
            log,
            progress_timeout,
            lookahead,
            prefetch,
            spool,
            key_source,
            config_file,
        })
    }

    /// The codec these settings describe.
    pub fn codec(&self) -> Codec {
        Codec::new(self.compression, self.key.clone()).with_chunk_size(self.chunk_size)
    }

    /// The store client settings.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            retry_time: self.retry_time,
            request_timeout: self.request_timeout,
            ..StoreOptions::default()
        }
    }
}

fn load_key(r: &Resolver) -> Result<Option<Arc<MasterKey>>, Error> {
    let given: Vec<(&str, (&str, &str))> = [
        "encryption_key",
        "encryption_key_file",
        "encryption_key_command",
    ]
    .into_iter()
    .filter_map(|k| r.get(k).map(|v| (k, v)))
    .collect();
    let conf = |msg: String| Error::new(ErrorKind::Configuration, msg);
    let (key, (value, origin)) = match given.as_slice() {
        [] => return Ok(None),
        [one] => *one,
        many => {
            let names: Vec<&str> = many.iter().map(|(_, (_, o))| *o).collect();
            return Err(conf(format!(
                "more than one encryption key source is set ({}); set exactly one",
                names.join(", ")
            )));
        }
    };
    let text = match key {
        "encryption_key" => value.to_string(),
        "encryption_key_file" => std::fs::read_to_string(value)
            .map_err(|e| conf(format!("{origin}: cannot read key file {value}: {e}")))?,
        _ => {
            let out = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(value)
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .output()
                .map_err(|e| conf(format!("{origin}: cannot run the key command: {e}")))?;
            if !out.status.success() {
                return Err(conf(format!(
                    "{origin}: the key command failed ({})",
                    out.status
                )));
            }
            String::from_utf8(out.stdout).map_err(|_| {
                conf(format!(
                    "{origin}: the key command printed something that is not text"
                ))
            })?
        }
    };
    MasterKey::from_hex(&text)
        .map(|k| Some(Arc::new(k)))
        .map_err(|e| conf(format!("{origin}: {e}")))
}

/// `268435456`, `256MiB`, `256M`, `1G`, `512k`: binary multiples either way.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || format!("'{text}' is not a size (examples: 0, 268435456, 256MiB, 1GiB)");
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// `90`, `90s`, `500ms`, `2m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let bad = || format!("'{text}' is not a duration (examples: 30s, 500ms, 2m)");
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(bad()),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn flags_win_over_env_and_defaults_apply() {
        let mut flags = Layer::default();
        flags.set_flag("repo", "--repo", Some("file:///flag"));
        let c = Config::load_with(
            flags,
            env(&[
                ("WALCORE_REPO", "file:///env"),
                ("WALCORE_RETRY_TIME", "5s"),
            ]),
        )
        .expect("config");
        assert_eq!(c.repo, "file:///flag");
        assert_eq!(c.retry_time, Duration::from_secs(5));
        assert_eq!(c.compression, Compression::default());
        assert!(c.key.is_none());
    }

    #[test]
    fn env_wins_over_file_and_file_keys_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "repo = \"file:///file\"\ncompression = \"none\"\nchunk_size = 131072\n",
        )
        .expect("write");
        let p: &'static str = Box::leak(path.to_string_lossy().into_owned().into_boxed_str());
        let pairs: &'static [(&str, &str)] = Box::leak(
            vec![("WALCORE_CONFIG", p), ("WALCORE_COMPRESSION", "zstd:5")].into_boxed_slice(),
        );
        let c = Config::load_with(Layer::default(), env(pairs)).expect("config");
        assert_eq!(c.repo, "file:///file");
        assert_eq!(c.compression, Compression::Zstd { level: 5 });
        assert_eq!(c.chunk_size, 131072);

        std::fs::write(&path, "repo = \"file:///x\"\nencryption_kye = \"00\"\n").expect("write");
        let e = Config::load_with(Layer::default(), env(pairs)).unwrap_err();
        assert!(
            e.to_string().contains("unknown setting 'encryption_kye'"),
            "{e}"
        );
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "WALCORE_REPO"),
            (
                &[
                    ("WALCORE_REPO", "file:///r"),
                    ("WALCORE_COMPRESSION", "lz4"),
                ],
                "WALCORE_COMPRESSION",
            ),
            (
                &[
                    ("WALCORE_REPO", "file:///r"),
                    ("WALCORE_ENCRYPTION_KEY", "abc"),
                ],
                "WALCORE_ENCRYPTION_KEY",
            ),
            (
                &[
                    ("WALCORE_REPO", "file:///r"),
                    ("WALCORE_RETRY_TIME", "soon"),
                ],
                "WALCORE_RETRY_TIME",
            ),
            (
                &[
                    ("WALCORE_REPO", "file:///r"),
                    ("WALCORE_ENCRYPTION_KEY_FILE", "/nonexistent/key"),
                ],
                "WALCORE_ENCRYPTION_KEY_FILE",
            ),
            (
                &[
                    ("WALCORE_REPO", "file:///r"),
                    ("WALCORE_ENCRYPTION_KEY_COMMAND", "exit 3"),
                ],
                "WALCORE_ENCRYPTION_KEY_COMMAND",
            ),
            (
                &[
                    ("WALCORE_REPO", "file:///r"),
                    ("WALCORE_ENCRYPTION_KEY", "00"),
                    ("WALCORE_ENCRYPTION_KEY_FILE", "/k"),
                ],
                "more than one encryption key source",
            ),
        ];
        for (pairs, needle) in cases {
            let pairs: &'static [(&str, &str)] = Box::leak(pairs.to_vec().into_boxed_slice());
            let e = Config::load_with(Layer::default(), env(pairs)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Configuration);
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn key_from_command() {
        let hex = "11".repeat(32);
        let cmd: &'static str = Box::leak(format!("echo {hex}").into_boxed_str());
        let pairs: &'static [(&str, &str)] = Box::leak(
            vec![
                ("WALCORE_REPO", "file:///r"),
                ("WALCORE_ENCRYPTION_KEY_COMMAND", cmd),
            ]
            .into_boxed_slice(),
        );
        let c = Config::load_with(Layer::default(), env(pairs)).expect("config");
        assert_eq!(
            c.key.expect("key").fingerprint(),
            MasterKey::from_bytes([0x11; 32]).fingerprint()
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("512 kb"), Ok(512 << 10));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999999G").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }
}
