//! libpq connection strings: `host=/tmp port=5433 user=x` or
//! `postgresql://user:pass@host:port/db?sslmode=disable`, completed from `PG*` environment
//! variables and libpq's defaults, as libpq does it (`conninfo_parse`, `conninfo_uri_parse`,
//! `conninfo_add_defaults`, `connectOptions2` in `src/interfaces/libpq/fe-connect.c`).
//!
//! Two steps, both pure:
//! - [`ConnParams::parse`] reads a string into the settings it names (nothing else). Unknown
//!   keywords are an error, as in libpq; keywords libpq knows but that change nothing for this
//!   client (keepalives, `sslcompression`, GSSAPI settings, ...) are accepted and ignored; those
//!   that would demand what walcore cannot do (`service`, `requirepeer`, `require_auth`,
//!   `hostaddr`) are refused with a message saying so.
//! - [`ConnParams::resolve`] fills what is missing from the environment (a lookup closure, so
//!   tests never touch the process's) and the defaults, checks values, and gives a
//!   [`ConnConfig`]: the addresses to try in order, the user, and where a password comes from.
//!
//! Differences from libpq, on purpose: with no host at all, walcore tries the Unix socket
//! directory `/var/run/postgresql` and then `localhost` over TCP (libpq tries only the
//! socket); `connect_timeout` 0 or unset means walcore's own default, never "wait forever"; and
//! a CRL file or directory named by `sslcrl`/`sslcrldir` must be readable (libpq skips it
//! silently).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where Debian's (and most distributions') PostgreSQL puts its Unix socket: libpq's compiled-in
/// `DEFAULT_PGSOCKET_DIR`.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";
/// libpq's `DEF_PGPORT`.
pub const DEFAULT_PORT: u16 = 5432;
/// libpq's `DefaultHost`: the TCP host tried after the default socket directory.
pub const DEFAULT_TCP_HOST: &str = "localhost";

/// Inputs quoted in error messages are cut to this many characters.
const MAX_QUOTED: usize = 64;

/// Why a connection string or the environment cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnInfoError {
    /// The keyword/value form is malformed.
    #[error("invalid connection string at character {at}: {problem}")]
    Syntax {
        /// Character (not byte) offset of the problem.
        at: usize,
        /// What is wrong.
        problem: String,
    },
    /// The URL form is malformed.
    #[error("invalid connection URL {url:?}: {problem}")]
    Url {
        /// The URL, shortened if long, with any password masked.
        url: String,
        /// What is wrong.
        problem: String,
    },
    /// A keyword libpq does not know either.
    #[error("invalid connection option \"{keyword}\"")]
    UnknownKeyword {
        /// The keyword.
        keyword: String,
    },
    /// A keyword (or environment variable) whose meaning walcore does not implement.
    #[error("connection option \"{keyword}\" is not supported by walcore: {why}")]
    Unsupported {
        /// The keyword or variable.
        keyword: String,
        /// Why, and what to do instead.
        why: &'static str,
    },
    /// A value that is not valid for its keyword.
    #[error("invalid value {value:?} for connection option \"{keyword}\": {expected}")]
    InvalidValue {
        /// The keyword.
        keyword: &'static str,
        /// The value, shortened if long.
        value: String,
        /// What would be valid.
        expected: &'static str,
    },
    /// No user name anywhere: not given, no `PGUSER`, and the OS user is unknown.
    #[error(
        "could not determine the user name to connect as: set user= in the connection string \
         or PGUSER"
    )]
    NoUser,
}

/// How a keyword is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handling {
    /// walcore uses it.
    Used,
    /// Accepted, changes nothing here.
    Ignored,
    /// Refused, with the reason.
    Refused(&'static str),
}

/// Every keyword of libpq (PostgreSQL 18), with its environment variable and its handling.
const KEYWORDS: &[(&str, Option<&str>, Handling)] = &[
    ("host", Some("PGHOST"), Handling::Used),
    (
        "hostaddr",
        Some("PGHOSTADDR"),
        Handling::Refused("use host= with the address instead"),
    ),
    ("port", Some("PGPORT"), Handling::Used),
    ("dbname", Some("PGDATABASE"), Handling::Used),
    ("user", Some("PGUSER"), Handling::Used),
    ("password", Some("PGPASSWORD"), Handling::Used),
    ("passfile", Some("PGPASSFILE"), Handling::Used),
    ("connect_timeout", Some("PGCONNECT_TIMEOUT"), Handling::Used),
    ("sslmode", Some("PGSSLMODE"), Handling::Used),
    ("requiressl", Some("PGREQUIRESSL"), Handling::Used),
    ("application_name", Some("PGAPPNAME"), Handling::Used),
    ("fallback_application_name", None, Handling::Used),
    ("options", Some("PGOPTIONS"), Handling::Used),
    ("gssencmode", Some("PGGSSENCMODE"), Handling::Used),
    ("channel_binding", Some("PGCHANNELBINDING"), Handling::Used),
    (
        "service",
        Some("PGSERVICE"),
        Handling::Refused("connection service files (pg_service.conf) are not supported"),
    ),
    (
        "requirepeer",
        Some("PGREQUIREPEER"),
        Handling::Refused("peer credential checks are not supported yet"),
    ),
    (
        "require_auth",
        Some("PGREQUIREAUTH"),
        Handling::Refused("restricting authentication methods is not supported yet"),
    ),
    // walcore always negotiates TLS with an SSLRequest, which every server accepts (also those
    // that accept direct TLS).
    (
        "sslnegotiation",
        Some("PGSSLNEGOTIATION"),
        Handling::Ignored,
    ),
    // Settings that change nothing for a client without GSSAPI, or that only tune it.
    (
        "client_encoding",
        Some("PGCLIENTENCODING"),
        Handling::Ignored,
    ),
    ("replication", None, Handling::Ignored),
    ("keepalives", None, Handling::Ignored),
    ("keepalives_idle", None, Handling::Ignored),
    ("keepalives_interval", None, Handling::Ignored),
    ("keepalives_count", None, Handling::Ignored),
    ("tcp_user_timeout", None, Handling::Ignored),
    ("sslcompression", None, Handling::Ignored),
    ("sslcert", Some("PGSSLCERT"), Handling::Used),
    ("sslkey", Some("PGSSLKEY"), Handling::Used),
    // Encrypted client keys are not supported: loading one fails with a message saying so.
    ("sslpassword", None, Handling::Ignored),
    ("sslcertmode", Some("PGSSLCERTMODE"), Handling::Used),
    ("sslrootcert", Some("PGSSLROOTCERT"), Handling::Used),
    ("sslcrl", Some("PGSSLCRL"), Handling::Used),
    ("sslcrldir", Some("PGSSLCRLDIR"), Handling::Used),
    ("sslsni", Some("PGSSLSNI"), Handling::Used),
    (
        "ssl_min_protocol_version",
        Some("PGSSLMINPROTOCOLVERSION"),
        Handling::Used,
    ),
    (
        "ssl_max_protocol_version",
        Some("PGSSLMAXPROTOCOLVERSION"),
        Handling::Used,
    ),
    ("krbsrvname", Some("PGKRBSRVNAME"), Handling::Ignored),
    ("gsslib", Some("PGGSSLIB"), Handling::Ignored),
    ("gssdelegation", Some("PGGSSDELEGATION"), Handling::Ignored),
    (
        "target_session_attrs",
        Some("PGTARGETSESSIONATTRS"),
        Handling::Ignored,
    ),
    (
        "load_balance_hosts",
        Some("PGLOADBALANCEHOSTS"),
        Handling::Ignored,
    ),
];

