//! Timeline history files (`TTTTTTTT.history`): which timelines a timeline descends from, and
//! where each ancestor was left. Mirrors `readTimeLineHistory` and `tliOfPointInHistory` of
//! PostgreSQL's `access/transam/timeline.c`.
//!
//! A history file of timeline `T` has one line per ancestor, oldest first:
//! `<parent TLI> <tab> <switch point LSN> <tab> <reason>`; blank lines and lines starting with
//! `#` are ignored. The switch point is the LSN at which the parent's WAL stops being on `T`'s
//! path: everything of the parent before it is shared, everything from it on belongs to the
//! next timeline of the path.

use super::error::{PgError, quoted};
use super::lsn::{Lsn, TimelineId};

/// One ancestor on a timeline's path: `timeline` is followed until `end` (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    pub timeline: TimelineId,
    /// The switch point: the first position that is no longer on this ancestor.
    pub end: Lsn,
}

/// The path of a timeline: its ancestors with their switch points, then itself (open-ended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineHistory {
    timeline: TimelineId,
    ancestors: Vec<HistoryEntry>,
}

impl TimelineHistory {
    /// The path of a timeline that has no history file: timeline 1, or one whose history is
    /// unknown (it is then treated as having no ancestors).
    pub fn root(timeline: TimelineId) -> TimelineHistory {
        TimelineHistory {
            timeline,
            ancestors: Vec::new(),
        }
    }

    /// Parses the history file of `timeline` as `readTimeLineHistory` does: ancestors must have
    /// increasing timeline IDs below `timeline` and non-decreasing switch points.
    pub fn parse(timeline: TimelineId, text: &str) -> Result<TimelineHistory, PgError> {
        let bad = |line: usize, why: &str| PgError::InvalidHistory {
            timeline,
            line,
            problem: why.to_owned(),
        };
        let mut ancestors: Vec<HistoryEntry> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let tli = fields
                .next()
                .and_then(|f| f.parse::<u32>().ok())
                .filter(|t| *t >= 1)
                .ok_or_else(|| bad(i + 1, "the first field is not a timeline ID"))?;
            let end: Lsn = fields
                .next()
                .ok_or_else(|| bad(i + 1, "no switch point after the timeline ID"))?
                .parse()
                .map_err(|e: PgError| bad(i + 1, &e.to_string()))?;
            if let Some(prev) = ancestors.last() {
                if tli <= prev.timeline.0 {
                    return Err(bad(i + 1, "timeline IDs must be in increasing order"));
                }
                if end < prev.end {
                    return Err(bad(i + 1, "switch points must not go backwards"));
                }
            }
            if tli >= timeline.0 {
                return Err(bad(
                    i + 1,
                    &format!(
                        "ancestor {tli} is not older than the timeline {} itself",
                        quoted(&timeline.to_string())
                    ),
                ));
            }
            ancestors.push(HistoryEntry {
                timeline: TimelineId(tli),
                end,
            });
        }
        if timeline.0 > 1 && ancestors.is_empty() {
            return Err(bad(0, "it lists no parent timeline"));
        }
        Ok(TimelineHistory {
            timeline,
            ancestors,
        })
    }

    /// The timeline this history leads to.
    pub fn timeline(&self) -> TimelineId {
        self.timeline
    }

    /// The ancestors, oldest first.
    pub fn ancestors(&self) -> &[HistoryEntry] {
        &self.ancestors
    }

    /// Whether `timeline` is on this path (an ancestor or the timeline itself).
    pub fn includes(&self, timeline: TimelineId) -> bool {
        timeline == self.timeline || self.ancestors.iter().any(|a| a.timeline == timeline)
    }

    /// Where the WAL of `timeline` stops being on this path (`None`: it never does, it is the
    /// path's own timeline; also `None` for a timeline not on the path).
    pub fn end_of(&self, timeline: TimelineId) -> Option<Lsn> {
        self.ancestors
            .iter()
            .find(|a| a.timeline == timeline)
            .map(|a| a.end)
    }

    /// Where `timeline` starts on this path: the previous switch point, or 0/0 for the first.
    /// `None` for a timeline not on the path.
    pub fn start_of(&self, timeline: TimelineId) -> Option<Lsn> {
        if !self.includes(timeline) {
            return None;
        }
        let mut start = Lsn(0);
        for a in &self.ancestors {
            if a.timeline == timeline {
                return Some(start);
            }
            start = a.end;
        }
        Some(start)
    }

    /// Whether the WAL of `timeline` up to `lsn` (inclusive) is on this path: the timeline is
    /// on it, and `lsn` comes before the point where the path left it (`tliOfPointInHistory`).
    pub fn reaches(&self, timeline: TimelineId, lsn: Lsn) -> bool {
        self.includes(timeline) && self.end_of(timeline).is_none_or(|end| lsn <= end)
    }

    /// The timeline of the path that holds position `lsn`: `tliOfPointInHistory`.
    pub fn timeline_at(&self, lsn: Lsn) -> TimelineId {
        self.ancestors
            .iter()
            .find(|a| lsn < a.end)
            .map_or(self.timeline, |a| a.timeline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TL3: &str = "1\t0/3000158\tno recovery target specified\n\n\
                       2\t0/5000000\tbefore 2026-11-30 04:30:12.5+00\n";

    #[test]
    fn parses_what_postgresql_writes() {
        let h = TimelineHistory::parse(TimelineId(3), TL3).expect("valid history");
        assert_eq!(h.timeline(), TimelineId(3));
        assert_eq!(
            h.ancestors(),
            &[
                HistoryEntry {
                    timeline: TimelineId(1),
                    end: Lsn(0x300_0158)
                },
                HistoryEntry {
                    timeline: TimelineId(2),
                    end: Lsn(0x500_0000)
                }
            ]
        );
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
    }

    #[test]
    fn comments_and_the_root_timeline() {
        let h = TimelineHistory::parse(TimelineId(2), "# a comment\n1\t0/16B3748\tpromoted\n")
            .expect("valid history");
        assert_eq!(h.ancestors().len(), 1);
        let root = TimelineHistory::root(TimelineId(1));
        assert!(root.reaches(TimelineId(1), Lsn(7)));
        assert_eq!(root.start_of(TimelineId(1)), Some(Lsn(0)));
    }

    #[test]
    fn refuses_what_postgresql_would_not_write() {
        for bad in [
            "",
            "x\t0/1\treason\n",
            "1\n",
            "1\tnot-an-lsn\treason\n",
            "2\t0/1\tr\n1\t0/2\tr\n",
            "1\t0/5\tr\n2\t0/4\tr\n",
            "3\t0/5\tr\n",
        ] {
            assert!(
                TimelineHistory::parse(TimelineId(3), bad).is_err(),
                "{bad:?} was accepted"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_text_gives_a_value_or_an_error(text in ".{0,200}", tli in 1u32..10) {
            let _ = TimelineHistory::parse(TimelineId(tli), &text);
        }
    }
}
