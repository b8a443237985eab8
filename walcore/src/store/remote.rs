//! Cloud object stores through `object_store`: `s3://`, `gs://`, `az://` (and `azure://`,
//! `abfs://` spellings object_store accepts). Credentials, region and endpoint come from the
//! variables each cloud's own tools read (`AWS_*`, `GOOGLE_*`, `AZURE_*`).

use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ClientConfigKey, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig, WriteMultipart,
};

use super::{Piece, PutOutcome, StoreError, StoreOptions};
use crate::progress;

/// Encoded objects up to this size go up in one create-only `PUT` (`If-None-Match: *`); larger
/// ones as a multipart upload, which stores cannot make create-only (see `put_stream`). A
/// 16 MiB WAL segment, even incompressible, stays below it.
pub const SINGLE_PUT_MAX: usize = 24 * 1024 * 1024;
/// Part size of multipart uploads (S3 requires at least 5 MiB but for the last part).
const PART_SIZE: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct RemoteStore {
    inner: Arc<dyn ObjectStore>,
    url: String,
}

static CRYPTO_PROVIDER: Once = Once::new();

fn install_crypto_provider() {
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
        let timeout = duration_text(options.request_timeout);
        let connect = duration_text(options.connect_timeout);
        let bucket_url = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
        let err = |e: object_store::Error| StoreError::Config(format!("{url}: {e}"));
        let store: Arc<dyn ObjectStore> = match url.scheme() {
            "s3" | "s3a" => Arc::new(
                with_options::<AmazonS3ConfigKey, _>(
                    AmazonS3Builder::from_env(),
                    options,
                    |b, k, v| b.with_config(k, v),
                )?
                .with_url(bucket_url.as_str())
                .with_retry(retry)
                .with_config(
                    AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                    &timeout,
                )
                .with_config(
                    AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                    &connect,
                )
                .build()
                .map_err(err)?,
            ),
            "gs" => Arc::new(
                with_options::<GoogleConfigKey, _>(
                    GoogleCloudStorageBuilder::from_env(),
                    options,
                    |b, k, v| b.with_config(k, v),
                )?
                .with_url(bucket_url.as_str())
                .with_retry(retry)
                .with_config(GoogleConfigKey::Client(ClientConfigKey::Timeout), &timeout)
                .with_config(
                    GoogleConfigKey::Client(ClientConfigKey::ConnectTimeout),
                    &connect,
                )
                .build()
                .map_err(err)?,
            ),
            "az" | "azure" | "abfs" | "abfss" => Arc::new(
                with_options::<AzureConfigKey, _>(
                    MicrosoftAzureBuilder::from_env(),
                    options,
                    |b, k, v| b.with_config(k, v),
                )?
                .with_url(bucket_url.as_str())
                .with_retry(retry)
                .with_config(AzureConfigKey::Client(ClientConfigKey::Timeout), &timeout)
                .with_config(
                    AzureConfigKey::Client(ClientConfigKey::ConnectTimeout),
                    &connect,
                )
                .build()
                .map_err(err)?,
            ),
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
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<futures::stream::BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        let result = self.inner.get(&Path::from(key)).await.map_err(map_error)?;
        progress::tick();
        Ok(result
            .into_stream()
            .map(|r| {
                progress::tick();
                r.map_err(map_error)
            })
            .boxed())
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let result = self.inner.get(&Path::from(key)).await.map_err(map_error)?;
        progress::tick();
        let bytes = result.bytes().await.map_err(map_error)?;
        progress::tick();
        Ok(bytes)
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
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        for piece in buffered {
            writer.put(piece);
        }
        loop {
            match pieces.recv().await {
                Some(Piece::Data(piece)) => {
                    writer.wait_for_capacity(4).await.map_err(map_error)?;
                    progress::tick();
                    writer.put(piece);
                }
                Some(Piece::End) => break,
                None => {
                    // Abort, so the uploaded parts do not linger (and cost) in the store.
                    let _ = writer.abort().await;
                    return Err(abandoned());
                }
            }
        }
        writer.finish().await.map_err(map_error)?;
        progress::tick();
        Ok(PutOutcome::Created)
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
