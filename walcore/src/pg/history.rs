//! Timeline history files (`00000002.history`): which timelines a timeline descends from and
//! where it branched off each of them. Mirrors `readTimeLineHistory` in
//! `src/backend/access/transam/timeline.c`.
//!
//! A line is `parentTLI<TAB>switchpoint<TAB>reason`: the parent timeline ran until
//! `switchpoint` (an LSN, `%X/%X`), where its child took over. Blank lines and lines starting
//! with `#` are skipped; what follows the switch point is ignored, as PostgreSQL ignores it. The
//! timeline of the file itself begins at the last line's switch point.

use super::error::{HistoryProblem, PgError};
use super::lsn::{Lsn, TimelineId};

/// One line of a history file: `parent` ran until `switch_point`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The ancestor timeline.
    pub parent: TimelineId,
    /// Where it ended and its child began (`TimeLineHistoryEntry.end`).
    pub switch_point: Lsn,
}

/// A parsed timeline history file: the ancestors of `timeline`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineHistory {
    timeline: TimelineId,
    entries: Vec<HistoryEntry>,
}

impl TimelineHistory {
    /// Parses the history file of `timeline` (the `TTTTTTTT` of its name), rejecting what
    /// `readTimeLineHistory` rejects: a line without a numeric timeline and a switch point,
    /// parent timelines that do not increase, a parent not below `timeline`.
    pub fn parse(timeline: TimelineId, text: &[u8]) -> Result<TimelineHistory, PgError> {
        let fail = |line: usize, problem| PgError::InvalidHistory {
            timeline,
            line,
            problem,
        };
        let text = std::str::from_utf8(text).map_err(|_| fail(0, HistoryProblem::NotText))?;
        let mut entries: Vec<HistoryEntry> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (tli, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let parent = tli
                .parse::<u32>()
                .map_err(|_| fail(i + 1, HistoryProblem::BadTimeline))?;
            let lsn = rest.split_whitespace().next().unwrap_or("");
            let switch_point = lsn
                .parse::<Lsn>()
                .map_err(|_| fail(i + 1, HistoryProblem::BadSwitchPoint))?;
            if entries.last().is_some_and(|e| parent <= e.parent.0) {
                return Err(fail(i + 1, HistoryProblem::NotIncreasing));
            }
            if parent >= timeline.0 {
                return Err(fail(i + 1, HistoryProblem::NotBelowTimeline));
            }
            entries.push(HistoryEntry {
                parent: TimelineId(parent),
                switch_point,
            });
        }
        Ok(TimelineHistory { timeline, entries })
    }

    /// The timeline the file describes.
    pub fn timeline(&self) -> TimelineId {
        self.timeline
    }

    /// The ancestors, oldest first.
    pub fn entries(&self) -> &[HistoryEntry] {
        &self.entries
    }

    /// The path of a timeline without a history file: timeline 1, or one whose history was
    /// never archived (it is then treated as having no ancestors).
    pub fn root(timeline: TimelineId) -> TimelineHistory {
        TimelineHistory {
            timeline,
            entries: Vec::new(),
        }
    }

    /// Whether `timeline` is on this path (an ancestor or the timeline itself).
    pub fn includes(&self, timeline: TimelineId) -> bool {
        timeline == self.timeline || self.entries.iter().any(|e| e.parent == timeline)
    }

    /// Where the WAL of `timeline` stops being on this path: its switch point (`None` for the
    /// path's own timeline, which never stops, and for a timeline not on the path).
    pub fn end_of(&self, timeline: TimelineId) -> Option<Lsn> {
        self.entries
            .iter()
            .find(|e| e.parent == timeline)
            .map(|e| e.switch_point)
    }

    /// Where `timeline` starts on this path: the switch point before it, or 0/0 for the first.
    /// `None` for a timeline not on the path.
    pub fn start_of(&self, timeline: TimelineId) -> Option<Lsn> {
        if !self.includes(timeline) {
            return None;
        }
        let mut start = Lsn::INVALID;
        for e in &self.entries {
            if e.parent == timeline {
                return Some(start);
            }
            start = e.switch_point;
        }
        Some(start)
    }

    /// Whether the WAL of `timeline` up to `lsn` is on this path: the timeline is on it, and
    /// `lsn` is not past the point where the path left it (`tliOfPointInHistory`).
    pub fn reaches(&self, timeline: TimelineId, lsn: Lsn) -> bool {
        self.includes(timeline) && self.end_of(timeline).is_none_or(|end| lsn <= end)
    }

    /// The timeline of the path that holds position `lsn`: `tliOfPointInHistory`.
    pub fn timeline_at(&self, lsn: Lsn) -> TimelineId {
        self.entries
            .iter()
            .find(|e| lsn < e.switch_point)
            .map_or(self.timeline, |e| e.parent)
    }

