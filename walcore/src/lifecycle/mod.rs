//! What reads the whole repository and decides about it as a whole: retention today.
//!
//! - [`policy`]: the retention policy as a pure function. The complete backups, the pins, the
//!   timeline histories and `now` go in; a [`RetentionPlan`] comes out (each backup kept, with
//!   every rule that keeps it, or expired, with the rule that came nearest to keeping it; the
//!   WAL to keep as LSN ranges per timeline). [`wal_to_delete`] turns that plan and a listing of
//!   stored WAL keys into the keys that may go. `--dry-run` prints the plan (`Display`), `--json`
//!   serializes it.
//!
//! - [`verify`]: `walcore verify`: every object read through the codec and checked against what
//!   refers to it, every backup's WAL and the restorable window checked for continuity, each
//!   problem with its key, kind and consequence; a ledger in the repository so that a verified
//!   object is not read again.
//!
//! - [`status`]: `walcore status`: the newest archived segment and backup with their ages, the
//!   restorable window and its gaps, the WAL per timeline, the bytes stored and the last
//!   verify, all through the index.
//!
//! What the policy does not do: list, read or delete objects. The command that executes a plan does
//! that, and re-plans after each listing rather than trusting an old plan.

pub mod expire;
pub mod index;
pub mod metrics;
pub mod policy;
pub mod status;
pub mod verify;

pub use policy::{
    BackupDecision, LsnRange, Policy, Reason, RetentionPlan, Rule, Unclassified, Verdict, WalSweep,
    Window, retention_plan, wal_to_delete,
};
