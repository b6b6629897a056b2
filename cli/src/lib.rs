//! Library side of the `lifeboat` CLI: connection options, restore, the local process harness used
//! by `demo`, `bench` and the integration tests, and demo-tree generation and comparison.

#![warn(missing_docs)]

pub mod conflicts;
pub mod conn;
pub mod control;
pub mod db_restore;
pub mod dbservers;
pub mod demo;
pub mod demo_dbs;
pub mod demo_regions;
pub mod harness;
pub mod netns;
pub mod out;
pub mod pg_restore;
pub mod pg_verify;
pub mod regions;
pub mod restore;
pub mod s3server;
pub mod tree;