fn keyword_entry(keyword: &str) -> Option<(&'static str, Option<&'static str>, Handling)> {
    KEYWORDS.iter().copied().find(|(k, _, _)| *k == keyword)
}

/// The settings a connection string names, keyword → value, exactly as written (decoded from
/// quoting or percent-encoding). Later occurrences of a keyword replace earlier ones, as in
/// libpq.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnParams {
    settings: BTreeMap<&'static str, String>,
}

impl ConnParams {
    /// Parses a connection string in either form: a URL when it starts with `postgresql://` or
    /// `postgres://`, else `keyword=value` pairs separated by whitespace (values may be quoted
    /// with `'`, and `\` escapes the next character).
    pub fn parse(conninfo: &str) -> Result<ConnParams, ConnInfoError> {
        if conninfo.starts_with("postgresql://") || conninfo.starts_with("postgres://") {
            parse_url(conninfo)
        } else {
            parse_keywords(conninfo)
        }
    }

    /// The value given for `keyword`, if any.
    pub fn get(&self, keyword: &str) -> Option<&str> {
        self.settings.get(keyword).map(String::as_str)
    }

    /// Sets `keyword` (which must be one libpq knows) to `value`.
    pub fn set(&mut self, keyword: &str, value: impl Into<String>) -> Result<(), ConnInfoError> {
        let (keyword, _, handling) =
            keyword_entry(keyword).ok_or_else(|| ConnInfoError::UnknownKeyword {
                keyword: quoted(keyword),
            })?;
        if let Handling::Refused(why) = handling {
            return Err(ConnInfoError::Unsupported {
                keyword: keyword.to_owned(),
                why,
            });
        }
        let value = value.into();
        if value.contains('\0') {
            return Err(ConnInfoError::InvalidValue {
                keyword,
                value: quoted(&value),
                expected: "no NUL characters",
            });
        }
        self.settings.insert(keyword, value);
        Ok(())
    }

    /// The settings as a keyword/value string that [`ConnParams::parse`] reads back equal.
    /// Shows the password: for tests and tools, never for logs.
    pub fn to_keyword_string(&self) -> String {
        self.settings
            .iter()
            .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The settings as a `postgresql://` URL that [`ConnParams::parse`] reads back equal.
    /// Shows the password: for tests and tools, never for logs.
    pub fn to_url(&self) -> String {
        let mut url = String::from("postgresql://");
        let mut in_query: Vec<(&str, &str)> = Vec::new();
        let user = self.get("user").filter(|u| !u.is_empty());
        if let Some(user) = user {
            url.push_str(&percent_encode(user));
            if let Some(password) = self.get("password").filter(|p| !p.is_empty()) {
                url.push(':');
                url.push_str(&percent_encode(password));
            }
            url.push('@');
        }
        let dbname = self.get("dbname").filter(|d| !d.is_empty());
        if let Some(dbname) = dbname {
            url.push('/');
            url.push_str(&percent_encode(dbname));
        }
        for (k, v) in &self.settings {
            let in_userinfo = (*k == "user" && user.is_some())
                || (*k == "password" && user.is_some() && !v.is_empty());
            let in_path = *k == "dbname" && dbname.is_some();
            if !in_userinfo && !in_path {
                in_query.push((k, v));
            }
        }
        for (i, (k, v)) in in_query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(k);
            url.push('=');
            url.push_str(&percent_encode(v));
        }
        url
    }

    /// Completes the settings from the environment (`env("PGHOST")`, ...) and libpq's defaults,
    /// and checks every value. The OS user name is the last resort for the user.
    pub fn resolve(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ConnConfig, ConnInfoError> {
        self.resolve_with_os_user(env, os_user_name)
    }

    /// [`ConnParams::resolve`] with the OS user name given by `os_user` (for tests).
    pub fn resolve_with_os_user(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        os_user: fn() -> Option<String>,
    ) -> Result<ConnConfig, ConnInfoError> {
        // Environment variables of refused keywords are refused too: silently ignoring a
        // PGSERVICE the user relies on would connect somewhere else.
        for (keyword, var, handling) in KEYWORDS {
            if let (Some(var), Handling::Refused(why)) = (var, handling)
                && self.get(keyword).is_none()
                && env(var).is_some_and(|v| !v.is_empty())
            {
                return Err(ConnInfoError::Unsupported {
                    keyword: (*var).to_owned(),
                    why,
                });
            }
        }
        let value = |keyword: &str| -> Option<String> {
            self.get(keyword).map(str::to_owned).or_else(|| {
                keyword_entry(keyword)
                    .and_then(|(_, var, _)| var)
                    .and_then(env)
            })
        };

        let hosts = parse_hosts(value("host").as_deref())?;
        let ports = parse_ports(value("port").as_deref(), hosts.len())?;
        let targets: Vec<Target> = hosts
            .into_iter()
            .zip(ports)
            .map(|(host, port)| Target { host, port })
            .collect();

        let user = match value("user").filter(|u| !u.is_empty()) {
            Some(user) => user,
            None => os_user().ok_or(ConnInfoError::NoUser)?,
        };
        let dbname = value("dbname").filter(|d| !d.is_empty());

        let home = env("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
        let password = match value("password").filter(|p| !p.is_empty()) {
            Some(password) => PasswordSource::Given(password),
            None => match value("passfile").filter(|p| !p.is_empty()) {
                Some(file) => PasswordSource::File(PathBuf::from(file)),
                None => match &home {
                    Some(home) => PasswordSource::File(home.join(".pgpass")),
                    None => PasswordSource::None,
                },
            },
        };

        let ssl = SslConfig::resolve(&value, home.as_deref())?;
        let sslmode = match value("sslmode") {
            Some(mode) => Some(SslMode::parse(&mode)?),
            None => match value("requiressl").as_deref() {
                Some("1") => Some(SslMode::Require),
                Some("0") | Some("") | None => None,
                Some(other) => {
                    return Err(ConnInfoError::InvalidValue {
                        keyword: "requiressl",
                        value: quoted(other),
                        expected: "0 or 1",
                    });
                }
            },
        };
        // libpq: the system's roots certify any host name their owner controls, so with them
        // only verify-full means something; it is the default then, and weaker modes are
        // refused.
        let sslmode = match (sslmode, &ssl.root_cert) {
            (None, RootCert::System) => SslMode::VerifyFull,
            (None, _) => SslMode::Prefer,
            (Some(mode), RootCert::System) if mode != SslMode::VerifyFull => {
                return Err(ConnInfoError::InvalidValue {
                    keyword: "sslmode",
                    value: mode.to_string(),
                    expected: "verify-full when sslrootcert=system (a public CA certifies any \
                               host name its owner controls, so weaker checks prove nothing)",
                });
            }
            (Some(mode), _) => mode,
        };

        let connect_timeout = match value("connect_timeout").as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) => {
                let secs: i64 = text.parse().map_err(|_| ConnInfoError::InvalidValue {
                    keyword: "connect_timeout",
                    value: quoted(text),
                    expected: "a whole number of seconds",
                })?;
                // libpq: 0 or less means no limit (walcore then uses its default); under 2
                // seconds is raised to 2.
                u64::try_from(secs)
                    .ok()
                    .filter(|&s| s > 0)
                    .map(|s| Duration::from_secs(s.max(2)))
            }
        };

        for (keyword, allowed, why) in [
            (
                "gssencmode",
                &["disable", "prefer", "allow"][..],
                "GSSAPI encryption is not supported",
            ),
            (
                "channel_binding",
                &["disable", "prefer"][..],
                "SCRAM channel binding is not supported yet",
            ),
        ] {
            match value(keyword) {
                Some(v) if v == "require" => {
                    return Err(ConnInfoError::Unsupported {
                        keyword: format!("{keyword}=require"),
                        why,
                    });
                }
                Some(v) if !allowed.contains(&v.as_str()) => {
                    return Err(ConnInfoError::InvalidValue {
                        keyword,
                        value: quoted(&v),
                        expected: "one of disable, prefer, allow, require",
                    });
                }
                _ => {}
            }
        }

        let application_name = value("application_name")
            .or_else(|| self.get("fallback_application_name").map(str::to_owned))
            .filter(|a| !a.is_empty());
        let options = value("options").filter(|o| !o.is_empty());

        Ok(ConnConfig {
            targets,
            user,
            dbname,
            password,
            sslmode,
            ssl,
            connect_timeout,
            application_name,
            options,
        })
    }
}

