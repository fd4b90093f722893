//! What a worker needs to know before it serves: where the coordinator is,
//! how others reach it, its compute threads and device, and where shards are cached.
//!
//! The binary fills this from flags; tests build it directly.

use std::path::PathBuf;
use std::time::Duration;

use potluck_engine::Device;

use crate::shard_progress::ProgressStyle;

/// Compute device used when none is named: every build can run on the CPU.
pub const DEFAULT_DEVICE: Device = Device::Cpu;
/// Compute threads when none are named: 0 means every available core.
pub const DEFAULT_THREADS: usize = 0;
/// Where shards are cached when no directory is named (relative to the working directory).
pub const DEFAULT_CACHE_DIR: &str = "potluck-cache";
/// How long a starting worker keeps retrying an unreachable coordinator before giving up.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// TTL of the registration lease: a worker that dies vanishes from etcd after about this long.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// Largest gRPC message accepted: a prefill batch of hidden states fits with room to spare.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A worker's settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The coordinator's gRPC URL (`http://host:port`). `None` runs a stand-alone
    /// worker that never joins and cannot fetch shards.
    pub coordinator: Option<String>,
    /// The URL other processes use to reach this worker. `None` means
    /// `http://127.0.0.1:<listener port>`, right for single-host clusters and tests.
    pub advertise: Option<String>,
    /// Compute threads (0 = every available core).
    pub threads: usize,
    /// Compute device: the native CPU kernels, or candle on `candle-cpu`,
    /// `cuda:N` or `metal` (parsing already refused what this build lacks).
    pub device: Device,
    /// Directory of cached shards, named `<digest>.gguf`.
    pub cache_dir: PathBuf,
    /// This worker's name in the cluster. Empty means the advertised address.
    pub worker_id: String,
    /// Shared secret presented when joining (empty = none).
    pub join_token: String,
    /// How long to retry an unreachable coordinator at start.
    pub join_timeout: Duration,
    /// How shard downloads are shown.
    pub progress: ProgressStyle,
    /// Register in etcd instead of joining a coordinator.
    pub etcd: Option<EtcdRegistration>,
}

/// Where and how a worker registers itself in etcd.
#[derive(Debug, Clone)]
pub struct EtcdRegistration {
    /// How to reach etcd.
    pub etcd: potluck_etcd::EtcdConfig,
    /// The cluster's name (keys live under `/potluck/<cluster>/`).
    pub cluster: String,
    /// TTL of the registration lease.
    pub lease_ttl: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            coordinator: None,
            advertise: None,
            threads: DEFAULT_THREADS,
            device: DEFAULT_DEVICE,
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
            worker_id: String::new(),
            join_token: String::new(),
            join_timeout: DEFAULT_JOIN_TIMEOUT,
            progress: ProgressStyle::default(),
            etcd: None,
        }
    }
}
