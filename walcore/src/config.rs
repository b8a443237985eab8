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
//! | longest the key command may run | `WALCORE_ENCRYPTION_KEY_COMMAND_TIMEOUT` | `30s` |
//! | retry window for store faults | `WALCORE_RETRY_TIME` | `60s` |
//! | longest a store request may go without progress | `WALCORE_REQUEST_TIMEOUT` | `60s` |
//! | plaintext bytes per chunk | `WALCORE_CHUNK_SIZE` | `1048576` |
//! | log level (`error` … `trace`) | `WALCORE_LOG` | `info` |
//! | a call fails after this long without progress | `WALCORE_PROGRESS_TIMEOUT` | `60s` |
//! | segments archived ahead at once (0: off) | `WALCORE_LOOKAHEAD` | `2` |
//! | bytes of WAL prefetched during recovery (0: off) | `WALCORE_PREFETCH` | `256MiB` |
//! | spool directory for look-ahead and prefetch | `WALCORE_SPOOL` | `<data dir>/pgsql_tmp_walcore` |
//!
//! The file is `/etc/walcore/walcore.toml` when `WALCORE_CONFIG` is not set and it exists.
//! Cloud credentials and endpoints go in its section for the store (`[s3]`, `[gcs]`,
//! `[azure]`: [`CLOUD_KEYS`]); the variables the cloud's own tools read (`AWS_ACCESS_KEY_ID`,
//! `AWS_REGION`, `AWS_ENDPOINT_URL`, …) fill in what the section does not set. A file that
//! holds any secret is refused when others may read it.
//!
//! Secrets stay inside their types:
//! - An unknown `WALCORE_*` variable is an error naming the closest known one, as an unknown
//!   key of the TOML file is: a misspelt `WALCORE_ENCRYPTON_KEY` must not quietly create an
//!   unencrypted repository. Names starting with `WALCORE_TEST_`, and `WALCORE_BIN_DIR` and
//!   `WALCORE_REGENERATE_VECTORS`, belong to the test tools and are ignored
//!   ([`check_env_names`]).
//! - Errors name the setting and where it came from, never its value; a syntax error in the
//!   TOML file gives the line, the column and a short reason, never the line's text (it may
//!   hold a key).
//! - `Debug` of [`Layer`], [`Config`] and [`KeySource`] shows no key and no key command.
//! - A key file must not be readable by others: mode `0600` or less, or `0640` or less when
//!   owned by root (libpq's rule for its key files).
//! - The key command runs once per process, with stdin and stderr closed and stdout read as
//!   the key, in its own process group, which is killed when the command has not finished
//!   within `encryption_key_command_timeout` or the progress timeout, whichever is shorter.
//! - Key text read from a variable, a file or a command is wiped (`zeroize`) once parsed.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::{Zeroize, Zeroizing};

use crate::codec::{Codec, Compression, DEFAULT_CHUNK_SIZE, MasterKey};
use crate::error::{Error, ErrorKind};
use crate::lifecycle::Policy;
use crate::store::StoreOptions;

/// Every setting, by its key (`repo`, `compression`, …).
pub const KEYS: &[&str] = &[
    "repo",
    "compression",
    "encryption_key",
    "encryption_key_file",
    "encryption_key_command",
    "encryption_key_command_timeout",
    "retry_time",
    "request_timeout",
    "chunk_size",
    "log",
    "progress_timeout",
    "lookahead",
    "prefetch",
    "spool",
    "keep_last",
    "keep_within",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
    "pitr_window",
    "orphan_grace",
    "alert_command",
    "alert_webhook",
    "alert_state",
    "alert_backup_age",
    "alert_archive_age",
    "alert_ready_age",
    "alert_stream_grace",
];

/// Whether setting `key` (a key of [`KEYS`], or `SECTION.NAME` of [`CLOUD_KEYS`]) is secret.
pub fn is_secret(key: &str) -> bool {
    SECRET_KEYS.contains(&key)
        || key.split_once('.').is_some_and(|(section, name)| {
            CLOUD_KEYS
                .iter()
                .any(|(sec, n, _, secret)| *sec == section && *n == name && *secret)
        })
}

/// The store settings a configuration file may hold, in sections named after the store:
/// section, name in the file, the `object_store` key it sets, and whether it is a secret.
/// Only the section of the repository's store is applied; the file's values win over the
/// variables the clouds' tools read (`AWS_*`, `GOOGLE_*`, `AZURE_*`), which still fill in the
/// rest.
pub const CLOUD_KEYS: &[(&str, &str, &str, bool)] = &[
    ("s3", "access_key_id", "aws_access_key_id", false),
    ("s3", "secret_access_key", "aws_secret_access_key", true),
    ("s3", "session_token", "aws_session_token", true),
    ("s3", "region", "aws_region", false),
    ("s3", "endpoint", "aws_endpoint", false),
    ("s3", "allow_http", "allow_http", false),
    ("gcs", "service_account", "google_service_account", false),
    (
        "gcs",
        "service_account_key",
        "google_service_account_key",
        true,
    ),
    ("azure", "account", "azure_storage_account_name", false),
    ("azure", "access_key", "azure_storage_account_key", true),
    ("azure", "sas_token", "azure_storage_sas_key", true),
    ("azure", "endpoint", "azure_storage_endpoint", false),
    ("azure", "use_emulator", "azure_storage_use_emulator", false),
    ("azure", "allow_http", "allow_http", false),
];

/// The section of [`CLOUD_KEYS`] that applies to a repository URL's scheme.
fn cloud_section(repo: &str) -> Option<&'static str> {
    let scheme = repo.split_once("://")?.0;
    match scheme {
        "s3" | "s3a" => Some("s3"),
        "gs" => Some("gcs"),
        "az" | "azure" | "abfs" | "abfss" => Some("azure"),
        _ => None,
    }
}

/// Where the configuration file is when `WALCORE_CONFIG` does not say (read only if present).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/walcore/walcore.toml";

/// A repository given as a plain absolute path, as the `file://` URL it means; anything else
/// as it is.
fn file_url_of_path(repo: &str) -> String {
    if repo.starts_with('/')
        && let Ok(url) = url::Url::from_file_path(repo)
    {
        return url.to_string();
    }
    repo.to_string()
}

/// Settings whose values are secret: never shown by `Debug` or in a message. The key command
/// is not a secret itself, but a command such as `echo <key>` would be.
const SECRET_KEYS: &[&str] = &[
    "encryption_key",
    "encryption_key_command",
    "alert_command",
    "alert_webhook",
];

/// `WALCORE_*` variables read besides those of [`KEYS`].
pub const OTHER_VARIABLES: &[&str] = &["WALCORE_CONFIG"];