/// A connection string and the environment, resolved: what [`ReplicationConnection::connect`]
/// needs.
///
/// [`ReplicationConnection::connect`]: super::ReplicationConnection::connect
#[derive(Clone, PartialEq, Eq)]
pub struct ConnConfig {
    /// The addresses to try, in order (libpq's host list); never empty.
    pub targets: Vec<Target>,
    /// The role to connect as.
    pub user: String,
    /// The database (only logical replication connects to one).
    pub dbname: Option<String>,
    /// Where the password comes from, if the server asks for one.
    pub password: PasswordSource,
    /// Whether to negotiate TLS on TCP connections (never on Unix sockets), and how much of the
    /// server's certificate to check.
    pub sslmode: SslMode,
    /// The certificate files and TLS settings (`sslrootcert`, `sslcert`, ...).
    pub ssl: SslConfig,
    /// `connect_timeout`, when set to a positive number of seconds.
    pub connect_timeout: Option<Duration>,
    /// `application_name` (or `fallback_application_name`).
    pub application_name: Option<String>,
    /// `options` for the server process (`-c name=value ...`).
    pub options: Option<String>,
}

impl ConnConfig {
    /// Parses `conninfo` and completes it from this process's environment.
    pub fn from_env(conninfo: &str) -> Result<ConnConfig, ConnInfoError> {
        ConnParams::parse(conninfo)?.resolve(&|name| std::env::var(name).ok())
    }
}

impl fmt::Debug for ConnConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a password.
        f.debug_struct("ConnConfig")
            .field("targets", &self.targets)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("password", &self.password)
            .field("sslmode", &self.sslmode)
            .field("ssl", &self.ssl)
            .field("connect_timeout", &self.connect_timeout)
            .field("application_name", &self.application_name)
            .field("options", &self.options)
            .finish()
    }
}

/// Where the password comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// `password=` or `PGPASSWORD`.
    Given(String),
    /// A password file (`passfile=`, `PGPASSFILE`, or `~/.pgpass`), read only if the server
    /// asks for a password.
    File(PathBuf),
    /// Neither (no `HOME` to find `~/.pgpass` in).
    None,
}

impl fmt::Debug for PasswordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordSource::Given(_) => f.write_str("Given(<hidden>)"),
            PasswordSource::File(path) => f.debug_tuple("File").field(path).finish(),
            PasswordSource::None => f.write_str("None"),
        }
    }
}

/// One address to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// A Unix socket directory or a TCP host.
    pub host: Host,
    /// The port (also part of a Unix socket's file name).
    pub port: u16,
}

impl Target {
    /// The Unix socket file for a socket directory: `<dir>/.s.PGSQL.<port>`.
    pub fn socket_path(&self) -> Option<PathBuf> {
        match &self.host {
            Host::Socket(dir) => Some(dir.join(format!(".s.PGSQL.{}", self.port))),
            Host::Tcp(_) => None,
        }
    }

    /// The host name libpq matches against a password file's first field: the socket
    /// directory, except that the default one matches `localhost`.
    pub fn passfile_host(&self) -> String {
        match &self.host {
            Host::Socket(dir) if dir == Path::new(DEFAULT_SOCKET_DIR) => {
                DEFAULT_TCP_HOST.to_owned()
            }
            Host::Socket(dir) => dir.to_string_lossy().into_owned(),
            Host::Tcp(name) => name.clone(),
        }
    }
}

impl fmt::Display for Target {
    /// The socket file, or `host:port` (`[v6]:port` for IPv6 addresses).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.host, self.socket_path()) {
            (_, Some(path)) => write!(f, "{}", path.display()),
            (Host::Tcp(name), None) if name.contains(':') => write!(f, "[{name}]:{}", self.port),
            (Host::Tcp(name), None) => write!(f, "{name}:{}", self.port),
            (Host::Socket(_), None) => Ok(()),
        }
    }
}

/// A host of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A directory holding the server's Unix socket (a host that starts with `/`).
    Socket(PathBuf),
    /// A TCP host name or address.
    Tcp(String),
}

