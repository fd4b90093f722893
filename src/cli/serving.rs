//! Flags that shape serving (batching, admission, API keys), shared by
//! `potluck coordinator` and `potluck up`.

use std::path::PathBuf;

use anyhow::Context as _;
use potluck_coordinator::CoordinatorConfig;

#[derive(Debug, clap::Args)]
pub struct ServingArgs {
    /// Most sessions decoding at once (continuous batching).
    #[arg(long, default_value_t = potluck_coordinator::admission::DEFAULT_MAX_SESSIONS)]
    max_sessions: usize,
    /// Most requests waiting for capacity; beyond it requests get 429.
    #[arg(long, default_value_t = potluck_coordinator::admission::DEFAULT_QUEUE_CAPACITY)]
    queue: usize,
    /// Micro-batches in flight through the pipeline (default: one per stage, at least 2).
    #[arg(long)]
    max_inflight: Option<usize>,
    /// Most prompt tokens a session sends per micro-batch (chunked prefill).
    #[arg(long, default_value_t = potluck_coordinator::scheduler::DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// KV cache budget per worker, in MiB.
    #[arg(long, default_value_t = potluck_coordinator::cluster::DEFAULT_WORKER_KV_BUDGET >> 20)]
    kv_budget_mib: u64,
    /// File of API keys, one per line; clients must send `Authorization: Bearer <key>`.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// API keys, comma-separated (prefer the file or the environment over the command line).
    #[arg(long, env = "POTLUCK_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    api_keys: Vec<String>,
    /// Seconds requests wait for a working pipeline after a worker fails before they get 503.
    #[arg(long, default_value_t = potluck_coordinator::scheduler::DEFAULT_FAILOVER_TIMEOUT.as_secs_f64())]
    failover_timeout: f64,
    /// Shortest time, in seconds, a micro-batch may go unanswered before its pipeline counts as failed.
    #[arg(long, default_value_t = potluck_coordinator::scheduler::DEFAULT_DEADLINE_FLOOR.as_secs_f64())]
    deadline_floor: f64,
    /// A micro-batch's deadline as a multiple of the recent slowest round trip (above the floor).
    #[arg(long, default_value_t = potluck_coordinator::scheduler::DEFAULT_DEADLINE_FACTOR)]
    deadline_factor: u32,
    /// Seconds a micro-batch may take before any round trip has been measured on a new plan.
    #[arg(long, default_value_t = potluck_coordinator::scheduler::DEFAULT_FIRST_DEADLINE.as_secs_f64())]
    first_deadline: f64,
}

/// Seconds from a flag, refusing what is not a positive finite number.
fn seconds(flag: &str, v: f64) -> anyhow::Result<std::time::Duration> {
    anyhow::ensure!(v.is_finite() && v > 0.0, "--{flag} must be a positive number of seconds, not {v}");
    std::time::Duration::try_from_secs_f64(v).with_context(|| format!("--{flag} {v}"))
}

impl ServingArgs {
    /// Checks the flags and writes them into `config`.
    pub fn apply(&self, config: &mut CoordinatorConfig) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_sessions >= 1, "--max-sessions must be at least 1");
        anyhow::ensure!(self.prefill_chunk >= 1, "--prefill-chunk must be at least 1");
        anyhow::ensure!(self.max_inflight != Some(0), "--max-inflight must be at least 1");
        anyhow::ensure!(self.kv_budget_mib >= 1, "--kv-budget-mib must be at least 1");
        config.max_sessions = self.max_sessions;
        config.queue_capacity = self.queue;
        config.max_inflight = self.max_inflight;
        config.prefill_chunk = self.prefill_chunk;
        config.worker_kv_budget = self.kv_budget_mib << 20;
        anyhow::ensure!(self.deadline_factor >= 1, "--deadline-factor must be at least 1");
        config.failover_timeout = seconds("failover-timeout", self.failover_timeout)?;
        config.deadline = potluck_coordinator::scheduler::Deadline {
            floor: seconds("deadline-floor", self.deadline_floor)?,
            factor: self.deadline_factor,
            first: seconds("first-deadline", self.first_deadline)?,
        };
        let mut keys: Vec<String> = self.api_keys.iter().map(|k| k.trim().to_string()).collect();
        if let Some(path) = &self.api_key_file {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading API keys from {}", path.display()))?;
            keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
            anyhow::ensure!(!keys.is_empty(), "{} holds no API keys", path.display());
        }
        keys.retain(|k| !k.is_empty());
        config.api_keys = keys;
        Ok(())
    }
}
