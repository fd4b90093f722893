//! Potluck's wire protocol (`potluck.v1`). The gRPC services land with the
//! pipeline issue; this crate is the bottom of the dependency arrow
//! `proto ← engine ← {worker, coordinator} ← potluck`.

/// The protocol package name, so logs and version checks agree on it.
pub const PACKAGE: &str = "potluck.v1";
