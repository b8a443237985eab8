//! One operation per binary: what `archive_command` and `restore_command` do.

pub mod archive;
pub mod restore;

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
