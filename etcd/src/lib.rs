//! Potluck's etcd layer, over the `etcd-client` crate: the key layout under
//! `/potluck/<cluster>/` and the JSON records there, leases kept alive across
//! etcd restarts ([`LeaseKeeper`]), prefix watches, and the transactions that
//! elections and fencing use (they compare create revisions).
//!
//! etcd-client does the wire work (etcd's protos, TLS, user/password auth with
//! the token renewed when etcd refuses it). Every call here goes through one
//! helper ([`EtcdClient`]'s `call`) that sets the deadline and turns
//! etcd-client's errors into [`EtcdError`], so etcd's wire types never reach
//! the public API.

mod client;
mod config;
mod device;
mod error;
mod lease;
mod records;
mod watch;

pub use client::{EtcdClient, KeyValue};
pub use config::{EtcdConfig, EtcdTls, DEFAULT_CALL_TIMEOUT, DEFAULT_CONNECT_TIMEOUT};
pub use device::{DeviceInfo, DeviceKind, UnknownDeviceKind};
pub use error::EtcdError;
pub use lease::{KeepAlive, LeaseKeeper};
pub use records::{ClusterKeys, LeaderRecord, ModelShape, PlanRecord, PlanStageRecord, WorkerRecord};
pub use watch::{Watch, WatchEvent};
