//! Builds a synthetic repository for the `expire` scale bench (`benches/expire-scale.sh`):
//! `--wal` WAL objects over two timelines and `--backups` complete backups, one a day up to
//! today, written through the library into the repository the configuration names
//! (`WALCORE_REPO`, as for every walcore command), many writes at a time.
//!
//! What `expire` reads is real: the repository metadata, the keys of the WAL archive (timeline
//! 1 up to the switch, timeline 2 after it, and `00000002.history` saying where it switched),
//! and catalog records that pass the same checks as those `take` writes, each with its
//! `base.tar` and `backup_manifest` objects. What it never reads is fake: the WAL objects and
//! the backups' objects hold a few bytes each, not a segment or a data directory, since
//! `expire` only lists and deletes them.
//!
//! ```text
//! WALCORE_REPO=file:///tmp/r cargo run --release -p walcore-benches --bin expire_repo -- \
//!     --wal 100000 --backups 1000
//! ```

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Parser;
use futures::StreamExt;
use walcore::backup::catalog::{self, BackupRecord, ObjectEntry, ObjectKind};
use walcore::config::{Config, Layer};
use walcore::pg::{Lsn, SegmentNo, TimelineId, WalFileName, WalSegmentSize};
use walcore::repo::{RepoMeta, Repository};
use walcore::store::wal_key;
use walcore::{Error, ErrorKind};

const SYSTEM_ID: u64 = 7_300_000_000_000_000_001;
const SEGMENT: u64 = 16 << 20;

#[derive(Parser, Debug)]
#[command(about = "Writes a synthetic repository for the expire scale bench")]
struct Args {
    /// WAL objects to write (segments of timelines 1 and 2).
    #[arg(long, default_value_t = 100_000)]
    wal: u64,
    /// Complete backups to write, one a day, the newest today.
    #[arg(long, default_value_t = 1_000)]
    backups: u64,
    /// Writes in flight at once.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    /// Also write a verify ledger (docs/FORMAT.md §6.4) that says every object was verified,
    /// as a first `walcore verify` would: `verify` then times its listing and continuity pass
    /// (the objects here are a few bytes, not segments, and would not pass its reads).
    #[arg(long)]
    verified: bool,
}

/// Where one backup starts and stops in the synthetic WAL.
struct Layout {
    wal: u64,
    backups: u64,
    /// The first segment of timeline 2 (timeline 1 ends in it).
    switch: u64,
}

impl Layout {
    fn new(wal: u64, backups: u64) -> Result<Layout, Error> {
        if backups == 0 || wal < 2 * backups + 4 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "--wal {wal} is too few for --backups {backups}: each backup needs two \
                     segments of its own"
                ),
            ));
        }
        // Timeline 1 holds segments 1..=switch, timeline 2 switch..=wal-1: `wal` objects.
        Ok(Layout {
            wal,
            backups,
            switch: wal * 3 / 5,
        })
    }

    /// Timeline of a segment a backup starts or stops in (the switch segment is timeline 2's).
    fn timeline(&self, segno: u64) -> u32 {
        if segno >= self.switch { 2 } else { 1 }
    }

    /// The first segment of backup `i` (0 the oldest); it stops in the next one.
    fn start_segment(&self, i: u64) -> u64 {
        let first = 2;
        let last = self.wal - 3;
        let s = first + i * (last - first) / self.backups;
        // Never across the switch: a take does not span a promotion.
        if s == self.switch - 1 { s - 1 } else { s }
    }

    fn wal_keys(&self, size: WalSegmentSize) -> Vec<String> {
        let t1 = (1..=self.switch).map(|s| (1, s));
        let t2 = (self.switch..self.wal).map(|s| (2, s));
        t1.chain(t2)
            .map(|(t, s)| wal_key(&WalFileName::segment(TimelineId(t), SegmentNo(s), size)))
            .collect()
    }
}

fn record(layout: &Layout, i: u64, now: DateTime<Utc>) -> BackupRecord {
    let start = layout.start_segment(i);
    let stop_time = now - chrono::Duration::days((layout.backups - 1 - i) as i64)
        + chrono::Duration::minutes(5)
        - chrono::Duration::hours(1);
    let start_time = stop_time - chrono::Duration::minutes(5);
    let id = catalog::new_id(start_time.into());
    let time = |t: DateTime<Utc>| catalog::format_time(t.into());
    let object = |key: String, kind, name: &str| ObjectEntry {
        key,
        kind,
        name: name.into(),
        plaintext_len: 64,
        plaintext_crc32: 0,
        stored_len: 64,
    };
    BackupRecord {
        format_version: 1,
        id: id.clone(),
        label: format!("bench {i}"),
        system_identifier: SYSTEM_ID.to_string(),
        pg_version_num: 150_000,
        wal_segment_size: SEGMENT as u32,
        start_lsn: Lsn(start * SEGMENT + 0x28),
        start_timeline: layout.timeline(start),
        stop_lsn: Lsn((start + 1) * SEGMENT + 0x100),
        stop_timeline: layout.timeline(start + 1),
        start_time: time(start_time),
        stop_time: time(stop_time),
        checkpoint: "fast".into(),
        wal_included: false,
        tablespaces: vec![],
        objects: vec![
            object(
                catalog::archive_key(&id, "base.tar"),
                ObjectKind::Archive,
                "base.tar",
            ),
            object(
                catalog::manifest_key(&id),
                ObjectKind::Manifest,
                "backup_manifest",
            ),
        ],
        created_by: "walcore bench expire_repo".into(),
    }
}

