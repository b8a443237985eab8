//! walcore's replication client (`walcore::replication`) against real PostgreSQL 15: its answers
//! compared with PostgreSQL's own (`pg_control_system()`, `pg_current_wal_flush_lsn()`,
//! `pg_verifybackup`), authentication as pg_hba.conf demands it (trust, SCRAM-SHA-256, MD5), the
//! errors a DBA sees, and a whole BASE_BACKUP; then BASE_BACKUP on every other major of the
//! matrix (13 to 18).

use std::future::Future;
use std::time::{Duration, Instant};

use walcore::pg::{Lsn, TimelineId, WalSegmentSize};
use walcore::replication::{
    BackupEvent, BaseBackupOptions, Checkpoint, ConnConfig, ConnParams, ConnectOptions,
    ReplicationConnection, ReplicationError,
};
use walcore_e2e::cluster::pg_bin_dir;
use walcore_e2e::{Cluster, sys};

/// Runs a future on a fresh single-threaded runtime (the harness itself is synchronous).
fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(future)
}

/// A connection string for `cluster`'s Unix socket, resolved without the process environment
/// (so no `PGPASSWORD` or `~/.pgpass` of the machine running the tests leaks in).
fn config(cluster: &Cluster, extra: &str) -> ConnConfig {
    let conninfo = format!("host={} port=5432 {extra}", cluster.sock.display());
    ConnParams::parse(&conninfo)
        .and_then(|p| p.resolve(&|_| None))
        .unwrap_or_else(|e| panic!("{conninfo}: {e}"))
}

fn options() -> ConnectOptions {
    ConnectOptions {
        connect_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(30),
        ..ConnectOptions::default()
    }
}

async fn connect(config: &ConnConfig) -> Result<ReplicationConnection, ReplicationError> {
    ReplicationConnection::connect(config, &options()).await
}

fn lsn(text: &str) -> Lsn {
    text.parse()
        .unwrap_or_else(|e| panic!("PostgreSQL returned {text:?}: {e}"))
}

/// Sets the method of pg_hba.conf's `local replication` lines and reloads, waiting until the
/// postmaster has read the file (new sessions see a new `pg_conf_load_time()`).
pub(crate) fn set_local_replication_auth(cluster: &Cluster, method: &str) {
    let path = cluster.data.join("pg_hba.conf");
    let hba = std::fs::read_to_string(&path).expect("read pg_hba.conf");
    let mut changed = 0;
    let edited: Vec<String> = hba
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() >= 4 && fields[0] == "local" && fields[1] == "replication" {
                changed += 1;
                format!("local replication {} {method}", fields[2])
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert!(changed > 0, "no `local replication` line in\n{hba}");
    // Rewriting the file in place keeps its owner (the server user).
    std::fs::write(&path, edited.join("\n") + "\n").expect("write pg_hba.conf");
    let loaded = cluster.psql("select pg_conf_load_time()");
    cluster.psql("select pg_reload_conf()");
    sys::wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
        let now = cluster.psql("select pg_conf_load_time()");
        if now != loaded {
            Ok(())
        } else {
            Err(format!(
                "waiting for the server to reload pg_hba.conf ({method})"
            ))
        }
    });
}

#[test]
fn identify_system_agrees_with_postgresql() {
    let cluster = Cluster::new();
    cluster.start();
    let system_id: u64 = cluster
        .psql("select system_identifier from pg_control_system()")
        .parse()
        .expect("system identifier");
    let timeline: u32 = cluster
        .psql("select timeline_id from pg_control_checkpoint()")
        .parse()
        .expect("timeline");
    let before = lsn(&cluster.psql("select pg_current_wal_flush_lsn()"));

    let (info, version, integer_datetimes) = block_on(async {
        let mut conn = connect(&config(&cluster, "user=postgres"))
            .await
            .expect("trust connection");
        let info = conn.identify_system().await.expect("IDENTIFY_SYSTEM");
        let version = conn.server_version_num();
        let integer_datetimes = conn.integer_datetimes();
        conn.close().await.expect("close");
        (info, version, integer_datetimes)
    });
    let after = lsn(&cluster.psql("select pg_current_wal_flush_lsn()"));

    assert_eq!(info.system_id, system_id);
    assert_eq!(info.timeline, TimelineId(timeline));
    // IDENTIFY_SYSTEM reports the flush position, which only moves forward.
    assert!(
        before <= info.xlogpos && info.xlogpos <= after,
        "xlogpos {} outside [{before}, {after}]",
        info.xlogpos
    );
    assert_eq!(info.dbname, None, "a physical replication connection");
    assert!(
        version.is_some_and(|v| (150_000..160_000).contains(&v)),
        "{version:?}"
    );
    assert_eq!(integer_datetimes, Some(true));
}

