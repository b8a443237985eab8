//! The public error: a few kinds callers act on, and a message that says what was being done
//! and to which object. Modules keep precise private errors and convert at their boundary.

use std::fmt;

/// A local file operation that failed: `doing` (a verb such as "writing") and the path.
pub(crate) fn local(path: &std::path::Path, doing: &str, e: std::io::Error) -> Error {
    Error::new(
        ErrorKind::LocalIo,
        format!("{doing} {}: {e}", path.display()),
    )
}

/// What a caller can do about an error. The binaries map kinds to exit codes (`exit.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The object is certainly absent from the repository.
    NotFound,
    /// A WAL segment is absent although the repository holds a later segment of its timeline
    /// (and it lies past where the archive of that timeline begins): a hole in the archive, not
    /// its end. Never retried: waiting does not bring the segment back.
    Hole,
    /// A different object is already stored under that name; nothing was changed.
    Conflict,
    /// Stored bytes failed verification: corruption, truncation, tampering, wrong object.
    Integrity,
    /// The configured key is not the one the object was encrypted with (or none is configured).
    WrongKey,
    /// A setting is missing or invalid.
    Configuration,
    /// The input PostgreSQL handed us is unusable (unreadable file, not WAL, another cluster).
    InvalidInput,
    /// The store could not be reached or failed, and retrying within the bounded time did not
    /// help.
    Transient,
    /// The store refused: permission, authentication, or another permanent store error.
    Storage,
    /// Writing or syncing a local file (the restore destination) failed.
    LocalIo,
    /// A bug or an impossible state.
    Internal,
}

/// An error from walcore.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause (shown by `{:#}` and through `source()`).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(Box::new(source));
        self
    }

    /// Prefixes the message with what was being done: `"archiving X: <message>"`.
    pub fn context(mut self, what: impl fmt::Display) -> Error {
        self.message = format!("{what}: {}", self.message);
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// Worth trying again (after a pause): the store may come back.
    pub fn is_retryable(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if f.alternate() {
            let mut source = self
                .source
                .as_deref()
                .map(|s| s as &(dyn std::error::Error + 'static));
            while let Some(s) = source {
                write!(f, ": {s}")?;
                source = s.source();
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<crate::codec::CodecError> for Error {
    fn from(e: crate::codec::CodecError) -> Error {
        use crate::codec::CodecError as C;
        let kind = match &e {
            C::WrongKey { .. } | C::KeyMissing { .. } => ErrorKind::WrongKey,
            C::Write(_) => ErrorKind::LocalIo,
            C::Read(_) => ErrorKind::Transient,
            C::Compress(_) | C::Encrypt => ErrorKind::Internal,
            _ => ErrorKind::Integrity,
        };
        Error::new(kind, e.to_string())
    }
}

impl From<crate::pg::PgError> for Error {
    fn from(e: crate::pg::PgError) -> Error {
        Error::new(ErrorKind::InvalidInput, e.to_string())
    }
}

/// The result type of walcore's public functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;
