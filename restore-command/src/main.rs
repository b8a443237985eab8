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
use walcore::pg::WalFileName;

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
    /// Recovery needs no WAL past this segment (a restore to a backup's consistent point): a
    /// later segment that is not stored is reported absent, never as a hole in the archive.
    #[arg(long, value_name = "SEGMENT")]
    last_needed: Option<String>,
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
        // A worker's outcome is not the hook's: PostgreSQL's own call answers for its
        // file, and alerts on it.
        return ExitCode::from(walcore::ops::run_alerting(
            Hook::Restore,
            None,
            flags,
            args.json,
            |repo, config| async move { prefetch::run_worker(&repo, &config, &data_dir).await },
        ));
    }
    let (Some(name), Some(dest)) = (args.name, args.dest) else {
        return ExitCode::from(exit::usage(Hook::Restore));
    };
    let beyond = match args.last_needed.as_deref().map(past_last_needed) {
        None => false,
        Some(Ok(test)) => test(&name),
        Some(Err(why)) => {
            eprintln!("--last-needed: {why}");
            return ExitCode::from(exit::usage(Hook::Restore));
        }
    };
    if beyond {
        // Read ahead past the consistent point: served if stored, absent if not.
        return ExitCode::from(walcore::ops::run_hook(
            Hook::Restore,
            flags,
            args.json,
            |repo, _| async move {
                walcore::ops::restore::restore_file_with(
                    &repo,
                    &name,
                    &dest,
                    walcore::ops::restore::Durability::Durable,
                )
                .await
            },
        ));
    }
    ExitCode::from(walcore::ops::run_hook(
        Hook::Restore,
        flags,
        args.json,
        |repo, config| async move {
            prefetch::restore_with_prefetch(&repo, &config, &name, &dest, Some(&passed)).await
        },
    ))
}

/// For `--last-needed SEGMENT`: a test of whether a requested file is a segment after it (of
/// any timeline), or why SEGMENT is not a segment name.
fn past_last_needed(last: &str) -> Result<impl Fn(&str) -> bool, String> {
    let segno = |name: &str| {
        let n = WalFileName::parse(name)
            .ok()
            .filter(WalFileName::is_segment)?;
        // The position part of a segment name (log and segment numbers) orders segments
        // whatever the segment size.
        Some(n.to_string()[8..].to_owned())
    };
    let last = segno(last).ok_or_else(|| format!("{last:?} is not a WAL segment name"))?;
    Ok(move |name: &str| segno(name).is_some_and(|s| s > last))
}
