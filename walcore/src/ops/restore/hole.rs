//! Whether an absent WAL segment is the end of the archive or a hole in it (DESIGN.md
//! invariant 8). PostgreSQL takes "absent" for the end of the archive, and at the end of a
//! recovery it promotes: a segment missing in the middle of the archive would silently end
//! recovery with every later transaction lost. So after the store answered that a segment is
//! absent, the repository is asked what lies around it, cheapest question first, and only as far
//! as the decision needs:
//!
//! 1. the first stored segment of the timeline after the requested one: one listing that starts
//!    right after the requested key. None: the end of the archive (so far), "absent". This is
//!    the common case, the one call a recovery makes at its end and a standby makes on each poll.
//! 2. the first stored segment of the timeline: one listing from the timeline's start. Before the
//!    requested one: a hole between two stored segments.
//! 3. for a timeline above 1, its history file: the requested segment is the one the timeline
//!    began in, which PostgreSQL archives with the history file: a hole at the start of the
//!    timeline (without it, recovery to the latest timeline would end on the old one).
//!
//! Otherwise the requested segment precedes what the archive holds of its timeline, and is
//! absent: a cluster restored from a backup taken with its WAL before archiving began asks for
//! such segments (PostgreSQL asks the archive before it looks in `pg_wal`), and so may
//! PostgreSQL for segments of a newer timeline from before that timeline began.
//!
//! A hole found is looked for again during [`HOLE_GRACE`] before it is reported, because
//! look-ahead archiving stores segment N+1 while N is still on its way.

use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind};
use crate::pg::{SegmentNo, TimelineHistory, TimelineId, WalFileKind, WalFileName, WalSegmentSize};
use crate::repo::Repository;
use crate::store::wal_key;

/// How long a segment that looks like a hole is looked for again before the hole is reported.
/// Look-ahead archiving (`ops/lookahead.rs`) uploads the segments after the one PostgreSQL is
/// archiving in parallel with it, so a reader may briefly see N+1 stored and N not yet; one
/// segment's upload normally takes well under this.
pub const HOLE_GRACE: Duration = Duration::from_secs(5);
/// How often the segment is looked for during [`HOLE_GRACE`].
const HOLE_RECHECK: Duration = Duration::from_millis(500);
/// Keys asked for per listing call: the requested segment's own `.backup` and `.partial`
/// files may come before the next segment; one call nearly always suffices.
const LIST_BATCH: usize = 32;

/// What the repository shows about a segment the store reported absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Absence {
    /// No later segment of its timeline is stored: the end of the archive, so far.
    PastTheEnd,
    /// Later segments of its timeline are stored, but the archive of the timeline begins after
    /// it: absent, not missing.
    BeforeStart,
    /// A hole: it should be stored, and `next` is the first stored file after it.
    Hole { next: WalFileName },
}

/// The decision, as a pure function of the evidence: the requested segment number, the first
/// stored segment of its timeline after it (with its name), the first stored segment of the
/// timeline, and the segment the timeline began in according to its history file (`None` for
/// timeline 1 or without a history file).
pub fn decide(
    requested: SegmentNo,
    next: Option<(SegmentNo, WalFileName)>,
    first: Option<SegmentNo>,
    timeline_start: Option<SegmentNo>,
) -> Absence {
    let Some((next_no, next)) = next.filter(|(n, _)| *n > requested) else {
        return Absence::PastTheEnd;
    };
    debug_assert!(next_no > requested);
    if first.is_some_and(|f| f < requested) || timeline_start == Some(requested) {
        Absence::Hole { next }
    } else {
        Absence::BeforeStart
    }
}

/// What [`check`] found for a segment the store reported absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Absent: PostgreSQL may take it for the end of the archive.
    Absent(Absence),
    /// It was stored while a hole was looked at again: restore it.
    Appeared,
}

/// Decides whether absent segment `name` is absent or a hole; a hole is an
/// [`ErrorKind::Hole`] error naming the missing segment and the next stored file.
pub async fn check(repo: &Repository, name: &WalFileName) -> Result<Checked, Error> {
    check_with_grace(repo, name, HOLE_GRACE).await
}