    /// Where the timeline begins: the switch point of its last ancestor, or [`Lsn::INVALID`]
    /// when the file names none (the `begin` of the last entry `readTimeLineHistory` returns).
    pub fn start(&self) -> Lsn {
        self.entries.last().map_or(Lsn::INVALID, |e| e.switch_point)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_what_postgresql_writes() {
        // As `writeTimeLineHistory` writes it after two promotions.
        let text = b"1\t0/5000060\tno recovery target specified\n\n\
                     2\t0/9000028\tat restore point \"before\"\n";
        let h = TimelineHistory::parse(TimelineId(3), text).expect("history");
        assert_eq!(h.timeline(), TimelineId(3));
        assert_eq!(
            h.entries(),
            &[
                HistoryEntry {
                    parent: TimelineId(1),
                    switch_point: Lsn(0x500_0060)
                },
                HistoryEntry {
                    parent: TimelineId(2),
                    switch_point: Lsn(0x900_0028)
                },
            ]
        );
        assert_eq!(h.start(), Lsn(0x900_0028));
        // Comments, blank lines, spaces instead of tabs, no reason.
        let h = TimelineHistory::parse(TimelineId(2), b"# comment\n  \n 1 16/B374D848\n")
            .expect("history");
        assert_eq!(h.start(), Lsn(0x16_B374_D848));
        // No ancestors.
        let h = TimelineHistory::parse(TimelineId(2), b"").expect("empty");
        assert_eq!(h.start(), Lsn::INVALID);
    }

    #[test]
    fn positions_on_a_path() {
        let text = b"1\t0/3000158\tno recovery target specified\n\n\
                     2\t0/5000000\tbefore 2026-11-30 04:30:12.5+00\n";
        let h = TimelineHistory::parse(TimelineId(3), text).expect("valid history");
        assert_eq!(h.start_of(TimelineId(1)), Some(Lsn(0)));
        assert_eq!(h.start_of(TimelineId(2)), Some(Lsn(0x300_0158)));
        assert_eq!(h.start_of(TimelineId(3)), Some(Lsn(0x500_0000)));
        assert_eq!(h.start_of(TimelineId(4)), None);
        assert_eq!(h.end_of(TimelineId(3)), None);
        assert!(h.reaches(TimelineId(1), Lsn(0x300_0158)));
        assert!(!h.reaches(TimelineId(1), Lsn(0x300_0159)));
        assert!(h.reaches(TimelineId(3), Lsn(u64::MAX)));
        assert!(!h.reaches(TimelineId(4), Lsn(1)));
        assert_eq!(h.timeline_at(Lsn(0x300_0157)), TimelineId(1));
        assert_eq!(h.timeline_at(Lsn(0x300_0158)), TimelineId(2));
        assert_eq!(h.timeline_at(Lsn(0x900_0000)), TimelineId(3));
        let root = TimelineHistory::root(TimelineId(1));
        assert!(root.reaches(TimelineId(1), Lsn(7)));
        assert_eq!(root.start_of(TimelineId(1)), Some(Lsn(0)));
    }

    #[test]
    fn rejects_what_postgresql_rejects() {
        let problem = |tli: u32, text: &[u8]| match TimelineHistory::parse(TimelineId(tli), text) {
            Err(PgError::InvalidHistory { line, problem, .. }) => (line, problem),
            other => panic!("{text:?}: {other:?}"),
        };
        assert_eq!(problem(2, b"x\t0/1\n"), (1, HistoryProblem::BadTimeline));
        assert_eq!(problem(2, b"1\n"), (1, HistoryProblem::BadSwitchPoint));
        assert_eq!(problem(2, b"1\t0-1\n"), (1, HistoryProblem::BadSwitchPoint));
        assert_eq!(
            problem(4, b"2\t0/1\n\n2\t0/2\n"),
            (3, HistoryProblem::NotIncreasing)
        );
        assert_eq!(
            problem(2, b"2\t0/1\n"),
            (1, HistoryProblem::NotBelowTimeline)
        );
        assert_eq!(problem(2, b"1\t0/1\xff\n"), (0, HistoryProblem::NotText));
        // The message names the file and the line, not its contents.
        let e = TimelineHistory::parse(TimelineId(2), b"secret\t0/1\n").expect_err("bad");
        assert!(e.to_string().contains("00000002.history"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    proptest! {
        #[test]
        fn any_bytes_give_a_history_or_an_error(
            tli in 1u32..,
            data in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let _ = TimelineHistory::parse(TimelineId(tli), &data);
        }

        #[test]
        fn written_histories_read_back(
            points in proptest::collection::vec(any::<u64>(), 0..6),
        ) {
            let mut text = String::new();
            for (i, p) in points.iter().enumerate() {
                text.push_str(&format!("{}\t{}\treason {i}\n", i + 1, Lsn(*p)));
            }
            let tli = TimelineId(u32::try_from(points.len()).unwrap_or(u32::MAX) + 1);
            let h = TimelineHistory::parse(tli, text.as_bytes()).expect("history");
            let got: Vec<u64> = h.entries().iter().map(|e| e.switch_point.0).collect();
            prop_assert_eq!(&got, &points);
            prop_assert_eq!(h.start(), points.last().map_or(Lsn::INVALID, |p| Lsn(*p)));
        }
    }
}
