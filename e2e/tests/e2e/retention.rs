//! Retention end to end, on real PostgreSQL 15: `walcore expire` deletes exactly what its
//! policy lets go and nothing a kept backup, a pin or the restorable window needs.
//!
//! Backups at past dates are real takes whose clock is faked with libfaketime (the Debian
//! package `faketime`): the take runs with `LD_PRELOAD` and an absolute `FAKETIME` start, so its
//! ID, `start_time` and `stop_time` carry that date, while its monotonic clock (timers, retries,
//! the wait for its WAL) stays real. The expected outcome of each expire is worked out here from
//! the dates by hand ([`PLAN`]), never by the library's policy.
//!
//! - On `file://` and on S3 (moto), one cluster and one repository each: 21 takes dated from
//!   2017 to 2025; `expire --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --keep-yearly 7`,
//!   first `--dry-run`, then for real, keeps exactly the planned set, with the planned reasons,
//!   and deletes the other backups' objects and the WAL nothing kept needs. Then an old backup
//!   is pinned, two backups are taken in real time with commits around them, and
//!   `expire --keep-last 1 --pitr-window` keeps the pin and the window: a restore to a commit
//!   time in the window has exactly the rows committed before it, and a restore to a time whose
//!   WAL expired is refused before anything is written, while the pinned backup, whose following
//!   WAL expired, restores with `--target-immediate` with the rows committed before it
//!   (PostgreSQL reads ahead past the consistent point: that read must not meet a "hole").
//! - On `file://`: a restored cluster promoted to timeline 2 archives into the same repository;
//!   after `expire --keep-last 2`, the newest backup of timeline 1 and the backup of timeline 2
//!   both restore to the end of their timelines with every row.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use walcore_e2e::repo::{Codec, KEY_1, wal_key};
use walcore_e2e::sys::Output;
use walcore_e2e::workload::{create_table, fingerprint, insert_batch};
use walcore_e2e::{Cluster, Moto, Repo, bins, moto};

use crate::backup::{Tool, conninfo, empty_cluster, prepare_restored};
use crate::scenario::{self, ARCHIVE_WAIT, assert_promoted};

/// libfaketime, from the distribution's `faketime` package (`scripts/test` installs it).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The policy everyone asks for.
const GFS: [&str; 8] = [
    "--keep-daily",
    "7",
    "--keep-weekly",
    "4",
    "--keep-monthly",
    "12",
    "--keep-yearly",
    "7",
];

/// One take of the date plan: when its clock says it runs (UTC), its ISO week, and the rules
/// that keep it under 7/4/12/7 (empty: it expires), as the JSON report names them.
struct Dated {
    at: &'static str,
    week: &'static str,
    keep: &'static [&'static str],
}

