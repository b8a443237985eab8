//! Cloud object stores through `object_store`: `s3://`, `gs://`, `az://` (and `azure://`,
//! `abfs://` spellings object_store accepts). Credentials, region and endpoint come from the
//! variables each cloud's own tools read (`AWS_*`, `GOOGLE_*`, `AZURE_*`).

use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ClientConfigKey, GetOptions, GetRange, MultipartUpload, ObjectStore,
    ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};

use super::resume::Resume;
use super::{Piece, PutOutcome, StoreError, StoreOptions};
use crate::progress;

/// Encoded objects up to this size go up in one create-only `PUT` (`If-None-Match: *`); larger
/// ones as a multipart upload, which stores cannot make create-only (see `put_stream`). A
/// 16 MiB WAL segment, even incompressible, stays below it.
pub const SINGLE_PUT_MAX: usize = 24 * 1024 * 1024;
/// Part size of multipart uploads (S3 requires at least 5 MiB but for the last part). Every
/// part but the last has exactly this size (some S3-compatible stores require equal parts).
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one multipart upload in flight at once: with the part being filled, bounds an
/// upload's memory to five parts (40 MiB) while keeping several requests busy.
const PARTS_IN_FLIGHT: usize = 4;
/// The HTTP client's limit on a whole request, body included. Large objects take as long as
/// they take: what is bounded is the time without progress (`read_timeout`, set to
/// `WALCORE_REQUEST_TIMEOUT`), so this only has to be longer than any transfer.
const WHOLE_REQUEST_LIMIT: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone)]
pub struct RemoteStore {
    inner: Arc<dyn ObjectStore>,
    url: String,
    /// How long a cut download may try to resume after its last byte (`WALCORE_RETRY_TIME`).
    retry_time: Duration,
}

static CRYPTO_PROVIDER: Once = Once::new();

