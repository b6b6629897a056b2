//! Generated gRPC code for the `lifeboat.v1` protocol. This crate only generates: domain <-> wire
//! conversions live next to the domain types in `lifeboat-common`.
#![allow(clippy::all, missing_docs)]

/// `lifeboat.v1`: agent, admin, raft and replication services.
pub mod v1 {
    tonic::include_proto!("lifeboat.v1");
}
pub use v1::*;