/// Variables of the test tools (the end-to-end harness, the golden-vector tests), ignored by
/// [`check_env_names`]: a developer may have them exported while running a binary by hand.
/// The harness itself gives the binaries a clean environment.
const TEST_PREFIX: &str = "WALCORE_TEST_";
const TEST_VARIABLES: &[&str] = &["WALCORE_BIN_DIR", "WALCORE_REGENERATE_VECTORS"];

/// Default limit of the key command.
pub const DEFAULT_KEY_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The environment variable of a setting.
pub fn env_name(key: &str) -> String {
    format!("WALCORE_{}", key.to_ascii_uppercase())
}

/// Every `WALCORE_*` variable walcore reads.
pub fn known_variables() -> Vec<String> {
    KEYS.iter()
        .map(|k| env_name(k))
        .chain(OTHER_VARIABLES.iter().map(|v| (*v).to_string()))
        .collect()
}

/// Refuses a `WALCORE_*` variable that walcore does not read (a misspelling would otherwise be
/// ignored without a word), naming the closest known one. `names` are the names of the process
/// environment; values are never looked at.
pub fn check_env_names<N: AsRef<OsStr>>(names: impl IntoIterator<Item = N>) -> Result<(), Error> {
    let known = known_variables();
    let mut unknown: Vec<String> = names
        .into_iter()
        .filter_map(|n| {
            let name = n.as_ref().to_string_lossy().into_owned();
            let ours = name.starts_with("WALCORE_")
                && !name.starts_with(TEST_PREFIX)
                && !TEST_VARIABLES.contains(&name.as_str())
                && !known.contains(&name);
            ours.then_some(name)
        })
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort();
    let each: Vec<String> = unknown
        .iter()
        .map(
            |name| match closest(name, known.iter().map(String::as_str)) {
                Some(k) => format!("{name} (did you mean {k}?)"),
                None => name.clone(),
            },
        )
        .collect();
    Err(Error::new(
        ErrorKind::Configuration,
        format!(
            "unknown environment variable{} {}: walcore reads only its own WALCORE_* \
             variables ({}), and a misspelt one must not be ignored; fix or unset it",
            if unknown.len() > 1 { "s" } else { "" },
            each.join(", "),
            known.join(", ")
        ),
    ))
}

/// The candidate closest to `word` (optimal string alignment distance: insertions, deletions,
/// substitutions and swaps of neighbours each count 1), if it is close enough to be a likely
/// misspelling: at most a third of the word's length, and at least 2 edits always allowed.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Optimal string alignment distance between `a` and `b`, by characters, ignoring case.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().map(|c| c.to_ascii_lowercase()).collect();
    let b: Vec<char> = b.chars().map(|c| c.to_ascii_lowercase()).collect();
    // rows[i][j]: distance between a[..i] and b[..j].
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

/// Raw settings from one source, by key. Its `Debug` hides the values of secret settings, and
/// its values are wiped when it is dropped.
#[derive(Clone, Default)]
pub struct Layer {
    values: BTreeMap<String, String>,
    /// Where the values came from, for messages (`--repo`, `WALCORE_REPO`, `/etc/walcore.toml`).
    origin: BTreeMap<String, String>,
}

impl fmt::Debug for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (key, value) in &self.values {
            let origin = self.origin.get(key).map_or(key.as_str(), String::as_str);
            if is_secret(key) {
                m.entry(&key, &format_args!("<redacted> (from {origin})"));
            } else {
                m.entry(&key, &format_args!("{value:?} (from {origin})"));
            }
        }
        m.finish()
    }
}

impl Drop for Layer {
    fn drop(&mut self) {
        for v in self.values.values_mut() {
            v.zeroize();
        }
    }
}

impl Layer {
    /// Sets a value given on the command line as `flag`.
    pub fn set_flag(&mut self, key: &str, flag: &str, value: Option<impl Into<String>>) {
        if let Some(v) = value {
            self.values.insert(key.into(), v.into());
            self.origin.insert(key.into(), flag.into());
        }
    }

    /// The settings of store section `section` (`[s3]`, `[gcs]`, `[azure]`) of file `path`.
    fn add_section(&mut self, path: &str, section: &str, table: toml::Table) -> Result<(), String> {
        for (name, value) in table {
            let Some((_, _, key, _)) = CLOUD_KEYS
                .iter()
                .find(|(sec, n, ..)| *sec == section && *n == name)
            else {
                let known: Vec<&str> = CLOUD_KEYS
                    .iter()
                    .filter(|(sec, ..)| *sec == section)
                    .map(|(_, n, ..)| *n)
                    .collect();
                let shown = if name.len() <= 40 && !looks_like_key_material(&name) {
                    format!("unknown setting '{name}' in [{section}]")
                } else {
                    format!("an unknown setting in [{section}]")
                };
                return Err(match closest(&name, known.iter().copied()) {
                    Some(k) => format!("{shown} (did you mean '{k}'?)"),
                    None => format!("{shown} (known: {})", known.join(", ")),
                });
            };
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(format!(
                        "'{name}' in [{section}] must be a string, an integer or a boolean, \
                         not {}",
                        other.type_str()
                    ));
                }
            };
            let id = format!("{section}.{name}");
            self.origin
                .insert(id.clone(), format!("{name} in [{section}] of {path}"));
            self.values.insert(id, text);
            let _ = key;
        }
        Ok(())
    }

    /// Whether this layer holds a secret: a key, an alert destination, a cloud credential.
    fn secrets(&self) -> Vec<&str> {
        self.values
            .keys()
            .filter(|k| is_secret(k))
            .map(|k| self.origin.get(k).map_or(k.as_str(), String::as_str))
            .collect()
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
    /// disable encryption). Errors never quote the file's text: it may hold a key.
    pub fn from_toml(path: &str, text: &str) -> Result<Layer, Error> {
        let bad = |why: String| {
            Error::new(
                ErrorKind::Configuration,
                format!("configuration file {path}: {why}"),
            )
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| bad(toml_error(text, &e)))?;
        let mut layer = Layer::default();
        for (key, value) in table {
            let is_section = CLOUD_KEYS.iter().any(|(sec, ..)| *sec == key);
            if !KEYS.contains(&key.as_str()) && !is_section {
                // The name is shown only when it looks like a setting's name: a key pasted on a
                // line of its own parses as a name too.
                let shown = if key.len() <= 40 && !looks_like_key_material(&key) {
                    format!("unknown setting '{key}'")
                } else {
                    format!("an unknown setting ({} characters long)", key.len())
                };
                let hint = match closest(&key, KEYS.iter().copied()) {
                    Some(k) => format!("did you mean '{k}'?"),
                    None => format!("known: {}", KEYS.join(", ")),
                };
                return Err(bad(format!("{shown} ({hint})")));
            }
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Table(t) if CLOUD_KEYS.iter().any(|(sec, ..)| *sec == key) => {
                    layer.add_section(path, &key, t).map_err(bad)?;
                    continue;
                }
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

/// Where a TOML syntax error is and what it is, without the text around it: line and column
/// (from 1) of the error's start, and the parser's reason with anything it quotes from the
/// file left out.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let reason = e.message().lines().next().unwrap_or("").trim();
    // The parser's reasons are fixed phrases, but some quote the input between back quotes
    // (a duplicate key's name): keep only quotes of one to three characters, which are the
    // expected punctuation (`=`, `"`, `]`).
    let mut clean = String::new();
    for (i, part) in reason.split('`').enumerate() {
        if i % 2 == 0 {
            clean.push_str(part);
        } else if (1..=3).contains(&part.chars().count()) && !looks_like_key_material(part) {
            clean.push('`');
            clean.push_str(part);
            clean.push('`');
        } else {
            clean.push_str("(…)");
        }
    }
    let clean = if clean.is_empty() || looks_like_key_material(&clean) {
        "not valid TOML".to_string()
    } else {
        clean
    };
    // A bare word where a value belongs reads as a malformed number or date.
    let hint = if clean.starts_with("invalid") && !clean.contains("string") {
        " (string values need quotes: key = \"value\")"
    } else {
        ""
    };
    match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let before = text.get(..start).unwrap_or("");
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("not valid TOML at line {line}, column {column}: {clean}{hint}")
        }
        None => format!("not valid TOML: {clean}{hint}"),
    }
}

