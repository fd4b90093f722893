//! The worker's domain operations behind the gRPC handlers: load a stage,
//! release sessions, describe itself. Forward streams live in `forward.rs`.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use potluck_engine::{Device, DeviceStage, ModelFile, SessionId, StageBackend};
use tokio::sync::{watch, Mutex};

use crate::capability::free_memory_bytes;
use crate::compute::{Compute, Loaded, Renewal};
use crate::coordinator_link::CoordinatorLink;
use crate::error::{InvalidRequest, WorkerError};
use crate::load_spec::{LoadSpec, WarmSpec};
use crate::peers::Peers;
use crate::shard_cache::{CachedShard, ShardCache};
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

/// A stage a spare holds loaded but serves nothing with.
#[derive(Debug)]
pub(crate) struct WarmStage {
    /// The shard's content hash.
    pub digest: String,
    /// The layers, loaded.
    pub stage: DeviceStage,
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
    /// Stages a spare holds loaded for a `Load` to take at no cost (only
    /// touched under `loading`).
    pub warm: std::sync::Mutex<Vec<WarmStage>>,
    /// Counts loads that made this worker serve, so a warm-up under way stops when one does.
    pub serving_loads: AtomicU64,
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
        // A stage that keeps its shard under a new plan keeps its layers loaded: no fetch, no reload.
        let renewal = Renewal {
            digest: spec.digest.clone(),
            layers: spec.layers.clone(),
            epoch: spec.epoch,
            wire: spec.wire,
            next_stage: spec.next_stage.clone(),
            kv_budget: spec.kv_budget,
        };
        if let Some(weight_bytes) = self.compute.renew(renewal).await? {
            if let Some(next) = &spec.next_stage {
                self.peers.learn_name(next).await;
            }
            tracing::info!(epoch = spec.epoch, layers = ?spec.layers, "stage kept for the new epoch");
            return Ok(LoadOutcome { epoch: spec.epoch, transferred: 0, weight_bytes: weight_bytes as u64 });
        }
        let (stage, transferred) = match self.take_warm(&spec.digest, &spec.layers) {
            Some(stage) => (stage, 0),
            None => {
                let link = self.shard_link(spec.shard_source.as_deref()).await?;
                let shard = self.fetch(&link, &spec.layers, &spec.digest).await?;
                (load_stage(shard.path, spec.layers.clone(), self.device).await?, shard.transferred)
            }
        };
        if !stage.is_last() && spec.next_stage.is_none() {
            return Err(InvalidRequest::MissingNextStage { start: spec.layers.start, end: spec.layers.end }.into());
        }
        if let Some(next) = &spec.next_stage {
            self.peers.learn_name(next).await;
        }
        let weight_bytes = stage.weight_bytes() as u64;
        let cache = stage.new_cache(spec.kv_budget);
        let loaded = Loaded {
            stage,
            cache,
            digest: spec.digest.clone(),
            epoch: spec.epoch,
            wire: spec.wire,
            next_stage: spec.next_stage,
        };
        self.compute.install(loaded).await?;
        // Serving now, not a spare: what it held warm is memory the stage's KV cache may need.
        self.serving_loads.fetch_add(1, Ordering::AcqRel);
        self.warm_set().clear();
        tracing::info!(
            epoch = spec.epoch,
            layers = ?spec.layers,
            digest = %spec.digest,
            transferred,
            weight_bytes,
            "stage loaded"
        );
        Ok(LoadOutcome { epoch: spec.epoch, transferred, weight_bytes })
    }

    /// As a spare: holds exactly the shards `spec` names loaded (fetching
    /// those not cached), so that a `Load` of one of them costs no transfer
    /// and no reload. Returns how many are held and the bytes fetched.
    /// Shard by shard, so a `Load` that arrives meanwhile (a stage died)
    /// waits for one shard at most; once the worker serves, it stops.
    pub async fn warm(&self, spec: WarmSpec) -> Result<(usize, u64), WorkerError> {
        let served = self.serving_loads.load(Ordering::Acquire);
        let link = self.shard_link(spec.shard_source.as_deref()).await?;
        let wanted =
            |w: &WarmStage, layers: &Range<usize>, digest: &str| w.digest == digest && w.stage.range() == *layers;
        self.warm_set().retain(|w| spec.shards.iter().any(|(l, d)| wanted(w, l, d)));
        let mut transferred = 0;
        for (layers, digest) in spec.shards {
            let _one_at_a_time = self.loading.lock().await;
            if self.serving_loads.load(Ordering::Acquire) != served {
                break;
            }
            if self.warm_set().iter().any(|w| wanted(w, &layers, &digest)) {
                continue;
            }
            let shard = self.fetch(&link, &layers, &digest).await?;
            transferred += shard.transferred;
            let stage = load_stage(shard.path, layers.clone(), self.device).await?;
            tracing::info!(layers = ?layers, digest = %digest, "holding a shard warm");
            self.warm_set().push(WarmStage { digest, stage });
        }
        Ok((self.warm_set().len(), transferred))
    }

    /// The coordinator that serves the plan's shards: `source` when named
    /// (with etcd, the current leader), else the one joined at start.
    async fn shard_link(&self, source: Option<&str>) -> Result<CoordinatorLink, WorkerError> {
        match source {
            Some(address) => CoordinatorLink::connect(address).await,
            None => self.coordinator.clone().ok_or(WorkerError::NoCoordinator),
        }
    }

    /// Makes sure shard `digest` of `layers` is on disk and verified, fetching what is missing.
    async fn fetch(
        &self,
        link: &CoordinatorLink,
        layers: &Range<usize>,
        digest: &str,
    ) -> Result<CachedShard, WorkerError> {
        let manifest = link.manifest(layers).await?;
        if manifest.digest != digest {
            return Err(WorkerError::DigestMismatch { requested: digest.to_string(), served: manifest.digest });
        }
        let shard = self.shards.ensure(&manifest, link).await?;
        self.transferred.fetch_add(shard.transferred, Ordering::Relaxed);
        Ok(shard)
    }

    fn warm_set(&self) -> std::sync::MutexGuard<'_, Vec<WarmStage>> {
        self.warm.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the warm stage of shard `digest` (layers `layers`), if held.
    fn take_warm(&self, digest: &str, layers: &Range<usize>) -> Option<DeviceStage> {
        let mut set = self.warm_set();
        let i = set.iter().position(|w| w.digest == digest && w.stage.range() == *layers)?;
        Some(set.swap_remove(i).stage)
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
