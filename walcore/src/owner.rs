//! Who owns the files walcore creates.
//!
//! Run as root, walcore would leave root-owned files where another user must read or write them
//! next: objects in a `file://` repository that the archive hook (run as PostgreSQL's user)
//! later reads, and a restored data directory that PostgreSQL, which refuses to run as root,
//! must own. An [`Owner`] names the user and group such files are given to; users and groups are
//! looked up in `/etc/passwd` and `/etc/group` (or given as numbers).

use std::fmt;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{Error, ErrorKind};

/// A user and group to give files to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = name_of(self.uid, "/etc/passwd");
        let group = name_of(self.gid, "/etc/group");
        match (user, group) {
            (Some(u), Some(g)) => write!(f, "{u}:{g} (uid {}, gid {})", self.uid, self.gid),
            (Some(u), None) => write!(f, "{u} (uid {}, gid {})", self.uid, self.gid),
            _ => write!(f, "uid {}, gid {}", self.uid, self.gid),
        }
    }
}

/// Whether this process runs as root (effective user ID 0).
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The entry of `name` (or of the number `name`) in a `/etc/passwd`-style text: its ID and,
/// for users, their primary group.
fn lookup(text: &str, name: &str) -> Option<(u32, Option<u32>)> {
    let entry = |by_id: bool| {
        text.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            let key = if by_id { f.get(2) } else { f.first() };
            if f.len() >= 3 && key == Some(&name) {
                let id = f[2].parse().ok()?;
                Some((id, f.get(3).and_then(|g| g.parse().ok())))
            } else {
                None
            }
        })
    };
    entry(false).or_else(|| entry(true))
}

/// The name of user `uid` (`/etc/passwd`).
pub fn user_name(uid: u32) -> Option<String> {
    name_of(uid, "/etc/passwd")
}

/// The name of ID `id` in a `/etc/passwd`-style file.
fn name_of(id: u32, file: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 3 && f[2].parse::<u32>().ok() == Some(id)).then(|| f[0].to_owned())
    })
}

impl Owner {
    /// A user by name, with their primary group; `None` when `/etc/passwd` has no such user.
    pub fn user(name: &str) -> Option<Owner> {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        match lookup(&passwd, name) {
            Some((uid, Some(gid))) => Some(Owner { uid, gid }),
            _ => None,
        }
    }

    /// Parses `USER[:GROUP]`: names, or numeric IDs. Without a group, the user's primary group.
    pub fn parse(spec: &str) -> Result<Owner, Error> {
        let bad = |why: String| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("--owner '{spec}': {why} (give USER or USER:GROUP, names or numbers)"),
            )
        };
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            return Err(bad("empty user or group".into()));
        }
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let (uid, primary) = match lookup(&passwd, user) {
            Some(found) => found,
            None => match user.parse::<u32>() {
                Ok(uid) => (uid, None),
                Err(_) => return Err(bad(format!("no user '{user}' in /etc/passwd"))),
            },
        };
        let gid = match group {
            Some(g) => {
                let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
                match lookup(&groups, g) {
                    Some((gid, _)) => gid,
                    None => g
                        .parse::<u32>()
                        .map_err(|_| bad(format!("no group '{g}' in /etc/group")))?,
                }
            }
            None => primary.ok_or_else(|| {
                bad(format!(
                    "user {user} is not in /etc/passwd, so its group is unknown: give USER:GROUP"
                ))
            })?,
        };
        Ok(Owner { uid, gid })
    }

    /// The owner of `path` (following links).
    pub fn of_path(path: &Path) -> std::io::Result<Owner> {
        let m = std::fs::metadata(path)?;
        Ok(Owner {
            uid: m.uid(),
            gid: m.gid(),
        })
    }

    /// Gives an open file or directory to this owner.
    pub fn give_fd(&self, fd: impl AsFd) -> std::io::Result<()> {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(self.uid)),
            Some(rustix::fs::Gid::from_raw(self.gid)),
        )
        .map_err(std::io::Error::from)
    }

    /// Gives `path` itself (a link is not followed) to this owner.
    pub fn give_path(&self, path: &Path) -> std::io::Result<()> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
    }
}

