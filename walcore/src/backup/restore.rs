//! `walcore-basebackup restore`: a backup from the catalog into an empty directory, with the
//! recovery settings that bring the database to the chosen target when PostgreSQL starts.
//!
//! Order matters for an interrupted restore: every file but `global/pg_control` is written and
//! fsynced first, then the manifest and the recovery settings, and `pg_control` last. Until it
//! is there, PostgreSQL refuses to start on the directory.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::catalog::ObjectKind;
use super::extract::{
    FileSink, Syncer, check_empty_dir, extract, give_to, prepare_empty_dir, sync_all, write_new,
};
use super::plan::{self, ArchiveMode, Request, RestorePlan};
use crate::error::{Error, ErrorKind, local};
use crate::owner::Owner;
use crate::repo::Repository;

/// What `restore` is asked to do.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The new data directory: absent or empty.
    pub pgdata: PathBuf,
    /// The backup, target, timeline, archiving and `restore_command` wanted.
    pub request: Request,
    /// Tablespace locations to move: the location in the backup, and where to put it.
    pub tablespace_map: Vec<(String, PathBuf)>,
    /// Print the plan, write nothing.
    pub dry_run: bool,
    /// Who the restored files belong to, when not the user running the restore (a restore run
    /// as root: [`crate::owner::restore_owner`] chooses).
    pub owner: Option<Owner>,
}

/// What a restore did (or, for a dry run, would do).
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub plan: RestorePlan,
    pub files: u64,
    pub bytes: u64,
    /// Settings found in the backup's `postgresql.auto.conf` that the restore removed (names).
    pub removed_settings: Vec<String>,
    /// Files of an earlier recovery the backup carried, moved out of the way.
    pub leftovers: Vec<String>,
    /// Whether and where the restored server will archive, in words.
    pub archiving: String,
}

/// Quotes a word for `/bin/sh`.
pub fn sh_quote(value: &str) -> String {
    if !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=,+@%".contains(&b))
    {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\'', "'\\''"))
}

