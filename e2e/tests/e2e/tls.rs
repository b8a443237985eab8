//! walcore's replication client over TLS against real PostgreSQL 15: certificates made here
//! with the `openssl` program (a CA, a server certificate for `localhost` and `127.0.0.1`, a
//! client certificate, an unrelated CA), a server with `ssl = on` on a free TCP port, and
//! pg_hba.conf demanding TLS (`hostssl`, `hostnossl ... reject`) for replication. Every
//! `sslmode` does what libpq does, failures say which file or name is at fault, and a base
//! backup streams over TLS.
//!
//! The clusters listen on 127.0.0.1 and 127.0.0.2 (both loopback on Linux): the second address
//! is not in the server's certificate, for the verify-full failure. The port also names the
//! Unix socket, so SQL goes through [`psql`] here rather than [`Cluster::psql`] (which assumes
//! 5432).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use walcore::replication::{
    BackupEvent, BaseBackupOptions, Checkpoint, ConnConfig, ConnParams, ConnectOptions,
    ReplicationConnection, ReplicationError,
};
use walcore_e2e::cluster::pg_bin_dir;
use walcore_e2e::{Cluster, sys};

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(future)
}

fn options() -> ConnectOptions {
    ConnectOptions {
        connect_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(30),
        ..ConnectOptions::default()
    }
}

/// Runs `openssl` in `dir`, panicking with its output when it fails.
fn openssl(dir: &Path, args: &str) {
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir).args(args.split_whitespace());
    let out = sys::run(&mut cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "openssl {args} failed ({:?}): {}{} (the tests need the openssl program: apt-get \
         install -y openssl)",
        out.status,
        out.stdout,
        out.stderr
    );
}

