//! `walcore check`: the clap arguments and the handler. Glue only: the checks are in
//! `walcore::watch::check`.

use std::path::PathBuf;
use std::time::Duration;

use walcore::config::parse_duration;
use walcore::exit::Hook;
use walcore::watch::check::{self, CheckOptions, DEFAULT_ARCHIVE_PROGRAM};
use walcore::{Error, ErrorKind};

use crate::commands::{Global, flags};

/// The flags of `walcore check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Connection string or URL (libpq style) of the server to check; PGHOST, PGPORT, PGUSER,
    /// PGPASSWORD, PGDATABASE and ~/.pgpass fill in the rest. The check connects for physical
    /// replication, as take does, and once more to the database (default: the user's name)
    /// for SQL (replication=database): to switch WAL and read pg_stat_archiver.
    #[arg(short = 'd', long, default_value = "")]
    dbname: String,
    /// Time limit of the whole check, connections and the wait for the switched segment
    /// included (e.g. 60s, 2m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
}

/// Checks the setup (`walcore check`): prints one line per check, or the report as JSON with
/// `--json`; returns 0 when no check failed, else the exit status of the first failure.
pub fn run(global: Global, args: CheckArgs) -> u8 {
    let (flags, json) = flags(global);
    let options = CheckOptions {
        conninfo: args.dbname,
        timeout: args.timeout,
        archive_program: archive_program(),
    };
    walcore::ops::run_hook(Hook::Backup, flags, json, |repo, config| async move {
        let report = check::check(&repo, &config, &options).await;
        if json {
            let text = serde_json::to_string_pretty(&report)
                .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
            println!("{text}");
        } else {
            print!("{report}");
        }
        report.outcome()
    })
}

/// The `walcore-archive` beside this program, to name in a suggested archive_command; the
/// usual install location when there is none.
fn archive_program() -> String {
    std::env::current_exe()
        .ok()
        .map(|me| me.with_file_name("walcore-archive"))
        .filter(|p: &PathBuf| p.is_file())
        .map_or_else(
            || DEFAULT_ARCHIVE_PROGRAM.to_owned(),
            |p| p.display().to_string(),
        )
}
