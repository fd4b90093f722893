//! A small etcd v3 client: just what Potluck's membership, election and plan
//! store need (KV with transactions, leases with keep-alive, prefix watches,
//! user/password auth, TLS).
//!
//! Why our own: the `etcd-client` crate compiles etcd's protos with
//! `prost-build` in its build script, which needs a system `protoc`; Potluck
//! builds everywhere without one. The subset here is compiled by protox.
//!
//! Every unary RPC goes through one helper ([`EtcdClient`]'s `unary`) that
//! sets the deadline, attaches the auth token, re-authenticates once on an
//! expired token, and turns statuses into [`EtcdError`].

mod client;
mod config;
mod device;
mod error;
mod lease;
mod records;
mod watch;

/// Generated etcd v3 messages and client stubs (package `etcdserverpb`);
/// private, so etcd's wire types never reach our public API.
#[allow(missing_docs, dead_code, unreachable_pub, clippy::all, clippy::pedantic)]
mod pb {
    tonic::include_proto!("etcdserverpb");
}

pub use client::{prefix_end, EtcdClient, KeyValue};
pub use config::{EtcdConfig, EtcdTls, DEFAULT_CALL_TIMEOUT, DEFAULT_CONNECT_TIMEOUT};
pub use device::{DeviceInfo, DeviceKind, UnknownDeviceKind};
pub use error::EtcdError;
pub use lease::{KeepAlive, LeaseKeeper};
pub use records::{ClusterKeys, LeaderRecord, ModelShape, PlanRecord, PlanStageRecord, WorkerRecord};
pub use watch::{Watch, WatchEvent};
