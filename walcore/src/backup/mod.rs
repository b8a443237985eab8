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
//! - [`heartbeat`]: a running take's sign of life, which keeps `expire` away from it.
//! - [`pins`]: pins (FORMAT.md §6.1), an append-only log of events per backup.
//! - [`plan`]: the choice of backup along the target timeline's history, the WAL it needs, the
//!   recovery settings (a pure function; `--dry-run` prints it).
//! - [`restore`]: the plan's execution: extraction, then the recovery settings, `pg_control` last.
//! - [`tar`]: a sans-IO reader of the tar streams PostgreSQL sends.

pub mod catalog;
pub mod drill;
pub mod extract;
pub mod heartbeat;
pub mod pins;
pub mod plan;
pub mod progress;
pub mod restore;
pub mod take;
pub mod tar;

use std::path::Path;

use crate::config::{Config, KeySource};

pub use catalog::BackupRecord;
pub use plan::{ArchiveMode, Request, RestorePlan, Target, TargetAction, TargetTimeline};
pub use restore::{RestoreOptions, RestoreReport};
pub use take::TakeOptions;

/// A `restore_command` that runs `program` (a `walcore-restore`) with the repository settings
/// of `config`: the repository URL, the configuration file, and the encryption key's file or
/// command. A key given inline and a cloud store's credentials are never written into the data
/// directory; the second value says so, for the caller to tell the user how the server will get
/// them. Every `%` of those words is doubled, as PostgreSQL requires of a literal `%` in
/// `restore_command`; only the final `%f %p` are placeholders.
pub fn restore_command_for(config: &Config, program: &Path) -> (String, Option<String>) {
    let sh_quote = |word: &str| plan::escape_percent(&restore::sh_quote(word));
    let mut words = Vec::new();
    if let Some(file) = &config.config_file {
        words.push(format!("WALCORE_CONFIG={}", sh_quote(file)));
    }
    words.push(format!("WALCORE_REPO={}", sh_quote(&config.repo)));
    let mut note: Option<String> = None;
    match &config.key_source {
        KeySource::None => {}
        KeySource::File(f) => words.push(format!("WALCORE_ENCRYPTION_KEY_FILE={}", sh_quote(f))),
        KeySource::Command(c) => {
            words.push(format!("WALCORE_ENCRYPTION_KEY_COMMAND={}", sh_quote(c)));
            if config.key_command_timeout != crate::config::DEFAULT_KEY_COMMAND_TIMEOUT {
                words.push(format!(
                    "WALCORE_ENCRYPTION_KEY_COMMAND_TIMEOUT={}ms",
                    config.key_command_timeout.as_millis()
                ));
            }
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
    // Credentials from the configuration file come with WALCORE_CONFIG; from variables, not.
    if !config.repo.starts_with("file://") && config.cloud_options.0.is_empty() {
        let creds = "the store's credentials and endpoint (AWS_*, GOOGLE_*, AZURE_* variables) \
                     are not written into restore_command: PostgreSQL's environment must carry \
                     them when it starts, or put them in the configuration file ([s3], [gcs], \
                     [azure] sections)";
        note = Some(match note {
            Some(n) => format!("{n}; {creds}"),
            None => creds.to_owned(),
        });
    }
    (words.join(" "), note)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Layer;

    fn config(vars: &[(&str, &str)]) -> Config {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::load_with(Layer::default(), |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
        .expect("a valid configuration")
    }

    #[test]
    fn restore_command_names_the_key_source_never_the_key() {
        let program = Path::new("/usr/local/bin/walcore-restore");
        let key = "ab".repeat(32);
        let (command, note) = restore_command_for(
            &config(&[
                ("WALCORE_REPO", "file:///var/lib/walcore"),
                ("WALCORE_ENCRYPTION_KEY", &key),
            ]),
            program,
        );
        assert_eq!(
            command,
            "WALCORE_REPO=file:///var/lib/walcore /usr/local/bin/walcore-restore %f %p"
        );
        assert!(!command.contains(&key));
        assert!(note.is_some_and(|n| n.contains("WALCORE_ENCRYPTION_KEY")));

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("key file");
        std::fs::write(&file, &key).expect("write key");
        // Key files others may read are refused.
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod 600 the key file");
        let file = file.to_string_lossy().into_owned();
        let (command, note) = restore_command_for(
            &config(&[
                ("WALCORE_REPO", "s3://bucket/db1"),
                ("WALCORE_ENCRYPTION_KEY_FILE", &file),
            ]),
            program,
        );
        assert_eq!(
            command,
            format!(
                "WALCORE_REPO=s3://bucket/db1 WALCORE_ENCRYPTION_KEY_FILE='{file}' \
                 /usr/local/bin/walcore-restore %f %p"
            )
        );
        assert!(note.is_some_and(|n| n.contains("AWS_*")));
    }

    #[test]
    fn percent_signs_in_restore_command_are_escaped_for_postgresql() {
        let (command, _) = restore_command_for(
            &config(&[("WALCORE_REPO", "file:///srv/100%25/repo")]),
            Path::new("/opt/50%/walcore-restore"),
        );
        assert_eq!(
            command,
            "WALCORE_REPO=file:///srv/100%%25/repo /opt/50%%/walcore-restore %f %p"
        );
    }

    #[test]
    fn a_key_commands_own_time_limit_travels_with_it() {
        let key = "cd".repeat(32);
        let (command, _) = restore_command_for(
            &config(&[
                ("WALCORE_REPO", "file:///r"),
                ("WALCORE_ENCRYPTION_KEY_COMMAND", &format!("echo {key}")),
                ("WALCORE_ENCRYPTION_KEY_COMMAND_TIMEOUT", "5s"),
            ]),
            Path::new("/usr/local/bin/walcore-restore"),
        );
        assert!(
            command.contains("WALCORE_ENCRYPTION_KEY_COMMAND_TIMEOUT=5000ms"),
            "{command}"
        );
    }
}
