//! `walcore-basebackup restore`: a backup from the catalog into an empty directory, with the
//! recovery settings that bring the database to the chosen target when PostgreSQL starts.
//!
//! Order matters for an interrupted restore: every file but `global/pg_control` is written and
//! fsynced first, then the manifest and the recovery settings, and `pg_control` last. Until it
//! is there, PostgreSQL refuses to start on the directory.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Instant;

use chrono::{DateTime, FixedOffset, Utc};

use super::catalog::{self, BackupRecord, ObjectKind};
use super::extract::{
    FileSink, Syncer, check_empty_dir, extract, give_to, prepare_empty_dir, sync_all, write_new,
};
use crate::error::{Error, ErrorKind, local};
use crate::owner::Owner;
use crate::pg::Lsn;
use crate::repo::Repository;

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Replay to the end of the archive.
    End,
    /// `recovery_target_time`.
    Time(DateTime<FixedOffset>),
    /// `recovery_target_lsn`.
    Lsn(Lsn),
    /// `recovery_target_xid`.
    Xid(u64),
    /// `recovery_target_name` (a restore point made with `pg_create_restore_point`).
    Name(String),
    /// `recovery_target = 'immediate'`: as soon as the backup is consistent.
    Immediate,
}

impl Target {
    /// Parses `--target-time`: an ISO 8601 / PostgreSQL-style timestamp with an explicit zone
    /// (`2026-11-30 04:30:12+00`, `2026-11-30T04:30:12.5Z`, `2026-11-30 04:30:12 UTC`).
    pub fn parse_time(text: &str) -> Result<Target, Error> {
        let mut t = text.trim().to_owned();
        if t.get(10..11).is_some_and(|c| c == "T" || c == "t") {
            t.replace_range(10..11, " ");
        }
        for utc in [" UTC", " utc", "Z", "z"] {
            if let Some(stripped) = t.strip_suffix(utc) {
                t = format!("{stripped}+00:00");
                break;
            }
        }
        for pattern in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f %#z"] {
            if let Ok(parsed) = DateTime::parse_from_str(&t, pattern) {
                return Ok(Target::Time(parsed));
            }
        }
        let zone_hint =
            if DateTime::parse_from_str(&format!("{t}+00"), "%Y-%m-%d %H:%M:%S%.f%#z").is_ok() {
                " (give its time zone, e.g. '+00' or 'UTC': the restored server's TimeZone may \
             not be this machine's)"
            } else {
                ""
            };
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "--target-time '{text}' is not a time like '2026-11-30 04:30:12+00'{zone_hint}"
            ),
        ))
    }

    pub fn parse_lsn(text: &str) -> Result<Target, Error> {
        text.trim().parse::<Lsn>().map(Target::Lsn).map_err(|e| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("--target-lsn '{text}': {e}"),
            )
        })
    }

    pub fn parse_xid(text: &str) -> Result<Target, Error> {
        text.trim()
            .parse::<u64>()
            .ok()
            .filter(|x| *x >= 3)
            .map(Target::Xid)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("--target-xid '{text}' is not a transaction ID (a number from 3)"),
                )
            })
    }

    /// The settings that say this target, for `postgresql.auto.conf`.
    fn settings(&self) -> Vec<(&'static str, String)> {
        match self {
            Target::End => vec![],
            Target::Time(t) => vec![(
                "recovery_target_time",
                t.with_timezone(&Utc)
                    .format("%Y-%m-%d %H:%M:%S%.6f+00")
                    .to_string(),
            )],
            Target::Lsn(l) => vec![("recovery_target_lsn", l.to_string())],
            Target::Xid(x) => vec![("recovery_target_xid", x.to_string())],
            Target::Name(n) => vec![("recovery_target_name", n.clone())],
            Target::Immediate => vec![("recovery_target", "immediate".to_owned())],
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::End => "the end of the archived WAL".to_owned(),
            Target::Time(t) => format!("time {t}"),
            Target::Lsn(l) => format!("LSN {l}"),
            Target::Xid(x) => format!("transaction {x}"),
            Target::Name(n) => format!("restore point '{n}'"),
            Target::Immediate => "the end of the backup (immediate)".to_owned(),
        }
    }
}

/// What PostgreSQL does when it reaches the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

impl std::str::FromStr for TargetAction {
    type Err = String;
    fn from_str(s: &str) -> Result<TargetAction, String> {
        match s {
            "promote" => Ok(TargetAction::Promote),
            "pause" => Ok(TargetAction::Pause),
            "shutdown" => Ok(TargetAction::Shutdown),
            _ => Err(format!("'{s}' is not promote, pause or shutdown")),
        }
    }
}

