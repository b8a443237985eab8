//! `walcore drill`: the clap arguments and the handler. Glue only: the drill is in
//! `walcore::backup::drill`.

use std::path::PathBuf;
use std::time::Duration;

use walcore::backup::drill::{self, DEFAULT_QUERY, DrillOptions};
use walcore::backup::{ArchiveMode, Request, TargetAction};
use walcore::config::parse_duration;
use walcore::exit::Hook;
use walcore::{Error, ErrorKind};

use crate::commands::{Global, TargetArgs, flags, print_report, restore_command_of};

/// The flags of `walcore drill`.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Where PostgreSQL's programs (postgres, psql) are; default: the first of PATH,
    /// `pg_config --bindir`, /usr/lib/postgresql/MAJOR/bin and /usr/pgsql-MAJOR/bin that has
    /// the backup's major version.
    #[arg(long, value_name = "DIR")]
    pg_bin: Option<PathBuf>,
    /// The directory to restore into (a new directory is made in it and removed afterwards);
    /// it needs room for the backup's files. Default: TMPDIR or /tmp.
    #[arg(long, value_name = "DIR")]
    scratch_dir: Option<PathBuf>,
    /// The query to run once the server promoted.
    #[arg(long, default_value = DEFAULT_QUERY)]
    query: String,
    /// The database to run it in.
    #[arg(long, default_value = "postgres")]
    database: String,
    /// The role to connect as; default: the name of the user the server runs as.
    #[arg(long)]
    user: Option<String>,
    /// A setting for the drill's server, e.g. shared_buffers=256MB when the production value
    /// does not fit beside it; repeatable.
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_setting)]
    settings: Vec<(String, String)>,
    /// How long the whole drill may take.
    #[arg(long, default_value = "4h", value_parser = parse_duration)]
    timeout: Duration,
    /// Keep the scratch directory (the stopped server's files and its log) for inspection.
    #[arg(long)]
    keep: bool,
    /// The walcore-restore program the restore_command runs (default: the one beside this
    /// program).
    #[arg(long)]
    restore_program: Option<PathBuf>,
    /// Run the server as USER[:GROUP] (root only). Default when run as root: the postgres user.
    #[arg(long, value_name = "USER[:GROUP]")]
    owner: Option<String>,
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not NAME=VALUE"))?;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    {
        return Err(format!("'{name}' is not a setting name"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

/// Runs a restore drill (`walcore drill`): prints the report (text, or JSON with `--json`),
/// stores it in the repository, and fails (and alerts, as condition `drill`) when the drill
/// failed.
pub fn run(global: Global, args: DrillArgs) -> u8 {
    let (flags, json) = flags(global);
    walcore::ops::run_alerting(
        Hook::Backup,
        Some("drill"),
        flags,
        json,
        |repo, config| async move {
            let scratch_parent = match args.scratch_dir {
                Some(d) => std::path::absolute(&d).map_err(|e| {
                    Error::new(
                        ErrorKind::InvalidInput,
                        format!("--scratch-dir {}: {e}", d.display()),
                    )
                })?,
                None => std::env::temp_dir(),
            };
            let owner = walcore::owner::restore_owner(
                args.owner.as_deref(),
                &scratch_parent.join("walcore-drill"),
            )?;
            let options = DrillOptions {
                scratch_parent,
                request: Request {
                    target: args.target.target()?,
                    exclusive: args.target.target_exclusive,
                    action: TargetAction::Promote,
                    timeline: args.target.target_timeline,
                    backup: args.target.backup,
                    archive_mode: ArchiveMode::Off,
                    allow_unreached: false,
                    restore_command: restore_command_of(&config, None, args.restore_program)?,
                },
                pg_bin: args.pg_bin,
                query: args.query,
                database: args.database,
                user: args.user,
                settings: args.settings,
                timeout: args.timeout,
                keep: args.keep,
                owner,
            };
            let report = drill::drill(&repo, &options).await;
            let saved = drill::save(&repo, &report).await;
            print_report(json, &report)?;
            if let Err(e) = &saved {
                tracing::error!("the drill's report could not be stored in the repository: {e:#}");
            }
            report.outcome()?;
            saved.map(|_| ())
        },
    )
}