/// A run of 16 or more hexadecimal digits: possibly (part of) a key, never shown.
fn looks_like_key_material(text: &str) -> bool {
    let mut run = 0;
    for c in text.chars() {
        if c.is_ascii_hexdigit() {
            run += 1;
            if run >= 16 {
                return true;
            }
        } else {
            run = 0;
        }
    }
    false
}

/// The resolved configuration. Its `Debug` shows the key's fingerprint only.
#[derive(Debug, Clone)]
pub struct Config {
    pub repo: String,
    /// The store settings of the configuration file's section for the repository's store, by
    /// `object_store` key (secrets among them: never shown).
    pub cloud_options: CloudOptions,
    /// Every setting as `walcore config` shows it: secrets redacted, with where each came
    /// from.
    pub settings: Vec<Shown>,
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
    /// The key command's own time limit (`encryption_key_command_timeout`).
    pub key_command_timeout: Duration,
    /// The retention policy `expire` and `take --expire` apply (`keep_*`, `pitr_window`).
    pub retention: Policy,
    /// How long a take without a catalog record must have written nothing before `expire`
    /// sweeps its objects.
    pub orphan_grace: Duration,
    /// Where failure alerts go (`alert_command`, `alert_webhook`, `alert_state`).
    pub alerts: crate::alert::AlertSettings,
}

/// Where the encryption key came from. Its `Debug` shows the key command's program only.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    None,
    /// The key itself, from a flag, `WALCORE_ENCRYPTION_KEY` or the configuration file.
    Inline,
    /// `encryption_key_file`: the path.
    File(String),
    /// `encryption_key_command`: the command.
    Command(String),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::None => f.write_str("None"),
            KeySource::Inline => f.write_str("Inline"),
            KeySource::File(path) => f.debug_tuple("File").field(path).finish(),
            KeySource::Command(c) => write!(f, "Command(program {:?}, …)", program_of(c)),
        }
    }
}

/// The program a shell command runs (its first word that is not a variable assignment), to
/// name the command in messages without its arguments.
pub fn program_of(command: &str) -> &str {
    let word = command
        .split_whitespace()
        .find(|w| !w.contains('='))
        .unwrap_or("sh");
    if looks_like_key_material(word) {
        "(a command)"
    } else {
        word
    }
}

/// Default byte bound of the restore spool.
pub const DEFAULT_PREFETCH: u64 = 256 * 1024 * 1024;

/// Looks a setting up through the layers, first found wins; returns value and origin.
struct Resolver {
    layers: Vec<Layer>,
}

/// Store settings by `object_store` key; `Debug` shows the keys, never the values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CloudOptions(pub Vec<(String, String)>);

impl fmt::Debug for CloudOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| format!("{k}=<redacted>")))
            .finish()
    }
}

/// One effective setting, for `walcore config`: its name (`repo`, `s3.region`), its value
/// (`<redacted>` for a secret), and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Shown {
    pub name: String,
    pub value: String,
    pub origin: String,
}

impl Resolver {
    /// The settings that are set, in [`KEYS`] order, then the store section of `repo`.
    fn shown(&self, repo: &str) -> Vec<Shown> {
        let section = cloud_section(repo);
        let cloud = CLOUD_KEYS
            .iter()
            .filter(|(sec, ..)| Some(*sec) == section)
            .map(|(sec, name, ..)| format!("{sec}.{name}"));
        KEYS.iter()
            .map(|k| (*k).to_owned())
            .chain(cloud)
            .filter_map(|name| {
                let (value, origin) = self.get(&name)?;
                let value = if is_secret(&name) {
                    "<redacted>".to_owned()
                } else if name == "repo" {
                    file_url_of_path(value)
                } else {
                    value.to_owned()
                };
                Some(Shown {
                    value,
                    origin: origin.to_owned(),
                    name,
                })
            })
            .collect()
    }

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
    /// `WALCORE_CONFIG` file ([`DEFAULT_CONFIG_FILE`] when that is not set and it exists). An
    /// unknown `WALCORE_*` variable is an error ([`check_env_names`]).
    pub fn load(flags: Layer) -> Result<Config, Error> {
        check_env_names(std::env::vars_os().map(|(name, _)| name))?;
        Config::load_from(flags, |name| std::env::var(name).ok(), DEFAULT_CONFIG_FILE)
    }

    /// [`Config::load`] with another environment (for tests and embedding programs); does not
    /// check for unknown variables, which `env` cannot list, nor read [`DEFAULT_CONFIG_FILE`]
    /// (only the file `WALCORE_CONFIG` names).
    pub fn load_with(flags: Layer, env: impl Fn(&str) -> Option<String>) -> Result<Config, Error> {
        Config::load_from(flags, env, "")
    }