/// A role with REPLICATION, pg_hba.conf demanding `method` for replication over the socket:
/// the right password (given, or from a password file) gets in; a wrong or missing one, and a
/// role without REPLICATION, get PostgreSQL's own clear errors.
fn password_authentication(method: &str, encryption: &str) {
    let cluster = Cluster::new();
    cluster.start();
    cluster.psql(&format!(
        "set password_encryption = '{encryption}';
         create role rep with replication login password 'right pw';
         create role norepl with login password 'right pw';"
    ));
    let stored = cluster.psql("select rolpassword from pg_authid where rolname = 'rep'");
    let prefix = if encryption == "md5" {
        "md5"
    } else {
        "SCRAM-SHA-256$"
    };
    assert!(stored.starts_with(prefix), "{stored}");
    set_local_replication_auth(&cluster, method);

    // The right password.
    let info = block_on(async {
        let mut conn = connect(&config(&cluster, "user=rep password='right pw'"))
            .await
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        conn.identify_system().await.expect("IDENTIFY_SYSTEM")
    });
    assert!(info.xlogpos.is_valid());

    // From a password file: host is the socket directory, database `replication`.
    let dir = tempfile::tempdir().expect("tempdir");
    let passfile = dir.path().join("pgpass");
    std::fs::write(
        &passfile,
        format!(
            "{}:5432:postgres:rep:not this one\n{}:5432:replication:rep:right pw\n",
            cluster.sock.display(),
            cluster.sock.display()
        ),
    )
    .expect("write pgpass");
    std::fs::set_permissions(
        &passfile,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod pgpass");
    block_on(async {
        let conn = connect(&config(
            &cluster,
            &format!("user=rep passfile={}", passfile.display()),
        ))
        .await
        .unwrap_or_else(|e| panic!("{method} with a password file: {e}"));
        conn.close().await.expect("close");
    });

    // A wrong password.
    let err = block_on(connect(&config(&cluster, "user=rep password=wrong")))
        .expect_err("a wrong password must fail");
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("FATAL: password authentication failed for user \"rep\""),
        "{text}"
    );
    assert!(!err.is_retryable());

    // No password at all.
    let err = block_on(connect(&config(&cluster, "user=rep"))).expect_err("no password must fail");
    assert!(
        matches!(err, ReplicationError::PasswordRequired { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("asks for a password for user \"rep\""),
        "{err}"
    );

    // A role without REPLICATION.
    let err = block_on(connect(&config(
        &cluster,
        "user=norepl password='right pw'",
    )))
    .expect_err("a role without REPLICATION must fail");
    assert_eq!(err.sqlstate(), Some("42501"), "{err}");
    assert!(
        err.to_string()
            .contains("must be superuser or replication role to start walsender"),
        "{err}"
    );
}

#[test]
fn scram_sha_256_authentication() {
    password_authentication("scram-sha-256", "scram-sha-256");
}

#[test]
fn md5_authentication() {
    password_authentication("md5", "md5");
}

#[test]
fn unreachable_server_fails_fast_and_clearly() {
    // A cluster that is not running: its socket directory exists, the socket does not.
    let cluster = Cluster::new();
    let started = Instant::now();
    let err =
        block_on(connect(&config(&cluster, "user=postgres"))).expect_err("nothing listens there");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let socket = cluster.sock.join(".s.PGSQL.5432");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "could not connect to the server at {}: No such file or directory",
            socket.display()
        )),
        "{text}"
    );
    assert!(err.is_retryable(), "a server that is down may come back");
}

