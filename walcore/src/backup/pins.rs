//! Pins (FORMAT.md §6.1): a pinned backup is never expired. Storage may be create-only, so a
//! pin is an append-only log of events under `pins/ID/`, one create-only object per event; the
//! event with the greatest name is the backup's state.

use std::collections::BTreeMap;
use std::time::SystemTime;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::backup::catalog::{self, format_time, is_valid_id};
use crate::error::{Error, ErrorKind};
use crate::repo::Repository;
use crate::store::PutOutcome;

/// Where pin events live.
pub const PINS_PREFIX: &str = "pins/";

/// The longest note a pin may carry, in bytes.
pub const MAX_NOTE_BYTES: usize = 1024;

/// How many times a writer draws new random digits when its event name is taken.
const NAME_ATTEMPTS: usize = 8;

/// The prefix of backup `id`'s pin events.
pub fn pins_prefix(id: &str) -> String {
    format!("{PINS_PREFIX}{id}/")
}

/// What an event does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinAction {
    Pin,
    Unpin,
}

/// One pin or unpin event, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinEvent {
    pub format_version: u32,
    pub backup_id: String,
    pub event: PinAction,
    #[serde(default)]
    pub note: String,
    pub time: String,
    pub created_by: String,
}

/// Whether a backup is pinned, from its newest event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinState {
    pub pinned: bool,
    /// The note of the pin in force (none when not pinned or pinned without one).
    pub pin_note: Option<String>,
    /// When the newest event (pin or unpin) was written.
    pub changed: Option<String>,
}

/// An event name's time: `YYYYMMDDTHHMMSS.mmmZ`.
const TIME_FORMAT: &str = "%Y%m%dT%H%M%S%.3fZ";

/// The time an event name carries, if `name` has the `YYYYMMDDTHHMMSS.mmmZ-XXXXXXXX` shape.
fn event_time(name: &str) -> Option<DateTime<Utc>> {
    let (time, random) = name.split_once('-')?;
    if time.len() != 20
        || random.len() != 8
        || !random
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return None;
    }
    NaiveDateTime::parse_from_str(time, TIME_FORMAT)
        .ok()
        .map(|t| t.and_utc())
}

fn event_name(at: DateTime<Utc>) -> String {
    let mut r = [0u8; 4];
    // The random part only separates events of the same millisecond; a failed read still gives
    // a valid name, and a taken name is caught by the create-only write.
    let _ = getrandom::fill(&mut r);
    format!("{}-{}", at.format(TIME_FORMAT), hex::encode(r))
}

/// The event names under `pins/ID/` for each backup ID, each list sorted (oldest first); keys of
/// another shape are ignored.
fn group(keys: &[String]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for key in keys {
        let Some(rest) = key.strip_prefix(PINS_PREFIX) else {
            continue;
        };
        let Some((id, name)) = rest.split_once('/') else {
            continue;
        };
        if is_valid_id(id) && event_time(name).is_some() {
            out.entry(id.to_owned()).or_default().push(name.to_owned());
        }
    }
    for names in out.values_mut() {
        names.sort();
    }
    out
}

async fn list_keys(repo: &Repository, prefix: &str) -> Result<Vec<String>, Error> {
    let store = repo.store().describe();
    repo.with_retry(&format!("listing {prefix}"), || async {
        repo.store()
            .list(prefix)
            .await
            .map_err(|e| e.into_error("listing", prefix, &store))
    })
    .await
}

/// Reads and checks one event.
async fn read_event(repo: &Repository, id: &str, name: &str) -> Result<PinEvent, Error> {
    let key = format!("{}{name}", pins_prefix(id));
    let bytes = repo
        .with_retry(&format!("reading {key}"), || repo.get_small(&key))
        .await?;
    let bad = |why: String| {
        Error::new(
            ErrorKind::Integrity,
            format!("pin event {key} in {}: {why}", repo.store().describe()),
        )
    };
    let event: PinEvent = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if event.format_version != 1 {
        return Err(Error::new(
            ErrorKind::Configuration,
            format!(
                "pin event {key} has format version {}; this walcore reads version 1",
                event.format_version
            ),
        ));
    }
    if event.backup_id != id {
        return Err(bad(format!("it names backup {}", event.backup_id)));
    }
    let stored = DateTime::parse_from_rfc3339(&event.time)
        .map_err(|e| bad(format!("time '{}': {e}", event.time)))?;
    if Some(stored.with_timezone(&Utc)) != event_time(name) {
        return Err(bad(format!(
            "its time {} is not the one of its name",
            event.time
        )));
    }
    Ok(event)
}

