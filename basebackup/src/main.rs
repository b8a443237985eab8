//! `walcore-basebackup`: base backups over the replication protocol. Not built yet: until it
//! is, it says so and fails, rather than pretending.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "walcore-basebackup: base backups are not implemented yet; take one with pg_basebackup (see README.md)"
    );
    ExitCode::from(2)
}
