//! What reports on a setup and its repository, rather than moving data.
//!
//! - [`check`]: `walcore check`, the first command an operator runs after setting up archiving:
//!   PostgreSQL's settings, the repository (reachable, writable, the right key, the right
//!   cluster), and one WAL segment switched on the server and seen arriving in the repository.
//!
//! *Does not* change PostgreSQL's configuration or anything in the repository but its own
//! probe object (FORMAT.md §2, `check/`), which it removes again.

pub mod check;
pub mod server;
