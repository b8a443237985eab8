//! `walcore-archive %p`: PostgreSQL's `archive_command`. Glue only: parse arguments, then
//! `walcore::ops::run_hook` loads the configuration, archives, and picks the exit status
//! (`docs/exit-codes.md`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use walcore::config::Layer;
use walcore::exit::{self, Hook};

/// Archive one WAL file into the walcore repository (archive_command = 'walcore-archive %p').
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Repository URL (overrides WALCORE_REPO): file:///path, s3://bucket/prefix, gs://…, az://…
    #[arg(long)]
    repo: Option<String>,
    /// Compression (overrides WALCORE_COMPRESSION): none, zstd or zstd:N.
    #[arg(long)]
    compression: Option<String>,
    /// Log as JSON lines on stderr.
    #[arg(long)]
    json: bool,
    /// The WAL file to archive: PostgreSQL's %p.
    path: PathBuf,
}

fn main() -> ExitCode {
    exit::install_panic_exit(Hook::Archive);
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(exit::usage(Hook::Archive))
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let mut flags = Layer::default();
    flags.set_flag("repo", "--repo", args.repo);
    flags.set_flag("compression", "--compression", args.compression);
    let path = args.path;
    ExitCode::from(walcore::ops::run_hook(
        Hook::Archive,
        flags,
        args.json,
        |repo| async move { walcore::ops::archive::archive_file(&repo, &path).await },
    ))
}