/// Restores a backup as `options` say: plans, then (unless it is a dry run) executes the plan.
pub async fn restore(repo: &Repository, options: &RestoreOptions) -> Result<RestoreReport, Error> {
    let began = Instant::now();
    let pgdata = &options.pgdata;
    // Check everything that can be checked before writing anything.
    check_empty_dir(pgdata, "data directory")?;
    let facts = plan::gather(repo, &options.request).await?;
    let plan = plan::plan(&facts, &options.request)?;
    plan::check_wal_after_stop(repo, &facts, &plan).await?;
    if options.dry_run {
        return Ok(RestoreReport {
            archiving: archiving_summary(None, &plan),
            plan,
            files: 0,
            bytes: 0,
            removed_settings: Vec::new(),
            leftovers: Vec::new(),
        });
    }
    if options.owner.is_none() && crate::owner::running_as_root() {
        tracing::warn!(
            "restoring as root with no owner: the files will belong to root, and PostgreSQL \
             will not start on them"
        );
    }
    let chosen = plan.backup.clone();
    tracing::info!(backup = %chosen.id, "restoring {}: {}", chosen.id, plan.reason);
    for note in &plan.notes {
        tracing::warn!("{note}");
    }

    let mut links = HashMap::new();
    let mut destinations = HashMap::new();
    for (old, _) in &options.tablespace_map {
        if !chosen.tablespaces.iter().any(|t| &t.location == old) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "--tablespace-map {old}=…: backup {} has no tablespace at {old} (it has: {})",
                    chosen.id,
                    chosen
                        .tablespaces
                        .iter()
                        .map(|t| t.location.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    for t in &chosen.tablespaces {
        let dest = options
            .tablespace_map
            .iter()
            .find(|(old, _)| *old == t.location)
            .map_or_else(|| PathBuf::from(&t.location), |(_, new)| new.clone());
        if !dest.is_absolute() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("tablespace location {} is not absolute", dest.display()),
            ));
        }
        links.insert(t.oid, dest.clone());
        destinations.insert(t.archive.clone(), dest);
    }
    prepare_empty_dir(pgdata, "data directory", options.owner)?;
    for dest in destinations.values() {
        prepare_empty_dir(dest, "tablespace directory", options.owner)?;
    }

    // Every archive at once: each decodes on the codec's threads while the others download.
    let syncer = Syncer::start();
    let mut tasks = Vec::new();
    for object in chosen
        .objects
        .iter()
        .filter(|o| o.kind == ObjectKind::Archive)
    {
        let is_base = object.name == "base.tar";
        let root = if is_base {
            pgdata.clone()
        } else {
            destinations.get(&object.name).cloned().ok_or_else(|| {
                Error::new(
                    ErrorKind::Integrity,
                    format!(
                        "catalog record of backup {}: archive {} belongs to no tablespace",
                        chosen.id, object.name
                    ),
                )
            })?
        };
        let sink = FileSink::new(root, is_base, links.clone(), options.owner, &syncer);
        let repo = repo.clone();
        let object = object.clone();
        tasks.push(tokio::spawn(
            async move { extract(&repo, &object, sink).await },
        ));
    }
    let mut written = Vec::new();
    let mut files = 0;
    let mut dirs = vec![pgdata.clone()];
    dirs.extend(destinations.values().cloned());
    let mut pg_control = None;
    let mut bytes = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(Ok(sink)) => {
                files += sink.files;
                dirs.extend(sink.dirs);
                bytes += sink.bytes;
                if sink.pg_control.is_some() {
                    pg_control = sink.pg_control;
                }
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(Error::new(
                    ErrorKind::Internal,
                    format!("an extract task failed: {e}"),
                ));
            }
        }
    }
    let synced = tokio::task::spawn_blocking(move || syncer.finish())
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("a sync task failed: {e}")))?;
    if let Some(e) = first_error.or(synced.err()) {
        return Err(e.context(format!(
            "restoring backup {} into {} failed; the directory has no pg_control and will not \
             start: empty it before trying again",
            chosen.id,
            pgdata.display()
        )));
    }
    let pg_control = pg_control.ok_or_else(|| {
        Error::new(
            ErrorKind::Integrity,
            format!("backup {}: base.tar holds no global/pg_control", chosen.id),
        )
    })?;

    if let Some(m) = chosen.manifest() {
        let key = m.key.clone();
        let manifest = repo
            .with_retry(&format!("reading {key}"), || repo.get_small(&key))
            .await?;
        if manifest.len() as u64 != m.plaintext_len
            || crc32fast::hash(&manifest) != m.plaintext_crc32
        {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!("backup object {key} does not match its catalog entry"),
            ));
        }
        let path = pgdata.join("backup_manifest");
        write_new(&path, &manifest, options.owner)?;
        written.push(path);
    }
    let auto = pgdata.join("postgresql.auto.conf");
    let existing = match fs::read_to_string(&auto) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(local(&auto, "reading", e)),
    };
    let (conf, removed_settings) = plan::rewrite_auto_conf(
        &existing,
        &plan,
        &chrono::Utc::now()
            .format("%Y-%m-%d %H:%M:%S+00")
            .to_string(),
    );
    replace_file(&auto, conf.as_bytes(), options.owner)?;
    written.push(auto);
    let leftovers = set_aside_leftovers(pgdata)?;
    let archiving = archiving_summary(Some(pgdata), &plan);
    let signal = pgdata.join("recovery.signal");
    write_new(&signal, b"", options.owner)?;
    written.push(signal);
    give_to(options.owner, &written)?;

    let files = files + written.len() as u64 + 1;
    tokio::task::spawn_blocking(move || -> Result<(), Error> {
        sync_all(&written)?;
        sync_all(&dirs)?;
        Ok(())
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Internal, format!("a sync task failed: {e}")))??;
    // Last: pg_control, which makes the directory a data directory PostgreSQL will start on.
    let global = pgdata.join("global");
    let control = global.join("pg_control");
    write_new(&control, &pg_control, options.owner)?;
    sync_all(&[control, global, pgdata.clone()])?;
    tracing::info!(
        backup = %chosen.id,
        files,
        bytes,
        seconds = format!("{:.1}", began.elapsed().as_secs_f64()),
        "restored; start PostgreSQL on {} to recover to {}",
        pgdata.display(),
        plan.target.describe()
    );
    if !removed_settings.is_empty() {
        tracing::info!(
            "removed from the backup's postgresql.auto.conf: {}",
            removed_settings.join(", ")
        );
    }
    Ok(RestoreReport {
        plan,
        files,
        bytes,
        removed_settings,
        leftovers,
        archiving,
    })
}