/// The names and sizes in a tar stream, checking each 512-byte header's checksum and that the
/// stream ends with exactly the two zero blocks.
fn tar_entries(tar: &[u8]) -> Vec<(String, u64)> {
    let octal = |field: &[u8]| -> u64 {
        let text: String = field
            .iter()
            .take_while(|&&b| b != 0)
            .map(|&b| char::from(b))
            .collect();
        u64::from_str_radix(text.trim(), 8).unwrap_or_else(|e| panic!("octal {text:?}: {e}"))
    };
    let mut entries = Vec::new();
    let mut pos = 0;
    loop {
        let header = tar
            .get(pos..pos + 512)
            .unwrap_or_else(|| panic!("tar stream truncated at {pos}"));
        if header.iter().all(|&b| b == 0) {
            let next = tar.get(pos + 512..pos + 1024).expect("second end block");
            assert!(next.iter().all(|&b| b == 0), "second end block");
            assert_eq!(tar.len(), pos + 1024, "nothing after the two end blocks");
            return entries;
        }
        let sum: u64 = header
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        assert_eq!(sum, octal(&header[148..156]), "header checksum at {pos}");
        let name: String = header[..100]
            .iter()
            .take_while(|&&b| b != 0)
            .map(|&b| char::from(b))
            .collect();
        let size = octal(&header[124..136]);
        entries.push((name, size));
        pos += 512 + (size as usize).div_ceil(512) * 512;
    }
}

#[test]
fn base_backup_of_a_small_cluster() {
    let cluster = Cluster::new();
    cluster.start();
    walcore_e2e::workload::create_table(&cluster);
    walcore_e2e::workload::insert_batch(&cluster, "replication", 1000);

    let options = BaseBackupOptions {
        label: "walcore e2e: it's a test".into(),
        checkpoint: Checkpoint::Fast,
        ..BaseBackupOptions::default()
    };
    let started = Instant::now();
    let (events, system_id) = block_on(async {
        let conn = connect(&config(&cluster, "user=postgres"))
            .await
            .expect("connect");
        let stream = conn.base_backup(&options).await.expect("BASE_BACKUP");
        let (mut rx, task) = stream.spawn();
        let mut events = Vec::new();
        while let Some(event) = rx.recv().await {
            events.push(event.expect("backup event"));
        }
        // The connection is back in a clean state after the backup.
        let mut conn = task.await.expect("network task");
        let info = conn
            .identify_system()
            .await
            .expect("IDENTIFY_SYSTEM after BASE_BACKUP");
        conn.close().await.expect("close");
        (events, info.system_id)
    });
    let elapsed = started.elapsed();
    let current = lsn(&cluster.psql("select pg_current_wal_lsn()"));

    // Started, the main archive with its data and progress, the manifest, Finished.
    let Some(BackupEvent::Started {
        start_lsn,
        timeline,
        tablespaces,
    }) = events.first().cloned()
    else {
        panic!("first event: {:?}", events.first())
    };
    let Some(BackupEvent::Finished {
        end_lsn,
        timeline: end_timeline,
    }) = events.last().cloned()
    else {
        panic!("last event: {:?}", events.last())
    };
    assert_eq!(timeline, TimelineId(1));
    assert_eq!(end_timeline, TimelineId(1));
    assert!(
        start_lsn <= end_lsn,
        "start {start_lsn} after end {end_lsn}"
    );
    assert!(end_lsn <= current);
    assert_eq!(
        tablespaces.len(),
        1,
        "only the main data directory: {tablespaces:?}"
    );
    assert_eq!(tablespaces[0].oid, None);

    let mut archives = Vec::new();
    let mut base_tar = Vec::new();
    let mut manifest = Vec::new();
    let mut in_manifest = false;
    let mut last_progress = 0;
    for event in &events[1..events.len() - 1] {
        match event {
            BackupEvent::Archive { name, location } => {
                assert!(!in_manifest, "archive after the manifest");
                archives.push((name.clone(), location.clone()));
            }
            BackupEvent::Manifest => in_manifest = true,
            BackupEvent::Data(data) if in_manifest => manifest.extend_from_slice(data),
            BackupEvent::Data(data) => base_tar.extend_from_slice(data),
            BackupEvent::Progress(done) => {
                assert!(*done >= last_progress, "progress goes forward");
                last_progress = *done;
            }
            other => panic!("unexpected event in the middle: {other:?}"),
        }
    }
    assert_eq!(archives, vec![("base.tar".to_owned(), None)]);
    assert_eq!(
        last_progress,
        base_tar.len() as u64,
        "the last progress report counts every archive byte"
    );

    // The main archive is a tar stream with what a data directory needs.
    let entries = tar_entries(&base_tar);
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    for needed in [
        "backup_label",
        "tablespace_map",
        "PG_VERSION",
        "global/pg_control",
    ] {
        assert!(
            names.contains(&needed),
            "{needed} missing from base.tar: {names:?}"
        );
    }
    assert_eq!(
        names.first(),
        Some(&"backup_label"),
        "backup_label comes first"
    );
    assert_eq!(
        names.last(),
        Some(&"global/pg_control"),
        "pg_control comes last"
    );
    assert!(
        !names.iter().any(|n| n.starts_with("pg_wal/0")),
        "no WAL in the backup (WAL false)"
    );

    // backup_label names our label and the start position.
    let label_start = 512;
    let label_len = entries[0].1 as usize;
    let label = String::from_utf8_lossy(&base_tar[label_start..label_start + label_len]);
    assert!(
        label.contains(&format!("START WAL LOCATION: {start_lsn} (file ")),
        "{label}"
    );
    assert!(label.contains("LABEL: walcore e2e: it's a test"), "{label}");
    let segment = WalSegmentSize::DEFAULT;
    assert!(start_lsn.segment(segment).0 >= 1);

    // The manifest is PostgreSQL's JSON, covering our WAL range.
    let manifest = String::from_utf8(manifest).expect("manifest is UTF-8");
    assert!(
        manifest.starts_with("{ \"PostgreSQL-Backup-Manifest-Version\": 1,"),
        "{}",
        &manifest[..manifest.len().min(200)]
    );
    assert!(
        manifest.contains(&format!(
            "\"Start-LSN\": \"{start_lsn}\", \"End-LSN\": \"{end_lsn}\""
        )),
        "WAL range of the manifest"
    );

    // And PostgreSQL's own verifier accepts the extracted archive with its manifest (WAL
    // parsing skipped: the WAL is archived separately).
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::write(dir.path().join("base.tar"), &base_tar).expect("write base.tar");
    run_ok(
        std::process::Command::new("tar")
            .arg("-xf")
            .arg(dir.path().join("base.tar"))
            .arg("-C")
            .arg(&data),
    );
    std::fs::write(data.join("backup_manifest"), &manifest).expect("write manifest");
    run_ok(
        std::process::Command::new(pg_bin_dir().join("pg_verifybackup"))
            .arg("--no-parse-wal")
            .arg(&data),
    );

    let sysid: u64 = cluster
        .psql("select system_identifier from pg_control_system()")
        .parse()
        .expect("system identifier");
    assert_eq!(system_id, sysid);
    assert!(
        elapsed < Duration::from_secs(30),
        "the backup took {elapsed:?}"
    );
}