/// Who a restored data directory must belong to.
///
/// `requested` is `--owner`. Run as root without it: the owner of the data directory when it
/// exists and is not root's, else of its parent directory when that is not root's (a directory
/// prepared for PostgreSQL), else the `postgres` user; with none of these, an error asking for
/// `--owner`, since PostgreSQL will not start on root's files. Run as another user: the files
/// are that user's (`None`: nothing to change), and `--owner` may only name that user.
pub fn restore_owner(requested: Option<&str>, pgdata: &Path) -> Result<Option<Owner>, Error> {
    let root = running_as_root();
    if let Some(spec) = requested {
        let owner = Owner::parse(spec)?;
        let me = rustix::process::geteuid().as_raw();
        if !root && owner.uid != me {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "--owner {spec}: only root can give the restored files to another user; run \
                     the restore as that user, or as root"
                ),
            ));
        }
        return Ok(Some(owner));
    }
    if !root {
        return Ok(None);
    }
    let not_root = |p: &Path| Owner::of_path(p).ok().filter(|o| o.uid != 0);
    if let Some(o) = not_root(pgdata) {
        return Ok(Some(o));
    }
    if let Some(parent) = pgdata.parent()
        && let Some(o) = not_root(parent)
    {
        return Ok(Some(o));
    }
    Owner::user("postgres").map(Some).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidInput,
            format!(
                "restoring as root into {}, but neither it nor its parent directory belongs to \
                 another user and there is no 'postgres' user: PostgreSQL refuses to run as root, \
                 so give --owner USER[:GROUP], the user that will run PostgreSQL",
                pgdata.display()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lines_are_looked_up_by_name() {
        let text = "root:x:0:0:root:/root:/bin/bash\npostgres:x:106:112::/var/lib/postgresql:/bin/sh\nbroken\n";
        assert_eq!(lookup(text, "postgres"), Some((106, Some(112))));
        assert_eq!(lookup(text, "root"), Some((0, Some(0))));
        assert_eq!(lookup(text, "106"), Some((106, Some(112))));
        assert_eq!(lookup(text, "nobody"), None);
        assert_eq!(lookup(text, "broken"), None);
        assert_eq!(lookup("staff:x:50:\n", "staff"), Some((50, None)));
    }

    #[test]
    fn a_restore_as_root_chooses_an_owner_postgresql_can_run_as() {
        if !running_as_root() {
            eprintln!("not root: the default owner is the user running the restore");
            assert_eq!(
                restore_owner(None, Path::new("/nonexistent/data")).ok(),
                Some(None)
            );
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        // The parent belongs to root: the postgres user, or an error asking for --owner.
        match Owner::user("postgres") {
            Some(pg) => assert_eq!(restore_owner(None, &data).expect("owner"), Some(pg)),
            None => {
                let e = restore_owner(None, &data).expect_err("nobody to give it to");
                assert!(e.to_string().contains("--owner"), "{e}");
            }
        }
        // A parent prepared for another user gives the owner.
        std::os::unix::fs::chown(dir.path(), Some(4242), Some(4343)).expect("chown");
        let o = Owner {
            uid: 4242,
            gid: 4343,
        };
        assert_eq!(restore_owner(None, &data).expect("owner"), Some(o));
        // So does the data directory itself, and --owner wins over both.
        std::fs::create_dir(&data).expect("mkdir");
        std::os::unix::fs::chown(&data, Some(4444), Some(4545)).expect("chown");
        let d = Owner {
            uid: 4444,
            gid: 4545,
        };
        assert_eq!(restore_owner(None, &data).expect("owner"), Some(d));
        assert_eq!(
            restore_owner(Some("1:2"), &data).expect("owner"),
            Some(Owner { uid: 1, gid: 2 })
        );
    }

    #[test]
    fn owners_parse_names_and_numbers() {
        assert_eq!(
            Owner::parse("4242421").expect_err("no group").kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(Owner::parse("0").expect("uid 0"), Owner { uid: 0, gid: 0 });
        let o = Owner::parse("1234:5678").expect("numbers");
        assert_eq!(
            o,
            Owner {
                uid: 1234,
                gid: 5678
            }
        );
        let root = Owner::parse("root").expect("root is in /etc/passwd");
        assert_eq!(root, Owner { uid: 0, gid: 0 });
        let e = Owner::parse("no-such-user-here").expect_err("unknown");
        assert!(e.to_string().contains("no user 'no-such-user-here'"), "{e}");
        let e = Owner::parse("root:no-such-group").expect_err("unknown");
        assert!(e.to_string().contains("no group"), "{e}");
        assert!(Owner::parse(":x").is_err() && Owner::parse("root:").is_err());
    }
}
