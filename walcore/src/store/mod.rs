//! Where objects live, and how they get there: create-only writes, whole-object reads, bounded
//! retries. One front (`Store`) over a local file system and the cloud stores.

pub mod batch;
pub mod conformance;
pub mod keys;
pub mod local;
mod recycle;
pub mod remote;
mod resume;
pub mod scan;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

pub use keys::{META_KEY, wal_key};
pub use local::LocalStore;
pub use remote::RemoteStore;
pub use scan::ObjectInfo;

use crate::error::{Error, ErrorKind};

/// What a create-only write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object is now stored (durably, as the store defines it).
    Created,
    /// An object already had that key; it was left as it was.
    AlreadyExists,
}

/// A store's failure, before it gets the object's name attached.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("permission denied: {0}")]
    Permission(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Permanent(String),
    #[error("invalid store configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// The same failure with its message rewritten by `f` (a `NotFound` becomes a permanent
    /// error: once it needs words, it is about something other than the object asked for).
    pub fn map_message(self, f: impl FnOnce(String) -> String) -> StoreError {
        match self {
            StoreError::NotFound => StoreError::Permanent(f("not found".into())),
            StoreError::Permission(m) => StoreError::Permission(f(m)),
            StoreError::Unavailable(m) => StoreError::Unavailable(f(m)),
            StoreError::Permanent(m) => StoreError::Permanent(f(m)),
            StoreError::Config(m) => StoreError::Config(f(m)),
        }
    }

    /// The public error for this failure on `key` of `store`.
    pub fn into_error(self, doing: &str, key: &str, store: &str) -> Error {
        let kind = match &self {
            StoreError::NotFound => ErrorKind::NotFound,
            StoreError::Permission(_) => ErrorKind::Storage,
            StoreError::Unavailable(_) => ErrorKind::Transient,
            StoreError::Permanent(_) => ErrorKind::Storage,
            StoreError::Config(_) => ErrorKind::Configuration,
        };
        Error::new(kind, format!("{doing} {key} in {store}: {self}"))
    }
}

/// Settings of the store clients. Its `Debug` names the cloud options but never shows their
/// values (`aws_secret_access_key`, …).
#[derive(Clone)]
pub struct StoreOptions {
    /// How long transient failures of one request are retried (with backoff and jitter).
    pub retry_time: Duration,
    /// Longest a request may go without progress: from its start to the answer's head (a
    /// whole upload request: a single `PUT` or one part), and between two pieces of a
    /// download's body. A download that keeps moving is never cut, however long it takes.
    pub request_timeout: Duration,
    /// Longest a connection attempt may take.
    pub connect_timeout: Duration,
    /// Cloud client settings by `object_store` key (`aws_endpoint`, `aws_access_key_id`, …),
    /// applied over what the environment gives: for programs that embed walcore and do not
    /// want to set process-wide variables.
    pub cloud_options: Vec<(String, String)>,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cloud: Vec<String> = self
            .cloud_options
            .iter()
            .map(|(k, _)| format!("{k}=<redacted>"))
            .collect();
        f.debug_struct("StoreOptions")
            .field("retry_time", &self.retry_time)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("cloud_options", &cloud)
            .finish()
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            retry_time: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            cloud_options: Vec::new(),
        }
    }
}

/// Pieces in flight between the encoder thread and an upload.
const PUT_QUEUE: usize = 4;
/// Pieces in flight between a download and the decoder thread.
const GET_QUEUE: usize = 8;
/// Size of the pieces the encoder hands to an upload.
const PUT_PIECE: usize = 1024 * 1024;

/// A repository's store.
#[derive(Debug, Clone)]
pub enum Store {
    Local(LocalStore),
    Remote(RemoteStore),
}

