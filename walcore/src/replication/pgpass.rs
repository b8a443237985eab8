//! The password file (`~/.pgpass`, `PGPASSFILE`), read as libpq's `passwordFromFile` does.
//!
//! Each line is `hostname:port:database:username:password`; `*` alone matches anything in the
//! first four fields; `\` escapes `:` and `\`; lines starting with `#` are comments; the first
//! matching line wins. For a physical replication connection the database field is matched
//! against `replication`. [`lookup`] is pure; [`read_password`] adds the file and libpq's
//! refusal of a file that others can read.

use std::path::Path;

use tracing::warn;

/// The password of the first line of `text` that matches.
pub fn lookup(text: &str, host: &str, port: &str, database: &str, user: &str) -> Option<String> {
    text.lines().find_map(|line| {
        // A file edited on Windows: libpq (12+) drops the CR too.
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with('#') {
            return None;
        }
        let rest = match_field(line, host)?;
        let rest = match_field(rest, port)?;
        let rest = match_field(rest, database)?;
        let rest = match_field(rest, user)?;
        Some(unescape_password(rest))
    })
}

/// If `line` starts with a field matching `value` followed by `:`, what follows the `:`.
fn match_field<'a>(line: &'a str, value: &str) -> Option<&'a str> {
    if let Some(rest) = line.strip_prefix("*:") {
        return Some(rest);
    }
    let mut want = value.chars();
    let mut chars = line.char_indices();
    while let Some((i, c)) = chars.next() {
        let c = match c {
            ':' => {
                return want.next().is_none().then(|| &line[i + 1..]);
            }
            '\\' => match chars.next() {
                Some((_, escaped)) => escaped,
                None => return None,
            },
            c => c,
        };
        if want.next() != Some(c) {
            return None;
        }
    }
    // The line ended inside this field: not a match (fewer than five fields).
    None
}

/// The password field: up to an unescaped `:` or the end, with escapes removed.
fn unescape_password(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        match c {
            ':' => break,
            '\\' => match chars.next() {
                Some(escaped) => out.push(escaped),
                None => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

/// Reads `path` and looks the password up. A missing file is no password; so is a file that
/// the group or others may read, or that is not a regular file, as in libpq (with a warning
/// saying why).
pub fn read_password(
    path: &Path,
    host: &str,
    port: &str,
    database: &str,
    user: &str,
) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        warn!(
            "password file \"{}\" is not a plain file; ignoring it",
            path.display()
        );
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        warn!(
            "password file \"{}\" has group or world access; permissions should be u=rw (0600) \
             or less; ignoring it",
            path.display()
        );
        return None;
    }
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => {
            warn!("could not read password file \"{}\": {e}", path.display());
            return None;
        }
    };
    lookup(&text, host, port, database, user)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FILE: &str = "\
# comment:*:*:*:nope
db1:5432:replication:rep:first
*:*:replication:rep:wild\\:card\\\\pw:ignored
/tmp/sock:5433:*:*:socket
localhost:5432:*:bob:bobpw\r
broken:line
";

    #[test]
    fn first_matching_line_wins() {
        assert_eq!(
            lookup(FILE, "db1", "5432", "replication", "rep").as_deref(),
            Some("first")
        );
        assert_eq!(
            lookup(FILE, "db2", "6000", "replication", "rep").as_deref(),
            Some("wild:card\\pw"),
            "escapes, and the password ends at an unescaped ':'"
        );
        assert_eq!(
            lookup(FILE, "/tmp/sock", "5433", "replication", "anyone").as_deref(),
            Some("socket")
        );
        assert_eq!(
            lookup(FILE, "localhost", "5432", "replication", "bob").as_deref(),
            Some("bobpw"),
            "CR stripped"
        );
        assert_eq!(lookup(FILE, "db1", "5432", "postgres", "rep"), None);
        assert_eq!(lookup(FILE, "broken", "line", "x", "y"), None);
        assert_eq!(lookup(FILE, "# comment", "x", "y", "z"), None);
    }

    #[test]
    fn field_matching_is_exact() {
        assert_eq!(
            lookup(
                "db:5432:replication:rep:pw",
                "db",
                "543",
                "replication",
                "rep"
            ),
            None
        );
        assert_eq!(
            lookup(
                "db:5432:replication:rep:pw",
                "d",
                "5432",
                "replication",
                "rep"
            ),
            None
        );
        // '*' is a wildcard only as a whole field.
        assert_eq!(lookup("d*:1:2:3:pw", "db", "1", "2", "3"), None);
        assert_eq!(
            lookup("a\\:b:1:2:3:pw", "a:b", "1", "2", "3").as_deref(),
            Some("pw")
        );
    }

    #[test]
    fn unsafe_permissions_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "*:*:*:*:secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_password(&path, "h", "1", "replication", "u"), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_password(&path, "h", "1", "replication", "u").as_deref(),
            Some("secret")
        );
        assert_eq!(
            read_password(&dir.path().join("missing"), "h", "1", "r", "u"),
            None
        );
        assert_eq!(read_password(dir.path(), "h", "1", "r", "u"), None);
    }

    fn escape(field: &str) -> String {
        field.replace('\\', "\\\\").replace(':', "\\:")
    }

    proptest! {
        #[test]
        fn any_file_never_panics(text in any::<String>(), host in any::<String>()) {
            let _ = lookup(&text, &host, "5432", "replication", "u");
        }

        #[test]
        fn escaped_entries_match_themselves(
            host in "[^\n\r]{1,10}", port in "[0-9]{1,5}", user in "[^\n\r]{1,10}",
            password in "[^\n\r]{0,10}",
        ) {
            let line = format!(
                "{}:{}:replication:{}:{}",
                escape(&host), port, escape(&user), escape(&password)
            );
            // A line starting with '#' is a comment; a field "*" is a wildcard; both fine.
            let expected = (!line.starts_with('#')).then(|| password.clone());
            prop_assert_eq!(lookup(&line, &host, &port, "replication", &user), expected);
        }
    }
}
