//! Potluck's layout in etcd: the keys under `/potluck/<cluster>/` and the JSON
//! each holds. Workers, coordinators and `potluck status` all read and write
//! through these types, so the field names live in one place.

use serde::{Deserialize, Serialize};

use crate::DeviceInfo;

/// The keys of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterKeys {
    root: String,
}

impl ClusterKeys {
    /// Keys of cluster `name` (a name with `/` in it would escape the prefix, so it is refused).
    pub fn new(name: &str) -> Result<Self, crate::EtcdError> {
        let ok = !name.is_empty()
            && name.len() <= 128
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !ok {
            return Err(crate::EtcdError::Config(format!(
                "cluster name `{name}`: use 1-128 letters, digits, `-`, `_` or `.`"
            )));
        }
        Ok(Self { root: format!("/potluck/{name}/") })
    }

    /// Prefix of the worker keys.
    pub fn workers(&self) -> String {
        format!("{}workers/", self.root)
    }

    /// One worker's key.
    pub fn worker(&self, id: &str) -> String {
        format!("{}workers/{id}", self.root)
    }

    /// The plan in force, with its epoch.
    pub fn plan(&self) -> String {
        format!("{}plan", self.root)
    }

    /// The elected coordinator.
    pub fn leader(&self) -> String {
        format!("{}leader", self.root)
    }

    /// The model's shape, for the workers' start-up probe.
    pub fn model(&self) -> String {
        format!("{}model", self.root)
    }
}

/// What a worker registers under its lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Stable id.
    pub id: String,
    /// gRPC URL of its Stage service.
    pub address: String,
    /// `cpu`, `cuda:N`, `metal`.
    pub device: String,
    /// Compute threads.
    pub threads: u32,
    /// Host memory free for weights and KV cache.
    pub free_memory_bytes: u64,
    /// Its device and the device's memory (absent in records of older workers: a CPU).
    #[serde(default)]
    pub device_info: DeviceInfo,
    /// Its version.
    pub version: String,
    /// Microseconds per layer for one decode row, from the start-up probe.
    #[serde(default)]
    pub layer_micros: Option<f64>,
    /// Differs on every process start.
    #[serde(default)]
    pub instance: String,
}

/// The model's shape, published by the leader so workers can probe a layer like it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    /// `llama` or `qwen2`.
    pub arch: String,
    /// Transformer blocks.
    pub layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// MLP width.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// GGML type of the projection weights, e.g. `Q4_1`.
    pub weight_type: String,
}

/// One stage of a stored plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStageRecord {
    /// Worker id.
    pub worker: String,
    /// Its gRPC URL.
    pub address: String,
    /// The worker process the plan was loaded on.
    #[serde(default)]
    pub instance: String,
    /// First layer.
    pub start: usize,
    /// One past the last layer.
    pub end: usize,
}

/// The plan under `/potluck/<cluster>/plan`. The epoch is reserved (written with
/// `ready: false`) before any worker loads it, so a new leader never reuses one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecord {
    /// The plan's epoch.
    pub epoch: u64,
    /// Whether every stage has loaded it.
    pub ready: bool,
    /// The stages, first to last.
    pub stages: Vec<PlanStageRecord>,
    /// The coordinator that wrote it.
    pub leader: String,
}

/// The value of `/potluck/<cluster>/leader`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// The coordinator's id.
    pub id: String,
    /// Base URL of its HTTP API (`http://host:port`).
    pub http: String,
    /// URL of its gRPC service (shards).
    pub grpc: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_bad_names() {
        let k = ClusterKeys::new("lab-1").expect("valid");
        assert_eq!(k.worker("w0"), "/potluck/lab-1/workers/w0");
        assert_eq!(k.plan(), "/potluck/lab-1/plan");
        for bad in ["", "a/b", "x y", &"n".repeat(129)] {
            assert!(ClusterKeys::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn worker_records_round_trip_and_tolerate_missing_optionals() {
        let json = r#"{"id":"w","address":"http://a","device":"cpu","threads":1,"free_memory_bytes":5,"version":"0"}"#;
        let r: WorkerRecord = serde_json::from_str(json).expect("parses");
        assert_eq!((r.layer_micros, r.instance.as_str()), (None, ""));
        assert_eq!(r.device_info, DeviceInfo::default(), "an older worker's record is a CPU");
        let back: WorkerRecord = serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("parses");
        assert_eq!(back, r);
    }
}