impl Store {
    /// A store from a repository URL: `file:///abs/path`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`.
    pub fn from_url(text: &str, options: &StoreOptions) -> Result<Store, Error> {
        let bad = |why: String| {
            Error::new(
                ErrorKind::Configuration,
                format!("WALCORE_REPO '{text}' is not a usable repository URL: {why}"),
            )
        };
        let url = url::Url::parse(text).map_err(|e| bad(e.to_string()))?;
        match url.scheme() {
            "file" => {
                if url
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(bad(
                        "a file:// URL must name a local absolute path, as file:///var/lib/walcore"
                            .into(),
                    ));
                }
                let path = url
                    .to_file_path()
                    .map_err(|()| bad("not an absolute path".into()))?;
                Ok(Store::Local(LocalStore::new(path)))
            }
            _ => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(bad("the URL names no bucket or container".into()));
                }
                RemoteStore::new(&url, options)
                    .map(Store::Remote)
                    .map_err(|e| bad(e.to_string()))
            }
        }
    }

    /// The store as a user wrote it, for messages.
    pub fn describe(&self) -> String {
        match self {
            Store::Local(l) => format!("file://{}", l.root().display()),
            Store::Remote(r) => r.url().to_string(),
        }
    }

    /// Reads a whole (small) object into memory.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        match self {
            Store::Local(l) => {
                let l = l.clone();
                let key = key.to_string();
                blocking(move || l.get(&key)).await?.map(Bytes::from)
            }
            Store::Remote(r) => r.get(key).await,
        }
    }

    /// Opens an object for streaming reads from a blocking thread. `NotFound` is decided before
    /// any byte is read. From a cloud store, a body cut mid-stream is resumed from the next
    /// byte of the same object while bytes keep arriving (`RemoteStore::get_stream`); memory
    /// stays bounded by a few pieces in flight. Must be called inside a tokio runtime.
    pub async fn open_reader(&self, key: &str) -> Result<Box<dyn Read + Send>, StoreError> {
        match self {
            Store::Local(l) => {
                let l = l.clone();
                let key = key.to_string();
                let f = blocking(move || l.open(&key)).await??;
                Ok(Box::new(f))
            }
            Store::Remote(r) => {
                let mut stream = r.get_stream(key).await?;
                let (tx, rx) = tokio::sync::mpsc::channel(GET_QUEUE);
                tokio::spawn(async move {
                    while let Some(piece) = stream.next().await {
                        let piece = piece.map_err(std::io::Error::other);
                        let stop = piece.is_err();
                        if tx.send(piece).await.is_err() || stop {
                            break;
                        }
                    }
                });
                Ok(Box::new(ChannelReader {
                    rx,
                    current: Bytes::new(),
                }))
            }
        }
    }

    /// The last `n` bytes of an object (all of it if shorter): a trailer, without the body.
    pub async fn tail(&self, key: &str, n: u64) -> Result<Bytes, StoreError> {
        match self {
            Store::Local(l) => {
                let l = l.clone();
                let key = key.to_string();
                blocking(move || {
                    use std::io::{Seek, SeekFrom};
                    let mut f = l.open(&key)?;
                    let io = |e: std::io::Error| StoreError::Permanent(format!("{key}: {e}"));
                    let len = f.metadata().map_err(io)?.len();
                    f.seek(SeekFrom::Start(len.saturating_sub(n))).map_err(io)?;
                    let mut out = Vec::with_capacity(usize::try_from(n.min(len)).unwrap_or(0));
                    f.read_to_end(&mut out).map_err(io)?;
                    Ok(Bytes::from(out))
                })
                .await?
            }
            Store::Remote(r) => r.tail(key, n).await,
        }
    }

    /// Whether an object exists, and its size.
    pub async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self {
            Store::Local(l) => {
                let l = l.clone();
                let key = key.to_string();
                blocking(move || l.head(&key)).await?
            }
            Store::Remote(r) => r.head(key).await,
        }
    }

    /// Removes an object; an absent one is not an error. Only for objects nothing refers to
    /// (the leftovers of a base backup that was never recorded): WAL and recorded backups are
    /// never deleted by walcore.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Local(l) => {
                let l = l.clone();
                let key = key.to_string();
                blocking(move || l.delete(&key)).await?
            }
            Store::Remote(r) => r.delete(key).await,
        }
    }

    /// Keys under a prefix, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Local(l) => {
                let l = l.clone();
                let prefix = prefix.to_string();
                blocking(move || l.list(&prefix)).await?
            }
            Store::Remote(r) => r.list(prefix).await,
        }
    }

    /// At most `limit` keys under `prefix` that sort after `after` (all of them for `None`),
    /// in key order: the first objects after a position, without listing the whole prefix.
    pub async fn list_after(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Local(l) => {
                let l = l.clone();
                let prefix = prefix.to_string();
                let after = after.map(str::to_string);
                blocking(move || l.list_after(&prefix, after.as_deref(), limit)).await?
            }
            Store::Remote(r) => r.list_after(prefix, after, limit).await,
        }
    }

    /// Writes an object create-only. `produce` runs on a blocking thread and writes the bytes;
    /// the call returns once the store has acknowledged the whole object (for a file system:
    /// data and directory fsynced), or reports that the key already existed.
    pub async fn put_create_with<T, F>(
        &self,
        key: &str,
        produce: F,
    ) -> Result<(PutOutcome, T), Error>
    where
        F: FnOnce(&mut dyn Write) -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        self.put_create_sweeping(key, true, produce).await
    }

    /// [`put_create_with`](Self::put_create_with) for a key only one writer ever writes, in a
    /// directory of many objects: on a file system, other writers' temporary files for the key
    /// are not looked for (that reads the whole directory).
    pub async fn put_create_once_with<T, F>(
        &self,
        key: &str,
        produce: F,
    ) -> Result<(PutOutcome, T), Error>
    where
        F: FnOnce(&mut dyn Write) -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        self.put_create_sweeping(key, false, produce).await
    }

    async fn put_create_sweeping<T, F>(
        &self,
        key: &str,
        sweep: bool,
        produce: F,
    ) -> Result<(PutOutcome, T), Error>
    where
        F: FnOnce(&mut dyn Write) -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.describe();
        match self {
            Store::Local(l) => {
                let l = l.clone();
                let key_owned = key.to_string();
                let r = blocking(move || l.put_create_sweeping(&key_owned, sweep, produce))
                    .await
                    .map_err(|e| e.into_error("writing", key, &store))?;
                r.map_err(|e| match e {
                    local::PutError::Store(s) => s.into_error("writing", key, &store),
                    local::PutError::Produce(e) => e,
                })
            }
            Store::Remote(r) => {
                let (tx, rx) = tokio::sync::mpsc::channel::<Piece>(PUT_QUEUE);
                // Set by the writer when the upload side has gone (it failed on its own): the
                // producer's failure is then only a consequence.
                let upload_gone = Arc::new(AtomicBool::new(false));
                let gone = upload_gone.clone();
                let producer = tokio::task::spawn_blocking(move || {
                    let mut w = ChannelWriter {
                        tx,
                        buf: Vec::with_capacity(PUT_PIECE),
                        gone,
                    };
                    let value = produce(&mut w)?;
                    // Only an explicit end lets the upload complete: a producer that fails (or
                    // panics) drops the channel without it, and the upload is abandoned.
                    w.finish().map_err(|e| {
                        Error::new(ErrorKind::Internal, format!("upload ended early: {e}"))
                    })?;
                    Ok::<T, Error>(value)
                });
                let upload = r.put_stream(key, rx).await;
                let value = producer.await.map_err(|e| {
                    Error::new(ErrorKind::Internal, format!("encoder thread failed: {e}"))
                })?;
                match (value, upload) {
                    // The store failed first, and the producer stopped because of it: the store's
                    // error is the cause.
                    (Err(_), Err(e)) if upload_gone.load(Ordering::SeqCst) => {
                        Err(e.into_error("writing", key, &store))
                    }
                    // The producer failed first (the upload was abandoned because of it).
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(e)) => Err(e.into_error("writing", key, &store)),
                    (Ok(value), Ok(outcome)) => Ok((outcome, value)),
                }
            }
        }
    }
}

