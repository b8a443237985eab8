//! The binaries under test, and running them by hand.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::sys::{self, Output};

/// `walcore-archive`: PostgreSQL's `archive_command`.
pub const ARCHIVE: &str = "walcore-archive";
/// `walcore-restore`: PostgreSQL's `restore_command`.
pub const RESTORE: &str = "walcore-restore";
/// `walcore`: the operator command (backups, the catalog, restores, pins).
pub const WALCORE: &str = "walcore";

/// The directory holding the built binaries: `$WALCORE_BIN_DIR`, else the profile directory this
/// test runs from (`target/<profile>/deps/<test>` → `target/<profile>`).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = match std::env::var_os("WALCORE_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let exe = std::env::current_exe().expect("the test executable's path");
                exe.parent()
                    .and_then(Path::parent)
                    .expect("test executable under target/<profile>/deps")
                    .to_path_buf()
            }
        };
        for name in [ARCHIVE, RESTORE] {
            assert!(
                dir.join(name).is_file(),
                "{} not found in {}: build the binaries first: cargo build --workspace --bins \
                 (or point WALCORE_BIN_DIR at them)",
                name,
                dir.display()
            );
        }
        dir
    })
}

/// The path of binary `name`.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A copy of binary `name` the server user can run, made once per test process (debug builds
/// are large; `/root` and cargo's target directory may be unreachable for `postgres`).
fn staged(name: &str) -> PathBuf {
    static STAGED: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let dir = sys::process_scratch().join("bin");
    let dst = dir.join(name);
    let done = STAGED.get_or_init(Default::default);
    let mut done = done.lock().unwrap_or_else(|p| p.into_inner());
    if !done.iter().any(|n| n == name) {
        if !dir.exists() {
            sys::server_mkdir(&dir);
        }
        std::fs::copy(bin(name), &dst)
            .unwrap_or_else(|e| panic!("copy {name} into {}: {e}", dir.display()));
        sys::give_to_server_user(&dst, 0o755);
        done.push(name.to_string());
    }
    dst
}

/// Puts binary `name` into `dir` (a cluster's own `bin/`, reachable by the server user) and
/// returns its path there: a hard link to the process's staged copy, or a copy.
pub fn install(name: &str, dir: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let src = staged(name);
    let dst = dir.join(name);
    // Installed before: the same file (a second copy onto a hard link of the staged copy would
    // truncate the staged copy itself, leaving every later install an empty program).
    if let (Ok(a), Ok(b)) = (std::fs::metadata(&src), std::fs::metadata(&dst))
        && a.dev() == b.dev()
        && a.ino() == b.ino()
    {
        return dst;
    }
    let _ = std::fs::remove_file(&dst);
    if std::fs::hard_link(&src, &dst).is_err() {
        std::fs::copy(&src, &dst)
            .unwrap_or_else(|e| panic!("copy {name} into {}: {e}", dir.display()));
        sys::give_to_server_user(&dst, 0o755);
    }
    dst
}

/// The environment a walcore binary gets: only what is given (plus `PATH`), so the developer's
/// own `WALCORE_*` or `AWS_*` variables never leak into a test.
pub fn clean_command(program: &Path, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `walcore-archive <path>` as ourselves with `env`.
pub fn archive(env: &[(String, String)], path: &Path) -> Output {
    let mut cmd = clean_command(&bin(ARCHIVE), env);
    cmd.arg(path);
    sys::run(&mut cmd, Duration::from_secs(120))
}

/// Runs `walcore-restore <name> <dest>` as ourselves with `env`.
pub fn restore(env: &[(String, String)], name: &str, dest: &Path) -> Output {
    let mut cmd = clean_command(&bin(RESTORE), env);
    cmd.arg(name).arg(dest);
    sys::run(&mut cmd, Duration::from_secs(120))
}
