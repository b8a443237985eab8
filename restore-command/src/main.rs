//! `walcore-restore %f %p`: PostgreSQL's `restore_command`. Glue only. Exit 1 means "certainly
//! absent"; every other failure exits above 125 so PostgreSQL stops recovery instead of ending
//! it (`docs/exit-codes.md`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use walcore::config::Layer;
use walcore::exit::{self, Hook};

/// Restore one WAL file from the walcore repository (restore_command = 'walcore-restore %f %p').
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Repository URL (overrides WALCORE_REPO).
    #[arg(long)]
    repo: Option<String>,
    /// Log as JSON lines on stderr.
    #[arg(long)]
    json: bool,
    /// The WAL file PostgreSQL asks for: %f.
    name: String,
    /// Where to write it: %p.
    dest: PathBuf,
}

fn main() -> ExitCode {
    // A bug must not exit 101, which PostgreSQL would read as "absent".
    exit::install_panic_exit(Hook::Restore);
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            // Usage errors exit above 125 too: a mistyped restore_command must stop recovery.
            return if e.use_stderr() {
                ExitCode::from(exit::usage(Hook::Restore))
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let mut flags = Layer::default();
    flags.set_flag("repo", "--repo", args.repo);
    let (name, dest) = (args.name, args.dest);
    ExitCode::from(walcore::ops::run_hook(
        Hook::Restore,
        flags,
        args.json,
        |repo| async move { walcore::ops::restore::restore_file(&repo, &name, &dest).await },
    ))
}