impl TargetAction {
    fn keyword(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

/// What `restore` is asked to do.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The new data directory: absent or empty.
    pub pgdata: PathBuf,
    /// Restore this backup instead of the one the target implies.
    pub backup: Option<String>,
    pub target: Target,
    pub action: TargetAction,
    /// Tablespace locations to move: the location in the backup, and where to put it.
    pub tablespace_map: Vec<(String, PathBuf)>,
    /// The `restore_command` to write ([`super::restore_command_for`] builds one that runs
    /// `walcore-restore` with this repository's settings).
    pub restore_command: String,
    /// Who the restored files belong to, when not the user running the restore (a restore run
    /// as root: [`crate::owner::restore_owner`] chooses).
    pub owner: Option<Owner>,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub backup: BackupRecord,
    /// Why that backup.
    pub reason: String,
    pub files: u64,
    pub bytes: u64,
}

/// Picks the backup to restore for `target`: `wanted` if given (checked against the target),
/// else the newest that finished before the target. Returns it and the reason, in words.
pub fn choose<'a>(
    records: &'a [BackupRecord],
    target: &Target,
    wanted: Option<&str>,
) -> Result<(&'a BackupRecord, String), Error> {
    if records.is_empty() {
        return Err(Error::new(
            ErrorKind::NotFound,
            "the repository has no complete backup (take one with walcore-basebackup take)",
        ));
    }
    let reaches = |r: &BackupRecord| -> Result<bool, Error> {
        Ok(match target {
            Target::Time(t) => r.stop()? <= t.with_timezone(&Utc),
            Target::Lsn(l) => r.stop_lsn <= *l,
            _ => true,
        })
    };
    if let Some(id) = wanted {
        let r = records.iter().find(|r| r.id == id).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("no complete backup {id} (walcore-basebackup list shows them)"),
            )
        })?;
        if !reaches(r)? {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "backup {id} finished at {} (LSN {}), after the target {}: recovery from it \
                     cannot stop there",
                    r.stop_time,
                    r.stop_lsn,
                    target.describe()
                ),
            ));
        }
        return Ok((
            r,
            format!("chosen with --backup; target {}", target.describe()),
        ));
    }
    let mut newest: Option<&BackupRecord> = None;
    for r in records {
        if reaches(r)? && newest.is_none_or(|n| r.id > n.id) {
            newest = Some(r);
        }
    }
    match newest {
        Some(r) => Ok((
            r,
            match target {
                Target::Time(_) | Target::Lsn(_) => format!(
                    "the newest backup that finished before the target {} (it finished at {}, \
                     LSN {})",
                    target.describe(),
                    r.stop_time,
                    r.stop_lsn
                ),
                _ => format!("the newest backup; target {}", target.describe()),
            },
        )),
        None => {
            let oldest = records.iter().min_by(|a, b| a.id.cmp(&b.id));
            let oldest = oldest.map_or(String::new(), |o| {
                format!(
                    "; the oldest backup, {}, finished at {} (LSN {})",
                    o.id, o.stop_time, o.stop_lsn
                )
            });
            Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "no backup finished before the target {}{oldest}: no backup can reach it",
                    target.describe()
                ),
            ))
        }
    }
}

/// Quotes a value for `postgresql.conf`.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
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

/// The lines appended to `postgresql.auto.conf`.
pub fn recovery_settings(
    id: &str,
    restore_command: &str,
    target: &Target,
    action: TargetAction,
) -> String {
    let mut out =
        format!("\n# Recovery settings written by walcore-basebackup restore (backup {id})\n");
    let mut set = |k: &str, v: &str| out.push_str(&format!("{k} = {}\n", conf_quote(v)));
    set("restore_command", restore_command);
    for (k, v) in target.settings() {
        set(k, &v);
    }
    if *target != Target::End {
        set("recovery_target_action", action.keyword());
    }
    set("recovery_target_timeline", "latest");
    out
}

