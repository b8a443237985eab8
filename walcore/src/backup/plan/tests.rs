use super::*;
use crate::backup::catalog::TablespaceEntry;

const SEG: u64 = 16 << 20;

fn record(id: &str, stop_time: &str, timeline: u32, start: u64, stop: u64) -> BackupRecord {
    BackupRecord {
        format_version: 1,
        id: id.to_owned(),
        label: "t".into(),
        system_identifier: "1".into(),
        pg_version_num: 150_000,
        wal_segment_size: SEG as u32,
        start_lsn: Lsn(start),
        start_timeline: timeline,
        stop_lsn: Lsn(stop),
        stop_timeline: timeline,
        start_time: stop_time.to_owned(),
        stop_time: stop_time.to_owned(),
        checkpoint: "fast".into(),
        wal_included: false,
        tablespaces: Vec::<TablespaceEntry>::new(),
        objects: vec![],
        created_by: "test".into(),
    }
}

fn request(target: Target) -> Request {
    Request {
        target,
        exclusive: false,
        action: TargetAction::Promote,
        timeline: TargetTimeline::Latest,
        backup: None,
        archive_mode: ArchiveMode::Preserve,
        allow_unreached: false,
        restore_command: "walcore-restore %f %p".into(),
    }
}

fn facts(records: Vec<BackupRecord>) -> Facts {
    Facts {
        records,
        histories: BTreeMap::new(),
        ends: BTreeMap::new(),
        seg_size: WalSegmentSize::new(SEG as u32).expect("size"),
    }
}

fn at(t: &str) -> Target {
    Target::parse_time(t).expect("time")
}

fn two_backups() -> Vec<BackupRecord> {
    vec![
        record(
            "20261130T010000Z-aaaa",
            "2026-11-30T01:00:05.000Z",
            1,
            0x0200_0028,
            0x0300_0000,
        ),
        record(
            "20261130T020000Z-bbbb",
            "2026-11-30T02:00:05.000Z",
            1,
            0x0400_0028,
            0x0500_0000,
        ),
    ]
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
    assert_eq!(
        at("2026-11-30 05:30:12.5+01").setting(),
        Some((
            "recovery_target_time",
            "2026-11-30 04:30:12.500000+00".to_owned()
        ))
    );
}

#[test]
fn chooses_the_newest_backup_before_the_target() {
    let f = facts(two_backups());
    let p = plan(&f, &request(at("2026-11-30 01:30:00+00"))).expect("one");
    assert_eq!(p.backup.id, "20261130T010000Z-aaaa");
    assert!(
        p.reason.contains("finished before the target"),
        "{}",
        p.reason
    );
    assert_eq!(p.wal_first.to_string(), "000000010000000000000002");
    let p = plan(&f, &request(at("2026-11-30 03:00:00Z"))).expect("one");
    assert_eq!(p.backup.id, "20261130T020000Z-bbbb");
    let e = plan(&f, &request(at("2026-11-30 00:59:00Z"))).unwrap_err();
    assert!(e.to_string().contains("no backup finished before"), "{e}");
    assert!(e.to_string().contains("20261130T010000Z-aaaa"), "{e}");
    let p = plan(&f, &request(Target::Lsn(Lsn(0x0400_0000)))).expect("lsn");
    assert_eq!(p.backup.id, "20261130T010000Z-aaaa");
    let p = plan(&f, &request(Target::End)).expect("end");
    assert_eq!(p.backup.id, "20261130T020000Z-bbbb");
    let mut r = request(at("2026-11-30 01:30:00+00"));
    r.backup = Some("20261130T020000Z-bbbb".into());
    let e = plan(&f, &r).unwrap_err();
    assert!(e.to_string().contains("after the target"), "{e}");
    assert!(plan(&facts(vec![]), &request(Target::End)).is_err());
}

