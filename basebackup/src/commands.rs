//! The repository commands of `walcore` and `walcore-basebackup`: base backups over the
//! replication protocol into the walcore repository, the backup catalog, restores to a point in
//! time, and pins. One set of clap definitions and handlers for both programs; glue only: the
//! work is in `walcore::backup`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use walcore::backup::pins::{self, PinState};
use walcore::backup::{
    self, ArchiveMode, BackupRecord, Request, RestoreOptions, TakeOptions, Target, TargetAction,
    TargetTimeline, catalog, progress::human,
};
use walcore::config::{Layer, parse_duration};
use walcore::exit::{self, Hook};
use walcore::lifecycle::{self, expire::ExpireOptions};
use walcore::replication::Checkpoint;
use walcore::{Error, ErrorKind};

/// The flags every command takes.
#[derive(Debug, clap::Args)]
pub struct Global {
    /// Repository URL (overrides WALCORE_REPO).
    #[arg(long, global = true)]
    repo: Option<String>,
    /// Compression of stored objects, e.g. zstd:3, zstd:1, none (overrides WALCORE_COMPRESSION).
    #[arg(long, global = true)]
    compression: Option<String>,
    /// Log as JSON lines on stderr; `list` and `show` print JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
}

/// The commands on a repository's backups, shared by `walcore` and `walcore-basebackup`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Take a base backup over the replication protocol; prints the new backup's ID.
    Take {
        /// Connection string or URL (libpq style); PGHOST, PGPORT, PGUSER, PGPASSWORD,
        /// PGPASSFILE and ~/.pgpass fill in the rest.
        #[arg(short = 'd', long, default_value = "")]
        dbname: String,
        /// Backup label.
        #[arg(short, long)]
        label: Option<String>,
        /// fast: checkpoint at once (I/O burst); spread: paced like a regular checkpoint.
        #[arg(short, long, default_value = "fast", value_parser = parse_checkpoint)]
        checkpoint: Checkpoint,
        /// Store the WAL the backup needs inside it (a self-contained backup) instead of
        /// waiting for archive_command to archive it.
        #[arg(long)]
        include_wal: bool,
        /// How long to wait for the backup's WAL to be archived.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        wal_timeout: Duration,
        /// Limit the server's transfer rate, in kB/s (32 to 1048576).
        #[arg(long)]
        max_rate: Option<u32>,
        /// Do not verify data page checksums on the server while reading.
        #[arg(long)]
        no_verify_checksums: bool,
        /// Draw no progress line, even on a terminal.
        #[arg(long)]
        no_progress: bool,
        /// After the backup is recorded, apply the configured retention policy
        /// (WALCORE_KEEP_*, WALCORE_PITR_WINDOW or the keep_* keys of the configuration
        /// file), as `walcore expire` does.
        #[arg(long)]
        expire: bool,
    },
    /// List the complete backups, oldest first.
    List,
    /// Show one backup's catalog record.
    Show {
        /// The backup ID (see list).
        id: String,
    },
    /// Restore a backup into an empty directory, with the settings that recover it to a
    /// target when PostgreSQL starts.
    Restore {
        /// The new data directory (absent or empty).
        #[arg(short = 'D', long)]
        pgdata: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        /// What to do at the target.
        #[arg(long, default_value = "promote")]
        target_action: TargetAction,
        /// preserve: keep the backup's archive_mode, for the server that replaces the one backed
        /// up (it goes on archiving, on a new timeline, into the same repository). off: write
        /// archive_mode = off, for a clone, a drill or a staging copy, which must never push
        /// its own timeline into the production repository.
        #[arg(long, default_value = "preserve", value_name = "off|preserve")]
        archive_mode: ArchiveMode,
        /// Print the plan (backup and why, timeline, WAL range, target, settings) and write
        /// nothing.
        #[arg(long)]
        dry_run: bool,
        /// Restore even when the archive does not reach the target yet (PostgreSQL will then
        /// stop at the end of the archive with "recovery ended before configured recovery
        /// target was reached" unless more WAL is archived meanwhile).
        #[arg(long)]
        allow_unreached_target: bool,
        /// Put the tablespace at OLD (its location in the backup) at NEW; repeatable.
        #[arg(long, value_name = "OLD=NEW", value_parser = parse_mapping)]
        tablespace_map: Vec<(String, PathBuf)>,
        /// The walcore-restore program the restore_command runs (default: the one beside
        /// this program).
        #[arg(long)]
        restore_program: Option<PathBuf>,
        /// Write this restore_command verbatim instead.
        #[arg(long, conflicts_with = "restore_program")]
        restore_command: Option<String>,
        /// Give the restored files to USER[:GROUP], the user PostgreSQL runs as (root only).
        /// Default when run as root: the owner of the data directory or of its parent when
        /// not root, else the `postgres` user.
        #[arg(long, value_name = "USER[:GROUP]")]
        owner: Option<String>,
    },
}

