//! How a coordinator runs: the typed configuration the binary's flags fill
//! in, with its defaults.

use std::path::PathBuf;
use std::time::Duration;

use potluck_engine::WireDtype;

use crate::fencing::DEFAULT_PROBE_TIMEOUT;
use crate::plan_store::EtcdSettings;
use crate::scheduler::{Deadline, DEFAULT_FAILOVER_TIMEOUT, DEFAULT_MAX_BATCH_ROWS, DEFAULT_PREFILL_CHUNK};

/// Default wait after a membership change before re-planning, so a burst of
/// joins makes one plan, not several.
pub const DEFAULT_HOLD_DOWN: Duration = Duration::from_millis(300);
/// How long a worker may take to load its stage for a new plan (fetching the shard
/// included) before the plan counts as failed: serving is paused meanwhile.
pub const DEFAULT_LOAD_DEADLINE: Duration = Duration::from_secs(120);

/// Default KV budget asked of each worker.
pub const DEFAULT_WORKER_KV_BUDGET: u64 = 512 << 20;

/// How the coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// The model file (GGUF).
    pub model: PathBuf,
    /// Cluster name.
    pub cluster: String,
    /// How hidden states travel between stages.
    pub wire_dtype: WireDtype,
    /// Do not make the first plan until this many workers have joined.
    pub min_workers: usize,
    /// Most stages a plan uses (`None`: every worker); workers beyond them are spares.
    pub max_stages: Option<usize>,
    /// Wait after a membership change before re-planning.
    pub hold_down: Duration,
    /// Where shards are built.
    pub shard_dir: PathBuf,
    /// KV budget per worker.
    pub worker_kv_budget: u64,
    /// Workers must present this token to join (empty = open).
    pub join_token: String,
    /// This coordinator's id (in the leader record and `/v1/cluster`).
    pub id: String,
    /// URL of our gRPC service that workers fetch shards from (default: the listener's loopback address).
    pub advertise_grpc: Option<String>,
    /// Base URL of our HTTP API that standbys redirect to (default: the listener's loopback address).
    pub advertise_http: Option<String>,
    /// Membership, election and plan in etcd; `None` is the in-memory embedded mode.
    pub etcd: Option<EtcdSettings>,
    /// Most sessions served at once.
    pub max_sessions: usize,
    /// Most requests waiting for capacity before new ones get 429.
    pub queue_capacity: usize,
    /// Micro-batches in flight at once (`None`: one more than the stages).
    pub max_inflight: Option<usize>,
    /// Most prompt tokens one session sends per micro-batch (chunked prefill).
    pub prefill_chunk: usize,
    /// Most rows per micro-batch.
    pub max_batch_rows: usize,
    /// API keys clients must present as `Authorization: Bearer …` (empty = open).
    pub api_keys: Vec<String>,
    /// When a micro-batch counts as lost and its pipeline as failed.
    pub deadline: Deadline,
    /// How long requests wait for a working pipeline after a failure before a 503.
    pub failover_timeout: Duration,
    /// How long a stage may take to answer a liveness probe after a failure.
    pub probe_timeout: Duration,
    /// How long a worker may take to load its stage for a new plan.
    pub load_deadline: Duration,
}

impl CoordinatorConfig {
    /// Defaults for `model`.
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            cluster: "default".into(),
            wire_dtype: WireDtype::F16,
            min_workers: 1,
            max_stages: None,
            hold_down: DEFAULT_HOLD_DOWN,
            shard_dir: crate::shard_store::scratch_dir(&std::env::temp_dir()),
            worker_kv_budget: DEFAULT_WORKER_KV_BUDGET,
            join_token: String::new(),
            id: format!("coordinator-{}", std::process::id()),
            advertise_grpc: None,
            advertise_http: None,
            etcd: None,
            max_sessions: crate::admission::DEFAULT_MAX_SESSIONS,
            queue_capacity: crate::admission::DEFAULT_QUEUE_CAPACITY,
            max_inflight: None,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            max_batch_rows: DEFAULT_MAX_BATCH_ROWS,
            api_keys: Vec::new(),
            deadline: Deadline::default(),
            failover_timeout: DEFAULT_FAILOVER_TIMEOUT,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            load_deadline: DEFAULT_LOAD_DEADLINE,
        }
    }
}