/// Writes every key (a few bytes each), `parallel` at a time; returns how many.
async fn put_all(repo: &Repository, keys: Vec<String>, parallel: usize) -> Result<usize, Error> {
    let n = keys.len();
    let mut writes = futures::stream::iter(keys)
        .map(|key| async move {
            repo.with_retry(&format!("writing {key}"), || {
                repo.put_small(&key, vec![0x5a; 64])
            })
            .await
        })
        .buffer_unordered(parallel);
    while let Some(done) = writes.next().await {
        done?;
    }
    Ok(n)
}

async fn build(args: &Args) -> Result<(), Error> {
    let layout = Layout::new(args.wal, args.backups)?;
    let config = Config::load(Layer::default())?;
    let repo = Repository::open(&config)?;
    let size = WalSegmentSize::new(SEGMENT as u32).map_err(Error::from)?;
    if repo.read_meta().await?.is_some() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{} already holds a repository; the bench builds into an empty one",
                repo.store().describe()
            ),
        ));
    }
    repo.init_meta(RepoMeta::new(SYSTEM_ID, 15, size)).await?;
    let began = Instant::now();

    let history = format!(
        "1\t{}\tno recovery target specified\n",
        Lsn(layout.switch * SEGMENT + 0x4000)
    );
    repo.put_small(
        &wal_key(&WalFileName::history(TimelineId(2))),
        history.into_bytes(),
    )
    .await?;
    let wal = put_all(&repo, layout.wal_keys(size), args.parallel).await?;

    let now = Utc::now();
    let records: Vec<BackupRecord> = (0..args.backups).map(|i| record(&layout, i, now)).collect();
    let objects: Vec<String> = records
        .iter()
        .flat_map(|r| r.objects.iter().map(|o| o.key.clone()))
        .collect();
    let backup_objects = put_all(&repo, objects.clone(), args.parallel).await?;
    let mut commits = futures::stream::iter(&records)
        .map(|r| catalog::commit(&repo, r))
        .buffer_unordered(args.parallel);
    while let Some(done) = commits.next().await {
        done?;
    }
    if args.verified {
        write_ledger(&repo, &layout, size, &objects).await?;
    }
    println!(
        "built {}: {wal} WAL objects (timeline 1 up to segment {}, then timeline 2) and {} \
         backups ({backup_objects} objects) in {:.1} s",
        repo.store().describe(),
        layout.switch,
        records.len(),
        began.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A verify ledger covering every WAL segment, the history file and the backups' objects.
async fn write_ledger(
    repo: &Repository,
    layout: &Layout,
    size: WalSegmentSize,
    objects: &[String],
) -> Result<(), Error> {
    let mut segments: std::collections::BTreeMap<String, Vec<(u64, u64)>> = Default::default();
    let t1 = (1..=layout.switch).map(|s| (1, s));
    let t2 = (layout.switch..layout.wal).map(|s| (2, s));
    for (t, s) in t1.chain(t2) {
        let name = WalFileName::segment(TimelineId(t), SegmentNo(s), size);
        let n = u64::from(name.log_id()) << 32 | u64::from(name.seg_id());
        let runs = segments.entry(format!("{t:08X}")).or_default();
        match runs.last_mut() {
            Some(run) if run.1 + 1 == n => run.1 = n,
            _ => runs.push((n, n)),
        }
    }
    let mut keys: Vec<String> = objects.to_vec();
    keys.push(wal_key(&WalFileName::history(TimelineId(2))));
    let now = Utc::now();
    // As if listed a few seconds from now: every object is then older than the ledger's
    // recent edge (FORMAT.md §6.4) and counts as verified by its time alone.
    let through = now + chrono::Duration::seconds(3);
    let ledger = serde_json::json!({
        "format_version": 1,
        "listed_through": through.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        "keys": keys,
        "segments": segments,
        "time": catalog::format_time(now.into()),
        "created_by": "walcore bench expire_repo",
    });
    let key = format!("verify/{}-00000000", now.format("%Y%m%dT%H%M%S%.3fZ"));
    repo.put_small(&key, ledger.to_string().into_bytes())
        .await?;
    Ok(())
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(build(&args)) {
        eprintln!("expire_repo: {e:#}");
        std::process::exit(1);
    }
    // Leave no write of the runtime behind.
    runtime.shutdown_timeout(Duration::from_secs(5));
}
