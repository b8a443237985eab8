//! `walcore-archive %p`: PostgreSQL's `archive_command`. Glue only: parse arguments, load the
//! configuration, call `walcore::ops::archive`, map the outcome to an exit status
//! (`docs/exit-codes.md`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use walcore::config::{Config, Layer};
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
    let config = match Config::load(flags) {
        Ok(c) => c,
        Err(e) => {
            walcore::ops::init_logging("info", args.json);
            tracing::error!("{e:#}");
            return ExitCode::from(exit::code(Hook::Archive, e.kind()));
        }
    };
    walcore::ops::init_logging(&config.log, args.json);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .map_err(|e| walcore::Error::new(walcore::ErrorKind::Internal, e.to_string()))
        .and_then(|rt| {
            rt.block_on(async {
                let repo = walcore::repo::Repository::open(&config)?;
                walcore::ops::archive::archive_file(&repo, &args.path).await
            })
        });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(exit::code(Hook::Archive, e.kind()))
        }
    }
}