pub(crate) fn install_crypto_provider() {
    CRYPTO_PROVIDER.call_once(|| {
        // Another part of the process may have installed one already; either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Applies `options.cloud_options` to a builder, each key parsed as that cloud's config key.
fn with_options<K, B>(
    builder: B,
    options: &StoreOptions,
    set: impl Fn(B, K, &str) -> B,
) -> Result<B, StoreError>
where
    K: std::str::FromStr,
    K::Err: std::fmt::Display,
{
    let mut b = builder;
    for (key, value) in &options.cloud_options {
        let k = key
            .parse::<K>()
            .map_err(|e| StoreError::Config(format!("option '{key}': {e}")))?;
        b = set(b, k, value);
    }
    Ok(b)
}

fn duration_text(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

impl RemoteStore {
    pub fn new(url: &url::Url, options: &StoreOptions) -> Result<RemoteStore, StoreError> {
        install_crypto_provider();
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 100,
            retry_timeout: options.retry_time,
        };
        // Time limits, the same for every cloud. `WALCORE_REQUEST_TIMEOUT` bounds time without
        // progress: reqwest's read timeout runs from the start of a request to its answer's
        // head (so a whole upload request, a part or a single PUT, is bounded by it), then
        // restarts with every piece of the body that arrives (so a download that keeps moving
        // is never cut by it, however long it takes).
        let limits = [
            (ClientConfigKey::Timeout, duration_text(WHOLE_REQUEST_LIMIT)),
            (
                ClientConfigKey::ReadTimeout,
                duration_text(options.request_timeout),
            ),
            (
                ClientConfigKey::ConnectTimeout,
                duration_text(options.connect_timeout),
            ),
        ];
        let bucket_url = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
        let err = |e: object_store::Error| StoreError::Config(format!("{url}: {e}"));
        let store: Arc<dyn ObjectStore> = match url.scheme() {
            "s3" | "s3a" => {
                let b = with_options::<AmazonS3ConfigKey, _>(
                    AmazonS3Builder::from_env(),
                    options,
                    |b, k, v| b.with_config(k, v),
                )?
                .with_url(bucket_url.as_str())
                .with_retry(retry);
                let b = limits.iter().fold(b, |b, (k, v)| {
                    b.with_config(AmazonS3ConfigKey::Client(*k), v)
                });
                Arc::new(b.build().map_err(err)?)
            }
            "gs" => {
                let b = with_options::<GoogleConfigKey, _>(
                    GoogleCloudStorageBuilder::from_env(),
                    options,
                    |b, k, v| b.with_config(k, v),
                )?
                .with_url(bucket_url.as_str())
                .with_retry(retry);
                let b = limits
                    .iter()
                    .fold(b, |b, (k, v)| b.with_config(GoogleConfigKey::Client(*k), v));
                Arc::new(b.build().map_err(err)?)
            }
            "az" | "azure" | "abfs" | "abfss" => {
                let b = with_options::<AzureConfigKey, _>(
                    MicrosoftAzureBuilder::from_env(),
                    options,
                    |b, k, v| b.with_config(k, v),
                )?
                .with_url(bucket_url.as_str())
                .with_retry(retry);
                let b = limits
                    .iter()
                    .fold(b, |b, (k, v)| b.with_config(AzureConfigKey::Client(*k), v));
                Arc::new(b.build().map_err(err)?)
            }
            other => {
                return Err(StoreError::Config(format!(
                    "unsupported repository URL scheme '{other}' (use file://, s3://, gs:// or az://)"
                )));
            }
        };
        let prefix = url.path().trim_matches('/');
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
            store
        } else {
            Arc::new(PrefixStore::new(store, prefix))
        };
        Ok(RemoteStore {
            inner,
            url: url.to_string(),
            retry_time: options.retry_time,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The `object_store` client, for listings that the other methods do not cover.
    pub(super) fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// The whole object as a stream of byte pieces. `NotFound` is decided here, before any byte.
    ///
    /// A body cut mid-stream is resumed from the next byte of the same object (see
    /// `store/resume.rs`) for as long as bytes keep arriving within the retry window; only a
    /// download that stops moving ends with an error. An object that disappears or changes
    /// while it is read is an error, never `NotFound` and never a splice.
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        let path = Path::from(key);
        let result = self
            .inner
            .get_opts(&path, GetOptions::default())
            .await
            .map_err(map_error)?;
        progress::tick();
        let state = Resume::new(key, &result.meta, self.retry_time, Instant::now());
        let download = Download {
            inner: self.inner.clone(),
            path,
            state,
            body: Some(result.into_stream()),
        };
        Ok(futures::stream::unfold(download, |mut d| async move {
            d.next_piece().await.map(|piece| (piece, d))
        })
        .boxed())
    }

    /// Reads a whole (small) object, resuming a cut body like [`RemoteStore::get_stream`].
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let mut stream = self.get_stream(key).await?;
        let mut out = bytes::BytesMut::new();
        while let Some(piece) = stream.next().await {
            out.extend_from_slice(&piece?);
        }
        Ok(out.freeze())
    }

    /// The last `n` bytes of an object (all of it if it is shorter).
    pub async fn tail(&self, key: &str, n: u64) -> Result<Bytes, StoreError> {
        let opts = GetOptions {
            range: Some(GetRange::Suffix(n)),
            ..GetOptions::default()
        };
        let result = self
            .inner
            .get_opts(&Path::from(key), opts)
            .await
            .map_err(map_error)?;
        let bytes = result.bytes().await.map_err(map_error)?;
        progress::tick();
        Ok(bytes)
    }

    pub async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let answer = self.inner.head(&Path::from(key)).await;
        progress::tick_unless_failed(&answer);
        match answer {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(map_error(e)),
        }
    }

    /// Removes an object; an absent one is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let answer = self.inner.delete(&Path::from(key)).await;
        progress::tick_unless_failed(&answer);
        match answer {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(map_error(e)),
        }
    }

    /// Create-only write of an object whose bytes arrive on `pieces`.
    ///
    /// Up to [`SINGLE_PUT_MAX`] bytes: one conditional `PUT`, atomic. Larger: the store is
    /// asked first whether the key exists, then a multipart upload runs; a concurrent writer of
    /// the same key in that window could be overwritten, which walcore's callers rule out by
    /// comparing content after a conflict and by archiving each file from one process.
    pub async fn put_stream(
        &self,
        key: &str,
        mut pieces: tokio::sync::mpsc::Receiver<Piece>,
    ) -> Result<PutOutcome, StoreError> {
        let abandoned =
            || StoreError::Permanent("the object's producer failed; nothing was stored".into());
        let path = Path::from(key);
        let mut buffered: Vec<Bytes> = Vec::new();
        let mut total = 0usize;
        let mut complete = false;
        while total <= SINGLE_PUT_MAX {
            match pieces.recv().await {
                Some(Piece::Data(piece)) => {
                    total += piece.len();
                    buffered.push(piece);
                }
                Some(Piece::End) => {
                    complete = true;
                    break;
                }
                None => return Err(abandoned()),
            }
        }
        if complete {
            let payload = PutPayload::from_iter(buffered);
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            let answer = self.inner.put_opts(&path, payload, opts).await;
            progress::tick_unless_failed(&answer);
            return match answer {
                Ok(_) => Ok(PutOutcome::Created),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => Ok(PutOutcome::AlreadyExists),
                Err(e) => Err(map_error(e)),
            };
        }
        if self.head(key).await?.is_some() {
            return Ok(PutOutcome::AlreadyExists);
        }
        let upload = self.inner.put_multipart(&path).await.map_err(map_error)?;
        progress::tick();
        let mut upload = Multipart::new(key, upload);
        let sent = async {
            for piece in buffered {
                upload.push(piece).await?;
            }
            loop {
                match pieces.recv().await {
                    Some(Piece::Data(piece)) => upload.push(piece).await?,
                    Some(Piece::End) => return upload.complete().await,
                    None => return Err(abandoned()),
                }
            }
        }
        .await;
        match sent {
            Ok(()) => Ok(PutOutcome::Created),
            // Abort, so the uploaded parts do not linger (and cost) in the store; the error that
            // stopped the upload is the one to report.
            Err(e) => Err(upload.abort(e).await),
        }
    }

    /// Keys under a prefix, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let prefix = Path::from(prefix.trim_end_matches('/'));
        let mut stream = self.inner.list(Some(&prefix));
        let mut out = Vec::new();
        while let Some(meta) = stream.next().await {
            progress::tick();
            out.push(meta.map_err(map_error)?.location.to_string());
        }
        out.sort();
        Ok(out)
    }
}

