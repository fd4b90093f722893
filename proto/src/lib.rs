//! Potluck's wire protocol (`potluck.v1`), generated at build time without a
//! system `protoc`. This crate is the bottom of the dependency arrow
//! `proto ← engine ← {worker, coordinator} ← potluck`; its types never appear
//! in the public APIs of `engine` or `coordinator`.

pub mod trace_context;

/// The protocol package name, so logs and version checks agree on it.
pub const PACKAGE: &str = "potluck.v1";

/// Generated messages and services.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("potluck.v1");
}
