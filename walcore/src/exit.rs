//! Exit statuses: the one table both hooks use (`docs/exit-codes.md` shows it to users).
//!
//! PostgreSQL reads them differently per hook. `archive_command`: any non-zero status means
//! "try again later", but a status above 125 (or a signal) makes the archiver process exit, so
//! archive failures stay within 1..=125. `restore_command`: a status from 1 to 125 means "no
//! such file" and may end recovery and promote the server; above 125 stops recovery with FATAL.
//! So the restore hook returns 1 for an absent file and statuses above 125 for every failure.

use crate::error::ErrorKind;

/// Which hook is exiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Archive,
    Restore,
    /// `walcore` and `walcore-basebackup`: ordinary commands, with the archive hook's codes.
    Backup,
}

/// Usage errors (bad arguments), per hook.
pub fn usage(hook: Hook) -> u8 {
    match hook {
        Hook::Archive | Hook::Backup => 2,
        Hook::Restore => 200,
    }
}

/// A panic (a bug): must never look like "absent" to PostgreSQL.
pub fn panic(hook: Hook) -> u8 {
    match hook {
        Hook::Archive | Hook::Backup => 10,
        Hook::Restore => 208,
    }
}

/// The exit status for an error of `kind`.
pub fn code(hook: Hook, kind: ErrorKind) -> u8 {
    use ErrorKind as K;
    match hook {
        Hook::Archive | Hook::Backup => match kind {
            K::Configuration => 2,
            K::InvalidInput => 3,
            K::Conflict => 4,
            K::Integrity | K::Hole => 5,
            K::WrongKey => 6,
            K::Transient => 7,
            K::Storage | K::NotFound => 8,
            K::LocalIo => 9,
            K::Internal => 10,
        },
        Hook::Restore => match kind {
            K::NotFound => 1,
            K::Configuration => 200,
            K::InvalidInput => 201,
            K::Integrity => 202,
            K::WrongKey => 203,
            K::Transient => 204,
            K::Storage => 205,
            K::LocalIo => 206,
            K::Conflict | K::Internal => 207,
            K::Hole => 209,
        },
    }
}

/// Makes a panic exit with [`panic()`](fn@panic)'s status instead of Rust's 101, which PostgreSQL would
/// read as "file not found" in `restore_command`.
pub fn install_panic_exit(hook: Hook) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        std::process::exit(i32::from(panic(hook)));
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ErrorKind; 11] = [
        ErrorKind::NotFound,
        ErrorKind::Hole,
        ErrorKind::Conflict,
        ErrorKind::Integrity,
        ErrorKind::WrongKey,
        ErrorKind::Configuration,
        ErrorKind::InvalidInput,
        ErrorKind::Transient,
        ErrorKind::Storage,
        ErrorKind::LocalIo,
        ErrorKind::Internal,
    ];

    #[test]
    fn restore_says_absent_only_for_not_found() {
        for kind in ALL {
            let c = code(Hook::Restore, kind);
            if kind == ErrorKind::NotFound {
                assert_eq!(c, 1);
            } else {
                assert!(c > 125, "{kind:?} -> {c}");
            }
        }
        assert!(usage(Hook::Restore) > 125 && panic(Hook::Restore) > 125);
    }

    #[test]
    fn archive_failures_are_retryable_statuses() {
        for kind in ALL {
            let c = code(Hook::Archive, kind);
            assert!((1..=125).contains(&c), "{kind:?} -> {c}");
        }
    }
}
