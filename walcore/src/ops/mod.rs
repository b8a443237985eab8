//! One operation per binary: what `archive_command` and `restore_command` do.

pub mod archive;
pub mod lookahead;
pub mod prefetch;
pub mod restore;
pub mod spool;
pub mod stream;
pub mod tail;

#[cfg(test)]
pub(crate) mod testing;

use std::future::Future;

use crate::config::{Config, Layer};
use crate::error::{Error, ErrorKind};
use crate::exit::{self, Hook};
use crate::repo::Repository;

/// Everything a hook binary does around its operation: loads the configuration (`flags` over
/// the environment over the file), starts logging, opens the repository, runs `op` on a small
/// runtime under the progress watchdog, logs the outcome where it is handled, and returns the
/// exit status from the one table in [`crate::exit`].
pub fn run_hook<T, F, Fut>(hook: Hook, flags: Layer, json: bool, op: F) -> u8
where
    F: FnOnce(Repository, Config) -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let condition = match hook {
        Hook::Archive => Some("archive_command"),
        Hook::Restore => Some("restore_command"),
        Hook::Backup => None,
    };
    run_alerting(hook, condition, flags, json, op)
}

/// [`run_hook`], recording the outcome as alert condition `condition` (see [`crate::alert`]):
/// a failure alerts once until the condition clears.
pub fn run_alerting<T, F, Fut>(
    hook: Hook,
    condition: Option<&str>,
    flags: Layer,
    json: bool,
    op: F,
) -> u8
where
    F: FnOnce(Repository, Config) -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let config = match Config::load(flags) {
        Ok(c) => c,
        Err(e) => {
            init_logging("info", json);
            tracing::error!("{e:#}");
            return exit::code(hook, e.kind());
        }
    };
    init_logging(&config.log, json);
    let alerts = config.alerts.clone();
    let repo_url = config.repo.clone();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .map_err(|e| Error::new(ErrorKind::Internal, format!("starting the runtime: {e}")))
        .and_then(|rt| {
            let result = rt.block_on(async {
                let repo = Repository::open(&config)?;
                let store = repo.store().describe();
                let timeout = config.progress_timeout;
                if hook == Hook::Backup {
                    // A base backup waits on the server's checkpoint and on archiving, with
                    // time limits of its own; the store's requests keep theirs.
                    return op(repo, config).await;
                }
                tokio::select! {
                    r = op(repo, config) => r,
                    e = crate::progress::watchdog(timeout, store) => Err(e),
                }
            });
            // A stalled request may still hold a thread: do not wait for it.
            rt.shutdown_background();
            result
        });
    if let Some(condition) = condition {
        let outcome = match &result {
            Err(e) if !(e.kind() == ErrorKind::NotFound && hook == Hook::Restore) => Err(e),
            _ => Ok(()),
        };
        if outcome.is_err() {
            crate::alert::count_failure(&alerts, condition);
        }
        crate::alert::record(&alerts, condition, &repo_url, outcome);
    }
    match result {
        Ok(_) => 0,
        // An absent file is an answer, not a failure: PostgreSQL asks for files past the end of
        // the archive as a matter of course.
        Err(e) if e.kind() == ErrorKind::NotFound && hook == Hook::Restore => {
            tracing::info!("{e}");
            exit::code(hook, e.kind())
        }
        Err(e) => {
            tracing::error!("{e:#}");
            exit::code(hook, e.kind())
        }
    }
}

/// Starts logging to stderr (PostgreSQL puts a command's stderr in its own log) at `level`
/// (`error`, `warn`, `info`, `debug`, `trace`, or a filter such as `walcore=debug`), as JSON
/// lines when `json` is set.
pub fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    // A second initialisation (an embedding program that set up its own) is not an error.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.without_time().try_init()
    };
}
