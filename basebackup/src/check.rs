//! `walcore check`: the clap arguments and the handler. Glue only: the checks are in
//! `walcore::watch::check`.

use std::path::PathBuf;
use std::time::Duration;

use walcore::config::parse_duration;
use walcore::exit::Hook;
use walcore::watch::check::{self, CheckOptions, DEFAULT_ARCHIVE_PROGRAM};
use walcore::{Error, ErrorKind};

use crate::commands::{Global, flags, print_report};
use crate::serve::{ServerArgs, add_server};

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
    /// Instead of checking the setup, judge what runs, for a timer (every minute): the
    /// repository's status and the server's side (files waiting for archive_command, the
    /// stream's slot), sending alerts (WALCORE_ALERT_*) for what fails and "resolved" for what
    /// recovered. Switches no WAL; the role needs REPLICATION and pg_monitor.
    #[arg(long)]
    alert: bool,
    /// The stream's replication slot (--alert).
    #[arg(long, default_value = walcore::watch::server::DEFAULT_SLOT)]
    slot: String,
}

/// Checks the setup (`walcore check`): prints one line per check, or the report as JSON with
/// `--json`; returns 0 when no check failed, else the exit status of the first failure.
pub fn run(global: Global, args: CheckArgs) -> u8 {
    if args.alert {
        return alert(global, args);
    }
    let (flags, json) = flags(global);
    let options = CheckOptions {
        conninfo: args.dbname,
        timeout: args.timeout,
        archive_program: archive_program(),
    };
    walcore::ops::run_hook(Hook::Backup, flags, json, |repo, config| async move {
        let report = check::check(&repo, &config, &options).await;
        print_report(json, &report)?;
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

/// `walcore check --alert`: the status and the server's side read once, judged for alerts
/// as `walcore serve` judges them, and printed. Fails when either could not be read.
fn alert(global: Global, args: CheckArgs) -> u8 {
    let (flags, json) = flags(global);
    let server = ServerArgs {
        dbname: Some(args.dbname),
        slot: args.slot,
    };
    walcore::ops::run_hook(Hook::Backup, flags, json, |repo, config| async move {
        let status = walcore::lifecycle::status::status(&repo).await;
        let mut shown = status.as_ref().ok().cloned();
        let watch = add_server(shown.as_mut(), server.options().as_ref())
            .await
            .unwrap_or_else(|| Err(Error::new(ErrorKind::Internal, "no server to read")));
        let (judge, url) = (config.alerts.clone(), repo.store().describe());
        let (status, watch) = tokio::task::spawn_blocking(move || {
            walcore::alert::evaluate_status(&judge, &url, status.as_ref());
            walcore::alert::evaluate_server(&judge, &url, watch.as_ref());
            (status, watch)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("judging for alerts: {e}")))?;
        if let Some(report) = &mut shown {
            walcore::alert::fill_host_state(report, &config.alerts);
            print_report(json, report)?;
        }
        status?;
        watch.map(|_| ())
    })
}