/// [`check`], looking for a hole's segment again for `grace`.
async fn check_with_grace(
    repo: &Repository,
    name: &WalFileName,
    grace: Duration,
) -> Result<Checked, Error> {
    let store = repo.store().describe();
    let meta = repo.read_meta().await?.ok_or_else(|| {
        Error::new(
            ErrorKind::Configuration,
            format!("{store} holds no walcore repository; refusing to report {name} as absent"),
        )
    })?;
    let size = meta.segment_size()?;
    let absence = classify(repo, name, size).await?;
    let Absence::Hole { next } = absence else {
        return Ok(Checked::Absent(absence));
    };
    let key = wal_key(name);
    let waited = Instant::now();
    while waited.elapsed() < grace {
        tokio::time::sleep(HOLE_RECHECK.min(grace)).await;
        // A failing store during the grace time changes nothing: the hole stands.
        if let Ok(Some(_)) = repo.store().head(&key).await {
            tracing::info!(file = %name, "stored while it was looked for again");
            return Ok(Checked::Appeared);
        }
    }
    Err(Error::new(
        ErrorKind::Hole,
        format!(
            "{name} is missing from {store} although {next}, stored later on timeline {}, is \
             there: a hole in the archive, not its end (object {key} absent for {:.1}s). \
             Recovery stops here instead of ending early; put the object back and start the \
             server again",
            name.timeline(),
            waited.elapsed().as_secs_f64()
        ),
    ))
}

/// Gathers the evidence for [`decide`], stopping as soon as the answer is known.
async fn classify(
    repo: &Repository,
    name: &WalFileName,
    size: WalSegmentSize,
) -> Result<Absence, Error> {
    let requested = name.segno(size)?;
    let tli = name.timeline();
    let after = wal_key(name);
    let next = first_stored(repo, tli, Some(after), size, |n| n > requested).await?;
    if next.is_none() {
        return Ok(Absence::PastTheEnd);
    }
    let first = first_stored(repo, tli, None, size, |_| true)
        .await?
        .map(|(n, _)| n);
    let start = if first.is_some_and(|f| f < requested) || tli.0 == 1 {
        None
    } else {
        timeline_start(repo, tli, size).await?
    };
    let absence = decide(requested, next, first, start);
    if absence == Absence::BeforeStart {
        tracing::debug!(
            file = %name,
            first_stored = ?first,
            "later segments of the timeline are stored, but its archive begins after this one"
        );
    }
    Ok(absence)
}

/// The first stored segment (complete or `.partial`) of timeline `tli` whose key sorts after
/// `after` and whose number satisfies `wanted`, with its name.
async fn first_stored(
    repo: &Repository,
    tli: TimelineId,
    mut after: Option<String>,
    size: WalSegmentSize,
    wanted: impl Fn(SegmentNo) -> bool,
) -> Result<Option<(SegmentNo, WalFileName)>, Error> {
    let prefix = format!("wal/{:08X}/", tli.0);
    let store = repo.store().describe();
    loop {
        let keys = repo
            .with_retry(&format!("listing {prefix}"), || async {
                repo.store()
                    .list_after(&prefix, after.as_deref(), LIST_BATCH)
                    .await
                    .map_err(|e| e.into_error("listing", &prefix, &store))
            })
            .await?;
        for key in &keys {
            let Some(name) = key
                .rsplit('/')
                .next()
                .and_then(|f| WalFileName::parse(f).ok())
            else {
                continue;
            };
            if name.timeline() != tli
                || !matches!(name.kind(), WalFileKind::Segment | WalFileKind::Partial)
            {
                continue;
            }
            if let Ok(no) = name.segno(size)
                && wanted(no)
            {
                return Ok(Some((no, name)));
            }
        }
        if keys.len() < LIST_BATCH {
            return Ok(None);
        }
        after = keys.last().cloned();
    }
}

