//! The global group and the control path (docs/failover.md): the replicated
//! control record ([`record`], [`store`]), this region's role and lease ([`role`]), the loops
//! that detect region loss, fail over, switch over and renew leases ([`runtime`]), the
//! traffic-move hooks ([`hooks`]) and the JSON documents of the `Control` RPC ([`api`]).

pub mod api;
pub mod dbs;
pub mod hooks;
pub mod record;
pub mod role;
pub mod runtime;
pub mod store;
