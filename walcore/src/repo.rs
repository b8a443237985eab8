//! A repository: a store, the codec its objects are written with, and the metadata that ties
//! it to one PostgreSQL cluster (FORMAT.md §5).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::codec::Codec;
use crate::config::Config;
use crate::error::{Error, ErrorKind};
use crate::pg::{LongPageHeader, WalSegmentSize};
use crate::store::{META_KEY, PutOutcome, Store};

/// The repository metadata object, as stored (JSON inside an envelope).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoMeta {
    pub format_version: u32,
    /// Decimal: the identifier exceeds what JSON numbers hold exactly.
    pub system_identifier: String,
    pub pg_major: u32,
    pub wal_segment_size: u32,
    pub created_at_unix: u64,
    pub created_by: String,
}

impl RepoMeta {
    /// Metadata for a cluster, from the long header of one of its segments.
    pub fn from_header(header: &LongPageHeader) -> Result<RepoMeta, Error> {
        let major = header.pg_major().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("unknown WAL page magic {:#06x}", header.magic),
            )
        })?;
        Ok(RepoMeta::new(
            header.system_id,
            major,
            WalSegmentSize::new(header.seg_size)?,
        ))
    }

    /// Metadata for a cluster, created now by this walcore.
    pub fn new(system_id: u64, pg_major: u32, seg_size: WalSegmentSize) -> RepoMeta {
        RepoMeta {
            format_version: 1,
            system_identifier: system_id.to_string(),
            pg_major,
            wal_segment_size: seg_size.bytes(),
            created_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            created_by: format!("walcore {}", env!("CARGO_PKG_VERSION")),
        }
    }

    pub fn system_id(&self) -> Result<u64, Error> {
        self.system_identifier.parse().map_err(|_| {
            Error::new(
                ErrorKind::Integrity,
                format!(
                    "repository metadata: system_identifier '{}' is not a number",
                    self.system_identifier
                ),
            )
        })
    }

    pub fn segment_size(&self) -> Result<WalSegmentSize, Error> {
        WalSegmentSize::new(self.wal_segment_size)
            .map_err(|e| Error::new(ErrorKind::Integrity, format!("repository metadata: {e}")))
    }
}

/// A repository opened with a configuration.
#[derive(Debug, Clone)]
pub struct Repository {
    store: Store,
    codec: Codec,
    retry_time: Duration,
    /// The metadata once read: it never changes after the first push, so one process (a
    /// look-ahead or prefetch worker handling many segments) reads it once.
    meta: Arc<OnceLock<RepoMeta>>,
}

impl Repository {
    pub fn open(config: &Config) -> Result<Repository, Error> {
        let store = Store::from_url(&config.repo, &config.store_options())?;
        Ok(Repository {
            store,
            codec: config.codec(),
            retry_time: config.retry_time,
            meta: Arc::default(),
        })
    }

    /// A repository over a given store and codec (for embedding programs and tests).
    pub fn new(store: Store, codec: Codec, retry_time: Duration) -> Repository {
        Repository {
            store,
            codec,
            retry_time,
            meta: Arc::default(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This repository with nothing read of it yet: the next reader reads the metadata from the
    /// store again (a long-running reader, so that an unmounted or replaced repository shows).
    pub fn fresh(&self) -> Repository {
        Repository {
            meta: Arc::default(),
            ..self.clone()
        }
    }

    /// This repository over another handle of its store (one made by
    /// [`Store::recycling`], say); what was read of the repository is kept.
    pub fn with_store(&self, store: Store) -> Repository {
        Repository {
            store,
            ..self.clone()
        }
    }

    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// Runs `op` until it succeeds, fails with an error that is not retryable, or the retry
    /// window has passed; waits with exponential backoff and jitter in between.
    pub async fn with_retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1u32;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && start.elapsed() + delay < self.retry_time => {
                    tracing::warn!(attempt, error = %e, "{what}: will retry");
                    tokio::time::sleep(jitter(delay)).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                Err(e) if e.is_retryable() => {
                    return Err(e.context(format!(
                        "{what}: gave up after {attempt} attempts in {:.1}s",
                        start.elapsed().as_secs_f64()
                    )));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads and decodes a small object into memory.
    pub async fn get_small(&self, key: &str) -> Result<Vec<u8>, Error> {
        let store = self.store.describe();
        let stored = self
            .store
            .get(key)
            .await
            .map_err(|e| e.into_error("reading", key, &store))?;
        let codec = self.codec.clone();
        let key_owned = key.to_string();
        tokio::task::spawn_blocking(move || codec.decode_to_vec(&key_owned, &stored))
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?
            .map_err(|e| Error::from(e).context(format!("reading {key} in {store}")))
    }

    /// Encodes and stores a small object, create-only.
    pub async fn put_small(&self, key: &str, plain: Vec<u8>) -> Result<PutOutcome, Error> {
        let codec = self.codec.clone();
        let name = key.to_string();
        let (outcome, ()) = self
            .store
            .put_create_with(key, move |w| {
                codec
                    .encode(&name, &plain[..], w)
                    .map(|_| ())
                    .map_err(Error::from)
            })
            .await?;
        Ok(outcome)
    }

    /// The repository metadata, or `None` if nothing was ever archived here.
    pub async fn read_meta(&self) -> Result<Option<RepoMeta>, Error> {
        if let Some(meta) = self.meta.get() {
            return Ok(Some(meta.clone()));
        }
        match self.get_small(META_KEY).await {
            Ok(bytes) => {
                let meta: RepoMeta = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::new(
                        ErrorKind::Integrity,
                        format!(
                            "repository metadata {META_KEY} in {}: {e}",
                            self.store.describe()
                        ),
                    )
                })?;
                if meta.format_version != 1 {
                    return Err(Error::new(
                        ErrorKind::Configuration,
                        format!(
                            "repository {} has format version {}; this walcore reads version 1",
                            self.store.describe(),
                            meta.format_version
                        ),
                    ));
                }
                Ok(Some(self.meta.get_or_init(|| meta).clone()))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The metadata to push a segment with that header against: the recorded one, or, at the
    /// first push, one made from the header and stored create-only (a concurrent first push may
    /// win; then theirs is used).
    pub async fn meta_for_push(&self, header: &LongPageHeader) -> Result<RepoMeta, Error> {
        if let Some(meta) = self.read_meta().await? {
            return Ok(meta);
        }
        self.init_meta(RepoMeta::from_header(header)?).await
    }

    /// Stores `meta` create-only as this repository's metadata and returns what is then
    /// recorded: `meta`, or the metadata a concurrent first writer stored (compare it).
    pub async fn init_meta(&self, meta: RepoMeta) -> Result<RepoMeta, Error> {
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
        match self.put_small(META_KEY, json).await? {
            PutOutcome::Created => {
                tracing::info!(
                    system_identifier = %meta.system_identifier,
                    pg_major = meta.pg_major,
                    repo = %self.store.describe(),
                    "initialised the repository for this cluster"
                );
                Ok(self.meta.get_or_init(|| meta).clone())
            }
            PutOutcome::AlreadyExists => self.read_meta().await?.ok_or_else(|| {
                Error::new(
                    ErrorKind::Transient,
                    "repository metadata exists but could not be read back",
                )
            }),
        }
    }
}

/// A delay of 50–100 % of `d`, so that many clients retrying do not move in step.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() {
        u16::from_le_bytes(b)
    } else {
        u16::MAX / 2
    };
    d / 2 + d.mul_f64(f64::from(r) / f64::from(u16::MAX) / 2.0)
}