/// The certificates of a test, in one directory.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    /// Makes a CA and, signed by it, a server certificate for `localhost` and `127.0.0.1` and
    /// a client certificate for the role `certuser`; and an unrelated CA. Keys are P-256 (fast
    /// to make), certificates valid for two days.
    fn make(dir: &Path) -> Certs {
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        for (name, subject) in [("ca", "e2e-CA"), ("other-ca", "e2e-other-CA")] {
            openssl(
                dir,
                &format!(
                    "req -x509 {key} -keyout {name}.key -out {name}.crt -days 2 -subj /CN={subject} \
                     -addext basicConstraints=critical,CA:TRUE \
                     -addext keyUsage=critical,keyCertSign,cRLSign"
                ),
            );
        }
        for (name, subject, extensions) in [
            (
                "server",
                "localhost",
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
            ),
            (
                "client",
                "certuser",
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=clientAuth\n",
            ),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), extensions).expect("write ext");
            openssl(
                dir,
                &format!("req -new {key} -keyout {name}.key -out {name}.csr -subj /CN={subject}"),
            );
            openssl(
                dir,
                &format!(
                    "x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
                     -out {name}.crt -extfile {name}.ext"
                ),
            );
        }
        // The server's files belong to the server user (the key readable by it alone, or
        // PostgreSQL refuses it); the client's key to us, mode 0600 as libpq demands.
        for (file, mode) in [
            ("server.crt", 0o644),
            ("server.key", 0o600),
            ("ca.crt", 0o644),
        ] {
            sys::give_to_server_user(&dir.join(file), mode);
        }
        std::fs::set_permissions(
            dir.join("client.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod client.key");
        Certs {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// A TCP port nothing listens on now (bound, then released: the server takes it just after).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// Runs `sql` with psql over the cluster's Unix socket at `port`, as the server user.
fn psql(cluster: &Cluster, port: u16, sql: &str) -> String {
    let mut cmd = Command::new(pg_bin_dir().join("psql"));
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C")
        .env("HOME", cluster.dir())
        .current_dir(cluster.dir())
        .arg("-X")
        .args(["-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(&cluster.sock)
        .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
        .args(["-c", sql]);
    sys::as_server_user(&mut cmd);
    let out = sys::run(&mut cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "psql {sql:?} failed ({:?}): {}\n--- server log ---\n{}",
        out.status,
        out.stderr.trim(),
        sys::tail(&cluster.server_log(), 40)
    );
    out.stdout.trim_end_matches('\n').to_owned()
}

/// A running cluster on 127.0.0.1 and 127.0.0.2 at a free port, with `ssl` as given, roles
/// `rep` (REPLICATION, password `right pw`), `norepl` (same password, no REPLICATION) and
/// `certuser` (REPLICATION, client certificate), and pg_hba.conf lines `hba` for replication
/// over TCP.
struct Server {
    cluster: Cluster,
    port: u16,
    certs: Certs,
}

impl Server {
    fn start(ssl: bool, hba: &str) -> Server {
        let cluster = Cluster::new();
        let certs = Certs::make(&sys::server_mkdir(&cluster.dir().join("tls")));
        let port = free_port();
        cluster.set("listen_addresses", "127.0.0.1,127.0.0.2");
        cluster.set("port", &port.to_string());
        cluster.set("ssl", if ssl { "on" } else { "off" });
        cluster.set("ssl_cert_file", &certs.path("server.crt"));
        cluster.set("ssl_key_file", &certs.path("server.key"));
        cluster.set("ssl_ca_file", &certs.path("ca.crt"));
        cluster.set("password_encryption", "scram-sha-256");
        // Rewritten in place, so the file keeps its owner (the server user).
        std::fs::write(
            cluster.data.join("pg_hba.conf"),
            format!("local all all trust\nlocal replication all trust\n{hba}"),
        )
        .expect("write pg_hba.conf");
        if let Err(e) = cluster.try_start() {
            panic!("{e}");
        }
        psql(
            &cluster,
            port,
            "create role rep with replication login password 'right pw';
             create role norepl with login password 'right pw';
             create role certuser with replication login;",
        );
        Server {
            cluster,
            port,
            certs,
        }
    }

    /// A connection string to `host` at the server's port, resolved without the process
    /// environment (no `HOME`, so no `~/.postgresql/root.crt` or `~/.pgpass` of the machine
    /// running the tests).
    fn config(&self, host: &str, extra: &str) -> ConnConfig {
        let conninfo = format!("host={host} port={} {extra}", self.port);
        ConnParams::parse(&conninfo)
            .and_then(|p| p.resolve(&|_| None))
            .unwrap_or_else(|e| panic!("{conninfo}: {e}"))
    }

    fn connect(&self, host: &str, extra: &str) -> Result<ReplicationConnection, ReplicationError> {
        block_on(ReplicationConnection::connect(
            &self.config(host, extra),
            &options(),
        ))
    }

    /// Connects (which must work), checks that the session is TLS or not as `tls` says, both
    /// from our side and from the server's (`pg_stat_ssl`), and runs IDENTIFY_SYSTEM.
    fn connects(&self, host: &str, extra: &str, tls: bool) {
        let (session, pid, info) = block_on(async {
            let mut conn = ReplicationConnection::connect(&self.config(host, extra), &options())
                .await
                .unwrap_or_else(|e| panic!("{host} {extra}: {e}"));
            let info = conn.identify_system().await.expect("IDENTIFY_SYSTEM");
            let session = conn.tls_session();
            let pid = conn.backend_pid().expect("backend pid");
            let seen = psql(
                &self.cluster,
                self.port,
                &format!("select ssl, coalesce(version, '-') from pg_stat_ssl where pid = {pid}"),
            );
            conn.close().await.expect("close");
            (session, seen, info)
        });
        match (&session, tls) {
            (Some(s), true) => assert_eq!(pid, format!("t|{}", s.protocol), "{host} {extra}"),
            (None, false) => assert_eq!(pid, "f|-", "{host} {extra}"),
            _ => panic!("{host} {extra}: TLS session {session:?}, expected TLS: {tls}"),
        }
        let system_id: u64 = psql(
            &self.cluster,
            self.port,
            "select system_identifier from pg_control_system()",
        )
        .parse()
        .expect("system identifier");
        assert_eq!(info.system_id, system_id);
    }

    fn fails(&self, host: &str, extra: &str) -> ReplicationError {
        match self.connect(host, extra) {
            Ok(conn) => panic!(
                "{host} {extra}: connected (TLS: {:?}), expected a failure",
                conn.tls_session()
            ),
            Err(e) => e,
        }
    }
}

/// pg_hba.conf of the TLS server: replication over TCP only with TLS; `certuser` by client
/// certificate, everyone else by password.
const HBA_TLS_ONLY: &str = "\
hostssl replication certuser 127.0.0.0/8 cert
hostssl replication all 127.0.0.0/8 scram-sha-256
hostnossl replication all 127.0.0.0/8 reject
";

#[test]
fn sslmodes_against_a_server_with_tls() {
    let server = Server::start(true, HBA_TLS_ONLY);
    let ca = server.certs.path("ca.crt");
    let other_ca = server.certs.path("other-ca.crt");
    let rep = "user=rep password='right pw'";

    // verify-full: the chain and the name (DNS name or IP address).
    for host in ["localhost", "127.0.0.1"] {
        server.connects(
            host,
            &format!("{rep} sslmode=verify-full sslrootcert={ca}"),
            true,
        );
    }
    // An address the certificate does not name.
    let err = server.fails(
        "127.0.0.2",
        &format!("{rep} sslmode=verify-full sslrootcert={ca}"),
    );
    assert!(matches!(err, ReplicationError::Tls { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "127.0.0.2:{}: the server's certificate does not match the host name \
             \"127.0.0.2\" (sslmode=verify-full): certificate not valid for name \"127.0.0.2\"",
            server.port
        )),
        "{err}"
    );
    assert!(!err.is_retryable(), "a certificate error is not transient");
    // verify-ca does not look at names.
    server.connects(
        "127.0.0.2",
        &format!("{rep} sslmode=verify-ca sslrootcert={ca}"),
        true,
    );
    // Another CA's file: not trusted, and the message names the file.
    for mode in ["verify-ca", "verify-full"] {
        let err = server.fails(
            "localhost",
            &format!("{rep} sslmode={mode} sslrootcert={other_ca}"),
        );
        assert_eq!(
            err.to_string(),
            format!(
                "localhost:{}: the server's certificate is not trusted: it is not signed by a CA \
                 of root certificate file \"{other_ca}\" (sslmode={mode})",
                server.port
            )
        );
        assert!(!err.is_retryable());
    }
    // verify-* without a root certificate file.
    let err = server.fails("localhost", &format!("{rep} sslmode=verify-full"));
    assert!(
        err.to_string().contains(
            "no root certificate file (no sslrootcert, and no home directory for \
             ~/.postgresql/root.crt), and sslmode=verify-full needs root certificates"
        ),
        "{err}"
    );

    // require: TLS without a CA file, no check; with one, the chain is checked (libpq).
    server.connects("127.0.0.2", &format!("{rep} sslmode=require"), true);
    let err = server.fails(
        "localhost",
        &format!("{rep} sslmode=require sslrootcert={other_ca}"),
    );
    assert!(err.to_string().contains("is not trusted"), "{err}");
    // prefer (the default) takes TLS; allow tries plain text first, is refused by the
    // hostnossl line, and tries again with TLS (libpq); disable gets the refusal.
    server.connects("localhost", rep, true);
    server.connects("localhost", &format!("{rep} sslmode=allow"), true);
    let err = server.fails("localhost", &format!("{rep} sslmode=disable"));
    assert_eq!(err.sqlstate(), Some("28000"), "{err}");
    assert!(
        err.to_string()
            .contains("pg_hba.conf rejects replication connection for host \"127.0.0.1\""),
        "{err}"
    );

    // The server's own refusals arrive intact over TLS.
    let err = server.fails(
        "localhost",
        &format!("user=rep password=wrong sslmode=verify-full sslrootcert={ca}"),
    );
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
    assert!(
        err.to_string().ends_with(
            "authenticating as \"rep\": FATAL: password authentication failed for user \"rep\" \
             (SQLSTATE 28P01)"
        ),
        "{err}"
    );
    assert!(!err.is_retryable());
    let err = server.fails(
        "localhost",
        &format!("user=norepl password='right pw' sslmode=verify-full sslrootcert={ca}"),
    );
    assert_eq!(err.sqlstate(), Some("42501"), "{err}");
    assert!(
        err.to_string()
            .contains("must be superuser or replication role to start walsender"),
        "{err}"
    );

    // A client certificate (pg_hba.conf's cert method: its CN is the role).
    let client = format!(
        "user=certuser sslmode=verify-full sslrootcert={ca} sslcert={} sslkey={}",
        server.certs.path("client.crt"),
        server.certs.path("client.key")
    );
    server.connects("localhost", &client, true);
    let err = server.fails(
        "localhost",
        &format!("user=certuser sslmode=verify-full sslrootcert={ca}"),
    );
    assert_eq!(err.sqlstate(), Some("28000"), "{err}");
    assert!(
        err.to_string()
            .contains("connection requires a valid client certificate"),
        "{err}"
    );
}

#[test]
fn sslmodes_against_a_server_without_tls() {
    let server = Server::start(false, "host replication all 127.0.0.0/8 scram-sha-256\n");
    let rep = "user=rep password='right pw'";
    for mode in ["require", "verify-ca", "verify-full"] {
        let err = server.fails(
            "localhost",
            &format!(
                "{rep} sslmode={mode} sslrootcert={}",
                server.certs.path("ca.crt")
            ),
        );
        assert!(matches!(err, ReplicationError::Tls { .. }), "{err}");
        assert!(
            err.to_string().starts_with(&format!(
                "localhost:{}: the server does not accept TLS (sslmode={mode})",
                server.port
            )),
            "{err}"
        );
        assert!(!err.is_retryable());
    }
    // prefer (the default) and allow go on in plain text.
    server.connects("localhost", rep, false);
    server.connects("127.0.0.1", &format!("{rep} sslmode=allow"), false);
}

#[test]
fn base_backup_over_tls() {
    let server = Server::start(true, HBA_TLS_ONLY);
    let config = server.config(
        "localhost",
        &format!(
            "user=rep password='right pw' sslmode=verify-full sslrootcert={}",
            server.certs.path("ca.crt")
        ),
    );
    let options = BaseBackupOptions {
        label: "walcore e2e over TLS".into(),
        checkpoint: Checkpoint::Fast,
        ..BaseBackupOptions::default()
    };
    let (events, tls, after) = block_on(async {
        let conn = ReplicationConnection::connect(&config, &self::options())
            .await
            .expect("connect");
        let tls = conn.tls_session();
        let stream = conn.base_backup(&options).await.expect("BASE_BACKUP");
        let (mut rx, task) = stream.spawn();
        let mut events = Vec::new();
        while let Some(event) = rx.recv().await {
            events.push(event.expect("backup event"));
        }
        let mut conn = task.await.expect("network task");
        let after = conn
            .identify_system()
            .await
            .expect("IDENTIFY_SYSTEM after BASE_BACKUP");
        conn.close().await.expect("close");
        (events, tls, after)
    });
    assert!(tls.is_some(), "the backup ran over TLS");
    let Some(BackupEvent::Started { start_lsn, .. }) = events.first().cloned() else {
        panic!("first event: {:?}", events.first())
    };
    let Some(BackupEvent::Finished { end_lsn, .. }) = events.last().cloned() else {
        panic!("last event: {:?}", events.last())
    };
    assert!(
        start_lsn <= end_lsn,
        "start {start_lsn} after end {end_lsn}"
    );
    assert!(end_lsn <= after.xlogpos);
    let data: usize = events
        .iter()
        .map(|e| match e {
            BackupEvent::Data(d) => d.len(),
            _ => 0,
        })
        .sum();
    // A fresh cluster's files, through TLS records of at most 16 KiB each.
    assert!(data > 10 << 20, "only {data} bytes of backup data");
    assert!(
        events.iter().any(|e| matches!(e, BackupEvent::Manifest)),
        "the manifest arrived"
    );
}

/// `walcore-basebackup take` over TLS: verify-full with the right CA stores a backup; a CA that
/// did not sign the server's certificate, and a wrong password over TLS, fail clearly and add
/// nothing to the catalog.
#[test]
fn take_over_tls_and_its_failures() {
    use crate::backup::Tool;
    use walcore_e2e::Repo;
    use walcore_e2e::repo::{Codec, KEY_1};

    let server = Server::start(true, HBA_TLS_ONLY);
    let repo = Repo::file();
    let tool = Tool::new(&server.cluster, repo.env(&Codec::encrypted(KEY_1)));
    let conninfo = |extra: &str| {
        format!(
            "host=localhost port={} user=rep sslmode=verify-full {extra}",
            server.port
        )
    };
    let good = conninfo(&format!(
        "password='right pw' sslrootcert={}",
        server.certs.path("ca.crt")
    ));
    // The server archives nothing: the backup carries its WAL.
    let id = tool
        .ok(&["take", "--dbname", &good, "--include-wal"])
        .trim()
        .to_owned();
    assert_eq!(tool.list(), vec![id.clone()]);

    for (extra, needle, what) in [
        (
            format!(
                "password='right pw' sslrootcert={}",
                server.certs.path("other-ca.crt")
            ),
            "not trusted",
            "a CA that did not sign the server's certificate",
        ),
        (
            format!(
                "password='wrong pw' sslrootcert={}",
                server.certs.path("ca.crt")
            ),
            "password authentication failed",
            "a wrong password over TLS",
        ),
    ] {
        let out = tool.run(&["take", "--dbname", &conninfo(&extra), "--include-wal"]);
        assert!(!out.status.success(), "{what}: take succeeded");
        assert!(
            out.stderr.contains(needle),
            "{what}: expected {needle:?} in:\n{}",
            out.stderr
        );
        assert_eq!(tool.list(), vec![id.clone()], "{what}: the catalog changed");
    }
}
