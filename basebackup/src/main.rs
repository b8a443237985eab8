//! `walcore-basebackup`: base backups over the replication protocol into the walcore repository,
//! the backup catalog, and restores to a point in time; the pg_basebackup-style entry point.
//! The commands are those of `walcore` (`basebackup::commands`).

use std::process::ExitCode;

use basebackup::commands::{self, Command, Global};
use clap::Parser;

/// Base backups into the walcore repository, and point-in-time restores from them.
#[derive(Debug, Parser)]
#[command(name = "walcore-basebackup", version, about)]
struct Args {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

fn main() -> ExitCode {
    commands::main(|args: Args| commands::run(args.global, args.command))
}