fn run_ok(cmd: &mut std::process::Command) {
    let out = sys::run(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{:?} failed ({:?}): {}{}",
        cmd,
        out.status,
        out.stdout,
        out.stderr
    );
}

/// The archives, manifest and positions of a whole base backup, from its events, with the shape
/// of the event sequence (runs of `Data` and `Progress` folded into one `data`).
struct Collected {
    start_lsn: Lsn,
    end_lsn: Lsn,
    tablespaces: Vec<walcore::replication::TablespaceInfo>,
    archives: Vec<(String, Option<std::path::PathBuf>, Vec<u8>)>,
    manifest: Vec<u8>,
    last_progress: Option<u64>,
    shape: Vec<&'static str>,
}

fn collect(events: Vec<BackupEvent>) -> Collected {
    let mut c = Collected {
        start_lsn: Lsn(0),
        end_lsn: Lsn(0),
        tablespaces: Vec::new(),
        archives: Vec::new(),
        manifest: Vec::new(),
        last_progress: None,
        shape: Vec::new(),
    };
    let mut in_manifest = false;
    for event in events {
        let kind = match event {
            BackupEvent::Started {
                start_lsn,
                timeline,
                tablespaces,
            } => {
                assert_eq!(timeline, TimelineId(1));
                c.start_lsn = start_lsn;
                c.tablespaces = tablespaces;
                "started"
            }
            BackupEvent::Archive { name, location } => {
                assert!(!in_manifest, "archive {name} after the manifest");
                c.archives.push((name, location, Vec::new()));
                "archive"
            }
            BackupEvent::Manifest => {
                in_manifest = true;
                "manifest"
            }
            BackupEvent::Data(data) => {
                if in_manifest {
                    c.manifest.extend_from_slice(&data);
                } else {
                    let archive = c.archives.last_mut().expect("data before any archive");
                    archive.2.extend_from_slice(&data);
                }
                "data"
            }
            BackupEvent::Progress(done) => {
                assert!(
                    c.last_progress.is_none_or(|before| done >= before),
                    "progress goes forward"
                );
                c.last_progress = Some(done);
                "data"
            }
            BackupEvent::Finished { end_lsn, timeline } => {
                assert_eq!(timeline, TimelineId(1));
                c.end_lsn = end_lsn;
                "finished"
            }
        };
        if kind != "data" || c.shape.last() != Some(&"data") {
            c.shape.push(kind);
        }
    }
    c
}

