//! Object keys (FORMAT.md §2). The only place that turns names into keys.

use crate::pg::{WalFileKind, WalFileName};

/// The repository metadata object.
pub const META_KEY: &str = "meta/repository";

/// The key of a WAL file: `wal/TTTTTTTT/LLLLLLLL/NAME`, or `wal/history/NAME` for a timeline
/// history file.
pub fn wal_key(name: &WalFileName) -> String {
    match name.kind() {
        WalFileKind::History => format!("wal/history/{name}"),
        _ => format!("wal/{:08X}/{:08X}/{name}", name.timeline().0, name.log_id()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_format() {
        let n = |s: &str| WalFileName::parse(s).expect("valid name");
        assert_eq!(
            wal_key(&n("0000000200000013000000A7")),
            "wal/00000002/00000013/0000000200000013000000A7"
        );
        assert_eq!(
            wal_key(&n("0000000200000013000000A7.partial")),
            "wal/00000002/00000013/0000000200000013000000A7.partial"
        );
        assert_eq!(
            wal_key(&n("000000010000000000000002.00000028.backup")),
            "wal/00000001/00000000/000000010000000000000002.00000028.backup"
        );
        assert_eq!(
            wal_key(&n("0000000A.history")),
            "wal/history/0000000A.history"
        );
    }
}
