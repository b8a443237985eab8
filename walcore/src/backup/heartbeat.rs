//! A running take's sign of life (FORMAT.md §6.2): small objects under `backup/ID/heartbeat/`
//! that tell `expire` the take is not over, and where its WAL starts.
//!
//! - Beat 0 is written before `BASE_BACKUP` is sent and stays until the take ends: `expire`
//!   deletes every object of an ID it sweeps, so a take that finds its beat 0 gone knows it was
//!   swept, and never records a backup whose objects are gone.
//! - A new beat is written every [`INTERVAL`] and the one before it (other than beat 0)
//!   deleted, so at most two exist. Once the server has said where the backup starts, every
//!   beat carries that position: `expire` keeps the WAL from there on for the running take.
//! - A beat that cannot be written is logged and tried again at the next interval; only
//!   beat 0 must succeed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::catalog::format_time;
use crate::error::{Error, ErrorKind};
use crate::pg::Lsn;
use crate::repo::Repository;
use crate::store::PutOutcome;

/// How often a running take writes a beat.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// The prefix of backup `id`'s beats.
pub fn prefix(id: &str) -> String {
    format!("backup/{id}/heartbeat/")
}

/// The key of beat `seq` of backup `id`.
pub fn key(id: &str, seq: u64) -> String {
    format!("{}{seq:08}", prefix(id))
}

/// One beat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    pub format_version: u32,
    pub backup_id: String,
    pub seq: u64,
    pub time: String,
    /// Where the backup's WAL starts, once the server has said.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub start_lsn: Option<Lsn>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub start_timeline: Option<u32>,
    pub pid: u32,
}

type Start = Arc<Mutex<Option<(Lsn, u32)>>>;

/// The beats of one running take; dropping it stops them.
#[derive(Debug)]
pub struct Heartbeat {
    id: String,
    start: Start,
    task: JoinHandle<()>,
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn beat(id: &str, seq: u64, start: &Start) -> Beat {
    let start = *start
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Beat {
        format_version: 1,
        backup_id: id.to_owned(),
        seq,
        time: format_time(SystemTime::now()),
        start_lsn: start.map(|s| s.0),
        start_timeline: start.map(|s| s.1),
        pid: std::process::id(),
    }
}

async fn write(repo: &Repository, beat: &Beat) -> Result<(), Error> {
    let key = key(&beat.backup_id, beat.seq);
    let json =
        serde_json::to_vec(beat).map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    match repo.put_small(&key, json).await? {
        PutOutcome::Created => Ok(()),
        PutOutcome::AlreadyExists => Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "{key} already exists: another take is using backup ID {}",
                beat.backup_id
            ),
        )),
    }
}

impl Heartbeat {
    /// Writes beat 0 (which must succeed) and starts the beats that follow.
    pub async fn start(repo: &Repository, id: &str) -> Result<Heartbeat, Error> {
        Heartbeat::start_every(repo, id, INTERVAL).await
    }

    async fn start_every(
        repo: &Repository,
        id: &str,
        interval: Duration,
    ) -> Result<Heartbeat, Error> {
        let start: Start = Arc::default();
        let first = beat(id, 0, &start);
        repo.with_retry(&format!("writing {}", key(id, 0)), || write(repo, &first))
            .await?;
        let task = {
            let (repo, id, start) = (repo.clone(), id.to_owned(), start.clone());
            tokio::spawn(async move {
                let mut seq = 0u64;
                loop {
                    tokio::time::sleep(interval).await;
                    let next = beat(&id, seq + 1, &start);
                    if let Err(e) = write(&repo, &next).await {
                        tracing::warn!(backup = %id, "could not write a heartbeat: {e:#}");
                        continue;
                    }
                    if seq > 0
                        && let Err(e) = repo.store().delete(&key(&id, seq)).await
                    {
                        tracing::warn!(backup = %id, "could not remove an old heartbeat: {e}");
                    }
                    seq += 1;
                }
            })
        };
        Ok(Heartbeat {
            id: id.to_owned(),
            start,
            task,
        })
    }

    /// Records where the backup's WAL starts; the next beats carry it.
    pub fn set_start(&self, lsn: Lsn, timeline: u32) {
        *self
            .start
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((lsn, timeline));
    }

    /// Stops the beats (the objects stay until [`clear`]).
    pub fn stop(self) {
        drop(self);
    }

    /// Whether beat 0 is still there: false means `expire` swept this take.
    pub async fn survives(repo: &Repository, id: &str) -> Result<bool, Error> {
        let k = key(id, 0);
        let store = repo.store().describe();
        repo.with_retry(&format!("looking for {k}"), || async {
            repo.store()
                .head(&k)
                .await
                .map_err(|e| e.into_error("looking for", &k, &store))
        })
        .await
        .map(|size| size.is_some())
    }

    /// The backup ID the beats are for.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Removes every beat of backup `id`; best effort (a beat left behind is removed by the next
/// `expire` as a leftover once the backup is gone, and costs nothing meanwhile).
pub async fn clear(repo: &Repository, id: &str) {
    let p = prefix(id);
    let keys: Vec<String> = match repo.store().list(&p).await {
        Ok(keys) => keys,
        Err(e) => {
            tracing::warn!(backup = %id, "could not list the heartbeats to remove them: {e}");
            return;
        }
    };
    if let Err(e) = repo.store().delete_many(&keys).await {
        tracing::warn!(backup = %id, "could not remove the heartbeats: {e}");
    }
}

/// Reads a beat (for `expire`, which wants a running take's start position).
pub async fn read(repo: &Repository, key: &str) -> Result<Beat, Error> {
    let bytes = repo
        .with_retry(&format!("reading {key}"), || repo.get_small(key))
        .await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::new(
            ErrorKind::Integrity,
            format!("heartbeat {key} in {}: {e}", repo.store().describe()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Codec, Compression};
    use crate::store::{LocalStore, Store};

    #[tokio::test]
    async fn beats_follow_each_other_and_beat_zero_stays() {
        let dir = tempfile::tempdir().expect("temp dir");
        let repo = Repository::new(
            Store::Local(LocalStore::new(dir.path().to_path_buf())),
            Codec::new(Compression::None, None),
            Duration::from_secs(1),
        );
        let id = "20261204T101010Z-abcd";
        let every = Duration::from_millis(40);
        let hb = Heartbeat::start_every(&repo, id, every)
            .await
            .expect("start");
        assert!(Heartbeat::survives(&repo, id).await.expect("head"));
        hb.set_start(Lsn(0x0500_0028), 1);
        // Wait for a beat that carries the start (beats go on; no time is asserted).
        let newest = loop {
            tokio::time::sleep(every).await;
            let keys = repo.store().list(&prefix(id)).await.expect("list");
            let last = read(&repo, keys.last().expect("a beat")).await;
            if let Ok(b) = last
                && b.seq >= 3
                && b.start_lsn.is_some()
            {
                break b;
            }
        };
        hb.stop();
        let keys = repo.store().list(&prefix(id)).await.expect("list");
        assert_eq!(keys.first(), Some(&key(id, 0)));
        assert!(
            keys.len() <= 3,
            "beat 0, the newest, and one being replaced: {keys:?}"
        );
        assert_eq!(newest.start_lsn, Some(Lsn(0x0500_0028)));
        clear(&repo, id).await;
        assert!(!Heartbeat::survives(&repo, id).await.expect("head"));
    }
}