    /// [`Config::load_with`], with `default_file` read when `WALCORE_CONFIG` names no file
    /// and it exists.
    pub fn load_from(
        flags: Layer,
        env: impl Fn(&str) -> Option<String>,
        default_file: &str,
    ) -> Result<Config, Error> {
        let mut layers = vec![flags, Layer::from_env(&env)];
        let config_file = env("WALCORE_CONFIG").filter(|p| !p.is_empty()).or_else(|| {
            (!default_file.is_empty() && std::path::Path::new(default_file).exists())
                .then(|| default_file.to_owned())
        });
        if let Some(path) = config_file.clone() {
            layers.push(read_config_file(&path)?);
        }
        let r = Resolver { layers };

        let repo = r
            .get("repo")
            .map(|(v, _)| file_url_of_path(v))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Configuration,
                    "no repository configured: set WALCORE_REPO (e.g. file:///var/lib/walcore or s3://bucket/prefix), --repo, or repo in the WALCORE_CONFIG file",
                )
            })?;
        let compression = r.parse("compression", Compression::default(), |v| {
            v.parse().map_err(|_| {
                "not a compression setting; use 'none', 'zstd' or 'zstd:N' (N from -7 to 22)"
                    .to_string()
            })
        })?;
        let retry_time = r.parse("retry_time", Duration::from_secs(60), parse_duration)?;
        let request_timeout =
            r.parse("request_timeout", Duration::from_secs(60), parse_duration)?;
        let chunk_size = r.parse("chunk_size", DEFAULT_CHUNK_SIZE, |v| {
            let n: u32 = v
                .trim()
                .parse()
                .map_err(|_| "not a number of bytes".to_string())?;
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
                .ok_or_else(|| "not a number of segments from 0 to 64".to_string())
        })?;
        let prefetch = r.parse("prefetch", DEFAULT_PREFETCH, parse_bytes)?;
        let spool = r.parse("spool", None, |v| {
            let p = std::path::PathBuf::from(v);
            if p.is_absolute() {
                Ok(Some(p))
            } else {
                Err("not an absolute path".to_string())
            }
        })?;
        let command_timeout = r.parse(
            "encryption_key_command_timeout",
            DEFAULT_KEY_COMMAND_TIMEOUT,
            |v| {
                parse_duration(v).and_then(|d| {
                    if d.is_zero() {
                        Err("a key command timeout of 0 would stop every command".into())
                    } else {
                        Ok(d)
                    }
                })
            },
        )?;
        let count = |key: &str| {
            r.parse(key, 0u32, |v| {
                v.trim()
                    .parse::<u32>()
                    .map_err(|_| "not a number of backups (0 or more)".to_string())
            })
        };
        let span = |key: &str| r.parse(key, None, |v| parse_duration(v).map(Some));
        let retention = Policy {
            keep_last: count("keep_last")?,
            keep_within: span("keep_within")?,
            keep_daily: count("keep_daily")?,
            keep_weekly: count("keep_weekly")?,
            keep_monthly: count("keep_monthly")?,
            keep_yearly: count("keep_yearly")?,
            pitr_window: span("pitr_window")?,
        };
        let orphan_grace = r.parse(
            "orphan_grace",
            crate::lifecycle::expire::DEFAULT_ORPHAN_GRACE,
            parse_duration,
        )?;
        let alerts = crate::alert::AlertSettings {
            command: r.parse("alert_command", None, |v| Ok(Some(v.to_string())))?,
            webhook: r.parse("alert_webhook", None, |v| {
                if v.starts_with("http://") || v.starts_with("https://") {
                    Ok(Some(v.to_string()))
                } else {
                    Err("not an http:// or https:// URL".to_string())
                }
            })?,
            backup_age: r.parse(
                "alert_backup_age",
                Some(crate::alert::DEFAULT_BACKUP_AGE),
                |v| parse_duration(v).map(|d| (!d.is_zero()).then_some(d)),
            )?,
            archive_age: r.parse("alert_archive_age", None, |v| {
                parse_duration(v).map(|d| (!d.is_zero()).then_some(d))
            })?,
            ready_age: r.parse(
                "alert_ready_age",
                Some(crate::alert::DEFAULT_READY_AGE),
                |v| parse_duration(v).map(|d| (!d.is_zero()).then_some(d)),
            )?,
            stream_grace: r.parse(
                "alert_stream_grace",
                crate::alert::DEFAULT_STREAM_GRACE,
                parse_duration,
            )?,
            state_dir: r.parse("alert_state", None, |v| {
                let p = std::path::PathBuf::from(v);
                if p.is_absolute() {
                    Ok(Some(p))
                } else {
                    Err("not an absolute path".to_string())
                }
            })?,
        };
        let key = load_key(
            &r,
            CommandLimit {
                command_timeout,
                progress_timeout,
            },
        )?;
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
        let cloud_options = CloudOptions(
            cloud_section(&repo)
                .map(|section| {
                    CLOUD_KEYS
                        .iter()
                        .filter(|(sec, ..)| *sec == section)
                        .filter_map(|(sec, name, key, _)| {
                            let id = format!("{sec}.{name}");
                            r.get(&id).map(|(v, _)| ((*key).to_owned(), v.to_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        );
        let shown = r.shown(&repo);
        Ok(Config {
            repo,
            cloud_options,
            settings: shown,
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
            key_command_timeout: command_timeout,
            retention,
            orphan_grace,
            alerts,
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
            cloud_options: self.cloud_options.0.clone(),
            ..StoreOptions::default()
        }
    }
}

/// How long the key command may run: its own limit, and the progress timeout, since nothing
/// moves while it runs (a hung KMS must not hold PostgreSQL's archiver longer than a hung
/// store would).
#[derive(Debug, Clone, Copy)]
struct CommandLimit {
    command_timeout: Duration,
    progress_timeout: Duration,
}

impl CommandLimit {
    fn effective(self) -> Duration {
        self.command_timeout.min(self.progress_timeout)
    }
}

fn load_key(r: &Resolver, limit: CommandLimit) -> Result<Option<Arc<MasterKey>>, Error> {
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
    let parse = |text: &str| {
        MasterKey::from_hex(text)
            .map(|k| Some(Arc::new(k)))
            .map_err(|e| conf(format!("{origin}: {e}")))
    };
    match key {
        "encryption_key" => parse(value),
        "encryption_key_file" => {
            let text = read_key_file(std::path::Path::new(value)).map_err(|e| e.context(origin))?;
            let text = std::str::from_utf8(&text).map_err(|_| {
                conf(format!(
                    "{origin}: key file {value} holds something that is not text"
                ))
            })?;
            parse(text)
        }
        _ => {
            let key = key_from_command(value, limit, |text| {
                let text = std::str::from_utf8(text).map_err(|_| {
                    conf(format!(
                        "the key command ({}) printed something that is not text",
                        program_of(value)
                    ))
                })?;
                MasterKey::from_hex(text).map(Arc::new).map_err(|e| {
                    conf(format!(
                        "the key command ({}) printed no valid key: {e}",
                        program_of(value)
                    ))
                })
            })
            .map_err(|e| e.context(origin))?;
            Ok(Some(key))
        }
    }
}

/// Longest key file or key command output read: a key is 64 characters and a newline.
const MAX_KEY_TEXT: usize = 4096;

/// Why a key file's permissions are refused, if they are: libpq's rule for its key files. No
/// access for others; for the group none, except that a file owned by root may be readable by
/// its group (0640), so that a root-owned key can be shared with the `postgres` group.
pub fn key_file_mode_problem(mode: u32, owner_uid: u32) -> Option<String> {
    let mode = mode & 0o7777;
    let allowed_group = if owner_uid == 0 { 0o040 } else { 0 };
    if mode & 0o077 & !allowed_group == 0 {
        return None;
    }
    Some(format!(
        "has mode {mode:04o}, which gives {} access; it must be 0600 or less \
         (0640 or less if owned by root)",
        if mode & 0o007 != 0 {
            "others"
        } else {
            "its group"
        }
    ))
}

/// Reads and parses the configuration file `path`. One that holds a secret (a key, an alert
/// destination, a store credential) is refused when others may read it, by the rule for key
/// files ([`key_file_mode_problem`]), as libpq refuses such a `.pgpass`. Its text is wiped
/// once parsed.
fn read_config_file(path: &str) -> Result<Layer, Error> {
    use std::os::unix::fs::MetadataExt;
    let conf = |msg: String| Error::new(ErrorKind::Configuration, msg);
    let mut file = std::fs::File::open(path)
        .map_err(|e| conf(format!("cannot read the configuration file {path}: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| conf(format!("cannot read the configuration file {path}: {e}")))?;
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text)
        .map_err(|e| conf(format!("cannot read the configuration file {path}: {e}")))?;
    let layer = Layer::from_toml(path, &text)?;
    let secrets = layer.secrets();
    if let (Some(first), Some(problem)) = (
        secrets.first(),
        key_file_mode_problem(meta.mode(), meta.uid()),
    ) {
        return Err(conf(format!(
            "the configuration file {path} holds a secret ({first}) and {problem}: run chmod \
             600 {path}, or make it owned by root, group postgres, mode 0640"
        )));
    }
    Ok(layer)
}

/// Reads a key file, refusing one that others may read ([`key_file_mode_problem`]); the
/// returned text is wiped when dropped.
fn read_key_file(path: &std::path::Path) -> Result<Zeroizing<Vec<u8>>, Error> {
    use std::os::unix::fs::MetadataExt;
    let conf = |msg: String| Error::new(ErrorKind::Configuration, msg);
    let show = path.display();
    let mut file = std::fs::File::open(path)
        .map_err(|e| conf(format!("cannot read key file {show}: {e}")).with_source(e))?;
    // The mode of the file opened, not of whatever the path names a moment later.
    let meta = file
        .metadata()
        .map_err(|e| conf(format!("cannot read key file {show}: {e}")).with_source(e))?;
    if !meta.is_file() {
        return Err(conf(format!("key file {show} is not a regular file")));
    }
    if let Some(problem) = key_file_mode_problem(meta.mode(), meta.uid()) {
        return Err(conf(format!(
            "key file {show} {problem}: run chmod 600 {show}"
        )));
    }
    let mut text = Zeroizing::new(Vec::with_capacity(MAX_KEY_TEXT + 1));
    (&mut file)
        .take(MAX_KEY_TEXT as u64 + 1)
        .read_to_end(&mut text)
        .map_err(|e| conf(format!("cannot read key file {show}: {e}")).with_source(e))?;
    if text.len() > MAX_KEY_TEXT {
        return Err(conf(format!(
            "key file {show} is longer than {MAX_KEY_TEXT} bytes: it does not hold just a key"
        )));
    }
    Ok(text)
}

/// Keys already printed by a key command in this process, by command: the command runs once
/// per process however often the configuration is loaded.
static COMMAND_KEYS: Mutex<Vec<(String, Arc<MasterKey>)>> = Mutex::new(Vec::new());

/// The key `command` prints, parsed by `parse`; runs the command at most once per process.
fn key_from_command(
    command: &str,
    limit: CommandLimit,
    parse: impl FnOnce(&[u8]) -> Result<Arc<MasterKey>, Error>,
) -> Result<Arc<MasterKey>, Error> {
    // Held while the command runs: a second caller waits and reuses the key.
    let mut cache = COMMAND_KEYS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, key)) = cache.iter().find(|(c, _)| c == command) {
        return Ok(key.clone());
    }
    let out = run_key_command(command, limit)?;
    let key = parse(&out)?;
    cache.push((command.to_string(), key.clone()));
    Ok(key)
}

/// Runs `sh -c command` in its own process group, stdin and stderr closed (its stderr could
/// echo the key), and returns its stdout, wiped when dropped. The whole group is killed when
/// the command has not finished within the limit, or printed too much.
fn run_key_command(command: &str, limit: CommandLimit) -> Result<Zeroizing<Vec<u8>>, Error> {
    use std::os::unix::process::CommandExt;
    use std::sync::mpsc;
    let program = program_of(command);
    let conf = |msg: String| Error::new(ErrorKind::Configuration, msg);
    let started = Instant::now();
    let deadline = started + limit.effective();
    let mut child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| conf(format!("cannot run the key command ({program}): {e}")).with_source(e))?;
    // The child leads its own process group (`process_group(0)`): its group ID is its PID.
    let group = rustix::process::Pid::from_child(&child);
    let stop = |child: &mut std::process::Child| {
        // The shell's children too: a `sleep` or a KMS client it started.
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        let _ = child.kill();
        let _ = child.wait();
    };
    let Some(mut stdout) = child.stdout.take() else {
        stop(&mut child);
        return Err(conf(format!(
            "the key command ({program}): no pipe to read its output"
        )));
    };
    // A thread reads the output, so that the wait below can give up at the deadline; it
    // ends when every process of the group has closed the pipe (or been killed).
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Zeroizing::new(Vec::with_capacity(MAX_KEY_TEXT + 1));
        let read = (&mut stdout)
            .take(MAX_KEY_TEXT as u64 + 1)
            .read_to_end(&mut text);
        let _ = tx.send(read.map(|_| text));
    });
    let timed_out = || {
        conf(format!(
            "the key command ({program}) did not finish within {:.1}s and was stopped \
             (the shorter of encryption_key_command_timeout, {:.1}s, and progress_timeout, {:.1}s)",
            limit.effective().as_secs_f64(),
            limit.command_timeout.as_secs_f64(),
            limit.progress_timeout.as_secs_f64(),
        ))
    };
    let text = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => {
            stop(&mut child);
            return Err(conf(format!(
                "reading the output of the key command ({program}): {e}"
            ))
            .with_source(e));
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            stop(&mut child);
            return Err(timed_out());
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            stop(&mut child);
            return Err(conf(format!(
                "reading the output of the key command ({program}): the reader stopped"
            )));
        }
    };
    if text.len() > MAX_KEY_TEXT {
        stop(&mut child);
        return Err(conf(format!(
            "the key command ({program}) printed more than {MAX_KEY_TEXT} bytes: not just a key"
        )));
    }
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                stop(&mut child);
                return Err(timed_out());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                stop(&mut child);
                return Err(
                    conf(format!("waiting for the key command ({program}): {e}")).with_source(e),
                );
            }
        }
    };
    if !status.success() {
        // Its output is not shown: it may be (part of) the key.
        return Err(conf(format!(
            "the key command ({program}) failed ({status}); run it by hand to see why"
        )));
    }
    Ok(text)
}

