//! End-to-end tests of walcore: real PostgreSQL 15 clusters, the real `walcore-archive` and
//! `walcore-restore` as `archive_command` and `restore_command`, a `file://` repository and an
//! S3 one (moto on loopback).
//!
//! Build the binaries first (`cargo build --workspace --bins`), then `cargo test -p walcore-e2e`.
//! One test binary: the cluster template is initialised once for all tests.

mod alerts;
mod archive_matrix;
mod backup;
mod backup_failures;
mod check;
mod config_file;
mod deploy;
mod downloads;
mod drill;
mod expire_safety;
mod faults;
mod holes;
mod key_hygiene;
mod metrics;
mod operator;
mod pitr;
mod replication;
mod restore_plans;
mod restore_safety;
mod retention;
mod scenario;
mod selftest;
mod status;
mod store_conformance;
mod stream;
mod stream_rpo;
mod throughput;
mod tls;
mod verify;
