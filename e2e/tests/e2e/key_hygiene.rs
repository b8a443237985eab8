//! Key hygiene, with the real binaries: a misspelt variable, a TOML syntax error beside the key
//! (also as a real `archive_command`, read back from the server log), a key file others may
//! read and a key command that hangs each fail within seconds, with a clear message, the
//! configuration error's exit status, nothing written to the repository, and no part of the
//! key in any output.

use std::path::{Path, PathBuf};
use std::time::Duration;

use walcore_e2e::repo::{Codec, KEY_1};
use walcore_e2e::sys::{self, Output};
use walcore_e2e::{Cluster, Repo, bins};

use crate::archive_matrix::{describe, samples};

/// `walcore-archive`'s and `walcore-restore`'s status for a configuration error
/// (`docs/exit-codes.md`).
const ARCHIVE_CONFIG_ERROR: i32 = 2;
const RESTORE_CONFIG_ERROR: i32 = 200;

/// Every configuration error here must be reported this fast.
const FAST: Duration = Duration::from_secs(10);

/// Panics when `text` holds any 8 consecutive characters of `key` (either case).
fn assert_no_key_in(text: &str, key: &str, what: &str) {
    let lower = text.to_ascii_lowercase();
    for i in 0..=key.len() - 8 {
        let piece = &key[i..i + 8];
        assert!(
            !lower.contains(piece),
            "{what}: key material {piece} appears in the output:\n{text}"
        );
    }
}

/// Checks a configuration error of one binary: the status, the time it took, the message,
/// and that neither stream shows the key.
fn assert_config_error(out: &Output, code: i32, needles: &[&str], what: &str) {
    assert_eq!(out.code(), Some(code), "{}", describe(what, out));
    assert!(out.elapsed < FAST, "{what}: took {:?}", out.elapsed);
    for needle in needles {
        assert!(
            out.stderr.contains(needle),
            "{}",
            describe(&format!("{what}: the message does not say {needle:?}"), out)
        );
    }
    assert_no_key_in(&out.stdout, KEY_1, what);
    assert_no_key_in(&out.stderr, KEY_1, what);
}

fn with(env: &[(String, String)], name: &str, value: &str) -> Vec<(String, String)> {
    let mut env = env.to_vec();
    env.retain(|(k, _)| k != name);
    env.push((name.to_string(), value.to_string()));
    env
}

fn segment() -> (&'static Path, String) {
    let path = samples().segments[0].as_path();
    let name = crate::archive_matrix::name_of(path);
    (path, name)
}

/// A misspelt key variable used to be ignored, and the push then created an unencrypted
/// repository: data the user believed encrypted lay in the store in the clear.
#[test]
fn a_misspelt_key_variable_never_creates_an_unencrypted_repository() {
    let repo = Repo::file();
    let env = with(&repo.env(&Codec::plain()), "WALCORE_ENCRYPTON_KEY", KEY_1);
    let (path, name) = segment();
    let out = bins::archive(&env, path);
    assert_config_error(
        &out,
        ARCHIVE_CONFIG_ERROR,
        &[
            "WALCORE_ENCRYPTON_KEY",
            "did you mean WALCORE_ENCRYPTION_KEY?",
        ],
        "archive with WALCORE_ENCRYPTON_KEY",
    );
    assert_eq!(
        repo.keys(),
        Vec::<String>::new(),
        "a refused push wrote to the repository"
    );

    let dest = crate::archive_matrix::dest_dir();
    let out = bins::restore(&env, &name, &dest.path().join("RECOVERYXLOG"));
    assert_config_error(
        &out,
        RESTORE_CONFIG_ERROR,
        &["did you mean WALCORE_ENCRYPTION_KEY?"],
        "restore with WALCORE_ENCRYPTON_KEY",
    );
}

/// A configuration file the server user can read, holding `text`.
fn config_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("walcore.toml");
    std::fs::write(&path, text).expect("write the configuration file");
    sys::give_to_server_user(&path, 0o600);
    path
}

