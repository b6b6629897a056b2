//! The snapshot pipeline shared by every source: the spool ([`spool`]), the upload of its parts
//! while it is written ([`preupload`]), and retention of acknowledged snapshots ([`retention`]).

pub mod preupload;
pub mod retention;
pub mod spool;
