//! `walcore-archive %p`: PostgreSQL's `archive_command`. Glue only: parse arguments, then
//! `walcore::ops::run_hook` loads the configuration, archives, and picks the exit status
//! (`docs/exit-codes.md`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use walcore::config::Layer;
use walcore::exit::{self, Hook};
use walcore::ops::lookahead;

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
    /// Run as the detached look-ahead worker of this WAL directory (started by the command
    /// itself).
    #[arg(long, hide = true, value_name = "WAL_DIR", conflicts_with = "path")]
    lookahead_worker: Option<PathBuf>,
    /// The WAL file to archive: PostgreSQL's %p.
    #[arg(required_unless_present = "lookahead_worker")]
    path: Option<PathBuf>,
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
    // The worker is started with the same flags.
    let mut passed: Vec<OsString> = Vec::new();
    if let Some(repo) = &args.repo {
        passed.extend(["--repo".into(), repo.into()]);
    }
    if let Some(c) = &args.compression {
        passed.extend(["--compression".into(), c.into()]);
    }
    if args.json {
        passed.push("--json".into());
    }
    let mut flags = Layer::default();
    flags.set_flag("repo", "--repo", args.repo);
    flags.set_flag("compression", "--compression", args.compression);
    if let Some(wal_dir) = args.lookahead_worker {
        // A worker's outcome is not the hook's: PostgreSQL's own call answers for its
        // file, and alerts on it.
        return ExitCode::from(walcore::ops::run_alerting(
            Hook::Archive,
            None,
            flags,
            args.json,
            |repo, config| async move { lookahead::run_worker(&repo, &config, &wal_dir).await },
        ));
    }
    let Some(path) = args.path else {
        return ExitCode::from(exit::usage(Hook::Archive));
    };
    ExitCode::from(walcore::ops::run_hook(
        Hook::Archive,
        flags,
        args.json,
        |repo, config| async move {
            lookahead::archive_with_lookahead(&repo, &config, &path, Some(&passed)).await
        },
    ))
}