/// Which backup and how far to recover it: the target flags `restore` and `drill` share.
#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// Recover up to this time (with a zone: '2026-11-30 04:30:12+00').
    #[arg(long, group = "target")]
    pub target_time: Option<String>,
    /// Recover up to this LSN.
    #[arg(long, group = "target")]
    pub target_lsn: Option<String>,
    /// Recover up to this transaction.
    #[arg(long, group = "target")]
    pub target_xid: Option<String>,
    /// Recover up to this restore point (pg_create_restore_point).
    #[arg(long, group = "target")]
    pub target_name: Option<String>,
    /// Stop as soon as the backup is consistent.
    #[arg(long, group = "target")]
    pub target_immediate: bool,
    /// Stop just before the target (time, LSN or transaction) instead of just after it.
    #[arg(long)]
    pub target_exclusive: bool,
    /// The timeline to recover along: latest (the newest in the repository), current (the
    /// backup's), or a timeline ID. The backup is chosen on that timeline's history.
    #[arg(long, default_value = "latest")]
    pub target_timeline: TargetTimeline,
    /// Restore this backup rather than the newest one that reaches the target.
    #[arg(long)]
    pub backup: Option<String>,
}

impl TargetArgs {
    /// The target these flags name (the end of the archive when none does).
    pub fn target(&self) -> Result<Target, Error> {
        Ok(if let Some(t) = &self.target_time {
            Target::parse_time(t)?
        } else if let Some(l) = &self.target_lsn {
            Target::parse_lsn(l)?
        } else if let Some(x) = &self.target_xid {
            Target::parse_xid(x)?
        } else if let Some(n) = &self.target_name {
            Target::Name(n.clone())
        } else if self.target_immediate {
            Target::Immediate
        } else {
            Target::End
        })
    }
}

/// The `restore_command` to write: `given` verbatim, else one that runs `program` (default:
/// the `walcore-restore` beside this program) with the repository settings of `config`.
pub(crate) fn restore_command_of(
    config: &walcore::config::Config,
    given: Option<String>,
    program: Option<PathBuf>,
) -> Result<String, Error> {
    if let Some(c) = given {
        return Ok(c);
    }
    let program = match program {
        Some(p) => p,
        None => default_restore_program()?,
    };
    let (command, note) = backup::restore_command_for(config, &program);
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    Ok(command)
}

fn parse_checkpoint(s: &str) -> Result<Checkpoint, String> {
    match s {
        "fast" => Ok(Checkpoint::Fast),
        "spread" => Ok(Checkpoint::Spread),
        _ => Err(format!("'{s}' is not fast or spread")),
    }
}

fn parse_mapping(s: &str) -> Result<(String, PathBuf), String> {
    let (old, new) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not OLD=NEW"))?;
    if !old.starts_with('/') || !new.starts_with('/') {
        return Err(format!("'{s}': both locations must be absolute"));
    }
    Ok((old.to_owned(), PathBuf::from(new)))
}

