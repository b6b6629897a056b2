//! The global group and the control path (docs/failover.md): the replicated
//! control record ([`record`], [`store`]), this region's role and lease ([`role`]), the loops
//! that detect region loss, fail over, switch over and renew leases ([`runtime`]), the
//! traffic-move hooks ([`hooks`]), the typed `ControlService` / `GlobalService` edge
//! ([`grpc`]) and its domain <-> wire conversions ([`wire`]).

pub mod dbs;
pub mod failover;
pub mod grpc;
pub mod hooks;
pub mod lease;
pub mod record;
pub mod role;
pub mod runtime;
pub mod store;
pub mod wire;