impl RemoteStore {
    /// At most `limit` keys under `prefix` that sort after `after` (all for `None`), in key
    /// order. The store starts the listing after `after` itself (`start-after` on S3 and GCS,
    /// `startFrom` on Azure), and pages are only requested as the keys are consumed: one
    /// request for a limit within a page.
    pub async fn list_after(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let prefix = Path::from(prefix.trim_end_matches('/'));
        let mut stream = match after {
            Some(a) => self.inner.list_with_offset(Some(&prefix), &Path::from(a)),
            None => self.inner.list(Some(&prefix)),
        };
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(meta) = stream.next().await else {
                break;
            };
            progress::tick();
            out.push(meta.map_err(map_error)?.location.to_string());
        }
        Ok(out)
    }
}

/// A download in progress: the body being read, and what it takes to resume it.
struct Download {
    inner: Arc<dyn ObjectStore>,
    path: Path,
    state: Resume,
    /// `None` once the download ended (completely or with an error).
    body: Option<BoxStream<'static, object_store::Result<Bytes>>>,
}

impl Download {
    /// The next piece of the object; `None` at its end.
    async fn next_piece(&mut self) -> Option<Result<Bytes, StoreError>> {
        loop {
            let body = self.body.as_mut()?;
            let cause = match body.next().await {
                Some(Ok(piece)) => {
                    if let Err(e) = self.state.progressed(piece.len(), Instant::now()) {
                        self.body = None;
                        return Some(Err(e));
                    }
                    if piece.is_empty() {
                        continue;
                    }
                    progress::tick();
                    return Some(Ok(piece));
                }
                None if self.state.complete() => {
                    self.body = None;
                    return None;
                }
                None => format!(
                    "the body ended after byte {} of {}",
                    self.state.offset(),
                    self.state.size()
                ),
                Some(Err(e)) => e.to_string(),
            };
            self.body = None;
            if let Err(e) = self.resume(cause).await {
                return Some(Err(e));
            }
        }
    }

    /// Asks for the rest of the object until an answer comes from the same object, or the
    /// retry window since the last progress is over.
    async fn resume(&mut self, mut cause: String) -> Result<(), StoreError> {
        loop {
            let wait = self.state.after_cut(Instant::now(), &cause)?;
            tracing::warn!(
                key = %self.path,
                at = self.state.offset(),
                of = self.state.size(),
                cause = %cause,
                "download cut; resuming in {:.1}s",
                wait.as_secs_f64()
            );
            tokio::time::sleep(wait).await;
            let limit = self.state.time_left(Instant::now());
            let answer =
                tokio::time::timeout(limit, self.inner.get_opts(&self.path, self.state.options()))
                    .await;
            match answer {
                Err(_) => cause = format!("no answer to the resumed request in {limit:?}"),
                Ok(Ok(result)) => {
                    progress::tick();
                    self.state.check(&result.meta, result.range.start)?;
                    tracing::info!(
                        key = %self.path,
                        at = self.state.offset(),
                        resumed = self.state.resumed(),
                        "download resumed"
                    );
                    self.body = Some(result.into_stream());
                    return Ok(());
                }
                Ok(Err(
                    e @ (object_store::Error::Precondition { .. }
                    | object_store::Error::NotModified { .. }
                    | object_store::Error::NotFound { .. }),
                )) => {
                    progress::tick();
                    return Err(self.state.replaced(&e.to_string()));
                }
                Ok(Err(e @ object_store::Error::Generic { .. })) => cause = e.to_string(),
                Ok(Err(e)) => return Err(map_error(e)),
            }
        }
    }
}