/// Replaces `path` with `bytes` (mode 0600) through a temporary file renamed over it.
fn replace_file(path: &Path, bytes: &[u8], owner: Option<Owner>) -> Result<(), Error> {
    let temp = path.with_extension("walcore-new");
    let _ = fs::remove_file(&temp);
    write_new(&temp, bytes, owner)?;
    fs::rename(&temp, path).map_err(|e| local(path, "renaming into", e))
}

/// Files of an earlier recovery that a backup may carry and that would change how this one
/// runs: `recovery.conf` (PostgreSQL 12 and later refuse to start beside it) is renamed, and
/// `standby.signal` (which would keep the server a standby that never reaches its target) is
/// removed. Returns what was done, in words.
fn set_aside_leftovers(pgdata: &Path) -> Result<Vec<String>, Error> {
    let mut done = Vec::new();
    let conf = pgdata.join("recovery.conf");
    if fs::symlink_metadata(&conf).is_ok() {
        let aside = pgdata.join("recovery.conf.walcore-disabled");
        fs::rename(&conf, &aside).map_err(|e| local(&conf, "renaming", e))?;
        done.push("recovery.conf renamed to recovery.conf.walcore-disabled".to_owned());
    }
    let standby = pgdata.join("standby.signal");
    if fs::symlink_metadata(&standby).is_ok() {
        fs::remove_file(&standby).map_err(|e| local(&standby, "removing", e))?;
        done.push("standby.signal removed".to_owned());
    }
    Ok(done)
}

/// Whether the restored server will archive, and where, in words: from the plan and, when the
/// configuration lives in the data directory, from its `archive_mode` and `archive_command`
/// (whose value is never repeated: it may hold credentials).
fn archiving_summary(pgdata: Option<&Path>, plan: &RestorePlan) -> String {
    if plan.archive_mode == ArchiveMode::Off {
        return "archive_mode = off (--archive-mode off): this copy archives nothing, so it \
                cannot add its own timeline to the repository"
            .to_owned();
    }
    let mut mode = None;
    let mut command = None;
    for file in ["postgresql.conf", "postgresql.auto.conf"] {
        let Some(text) = pgdata.and_then(|d| fs::read_to_string(d.join(file)).ok()) else {
            continue;
        };
        for line in text.lines() {
            let Some((name, value)) = line.split_once('=') else {
                continue;
            };
            let name = name.trim().to_ascii_lowercase();
            let value = value
                .split('#')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('\'');
            match name.as_str() {
                "archive_mode" => mode = Some(value.to_ascii_lowercase()),
                "archive_command" => command = Some(value.to_owned()),
                _ => {}
            }
        }
    }
    let archives = mode.as_deref().is_some_and(|m| m == "on" || m == "always");
    let walcore = command
        .as_deref()
        .is_some_and(|c| c.contains("walcore-archive"));
    if archives && walcore {
        "archive_mode is on and archive_command runs walcore-archive (--archive-mode preserve): \
         once promoted, this server archives its new timeline into the repository that command \
         names, as its source did, and recovery_target_timeline = 'latest' restores from that \
         repository will follow it; restore clones and drills with --archive-mode off"
            .to_owned()
    } else if archives {
        "archive_mode is on (--archive-mode preserve): once promoted, this server runs its \
         archive_command; restore clones and drills with --archive-mode off"
            .to_owned()
    } else if mode.is_some() {
        "archive_mode is off in the restored configuration: this server archives nothing".to_owned()
    } else {
        "archive_mode is kept as the server's configuration sets it (--archive-mode preserve); if \
         that configuration archives into this repository, the restored server will add its new \
         timeline there once promoted: restore clones and drills with --archive-mode off"
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(sh_quote("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(sh_quote("a b'c"), "'a b'\\''c'");
    }
}
