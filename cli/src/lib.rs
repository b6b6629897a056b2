//! Library side of the `lifeboat` CLI: the operator commands of the global group (`control`),
//! conflicts, the demo and benches (on the test bed of `lifeboat-lab`), and printing. Restores
//! and verification are the `lifeboat-restore` engine; connections are `lifeboat-client`.
//!
//! **Must not import** the agent or the coordinator crates (`cargo tree -p lifeboat-cli`).

#![warn(missing_docs)]

pub mod conflicts;
pub mod control;
pub mod demo;
pub mod keys;
pub mod out;
pub mod reports;