#[test]
fn the_backup_must_lie_on_the_target_timelines_history() {
    // Timeline 2 left timeline 1 at 0/4800000: the second backup (on timeline 1, stopped at
    // 0/5000000) is on a branch that timeline 2 never saw.
    let mut f = facts(two_backups());
    let history = TimelineHistory::parse(TimelineId(2), b"1\t0/4800000\tpromoted\n").expect("h");
    f.histories.insert(TimelineId(2), history);
    let p = plan(&f, &request(Target::End)).expect("plan");
    assert_eq!(p.path.timeline(), TimelineId(2));
    assert_eq!(p.backup.id, "20261130T010000Z-aaaa");
    assert!(
        p.reason.contains("20261130T020000Z-bbbb (timeline 1)"),
        "{}",
        p.reason
    );

    // Along timeline 1 itself, the newer backup is fine.
    let mut r = request(Target::End);
    r.timeline = TargetTimeline::Id(TimelineId(1));
    assert_eq!(
        plan(&f, &r).expect("plan").backup.id,
        "20261130T020000Z-bbbb"
    );
    r.timeline = TargetTimeline::Current;
    assert_eq!(
        plan(&f, &r).expect("plan").backup.id,
        "20261130T020000Z-bbbb"
    );

    // --backup naming the off-path one is refused, saying why.
    let mut r = request(Target::End);
    r.backup = Some("20261130T020000Z-bbbb".into());
    let e = plan(&f, &r).unwrap_err().to_string();
    assert!(e.contains("left timeline 1 at LSN 0/4800000"), "{e}");

    // A backup taken on timeline 2 is on timeline 2's history, and newest.
    f.records.push(record(
        "20261130T030000Z-cccc",
        "2026-11-30T03:00:05.000Z",
        2,
        0x0600_0028,
        0x0700_0000,
    ));
    assert_eq!(
        plan(&f, &request(Target::End)).expect("plan").backup.id,
        "20261130T030000Z-cccc"
    );
    // Asking for timeline 1 never picks it.
    let mut r = request(Target::End);
    r.timeline = TargetTimeline::Id(TimelineId(1));
    assert_eq!(
        plan(&f, &r).expect("plan").backup.id,
        "20261130T020000Z-bbbb"
    );
    // An unknown timeline is an error naming the known ones.
    r.timeline = TargetTimeline::Id(TimelineId(7));
    let e = plan(&f, &r).unwrap_err().to_string();
    assert!(e.contains("timeline 7") && e.contains("1, 2"), "{e}");
}