/// A multipart upload in progress: the part being filled and the parts in flight. Aborted
/// unless completed: by [`Multipart::abort`] on an error, or on drop (a cancelled upload) by
/// a task spawned on the runtime, as far as the runtime lives to run it.
struct Multipart {
    key: String,
    /// `None` once completed or aborted.
    upload: Option<Box<dyn MultipartUpload>>,
    parts: tokio::task::JoinSet<object_store::Result<()>>,
    filling: Vec<Bytes>,
    filled: usize,
    sent: usize,
}

impl Multipart {
    fn new(key: &str, upload: Box<dyn MultipartUpload>) -> Multipart {
        Multipart {
            key: key.to_string(),
            upload: Some(upload),
            parts: tokio::task::JoinSet::new(),
            filling: Vec::new(),
            filled: 0,
            sent: 0,
        }
    }

    /// Adds bytes; sends each part as soon as it is full, waiting while too many are in flight.
    async fn push(&mut self, mut piece: Bytes) -> Result<(), StoreError> {
        while !piece.is_empty() {
            let take = piece.split_to((PART_SIZE - self.filled).min(piece.len()));
            self.filled += take.len();
            self.filling.push(take);
            if self.filled == PART_SIZE {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    async fn send_part(&mut self) -> Result<(), StoreError> {
        while self.parts.len() >= PARTS_IN_FLIGHT {
            self.join_part().await?;
        }
        let payload = PutPayload::from_iter(std::mem::take(&mut self.filling));
        self.filled = 0;
        self.sent += 1;
        let Some(upload) = self.upload.as_mut() else {
            return Err(ended(&self.key));
        };
        self.parts.spawn(upload.put_part(payload));
        Ok(())
    }

    /// Waits for one part in flight to be stored.
    async fn join_part(&mut self) -> Result<(), StoreError> {
        match self.parts.join_next().await {
            None | Some(Ok(Ok(()))) => {
                progress::tick();
                Ok(())
            }
            Some(Ok(Err(e))) => Err(prefix(map_error(e), "uploading a part: ")),
            Some(Err(e)) => Err(StoreError::Permanent(format!(
                "uploading a part: the task failed: {e}"
            ))),
        }
    }

    /// Sends the last part, waits for every part, and completes the upload.
    async fn complete(&mut self) -> Result<(), StoreError> {
        if self.filled > 0 || self.sent == 0 {
            self.send_part().await?;
        }
        while !self.parts.is_empty() {
            self.join_part().await?;
        }
        let Some(upload) = self.upload.as_mut() else {
            return Err(ended(&self.key));
        };
        let answer = upload.complete().await;
        progress::tick_unless_failed(&answer);
        answer
            .map(|_| {
                self.upload = None;
            })
            .map_err(|e| prefix(map_error(e), "completing the multipart upload: "))
    }

    /// Aborts the upload after `cause` stopped it; returns `cause`, saying whether the abort
    /// worked (parts of an upload that could not be aborted stay in the store, billed, until a
    /// lifecycle rule removes them).
    async fn abort(&mut self, cause: StoreError) -> StoreError {
        self.parts.shutdown().await;
        let Some(mut upload) = self.upload.take() else {
            return cause;
        };
        match upload.abort().await {
            Ok(()) => suffix(cause, "; the multipart upload was aborted"),
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e, "aborting a multipart upload failed");
                suffix(
                    cause,
                    &format!(
                        "; aborting the multipart upload failed too ({e}): its parts may stay                          in the store until a lifecycle rule removes incomplete uploads"
                    ),
                )
            }
        }
    }
}

fn ended(key: &str) -> StoreError {
    StoreError::Permanent(format!("the multipart upload of {key} has ended"))
}

impl Drop for Multipart {
    fn drop(&mut self) {
        if let Some(mut upload) = self.upload.take() {
            self.parts.abort_all();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = upload.abort().await;
                });
            }
        }
    }
}

/// `e` with `text` before its message, of the same kind.
fn prefix(e: StoreError, text: &str) -> StoreError {
    e.map_message(|m| format!("{text}{m}"))
}

/// `e` with `text` after its message, of the same kind.
fn suffix(e: StoreError, text: &str) -> StoreError {
    e.map_message(|m| format!("{m}{text}"))
}

pub(super) fn map_error(e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => StoreError::Permission(e.to_string()),
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            StoreError::Permanent(e.to_string())
        }
        object_store::Error::Generic { .. } => StoreError::Unavailable(e.to_string()),
        other => StoreError::Permanent(other.to_string()),
    }
}
