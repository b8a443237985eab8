//! `walcore`: the operator command. Every repository command: those of `walcore-basebackup`
//! (`basebackup::commands`, the same definitions and handlers), and pins.

use std::process::ExitCode;

use basebackup::commands::{self, Command, Global};
use clap::{Parser, Subcommand};

/// The walcore operator command: base backups, the catalog, point-in-time restores, pins and retention
/// of a walcore repository. (PostgreSQL's hooks are walcore-archive and walcore-restore.)
#[derive(Debug, Parser)]
#[command(name = "walcore", version, about)]
struct Args {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Operator,
}

// Parsed once per process: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Operator {
    #[command(flatten)]
    Repository(Command),
    /// Check the setup (run it right after setting archive_command); exits 0 when all passed.
    ///
    /// Checks the server's wal_level, archive_mode and archive_command, its cluster against the
    /// repository's, the repository (reachable, writable, the right key), and that one WAL
    /// segment switched on the server arrives in the repository.
    Check(basebackup::check::CheckArgs),
    /// Pin a backup: it will never expire, whatever the retention policy says.
    Pin {
        /// The backup ID (see list).
        id: String,
        /// Why it is kept (shown by list and show).
        #[arg(long)]
        note: Option<String>,
    },
    /// Unpin a backup: retention decides about it again.
    Unpin {
        /// The backup ID (see list).
        id: String,
    },
    /// Apply the retention policy: delete the backups no rule keeps, the WAL no kept backup
    /// and no second of the restorable window needs, and the leftovers of takes that never
    /// finished. Prints the plan first; --dry-run prints only the plan.
    Expire(commands::ExpireArgs),
    /// Verify the repository without restoring: every object decodes and is what refers to
    /// it says, every backup has its WAL, and the restorable window has no gap. Objects an
    /// earlier run verified are not read again (--full reads them). Exits 0 when nothing is
    /// wrong, 5 when a restore is affected, 1 when only unreferenced objects were found.
    Verify(commands::VerifyArgs),
    /// Stream WAL from the server into the repository over a physical replication slot, as a
    /// long-running service beside archive_command: each completed segment is stored as
    /// walcore-archive stores it, and only then reported to the server as flushed.
    Stream(commands::StreamArgs),
    /// Show the state of the repository: the newest archived segment and backup with their
    /// ages, the restorable window and any gap in it, the WAL per timeline, the bytes stored,
    /// and what the last verify and drill found. Reads the index, not every object. With
    /// --dbname, also the server's side: files waiting for archive_command, the stream's slot.
    Status(basebackup::serve::ServerArgs),
    /// Rebuild the repository index (a cache of the catalog and the pins that keeps list,
    /// show, restore and expire fast) from the objects alone. Never needed for a right answer:
    /// a stale or missing index only costs reads.
    Reindex,
    /// Print the repository's status as Prometheus metrics (text exposition format), for
    /// node_exporter's textfile collector: ages of the newest segment, backup and verify,
    /// sizes, the restorable window, holes. Prints walcore_status_up 0 and fails when the
    /// repository cannot be read.
    Metrics(basebackup::serve::ServerArgs),
    /// Serve the metrics on /metrics, and /healthz, over HTTP; the status is read every
    /// --interval, not at each scrape.
    Serve(basebackup::serve::ServeArgs),
    /// Test a restore and measure it: restore a backup (default the newest, to the end of the
    /// archive) into a scratch directory, start PostgreSQL there on a private socket, wait for
    /// it to promote, run a query, then stop it and remove the directory. Reports the RTO
    /// (download + start + recovery) and the RPO (the newest commit restored against the
    /// newest WAL stored), and keeps the report in the repository for status and metrics.
    /// Exits 0 when the drill passed.
    Drill(basebackup::drill::DrillArgs),
    /// Print the effective configuration: every setting that is set, where it came from (a
    /// flag, a WALCORE_* variable, the configuration file), secrets shown as <redacted>.
    Config,
}

fn main() -> ExitCode {
    commands::main(|args: Args| match args.command {
        Operator::Repository(command) => commands::run(args.global, command),
        Operator::Check(check) => basebackup::check::run(args.global, check),
        Operator::Pin { id, note } => commands::pin(args.global, id, note),
        Operator::Unpin { id } => commands::unpin(args.global, id),
        Operator::Expire(expire) => commands::expire(args.global, expire),
        Operator::Verify(verify) => commands::verify(args.global, verify),
        Operator::Status(server) => commands::status(args.global, server),
        Operator::Stream(stream) => commands::stream(args.global, stream),
        Operator::Reindex => commands::reindex(args.global),
        Operator::Metrics(server) => commands::metrics(args.global, server),
        Operator::Serve(serve) => commands::serve(args.global, serve),
        Operator::Drill(drill) => basebackup::drill::run(args.global, drill),
        Operator::Config => commands::config(args.global),
    })
}