#[test]
fn a_target_the_archive_does_not_reach_is_refused_before_anything_is_written() {
    let mut f = facts(two_backups());
    let newest = WalFileName::parse("000000010000000000000007").expect("name");
    f.ends.insert(
        TimelineId(1),
        ArchivedEnd {
            segment: newest,
            stored_at: "2026-11-30T02:30:00Z".parse().expect("time"),
        },
    );
    let e = plan(&f, &request(at("2026-11-30 02:45:00+00")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not reach the target"), "{e}");
    assert!(e.contains("000000010000000000000007"), "{e}");
    assert!(e.contains("pg_switch_wal()"), "{e}");
    assert!(e.contains("archive_timeout"), "{e}");
    assert!(plan(&f, &request(at("2026-11-30 02:20:00+00"))).is_ok());
    // Segment 7 holds WAL up to 0/8000000.
    assert!(plan(&f, &request(Target::Lsn(Lsn(0x07FF_FFFF)))).is_ok());
    assert!(plan(&f, &request(Target::Lsn(Lsn(0x0800_0000)))).is_err());
    let mut r = request(at("2026-11-30 02:45:00+00"));
    r.allow_unreached = true;
    let p = plan(&f, &r).expect("allowed");
    assert!(
        p.notes
            .iter()
            .any(|n| n.contains("--allow-unreached-target"))
    );
    // Targets without a position are not checked.
    assert!(plan(&f, &request(Target::Name("x".into()))).is_ok());
}

#[test]
fn settings_clear_every_other_target_and_set_one_last() {
    let mut r = request(Target::Xid(1234));
    r.exclusive = true;
    r.archive_mode = ArchiveMode::Off;
    let p = plan(&facts(two_backups()), &r).expect("plan");
    let names: Vec<&str> = p.settings.iter().map(|(n, _)| *n).collect();
    let xid = names
        .iter()
        .position(|n| *n == "recovery_target_xid")
        .expect("xid");
    for other in [
        "recovery_target",
        "recovery_target_lsn",
        "recovery_target_name",
        "recovery_target_time",
    ] {
        let i = names.iter().position(|n| *n == other).expect(other);
        assert!(i < xid, "{other} after the target");
        assert_eq!(p.settings[i].1, "");
    }
    let get = |n: &str| {
        p.settings
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("recovery_target_xid"), Some("1234"));
    assert_eq!(get("recovery_target_inclusive"), Some("off"));
    assert_eq!(get("archive_mode"), Some("off"));
    assert_eq!(get("recovery_min_apply_delay"), Some("0"));
    assert_eq!(get("recovery_target_timeline"), Some("latest"));
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "a setting written twice");

    let mut r = request(Target::Immediate);
    r.exclusive = true;
    assert!(plan(&facts(two_backups()), &r).is_err());
}

#[test]
fn the_backups_own_recovery_settings_are_removed() {
    let p = plan(&facts(two_backups()), &request(Target::End)).expect("plan");
    let existing = "# Do not edit this file manually!\n\
                    # It will be overwritten by the ALTER SYSTEM command.\n\
                    work_mem = '8MB'\n\
                    restore_command = 'cp /old/%f %p'\n\
                    Recovery_Target='immediate'\n\
                    recovery_target_action = 'shutdown'\n\
                    promote_trigger_file = '/tmp/x'\n\
                    archive_mode = 'on'\n\
                    \n\
                    # Recovery settings written by walcore restore at 2026-01-01 00:00:00+00\n\
                    # walcore: backup old, target x\n\
                    recovery_target_lsn = '0/1'\n";
    let (text, removed) = rewrite_auto_conf(existing, &p, "2026-12-04 10:00:00+00");
    assert!(text.starts_with("# Do not edit this file manually!\n"));
    assert!(text.contains("work_mem = '8MB'\n"));
    assert!(
        text.contains("archive_mode = 'on'\n"),
        "preserve keeps archive_mode"
    );
    assert!(!text.contains("cp /old"));
    assert!(!text.contains("immediate"));
    assert!(!text.contains("shutdown"));
    assert!(!text.contains("promote_trigger_file"));
    assert!(!text.contains("backup old"));
    assert!(!text.contains("'0/1'"));
    assert!(text.contains("backup 20261130T020000Z-bbbb, target the end of the archived WAL"));
    assert!(text.contains("restore_command = 'walcore-restore %f %p'\n"));
    assert!(text.contains("recovery_target = ''\n"));
    assert_eq!(
        removed,
        vec![
            "restore_command",
            "recovery_target",
            "recovery_target_action",
            "promote_trigger_file",
            "recovery_target_lsn"
        ]
    );
    // Rewriting the result again changes nothing but the time.
    let (again, removed) = rewrite_auto_conf(&text, &p, "2026-12-04 10:00:00+00");
    assert_eq!(again, text);
    assert_eq!(removed.len(), p.settings.len());

    let mut r = request(Target::End);
    r.archive_mode = ArchiveMode::Off;
    let p = plan(&facts(two_backups()), &r).expect("plan");
    let (text, _) = rewrite_auto_conf(existing, &p, "now");
    assert!(!text.contains("archive_mode = 'on'"));
    assert!(text.contains("archive_mode = 'off'\n"));
}

#[test]
fn names_in_configuration_lines() {
    assert_eq!(
        setting_name("  recovery_target='x'"),
        Some("recovery_target".into())
    );
    assert_eq!(setting_name("Work_Mem = 1"), Some("work_mem".into()));
    assert_eq!(setting_name("#restore_command = 'x'"), None);
    assert_eq!(setting_name("include 'other.conf'"), None);
    assert_eq!(setting_name(""), None);
}

#[test]
fn the_plan_prints_what_it_will_do() {
    let mut f = facts(two_backups());
    f.histories.insert(
        TimelineId(2),
        TimelineHistory::parse(TimelineId(2), b"1\t0/6000000\tpromoted\n").expect("h"),
    );
    let text = plan(&f, &request(Target::End)).expect("plan").to_string();
    for expected in [
        "20261130T020000Z-bbbb",
        "timeline:  2 (recovery_target_timeline = 'latest'): 1 (to 0/6000000) → 2",
        "from 000000010000000000000004",
        "restore_command = 'walcore-restore %f %p'",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
}

#[test]
fn timelines_and_archive_modes_parse() {
    assert_eq!("latest".parse(), Ok(TargetTimeline::Latest));
    assert_eq!("current".parse(), Ok(TargetTimeline::Current));
    assert_eq!("3".parse(), Ok(TargetTimeline::Id(TimelineId(3))));
    assert!("0".parse::<TargetTimeline>().is_err());
    assert!("x".parse::<TargetTimeline>().is_err());
    assert_eq!("off".parse(), Ok(ArchiveMode::Off));
    assert_eq!("preserve".parse(), Ok(ArchiveMode::Preserve));
    assert!("on".parse::<ArchiveMode>().is_err());
    assert_eq!(escape_percent("a%b%%"), "a%%b%%%%");
}

#[test]
fn a_restore_to_the_consistent_point_tells_walcore_restore_the_last_segment_it_needs() {
    let seg = WalSegmentSize::new(16 << 20).expect("size");
    let last = WalFileName::segment(TimelineId(2), crate::pg::SegmentNo(0x10C), seg);
    assert_eq!(
        super::bounded_restore_command(
            "WALCORE_REPO=file:///r '/usr/bin/walcore-restore' %f %p",
            &last
        ),
        "WALCORE_REPO=file:///r '/usr/bin/walcore-restore' --last-needed 00000002000000010000000C %f %p"
    );
    // A command of the user's own is written as given.
    for own in ["cp /archive/%f %p", "/usr/bin/walcore-restore %f %p --json"] {
        assert_eq!(super::bounded_restore_command(own, &last), own);
    }
}
