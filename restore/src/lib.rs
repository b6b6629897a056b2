//! Lifeboat's restore and verify engine, used by the `lifeboat` CLI (and the integration tests):
//!
//! - [`files`]: list catalog versions and restore files, directories and symlinks (every blob
//!   and whole file verified; temp + fsync + rename; never through a symlink), and
//!   `restore-snapshot` of exec dumps;
//! - [`snapshots`]: database snapshots (`restore redis`, `verify snapshot` of every kind);
//! - [`pg_restore`]: PostgreSQL point-in-time recovery from base backups and archived WAL;
//! - [`pg_verify`]: a base backup recovered and checked in a scratch PostgreSQL;
//! - [`servers`]: the local processes those start (free ports, `redis-server`, PostgreSQL tools
//!   run as their OS user), reused by the test lab.
//!
//! **Must not import** the agent, the coordinator or the lab. It writes no command output
//! (reports are returned and the CLI prints them; only a progress bar goes to stderr).

#![warn(missing_docs)]

pub mod files;
pub mod pg_restore;
pub mod pg_verify;
pub mod servers;
pub mod snapshots;
