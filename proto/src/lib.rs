//! Generated gRPC code for the `lifeboat.v1` protocol, plus read accessors on the control-plane
//! messages. Domain <-> wire conversions live next to the domain types (`lifeboat-common`,
//! the coordinator's `control::wire`).
#![allow(clippy::all, missing_docs)]

/// `lifeboat.v1`: agent, admin, control, raft and replication services.
pub mod v1 {
    tonic::include_proto!("lifeboat.v1");
}
pub use v1::*;

mod control;
