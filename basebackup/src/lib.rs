//! The command-line programs on a walcore repository's backups: `walcore` (the operator command)
//! and `walcore-basebackup` (the pg_basebackup-style entry point). Both run the same clap
//! definitions and handlers, in [`commands`].

pub mod check;
pub mod commands;
pub mod drill;
pub mod serve;
