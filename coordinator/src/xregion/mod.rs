//! Between regions: the standby side's copy of the active region's catalog and blobs
//! ([`replication`]: subscribe, fetch, commit, confirm for synchronous replication, lag) and the
//! changes a fenced region made after a failover ([`conflicts`]: committed under
//! `_conflicts/`, settled by `ControlService.ResolveConflict`).

pub mod conflicts;
pub mod replication;