/// `268435456`, `256MiB`, `256M`, `1G`, `512k`: binary multiples either way.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || "not a size (examples: 0, 268435456, 256MiB, 1GiB)".to_string();
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
    let bad = || "not a duration (examples: 30s, 500ms, 2m, 36h, 7d, 2w)".to_string();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86_400)),
        "w" => Duration::from_secs(n.saturating_mul(7 * 86_400)),
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
        assert_eq!(
            file_url_of_path("/var/lib/walcore"),
            "file:///var/lib/walcore"
        );
        assert_eq!(file_url_of_path("/srv/my repo"), "file:///srv/my%20repo");
        assert_eq!(file_url_of_path("s3://b/p"), "s3://b/p");
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

    /// `env` over owned pairs.
    fn env_of(pairs: Vec<(String, String)>) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A key whose every 8-character piece is distinctive.
    const SECRET_HEX: &str = "3f9a1c7e52b8d4066e1f0a9d3c7b5e2a8d4f6b1c0e9a7d3f5b2c8e4a6d1f0b9c";

    /// Panics when `shown` holds any 8 consecutive characters of [`SECRET_HEX`].
    fn assert_no_key_in(shown: &str) {
        let lower = shown.to_ascii_lowercase();
        for i in 0..=SECRET_HEX.len() - 8 {
            let piece = &SECRET_HEX[i..i + 8];
            assert!(
                !lower.contains(piece),
                "key material {piece} shown in: {shown}"
            );
        }
    }

    #[test]
    fn closest_name_suggests_likely_misspellings_only() {
        let known = known_variables();
        let known = || known.iter().map(String::as_str);
        assert_eq!(
            closest("WALCORE_ENCRYPTON_KEY", known()),
            Some("WALCORE_ENCRYPTION_KEY")
        );
        assert_eq!(
            closest("WALCORE_ENCRYPTION_KEYFILE", known()),
            Some("WALCORE_ENCRYPTION_KEY_FILE")
        );
        assert_eq!(closest("WALCORE_RPEO", known()), Some("WALCORE_REPO"));
        assert_eq!(closest("walcore_repo", known()), Some("WALCORE_REPO"));
        assert_eq!(
            closest("WALCORE_PREFECTH", known()),
            Some("WALCORE_PREFETCH")
        );
        assert_eq!(closest("WALCORE_SOMETHING_ELSE_ENTIRELY", known()), None);
        assert_eq!(
            closest("encryption_kye", KEYS.iter().copied()),
            Some("encryption_key")
        );
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("ab", "ba"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn unknown_walcore_variables_are_refused_and_test_variables_ignored() {
        let e =
            check_env_names(["PATH", "WALCORE_REPO", "WALCORE_ENCRYPTON_KEY", "HOME"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Configuration);
        assert!(
            e.to_string()
                .contains("WALCORE_ENCRYPTON_KEY (did you mean WALCORE_ENCRYPTION_KEY?)"),
            "{e}"
        );
        let e = check_env_names(["WALCORE_NONSENSE_FOR_SURE", "WALCORE_RETRYTIME"]).unwrap_err();
        assert!(
            e.to_string().contains("unknown environment variables"),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("WALCORE_RETRYTIME (did you mean WALCORE_RETRY_TIME?)"),
            "{e}"
        );
        assert!(e.to_string().contains("WALCORE_NONSENSE_FOR_SURE,"), "{e}");

        let mut fine: Vec<String> = known_variables();
        fine.extend(
            [
                "WALCORE_TEST_MOTO_SERVER",
                "WALCORE_TEST_ANYTHING",
                "WALCORE_BIN_DIR",
                "WALCORE_REGENERATE_VECTORS",
                "WALCORE",
                "AWS_SECRET_ACCESS_KEY",
            ]
            .map(String::from),
        );
        check_env_names(&fine).expect("known and test variables are accepted");
    }

    #[test]
    fn debug_never_shows_a_key() {
        // Inline, from the environment and from the file.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.toml");
        std::fs::write(&path, format!("encryption_key = \"{SECRET_HEX}\"\n")).expect("write");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        let c = Config::load_with(
            Layer::default(),
            env_of(vars(&[
                ("WALCORE_REPO", "file:///r"),
                ("WALCORE_CONFIG", &path.to_string_lossy()),
            ])),
        )
        .expect("config");
        assert!(c.key.is_some());
        let shown = format!("{c:?} {c:#?} {:?}", c.key_source);
        assert_no_key_in(&shown);
        assert!(shown.contains("fingerprint"), "{shown}");

        let env = env_of(vars(&[("WALCORE_ENCRYPTION_KEY", SECRET_HEX)]));
        let mut layer = Layer::from_env(&env);
        layer.set_flag("repo", "--repo", Some("file:///r"));
        let shown = format!("{layer:?} {layer:#?}");
        assert_no_key_in(&shown);
        assert!(
            shown.contains("<redacted> (from WALCORE_ENCRYPTION_KEY)"),
            "{shown}"
        );
        assert!(shown.contains("file:///r"), "{shown}");

        let text = format!("repo = \"file:///r\"\nencryption_key = \"{SECRET_HEX}\"\n");
        let layer = Layer::from_toml("/etc/w.toml", &text).expect("valid TOML");
        assert_no_key_in(&format!("{layer:?}"));

        // A command that holds the key in its text.
        let source = KeySource::Command(format!("echo {SECRET_HEX}"));
        let shown = format!("{source:?}");
        assert_no_key_in(&shown);
        assert!(shown.contains("echo"), "{shown}");
        assert_eq!(program_of(&format!("{SECRET_HEX} --x")), "(a command)");
        assert_eq!(
            program_of("AWS_PROFILE=kms /usr/bin/get-key --id 3"),
            "/usr/bin/get-key"
        );

        // Cloud options an embedding program hands to the store.
        let mut options = c.store_options();
        options
            .cloud_options
            .push(("aws_secret_access_key".into(), SECRET_HEX.into()));
        let shown = format!("{options:?}");
        assert_no_key_in(&shown);
        assert!(shown.contains("aws_secret_access_key"), "{shown}");

        // And the key itself.
        let key = MasterKey::from_hex(SECRET_HEX).expect("key");
        assert_no_key_in(&format!("{key:?}"));
    }

    #[test]
    fn toml_errors_never_quote_the_file() {
        let cases = [
            // An unquoted key, alone and next to other settings.
            format!("encryption_key = {SECRET_HEX}\n"),
            format!("repo = \"file:///r\"\nencryption_key = {SECRET_HEX}\nlog = \"info\"\n"),
            // A quote missing at either end.
            format!("encryption_key = \"{SECRET_HEX}\n"),
            format!("encryption_key = {SECRET_HEX}\"\n"),
            // The `=` forgotten, a key pasted alone, a second assignment.
            format!("encryption_key \"{SECRET_HEX}\"\n"),
            format!("{SECRET_HEX}\n"),
            format!("encryption_key = \"{SECRET_HEX}\"\nencryption_key = \"{SECRET_HEX}\"\n"),
            format!("encryption_key = \"{SECRET_HEX}\" \"{SECRET_HEX}\"\n"),
            format!("[{SECRET_HEX}]\n"),
            format!("{SECRET_HEX} = 1\n"),
            format!("encryption_key = 0x{SECRET_HEX}\n"),
        ];
        for text in &cases {
            let e = Layer::from_toml("/etc/walcore.toml", text).unwrap_err();
            let shown = format!("{e} {e:#} {e:?}");
            assert_no_key_in(&shown);
            assert_eq!(e.kind(), ErrorKind::Configuration);
            assert!(shown.contains("/etc/walcore.toml"), "{shown}");
        }
        let e = Layer::from_toml("/w.toml", &cases[1]).unwrap_err();
        assert!(
            e.to_string().contains("not valid TOML at line 2, column "),
            "{e}"
        );
        let e = Layer::from_toml("/w.toml", "repo = \"x\"\nencryption_kye = \"ab\"\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown setting 'encryption_kye' (did you mean 'encryption_key'?)"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_not_echoed() {
        for (name, value) in [
            ("WALCORE_RETRY_TIME", "soonish"),
            ("WALCORE_COMPRESSION", "brotlify"),
            ("WALCORE_CHUNK_SIZE", "hugebytes"),
            ("WALCORE_LOOKAHEAD", "manymany"),
            ("WALCORE_PREFETCH", "lotsofit"),
            ("WALCORE_SPOOL", "relative/spooldir"),
            ("WALCORE_ENCRYPTION_KEY_COMMAND_TIMEOUT", "forever"),
            ("WALCORE_ENCRYPTION_KEY", &SECRET_HEX[..60]),
            (
                "WALCORE_ENCRYPTION_KEY",
                &format!("{}zz", &SECRET_HEX[..62]),
            ),
        ] {
            let e = Config::load_with(
                Layer::default(),
                env_of(vars(&[("WALCORE_REPO", "file:///r"), (name, value)])),
            )
            .unwrap_err();
            assert!(e.to_string().contains(name), "{name}: {e}");
            assert!(!e.to_string().contains(value), "{name}: {e}");
            assert_no_key_in(&e.to_string());
        }
    }

    #[test]
    fn key_file_mode_rule_follows_libpq() {
        for (mode, uid) in [
            (0o600, 1000),
            (0o400, 1000),
            (0o600, 0),
            (0o640, 0),
            (0o440, 0),
        ] {
            assert_eq!(key_file_mode_problem(mode, uid), None, "{mode:o} uid {uid}");
        }
        for (mode, uid) in [
            (0o644, 1000),
            (0o640, 1000),
            (0o604, 1000),
            (0o644, 0),
            (0o660, 0),
            (0o650, 0),
            (0o606, 0),
            (0o100_644, 1000),
        ] {
            let problem = key_file_mode_problem(mode, uid).expect("refused");
            assert!(
                problem.contains(&format!("{:04o}", mode & 0o7777)),
                "{problem}"
            );
        }

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("walcore.key");
        std::fs::write(&path, SECRET_HEX).expect("write");
        let load = || {
            Config::load_with(
                Layer::default(),
                env_of(vars(&[
                    ("WALCORE_REPO", "file:///r"),
                    ("WALCORE_ENCRYPTION_KEY_FILE", &path.to_string_lossy()),
                ])),
            )
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = load().unwrap_err();
        let shown = e.to_string();
        assert_eq!(e.kind(), ErrorKind::Configuration);
        assert!(shown.contains(&path.display().to_string()), "{shown}");
        assert!(shown.contains("0644"), "{shown}");
        assert!(shown.contains("chmod 600"), "{shown}");
        assert_no_key_in(&shown);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let c = load().expect("a 0600 key file is accepted");
        assert_eq!(
            c.key.expect("key").fingerprint(),
            MasterKey::from_hex(SECRET_HEX).expect("key").fingerprint()
        );
    }

    #[test]
    fn key_command_output_is_never_shown() {
        // A failing command that printed the key on both streams.
        let cmd = format!("echo {SECRET_HEX}; echo {SECRET_HEX} >&2; exit 3");
        let e = Config::load_with(
            Layer::default(),
            env_of(vars(&[
                ("WALCORE_REPO", "file:///r"),
                ("WALCORE_ENCRYPTION_KEY_COMMAND", &cmd),
            ])),
        )
        .unwrap_err();
        let shown = format!("{e:#}");
        assert!(shown.contains("exit status: 3"), "{shown}");
        assert!(shown.contains("(echo)"), "{shown}");
        assert_no_key_in(&shown);
        // A command printing a near-key.
        let cmd = format!("echo {}", &SECRET_HEX[..62]);
        let e = Config::load_with(
            Layer::default(),
            env_of(vars(&[
                ("WALCORE_REPO", "file:///r"),
                ("WALCORE_ENCRYPTION_KEY_COMMAND", &cmd),
            ])),
        )
        .unwrap_err();
        assert!(e.to_string().contains("printed no valid key"), "{e}");
        assert_no_key_in(&e.to_string());
    }

    #[test]
    fn a_hanging_key_command_is_stopped_at_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("pid");
        // The shell forks the sleep (it is not the last command): the whole group must go.
        let cmd = format!("sleep 30 & echo $! > {}; wait; echo 00", pid_file.display());
        for (timeout_var, value, limit) in [
            ("WALCORE_ENCRYPTION_KEY_COMMAND_TIMEOUT", "300ms", "0.3s"),
            ("WALCORE_PROGRESS_TIMEOUT", "400ms", "0.4s"),
        ] {
            let started = Instant::now();
            let e = Config::load_with(
                Layer::default(),
                env_of(vars(&[
                    ("WALCORE_REPO", "file:///r"),
                    ("WALCORE_ENCRYPTION_KEY_COMMAND", &cmd),
                    (timeout_var, value),
                ])),
            )
            .unwrap_err();
            let took = started.elapsed();
            assert!(took < Duration::from_secs(5), "took {took:?}");
            assert_eq!(e.kind(), ErrorKind::Configuration);
            let shown = e.to_string();
            assert!(shown.contains("(sleep)"), "{shown}");
            assert!(shown.contains(&format!("within {limit}")), "{shown}");
            let pid = std::fs::read_to_string(&pid_file).expect("the command wrote its pid");
            // Killed, and reaped by init or by us: its /proc entry goes away shortly.
            let gone = (0..200).any(|_| {
                let alive = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
                    .is_ok_and(|s| !s.contains(") Z "));
                if alive {
                    std::thread::sleep(Duration::from_millis(10));
                }
                !alive
            });
            assert!(gone, "the key command's sleep {} still runs", pid.trim());
        }
    }

    #[test]
    fn the_key_command_runs_once_per_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let count = dir.path().join("runs");
        let cmd = format!("echo run >> {}; echo {SECRET_HEX}", count.display());
        for _ in 0..3 {
            let c = Config::load_with(
                Layer::default(),
                env_of(vars(&[
                    ("WALCORE_REPO", "file:///r"),
                    ("WALCORE_ENCRYPTION_KEY_COMMAND", &cmd),
                ])),
            )
            .expect("config");
            assert!(c.key.is_some());
        }
        let runs = std::fs::read_to_string(&count).expect("the command ran");
        assert_eq!(runs.lines().count(), 1, "{runs}");
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
    fn retention_settings_come_from_flags_env_or_file_and_bad_ones_are_named() {
        let mut flags = Layer::default();
        flags.set_flag("keep_daily", "--keep-daily", Some("7"));
        let c = Config::load_with(
            flags,
            env(&[
                ("WALCORE_REPO", "file:///tmp/x"),
                ("WALCORE_KEEP_DAILY", "3"),
                ("WALCORE_KEEP_WEEKLY", "4"),
                ("WALCORE_PITR_WINDOW", "7d"),
            ]),
        )
        .expect("config");
        assert_eq!(c.retention.keep_daily, 7, "the flag wins");
        assert_eq!(c.retention.keep_weekly, 4);
        assert_eq!(
            c.retention.pitr_window,
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(c.retention.keep_last, 0);
        assert_eq!(c.orphan_grace, Duration::from_secs(3600));
        let e = Config::load_with(
            Layer::default(),
            env(&[
                ("WALCORE_REPO", "file:///tmp/x"),
                ("WALCORE_KEEP_LAST", "-1"),
            ]),
        )
        .expect_err("negative count");
        assert!(e.to_string().contains("WALCORE_KEEP_LAST"), "{e}");
    }

    /// A configuration file with `text`, mode `mode`; the directory keeps it alive.
    fn config_file(text: &str, mode: u32) -> (tempfile::TempDir, String) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("walcore.toml");
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        (dir, path.display().to_string())
    }

    fn load_file(path: &str) -> Result<Config, Error> {
        Config::load_with(
            Layer::default(),
            env_of(vec![("WALCORE_CONFIG".to_owned(), path.to_owned())]),
        )
    }

    const STORE_FILE: &str = "repo = \"s3://bkt/db1\"\n\
        [s3]\naccess_key_id = \"AKID\"\nsecret_access_key = \"s3cr3t-Vq8ZpL\"\n\
        region = \"eu-west-1\"\nallow_http = true\n\
        [azure]\naccount = \"acct\"\naccess_key = \"az-s3cr3t\"\n";

    #[test]
    fn the_store_section_of_the_repository_is_applied_and_its_secrets_never_shown() {
        let (_dir, path) = config_file(STORE_FILE, 0o600);
        let c = load_file(&path).expect("load");
        let keys: Vec<&str> = c.cloud_options.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "aws_access_key_id",
                "aws_secret_access_key",
                "aws_region",
                "allow_http"
            ]
        );
        assert!(c.store_options().cloud_options.contains(&(
            "aws_secret_access_key".to_owned(),
            "s3cr3t-Vq8ZpL".to_owned()
        )));
        let shown = format!("{c:?}{:?}", c.settings);
        assert!(!shown.contains("s3cr3t"), "{shown}");
        let secret = c
            .settings
            .iter()
            .find(|s| s.name == "s3.secret_access_key")
            .expect("shown");
        assert_eq!(secret.value, "<redacted>");
        assert!(secret.origin.contains("[s3]"), "{secret:?}");
        assert!(
            c.settings.iter().all(|s| !s.name.starts_with("azure.")),
            "only the repository's store section: {:?}",
            c.settings
        );
    }

    #[test]
    fn a_readable_file_with_a_secret_is_refused_by_name_and_mode() {
        let (_dir, path) = config_file(STORE_FILE, 0o644);
        let text = load_file(&path).expect_err("refused").to_string();
        assert!(
            text.contains(&path) && text.contains("0644") && !text.contains("s3cr3t"),
            "{text}"
        );
        // Without a secret, the mode does not matter.
        let (_dir, path) = config_file("repo = \"s3://bkt/db1\"\n[s3]\nregion = \"x\"\n", 0o644);
        load_file(&path).expect("no secret, no rule");
    }

    #[test]
    fn an_unknown_store_setting_is_named_with_the_closest_one() {
        let (_dir, path) = config_file(
            "repo = \"s3://bkt/db1\"\n[s3]\nsecret_acces_key = \"x\"\n",
            0o600,
        );
        let text = load_file(&path).expect_err("unknown").to_string();
        assert!(
            text.contains("secret_access_key") && text.contains("[s3]"),
            "{text}"
        );
    }

    #[test]
    fn a_plain_path_is_a_file_url_and_the_default_file_is_read_when_none_is_named() {
        let c = Config::load_with(Layer::default(), env(&[("WALCORE_REPO", "/srv/wal")]))
            .expect("load");
        assert_eq!(c.repo, "file:///srv/wal");
        let (_dir, path) = config_file("repo = \"/srv/from-default\"\n", 0o644);
        let c = Config::load_from(Layer::default(), |_| None, &path).expect("load");
        assert_eq!(c.repo, "file:///srv/from-default");
        assert_eq!(c.config_file.as_deref(), Some(path.as_str()));
        let missing = format!("{path}.absent");
        let e = Config::load_from(Layer::default(), |_| None, &missing).expect_err("no repo");
        assert!(e.to_string().contains("no repository configured"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }
}
