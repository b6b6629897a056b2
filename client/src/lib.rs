//! Client side of the admin API shared by the `lifeboat` CLI, the restore engine and the test
//! lab: how to reach the coordinators (TLS files, leader discovery) and the typed calls of the
//! global group (`ControlService`).
//!
//! **Must not import** the agent, the coordinator, the restore engine or the lab: it sits right
//! above `proto` and `common`.

#![warn(missing_docs)]

pub mod conn;
pub mod control;