fn state_of(event: &PinEvent) -> PinState {
    let pinned = event.event == PinAction::Pin;
    PinState {
        pinned,
        pin_note: (pinned && !event.note.is_empty()).then(|| event.note.clone()),
        changed: Some(event.time.clone()),
    }
}

/// Backup `id`'s pin state, from its newest event; the name of that event too.
async fn newest(repo: &Repository, id: &str) -> Result<(PinState, Option<String>), Error> {
    let keys = list_keys(repo, &pins_prefix(id)).await?;
    let mut grouped = group(&keys);
    match grouped.remove(id).and_then(|mut names| names.pop()) {
        None => Ok((PinState::default(), None)),
        Some(name) => {
            let event = read_event(repo, id, &name).await?;
            Ok((state_of(&event), Some(name)))
        }
    }
}

/// Backup `id`'s pin state. The backup itself is not looked up.
pub async fn state(repo: &Repository, id: &str) -> Result<PinState, Error> {
    if !is_valid_id(id) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("'{id}' is not a backup ID (they look like 20261130T043012Z-3f9a)"),
        ));
    }
    Ok(newest(repo, id).await?.0)
}

/// The pin state of every backup that has events, by ID, through the repository index: the
/// same answer as [`states_direct`], reading only the events the index does not hold.
pub async fn states(repo: &Repository) -> Result<BTreeMap<String, PinState>, Error> {
    crate::lifecycle::index::pin_states(repo).await
}

/// The name of the newest event of every backup that has events, from one listing of `pins/`.
pub(crate) async fn newest_events(repo: &Repository) -> Result<BTreeMap<String, String>, Error> {
    let keys = list_keys(repo, PINS_PREFIX).await?;
    Ok(group(&keys)
        .into_iter()
        .filter_map(|(id, mut names)| names.pop().map(|n| (id, n)))
        .collect())
}

/// The pin state event `name` of backup `id` sets.
pub(crate) async fn read_state(repo: &Repository, id: &str, name: &str) -> Result<PinState, Error> {
    Ok(state_of(&read_event(repo, id, name).await?))
}

/// The pin state of every backup that has events, by ID, from one listing of `pins/`. A newest
/// event that cannot be read is an error: it must never read as "not pinned".
pub async fn states_direct(repo: &Repository) -> Result<BTreeMap<String, PinState>, Error> {
    let keys = list_keys(repo, PINS_PREFIX).await?;
    let mut out = BTreeMap::new();
    for (id, mut names) in group(&keys) {
        if let Some(name) = names.pop() {
            let event = read_event(repo, &id, &name).await?;
            out.insert(id, state_of(&event));
        }
    }
    Ok(out)
}

fn check_note(note: &str) -> Result<(), Error> {
    if note.len() > MAX_NOTE_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "the pin note is {} bytes long; at most {MAX_NOTE_BYTES} are allowed",
                note.len()
            ),
        ));
    }
    if note.chars().any(char::is_control) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "the pin note contains a control character (a line break, a tab...): write it on \
             one line",
        ));
    }
    Ok(())
}

/// Writes one event for backup `id` at `now` or just after the newest event seen, create-only.
async fn append(
    repo: &Repository,
    id: &str,
    action: PinAction,
    note: &str,
    now: SystemTime,
    newest_name: Option<&str>,
) -> Result<(), Error> {
    let mut at: DateTime<Utc> = now.into();
    // Milliseconds are all a name keeps.
    at = DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(at);
    if let Some(seen) = newest_name.and_then(event_time)
        && at <= seen
    {
        at = seen + chrono::Duration::milliseconds(1);
    }
    let event = PinEvent {
        format_version: 1,
        backup_id: id.to_owned(),
        event: action,
        note: note.to_owned(),
        time: format_time(at.into()),
        created_by: format!("walcore {}", env!("CARGO_PKG_VERSION")),
    };
    let json = serde_json::to_vec_pretty(&event)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("encoding a pin event: {e}")))?;
    for _ in 0..NAME_ATTEMPTS {
        let key = format!("{}{}", pins_prefix(id), event_name(at));
        let outcome = repo
            .with_retry(&format!("writing {key}"), || {
                repo.put_small(&key, json.clone())
            })
            .await?;
        if outcome == PutOutcome::Created {
            return Ok(());
        }
    }
    Err(Error::new(
        ErrorKind::Conflict,
        format!(
            "writing a pin event of backup {id} in {}: every name drawn was taken",
            repo.store().describe()
        ),
    ))
}

