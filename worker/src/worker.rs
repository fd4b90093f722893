//! The worker's domain operations behind the gRPC handlers: load a stage,
//! release sessions, describe itself. Forward streams live in `forward.rs`.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use potluck_engine::{Device, DeviceStage, ModelFile, SessionId, StageBackend};
use tokio::sync::{watch, Mutex};

use crate::capability::free_memory_bytes;
use crate::compute::{Compute, Loaded};
use crate::coordinator_link::CoordinatorLink;
use crate::error::{InvalidRequest, WorkerError};
use crate::load_spec::LoadSpec;
use crate::peers::Peers;
use crate::shard_cache::ShardCache;
use crate::traffic::HiddenTraffic;

/// The result of a load.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LoadOutcome {
    /// The epoch now loaded.
    pub epoch: u64,
    /// Bytes fetched for this load (0 on a cache hit).
    pub transferred: u64,
    /// Bytes of weights held.
    pub weight_bytes: u64,
}

/// What `Info` reports.
#[derive(Debug, Clone)]
pub(crate) struct WorkerInfo {
    /// The worker's name in the cluster.
    pub id: String,
    /// Its compute device.
    pub device: Device,
    /// Its compute threads.
    pub threads: usize,
    /// Memory available now, in bytes.
    pub free_memory: u64,
    /// The loaded plan epoch (0 before any load).
    pub epoch: u64,
    /// The loaded layers (empty before any load).
    pub layers: Range<usize>,
    /// KV cache bytes in use.
    pub kv_bytes: usize,
    /// Shard bytes fetched since start.
    pub transferred_total: u64,
    /// Hidden-state bytes sent to the next stage since start.
    pub hidden_sent: u64,
    /// Hidden-state bytes received from the previous stage since start.
    pub hidden_received: u64,
    /// Time the compute thread spent on micro-batches since start.
    pub busy: std::time::Duration,
}

/// Everything a serving worker holds.
#[derive(Debug)]
pub(crate) struct Worker {
    /// The worker's name in the cluster.
    pub id: String,
    /// Its compute device.
    pub device: Device,
    /// Its compute threads (resolved, > 0).
    pub threads: usize,
    /// The thread that owns the stage.
    pub compute: Compute,
    /// Channels to next stages.
    pub peers: Peers,
    /// Shards on disk.
    pub shards: ShardCache,
    /// The coordinator joined at start, if any.
    pub coordinator: Option<CoordinatorLink>,
    /// Shard bytes fetched since start, across loads.
    pub transferred: AtomicU64,
    /// Hidden-state bytes sent downstream and received from upstream.
    pub hidden: HiddenTraffic,
    /// One load at a time: loads share part files and replace the stage.
    pub loading: Mutex<()>,
    /// Becomes true when the worker shuts down; open streams end.
    pub stopping: watch::Receiver<bool>,
}

impl Worker {
    /// Fetches the shard (unless cached), loads the layers and installs them for the epoch.
    pub async fn load(&self, spec: LoadSpec) -> Result<LoadOutcome, WorkerError> {
        let _one_at_a_time = self.loading.lock().await;
        let current = self.compute.snapshot().await?;
        if !current.layers.is_empty() && current.epoch > spec.epoch {
            return Err(WorkerError::StaleEpoch { got: spec.epoch, current: current.epoch });
        }
        // The coordinator that sent the plan serves its shards (with etcd, the current leader).
        let source;
        let link = match &spec.shard_source {
            Some(address) => {
                source = CoordinatorLink::connect(address).await?;
                &source
            }
            None => self.coordinator.as_ref().ok_or(WorkerError::NoCoordinator)?,
        };
        let manifest = link.manifest(&spec.layers).await?;
        if manifest.digest != spec.digest {
            return Err(WorkerError::DigestMismatch { requested: spec.digest, served: manifest.digest });
        }
        let shard = self.shards.ensure(&manifest, link).await?;
        self.transferred.fetch_add(shard.transferred, Ordering::Relaxed);
        let stage = load_stage(shard.path.clone(), spec.layers.clone(), self.device).await?;
        if !stage.is_last() && spec.next_stage.is_none() {
            return Err(InvalidRequest::MissingNextStage { start: spec.layers.start, end: spec.layers.end }.into());
        }
        if let Some(next) = &spec.next_stage {
            self.peers.learn_name(next).await;
        }
        let weight_bytes = stage.weight_bytes() as u64;
        let cache = stage.new_cache(spec.kv_budget);
        let loaded = Loaded { stage, cache, epoch: spec.epoch, wire: spec.wire, next_stage: spec.next_stage };
        self.compute.install(loaded).await?;
        tracing::info!(
            epoch = spec.epoch,
            layers = ?spec.layers,
            digest = %spec.digest,
            transferred = shard.transferred,
            weight_bytes,
            "stage loaded"
        );
        Ok(LoadOutcome { epoch: spec.epoch, transferred: shard.transferred, weight_bytes })
    }

    /// Frees sessions here, then asks the next stage to do the same (best effort).
    pub async fn release(&self, sessions: Vec<SessionId>) -> Result<usize, WorkerError> {
        let (released, next) = self.compute.release(sessions.clone()).await?;
        if let Some(next) = next {
            if let Err(e) = self.peers.release(&next, &sessions).await {
                tracing::warn!(error = %e, "could not pass a release on to the next stage");
            }
        }
        Ok(released)
    }

    /// The worker's identity and state.
    pub async fn info(&self) -> Result<WorkerInfo, WorkerError> {
        let snap = self.compute.snapshot().await?;
        let (hidden_sent, hidden_received) = self.hidden.totals();
        Ok(WorkerInfo {
            id: self.id.clone(),
            device: self.device,
            threads: self.threads,
            free_memory: free_memory_bytes(),
            epoch: snap.epoch,
            layers: snap.layers,
            kv_bytes: snap.kv_bytes,
            transferred_total: self.transferred.load(Ordering::Relaxed),
            hidden_sent,
            hidden_received,
            busy: snap.busy,
        })
    }
}

/// Reads the layers off disk onto `device` on a blocking thread (the compute thread keeps serving the old epoch meanwhile).
async fn load_stage(path: PathBuf, layers: Range<usize>, device: Device) -> Result<DeviceStage, WorkerError> {
    let err_path = path.clone();
    tokio::task::spawn_blocking(move || -> Result<DeviceStage, WorkerError> {
        let file = ModelFile::open(&path)?;
        Ok(DeviceStage::load(&file, layers, device)?)
    })
    .await
    .map_err(|e| WorkerError::Io { path: err_path, source: std::io::Error::other(e.to_string()) })?
}