/// Takes a base backup of `cluster` with walcore's client; checks that the connection is
/// usable afterwards and that the server is the major the cluster says.
fn walcore_base_backup(cluster: &Cluster, options: &BaseBackupOptions) -> Collected {
    let events = block_on(async {
        let conn = connect(&config(cluster, "user=postgres"))
            .await
            .expect("connect");
        let version = conn.server_version_num().expect("server_version_num");
        assert_eq!(
            version / 10_000,
            cluster.major(),
            "server version {version}"
        );
        let stream = conn.base_backup(options).await.expect("BASE_BACKUP");
        let (mut rx, task) = stream.spawn();
        let mut events = Vec::new();
        while let Some(event) = rx.recv().await {
            events.push(event.unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL {}: {e}\n--- server log ---\n{}",
                    cluster.major(),
                    sys::tail(&cluster.server_log(), 30)
                )
            }));
        }
        let mut conn = task.await.expect("network task");
        conn.identify_system()
            .await
            .expect("IDENTIFY_SYSTEM after BASE_BACKUP");
        conn.close().await.expect("close");
        events
    });
    collect(events)
}

/// A `"<key>": "<LSN>"` of the manifest's WAL range (PostgreSQL 18 pads the LSN's low part).
fn manifest_lsn(manifest: &str, key: &str) -> Lsn {
    let at = format!("\"{key}\": \"");
    let start = manifest
        .find(&at)
        .unwrap_or_else(|| panic!("no {key} in the manifest"))
        + at.len();
    let end = start + manifest[start..].find('"').expect("closing quote");
    lsn(&manifest[start..end])
}

