//! Processes, users and directories: what the harness needs from the operating system.
//!
//! PostgreSQL refuses to run as root. When the tests run as root, every PostgreSQL program is
//! spawned as the `postgres` user ([`server_user`]) and every directory it touches is handed to
//! that user ([`give_to_server_user`]). As an ordinary user, everything runs as that user.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The numeric ids a process runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

/// The effective uid of this process, from the `Uid:` line of `/proc/self/status`
/// (real, effective, saved, filesystem).
pub fn euid() -> u32 {
    static EUID: OnceLock<u32> = OnceLock::new();
    *EUID.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .expect("an effective uid on the Uid: line of /proc/self/status")
    })
}

/// Whether the tests run as root (and so must run PostgreSQL as `postgres`).
pub fn is_root() -> bool {
    euid() == 0
}

/// The ids of a user, from `/etc/passwd`.
pub fn user_ids(name: &str) -> Option<Ids> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            Some(Ids {
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
            })
        } else {
            None
        }
    })
}

/// The user PostgreSQL runs as: `postgres` when we are root, else nobody in particular (`None`:
/// spawn as ourselves).
pub fn server_user() -> Option<Ids> {
    static IDS: OnceLock<Option<Ids>> = OnceLock::new();
    *IDS.get_or_init(|| {
        if is_root() {
            Some(user_ids("postgres").expect(
                "running as root, so PostgreSQL must run as the `postgres` user, but /etc/passwd \
                 has none (apt-get install -y postgresql-15 creates it)",
            ))
        } else {
            None
        }
    })
}

/// Makes `cmd` run as the server user (when we are root).
pub fn as_server_user(cmd: &mut Command) -> &mut Command {
    if let Some(ids) = server_user() {
        cmd.uid(ids.uid).gid(ids.gid);
    }
    cmd
}

/// Makes `path` usable by the server user: mode `mode`, and owned by `postgres` when we are root.
pub fn give_to_server_user(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
    if let Some(ids) = server_user() {
        std::os::unix::fs::chown(path, Some(ids.uid), Some(ids.gid))
            .unwrap_or_else(|e| panic!("chown postgres {}: {e}", path.display()));
    }
}

/// A fresh temporary directory (under `/tmp`, short path, so socket paths stay under 100 bytes)
/// that the server user may use.
pub fn server_tempdir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("create a temporary directory under /tmp");
    give_to_server_user(dir.path(), 0o755);
    dir
}

/// Creates `path` (one level) for the server user.
pub fn server_mkdir(path: &Path) -> PathBuf {
    std::fs::create_dir(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    give_to_server_user(path, 0o755);
    path.to_path_buf()
}

/// `cp -a src dst` (keeps owners and modes; a copied stopped cluster is a valid cluster).
pub fn copy_tree(src: &Path, dst: &Path) {
    let out = run(
        Command::new("cp").arg("-a").arg(src).arg(dst),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "cp -a {} {} failed: {}",
        src.display(),
        dst.display(),
        out.stderr
    );
}

/// What a finished command left.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// The command was killed because it outlived its time limit.
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Output {
    /// The exit code, or `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs `cmd` to completion (stdin closed, stdout and stderr captured), killing it after
/// `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let start = Instant::now();
    let program = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let mut out_pipe = child.stdout.take().expect("stdout pipe");
    let mut err_pipe = child.stderr.take().expect("stderr pipe");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            break status;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait for a killed child");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    Output {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        timed_out,
        elapsed: start.elapsed(),
    }
}

/// A directory for this test process's shared fixtures (templates, sample WAL), at
/// `/tmp/walcore-e2e-<pid>`. Statics are never dropped, so such directories outlive the
/// process; the first call removes those left by processes that are gone.
pub fn process_scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(entries) = std::fs::read_dir("/tmp") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("walcore-e2e-")
                    && pid.parse::<u32>().is_ok()
                    && !Path::new("/proc").join(pid).exists()
                {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = PathBuf::from(format!("/tmp/walcore-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        server_mkdir(&dir)
    })
}

/// Polls `f` every `every` until it returns `Ok`; after `timeout`, panics with the last `Err`
/// (which says what was awaited and how things stood).
pub fn wait_for<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(state) if start.elapsed() > timeout => {
                panic!("timed out after {timeout:?}: {state}")
            }
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// The last `n` lines of `text`, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