/// `sslmode`. On TCP only: TLS never applies to Unix sockets.
///
/// As in libpq, `allow`, `prefer` and `require` check the server's certificate chain (not its
/// name) when a root certificate file is there (`sslrootcert`, or `~/.postgresql/root.crt`),
/// and accept any certificate otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Plain text first; TLS when the server refuses the plain session.
    Allow,
    /// TLS when the server accepts it (and the handshake succeeds), else plain text; a session
    /// refused over TLS is tried once more in plain text.
    Prefer,
    /// TLS or fail.
    Require,
    /// TLS with a certificate signed by a CA of `sslrootcert`, or fail.
    VerifyCa,
    /// TLS with a certificate signed by a CA of `sslrootcert` and naming the host (a DNS name,
    /// or an IP address in its subjectAltName), or fail.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode, ConnInfoError> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConnInfoError::InvalidValue {
                    keyword: "sslmode",
                    value: quoted(other),
                    expected: "disable, allow, prefer, require, verify-ca or verify-full",
                });
            }
        })
    }

    /// Whether this mode refuses a connection without TLS.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// Whether this mode refuses a server whose certificate cannot be checked against a root
    /// certificate (`verify-ca`, `verify-full`).
    pub fn requires_verification(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// libpq's files in `~/.postgresql/`, used when they exist and no keyword names another.
const DEFAULT_ROOT_CERT: &str = ".postgresql/root.crt";
const DEFAULT_ROOT_CRL: &str = ".postgresql/root.crl";
const DEFAULT_CLIENT_CERT: &str = ".postgresql/postgresql.crt";
const DEFAULT_CLIENT_KEY: &str = ".postgresql/postgresql.key";

/// A file named by an `ssl*` keyword, or libpq's default for it under `~/.postgresql/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SslFile {
    /// The file.
    pub path: PathBuf,
    /// Named by the connection string or the environment; `false` for libpq's default, which
    /// is used only when it exists.
    pub given: bool,
}

/// Where the CAs that sign the server's certificate come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of CA certificates: `sslrootcert`, else `~/.postgresql/root.crt`. As in libpq,
    /// a file that does not exist means "no verification" under `allow`, `prefer` and `require`,
    /// and is an error under `verify-ca` and `verify-full`.
    File(SslFile),
    /// `sslrootcert=system`: the platform's trusted CAs (which forces `verify-full`).
    System,
    /// No `sslrootcert` and no home directory to find the default in.
    Unset,
}

/// A TLS protocol version of `ssl_min_protocol_version` / `ssl_max_protocol_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// `TLSv1`.
    V1_0,
    /// `TLSv1.1`.
    V1_1,
    /// `TLSv1.2`.
    V1_2,
    /// `TLSv1.3`.
    V1_3,
}

impl TlsVersion {
    fn parse(keyword: &'static str, text: &str) -> Result<Option<TlsVersion>, ConnInfoError> {
        Ok(Some(match text {
            "" => return Ok(None),
            "TLSv1" => TlsVersion::V1_0,
            "TLSv1.1" => TlsVersion::V1_1,
            "TLSv1.2" => TlsVersion::V1_2,
            "TLSv1.3" => TlsVersion::V1_3,
            other => {
                return Err(ConnInfoError::InvalidValue {
                    keyword,
                    value: quoted(other),
                    expected: "TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3",
                });
            }
        }))
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsVersion::V1_0 => "TLSv1",
            TlsVersion::V1_1 => "TLSv1.1",
            TlsVersion::V1_2 => "TLSv1.2",
            TlsVersion::V1_3 => "TLSv1.3",
        })
    }
}

/// The TLS settings of a connection string, with libpq's defaults. They apply only to TCP
/// connections that negotiate TLS (see [`SslMode`]); the files are read then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SslConfig {
    /// The CAs trusted to sign the server's certificate.
    pub root_cert: RootCert,
    /// Certificate revocation lists: `sslcrl`, else `~/.postgresql/root.crl` (when it exists).
    /// Checked only when the certificate chain is.
    pub crl: Option<SslFile>,
    /// `sslcrldir`: a directory whose every file is a PEM file of CRLs.
    pub crl_dir: Option<PathBuf>,
    /// The client certificate (PEM, the client's first, then any intermediates): `sslcert`,
    /// else `~/.postgresql/postgresql.crt`. Sent when it exists and the server asks for one.
    pub cert: Option<SslFile>,
    /// The client certificate's private key (PEM, unencrypted): `sslkey`, else
    /// `~/.postgresql/postgresql.key`. Needed when the certificate exists.
    pub key: Option<SslFile>,
    /// `sslcertmode`: `false` for `disable` (never send a client certificate).
    pub send_client_cert: bool,
    /// `sslsni`: send the host name (never an IP address) in the TLS handshake.
    pub sni: bool,
    /// `ssl_min_protocol_version` (libpq's default: `TLSv1.2`).
    pub min_protocol: Option<TlsVersion>,
    /// `ssl_max_protocol_version`.
    pub max_protocol: Option<TlsVersion>,
}

impl SslConfig {
    /// The settings from `value` (connection string, then environment), with the defaults
    /// under `home`.
    fn resolve(
        value: &dyn Fn(&str) -> Option<String>,
        home: Option<&Path>,
    ) -> Result<SslConfig, ConnInfoError> {
        let file = |keyword: &str, default: &str| -> Option<SslFile> {
            match value(keyword).filter(|v| !v.is_empty()) {
                Some(path) => Some(SslFile {
                    path: PathBuf::from(path),
                    given: true,
                }),
                None => home.map(|home| SslFile {
                    path: home.join(default),
                    given: false,
                }),
            }
        };
        let root_cert = match value("sslrootcert").filter(|v| !v.is_empty()) {
            Some(system) if system == "system" => RootCert::System,
            _ => match file("sslrootcert", DEFAULT_ROOT_CERT) {
                Some(file) => RootCert::File(file),
                None => RootCert::Unset,
            },
        };
        let crl_dir = value("sslcrldir")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        // libpq looks for the default CRL file only when no CRL directory is given.
        let crl = match (value("sslcrl").filter(|v| !v.is_empty()), &crl_dir) {
            (None, Some(_)) => None,
            _ => file("sslcrl", DEFAULT_ROOT_CRL),
        };
        let send_client_cert = match value("sslcertmode").as_deref() {
            None | Some("") | Some("allow") => true,
            Some("disable") => false,
            Some("require") => {
                return Err(ConnInfoError::Unsupported {
                    keyword: "sslcertmode=require".to_owned(),
                    why: "checking that the server asked for a client certificate is not \
                          supported yet; use allow (the default), and a pg_hba.conf line with \
                          the cert method or clientcert=verify-full on the server",
                });
            }
            Some(other) => {
                return Err(ConnInfoError::InvalidValue {
                    keyword: "sslcertmode",
                    value: quoted(other),
                    expected: "disable, allow or require",
                });
            }
        };
        let sni = match value("sslsni").as_deref() {
            None | Some("") | Some("1") => true,
            Some("0") => false,
            Some(other) => {
                return Err(ConnInfoError::InvalidValue {
                    keyword: "sslsni",
                    value: quoted(other),
                    expected: "0 or 1",
                });
            }
        };
        let min_protocol = match value("ssl_min_protocol_version") {
            Some(v) => TlsVersion::parse("ssl_min_protocol_version", &v)?,
            None => Some(TlsVersion::V1_2),
        };
        let max_protocol = match value("ssl_max_protocol_version") {
            Some(v) => TlsVersion::parse("ssl_max_protocol_version", &v)?,
            None => None,
        };
        if max_protocol.is_some_and(|max| max < TlsVersion::V1_2) {
            return Err(ConnInfoError::Unsupported {
                keyword: "ssl_max_protocol_version".to_owned(),
                why: "walcore speaks TLS 1.2 and 1.3 only",
            });
        }
        if let (Some(min), Some(max)) = (min_protocol, max_protocol)
            && min > max
        {
            return Err(ConnInfoError::InvalidValue {
                keyword: "ssl_max_protocol_version",
                value: max.to_string(),
                expected: "a version no older than ssl_min_protocol_version",
            });
        }
        Ok(SslConfig {
            root_cert,
            crl,
            crl_dir,
            cert: file("sslcert", DEFAULT_CLIENT_CERT),
            key: file("sslkey", DEFAULT_CLIENT_KEY),
            send_client_cert,
            sni,
            min_protocol,
            max_protocol,
        })
    }
}

