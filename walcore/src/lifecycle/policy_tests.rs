use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use proptest::prelude::*;

use super::*;
use crate::pg::{SegmentNo, TimelineHistory, TimelineId, WalFileName, WalSegmentSize};

const DAY: Duration = Duration::from_secs(86_400);
/// The smallest segment size PostgreSQL allows keeps the generated key listings short.
const SEG: u64 = 1 << 20;

fn seg_size() -> WalSegmentSize {
    WalSegmentSize::MIN
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A catalog record with what the policy reads: its ID, stop time and WAL span.
fn record(id: &str, stop: DateTime<Utc>, start: (u32, u64), end: (u32, u64)) -> BackupRecord {
    BackupRecord {
        format_version: 1,
        id: id.to_owned(),
        label: id.to_owned(),
        system_identifier: "1".into(),
        pg_version_num: 150_000,
        wal_segment_size: 1 << 20,
        start_lsn: Lsn(start.1),
        start_timeline: start.0,
        stop_lsn: Lsn(end.1),
        stop_timeline: end.0,
        start_time: time_text(stop),
        stop_time: time_text(stop),
        checkpoint: "fast".into(),
        wal_included: false,
        tablespaces: vec![],
        objects: vec![],
        created_by: "test".into(),
    }
}

/// A backup on timeline 1 covering segment `seg` (start in it, stop in it).
fn on_tl1(id: &str, stop: &str, seg: u64) -> BackupRecord {
    record(id, at(stop), (1, seg * SEG + 0x28), (1, seg * SEG + 0x100))
}

fn no_pins() -> BTreeMap<String, Option<String>> {
    BTreeMap::new()
}

fn no_histories() -> BTreeMap<TimelineId, TimelineHistory> {
    BTreeMap::new()
}

fn kept(plan: &RetentionPlan) -> BTreeSet<String> {
    plan.kept().map(str::to_owned).collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

fn reasons_of(plan: &RetentionPlan, id: &str) -> Vec<String> {
    let b = plan
        .backups
        .iter()
        .find(|b| b.id == id)
        .unwrap_or_else(|| panic!("{id} not in plan"));
    match &b.verdict {
        Verdict::Keep { reasons } => reasons.iter().map(ToString::to_string).collect(),
        Verdict::Expire { nearest } => {
            vec![format!(
                "expire: {}",
                nearest.as_ref().map_or("-".into(), ToString::to_string)
            )]
        }
    }
}

fn segment_key(tli: u32, seg: u64) -> String {
    crate::store::wal_key(&WalFileName::segment(
        TimelineId(tli),
        SegmentNo(seg),
        seg_size(),
    ))
}

#[test]
fn a_policy_without_rules_is_refused() {
    let b = [on_tl1("a", "2026-12-01T00:00:00Z", 2)];
    let e = retention_plan(
        &Policy::default(),
        &b,
        &no_pins(),
        &no_histories(),
        at("2026-12-04T00:00:00Z"),
    )
    .expect_err("no rule");
    assert_eq!(e.kind(), ErrorKind::Configuration);
    assert!(e.to_string().contains("no retention rule"), "{e}");
}

#[test]
fn a_record_whose_stop_is_before_its_start_is_refused() {
    let b = [record(
        "bad",
        at("2026-12-01T00:00:00Z"),
        (1, 5 * SEG),
        (1, 2 * SEG),
    )];
    let policy = Policy {
        keep_last: 1,
        ..Policy::default()
    };
    let e = retention_plan(
        &policy,
        &b,
        &no_pins(),
        &no_histories(),
        at("2026-12-04T00:00:00Z"),
    )
    .expect_err("bad record");
    assert_eq!(e.kind(), ErrorKind::Integrity);
    assert!(e.to_string().contains("backup bad"), "{e}");
}

#[test]
fn keep_last_keeps_the_newest_and_equal_stop_times_order_by_id() {
    let b = [
        on_tl1("a", "2026-12-01T00:00:00Z", 2),
        on_tl1("c", "2026-12-02T00:00:00Z", 4),
        on_tl1("b", "2026-12-02T00:00:00Z", 3),
        on_tl1("d", "2026-11-30T00:00:00Z", 1),
    ];
    let policy = Policy {
        keep_last: 2,
        ..Policy::default()
    };
    let plan = retention_plan(
        &policy,
        &b,
        &no_pins(),
        &no_histories(),
        at("2026-12-04T00:00:00Z"),
    )
    .expect("plan");
    // "c" and "b" stopped together: "c" is the newer.
    assert_eq!(kept(&plan), set(&["c", "b"]));
    assert_eq!(
        reasons_of(&plan, "c"),
        ["newest complete backup", "last (1st newest, keep-last 2)"]
    );
    assert_eq!(
        reasons_of(&plan, "a"),
        ["expire: last (3rd newest, keep-last 2)"]
    );
    let ids: Vec<&str> = plan.backups.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["c", "b", "a", "d"]);
}

#[test]
fn keep_daily_counts_days_that_have_a_backup_and_keeps_the_newest_of_each() {
    let b = [
        on_tl1("d1-early", "2026-12-01T08:00:00Z", 1),
        on_tl1("d1-late", "2026-12-01T20:00:00Z", 2),
        // Nothing on 12-02 and 12-03: empty days do not use a slot.
        on_tl1("d4", "2026-12-04T01:00:00Z", 3),
        on_tl1("d5-early", "2026-12-05T00:00:00Z", 4),
        on_tl1("d5-late", "2026-12-05T23:59:59Z", 5),
        on_tl1("n30", "2026-11-30T12:00:00Z", 0),
    ];
    let policy = Policy {
        keep_daily: 3,
        ..Policy::default()
    };
    let plan = retention_plan(
        &policy,
        &b,
        &no_pins(),
        &no_histories(),
        at("2026-12-06T00:00:00Z"),
    )
    .expect("plan");
    assert_eq!(kept(&plan), set(&["d5-late", "d4", "d1-late"]));
    assert_eq!(
        reasons_of(&plan, "d1-late"),
        ["daily (3rd day, 2026-12-01, keep-daily 3)"]
    );
    assert_eq!(
        reasons_of(&plan, "n30"),
        ["expire: daily (4th day, 2026-11-30, keep-daily 3)"]
    );
    // Not the newest of its day: no rule came near.
    assert_eq!(reasons_of(&plan, "d1-early"), ["expire: -"]);
}

#[test]
fn weekly_buckets_are_iso_weeks_and_monthly_yearly_are_calendar_buckets_in_utc() {
    let b = [
        // 2025-12-28 is a Sunday of 2025-W52; Monday 2025-12-29 starts 2026-W01.
        on_tl1("sun", "2025-12-28T23:00:00Z", 1),
        on_tl1("mon", "2025-12-29T01:00:00Z", 2),
        on_tl1("thu", "2026-01-01T10:00:00Z", 3),
    ];
    let now = at("2026-01-02T00:00:00Z");
    let weekly = Policy {
        keep_weekly: 5,
        ..Policy::default()
    };
    let plan = retention_plan(&weekly, &b, &no_pins(), &no_histories(), now).expect("plan");
    assert_eq!(kept(&plan), set(&["thu", "sun"]));
    assert_eq!(
        reasons_of(&plan, "sun"),
        ["weekly (2nd week, 2025-W52, keep-weekly 5)"]
    );
    let monthly = Policy {
        keep_monthly: 1,
        ..Policy::default()
    };
    let plan = retention_plan(&monthly, &b, &no_pins(), &no_histories(), now).expect("plan");
    assert_eq!(kept(&plan), set(&["thu"]));
    assert_eq!(
        reasons_of(&plan, "mon"),
        ["expire: monthly (2nd month, 2025-12, keep-monthly 1)"]
    );
    let yearly = Policy {
        keep_yearly: 2,
        ..Policy::default()
    };
    let plan = retention_plan(&yearly, &b, &no_pins(), &no_histories(), now).expect("plan");
    assert_eq!(kept(&plan), set(&["thu", "mon"]));
}

#[test]
fn keep_within_is_relative_to_now() {
    let b = [
        on_tl1("old", "2026-11-20T00:00:00Z", 1),
        on_tl1("edge", "2026-11-27T00:00:00Z", 2),
        on_tl1("new", "2026-12-01T00:00:00Z", 3),
    ];
    let policy = Policy {
        keep_within: Some(7 * DAY),
        ..Policy::default()
    };
    let plan = retention_plan(
        &policy,
        &b,
        &no_pins(),
        &no_histories(),
        at("2026-12-04T00:00:00Z"),
    )
    .expect("plan");
    assert_eq!(kept(&plan), set(&["edge", "new"]));
    assert_eq!(reasons_of(&plan, "edge"), ["within (keep-within 7d)"]);
}

#[test]
fn pinned_backups_and_the_newest_are_always_kept() {
    let b = [
        on_tl1("old", "2020-01-01T00:00:00Z", 1),
        on_tl1("mid", "2024-01-01T00:00:00Z", 2),
        on_tl1("new", "2026-12-01T00:00:00Z", 3),
    ];
    let mut pins = BTreeMap::new();
    pins.insert("old".to_owned(), Some("before the upgrade".to_owned()));
    pins.insert("gone".to_owned(), None);
    let policy = Policy {
        keep_within: Some(DAY),
        ..Policy::default()
    };
    let plan = retention_plan(
        &policy,
        &b,
        &pins,
        &no_histories(),
        at("2026-12-04T00:00:00Z"),
    )
    .expect("plan");
    assert_eq!(kept(&plan), set(&["old", "new"]));
    assert_eq!(reasons_of(&plan, "old"), ["pinned (before the upgrade)"]);
    assert_eq!(plan.unknown_pins, ["gone"]);
    // The pinned backup keeps only its own span; the newest is the open-ended anchor.
    assert_eq!(
        plan.wal[&TimelineId(1)],
        [
            LsnRange {
                from: Lsn(SEG + 0x28),
                to: Some(Lsn(SEG + 0x100))
            },
            LsnRange {
                from: Lsn(3 * SEG + 0x28),
                to: None
            }
        ]
    );
}

#[test]
fn the_pitr_window_keeps_wal_from_the_newest_backup_before_its_start() {
    let b = [
        on_tl1("w0", "2026-11-20T00:00:00Z", 1),
        on_tl1("w1", "2026-11-26T00:00:00Z", 3),
        on_tl1("w2", "2026-11-29T00:00:00Z", 5),
        on_tl1("w3", "2026-12-03T00:00:00Z", 7),
    ];
    let policy = Policy {
        keep_last: 1,
        pitr_window: Some(7 * DAY),
        ..Policy::default()
    };
    let now = at("2026-12-04T00:00:00Z");
    let plan = retention_plan(&policy, &b, &no_pins(), &no_histories(), now).expect("plan");
    // w1 finished before now - 7d (11-27): the window starts there; w2 has no rule.
    assert_eq!(kept(&plan), set(&["w1", "w3"]));
    assert_eq!(
        reasons_of(&plan, "w1"),
        ["start of the restorable window (pitr-window 7d)"]
    );
    assert_eq!(
        plan.wal[&TimelineId(1)],
        [LsnRange {
            from: Lsn(3 * SEG + 0x28),
            to: None
        }]
    );
    let w = plan.window.as_ref().expect("window");
    assert_eq!((w.base.as_str(), w.covers_request), ("w1", true));
    // A window longer than the history: from the oldest backup, and said so.
    let policy = Policy {
        pitr_window: Some(30 * DAY),
        ..Policy::default()
    };
    let plan = retention_plan(&policy, &b, &no_pins(), &no_histories(), now).expect("plan");
    assert_eq!(kept(&plan), set(&["w0", "w3"]));
    let w = plan.window.as_ref().expect("window");
    assert_eq!((w.base.as_str(), w.covers_request), ("w0", false));
    assert!(
        plan.to_string().contains("shorter than pitr-window 30d"),
        "{plan}"
    );
}

#[test]
fn without_a_window_wal_is_kept_from_the_oldest_backup_of_last_within_or_daily() {
    let b = [
        on_tl1("y2024", "2024-06-01T00:00:00Z", 1),
        on_tl1("d1", "2026-12-01T00:00:00Z", 3),
        on_tl1("d2", "2026-12-02T00:00:00Z", 5),
        on_tl1("d3", "2026-12-03T00:00:00Z", 7),
    ];
    let policy = Policy {
        keep_daily: 2,
        keep_yearly: 5,
        ..Policy::default()
    };
    let plan = retention_plan(
        &policy,
        &b,
        &no_pins(),
        &no_histories(),
        at("2026-12-04T00:00:00Z"),
    )
    .expect("plan");
    assert_eq!(kept(&plan), set(&["y2024", "d2", "d3"]));
    // The yearly backup keeps its span; the daily ones the WAL from d2 on.
    assert_eq!(
        plan.wal[&TimelineId(1)],
        [
            LsnRange {
                from: Lsn(SEG + 0x28),
                to: Some(Lsn(SEG + 0x100))
            },
            LsnRange {
                from: Lsn(5 * SEG + 0x28),
                to: None
            }
        ]
    );
    let keys: Vec<String> = (0..10).map(|s| segment_key(1, s)).collect();
    let sweep = wal_to_delete(&plan, seg_size(), keys.iter().map(String::as_str));
    let deleted: Vec<&str> = sweep.delete.iter().map(String::as_str).collect();
    assert_eq!(
        deleted,
        [
            keys[0].as_str(),
            keys[2].as_str(),
            keys[3].as_str(),
            keys[4].as_str()
        ]
    );
    assert_eq!(sweep.kept, 6);
}

/// Timeline 2 branched off timeline 1 at 0/400000 (segment 4); a backup on 1 before it.
fn branched() -> BTreeMap<TimelineId, TimelineHistory> {
    let h = TimelineHistory::parse(TimelineId(2), b"1\t0/400000\tno recovery target\n")
        .expect("history");
    BTreeMap::from([(TimelineId(2), h)])
}

#[test]
fn wal_follows_the_timeline_switch_and_not_the_parent_after_it() {
    let b = [
        on_tl1("tl1", "2026-12-01T00:00:00Z", 2),
        record(
            "tl2",
            at("2026-12-03T00:00:00Z"),
            (2, 6 * SEG + 0x28),
            (2, 6 * SEG + 0x100),
        ),
    ];
    let policy = Policy {
        keep_last: 2,
        ..Policy::default()
    };
    let plan = retention_plan(
        &policy,
        &b,
        &no_pins(),
        &branched(),
        at("2026-12-04T00:00:00Z"),
    )
    .expect("plan");
    assert_eq!(
        plan.wal[&TimelineId(1)],
        [LsnRange {
            from: Lsn(2 * SEG + 0x28),
            to: Some(Lsn(4 * SEG))
        }]
    );
    assert_eq!(
        plan.wal[&TimelineId(2)],
        [LsnRange {
            from: Lsn(4 * SEG),
            to: None
        }]
    );
    let mut keys: Vec<String> = (0..9).map(|s| segment_key(1, s)).collect();
    keys.extend((4..9).map(|s| segment_key(2, s)));
    keys.push("wal/history/00000002.history".into());
    let sweep = wal_to_delete(&plan, seg_size(), keys.iter().map(String::as_str));
    let expected: Vec<String> = [0, 1, 5, 6, 7, 8]
        .iter()
        .map(|&s| segment_key(1, s))
        .collect();
    assert_eq!(sweep.delete, expected);
    assert!(sweep.unclassified.is_empty(), "{:?}", sweep.unclassified);

    // Timeline 1 went on after the branch (a backup there): then it is kept past it.
    let mut b2 = b.to_vec();
    b2.push(on_tl1("tl1-after", "2026-12-03T12:00:00Z", 7));
    let plan = retention_plan(
        &policy,
        &b2,
        &no_pins(),
        &branched(),
        at("2026-12-04T00:00:00Z"),
    )
    .expect("plan");
    assert!(plan.needs(TimelineId(1), Lsn(8 * SEG), Lsn(9 * SEG - 1)));
}

#[test]
fn a_backup_across_a_switch_keeps_both_sides_of_it() {
    let b = [
        record(
            "across",
            at("2026-11-01T00:00:00Z"),
            (1, 3 * SEG + 0x28),
            (2, 5 * SEG + 0x100),
        ),
        record(
            "newest",
            at("2026-12-03T00:00:00Z"),
            (2, 8 * SEG + 0x28),
            (2, 8 * SEG + 0x100),
        ),
    ];
    let mut pins = BTreeMap::new();
    pins.insert("across".to_owned(), None);
    let policy = Policy {
        keep_last: 1,
        ..Policy::default()
    };
    let plan =
        retention_plan(&policy, &b, &pins, &branched(), at("2026-12-04T00:00:00Z")).expect("plan");
    assert_eq!(
        plan.wal[&TimelineId(1)],
        [LsnRange {
            from: Lsn(3 * SEG + 0x28),
            to: Some(Lsn(4 * SEG))
        }]
    );
    assert_eq!(
        plan.wal[&TimelineId(2)],
        [
            LsnRange {
                from: Lsn(4 * SEG),
                to: Some(Lsn(5 * SEG + 0x100))
            },
            LsnRange {
                from: Lsn(8 * SEG + 0x28),
                to: None
            }
        ]
    );
}

#[test]
fn keys_that_cannot_be_classified_are_left_alone_and_history_files_stay() {
    let b = [on_tl1("a", "2026-12-01T00:00:00Z", 5)];
    let policy = Policy {
        keep_last: 1,
        ..Policy::default()
    };
    let plan = retention_plan(
        &policy,
        &b,
        &no_pins(),
        &branched(),
        at("2026-12-04T00:00:00Z"),
    )
    .expect("plan");
    let keys = [
        "wal/history/00000002.history",
        "wal/history/00000009.history",
        "wal/00000001/00000000/000000010000000000000001",
        "wal/00000001/00000000/000000010000000000000001.partial",
        "wal/00000001/00000000/000000010000000000000001.00000028.backup",
        "wal/00000001/00000000/000000010000000000000005",
        "wal/00000001/00000000/000000010000000000000005.partial",
        // Unknown timeline, wrong place, bad names, not WAL, segment too large for 1 MiB.
        "wal/00000007/00000000/000000070000000000000001",
        "wal/00000001/00000001/000000010000000000000001",
        "wal/00000001/00000000/not-a-wal-name",
        "wal/history/000000010000000000000001",
        "catalog/20261201T000000Z-abcd",
        "wal/00000001/00000000/0000000100000000000FFFFF",
    ];
    let sweep = wal_to_delete(&plan, seg_size(), keys);
    assert_eq!(
        sweep.delete,
        [keys[2], keys[3], keys[4]].map(str::to_owned).to_vec()
    );
    assert_eq!(sweep.kept, 4);
    let left: Vec<&str> = sweep.unclassified.iter().map(|u| u.key.as_str()).collect();
    assert_eq!(left, keys[7..].to_vec());
    assert!(
        sweep.unclassified[0].reason.contains("timeline 7"),
        "{:?}",
        sweep.unclassified
    );
}

#[test]
fn the_plan_prints_what_goes_and_why_and_serializes() {
    let mut b = [
        on_tl1("old", "2026-11-01T00:00:00Z", 1),
        on_tl1("new", "2026-12-03T00:00:00Z", 3),
    ];
    b[0].objects.push(crate::backup::catalog::ObjectEntry {
        key: "backup/old/data/base.tar".into(),
        kind: crate::backup::catalog::ObjectKind::Archive,
        name: "base.tar".into(),
        plaintext_len: 4096,
        plaintext_crc32: 0,
        stored_len: 1234,
    });
    let policy = Policy {
        keep_daily: 1,
        pitr_window: Some(DAY),
        ..Policy::default()
    };
    let plan = retention_plan(
        &policy,
        &b,
        &no_pins(),
        &no_histories(),
        at("2026-12-04T00:00:00Z"),
    )
    .expect("plan");
    let text = plan.to_string();
    for part in [
        "retention plan at 2026-12-04T00:00:00Z (keep-daily 1, pitr-window 1d)",
        "backups: 1 kept, 1 expire (1234 bytes freed)",
        "expire old (stopped 2026-11-01T00:00:00.000Z, 1234 bytes): no rule keeps it; nearest: \
         daily (2nd day, 2026-11-01, keep-daily 1)",
        "timeline 1: 0/300028 .. (end)",
        "restorable window: every point from 2026-12-03T00:00:00.000Z (end of backup new)",
    ] {
        assert!(text.contains(part), "{part:?} not in\n{text}");
    }
    let json = serde_json::to_value(&plan).expect("json");
    assert_eq!(json["backups"][1]["verdict"], "expire");
    assert_eq!(json["expired_bytes"], 1234);
    assert_eq!(json["backups"][1]["nearest"]["rule"], "daily");
    assert_eq!(json["backups"][0]["reasons"][0]["rule"], "newest");
    assert_eq!(json["wal"]["1"][0]["from"], "0/300028");
    assert!(json["wal"]["1"][0]["to"].is_null());
}

// ---- Property tests against a reference written from the rules' wording. ----

/// A random history: timelines 1..=k, each after the first branching off an earlier one at a
/// point past that one's start; and backups along those paths.
#[derive(Debug, Clone)]
struct Case {
    histories: BTreeMap<TimelineId, TimelineHistory>,
    backups: Vec<BackupRecord>,
    pins: BTreeMap<String, Option<String>>,
    policy: Policy,
    now: DateTime<Utc>,
}

fn path(histories: &BTreeMap<TimelineId, TimelineHistory>, t: u32) -> TimelineHistory {
    histories
        .get(&TimelineId(t))
        .cloned()
        .unwrap_or_else(|| TimelineHistory::root(TimelineId(t)))
}

fn any_case() -> impl Strategy<Value = Case> {
    let branches = proptest::collection::vec((any::<u32>(), 1u64..16 * SEG), 0..4);
    let backups = proptest::collection::vec(
        (
            any::<u32>(),
            0u64..40 * SEG,
            0u64..3 * SEG,
            prop_oneof![0i64..(3 * 365), 0i64..8],
            prop_oneof![Just(0i64), Just(12 * 3600), 0i64..86_400],
            any::<bool>(),
        ),
        0..14,
    );
    let counts = proptest::collection::vec(prop_oneof![Just(0u32), 0u32..5], 5);
    let durations = (
        proptest::option::of(0u32..400),
        proptest::option::of(0u32..400),
    );
    (branches, backups, counts, durations, 0i64..86_400 * 30).prop_map(
        |(branches, backups, counts, (within, window), now_offset)| {
            let mut histories = BTreeMap::new();
            for (i, (parent, offset)) in branches.iter().enumerate() {
                let t = i as u32 + 2;
                let parent = parent % (t - 1) + 1;
                let p = path(&histories, parent);
                let mut text = String::new();
                for e in p.entries() {
                    text.push_str(&format!("{}\t{}\tr\n", e.parent.0, e.switch_point));
                }
                let s = Lsn(p.start().0 + offset);
                text.push_str(&format!("{parent}\t{s}\tr\n"));
                let h = TimelineHistory::parse(TimelineId(t), text.as_bytes()).expect("history");
                histories.insert(TimelineId(t), h);
            }
            let k = branches.len() as u32 + 1;
            let base = Utc
                .with_ymd_and_hms(2023, 1, 1, 0, 0, 0)
                .single()
                .expect("time");
            let mut records = Vec::new();
            let mut pins = BTreeMap::new();
            for (i, (home, start, len, day, secs, pinned)) in backups.iter().enumerate() {
                let home = home % k + 1;
                let p = path(&histories, home);
                // Start somewhere on the home timeline's path.
                let start = Lsn(start + p.start().0 / 2);
                let stop = Lsn(start.0 + len);
                let stop_time =
                    base + chrono::TimeDelta::days(*day) + chrono::TimeDelta::seconds(*secs);
                let id = format!("b{i:02}");
                records.push(record(
                    &id,
                    stop_time,
                    (p.timeline_at(start).0, start.0),
                    (p.timeline_at(stop).0, stop.0),
                ));
                if *pinned && i % 3 == 0 {
                    pins.insert(id, None);
                }
            }
            let mut policy = Policy {
                keep_last: counts[0],
                keep_within: within.map(|d| DAY * d),
                keep_daily: counts[1],
                keep_weekly: counts[2],
                keep_monthly: counts[3],
                keep_yearly: counts[4],
                pitr_window: window.map(|d| DAY * d),
            };
            if !policy.has_rule() {
                policy.keep_last = 1;
            }
            let now =
                base + chrono::TimeDelta::days(3 * 365) + chrono::TimeDelta::seconds(now_offset);
            Case {
                histories,
                backups: records,
                pins,
                policy,
                now,
            }
        },
    )
}

/// The kept set, straight from the rules' wording, one backup at a time.
fn reference_kept(case: &Case) -> BTreeSet<String> {
    let key = |r: &BackupRecord| (r.stop().expect("stop"), r.id.clone());
    let bs = &case.backups;
    let p = &case.policy;
    let mut out = BTreeSet::new();
    let oldest = bs.iter().min_by_key(|r| key(r));
    let base = p.pitr_window.map(|w| {
        let cut = case.now - chrono::TimeDelta::from_std(w).expect("window");
        bs.iter()
            .filter(|r| r.stop().expect("stop") <= cut)
            .max_by_key(|r| key(r))
            .or(oldest)
    });
    for b in bs {
        let newer = bs.iter().filter(|o| key(o) > key(b)).count();
        let bucket_rule = |n: u32, bucket: &dyn Fn(&BackupRecord) -> String| {
            let mine = bucket(b);
            let head = !bs.iter().any(|o| key(o) > key(b) && bucket(o) == mine);
            let later: BTreeSet<String> = bs.iter().map(bucket).filter(|k| *k > mine).collect();
            head && (later.len() as u64) < u64::from(n)
        };
        let day = |r: &BackupRecord| r.stop().expect("stop").format("%Y-%m-%d").to_string();
        let week = |r: &BackupRecord| {
            let w = r.stop().expect("stop").iso_week();
            format!("{}-W{:02}", w.year(), w.week())
        };
        let month = |r: &BackupRecord| r.stop().expect("stop").format("%Y-%m").to_string();
        let year = |r: &BackupRecord| r.stop().expect("stop").format("%Y").to_string();
        let keep = case.pins.contains_key(&b.id)
            || newer == 0
            || (newer as u64) < u64::from(p.keep_last)
            || p.keep_within.is_some_and(|d| {
                b.stop().expect("stop") >= case.now - chrono::TimeDelta::from_std(d).expect("d")
            })
            || bucket_rule(p.keep_daily, &day)
            || bucket_rule(p.keep_weekly, &week)
            || bucket_rule(p.keep_monthly, &month)
            || bucket_rule(p.keep_yearly, &year)
            || base.flatten().is_some_and(|r| r.id == b.id);
        if keep {
            out.insert(b.id.clone());
        }
    }
    out
}

/// The (timeline, segment) pairs that restoring `r` along its stop timeline's path reads.
fn needed_segments(
    histories: &BTreeMap<TimelineId, TimelineHistory>,
    tip: u32,
    from: Lsn,
    to: Lsn,
) -> BTreeSet<(u32, u64)> {
    let p = path(histories, tip);
    let mut out = BTreeSet::new();
    for seg in from.0 / SEG..=to.0 / SEG {
        let lo = from.max(Lsn(seg * SEG));
        let hi = to.min(Lsn(seg * SEG + SEG - 1));
        out.insert((p.timeline_at(lo).0, seg));
        out.insert((p.timeline_at(hi).0, seg));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn the_kept_set_is_what_the_rules_say(case in any_case()) {
        let plan = retention_plan(&case.policy, &case.backups, &case.pins, &case.histories, case.now)
            .expect("plan");
        let got: BTreeSet<String> = plan.kept().map(str::to_owned).collect();
        prop_assert_eq!(got, reference_kept(&case));
        // Every backup is in the plan once, newest first.
        prop_assert_eq!(plan.backups.len(), case.backups.len());
        for pair in plan.backups.windows(2) {
            prop_assert!((&pair[0].stop_time, &pair[0].id) > (&pair[1].stop_time, &pair[1].id));
        }
    }

    #[test]
    fn deleted_wal_is_never_needed(case in any_case()) {
        let plan = retention_plan(&case.policy, &case.backups, &case.pins, &case.histories, case.now)
            .expect("plan");
        let mut keys: Vec<String> = Vec::new();
        let tls: Vec<u32> = plan.timelines.iter().map(|t| t.0).chain([9]).collect();
        for &t in &tls {
            for s in 0..60 {
                keys.push(segment_key(t, s));
                if s % 7 == 3 {
                    keys.push(format!("{}.partial", segment_key(t, s)));
                }
            }
            keys.push(format!("wal/history/{:08X}.history", t));
        }
        let sweep = wal_to_delete(&plan, seg_size(), keys.iter().map(String::as_str));
        let deleted: BTreeSet<&str> = sweep.delete.iter().map(String::as_str).collect();
        prop_assert_eq!(deleted.len() + sweep.kept + sweep.unclassified.len(), keys.len());
        for k in &deleted {
            prop_assert!(!k.ends_with(".history"));
            prop_assert!(!k.starts_with("wal/00000009/"), "unknown timeline deleted: {}", k);
            let name = WalFileName::parse(k.rsplit('/').next().unwrap_or("")).expect("name");
            let lo = name.segno(seg_size()).expect("segno").start_lsn(seg_size());
            prop_assert!(!plan.needs(name.timeline(), lo, Lsn(lo.0 + SEG - 1)));
        }
        let gone = |t: u32, s: u64| {
            deleted.contains(segment_key(t, s).as_str())
                || deleted.contains(format!("{}.partial", segment_key(t, s)).as_str())
        };
        // Every kept backup's span, read along its own path.
        let kept: BTreeSet<&str> = plan.kept().collect();
        for r in case.backups.iter().filter(|r| kept.contains(r.id.as_str())) {
            for (t, s) in needed_segments(&case.histories, r.stop_timeline, r.start_lsn, r.stop_lsn) {
                prop_assert!(!gone(t, s), "backup {} needs segment {} of timeline {}", r.id, s, t);
            }
        }
        // Every second of the window: from its base to the end of every newest timeline
        // (one no other timeline descends from) whose path goes through the base's start.
        if let Some(w) = &plan.window {
            let base = case.backups.iter().find(|r| r.id == w.base).expect("base");
            prop_assert!(kept.contains(base.id.as_str()));
            let mut known: BTreeSet<u32> = case.histories.keys().map(|t| t.0).collect();
            known.extend(case.backups.iter().flat_map(|r| [r.start_timeline, r.stop_timeline]));
            let leaves = known.iter().copied().filter(|&t| {
                !known.iter().any(|&u| u != t && path(&case.histories, u).includes(TimelineId(t)))
            });
            for tip in leaves {
                if !path(&case.histories, tip).reaches(TimelineId(base.start_timeline), base.start_lsn) {
                    continue;
                }
                prop_assert!(w.timelines.contains(&TimelineId(tip)));
                for (t, s) in needed_segments(&case.histories, tip, base.start_lsn, Lsn(60 * SEG - 1)) {
                    prop_assert!(!gone(t, s), "window needs segment {} of timeline {}", s, t);
                }
            }
        }
    }
}