/// The segment timeline `tli` began in, from its history file; `None` without one.
async fn timeline_start(
    repo: &Repository,
    tli: TimelineId,
    size: WalSegmentSize,
) -> Result<Option<SegmentNo>, Error> {
    let key = wal_key(&WalFileName::history(tli));
    let text = match repo
        .with_retry(&format!("reading {key}"), || repo.get_small(&key))
        .await
    {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let history = TimelineHistory::parse(tli, &text).map_err(|e| {
        Error::new(
            ErrorKind::Integrity,
            format!("reading {key} in {}: {e}", repo.store().describe()),
        )
    })?;
    let start = history.start();
    Ok(start.is_valid().then(|| start.segment(size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(no: u64) -> (SegmentNo, WalFileName) {
        let name = WalFileName::segment(TimelineId(2), SegmentNo(no), WalSegmentSize::default());
        (SegmentNo(no), name)
    }

    #[test]
    fn nothing_stored_after_it_is_the_end_of_the_archive() {
        for first in [None, Some(SegmentNo(1)), Some(SegmentNo(9))] {
            for start in [None, Some(SegmentNo(5)), Some(SegmentNo(1))] {
                assert_eq!(
                    decide(SegmentNo(5), None, first, start),
                    Absence::PastTheEnd
                );
            }
        }
    }

    #[test]
    fn between_two_stored_segments_is_a_hole() {
        let next = seg(7);
        assert_eq!(
            decide(SegmentNo(5), Some(next.clone()), Some(SegmentNo(4)), None),
            Absence::Hole { next: next.1 }
        );
        // The history file changes nothing when an earlier segment is stored.
        let next = seg(6);
        assert_eq!(
            decide(
                SegmentNo(5),
                Some(next.clone()),
                Some(SegmentNo(1)),
                Some(SegmentNo(3))
            ),
            Absence::Hole { next: next.1 }
        );
    }

    #[test]
    fn before_the_first_stored_segment_is_absent() {
        // Timeline 1, or no history file: the archive begins at its first stored segment (a
        // backup with its own WAL, taken before archiving began, asks for older ones).
        assert_eq!(
            decide(SegmentNo(5), Some(seg(9)), Some(SegmentNo(9)), None),
            Absence::BeforeStart
        );
        // A newer timeline asked for a segment before it began.
        assert_eq!(
            decide(
                SegmentNo(5),
                Some(seg(8)),
                Some(SegmentNo(8)),
                Some(SegmentNo(8))
            ),
            Absence::BeforeStart
        );
        // Between the timeline's start and its first stored segment: archiving of the timeline
        // began late.
        assert_eq!(
            decide(
                SegmentNo(5),
                Some(seg(9)),
                Some(SegmentNo(9)),
                Some(SegmentNo(3))
            ),
            Absence::BeforeStart
        );
    }

    #[test]
    fn the_first_segment_of_a_timeline_missing_is_a_hole() {
        // Timeline 2 began in segment 5 (its history file says so) and 6 is stored: without 5,
        // recovery to the latest timeline would end on timeline 1.
        let next = seg(6);
        assert_eq!(
            decide(
                SegmentNo(5),
                Some(next.clone()),
                Some(SegmentNo(6)),
                Some(SegmentNo(5))
            ),
            Absence::Hole { next: next.1 }
        );
    }

    /// A file repository whose objects under `keys` exist (their contents do not matter to
    /// the decision), with metadata for 16 MiB segments.
    async fn repository(dir: &std::path::Path, keys: &[String]) -> Repository {
        std::fs::create_dir(dir.join("repo")).expect("repository directory");
        let url = format!("file://{}", dir.join("repo").display());
        let config = crate::config::Config::load_with(crate::config::Layer::default(), |k| {
            (k == "WALCORE_REPO").then(|| url.clone())
        })
        .expect("config");
        let repo = Repository::open(&config).expect("repository");
        let header = crate::pg::parse_long_page_header(&crate::ops::testing::segment(1, 7, 0))
            .expect("header");
        repo.meta_for_push(&header).await.expect("metadata");
        for key in keys {
            repo.put_small(key, b"x".to_vec()).await.expect("object");
        }
        repo
    }

    fn key(tli: u32, no: u64) -> String {
        let name = WalFileName::segment(TimelineId(tli), SegmentNo(no), WalSegmentSize::default());
        wal_key(&name)
    }

    fn name(tli: u32, no: u64) -> WalFileName {
        WalFileName::segment(TimelineId(tli), SegmentNo(no), WalSegmentSize::default())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_repository_decides_hole_or_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = [
            // Timeline 1: 1, 2, 4, a backup history file of 5, then 6 as `.partial`.
            key(1, 1),
            key(1, 2),
            key(1, 4),
            format!("{}.00000028.backup", key(1, 5)),
            format!("{}.partial", key(1, 6)),
            // Timeline 2 began in segment 0x105 (its history file), 0x106 and 0x107 stored.
            key(2, 0x106),
            key(2, 0x107),
            // Timeline 3 began in 0x107; its history file is absent; 0x109 stored.
            key(3, 0x109),
        ];
        let repo = repository(dir.path(), &keys).await;
        // Timeline 2's history file as PostgreSQL writes it: it began at 1/5000060.
        let history = wal_key(&WalFileName::history(TimelineId(2)));
        repo.put_small(
            &history,
            b"1\t1/5000060\tno recovery target specified\n".to_vec(),
        )
        .await
        .expect("history");
        let grace = Duration::ZERO;
        let check = |tli: u32, no: u64| {
            let repo = repo.clone();
            async move { check_with_grace(&repo, &name(tli, no), grace).await }
        };
        let hole = |r: Result<Checked, Error>, next: WalFileName| {
            let e = r.expect_err("a hole");
            assert_eq!(e.kind(), ErrorKind::Hole, "{e}");
            assert!(e.to_string().contains(&next.to_string()), "{e}");
        };
        // Between two stored segments.
        hole(check(1, 3).await, name(1, 4));
        // Before the `.partial` of a later segment, across a `.backup` file.
        hole(
            check(1, 5).await,
            name(1, 6).with_kind(WalFileKind::Partial),
        );
        // Past the end, and before the first stored segment.
        assert_eq!(
            check(1, 7).await.expect("absent"),
            Checked::Absent(Absence::PastTheEnd)
        );
        assert_eq!(
            check(1, 0).await.expect("absent"),
            Checked::Absent(Absence::BeforeStart)
        );
        // Timeline 2: its first segment missing is a hole; before it, absent.
        hole(check(2, 0x105).await, name(2, 0x106));
        assert_eq!(
            check(2, 0x104).await.expect("absent"),
            Checked::Absent(Absence::BeforeStart)
        );
        // Timeline 3 without a history file: before its first stored segment, absent.
        assert_eq!(
            check(3, 0x107).await.expect("absent"),
            Checked::Absent(Absence::BeforeStart)
        );
        // An empty timeline.
        assert_eq!(
            check(4, 0x107).await.expect("absent"),
            Checked::Absent(Absence::PastTheEnd)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_segment_stored_during_the_grace_time_is_no_hole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = repository(dir.path(), &[key(1, 1), key(1, 3)]).await;
        let late = {
            let repo = repo.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                repo.put_small(&key(1, 2), b"x".to_vec()).await
            })
        };
        let checked = check_with_grace(&repo, &name(1, 2), Duration::from_secs(10))
            .await
            .expect("no hole");
        assert_eq!(checked, Checked::Appeared);
        late.await.expect("join").expect("late segment");
    }

    #[test]
    fn a_next_file_not_after_the_requested_one_is_not_evidence() {
        // Its own `.partial` (the end of a promoted timeline) is not a later segment.
        let (_, name) = seg(5);
        let partial = name.with_kind(WalFileKind::Partial);
        assert_eq!(
            decide(
                SegmentNo(5),
                Some((SegmentNo(5), partial)),
                Some(SegmentNo(1)),
                None
            ),
            Absence::PastTheEnd
        );
    }
}