/// The hosts of a `host` setting: a comma-separated list (an empty entry is the default socket
/// directory); unset or empty, the default socket directory then `localhost`.
fn parse_hosts(host: Option<&str>) -> Result<Vec<Host>, ConnInfoError> {
    let default_socket = || Host::Socket(PathBuf::from(DEFAULT_SOCKET_DIR));
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return Ok(vec![
            default_socket(),
            Host::Tcp(DEFAULT_TCP_HOST.to_owned()),
        ]);
    };
    host.split(',')
        .map(|h| {
            if h.is_empty() {
                Ok(default_socket())
            } else if h.starts_with('/') {
                Ok(Host::Socket(PathBuf::from(h)))
            } else if h.starts_with('@') {
                Err(ConnInfoError::Unsupported {
                    keyword: format!("host={}", quoted(h)),
                    why: "abstract Unix sockets are not supported",
                })
            } else {
                Ok(Host::Tcp(h.to_owned()))
            }
        })
        .collect()
}

/// The ports of a `port` setting: one for all hosts, or one per host.
fn parse_ports(port: Option<&str>, hosts: usize) -> Result<Vec<u16>, ConnInfoError> {
    let Some(port) = port.filter(|p| !p.is_empty()) else {
        return Ok(vec![DEFAULT_PORT; hosts]);
    };
    let ports =
        port.split(',')
            .map(|p| {
                let p = p.trim();
                if p.is_empty() {
                    return Ok(DEFAULT_PORT);
                }
                p.parse::<u16>().ok().filter(|&n| n > 0).ok_or_else(|| {
                    ConnInfoError::InvalidValue {
                        keyword: "port",
                        value: quoted(p),
                        expected: "a port number from 1 to 65535",
                    }
                })
            })
            .collect::<Result<Vec<u16>, _>>()?;
    match ports.len() {
        1 => Ok(vec![ports[0]; hosts]),
        n if n == hosts => Ok(ports),
        _ => Err(ConnInfoError::InvalidValue {
            keyword: "port",
            value: quoted(port),
            expected: "one port, or as many ports as hosts",
        }),
    }
}