/// On every PostgreSQL major of the matrix (13 and 14 answer BASE_BACKUP differently from 15+),
/// walcore's client takes a base backup of a cluster with a tablespace and gives the same
/// events: `Started` listing the tablespace then the main directory, one complete tar archive
/// each (`<oid>.tar`, then `base.tar`), the manifest, `Finished`. The archives extracted as
/// PostgreSQL lays a backup out pass `pg_verifybackup`. A second backup with `include_wal`
/// carries the WAL from its start to its end in `base.tar`.
#[test]
fn base_backup_on_every_major() {
    let majors = walcore_e2e::cluster::pg_majors_wanted();
    for major in majors {
        let started = Instant::now();
        let cluster = Cluster::new_major(major);
        assert_eq!(cluster.major(), major);
        cluster.start();
        let ts_dir = sys::server_mkdir(&cluster.dir().join("ts1"));
        cluster.psql(&format!(
            "create tablespace ts1 location '{}'",
            ts_dir.display()
        ));
        cluster.psql("create table t (id int, v text) tablespace ts1");
        cluster.psql("insert into t select g, repeat('x', 100) from generate_series(1, 2000) g");
        let ts_oid: u32 = cluster
            .psql("select oid from pg_tablespace where spcname = 'ts1'")
            .parse()
            .expect("tablespace oid");

        let options = BaseBackupOptions {
            label: format!("walcore e2e on {major}: it's quoted"),
            checkpoint: Checkpoint::Fast,
            ..BaseBackupOptions::default()
        };
        let b = walcore_base_backup(&cluster, &options);
        let current = lsn(&cluster.psql("select pg_current_wal_lsn()"));

        // The same shape whatever the major.
        assert_eq!(
            b.shape,
            [
                "started", "archive", "data", "archive", "data", "manifest", "data", "finished"
            ],
            "PostgreSQL {major}"
        );
        assert!(b.start_lsn <= b.end_lsn && b.end_lsn <= current);
        assert_eq!(b.tablespaces.len(), 2, "{:?}", b.tablespaces);
        assert_eq!(b.tablespaces[0].oid, Some(ts_oid));
        assert_eq!(b.tablespaces[0].location.as_deref(), Some(ts_dir.as_path()));
        assert_eq!(
            (b.tablespaces[1].oid, b.tablespaces[1].location.as_ref()),
            (None, None)
        );
        let names: Vec<(&str, Option<&std::path::Path>)> = b
            .archives
            .iter()
            .map(|(n, l, _)| (n.as_str(), l.as_deref()))
            .collect();
        let ts_name = format!("{ts_oid}.tar");
        assert_eq!(
            names,
            [
                (ts_name.as_str(), Some(ts_dir.as_path())),
                ("base.tar", None)
            ]
        );
        // 15 and later report progress (the last report counts every archive byte); 13 and
        // 14 send none.
        let total: usize = b.archives.iter().map(|a| a.2.len()).sum();
        match b.last_progress {
            Some(done) => {
                assert!(major >= 15);
                assert_eq!(done, total as u64);
            }
            None => assert!(major < 15, "no progress from PostgreSQL {major}"),
        }

        // Each archive is a complete tar stream (end blocks included, which 13 and 14 leave
        // to the client).
        let ts_entries = tar_entries(&b.archives[0].2);
        assert!(
            ts_entries
                .iter()
                .any(|(n, _)| n.starts_with(&format!("PG_{major}_"))),
            "{ts_entries:?}"
        );
        let base_entries = tar_entries(&b.archives[1].2);
        let base_names: Vec<&str> = base_entries.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(base_names.first(), Some(&"backup_label"));
        assert_eq!(base_names.last(), Some(&"global/pg_control"));
        assert!(base_names.contains(&"tablespace_map"), "{base_names:?}");
        assert!(
            !base_names.iter().any(|n| n.starts_with("pg_wal/0")),
            "no WAL without include_wal"
        );
        let label =
            String::from_utf8_lossy(&b.archives[1].2[512..512 + base_entries[0].1 as usize])
                .into_owned();
        assert!(
            label.contains(&format!("LABEL: walcore e2e on {major}: it's quoted\n")),
            "{label}"
        );

        let manifest = String::from_utf8(b.manifest.clone()).expect("manifest is UTF-8");
        assert!(
            manifest.starts_with("{ \"PostgreSQL-Backup-Manifest-Version\": "),
            "{}",
            &manifest[..manifest.len().min(200)]
        );
        assert_eq!(manifest_lsn(&manifest, "Start-LSN"), b.start_lsn);
        assert_eq!(manifest_lsn(&manifest, "End-LSN"), b.end_lsn);

        // Laid out as pg_basebackup -Fp would (the tablespace in pg_tblspc/<oid>; with
        // tablespace_map there is no symbolic link to replace), the backup verifies.
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let ts_target = data.join("pg_tblspc").join(ts_oid.to_string());
        std::fs::create_dir(&data).expect("mkdir data");
        extract(&b.archives[1].2, &data, dir.path().join("base.tar"));
        std::fs::create_dir_all(&ts_target).expect("mkdir pg_tblspc/<oid>");
        extract(&b.archives[0].2, &ts_target, dir.path().join(&ts_name));
        std::fs::write(data.join("backup_manifest"), &manifest).expect("write manifest");
        let verify = cluster.pg_program("pg_verifybackup");
        run_ok(std::process::Command::new(&verify).arg("-n").arg(&data));

        // With include_wal, base.tar carries the segments from the start to the end.
        let options = BaseBackupOptions {
            include_wal: true,
            ..options
        };
        let w = walcore_base_backup(&cluster, &options);
        assert_eq!(w.shape, b.shape, "PostgreSQL {major} with WAL");
        let entries = tar_entries(&w.archives[1].2);
        let segment = |at: Lsn| {
            let segno = at.0 / (16 << 20);
            format!("pg_wal/{:08X}{:08X}{:08X}", 1, segno >> 8, segno & 0xFF)
        };
        let wal: Vec<&str> = entries
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| n.starts_with("pg_wal/0"))
            .collect();
        assert_eq!(wal.first().copied(), Some(segment(w.start_lsn).as_str()));
        // The end LSN may sit at a segment's very start: then that segment is not needed.
        assert_eq!(
            wal.last().copied(),
            Some(segment(Lsn(w.end_lsn.0 - 1)).as_str()),
            "{wal:?}"
        );
        drop(cluster);
        eprintln!(
            "PostgreSQL {major}: two base backups checked in {:?}",
            started.elapsed()
        );
    }
}

