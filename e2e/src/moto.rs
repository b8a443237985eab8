//! The S3 emulator: moto's server on a free loopback port.
//!
//! moto is found through `$WALCORE_TEST_MOTO_SERVER`, else as `moto_server` on `PATH`. It runs
//! under a small shell watchdog that kills it when our end of its stdin closes, so it dies with
//! the test process even if that process never drops it (a shared server lives in a static).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::http;
use crate::sys;

/// How to get moto, for failure messages.
pub const INSTALL_HINT: &str = "install moto's S3 server: python3 -m venv /opt/moto && \
     /opt/moto/bin/pip install 'moto[s3]' flask flask-cors, then put /opt/moto/bin on PATH or set \
     WALCORE_TEST_MOTO_SERVER=/opt/moto/bin/moto_server (the repository's .ci/run installs it); \
     or set WALCORE_TEST_SKIP_S3=1 to skip the S3 tests";

/// Where `moto_server` is, if anywhere.
pub fn find_moto() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WALCORE_TEST_MOTO_SERVER") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("moto_server"))
        .find(|p| p.is_file())
}

/// Whether S3 tests should run. `false` (after a loud SKIPPED line naming `test`) only when
/// `WALCORE_TEST_SKIP_S3=1`; when moto is missing and no skip was asked for, panics with how to
/// install it.
pub fn s3_enabled(test: &str) -> bool {
    if std::env::var("WALCORE_TEST_SKIP_S3").is_ok_and(|v| v == "1") {
        // Straight to stderr, past the test harness's output capture: a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED {test}: WALCORE_TEST_SKIP_S3=1 (S3 tests not run against moto) ***\n"
        );
        return false;
    }
    if find_moto().is_none() {
        panic!("{test} needs moto_server, which is not installed: {INSTALL_HINT}");
    }
    true
}

/// A running moto server. Dropping it stops it.
#[derive(Debug)]
pub struct Moto {
    addr: SocketAddr,
    log: PathBuf,
    child: Child,
    watchdog: Option<ChildStdin>,
}

static BUCKETS: AtomicU64 = AtomicU64::new(0);

fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free loopback port");
    l.local_addr().expect("local address").port()
}

impl Moto {
    /// Starts a server; panics (with its log) if it does not answer within 30 s.
    pub fn start() -> Moto {
        let program =
            find_moto().unwrap_or_else(|| panic!("moto_server not found: {INSTALL_HINT}"));
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = free_port();
            let log = sys::process_scratch().join(format!("moto-{port}.log"));
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(r#""$0" -H 127.0.0.1 -p "$1" </dev/null >"$2" 2>&1 & pid=$!; read _; kill $pid; wait $pid"#)
                .arg(&program)
                .arg(port.to_string())
                .arg(&log)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
            let watchdog = child.stdin.take();
            let mut moto = Moto {
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                log,
                child,
                watchdog,
            };
            if moto.wait_ready(Duration::from_secs(30)) {
                return moto;
            }
            last_log = std::fs::read_to_string(&moto.log).unwrap_or_default();
            moto.shutdown();
        }
        panic!(
            "moto_server did not answer on loopback; its log:\n{}",
            sys::tail(&last_log, 40)
        );
    }

    /// One server for the whole test process (never dropped; the watchdog stops it when the
    /// process exits).
    pub fn shared() -> &'static Moto {
        static MOTO: OnceLock<Moto> = OnceLock::new();
        MOTO.get_or_init(Moto::start)
    }

    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(r) = http::request(self.addr, "GET", "/", b"")
                && r.status == 200
            {
                return true;
            }
            if self.child.try_wait().ok().flatten().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Creates a bucket with a name no other test uses and returns the name.
    pub fn create_bucket(&self) -> String {
        let n = BUCKETS.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let bucket = format!("wc-{}-{n}-{nanos}", std::process::id());
        let r = http::request(self.addr, "PUT", &format!("/{bucket}"), b"")
            .unwrap_or_else(|e| panic!("create bucket {bucket}: {e}"));
        assert!(
            r.status == 200,
            "create bucket {bucket}: HTTP {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        bucket
    }

    /// The bytes of object `key` in `bucket`, or `None` when absent.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        object_get(self.addr, bucket, key)
    }

    /// Stores `bytes` as object `key` in `bucket`, overwriting.
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        object_put(self.addr, bucket, key, bytes)
    }

    /// The keys in `bucket` under `prefix`.
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        object_list(self.addr, bucket, prefix)
    }

    fn shutdown(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.write_all(b"stop\n");
        }
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The bytes of object `key` in `bucket` of the S3 server at `addr`, or `None` when absent.
pub fn object_get(addr: SocketAddr, bucket: &str, key: &str) -> Option<Vec<u8>> {
    let r = http::request(addr, "GET", &format!("/{bucket}/{key}"), b"")
        .unwrap_or_else(|e| panic!("GET {bucket}/{key}: {e}"));
    match r.status {
        200 => Some(r.body),
        404 => None,
        s => panic!(
            "GET {bucket}/{key}: HTTP {s}: {}",
            String::from_utf8_lossy(&r.body)
        ),
    }
}

/// Stores `bytes` as object `key` in `bucket` (overwriting: this is a test tampering with the
/// store, not the code under test writing to it).
pub fn object_put(addr: SocketAddr, bucket: &str, key: &str, bytes: &[u8]) {
    let r = http::request(addr, "PUT", &format!("/{bucket}/{key}"), bytes)
        .unwrap_or_else(|e| panic!("PUT {bucket}/{key}: {e}"));
    assert!(r.status == 200, "PUT {bucket}/{key}: HTTP {}", r.status);
}

/// Deletes object `key` from `bucket` (a test losing an object behind the binaries' back).
pub fn object_delete(addr: SocketAddr, bucket: &str, key: &str) {
    let r = http::request(addr, "DELETE", &format!("/{bucket}/{key}"), b"")
        .unwrap_or_else(|e| panic!("DELETE {bucket}/{key}: {e}"));
    assert!(
        r.status == 204 || r.status == 200,
        "DELETE {bucket}/{key}: HTTP {}",
        r.status
    );
}

/// The keys in `bucket` under `prefix` (the first 1000).
pub fn object_list(addr: SocketAddr, bucket: &str, prefix: &str) -> Vec<String> {
    let r = http::request(
        addr,
        "GET",
        &format!("/{bucket}?list-type=2&prefix={prefix}&max-keys=1000"),
        b"",
    )
    .unwrap_or_else(|e| panic!("list {bucket}/{prefix}: {e}"));
    assert!(r.status == 200, "list {bucket}: HTTP {}", r.status);
    let body = String::from_utf8_lossy(&r.body);
    body.split("<Key>")
        .skip(1)
        .filter_map(|s| s.split_once("</Key>").map(|(k, _)| k.to_string()))
        .collect()
}
