//! walcore: WAL archiving and point-in-time recovery for PostgreSQL, as a library.
//!
//! Data flows through the modules in this order:
//!
//! ```text
//! PostgreSQL ──archive_command──▶ ops::archive ─┐
//!                                              │  pg (names, LSNs, page headers: pure)
//!                                              ▼
//!                          codec (chunk → compress → encrypt → frame, on all cores)
//!                                              │
//!                                              ▼
//!                          store (object keys, create-only writes, retries) ──▶ repository
//!                                              │
//! PostgreSQL ◀──restore_command── ops::restore ◀┘  (verify → decrypt → decompress → fsync → rename)
//! ```
//!
//! - [`pg`]: PostgreSQL vocabulary: LSNs, timelines, WAL file names, WAL page headers.
//! - [`codec`]: the object envelope of `docs/FORMAT.md`.
//! - [`store`]: where objects live (`file://`, `s3://`, `gs://`, `az://`) and their keys.
//! - [`repo`]: a repository: a store, a codec and the cluster's metadata.
//! - [`config`]: one configuration for every binary (flags, `WALCORE_*`, TOML).
//! - [`replication`]: a client of PostgreSQL's replication protocol.
//! - [`backup`]: base backups over that protocol, the backup catalog, and restores to a target.
//! - [`lifecycle`]: decisions about the whole repository: the retention policy as a pure plan.
//! - [`alert`]: failure alerts to a command and a webhook, once per condition until it clears.
//! - [`watch`]: reports on a setup: `walcore check` (settings, repository, one segment archived).
//! - [`ops`]: one operation per binary (with look-ahead archiving and restore prefetch);
//!   [`exit`] maps their errors to exit codes; [`progress`] ends calls that stall.

pub mod alert;
pub mod backup;
pub mod codec;
pub mod config;
pub mod error;
pub mod exit;
pub mod lifecycle;
pub mod ops;
pub mod owner;
pub mod pg;
pub mod progress;
pub mod replication;
pub mod repo;
pub mod store;
pub mod watch;

pub use error::{Error, ErrorKind};