/// A syntax error on the key's line, or on the next one, used to be reported with the line
/// quoted: the key ended up in PostgreSQL's log.
#[test]
fn a_toml_error_beside_the_key_never_shows_the_key() {
    let repo = Repo::file();
    let dir = sys::server_tempdir("wckeyconf");
    let url = repo.url();
    let cases = [
        (
            format!("repo = \"{url}\"\nencryption_key = {KEY_1}\n"),
            "line 2",
        ),
        (
            format!("repo = \"{url}\"\nencryption_key = \"{KEY_1}\ncompression = \"none\"\n"),
            "line 2",
        ),
        (
            format!("encryption_key = \"{KEY_1}\"\nrepo = {url}\n"),
            "line 2",
        ),
        (format!("repo = \"{url}\"\n{KEY_1}\n"), "line 2"),
    ];
    let (path, _) = segment();
    for (text, line) in &cases {
        let file = config_file(dir.path(), text);
        let env = vec![(
            "WALCORE_CONFIG".to_string(),
            file.to_string_lossy().into_owned(),
        )];
        let out = bins::archive(&env, path);
        assert_config_error(
            &out,
            ARCHIVE_CONFIG_ERROR,
            &["not valid TOML", line, &file.to_string_lossy()],
            &format!("archive with configuration {text:?}"),
        );
    }
    assert_eq!(repo.keys(), Vec::<String>::new());

    // The same as PostgreSQL's archive_command: its log must hold no part of the key.
    let file = config_file(dir.path(), &cases[0].0);
    let mut cluster = Cluster::new();
    cluster.archive_with_walcore();
    cluster.set_env(&[(
        "WALCORE_CONFIG".to_string(),
        file.to_string_lossy().into_owned(),
    )]);
    cluster.start();
    let segment = cluster.switch_wal();
    sys::wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        let failed = cluster.psql("select failed_count from pg_stat_archiver");
        if failed.parse::<u64>().is_ok_and(|n| n >= 1) {
            Ok(())
        } else {
            Err(format!(
                "waiting for the archive command to fail on {segment}; failed_count {failed}"
            ))
        }
    });
    cluster.stop();
    let log = cluster.server_log();
    assert!(
        log.contains("not valid TOML at line 2"),
        "the server log does not show the configuration error:\n{}",
        sys::tail(&log, 40)
    );
    assert_no_key_in(&log, KEY_1, "the server log");
    assert_eq!(repo.keys(), Vec::<String>::new());
}

/// A key file others may read is refused, naming the file; the same file with mode 0600 works.
#[test]
fn a_world_readable_key_file_is_refused() {
    let repo = Repo::file();
    let dir = sys::server_tempdir("wckeyfile");
    let key = dir.path().join("walcore.key");
    std::fs::write(&key, format!("{KEY_1}\n")).expect("write the key file");
    sys::give_to_server_user(&key, 0o644);
    let env = with(
        &repo.env(&Codec::plain()),
        "WALCORE_ENCRYPTION_KEY_FILE",
        &key.to_string_lossy(),
    );
    let (path, _) = segment();
    let out = bins::archive(&env, path);
    assert_config_error(
        &out,
        ARCHIVE_CONFIG_ERROR,
        &[&key.to_string_lossy(), "0644", "chmod 600"],
        "archive with a key file of mode 0644",
    );
    assert_eq!(repo.keys(), Vec::<String>::new());

    sys::give_to_server_user(&key, 0o600);
    let out = bins::archive(&env, path);
    assert_eq!(
        out.code(),
        Some(0),
        "{}",
        describe("archive with the key file at 0600", &out)
    );
    assert_no_key_in(&out.stderr, KEY_1, "archive with the key file at 0600");
}

/// Processes whose command line is exactly `words`.
fn processes_running(words: &[&str]) -> Vec<String> {
    let want: Vec<u8> = words
        .iter()
        .flat_map(|w| [w.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .expect("list /proc")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// A key command that hangs (a KMS that never answers) used to hold the hook, and with it
/// PostgreSQL's archiver or startup process, forever. It is now stopped at its limit, with the
/// processes it started.
#[test]
fn a_hanging_key_command_is_stopped_within_its_limit() {
    let repo = Repo::file();
    // A duration no other process uses, to find the sleep afterwards; the shell forks it (a
    // command follows), so the hook's child is the shell and the sleep its child.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seconds = format!("600.{nanos:09}");
    let env = with(
        &with(
            &repo.env(&Codec::plain()),
            "WALCORE_ENCRYPTION_KEY_COMMAND",
            &format!("sleep {seconds}; echo {KEY_1}"),
        ),
        "WALCORE_ENCRYPTION_KEY_COMMAND_TIMEOUT",
        "2s",
    );
    let (path, name) = segment();
    let out = bins::archive(&env, path);
    assert_config_error(
        &out,
        ARCHIVE_CONFIG_ERROR,
        &["(sleep)", "did not finish within 2.0s"],
        "archive with a hanging key command",
    );
    assert!(
        out.elapsed >= Duration::from_secs(2),
        "stopped before its limit: {:?}",
        out.elapsed
    );
    assert_eq!(repo.keys(), Vec::<String>::new());

    let dest = crate::archive_matrix::dest_dir();
    let out = bins::restore(&env, &name, &dest.path().join("RECOVERYXLOG"));
    assert_config_error(
        &out,
        RESTORE_CONFIG_ERROR,
        &["(sleep)", "did not finish within 2.0s"],
        "restore with a hanging key command",
    );
    crate::archive_matrix::assert_empty(dest.path(), "restore with a hanging key command");

    // Killed processes are reaped by init once their parent is gone: allow a moment.
    sys::wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
        let left = processes_running(&["sleep", &seconds]);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("the key command's sleep still runs: pids {left:?}"))
        }
    });
}
