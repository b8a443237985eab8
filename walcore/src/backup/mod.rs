//! Base backups: `take` streams `BASE_BACKUP` into the repository, the catalog records the
//! complete ones, and `restore` brings one back with the settings that recover it to a target.
//!
//! ```text
//! PostgreSQL ──BASE_BACKUP──▶ take ──▶ backup/ID/data/*.tar, backup/ID/backup_manifest ──▶ catalog/ID (last)
//! catalog ──choose(target)──▶ restore ──▶ empty directory (pg_control last) + recovery.signal
//!                                                + restore_command = walcore-restore …
//! ```
//!
//! - [`catalog`]: the catalog records (FORMAT.md §6), backup IDs and keys.
//! - [`take`]: the backup itself.
//! - [`restore`]: the choice of backup, the extraction, the recovery settings.
//! - [`tar`]: a sans-IO reader of the tar streams PostgreSQL sends.

pub mod catalog;
pub mod progress;
pub mod restore;
pub mod take;
pub mod tar;

use std::path::Path;

use crate::config::{Config, KeySource};

pub use catalog::BackupRecord;
pub use restore::{RestoreOptions, RestoreReport, Target, TargetAction};
pub use take::TakeOptions;

/// A `restore_command` that runs `program` (a `walcore-restore`) with the repository settings
/// of `config`: the repository URL, the configuration file, and the encryption key's file or
/// command. A key given inline is never written into the data directory; the second value
/// says so, for the caller to tell the user how the server will get it.
pub fn restore_command_for(config: &Config, program: &Path) -> (String, Option<String>) {
    use restore::sh_quote;
    let mut words = Vec::new();
    if let Some(file) = &config.config_file {
        words.push(format!("WALCORE_CONFIG={}", sh_quote(file)));
    }
    words.push(format!("WALCORE_REPO={}", sh_quote(&config.repo)));
    let mut note = None;
    match &config.key_source {
        KeySource::None => {}
        KeySource::File(f) => words.push(format!("WALCORE_ENCRYPTION_KEY_FILE={}", sh_quote(f))),
        KeySource::Command(c) => {
            words.push(format!("WALCORE_ENCRYPTION_KEY_COMMAND={}", sh_quote(c)));
        }
        KeySource::Inline => {
            note = Some(
                "the encryption key was given inline, so restore_command does not carry it: start \
                 PostgreSQL with WALCORE_ENCRYPTION_KEY in its environment, or restore with \
                 WALCORE_ENCRYPTION_KEY_FILE so the command names the file"
                    .to_owned(),
            );
        }
    }
    words.push(sh_quote(&program.to_string_lossy()));
    words.push("%f %p".to_owned());
    (words.join(" "), note)
}