/// libpq's `conninfo_parse`: `keyword = value` pairs separated by whitespace.
fn parse_keywords(conninfo: &str) -> Result<ConnParams, ConnInfoError> {
    let chars: Vec<char> = conninfo.chars().collect();
    let syntax = |at: usize, problem: String| ConnInfoError::Syntax { at, problem };
    if let Some(at) = chars.iter().position(|&c| c == '\0') {
        return Err(syntax(at, "NUL character in connection string".to_owned()));
    }
    let is_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c');
    let mut params = ConnParams::default();
    let mut i = 0;
    loop {
        while i < chars.len() && is_space(chars[i]) {
            i += 1;
        }
        if i == chars.len() {
            return Ok(params);
        }
        let key_start = i;
        while i < chars.len() && chars[i] != '=' && !is_space(chars[i]) {
            i += 1;
        }
        let keyword: String = chars[key_start..i].iter().collect();
        while i < chars.len() && is_space(chars[i]) {
            i += 1;
        }
        if chars.get(i) != Some(&'=') {
            return Err(syntax(
                i,
                format!(
                    "missing \"=\" after \"{}\" in connection info string",
                    quoted(&keyword)
                ),
            ));
        }
        i += 1;
        while i < chars.len() && is_space(chars[i]) {
            i += 1;
        }
        let mut value = String::new();
        if chars.get(i) == Some(&'\'') {
            let quote_at = i;
            i += 1;
            loop {
                match chars.get(i) {
                    None => {
                        return Err(syntax(
                            quote_at,
                            "unterminated quoted string in connection info string".to_owned(),
                        ));
                    }
                    Some('\\') => {
                        i += 1;
                        match chars.get(i) {
                            Some(&c) => value.push(c),
                            None => {
                                return Err(syntax(
                                    quote_at,
                                    "unterminated quoted string in connection info string"
                                        .to_owned(),
                                ));
                            }
                        }
                        i += 1;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < chars.len() && !is_space(chars[i]) {
                if chars[i] == '\\' {
                    i += 1;
                    // A trailing backslash escapes nothing and is dropped, as in libpq.
                    if let Some(&c) = chars.get(i) {
                        value.push(c);
                        i += 1;
                    }
                } else {
                    value.push(chars[i]);
                    i += 1;
                }
            }
        }
        params.set(&keyword, value)?;
    }
}

/// libpq's `conninfo_uri_parse`:
/// `postgresql://[user[:password]@][host[:port][,...]][/dbname][?param=value&...]`.
fn parse_url(url: &str) -> Result<ConnParams, ConnInfoError> {
    let fail = |problem: String| ConnInfoError::Url {
        url: masked_url(url),
        problem,
    };
    let rest = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
        .ok_or_else(|| fail("does not start with postgresql://".to_owned()))?;
    let mut params = ConnParams::default();

    // [user[:password]@]: the first '@' before any '/' or '?'.
    let mut rest = rest;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    if let Some(at) = rest[..authority_end].find('@') {
        let userinfo = &rest[..at];
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        let user = percent_decode(user).map_err(fail)?;
        if !user.is_empty() {
            params.set("user", user)?;
        }
        if let Some(password) = password {
            let password = percent_decode(password).map_err(fail)?;
            if !password.is_empty() {
                params.set("password", password)?;
            }
        }
        rest = &rest[at + 1..];
    }

    // host[:port][,host[:port]...]
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    loop {
        let (host, after) = if let Some(v6) = rest.strip_prefix('[') {
            let close = v6
                .find(']')
                .ok_or_else(|| fail("missing \"]\" after an IPv6 host address".to_owned()))?;
            if close == 0 {
                return Err(fail("IPv6 host address may not be empty".to_owned()));
            }
            (&v6[..close], &v6[close + 1..])
        } else {
            let end = rest.find([':', '/', '?', ',']).unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        hosts.push(percent_decode(host).map_err(fail)?);
        rest = after;
        if let Some(after_colon) = rest.strip_prefix(':') {
            let end = after_colon
                .find(['/', '?', ','])
                .unwrap_or(after_colon.len());
            ports.push(percent_decode(&after_colon[..end]).map_err(fail)?);
            rest = &after_colon[end..];
        } else {
            ports.push(String::new());
        }
        match rest.strip_prefix(',') {
            Some(next) => rest = next,
            None => break,
        }
    }
    if !rest.is_empty() && !rest.starts_with(['/', '?']) {
        return Err(fail(format!(
            "unexpected character {:?} after the host list",
            rest.chars().next().unwrap_or(' ')
        )));
    }
    // As libpq: the lists are stored only when not empty.
    let host_list = hosts.join(",");
    if !host_list.is_empty() {
        params.set("host", host_list)?;
    }
    let port_list = ports.join(",");
    if !port_list.is_empty() {
        params.set("port", port_list)?;
    }

    // /dbname
    if let Some(after_slash) = rest.strip_prefix('/') {
        let end = after_slash.find('?').unwrap_or(after_slash.len());
        let dbname = percent_decode(&after_slash[..end]).map_err(fail)?;
        if !dbname.is_empty() {
            params.set("dbname", dbname)?;
        }
        rest = &after_slash[end..];
    }

    // ?key=value&...
    if let Some(query) = rest.strip_prefix('?') {
        for pair in query.split('&') {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                fail(format!(
                    "missing key/value separator \"=\" in query parameter \"{}\"",
                    quoted(pair)
                ))
            })?;
            if value.contains('=') {
                return Err(fail(format!(
                    "extra key/value separator \"=\" in query parameter \"{}\"",
                    quoted(key)
                )));
            }
            let key = percent_decode(key).map_err(fail)?;
            let value = percent_decode(value).map_err(fail)?;
            // JDBC's ssl=true, which libpq accepts too.
            if key == "ssl" && value == "true" {
                params.set("sslmode", "require")?;
                continue;
            }
            params.set(&key, value)?;
        }
    }
    Ok(params)
}

/// `%XX` decoding; the result must be UTF-8 and free of NUL (libpq refuses `%00`).
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .filter(|_| bytes[i + 1].is_ascii_hexdigit() && bytes[i + 2].is_ascii_hexdigit())
                .ok_or_else(|| {
                    format!(
                        "invalid percent-encoded token \"{}\"",
                        quoted(&String::from_utf8_lossy(&bytes[i..bytes.len().min(i + 3)]))
                    )
                })?;
            if hex == 0 {
                return Err("forbidden value %00 in percent-encoded value".to_owned());
            }
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-encoded value is not valid UTF-8".to_owned())
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A URL for an error message: shortened, password replaced.
fn masked_url(url: &str) -> String {
    let masked = match url.find("://") {
        Some(scheme_end) => {
            let after = &url[scheme_end + 3..];
            let before_slash = after.find('/').unwrap_or(after.len());
            match after[..before_slash].rfind('@') {
                Some(at) => match after[..at].find(':') {
                    Some(colon) => format!(
                        "{}{}:***{}",
                        &url[..scheme_end + 3],
                        &after[..colon],
                        &after[at..]
                    ),
                    None => url.to_owned(),
                },
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    };
    // And a password given as a query parameter.
    let masked = match masked.find("password=") {
        Some(start) => {
            let value_start = start + "password=".len();
            let value_end = masked[value_start..]
                .find('&')
                .map_or(masked.len(), |e| value_start + e);
            format!("{}***{}", &masked[..value_start], &masked[value_end..])
        }
        None => masked,
    };
    quoted(&masked)
}

/// `input`, cut to [`MAX_QUOTED`] characters, for error messages.
fn quoted(input: &str) -> String {
    match input.char_indices().nth(MAX_QUOTED) {
        None => input.to_owned(),
        Some((cut, _)) => format!("{}…", &input[..cut]),
    }
}

/// The effective OS user's name, as libpq's `pg_fe_getusername`: the `/etc/passwd` entry of
/// the effective uid, else `$USER` / `$LOGNAME`. (walcore forbids `unsafe`, so no `getpwuid`;
/// users known only through NSS services are found through the variables.)
pub fn os_user_name() -> Option<String> {
    let from_passwd = || -> Option<String> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))?
            .split_whitespace()
            .nth(1)?
            .to_owned();
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        passwd.lines().find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let uid = fields.nth(1)?;
            (uid == euid).then(|| name.to_owned())
        })
    };
    from_passwd()
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("LOGNAME").ok())
        .filter(|u| !u.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn no_os_user() -> Option<String> {
        None
    }

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn resolve(conninfo: &str, env: &dyn Fn(&str) -> Option<String>) -> ConnConfig {
        ConnParams::parse(conninfo)
            .unwrap()
            .resolve_with_os_user(env, no_os_user)
            .unwrap()
    }

    #[test]
    fn keyword_form_with_quoting() {
        let p = ConnParams::parse(
            "host=/tmp port = 5433 user=x dbname='my db' password='it\\'s' \
             application_name=a\\ b sslmode=disable",
        )
        .unwrap();
        assert_eq!(p.get("host"), Some("/tmp"));
        assert_eq!(p.get("port"), Some("5433"));
        assert_eq!(p.get("dbname"), Some("my db"));
        assert_eq!(p.get("password"), Some("it's"));
        assert_eq!(p.get("application_name"), Some("a b"));
        let c = p.resolve_with_os_user(&no_env, no_os_user).unwrap();
        assert_eq!(
            c.targets,
            vec![Target {
                host: Host::Socket("/tmp".into()),
                port: 5433
            }]
        );
        assert_eq!(
            c.targets[0].socket_path(),
            Some(PathBuf::from("/tmp/.s.PGSQL.5433"))
        );
        assert_eq!(c.user, "x");
        assert_eq!(c.password, PasswordSource::Given("it's".into()));
        assert_eq!(c.sslmode, SslMode::Disable);
        assert_eq!(c.application_name.as_deref(), Some("a b"));
    }

    #[test]
    fn keyword_form_errors_like_libpq() {
        let err = ConnParams::parse("host").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid connection string at character 4: missing \"=\" after \"host\" in \
             connection info string"
        );
        let err = ConnParams::parse("password='abc").unwrap_err();
        assert!(
            err.to_string().contains("unterminated quoted string"),
            "{err}"
        );
        let err = ConnParams::parse("hots=x").unwrap_err();
        assert_eq!(err.to_string(), "invalid connection option \"hots\"");
        let err = ConnParams::parse("service=prod").unwrap_err();
        assert!(matches!(err, ConnInfoError::Unsupported { .. }), "{err}");
        // As in libpq, whitespace after '=' is skipped, so the next pair becomes the value.
        let p = ConnParams::parse("host= port=5").unwrap();
        assert_eq!(p.get("host"), Some("port=5"));
        // Later settings win.
        let p = ConnParams::parse("port=1 port=2").unwrap();
        assert_eq!(p.get("port"), Some("2"));
        assert_eq!(ConnParams::parse("   ").unwrap(), ConnParams::default());
    }

    #[test]
    fn url_form() {
        let p = ConnParams::parse(
            "postgresql://rep%40l:p%3Ass@db.example.com:6543/my%20db?sslmode=disable&\
             application_name=wal%20core",
        )
        .unwrap();
        assert_eq!(p.get("user"), Some("rep@l"));
        assert_eq!(p.get("password"), Some("p:ss"));
        assert_eq!(p.get("host"), Some("db.example.com"));
        assert_eq!(p.get("port"), Some("6543"));
        assert_eq!(p.get("dbname"), Some("my db"));
        assert_eq!(p.get("sslmode"), Some("disable"));
        assert_eq!(p.get("application_name"), Some("wal core"));
        let c = p.resolve_with_os_user(&no_env, no_os_user).unwrap();
        assert_eq!(c.targets[0].to_string(), "db.example.com:6543");
    }

    #[test]
    fn url_socket_dirs_ipv6_and_host_lists() {
        let c = resolve("postgresql://u@%2Fvar%2Flib%2Fpg:5433/x", &no_env);
        assert_eq!(
            c.targets,
            vec![Target {
                host: Host::Socket("/var/lib/pg".into()),
                port: 5433
            }]
        );
        let c = resolve("postgres://[::1]:7000,10.0.0.2/?user=u", &no_env);
        assert_eq!(
            c.targets,
            vec![
                Target {
                    host: Host::Tcp("::1".into()),
                    port: 7000
                },
                Target {
                    host: Host::Tcp("10.0.0.2".into()),
                    port: DEFAULT_PORT
                }
            ]
        );
        assert_eq!(c.targets[0].to_string(), "[::1]:7000");
        let c = resolve("postgresql:///db?host=/tmp/s&port=5444&user=u", &no_env);
        assert_eq!(c.targets[0].to_string(), "/tmp/s/.s.PGSQL.5444");
        let c = resolve("postgresql://", &env_of(&[("PGUSER", "u")]));
        assert_eq!(c.targets.len(), 2);
    }

    #[test]
    fn url_errors() {
        for (url, needle) in [
            ("postgresql://h/db?sslmode", "missing key/value separator"),
            ("postgresql://h/db?a=b=c", "extra key/value separator"),
            ("postgresql://h/db?bogus=1", "invalid connection option"),
            ("postgresql://%zz@h", "invalid percent-encoded token"),
            ("postgresql://h/%00", "forbidden value %00"),
            ("postgresql://[::1/db", "missing \"]\""),
            ("postgresql://u:secret@h:x/db", "a port number"),
            (
                "postgresql://h/db?password=secret&bogus=1",
                "invalid connection option",
            ),
            (
                "postgresql://u:secret@h/%zz",
                "invalid percent-encoded token",
            ),
        ] {
            let err = ConnParams::parse(url)
                .and_then(|p| p.resolve_with_os_user(&no_env, no_os_user))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{url}: {err}");
            assert!(!err.contains("secret"), "{url}: password leaked: {err}");
        }
    }

    #[test]
    fn environment_and_defaults() {
        let env = env_of(&[
            ("PGHOST", "/run/pg"),
            ("PGPORT", "5555"),
            ("PGUSER", "envuser"),
            ("PGPASSWORD", "envpw"),
            ("PGAPPNAME", "app"),
            ("PGSSLMODE", "allow"),
            ("PGCONNECT_TIMEOUT", "1"),
        ]);
        let c = resolve("user=given", &env);
        assert_eq!(c.user, "given", "the string wins over PGUSER");
        assert_eq!(c.targets[0].to_string(), "/run/pg/.s.PGSQL.5555");
        assert_eq!(c.password, PasswordSource::Given("envpw".into()));
        assert_eq!(c.application_name.as_deref(), Some("app"));
        assert_eq!(c.sslmode, SslMode::Allow);
        assert_eq!(
            c.connect_timeout,
            Some(Duration::from_secs(2)),
            "libpq minimum"
        );

        // Nothing given: socket directory then localhost, port 5432, OS user, ~/.pgpass.
        let c = ConnParams::parse("")
            .unwrap()
            .resolve_with_os_user(&env_of(&[("HOME", "/home/u")]), || Some("osuser".into()))
            .unwrap();
        assert_eq!(
            c.targets,
            vec![
                Target {
                    host: Host::Socket(DEFAULT_SOCKET_DIR.into()),
                    port: 5432
                },
                Target {
                    host: Host::Tcp("localhost".into()),
                    port: 5432
                }
            ]
        );
        assert_eq!(c.user, "osuser");
        assert_eq!(c.sslmode, SslMode::Prefer);
        assert_eq!(c.password, PasswordSource::File("/home/u/.pgpass".into()));
        assert_eq!(c.connect_timeout, None);
        assert_eq!(
            c.targets[0].passfile_host(),
            "localhost",
            "the default socket directory matches localhost"
        );

        let c = resolve(
            "user=u passfile=/etc/pw fallback_application_name=fb",
            &env_of(&[("HOME", "/home/u")]),
        );
        assert_eq!(c.password, PasswordSource::File("/etc/pw".into()));
        assert_eq!(c.application_name.as_deref(), Some("fb"));

        assert_eq!(
            ConnParams::parse("")
                .unwrap()
                .resolve_with_os_user(&no_env, no_os_user),
            Err(ConnInfoError::NoUser)
        );
        let err = ConnParams::parse("user=u")
            .unwrap()
            .resolve_with_os_user(&env_of(&[("PGSERVICE", "prod")]), no_os_user)
            .unwrap_err();
        assert!(err.to_string().contains("PGSERVICE"), "{err}");
    }

    #[test]
    fn value_checks() {
        for (conninfo, needle) in [
            ("user=u port=0", "port"),
            ("user=u port=70000", "port"),
            ("user=u host=a,b,c port=1,2", "as many ports as hosts"),
            ("user=u sslmode=sometimes", "sslmode"),
            ("user=u connect_timeout=soon", "connect_timeout"),
            ("user=u gssencmode=require", "GSSAPI"),
            ("user=u channel_binding=require", "channel binding"),
            ("user=u host=@abstract", "abstract"),
        ] {
            let err = ConnParams::parse(conninfo)
                .unwrap()
                .resolve_with_os_user(&no_env, no_os_user)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{conninfo}: {err}");
        }
        let c = resolve("user=u host=/a,,db port=1,2,3 requiressl=1", &no_env);
        assert_eq!(c.targets[1].host, Host::Socket(DEFAULT_SOCKET_DIR.into()));
        assert_eq!(c.targets[2].to_string(), "db:3");
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(
            resolve("user=u connect_timeout=0", &no_env).connect_timeout,
            None
        );
    }

    #[test]
    fn tls_settings_and_their_defaults() {
        // Nothing given: libpq's files under ~/.postgresql, used if they exist; SNI on; TLS
        // 1.2 at least.
        let c = resolve("user=u", &env_of(&[("HOME", "/home/u")]));
        assert_eq!(c.sslmode, SslMode::Prefer);
        let default = |path: &str| SslFile {
            path: path.into(),
            given: false,
        };
        assert_eq!(
            c.ssl,
            SslConfig {
                root_cert: RootCert::File(default("/home/u/.postgresql/root.crt")),
                crl: Some(default("/home/u/.postgresql/root.crl")),
                crl_dir: None,
                cert: Some(default("/home/u/.postgresql/postgresql.crt")),
                key: Some(default("/home/u/.postgresql/postgresql.key")),
                send_client_cert: true,
                sni: true,
                min_protocol: Some(TlsVersion::V1_2),
                max_protocol: None,
            }
        );
        // No home: nothing to default to.
        let c = resolve("user=u", &no_env);
        assert_eq!(c.ssl.root_cert, RootCert::Unset);
        assert_eq!((c.ssl.cert, c.ssl.key, c.ssl.crl), (None, None, None));

        // Given in the string, or by the PGSSL* variables.
        let given = |path: &str| SslFile {
            path: path.into(),
            given: true,
        };
        let c = resolve(
            "user=u sslmode=verify-ca sslrootcert=/r.pem sslcert=/c.pem sslkey=/k.pem \
             sslcrldir=/crls sslsni=0 sslcertmode=disable ssl_min_protocol_version=TLSv1.3",
            &env_of(&[("HOME", "/home/u")]),
        );
        assert_eq!(c.sslmode, SslMode::VerifyCa);
        assert_eq!(c.ssl.root_cert, RootCert::File(given("/r.pem")));
        assert_eq!(c.ssl.cert, Some(given("/c.pem")));
        assert_eq!(c.ssl.key, Some(given("/k.pem")));
        assert_eq!(
            c.ssl.crl, None,
            "a CRL directory replaces the default CRL file"
        );
        assert_eq!(c.ssl.crl_dir, Some(PathBuf::from("/crls")));
        assert!(!c.ssl.sni && !c.ssl.send_client_cert);
        assert_eq!(c.ssl.min_protocol, Some(TlsVersion::V1_3));
        let c = resolve(
            "user=u",
            &env_of(&[
                ("PGSSLMODE", "verify-full"),
                ("PGSSLROOTCERT", "/env/root.crt"),
                ("PGSSLCERT", "/env/c.crt"),
                ("PGSSLKEY", "/env/c.key"),
                ("PGSSLCRL", "/env/crl.pem"),
                ("PGSSLSNI", "1"),
            ]),
        );
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.ssl.root_cert, RootCert::File(given("/env/root.crt")));
        assert_eq!(c.ssl.cert, Some(given("/env/c.crt")));
        assert_eq!(c.ssl.key, Some(given("/env/c.key")));
        assert_eq!(c.ssl.crl, Some(given("/env/crl.pem")));

        // sslrootcert=system: verify-full by default, and nothing weaker (libpq 16).
        let c = resolve("user=u sslrootcert=system", &no_env);
        assert_eq!(c.ssl.root_cert, RootCert::System);
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        for weaker in ["sslmode=require", "sslmode=verify-ca", "requiressl=1"] {
            let err = ConnParams::parse(&format!("user=u sslrootcert=system {weaker}"))
                .unwrap()
                .resolve_with_os_user(&no_env, no_os_user)
                .unwrap_err()
                .to_string();
            assert!(err.contains("verify-full when sslrootcert=system"), "{err}");
        }
    }

    #[test]
    fn tls_setting_checks() {
        for (conninfo, needle) in [
            (
                "sslsni=yes",
                "invalid value \"yes\" for connection option \"sslsni\"",
            ),
            ("sslcertmode=maybe", "sslcertmode"),
            (
                "sslcertmode=require",
                "sslcertmode=require\" is not supported",
            ),
            (
                "ssl_min_protocol_version=TLSv2",
                "TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3",
            ),
            (
                "ssl_min_protocol_version=TLSv1.3 ssl_max_protocol_version=TLSv1.2",
                "no older than ssl_min_protocol_version",
            ),
            ("ssl_max_protocol_version=TLSv1.1", "TLS 1.2 and 1.3 only"),
            (
                "channel_binding=require",
                "channel binding is not supported",
            ),
        ] {
            let err = ConnParams::parse(&format!("user=u {conninfo}"))
                .unwrap()
                .resolve_with_os_user(&no_env, no_os_user)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{conninfo}: {err}");
        }
        // An empty minimum lifts libpq's default (rustls still speaks 1.2 at least).
        let c = resolve("user=u ssl_min_protocol_version=", &no_env);
        assert_eq!(c.ssl.min_protocol, None);
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = resolve("user=u password=hunter2", &no_env);
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    fn any_params() -> impl Strategy<Value = ConnParams> {
        let keywords: Vec<&'static str> = KEYWORDS
            .iter()
            .filter(|(_, _, h)| !matches!(h, Handling::Refused(_)))
            .map(|(k, _, _)| *k)
            .collect();
        proptest::collection::vec((proptest::sample::select(keywords), "[^\u{0}]{0,12}"), 0..6)
            .prop_map(|pairs| {
                let mut p = ConnParams::default();
                for (k, v) in pairs {
                    p.set(k, v).expect("known keyword");
                }
                p
            })
    }

    proptest! {
        #[test]
        fn any_string_parses_or_fails_cleanly(s in any::<String>()) {
            if let Ok(p) = ConnParams::parse(&s) {
                let _ = p.resolve_with_os_user(&no_env, no_os_user);
            }
        }

        #[test]
        fn conninfo_like_strings_never_panic(
            s in "(postgres(ql)?://)?[a-z=' \\\\%:@/?&,\\[\\]0-9.]{0,40}"
        ) {
            if let Ok(p) = ConnParams::parse(&s) {
                let _ = p.resolve_with_os_user(&no_env, no_os_user);
                prop_assert_eq!(ConnParams::parse(&p.to_keyword_string()), Ok(p.clone()));
            }
        }

        #[test]
        fn keyword_string_round_trip(p in any_params()) {
            prop_assert_eq!(ConnParams::parse(&p.to_keyword_string()), Ok(p));
        }

        #[test]
        fn url_round_trip(p in any_params()) {
            let url = p.to_url();
            prop_assert_eq!(ConnParams::parse(&url), Ok(p), "{}", url);
        }
    }
}