/// Restores a backup as `options` say.
pub async fn restore(repo: &Repository, options: &RestoreOptions) -> Result<RestoreReport, Error> {
    let began = Instant::now();
    let pgdata = &options.pgdata;
    // Check everything that can be checked before writing anything.
    check_empty_dir(pgdata, "data directory")?;
    let records = catalog::list(repo).await?;
    let (chosen, reason) = choose(&records, &options.target, options.backup.as_deref())?;
    if options.owner.is_none() && crate::owner::running_as_root() {
        tracing::warn!(
            "restoring as root with no owner: the files will belong to root, and PostgreSQL \
             will not start on them"
        );
    }
    let chosen = chosen.clone();
    tracing::info!(backup = %chosen.id, "restoring {}: {reason}", chosen.id);

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
    let settings = recovery_settings(
        &chosen.id,
        &options.restore_command,
        &options.target,
        options.action,
    );
    let auto = pgdata.join("postgresql.auto.conf");
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&auto)
        .and_then(|mut f| f.write_all(settings.as_bytes()))
        .map_err(|e| local(&auto, "writing", e))?;
    written.push(auto);
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
        options.target.describe()
    );
    Ok(RestoreReport {
        backup: chosen,
        reason,
        files,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::catalog::TablespaceEntry;

    fn record(id: &str, stop_time: &str, stop_lsn: u64) -> BackupRecord {
        BackupRecord {
            format_version: 1,
            id: id.to_owned(),
            label: "t".into(),
            system_identifier: "1".into(),
            pg_version_num: 150_000,
            wal_segment_size: 16 << 20,
            start_lsn: Lsn(stop_lsn - 0x100),
            start_timeline: 1,
            stop_lsn: Lsn(stop_lsn),
            stop_timeline: 1,
            start_time: stop_time.to_owned(),
            stop_time: stop_time.to_owned(),
            checkpoint: "fast".into(),
            wal_included: false,
            tablespaces: Vec::<TablespaceEntry>::new(),
            objects: vec![],
            created_by: "test".into(),
        }
    }

    #[test]
    fn target_times_need_a_zone() {
        for ok in [
            "2026-11-30 04:30:12+00",
            "2026-11-30 04:30:12.123456+01:00",
            "2026-11-30T04:30:12Z",
            "2026-11-30 04:30:12 UTC",
            "2026-11-30 04:30:12 +0530",
        ] {
            assert!(
                matches!(Target::parse_time(ok), Ok(Target::Time(_))),
                "{ok}"
            );
        }
        let e = Target::parse_time("2026-11-30 04:30:12").unwrap_err();
        assert!(e.to_string().contains("time zone"), "{e}");
        assert!(Target::parse_time("yesterday").is_err());
        let Ok(t) = Target::parse_time("2026-11-30 05:30:12.5+01") else {
            panic!("parse")
        };
        assert_eq!(
            t.settings(),
            vec![(
                "recovery_target_time",
                "2026-11-30 04:30:12.500000+00".to_owned()
            )]
        );
    }

    #[test]
    fn chooses_the_newest_backup_before_the_target() {
        let records = vec![
            record(
                "20261130T010000Z-aaaa",
                "2026-11-30T01:00:05.000Z",
                0x0300_0000,
            ),
            record(
                "20261130T020000Z-bbbb",
                "2026-11-30T02:00:05.000Z",
                0x0500_0000,
            ),
        ];
        let at = |t: &str| Target::parse_time(t).expect("time");
        let (r, why) = choose(&records, &at("2026-11-30 01:30:00+00"), None).expect("one");
        assert_eq!(r.id, "20261130T010000Z-aaaa");
        assert!(why.contains("newest backup that finished before"), "{why}");
        let (r, _) = choose(&records, &at("2026-11-30 03:00:00Z"), None).expect("one");
        assert_eq!(r.id, "20261130T020000Z-bbbb");
        let e = choose(&records, &at("2026-11-30 00:59:00Z"), None).unwrap_err();
        assert!(e.to_string().contains("no backup finished before"), "{e}");
        assert!(e.to_string().contains("20261130T010000Z-aaaa"), "{e}");
        let (r, _) = choose(&records, &Target::Lsn(Lsn(0x0400_0000)), None).expect("lsn");
        assert_eq!(r.id, "20261130T010000Z-aaaa");
        let (r, _) = choose(&records, &Target::End, None).expect("end");
        assert_eq!(r.id, "20261130T020000Z-bbbb");
        let e = choose(
            &records,
            &at("2026-11-30 01:30:00+00"),
            Some("20261130T020000Z-bbbb"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("after the target"), "{e}");
        assert!(choose(&[], &Target::End, None).is_err());
    }

    #[test]
    fn recovery_settings_quote_what_they_write() {
        let s = recovery_settings(
            "20261130T010000Z-aaaa",
            "WALCORE_REPO=file:///r /usr/bin/walcore-restore %f %p",
            &Target::Name("it's here".into()),
            TargetAction::Promote,
        );
        assert!(
            s.contains("restore_command = 'WALCORE_REPO=file:///r /usr/bin/walcore-restore %f %p'")
        );
        assert!(s.contains("recovery_target_name = 'it''s here'"));
        assert!(s.contains("recovery_target_action = 'promote'"));
        assert!(s.contains("recovery_target_timeline = 'latest'"));
        let end = recovery_settings("x", "c", &Target::End, TargetAction::Pause);
        assert!(!end.contains("recovery_target_action"));
        assert_eq!(sh_quote("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(sh_quote("a b'c"), "'a b'\\''c'");
    }
}
