//! The end-to-end harness of walcore: real PostgreSQL clusters in temporary directories, the
//! real binaries as `archive_command` and `restore_command`, real object stores (a directory, or
//! moto's S3 server on loopback), and faults injected from outside (file modes, flipped bytes, an
//! HTTP proxy that stops serving).
//!
//! ```text
//! Cluster (source) ──archive_command──▶ walcore-archive ──▶ Repo (file:// dir | S3 on moto)
//!     │ pg_basebackup -X none                                   ▲        ▲ tamper / chmod
//!     ▼                                                         │        │
//! BaseBackup ──copy──▶ Cluster (restored) ◀──restore_command── walcore-restore
//!                                                 (via FaultProxy for S3 faults)
//! ```
//!
//! Build the binaries before running the tests: `cargo build --workspace --bins`, then
//! `cargo test -p walcore-e2e`. Tests run as root start PostgreSQL as the `postgres` user.
//!
//! Environment: `WALCORE_BIN_DIR` (the binaries, default: this test's profile directory),
//! `WALCORE_TEST_PG_BIN` (PostgreSQL's programs, default PostgreSQL 15's),
//! `WALCORE_TEST_PG_MAJORS` (the other majors, as `scripts/install-pg-majors` installs them,
//! default `target/test-tools/pg`), `WALCORE_TEST_PG_MATRIX` (the majors the tests that run on
//! every major cover, default `13,14,16,17,18`; in CI, `CI` set, a missing one fails them),
//! `WALCORE_TEST_MOTO_SERVER` (moto's `moto_server`, default: from `PATH`),
//! `WALCORE_TEST_SKIP_S3=1` (skip S3 tests, loudly).

pub mod bins;
pub mod cluster;
pub mod http;
pub mod moto;
pub mod proxy;
pub mod repo;
pub mod sys;
pub mod workload;

pub use cluster::{BaseBackup, Cluster, Recovery};
pub use moto::Moto;
pub use proxy::{Fault, FaultProxy};
pub use repo::{Codec, Repo};