/// The date plan, oldest first (the order of the takes, so that LSNs grow with the dates).
///
/// Worked out by hand, newest first. Days with a backup: 2025-01-15 (two backups), 01-13,
/// 01-08, 01-03, 2024-12-30, 12-27, 12-20 are the 7 kept by `keep-daily`; 12-16 is the 8th. ISO
/// weeks: 2025-W03, W02, W01 (2024-12-30 belongs to it, and is older than 2025-01-03), 2024-W52
/// are the 4 of `keep-weekly`; W51 is the 5th. Months: 2025-01, 2024-12 (newest 12-30), 2024-11
/// (newest 11-08), 2024-08, 05, 02, 2023-10, 2023-03, 2022-06, 2020-06, 2019-06, 2018-06 are the
/// 12 of `keep-monthly`; 2017-06 is the 13th. Years: 2025, 2024 (newest 12-30), 2023 (newest
/// 10-11), 2022, 2020, 2019, 2018 are the 7 of `keep-yearly` (2021 has no backup and takes no
/// slot); 2017 is the 8th. So every rule keeps some backups and drops others, both the older
/// backups of its buckets and the buckets past its count, and four backups expire: the morning
/// backup of 2025-01-15, 2024-12-16, 2024-11-02 and 2017-06-14.
const PLAN: [Dated; 21] = [
    d("2017-06-14 10:00:00", "2017-W24", &[]),
    d("2018-06-13 10:00:00", "2018-W24", &["monthly", "yearly"]),
    d("2019-06-12 10:00:00", "2019-W24", &["monthly", "yearly"]),
    d("2020-06-10 10:00:00", "2020-W24", &["monthly", "yearly"]),
    d("2022-06-08 10:00:00", "2022-W23", &["monthly", "yearly"]),
    d("2023-03-15 10:00:00", "2023-W11", &["monthly"]),
    d("2023-10-11 10:00:00", "2023-W41", &["monthly", "yearly"]),
    d("2024-02-07 10:00:00", "2024-W06", &["monthly"]),
    d("2024-05-22 10:00:00", "2024-W21", &["monthly"]),
    d("2024-08-14 10:00:00", "2024-W33", &["monthly"]),
    d("2024-11-02 10:00:00", "2024-W44", &[]),
    d("2024-11-08 10:00:00", "2024-W45", &["monthly"]),
    d("2024-12-16 10:00:00", "2024-W51", &[]),
    d("2024-12-20 10:00:00", "2024-W51", &["daily"]),
    d("2024-12-27 10:00:00", "2024-W52", &["daily", "weekly"]),
    d(
        "2024-12-30 10:00:00",
        "2025-W01",
        &["daily", "monthly", "yearly"],
    ),
    d("2025-01-03 10:00:00", "2025-W01", &["daily", "weekly"]),
    d("2025-01-08 10:00:00", "2025-W02", &["daily", "weekly"]),
    d("2025-01-13 10:00:00", "2025-W03", &["daily"]),
    d("2025-01-15 09:00:00", "2025-W03", &[]),
    d(
        "2025-01-15 18:00:00",
        "2025-W03",
        &["newest", "daily", "weekly", "monthly", "yearly"],
    ),
];

const fn d(at: &'static str, week: &'static str, keep: &'static [&'static str]) -> Dated {
    Dated { at, week, keep }
}

/// The take of [`PLAN`] that gets pinned (kept above by `keep-monthly` and `keep-yearly` only).
const PINNED: usize = 2;

/// The calendar bucket of a take, for one of the rules with a count.
type Bucket = fn(&Dated) -> String;