/// Pins backup `id` with `note` (empty for none); the backup must exist. Pinning a pinned
/// backup writes a new event (its note replaces the old one).
pub async fn pin(repo: &Repository, id: &str, note: &str) -> Result<PinState, Error> {
    pin_at(repo, id, note, SystemTime::now()).await
}

/// [`pin`] with the clock given.
pub async fn pin_at(
    repo: &Repository,
    id: &str,
    note: &str,
    now: SystemTime,
) -> Result<PinState, Error> {
    check_note(note)?;
    catalog::load(repo, id)
        .await
        .map_err(|e| e.context(format!("pinning backup {id}")))?;
    let (_, newest_name) = newest(repo, id).await?;
    append(repo, id, PinAction::Pin, note, now, newest_name.as_deref()).await?;
    state(repo, id).await
}

/// Unpins backup `id`; the backup must exist. Returns whether it was pinned (nothing is
/// written when it was not).
pub async fn unpin(repo: &Repository, id: &str) -> Result<bool, Error> {
    unpin_at(repo, id, SystemTime::now()).await
}

/// [`unpin`] with the clock given.
pub async fn unpin_at(repo: &Repository, id: &str, now: SystemTime) -> Result<bool, Error> {
    catalog::load(repo, id)
        .await
        .map_err(|e| e.context(format!("unpinning backup {id}")))?;
    let (current, newest_name) = newest(repo, id).await?;
    if !current.pinned {
        return Ok(false);
    }
    append(repo, id, PinAction::Unpin, "", now, newest_name.as_deref()).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backup::catalog::{BackupRecord, commit};
    use crate::codec::{Codec, Compression};
    use crate::pg::WalSegmentSize;
    use crate::repo::RepoMeta;
    use crate::store::{LocalStore, Store};

    const A: &str = "20261130T010000Z-aaaa";
    const B: &str = "20261130T020000Z-bbbb";
    const UNKNOWN: &str = "20261130T030000Z-cccc";

    fn record(id: &str) -> BackupRecord {
        crate::backup::catalog::sample_record(id, "7000000000000000001")
    }

    async fn setup(root: &std::path::Path) -> Repository {
        let r = Repository::new(
            Store::Local(LocalStore::new(root.to_path_buf())),
            Codec::new(Compression::None, None),
            Duration::from_millis(200),
        );
        let seg = WalSegmentSize::new(16 << 20).expect("size");
        r.init_meta(RepoMeta::new(7_000_000_000_000_000_001, 15, seg))
            .await
            .expect("meta");
        for id in [A, B] {
            commit(&r, &record(id)).await.expect("commit");
        }
        r
    }

    fn at(secs: i64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000u64.saturating_add_signed(secs))
    }

    fn event_keys(root: &std::path::Path, id: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(root.join(pins_prefix(id)))
            .map(|d| {
                d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[tokio::test]
    async fn pin_unpin_and_pin_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = setup(dir.path()).await;
        assert_eq!(state(&r, A).await.expect("state"), PinState::default());

        let s = pin_at(&r, A, "keep for the audit", at(0))
            .await
            .expect("pin");
        assert!(s.pinned);
        assert_eq!(s.pin_note.as_deref(), Some("keep for the audit"));
        // The other backup is untouched.
        assert!(!state(&r, B).await.expect("state").pinned);

        assert!(unpin_at(&r, A, at(10)).await.expect("unpin"));
        let s = state(&r, A).await.expect("state");
        assert!(!s.pinned && s.pin_note.is_none(), "{s:?}");
        // Unpinning an unpinned backup writes nothing.
        assert!(!unpin_at(&r, A, at(20)).await.expect("unpin again"));
        assert_eq!(event_keys(dir.path(), A).len(), 2);

        let s = pin_at(&r, A, "", at(30)).await.expect("pin again");
        assert!(s.pinned && s.pin_note.is_none(), "{s:?}");
        let all = states(&r).await.expect("states");
        assert_eq!(all.len(), 1);
        assert!(all[A].pinned);
        // Every event is still there: nothing was overwritten or deleted.
        assert_eq!(event_keys(dir.path(), A).len(), 3);
    }

    #[tokio::test]
    async fn the_newest_event_wins_even_when_the_clock_goes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = setup(dir.path()).await;
        pin_at(&r, A, "first", at(100)).await.expect("pin");
        // A second operator whose clock is an hour behind still writes after what it read.
        assert!(unpin_at(&r, A, at(100 - 3600)).await.expect("unpin"));
        assert!(!state(&r, A).await.expect("state").pinned);
        let names = event_keys(dir.path(), A);
        assert_eq!(names.len(), 2);
        assert!(names[0] < names[1], "{names:?}");
    }

    #[tokio::test]
    async fn events_of_the_same_millisecond_are_ordered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = setup(dir.path()).await;
        pin_at(&r, A, "one", at(5)).await.expect("pin");
        pin_at(&r, A, "two", at(5)).await.expect("pin, same time");
        assert_eq!(
            state(&r, A).await.expect("state").pin_note.as_deref(),
            Some("two")
        );
        assert!(unpin_at(&r, A, at(5)).await.expect("unpin, same time"));
        assert!(!state(&r, A).await.expect("state").pinned);
        let names = event_keys(dir.path(), A);
        assert_eq!(names.len(), 3);
        let times: Vec<_> = names
            .iter()
            .map(|n| event_time(n).expect("shape"))
            .collect();
        assert!(times[0] < times[1] && times[1] < times[2], "{names:?}");

        // Two writers that did not see each other, in the same millisecond: both events stand,
        // and every reader takes the one with the greatest name.
        let t: DateTime<Utc> = at(50).into();
        let concurrent = async |action: PinAction, note: &str| {
            append(&r, B, action, note, t.into(), None)
                .await
                .expect("append")
        };
        concurrent(PinAction::Pin, "left").await;
        concurrent(PinAction::Unpin, "").await;
        let names = event_keys(dir.path(), B);
        assert_eq!(names.len(), 2);
        assert_eq!(event_time(&names[0]), event_time(&names[1]));
        let newest = read_event(&r, B, &names[1]).await.expect("read");
        assert_eq!(
            state(&r, B).await.expect("state").pinned,
            newest.event == PinAction::Pin
        );
        assert_eq!(
            states(&r).await.expect("states")[B].pinned,
            newest.event == PinAction::Pin
        );
    }

    #[tokio::test]
    async fn an_unknown_backup_cannot_be_pinned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = setup(dir.path()).await;
        let e = pin_at(&r, UNKNOWN, "", at(0))
            .await
            .expect_err("unknown backup");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(format!("{e:#}").contains(UNKNOWN), "{e:#}");
        let e = unpin_at(&r, UNKNOWN, at(0))
            .await
            .expect_err("unknown backup");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = pin_at(&r, "../catalog/x", "", at(0))
            .await
            .expect_err("not an ID");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(!dir.path().join(PINS_PREFIX).exists());
    }

    #[tokio::test]
    async fn bad_notes_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = setup(dir.path()).await;
        for note in ["two\nlines".to_owned(), "x".repeat(MAX_NOTE_BYTES + 1)] {
            let e = pin_at(&r, A, &note, at(0)).await.expect_err("bad note");
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
        }
        assert!(event_keys(dir.path(), A).is_empty());
    }

    #[tokio::test]
    async fn an_unreadable_newest_event_is_an_error_not_unpinned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = setup(dir.path()).await;
        pin_at(&r, A, "", at(0)).await.expect("pin");
        let names = event_keys(dir.path(), A);
        let path = dir.path().join(pins_prefix(A)).join(&names[0]);
        std::fs::remove_file(&path).expect("remove");
        std::fs::write(&path, b"garbage").expect("write");
        let e = state(&r, A).await.expect_err("unreadable");
        assert!(format!("{e:#}").contains(&names[0]), "{e:#}");
        assert!(states(&r).await.is_err());
        // A key of another shape is ignored.
        std::fs::create_dir_all(dir.path().join(pins_prefix(B))).expect("mkdir");
        std::fs::write(dir.path().join(pins_prefix(B)).join("notes.txt"), b"hi").expect("write");
        assert!(!state(&r, B).await.expect("state").pinned);
    }
}