/// Parses the command line into `A` and runs it with `run`; a usage error exits with the
/// table's usage code for `Hook::Backup`, `--help` and `--version` with success.
pub fn main<A: Parser>(run: impl FnOnce(A) -> u8) -> ExitCode {
    exit::install_panic_exit(Hook::Backup);
    match A::try_parse() {
        Ok(args) => ExitCode::from(run(args)),
        Err(e) => {
            let _ = e.print();
            if e.use_stderr() {
                ExitCode::from(exit::usage(Hook::Backup))
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

pub(crate) fn flags(global: Global) -> (Layer, bool) {
    let mut flags = Layer::default();
    flags.set_flag("repo", "--repo", global.repo);
    flags.set_flag("compression", "--compression", global.compression);
    (flags, global.json)
}

/// Runs one repository command; returns the exit code.
pub fn run(global: Global, command: Command) -> u8 {
    let (flags, json) = flags(global);
    match command {
        Command::Take {
            dbname,
            label,
            checkpoint,
            include_wal,
            wal_timeout,
            max_rate,
            no_verify_checksums,
            no_progress,
            expire,
        } => {
            let options = TakeOptions {
                conninfo: dbname,
                label,
                checkpoint,
                include_wal,
                wal_timeout,
                max_rate_kb: max_rate,
                verify_checksums: !no_verify_checksums,
                progress_bar: !no_progress && !json && std::io::stderr().is_terminal(),
            };
            walcore::ops::run_alerting(
                Hook::Backup,
                Some("take"),
                flags,
                json,
                |repo, config| async move {
                    if expire && !config.retention.has_rule() {
                        return Err(Error::new(
                            ErrorKind::Configuration,
                            "take --expire: no retention policy is configured (WALCORE_KEEP_LAST, \
                         WALCORE_KEEP_DAILY, ... or keep_last, keep_daily, ... in the \
                         configuration file); nothing was backed up",
                        ));
                    }
                    let record = backup::take::take(&repo, &options).await?;
                    if json && !expire {
                        print_json(&record)?;
                    } else if !json {
                        println!("{}", record.id);
                    }
                    if expire {
                        let options = ExpireOptions::from_config(&config, false);
                        let report =
                            lifecycle::expire::expire(&repo, &options)
                                .await
                                .map_err(|e| {
                                    e.context(format!(
                                        "backup {} is recorded, but the retention policy could not \
                                 be applied after it",
                                        record.id
                                    ))
                                })?;
                        if json {
                            print_json(&serde_json::json!({ "backup": record, "expire": report }))?;
                        } else {
                            print!("{report}");
                        }
                    }
                    Ok(())
                },
            )
        }
        Command::List => walcore::ops::run_hook(Hook::Backup, flags, json, |repo, _| async move {
            let records = catalog::list(&repo).await?;
            let pins = pins::states(&repo).await?;
            let listed: Vec<Listed> = records
                .iter()
                .map(|record| Listed {
                    record,
                    pin: pins.get(&record.id).cloned().unwrap_or_default(),
                })
                .collect();
            if json {
                print_json(&listed)
            } else {
                print_table(&listed);
                Ok(())
            }
        }),
        Command::Show { id } => {
            walcore::ops::run_hook(Hook::Backup, flags, json, |repo, _| async move {
                let record = catalog::load(&repo, &id).await?;
                let pin = pins::state(&repo, &id).await?;
                let listed = Listed {
                    record: &record,
                    pin,
                };
                if json {
                    print_json(&listed)
                } else {
                    print_record(&listed);
                    Ok(())
                }
            })
        }
        Command::Restore {
            pgdata,
            target: which,
            target_action,
            archive_mode,
            dry_run,
            allow_unreached_target,
            tablespace_map,
            restore_program,
            restore_command,
            owner,
        } => walcore::ops::run_hook(Hook::Backup, flags, json, |repo, config| async move {
            let target = which.target()?;
            let restore_command = restore_command_of(&config, restore_command, restore_program)?;
            let pgdata = std::path::absolute(&pgdata).map_err(|e| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("--pgdata {}: {e}", pgdata.display()),
                )
            })?;
            let owner = walcore::owner::restore_owner(owner.as_deref(), &pgdata)?;
            let options = RestoreOptions {
                pgdata,
                request: Request {
                    target,
                    exclusive: which.target_exclusive,
                    action: target_action,
                    timeline: which.target_timeline,
                    backup: which.backup,
                    archive_mode,
                    allow_unreached: allow_unreached_target,
                    restore_command,
                },
                tablespace_map,
                dry_run,
                owner,
            };
            let report = backup::restore::restore(&repo, &options).await?;
            let plan = &report.plan;
            if json {
                let mut value = serde_json::to_value(plan.summary())
                    .map_err(|e| Error::new(ErrorKind::Internal, format!("encoding JSON: {e}")))?;
                value["dry_run"] = dry_run.into();
                value["pgdata"] = serde_json::json!(options.pgdata);
                value["archiving"] = report.archiving.clone().into();
                value["owner"] = serde_json::json!(
                    options
                        .owner
                        .map(|o| serde_json::json!({"uid": o.uid, "gid": o.gid}))
                );
                if !dry_run {
                    value["files"] = report.files.into();
                    value["bytes"] = report.bytes.into();
                    value["removed_settings"] = serde_json::json!(report.removed_settings);
                    value["leftovers"] = serde_json::json!(report.leftovers);
                }
                print_json(&value)?;
            } else if dry_run {
                println!(
                    "plan for a restore into {} (nothing written):",
                    options.pgdata.display()
                );
                print!("{plan}");
                println!("archiving: {}", report.archiving);
            } else {
                println!(
                    "restored backup {} ({}) into {}",
                    plan.backup.id,
                    plan.reason,
                    options.pgdata.display()
                );
                if !report.removed_settings.is_empty() {
                    println!(
                        "removed from the backup's postgresql.auto.conf: {}",
                        report.removed_settings.join(", ")
                    );
                }
                for leftover in &report.leftovers {
                    println!("{leftover}");
                }
                for note in &plan.notes {
                    println!("note: {note}");
                }
                println!("archiving: {}", report.archiving);
                if let Some(o) = options.owner {
                    println!("the restored files belong to {o}: start PostgreSQL as that user");
                }
                println!(
                    "start it with: pg_ctl -D {} start",
                    options.pgdata.display()
                );
            }
            Ok(())
        }),
    }
}

/// The flags of `walcore expire`: the retention policy (each overrides its `WALCORE_*`
/// variable and configuration key) and how to run it.
#[derive(Debug, clap::Args)]
pub struct ExpireArgs {
    /// Keep the N newest complete backups.
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep every backup that finished within DURATION before now (e.g. 14d, 36h).
    #[arg(long, value_name = "DURATION")]
    keep_within: Option<String>,
    /// For the N most recent days that have a backup, keep the newest backup of each (UTC).
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// The same for ISO weeks.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// The same for calendar months.
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// The same for calendar years.
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
    /// Keep every second of DURATION before now restorable (WAL from the newest backup that
    /// finished before it).
    #[arg(long, value_name = "DURATION")]
    pitr_window: Option<String>,
    /// Sweep the objects of a take that has no catalog record only once it has written
    /// nothing for DURATION (default 1h, at least 15s); a running take writes every 5s.
    #[arg(long, value_name = "DURATION")]
    orphan_grace: Option<String>,
    /// Print the plan (what goes and why, what stays, the window that remains) and delete
    /// nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Applies the retention policy (`walcore expire`); returns the exit code.
pub fn expire(global: Global, args: ExpireArgs) -> u8 {
    let (mut flags, json) = flags(global);
    let text = |n: Option<u32>| n.map(|n| n.to_string());
    flags.set_flag("keep_last", "--keep-last", text(args.keep_last));
    flags.set_flag("keep_within", "--keep-within", args.keep_within);
    flags.set_flag("keep_daily", "--keep-daily", text(args.keep_daily));
    flags.set_flag("keep_weekly", "--keep-weekly", text(args.keep_weekly));
    flags.set_flag("keep_monthly", "--keep-monthly", text(args.keep_monthly));
    flags.set_flag("keep_yearly", "--keep-yearly", text(args.keep_yearly));
    flags.set_flag("pitr_window", "--pitr-window", args.pitr_window);
    flags.set_flag("orphan_grace", "--orphan-grace", args.orphan_grace);
    let dry_run = args.dry_run;
    walcore::ops::run_alerting(
        Hook::Backup,
        Some("expire"),
        flags,
        json,
        |repo, config| async move {
            let options = ExpireOptions::from_config(&config, dry_run);
            let report = lifecycle::expire::expire(&repo, &options).await?;
            print_report(json, &report)
        },
    )
}

/// The flags of `walcore verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Verify only this backup: its objects, its record and the WAL from its start to its stop.
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
    /// Read every object again, also those an earlier run verified.
    #[arg(long)]
    full: bool,
    /// Take the WAL from the repository index instead of listing every object: a few
    /// requests instead of one per thousand segments, but a segment deleted or rewritten
    /// behind walcore's back in an older WAL directory goes unseen. Run a plain verify too,
    /// less often (weekly, say).
    #[arg(long, conflicts_with = "full")]
    index: bool,
    /// Draw no progress line, even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

/// The exit status of a verify run whose only findings are objects nothing refers to. One that
/// found what costs a restore (an object missing, corrupt, of another key or cluster, a gap)
/// fails as an integrity error: exit 5, and an alert.
const VERIFY_UNREFERENCED: u8 = 1;

/// Verifies the repository (`walcore verify`); returns the exit code.
pub fn verify(global: Global, args: VerifyArgs) -> u8 {
    let (flags, json) = flags(global);
    let found = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(0));
    let status = found.clone();
    let options = lifecycle::verify::VerifyOptions {
        full: args.full,
        index: args.index,
        backup: args.backup,
        progress: !args.no_progress && !json && std::io::stderr().is_terminal(),
    };
    let code = walcore::ops::run_alerting(
        Hook::Backup,
        Some("verify"),
        flags,
        json,
        |repo, _| async move {
            let report = lifecycle::verify::verify(&repo, &options).await?;
            print_report(json, &report)?;
            if report.has_damage() {
                // An error, so that it alerts (condition verify); Integrity exits 5.
                let damage = report
                    .problems
                    .iter()
                    .filter(|p| p.kind.is_damage())
                    .count();
                return Err(Error::new(
                    ErrorKind::Integrity,
                    format!(
                        "walcore verify found {damage} problem(s) that cost a restore (the \
                         report above names them)"
                    ),
                ));
            }
            let code = if report.problems.is_empty() {
                0
            } else {
                VERIFY_UNREFERENCED
            };
            status.store(code, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        },
    );
    if code == 0 {
        found.load(std::sync::atomic::Ordering::SeqCst)
    } else {
        code
    }
}

/// The flags of `walcore stream`.
#[derive(Debug, clap::Args)]
pub struct StreamArgs {
    /// Connection string or URL (libpq style); PGHOST, PGPORT, PGUSER, PGPASSWORD, PGPASSFILE
    /// and ~/.pgpass fill in the rest. application_name defaults to walcore.
    #[arg(short = 'd', long, default_value = "")]
    dbname: String,
    /// The physical replication slot; created, reserving WAL, when absent.
    #[arg(long, default_value = "walcore")]
    slot: String,
    /// Start at the slot even when WAL between the repository's newest segment and the slot
    /// is gone from the server (recovery cannot pass that hole).
    #[arg(long)]
    accept_hole: bool,
    /// How often the segment being filled is stored (as a piece from its start): how much a
    /// lost server can take with it, at most, in default mode.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    partial_interval: std::time::Duration,
    /// Store what arrives at once and report it flushed only once stored: with
    /// synchronous_standby_names naming the stream's application_name (walcore), a commit
    /// returns to its client only once it is in the repository.
    #[arg(long)]
    synchronous: bool,
    /// How often the stream logs how far behind the server the repository is.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    lag_log_interval: std::time::Duration,
}

/// Streams WAL into the repository (`walcore stream`) until an error waiting cannot cure;
/// returns the exit code.
pub fn stream(global: Global, args: StreamArgs) -> u8 {
    let (flags, json) = flags(global);
    let spool = std::env::temp_dir().join(format!("walcore-stream-{}", std::process::id()));
    let mut options = walcore::ops::stream::StreamOptions::new(args.dbname, args.slot, spool);
    options.accept_hole = args.accept_hole;
    options.partial_interval = args.partial_interval;
    options.synchronous = args.synchronous;
    options.lag_log_interval = args.lag_log_interval;
    walcore::ops::run_hook(Hook::Backup, flags, json, |repo, _| async move {
        walcore::ops::stream::stream(&repo, &options).await
    })
}

/// Shows the state of the repository (`walcore status`); returns the exit code.
pub fn status(global: Global, server: crate::serve::ServerArgs) -> u8 {
    let (flags, json) = flags(global);
    walcore::ops::run_hook(Hook::Backup, flags, json, |repo, config| async move {
        let mut report = lifecycle::status::status(&repo).await?;
        crate::serve::add_server(Some(&mut report), server.options().as_ref()).await;
        walcore::alert::fill_host_state(&mut report, &config.alerts);
        print_report(json, &report)
    })
}

/// Prints the repository's status as Prometheus metrics (`walcore metrics`); returns the exit
/// code. When the status cannot be read, it still prints `walcore_status_up 0` (what a textfile
/// collector should then publish) and fails.
pub fn metrics(global: Global, server: crate::serve::ServerArgs) -> u8 {
    let (flags, json) = flags(global);
    walcore::ops::run_hook(Hook::Backup, flags, json, |repo, config| async move {
        let (text, read) =
            crate::serve::exposition_once(&repo, &config.alerts, server.options().as_ref()).await;
        print!("{text}");
        read
    })
}

/// Serves `/metrics` and `/healthz` (`walcore serve`) until stopped; returns the exit code.
pub fn serve(global: Global, args: crate::serve::ServeArgs) -> u8 {
    let (flags, json) = flags(global);
    walcore::ops::run_hook(Hook::Backup, flags, json, |repo, config| async move {
        crate::serve::serve(repo, config.alerts.clone(), &args).await
    })
}

/// Prints the effective configuration (`walcore config`): every setting that is set, its
/// value (secrets redacted) and where it came from; returns the exit code.
pub fn config(global: Global) -> u8 {
    let (flags, json) = flags(global);
    let config = match walcore::config::Config::load(flags) {
        Ok(c) => c,
        Err(e) => {
            walcore::ops::init_logging("info", json);
            tracing::error!("{e:#}");
            return exit::code(Hook::Backup, e.kind());
        }
    };
    if json {
        let value = serde_json::json!({
            "config_file": config.config_file,
            "settings": config.settings,
        });
        return match print_json(&value) {
            Ok(()) => 0,
            Err(e) => exit::code(Hook::Backup, e.kind()),
        };
    }
    match &config.config_file {
        Some(f) => println!("configuration file: {f}"),
        None => println!(
            "configuration file: none (WALCORE_CONFIG is not set and {} does not exist)",
            walcore::config::DEFAULT_CONFIG_FILE
        ),
    }
    let width = config
        .settings
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0);
    for s in &config.settings {
        println!("{:<width$}  {}  ({})", s.name, s.value, s.origin);
    }
    println!("everything else: its default (README, \"Set it up\")");
    0
}

/// Rebuilds the repository index from the objects alone (`walcore reindex`); returns the exit
/// code.
pub fn reindex(global: Global) -> u8 {
    let (flags, json) = flags(global);
    walcore::ops::run_hook(Hook::Backup, flags, json, |repo, _| async move {
        let done = lifecycle::index::reindex(&repo).await?;
        if json {
            print_json(&done)
        } else {
            println!(
                "indexed {} backups, {} tombstones and {} pin states in {}; {} older index object(s) removed{}",
                done.records,
                done.tombstones,
                done.pins,
                done.key.as_deref().unwrap_or("-"),
                done.removed,
                if done.unreadable > 0 {
                    format!(
                        "; {} unreadable catalog record(s) left out (walcore verify names them)",
                        done.unreadable
                    )
                } else {
                    String::new()
                }
            );
            Ok(())
        }
    })
}

/// Pins backup `id` (`walcore pin`); returns the exit code.
pub fn pin(global: Global, id: String, note: Option<String>) -> u8 {
    let (flags, json) = flags(global);
    walcore::ops::run_hook(Hook::Backup, flags, json, |repo, _| async move {
        let state = pins::pin(&repo, &id, note.as_deref().unwrap_or("")).await?;
        if json {
            print_json(&serde_json::json!({
                "id": id,
                "pinned": state.pinned,
                "pin_note": state.pin_note,
            }))
        } else {
            match &state.pin_note {
                Some(note) => println!("pinned backup {id}: {note}"),
                None => println!("pinned backup {id}"),
            }
            Ok(())
        }
    })
}

/// Unpins backup `id` (`walcore unpin`); returns the exit code.
pub fn unpin(global: Global, id: String) -> u8 {
    let (flags, json) = flags(global);
    walcore::ops::run_hook(Hook::Backup, flags, json, |repo, _| async move {
        let was_pinned = pins::unpin(&repo, &id).await?;
        if json {
            print_json(&serde_json::json!({
                "id": id,
                "pinned": false,
                "pin_note": null,
                "was_pinned": was_pinned,
            }))
        } else {
            if was_pinned {
                println!("unpinned backup {id}");
            } else {
                println!("backup {id} was not pinned; nothing changed");
            }
            Ok(())
        }
    })
}

/// A catalog record with its pin state, as `list` and `show` print it.
#[derive(serde::Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    record: &'a BackupRecord,
    #[serde(flatten)]
    pin: PinState,
}

/// `walcore-restore` beside this program.
fn default_restore_program() -> Result<PathBuf, Error> {
    let me = std::env::current_exe().map_err(|e| {
        Error::new(
            ErrorKind::Configuration,
            format!("cannot find this program's path ({e}); give --restore-program"),
        )
    })?;
    let candidate = me.with_file_name("walcore-restore");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(Error::new(
            ErrorKind::Configuration,
            format!(
                "no walcore-restore beside {}; give --restore-program PATH",
                me.display()
            ),
        ))
    }
}