/// Writes `tar` to `file` and extracts it into `into`.
fn extract(tar: &[u8], into: &std::path::Path, file: std::path::PathBuf) {
    std::fs::write(&file, tar).expect("write a tar file");
    run_ok(
        std::process::Command::new("tar")
            .arg("-xf")
            .arg(&file)
            .arg("-C")
            .arg(into),
    );
}

/// A physical slot made with RESERVE_WAL holds WAL before a byte is streamed; START_REPLICATION
/// from the slot gives the server's WAL byte for byte (compared with the segment file in
/// `pg_wal`), keepalives get a status update, and the slot's `restart_lsn` follows
/// the flush position the client reports, not what it received: a client that reports only
/// what is durable never lets the server drop WAL it lacks.
#[test]
fn streamed_wal_is_the_servers_own_and_the_slot_follows_the_flush_position() {
    use walcore::replication::stream::{ServerMessage, StatusUpdate, StreamEvent, pg_time};
    const SEG: u64 = 16 * 1024 * 1024;
    let cluster = Cluster::new();
    cluster.start();
    cluster.psql("create table streamed (x int)");
    let slot_lsn = |c: &Cluster| {
        lsn(&c.psql(
            "select restart_lsn from pg_replication_slots where slot_name = 'walcore_stream_test'",
        ))
    };
    let (received, seg_start, segment_name, reported) = block_on(async {
        let mut conn = connect(&config(&cluster, "user=postgres"))
            .await
            .expect("connection");
        conn.create_physical_slot("walcore_stream_test")
            .await
            .expect("CREATE_REPLICATION_SLOT");
        // The slot holds WAL from the moment it exists, before anything streams, and
        // READ_REPLICATION_SLOT says where, as pg_replication_slots does.
        let held = slot_lsn(&cluster);
        let read = conn
            .read_replication_slot("walcore_stream_test")
            .await
            .expect("READ_REPLICATION_SLOT");
        assert_eq!(read, Some((held, Some(TimelineId(1)))));
        assert_eq!(
            conn.read_replication_slot("no_such_slot")
                .await
                .expect("READ_REPLICATION_SLOT"),
            None
        );
        let bad = conn.create_physical_slot("Bad-Name").await;
        assert!(
            bad.as_ref()
                .is_err_and(|e| e.to_string().contains("slot name")),
            "{bad:?}"
        );
        let info = conn.identify_system().await.expect("IDENTIFY_SYSTEM");
        let seg_start = Lsn(held.0 - held.0 % SEG);
        let started = conn
            .start_replication(Some("walcore_stream_test"), seg_start, info.timeline)
            .await
            .expect("START_REPLICATION");
        assert_eq!(started, None, "the current timeline streams");
        cluster.psql("insert into streamed select generate_series(1, 5000)");
        cluster.switch_wal();
        let segno = seg_start.0 / SEG;
        let segment_name = format!(
            "{:08X}{:08X}{:08X}",
            info.timeline.0,
            segno >> 8,
            segno & 0xFF
        );
        let mut received: Vec<u8> = Vec::new();
        let mut next = seg_start;
        let deadline = Instant::now() + Duration::from_secs(60);
        while (received.len() as u64) < SEG {
            assert!(Instant::now() < deadline, "the segment did not arrive");
            match conn
                .recv_stream(Duration::from_secs(30))
                .await
                .expect("stream")
            {
                StreamEvent::Message(ServerMessage::XLogData { start, data, .. }) => {
                    assert_eq!(start, next, "WAL arrives in order, without holes");
                    next = Lsn(next.0 + data.len() as u64);
                    received.extend_from_slice(&data);
                }
                StreamEvent::Message(ServerMessage::Keepalive { .. }) => {
                    // Received, but nothing durable yet: flush stays at the start.
                    conn.send_status(&StatusUpdate {
                        write: next,
                        flush: seg_start,
                        apply: seg_start,
                        sent_at: pg_time(std::time::SystemTime::now()),
                        reply_requested: false,
                    })
                    .await
                    .expect("status update");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        received.truncate(SEG as usize);
        // Received well past the segment, flushed nothing: the slot has not moved.
        assert_eq!(
            slot_lsn(&cluster),
            held,
            "the slot moved without a flush report"
        );
        // Now the segment is "durable": the slot follows to its end.
        let flushed = Lsn(seg_start.0 + SEG);
        conn.send_status(&StatusUpdate {
            write: next,
            flush: flushed,
            apply: flushed,
            sent_at: pg_time(std::time::SystemTime::now()),
            reply_requested: true,
        })
        .await
        .expect("status update");
        let mut reported = slot_lsn(&cluster);
        let until = Instant::now() + Duration::from_secs(30);
        while reported != flushed && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
            reported = slot_lsn(&cluster);
        }
        (received, seg_start, segment_name, reported)
    });
    assert_eq!(
        reported,
        Lsn(seg_start.0 + SEG),
        "the slot follows the reported flush position"
    );
    let file = std::fs::read(cluster.data.join("pg_wal").join(&segment_name))
        .expect("the segment is still in pg_wal (the slot holds it)");
    assert_eq!(file.len(), received.len());
    assert!(
        file == received,
        "streamed bytes differ from {segment_name} in pg_wal"
    );
}

/// Streaming a timeline the server has left (a promoted standby, asked for timeline 1): the
/// WAL arrives up to the switch point exactly, then the server ends the stream and names the
/// next timeline and where it starts, and the connection takes the next command.
#[test]
fn a_stream_of_an_old_timeline_ends_at_the_switch_and_names_the_next() {
    use walcore::replication::stream::{ServerMessage, StreamEvent};
    const SEG: u64 = 16 * 1024 * 1024;
    let primary = Cluster::new();
    // No archiving: pg_basebackup would wait for it.
    primary.set("archive_mode", "off");
    primary.start();
    primary.psql("create table before_switch (x int)");
    let standby = Cluster::standby_of(&primary);
    assert_eq!(standby.psql("select pg_promote()"), "t");
    let history = std::fs::read_to_string(standby.data.join("pg_wal/00000002.history"))
        .expect("the promotion wrote 00000002.history");
    let switch = lsn(history
        .lines()
        .next()
        .and_then(|l| l.split('\t').nth(1))
        .expect("a history line"));

    let (ended, next, info) = block_on(async {
        let mut conn = connect(&config(&standby, "user=postgres"))
            .await
            .expect("connection");
        // Asked at the switch point itself: nothing to stream, the next timeline at once.
        let at_end = conn
            .start_replication(None, switch, TimelineId(1))
            .await
            .expect("START_REPLICATION at the end of timeline 1");
        assert_eq!(
            at_end,
            Some(StreamEvent::TimelineEnded {
                next_timeline: TimelineId(2),
                start: switch
            })
        );
        // From the start of the segment that holds the last byte of timeline 1.
        let start = Lsn((switch.0 - 1) / SEG * SEG);
        let started = conn
            .start_replication(None, start, TimelineId(1))
            .await
            .expect("START_REPLICATION on timeline 1");
        assert_eq!(
            started, None,
            "timeline 1 streams from {start} (switch at {switch})"
        );
        let mut next = start;
        let ended = loop {
            match conn
                .recv_stream(Duration::from_secs(30))
                .await
                .expect("stream")
            {
                StreamEvent::Message(ServerMessage::XLogData { start, data, .. }) => {
                    assert_eq!(start, next, "WAL in order");
                    next = Lsn(next.0 + data.len() as u64);
                }
                StreamEvent::Message(ServerMessage::Keepalive { .. }) => {}
                end @ StreamEvent::TimelineEnded { .. } => break end,
            }
        };
        // The connection is usable again.
        let info = conn
            .identify_system()
            .await
            .expect("IDENTIFY_SYSTEM after the stream");
        (ended, next, info)
    });
    assert_eq!(
        ended,
        StreamEvent::TimelineEnded {
            next_timeline: TimelineId(2),
            start: switch
        }
    );
    assert_eq!(
        next, switch,
        "timeline 1 streamed up to the switch point exactly"
    );
    assert_eq!(info.timeline, TimelineId(2));
}
