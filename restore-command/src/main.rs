//! `walcore-restore %f %p`: PostgreSQL's `restore_command`. Glue only. Exit 1 means "certainly
//! absent"; every other failure exits above 125 so PostgreSQL stops recovery instead of ending
//! it (`docs/exit-codes.md`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use walcore::config::Layer;
use walcore::exit::{self, Hook};
use walcore::ops::prefetch;

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
    /// Run as the detached prefetch worker of this data directory (started by the command
    /// itself).
    #[arg(long, hide = true, value_name = "DATA_DIR", conflicts_with_all = ["name", "dest"])]
    prefetch_worker: Option<PathBuf>,
    /// The WAL file PostgreSQL asks for: %f.
    #[arg(required_unless_present = "prefetch_worker")]
    name: Option<String>,
    /// Where to write it: %p.
    #[arg(required_unless_present = "prefetch_worker")]
    dest: Option<PathBuf>,
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
    // The worker is started with the same flags.
    let mut passed: Vec<OsString> = Vec::new();
    if let Some(repo) = &args.repo {
        passed.extend(["--repo".into(), repo.into()]);
    }
    if args.json {
        passed.push("--json".into());
    }
    let mut flags = Layer::default();
    flags.set_flag("repo", "--repo", args.repo);
    if let Some(data_dir) = args.prefetch_worker {
        return ExitCode::from(walcore::ops::run_hook(
            Hook::Restore,
            flags,
            args.json,
            |repo, config| async move { prefetch::run_worker(&repo, &config, &data_dir).await },
        ));
    }
    let (Some(name), Some(dest)) = (args.name, args.dest) else {
        return ExitCode::from(exit::usage(Hook::Restore));
    };
    ExitCode::from(walcore::ops::run_hook(
        Hook::Restore,
        flags,
        args.json,
        |repo, config| async move {
            prefetch::restore_with_prefetch(&repo, &config, &name, &dest, Some(&passed)).await
        },
    ))
}