/// Prints `report` as JSON with `--json`, else as its text.
pub(crate) fn print_report(
    json: bool,
    report: &(impl serde::Serialize + std::fmt::Display),
) -> Result<(), Error> {
    if json {
        print_json(report)
    } else {
        print!("{report}");
        Ok(())
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn print_table(listed: &[Listed]) {
    if listed.is_empty() {
        println!("no complete backups");
        return;
    }
    println!(
        "{:<22} {:<24} {:<14} {:<14} {:>3} {:>10} {:>10} {:<6}  LABEL",
        "ID", "FINISHED", "START LSN", "STOP LSN", "TL", "SIZE", "STORED", "PINNED"
    );
    for Listed { record: r, pin } in listed {
        let note = match &pin.pin_note {
            Some(n) => format!("  (pin: {n})"),
            None => String::new(),
        };
        println!(
            "{:<22} {:<24} {:<14} {:<14} {:>3} {:>10} {:>10} {:<6}  {}{}",
            r.id,
            r.stop_time,
            r.start_lsn.to_string(),
            r.stop_lsn.to_string(),
            r.stop_timeline,
            human(r.data_bytes()),
            human(r.stored_bytes()),
            if pin.pinned { "yes" } else { "no" },
            r.label,
            note
        );
    }
}

fn print_record(Listed { record: r, pin }: &Listed) {
    println!("backup            {}", r.id);
    println!("label             {}", r.label);
    match (pin.pinned, &pin.pin_note) {
        (true, Some(note)) => println!("pinned            yes: {note}"),
        (true, None) => println!("pinned            yes"),
        (false, _) => println!("pinned            no"),
    }
    println!("system identifier {}", r.system_identifier);
    println!("PostgreSQL        {}", r.pg_version_num);
    println!(
        "started           {} at LSN {} (timeline {})",
        r.start_time, r.start_lsn, r.start_timeline
    );
    println!(
        "finished          {} at LSN {} (timeline {})",
        r.stop_time, r.stop_lsn, r.stop_timeline
    );
    println!("checkpoint        {}", r.checkpoint);
    println!(
        "WAL               {}",
        if r.wal_included {
            "inside the backup"
        } else {
            "in the repository's archive"
        }
    );
    println!(
        "size              {} ({} stored)",
        human(r.data_bytes()),
        human(r.stored_bytes())
    );
    for t in &r.tablespaces {
        println!(
            "tablespace        {} at {} ({})",
            t.oid, t.location, t.archive
        );
    }
    for o in &r.objects {
        println!(
            "object            {} {} bytes, CRC-32 {:08x}, {} stored",
            o.key, o.plaintext_len, o.plaintext_crc32, o.stored_len
        );
    }
}