/// Runs blocking file-system work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StoreError> {
    let done = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Permanent(format!("worker thread failed: {e}")));
    crate::progress::tick();
    done
}

/// The blocking side of a download: reads pieces a task receives.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(piece)) => self.current = piece,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// The blocking side of an upload: gathers bytes into pieces and sends them to the uploader.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Piece>,
    buf: Vec<u8>,
    /// Set when a send finds the upload gone.
    gone: Arc<AtomicBool>,
}

impl ChannelWriter {
    fn upload_stopped(&self) -> std::io::Error {
        self.gone.store(true, Ordering::SeqCst);
        std::io::Error::other("the upload stopped")
    }
}

impl ChannelWriter {
    fn send_buf(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(PUT_PIECE));
        self.tx
            .blocking_send(Piece::Data(Bytes::from(piece)))
            .map_err(|_| self.upload_stopped())
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PUT_PIECE {
            self.send_buf()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buf()
    }
}

impl ChannelWriter {
    /// Sends what is buffered and the end marker: the object is complete.
    fn finish(mut self) -> std::io::Result<()> {
        self.send_buf()?;
        self.tx
            .blocking_send(Piece::End)
            .map_err(|_| self.upload_stopped())
    }
}

/// What travels from an encoder thread to an upload.
#[derive(Debug)]
pub enum Piece {
    Data(Bytes),
    /// The producer finished successfully; without it the upload is abandoned.
    End,
}