/// The rules with a count, as (name, count under 7/4/12/7, bucket of a take).
fn gfs_rules() -> [(&'static str, usize, Bucket); 4] {
    [
        ("daily", 7, |d| d.at[..10].to_owned()),
        ("weekly", 4, |d| d.week.to_owned()),
        ("monthly", 12, |d| d.at[..7].to_owned()),
        ("yearly", 7, |d| d.at[..4].to_owned()),
    ]
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The ISO week (`2025-W01`) of a `YYYY-MM-DD` date: the week of its Thursday, counted in the
/// Thursday's year.
fn iso_week(date: &str) -> String {
    let num = |r: std::ops::Range<usize>| date[r].parse::<i64>().expect("a date");
    let days = days_from_civil(num(0..4), num(5..7), num(8..10));
    let monday_based = (days + 3).rem_euclid(7); // 1970-01-01 was a Thursday
    let thursday = days - monday_based + 3;
    let year = (num(0..4) - 1..=num(0..4) + 1)
        .rev()
        .find(|&y| days_from_civil(y, 1, 1) <= thursday)
        .expect("within a year");
    let week = (thursday - days_from_civil(year, 1, 1)) / 7 + 1;
    format!("{year}-W{week:02}")
}

/// The plan is what it says: its weeks are ISO weeks, its `keep` column follows from the dates
/// by the rules' definitions, and every rule keeps and drops something, both inside its buckets
/// and past its count. (Pure: no PostgreSQL.)
#[test]
fn the_date_plan_makes_every_gfs_rule_keep_and_drop() {
    assert!(PLAN.windows(2).all(|w| w[0].at < w[1].at), "oldest first");
    for p in &PLAN {
        assert_eq!(iso_week(&p.at[..10]), p.week, "{}", p.at);
    }
    assert_eq!(iso_week("2021-01-03"), "2020-W53");
    assert_eq!(iso_week("2026-12-04"), "2026-W49");
    let newest_first: Vec<&Dated> = PLAN.iter().rev().collect();
    let mut reasons: Vec<BTreeSet<&str>> = vec![BTreeSet::new(); PLAN.len()];
    reasons[0].insert("newest");
    for (rule, count, bucket) in gfs_rules() {
        let mut seen: Vec<String> = Vec::new();
        let mut several = false;
        for (i, p) in newest_first.iter().enumerate() {
            let b = bucket(p);
            if seen.contains(&b) {
                several = true;
                continue;
            }
            seen.push(b);
            if seen.len() <= count {
                reasons[i].insert(rule);
            }
        }
        assert!(several, "{rule}: no bucket with several backups");
        assert!(seen.len() > count, "{rule}: no bucket past its count");
    }
    for (i, p) in newest_first.iter().enumerate() {
        let want: BTreeSet<&str> = p.keep.iter().copied().collect();
        assert_eq!(reasons[i], want, "{}", p.at);
    }
    assert!(PLAN[PINNED].keep.iter().all(|r| *r != "daily"));
}

/// An LSN (`16/B374D848`) as a number.
fn lsn(v: &Value) -> u64 {
    let text = v.as_str().unwrap_or_else(|| panic!("an LSN: {v}"));
    let (hi, lo) = text
        .split_once('/')
        .unwrap_or_else(|| panic!("an LSN: {text}"));
    let hex = |s: &str| u64::from_str_radix(s, 16).unwrap_or_else(|_| panic!("an LSN: {text}"));
    (hex(hi) << 32) | hex(lo)
}

/// The name of segment `segno` of timeline `tli` (PostgreSQL's `XLogFileName`).
fn segment_name(tli: u64, segno: u64, seg_size: u64) -> String {
    let per_id = 0x1_0000_0000 / seg_size;
    format!("{tli:08X}{:08X}{:08X}", segno / per_id, segno % per_id)
}

/// A WAL segment's key in the repository, parsed: (timeline, segment number).
fn segment_of_key(key: &str, seg_size: u64) -> Option<(u64, u64)> {
    let name = key.strip_prefix("wal/")?.rsplit('/').next()?;
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let hex = |r: std::ops::Range<usize>| u64::from_str_radix(&name[r], 16).ok();
    let per_id = 0x1_0000_0000 / seg_size;
    Some((hex(0..8)?, hex(8..16)? * per_id + hex(16..24)?))
}

/// The walcore operator command with libfaketime preloaded, its clock starting at `at` (UTC)
/// and running on from there; monotonic time is left alone, so timers and timeouts are real.
fn faked(tool: &Tool, at: &str) -> Tool {
    assert!(
        Path::new(LIBFAKETIME).is_file(),
        "{LIBFAKETIME} is missing: apt-get install -y faketime (scripts/test does)"
    );
    let mut env = tool.env.clone();
    for (k, v) in [
        ("LD_PRELOAD", LIBFAKETIME),
        ("FAKETIME", &format!("@{at}")),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ("TZ", "UTC"),
    ] {
        env.push((k.to_owned(), v.to_owned()));
    }
    Tool {
        program: tool.program.clone(),
        env,
        cwd: tool.cwd.clone(),
    }
}

/// `walcore take --json` with its clock set to `at`; returns the catalog record. Checks that the
/// record carries the faked date (ID, start and stop time) and that the take waited for its
/// WAL: every segment from its start to its stop is in the repository when it returns.
fn take_at(tool: &Tool, src: &Cluster, repo: &Repo, at: &str) -> Value {
    let conninfo = conninfo(src, "");
    let out = faked(tool, at).ok(&["take", "--dbname", &conninfo, "--json"]);
    let record: Value = serde_json::from_str(&out).expect("take --json prints the record");
    let id = record["id"].as_str().expect("an id");
    let compact = format!(
        "{}{}{}T{}{}",
        &at[..4],
        &at[5..7],
        &at[8..10],
        &at[11..13],
        &at[14..16]
    );
    assert!(id.starts_with(&compact), "take at {at} chose ID {id}");
    let iso = at.replace(' ', "T");
    for field in ["start_time", "stop_time"] {
        let t = record[field].as_str().expect("a time");
        // The faked clock runs on from `at`: within the same ten minutes.
        assert!(t.starts_with(&iso[..15]), "take at {at}: {field} {t}");
    }
    assert_wal_of_record_stored(repo, &record);
    record
}

/// `walcore take --json` in real time; returns the catalog record.
fn take(tool: &Tool, src: &Cluster) -> Value {
    let conninfo = conninfo(src, "");
    let out = tool.ok(&["take", "--dbname", &conninfo, "--json"]);
    serde_json::from_str(&out).expect("take --json prints the record")
}

/// The ID of a catalog record.
fn id_of(record: &Value) -> String {
    record["id"].as_str().expect("an id").to_owned()
}

/// Every segment a backup needs (start to the byte before stop) is stored.
fn assert_wal_of_record_stored(repo: &Repo, record: &Value) {
    let seg_size = record["wal_segment_size"]
        .as_u64()
        .expect("wal_segment_size");
    let tli = record["stop_timeline"].as_u64().expect("stop_timeline");
    let (start, stop) = (lsn(&record["start_lsn"]), lsn(&record["stop_lsn"]));
    let keys: BTreeSet<String> = repo.keys().into_iter().collect();
    for segno in start / seg_size..=(stop.saturating_sub(1).max(start)) / seg_size {
        let key = wal_key(&segment_name(tli, segno, seg_size));
        assert!(
            keys.contains(&key),
            "take {} returned before {key} was archived",
            record["id"]
        );
    }
}

/// `walcore expire ARGS --json`; asserts success and returns the report.
fn expire(tool: &Tool, args: &[&str]) -> Value {
    let mut all = vec!["expire"];
    all.extend_from_slice(args);
    all.push("--json");
    let t0 = Instant::now();
    let out = tool.ok(&all);
    eprintln!("walcore {all:?}: {:?}", t0.elapsed());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("expire --json: {e}\n{out}"))
}

/// The plan's verdicts: backup ID → the rules that keep it (`None`: it expires).
fn verdicts(report: &Value) -> BTreeMap<String, Option<BTreeSet<String>>> {
    report["plan"]["backups"]
        .as_array()
        .unwrap_or_else(|| panic!("no plan.backups in {report:#}"))
        .iter()
        .map(|b| {
            let id = b["id"].as_str().expect("an id").to_owned();
            let verdict = match b["verdict"].as_str() {
                Some("keep") => Some(
                    b["reasons"]
                        .as_array()
                        .expect("reasons")
                        .iter()
                        .map(|r| r["rule"].as_str().expect("a rule").to_owned())
                        .collect(),
                ),
                Some("expire") => None,
                other => panic!("verdict {other:?} of {id}"),
            };
            (id, verdict)
        })
        .collect()
}

/// The verdicts expected: `kept` maps an ID to its rules; every other ID of `all` expires.
fn expected_verdicts(
    all: &[String],
    kept: &[(&str, &[&str])],
) -> BTreeMap<String, Option<BTreeSet<String>>> {
    all.iter()
        .map(|id| {
            let rules = kept
                .iter()
                .find(|(k, _)| k == id)
                .map(|(_, rules)| rules.iter().map(|r| (*r).to_owned()).collect());
            (id.clone(), rules)
        })
        .collect()
}

/// The IDs `list --json` shows, sorted.
fn listed(tool: &Tool) -> BTreeSet<String> {
    tool.list().into_iter().collect()
}

/// After an expire: the repository holds exactly `before` minus the expired backups' objects
/// (`catalog/ID`, `backup/ID/…`, `pins/ID/…`) and minus the WAL segments that no range of
/// `wal` (timeline, first byte, last byte or open) touches; `.history` files all stay. Other
/// WAL objects (`.backup`, `.partial`) are not judged.
fn assert_repository_after_expire(
    repo: &Repo,
    before: &[String],
    expired: &[String],
    wal: &[(u64, u64, Option<u64>)],
    seg_size: u64,
) {
    // The index (a cache that any command may replace) is not part of the plan.
    let cached = |k: &str| k.starts_with("index/");
    let after: BTreeSet<String> = repo.keys().into_iter().filter(|k| !cached(k)).collect();
    let before: Vec<&String> = before.iter().filter(|k| !cached(k)).collect();
    let of_expired = |k: &str| {
        expired.iter().any(|id| {
            k == format!("catalog/{id}")
                || k.starts_with(&format!("backup/{id}/"))
                || k.starts_with(&format!("pins/{id}/"))
        })
    };
    let needed = |k: &str| match segment_of_key(k, seg_size) {
        None => true,
        Some((tli, segno)) => {
            let (lo, hi) = (segno * seg_size, (segno + 1) * seg_size - 1);
            wal.iter()
                .any(|&(t, from, to)| t == tli && from <= hi && to.is_none_or(|to| to >= lo))
        }
    };
    let mut wrong = Vec::new();
    for k in &before {
        let judged = !k.starts_with("wal/") || segment_of_key(k, seg_size).is_some();
        let want = !of_expired(k) && needed(k);
        let have = after.contains(*k);
        if (judged || k.ends_with(".history")) && want != have {
            wrong.push(format!(
                "{k}: {}",
                if have { "still there" } else { "deleted" }
            ));
        }
    }
    for k in &after {
        if !before.contains(&k) {
            wrong.push(format!("{k}: new"));
        }
    }
    assert!(
        wrong.is_empty(),
        "the repository after expire is not the one planned:\n  {}\nkept WAL ranges: {wal:x?}",
        wrong.join("\n  ")
    );
}

/// The WAL range of a backup's own span, start to stop (the stop byte included).
fn span(record: &Value) -> (u64, u64, Option<u64>) {
    (
        record["start_timeline"].as_u64().expect("start_timeline"),
        lsn(&record["start_lsn"]),
        Some(lsn(&record["stop_lsn"])),
    )
}

/// The WAL from a backup's start on, open-ended.
fn from_start(record: &Value) -> (u64, u64, Option<u64>) {
    (
        record["start_timeline"].as_u64().expect("start_timeline"),
        lsn(&record["start_lsn"]),
        None,
    )
}

/// `walcore restore --pgdata NEW --restore-program … ARGS` into a new cluster's (absent) data
/// directory; returns the cluster (not started) and the command's outcome.
fn restore_into(tool: &Tool, args: &[&str]) -> (Cluster, Output) {
    let dst = empty_cluster(15);
    let program = dst.install(bins::RESTORE).to_string_lossy().into_owned();
    let data = dst.data.to_string_lossy().into_owned();
    let mut all = vec!["restore", "--pgdata", &data, "--restore-program", &program];
    all.extend_from_slice(args);
    let out = tool.run(&all);
    (dst, out)
}

/// Restores with `args`, checks that backup `id` was chosen, starts PostgreSQL on the result
/// (without archiving) and returns its rows.
fn restore_rows(tool: &Tool, env: &[(String, String)], args: &[&str], id: &str) -> String {
    let (mut dst, out) = restore_into(tool, args);
    assert!(
        out.status.success(),
        "walcore restore {args:?} failed ({:?}):\n{}{}",
        out.status,
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains(id),
        "restore {args:?} chose another backup than {id}:\n{}",
        out.stdout
    );
    prepare_restored(&mut dst, env);
    assert_promoted(
        &dst,
        scenario::run_recovery(&dst),
        &format!("restore {args:?}"),
    );
    fingerprint(&dst)
}

/// On `file://`: the 7/4/12/7 set, then a pin and the window, the window's rows,
/// and the refusal of a time whose WAL expired.
#[test]
fn expire_keeps_the_gfs_set_a_pin_and_the_window_rows_on_file() {
    // Held to the end: the repository's directory goes with it.
    let repo = Repo::file();
    let expired = gfs_window_and_pin(&repo, &Codec::plain());
    assert_pinned_restores(&expired);
    assert_expired_time_refused(&expired);
}

/// The same on S3 (the emulator), encrypted: expire deletes in batches there.
#[test]
fn expire_keeps_the_gfs_set_a_pin_and_the_window_rows_on_s3() {
    if !moto::s3_enabled("retention::expire_keeps_the_gfs_set_a_pin_and_the_window_rows_on_s3") {
        return;
    }
    let expired = gfs_window_and_pin(&Repo::s3(Moto::shared()), &Codec::encrypted(KEY_1));
    assert_pinned_restores(&expired);
    assert_expired_time_refused(&expired);
}

fn gfs_window_and_pin(repo: &Repo, codec: &Codec) -> Expired {
    let t0 = Instant::now();
    let env = repo.env(codec);
    let mut src = Cluster::new();
    src.archive_with_walcore();
    src.set_env(&env);
    src.start();
    create_table(&src);
    let tool = Tool {
        program: src.install(bins::WALCORE),
        env: env.clone(),
        cwd: src.dir().to_path_buf(),
    };

    // The dated takes, each after a batch of rows of its own.
    let mut records: Vec<Value> = Vec::new();
    let mut rows_before: Vec<String> = Vec::new();
    for (i, p) in PLAN.iter().enumerate() {
        insert_batch(&src, &format!("p{i}"), 500);
        rows_before.push(fingerprint(&src));
        records.push(take_at(&tool, &src, repo, p.at));
    }
    eprintln!("[{:?}] {} dated takes", t0.elapsed(), PLAN.len());
    let ids: Vec<String> = records.iter().map(id_of).collect();
    let seg_size = records[0]["wal_segment_size"]
        .as_u64()
        .expect("wal_segment_size");
    assert_eq!(listed(&tool), ids.iter().cloned().collect());

    // 7/4/12/7: the dry run plans exactly the expected set and deletes nothing.
    let planned_kept: Vec<(&str, &[&str])> = PLAN
        .iter()
        .zip(&ids)
        .filter(|(p, _)| !p.keep.is_empty())
        .map(|(p, id)| (id.as_str(), p.keep))
        .collect();
    let want = expected_verdicts(&ids, &planned_kept);
    let before = repo.keys();
    let mut dry_args = GFS.to_vec();
    dry_args.push("--dry-run");
    let report = expire(&tool, &dry_args);
    assert_eq!(report["dry_run"], true, "{report:#}");
    assert_eq!(report["deleted"]["backups"], 0, "{:#}", report["deleted"]);
    assert_eq!(
        verdicts(&report),
        want,
        "expire --dry-run planned otherwise"
    );
    // Only the index (a cache any command may refresh) may change.
    let data = |keys: Vec<String>| -> Vec<String> {
        keys.into_iter()
            .filter(|k| !k.starts_with("index/"))
            .collect()
    };
    assert_eq!(
        data(repo.keys()),
        data(before.clone()),
        "expire --dry-run changed the repository"
    );

    // For real: the same plan; exactly the kept backups remain listed; the expired backups'
    // objects are gone, and so is the WAL no kept backup needs (without --pitr-window, WAL is
    // kept from the oldest backup kept by keep-daily on, and an older kept backup keeps only
    // its own start to stop).
    let report = expire(&tool, &GFS);
    assert_eq!(report["dry_run"], false, "{report:#}");
    assert_eq!(report["deleted"]["backups"], 4, "{:#}", report["deleted"]);
    assert_eq!(
        verdicts(&report),
        want,
        "expire planned otherwise than its dry run"
    );
    let kept: BTreeSet<String> = planned_kept
        .iter()
        .map(|(id, _)| (*id).to_owned())
        .collect();
    assert_eq!(listed(&tool), kept, "walcore list after expire");
    let expired: Vec<String> = ids
        .iter()
        .filter(|id| !kept.contains(*id))
        .cloned()
        .collect();
    assert_eq!(expired.len(), 4);
    let oldest_daily = PLAN
        .iter()
        .position(|p| p.keep.contains(&"daily"))
        .expect("a daily backup");
    let mut wal = vec![from_start(&records[oldest_daily])];
    wal.extend(
        PLAN.iter()
            .zip(&records)
            .filter(|(p, _)| !p.keep.is_empty())
            .map(|(_, r)| span(r)),
    );
    assert_repository_after_expire(repo, &before, &expired, &wal, seg_size);
    eprintln!("[{:?}] 7/4/12/7 kept exactly the planned set", t0.elapsed());

    // An old backup pinned; then real time: R1, commits, R2, commits at a recorded time T2,
    // more commits.
    let pinned = &ids[PINNED];
    tool.ok(&["pin", pinned, "--note", "kept for the audit"]);
    insert_batch(&src, "r1", 500);
    let r1 = tool.take(&src, &[]);
    insert_batch(&src, "w1", 500);
    std::thread::sleep(Duration::from_millis(1100));
    let t1 = src.psql("select clock_timestamp()");
    std::thread::sleep(Duration::from_millis(1100));
    let r2 = take(&tool, &src);
    let after_r2 = Instant::now();
    let r2_id = id_of(&r2);
    std::thread::sleep(Duration::from_millis(1100));
    insert_batch(&src, "w2", 500);
    let rows_t2 = fingerprint(&src);
    std::thread::sleep(Duration::from_millis(1100));
    let t2 = src.psql("select clock_timestamp()");
    std::thread::sleep(Duration::from_millis(1100));
    insert_batch(&src, "w3", 500);
    src.archive_all(ARCHIVE_WAIT);

    // keep-last 1 and a window that starts after R2 finished: R2 is the window's base and the
    // pin is kept; every other backup goes, R1 with the WAL after it.
    let window = format!("{}s", after_r2.elapsed().as_secs().max(1));
    let before = repo.keys();
    let report = expire(&tool, &["--keep-last", "1", "--pitr-window", &window]);
    let listed_before: Vec<String> = ids
        .iter()
        .filter(|id| kept.contains(*id))
        .cloned()
        .chain([r1.clone(), r2_id.clone()])
        .collect();
    let want = expected_verdicts(
        &listed_before,
        &[
            (r2_id.as_str(), &["newest", "last", "pitr-window"]),
            (pinned.as_str(), &["pinned"]),
        ],
    );
    assert_eq!(
        verdicts(&report),
        want,
        "expire --keep-last 1 --pitr-window {window} planned otherwise"
    );
    assert_eq!(
        report["plan"]["window"]["base"],
        r2_id.as_str(),
        "{:#}",
        report["plan"]["window"]
    );
    assert_eq!(
        listed(&tool),
        BTreeSet::from([pinned.clone(), r2_id.clone()])
    );
    let expired: Vec<String> = listed_before
        .iter()
        .filter(|id| **id != r2_id && *id != pinned)
        .cloned()
        .collect();
    assert_repository_after_expire(
        repo,
        &before,
        &expired,
        &[span(&records[PINNED]), from_start(&r2)],
        seg_size,
    );
    eprintln!("[{:?}] the pin and the window kept", t0.elapsed());

    // A time inside the window: exactly the rows committed before it.
    let rows = restore_rows(&tool, &env, &["--target-time", &t2], &r2_id);
    assert_eq!(rows, rows_t2, "a restore to {t2} inside the window");

    eprintln!("[{:?}] done", t0.elapsed());
    Expired {
        tool,
        env,
        t1,
        pinned: pinned.clone(),
        pinned_rows: rows_before[PINNED].clone(),
        _src: src,
    }
}

/// What [`gfs_window_and_pin`] leaves for the checks that follow it: the source cluster (kept
/// running) and its repository's tool and environment, after both expires.
struct Expired {
    tool: Tool,
    env: Vec<(String, String)>,
    /// A commit time after R1 and before R2, whose WAL `expire` removed.
    t1: String,
    /// The pinned backup, the newest listed one that finished before `t1`.
    pinned: String,
    /// The rows committed before the pinned backup was taken.
    pinned_rows: String,
    _src: Cluster,
}

/// The pinned backup of 2019 restores to its end (`--target-immediate`) with the rows committed
/// before it, although the WAL right after it expired.
fn assert_pinned_restores(expired: &Expired) {
    let pinned = &expired.pinned;
    let rows = restore_rows(
        &expired.tool,
        &expired.env,
        &["--backup", pinned, "--target-immediate"],
        pinned,
    );
    assert_eq!(
        rows, expired.pinned_rows,
        "the pinned backup restored other rows"
    );
}

/// A restore to a time whose WAL expired (after the pinned backup's end, before R2) is refused
/// before anything is written, saying why and what still restores.
fn assert_expired_time_refused(expired: &Expired) {
    let (t1, pinned) = (&expired.t1, &expired.pinned);
    let (dst, out) = restore_into(&expired.tool, &["--target-time", t1]);
    assert!(
        !out.status.success(),
        "a restore to {t1}, whose WAL expired, was not refused:\n{}",
        out.stdout
    );
    assert!(out.stderr.contains(pinned.as_str()), "{}", out.stderr);
    assert!(out.stderr.contains("expire"), "{}", out.stderr);
    assert!(out.stderr.contains("--target-immediate"), "{}", out.stderr);
    assert!(
        !dst.data.exists(),
        "a refused restore created the data directory"
    );
    drop(dst);
}

/// A timeline switch: a restore of an old backup promoted to timeline 2 archives into the same
/// repository while the original cluster goes on on timeline 1. `expire --keep-last 2` keeps the
/// newest backup of each timeline; the WAL each needs stays (timeline 2's names sort after every
/// name of timeline 1: ordering by name would take timeline 1's newest WAL for the oldest), and
/// both restore to the end of their timeline with every row.
#[test]
fn expire_after_a_timeline_switch_loses_no_row_of_either_timeline() {
    let repo = Repo::file();
    let env = repo.env(&Codec::plain());

    // A, timeline 1: backup 1.
    let mut a = Cluster::new();
    a.archive_with_walcore();
    a.set_env(&env);
    a.start();
    create_table(&a);
    insert_batch(&a, "a", 2_000);
    let tool = Tool {
        program: a.install(bins::WALCORE),
        env: env.clone(),
        cwd: a.dir().to_path_buf(),
    };
    let backup1 = take(&tool, &a);
    insert_batch(&a, "b", 2_000);
    a.archive_all(ARCHIVE_WAIT);

    // B: backup 1 to its end, promoted onto timeline 2, archiving into the same repository;
    // backup 2 on timeline 2.
    let (mut b, out) = restore_into(&tool, &["--target-immediate"]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    b.set("unix_socket_directories", &b.sock.to_string_lossy());
    b.set_env(&env);
    b.archive_with_walcore();
    assert_promoted(&b, scenario::run_recovery(&b), "B (immediate)");
    assert_eq!(
        b.psql("select timeline_id from pg_control_checkpoint()"),
        "2"
    );
    insert_batch(&b, "c", 2_000);
    let tool_b = Tool {
        program: b.install(bins::WALCORE),
        env: env.clone(),
        cwd: b.dir().to_path_buf(),
    };
    let backup2 = take(&tool_b, &b);
    assert_eq!(backup2["stop_timeline"], 2);
    insert_batch(&b, "d", 2_000);
    b.archive_all(ARCHIVE_WAIT);
    let rows_b = fingerprint(&b);

    // A goes on, on timeline 1: backup 3, the newest.
    insert_batch(&a, "e", 2_000);
    let backup3 = take(&tool, &a);
    assert_eq!(backup3["stop_timeline"], 1);
    insert_batch(&a, "f", 2_000);
    a.archive_all(ARCHIVE_WAIT);
    let rows_a = fingerprint(&a);
    drop(b);

    let (id1, id2, id3) = (id_of(&backup1), id_of(&backup2), id_of(&backup3));
    let seg_size = backup1["wal_segment_size"]
        .as_u64()
        .expect("wal_segment_size");
    let before = repo.keys();
    assert!(before.contains(&wal_key("00000002.history")), "{before:#?}");
    let report = expire(&tool, &["--keep-last", "2"]);
    assert_eq!(
        verdicts(&report),
        expected_verdicts(
            &[id1.clone(), id2.clone(), id3.clone()],
            &[
                (id3.as_str(), &["newest", "last"]),
                (id2.as_str(), &["last"])
            ]
        )
    );
    assert_eq!(listed(&tool), BTreeSet::from([id2.clone(), id3.clone()]));
    assert_repository_after_expire(
        &repo,
        &before,
        &[id1],
        &[from_start(&backup3), from_start(&backup2)],
        seg_size,
    );

    // Timeline 1 to its end from backup 3; timeline 2 (the latest) to its end from backup 2.
    let rows = restore_rows(&tool, &env, &["--target-timeline", "1"], &id3);
    assert_eq!(rows, rows_a, "timeline 1 restored without every row");
    let rows = restore_rows(&tool, &env, &[], &id2);
    assert_eq!(rows, rows_b, "timeline 2 restored without every row");
}
