//! Lifeboat's test bed (`publish = false`), shared by `lifeboat demo` / `bench` and the
//! integration tests (`chaos-tests`): real processes on loopback or in network namespaces.
//!
//! - [`harness`]: a [`harness::Cluster`] of one region's coordinators and agents, started from
//!   the built binaries with written configs and a dev CA; agent status helpers;
//! - [`regions`]: several regions plus a witness under one global group;
//! - [`netns`]: sites as network namespaces (partition, isolate, heal; needs root);
//! - [`s3server`]: a SeaweedFS S3 server;
//! - [`dbservers`]: Redis and PostgreSQL servers (primary, streaming standby) and agent source
//!   configs for them;
//! - [`tree`]: seeded directory trees, mutations and comparison.
//!
//! Ports come from [`free_port`] / [`free_ports`] (never the same port twice in one process).
//!
//! **Must not import** the agent or the coordinator (it runs their binaries) nor the CLI.

#![warn(missing_docs)]

pub mod dbservers;
pub mod harness;
pub mod netns;
pub mod regions;
pub mod s3server;
pub mod tree;

pub use lifeboat_restore::servers::{free_port, free_ports};
