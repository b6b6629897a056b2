//! The protected files: roots and filters ([`scan`]), change events ([`watch`]), the root and
//! mass-deletion guard ([`guard`]), the acknowledged state ([`state`], [`spool_digest`]), and
//! what to send for each change ([`delta`], [`batch`]).

pub mod batch;
pub mod delta;
pub mod guard;
pub mod scan;
pub mod spool_digest;
pub mod state;
pub mod watch;
