//! The cluster as the coordinator sees it: membership, the current plan with
//! its epoch, the shards, and applying a new plan to the workers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use potluck_engine::{ModelConfig, ModelFile, Tokenizer};
use potluck_proto::trace_context::TraceHeaders;
use potluck_proto::v1 as pb;
use tokio::sync::{watch, RwLock};
use tracing::Instrument as _;

pub use crate::config::{CoordinatorConfig, DEFAULT_HOLD_DOWN, DEFAULT_WORKER_KV_BUDGET};
use crate::error::CoordinatorError;
use crate::fencing::{dead_stages, Fence};
use crate::leader::{Election, Role};
use crate::membership::{plan_order, Membership};
use crate::metrics::Metrics;
use crate::plan_store::{stages_of, PlanStore};
use crate::planner::{keep_plan_in_force, plan, ModelCost, PlanOptions, StagePlan, DEFAULT_REPLAN_GAIN};
use crate::replacement::swap_in;
use crate::scheduler::{Pause, Scheduler, SchedulerConfig, StageFailure};
use crate::shard_store::{Shard, ShardStore, DEFAULT_CHUNK_BYTES};
use crate::spares::{ask_to_warm, warm_choice, warm_request, WarmLedger};
use crate::stage_link::GrpcTransport;
use crate::stage_rpc::StageRpc;
use crate::traffic::Traffic;

/// Wait before retrying a plan that failed to load (a worker may have died mid-load).
pub const PLAN_RETRY: Duration = Duration::from_secs(1);

/// The plan in force.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PlanState {
    /// Increases with every applied plan; workers refuse older epochs.
    pub epoch: u64,
    /// The stages, first to last.
    pub stages: Vec<StagePlan>,
    /// Whether the plan is loaded on every worker.
    pub ready: bool,
    /// Why the last planning attempt failed, if it did.
    pub error: Option<String>,
    /// The worker process each stage was loaded on (a restarted worker must load again).
    #[serde(skip)]
    pub instances: Vec<String>,
}

/// Shared state of one coordinator.
pub struct Cluster {
    config: CoordinatorConfig,
    membership: Arc<dyn Membership>,
    shards: Arc<ShardStore>,
    model: ModelConfig,
    cost: ModelCost,
    tokenizer: Tokenizer,
    state: RwLock<PlanState>,
    scheduler: Scheduler,
    metrics: Arc<Metrics>,
    next_session: AtomicU64,
    weight_bytes_shipped: AtomicU64,
    traffic: Arc<Traffic>,
    /// The plan in etcd (with the election guarding it); `None` in memory.
    store: Option<PlanStore>,
    /// Workers found dead, kept out of plans until they return as new members.
    fence: std::sync::Mutex<Fence>,
    /// What each spare was last asked to hold warm.
    warm: Arc<std::sync::Mutex<WarmLedger>>,
    /// Every unary Stage RPC goes through this client stack.
    rpc: Arc<StageRpc>,
    /// The last epoch whose pipeline failed: never adopted again from the store.
    failed_epoch: AtomicU64,
    /// Always `Leader` without etcd; the election's view with it.
    role: watch::Receiver<Role>,
    /// Keeps the fixed in-memory role's channel open.
    _fixed_role: watch::Sender<Role>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("cluster", &self.config.cluster).finish_non_exhaustive()
    }
}

impl Cluster {
    /// Opens the model and prepares to plan.
    pub fn new(config: CoordinatorConfig, membership: Arc<dyn Membership>) -> Result<Self, CoordinatorError> {
        Self::with_election(config, membership, None)
    }

    /// Like [`Cluster::new`], planning only while `election` (if any) says we lead.
    pub fn with_election(
        config: CoordinatorConfig,
        membership: Arc<dyn Membership>,
        election: Option<Arc<Election>>,
    ) -> Result<Self, CoordinatorError> {
        let file = ModelFile::open(&config.model)?;
        let model = file.config().clone();
        let tokenizer = file.tokenizer()?;
        let cost = ModelCost { kv_budget_bytes: config.worker_kv_budget, ..ModelCost::of_file(&config.model, &model)? };
        let reaped = crate::shard_store::reap_scratch_dirs(&std::env::temp_dir());
        if reaped > 0 {
            tracing::info!(reaped, "removed shard directories left by coordinators that no longer run");
        }
        let shards = Arc::new(ShardStore::new(&config.model, &config.shard_dir, DEFAULT_CHUNK_BYTES));
        let metrics = Arc::new(Metrics::default());
        let rpc = Arc::new(StageRpc::default());
        let traffic = Arc::new(Traffic::default());
        let scheduler = Scheduler::start(
            SchedulerConfig {
                max_sessions: config.max_sessions,
                queue_capacity: config.queue_capacity,
                prefill_chunk: config.prefill_chunk,
                max_batch_rows: config.max_batch_rows,
                max_inflight: config.max_inflight,
                worker_kv_budget: config.worker_kv_budget,
                kv_bytes_per_token_layer: model.kv_bytes_per_token_layer(),
                context: model.context,
                stop_ids: tokenizer.stop_ids().to_vec(),
                deadline: config.deadline,
                failover_timeout: config.failover_timeout,
            },
            Arc::clone(&metrics),
            GrpcTransport { traffic: Arc::clone(&traffic), rpc: Arc::clone(&rpc) },
        );
        let (fixed_role, fixed_rx) = watch::channel(Role::Leader);
        let role = election.as_ref().map_or(fixed_rx, |e| e.role());
        let store = match (&config.etcd, election) {
            (Some(etcd), Some(election)) => {
                let keys = potluck_etcd::ClusterKeys::new(&config.cluster)?;
                Some(PlanStore::new(etcd.client.clone(), keys, election))
            }
            _ => None,
        };
        Ok(Self {
            config,
            membership,
            shards,
            model,
            cost,
            tokenizer,
            state: RwLock::new(PlanState::default()),
            scheduler,
            metrics,
            next_session: AtomicU64::new(1),
            weight_bytes_shipped: AtomicU64::new(0),
            traffic,
            store,
            fence: std::sync::Mutex::default(),
            warm: Arc::default(),
            rpc,
            failed_epoch: AtomicU64::new(0),
            role,
            _fixed_role: fixed_role,
        })
    }

    /// This coordinator's role, as it changes.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// The leading coordinator's id as this one knows it.
    pub fn leader(&self) -> Option<String> {
        match &*self.role.borrow() {
            Role::Leader => Some(self.config.id.clone()),
            Role::Standby(l) => l.as_ref().map(|l| l.id.clone()),
        }
    }

    /// Waits until no micro-batch is in the pipeline and holds new ones back:
    /// while the guard lives a plan can be swapped under the scheduler, which
    /// then moves every running session over (see `scheduler.rs`).
    pub async fn quiesce(&self) -> Pause {
        self.scheduler.pause().await
    }

    /// Makes `state` the plan in force, for the API and the scheduler alike.
    async fn install(&self, state: PlanState) {
        *self.state.write().await = state.clone();
        self.scheduler.set_plan(state);
    }

    /// The scheduler that runs generations.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// The coordinator's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.config.cluster
    }

    /// The membership in use.
    pub fn membership(&self) -> &Arc<dyn Membership> {
        &self.membership
    }

    /// What the planner weighs, so `/v1/cluster` can say which workers it leaves out.
    pub fn cost(&self) -> ModelCost {
        self.cost
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model's shape.
    pub fn model(&self) -> &ModelConfig {
        &self.model
    }

    /// The configuration.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// A fresh session id.
    pub fn new_session(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether `token` admits a worker.
    pub fn join_token_ok(&self, token: &str) -> bool {
        self.config.join_token.is_empty() || self.config.join_token == token
    }

    /// The plan in force.
    pub async fn plan_state(&self) -> PlanState {
        self.state.read().await.clone()
    }

    /// Weight bytes the workers reported fetching for their loads.
    pub fn weight_bytes_shipped(&self) -> u64 {
        self.weight_bytes_shipped.load(Ordering::Relaxed)
    }

    /// The client stack for unary Stage RPCs (one cached channel per worker).
    pub fn stage_rpc(&self) -> &Arc<StageRpc> {
        &self.rpc
    }

    /// Forward messages and bytes exchanged with stage 0, to show the coordinator only moves tokens.
    pub fn traffic(&self) -> &Arc<Traffic> {
        &self.traffic
    }

    /// The shard of `range`, built off the async runtime.
    pub async fn shard(&self, range: std::ops::Range<usize>) -> Result<Shard, CoordinatorError> {
        let store = Arc::clone(&self.shards);
        tokio::task::spawn_blocking(move || store.shard(range))
            .await
            .map_err(|e| CoordinatorError::NotReady(format!("shard task: {e}")))?
    }

    /// One chunk of a shard.
    pub async fn chunk(&self, digest: String, index: usize) -> Result<(Vec<u8>, String), CoordinatorError> {
        let store = Arc::clone(&self.shards);
        tokio::task::spawn_blocking(move || store.chunk(&digest, index))
            .await
            .map_err(|e| CoordinatorError::NotReady(format!("chunk task: {e}")))?
    }

    /// Re-plans on membership changes (after the hold-down) while this
    /// coordinator leads; runs until the membership is dropped.
    pub async fn planning_loop(self: Arc<Self>) {
        let mut changes = self.membership.changes();
        let mut role = self.role();
        let mut failures = self.scheduler.failures();
        let mut force = false;
        loop {
            let leading = *role.borrow_and_update() == Role::Leader;
            let mut failed = false;
            if leading {
                if let Err(e) = self.plan_if_needed(std::mem::take(&mut force)).await {
                    tracing::warn!(error = %e, "planning failed");
                    self.state.write().await.error = Some(e.to_string());
                    failed = true;
                } else {
                    self.keep_spares_warm().await;
                }
            } else {
                self.step_down().await;
            }
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // A flap shorter than this leaves the worker set as planned: no re-plan.
                    tokio::time::sleep(self.config.hold_down).await;
                    changes.borrow_and_update();
                }
                r = role.changed() => {
                    if r.is_err() {
                        return;
                    }
                }
                r = failures.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let failure = failures.borrow_and_update().clone();
                    if let Some(f) = failure {
                        force = self.fail_over(f).await;
                    }
                }
                () = tokio::time::sleep(PLAN_RETRY), if failed => {}
            }
        }
    }

    /// After the pipeline of the plan in force failed: takes the plan out of
    /// service at once, finds the stages that no longer answer and fences
    /// their workers. Returns whether to re-plan now (even onto the same
    /// workers: the failure left their caches out of step, and a new epoch
    /// starts them afresh while the sessions replay).
    async fn fail_over(&self, failure: StageFailure) -> bool {
        let span = tracing::info_span!("failover", epoch = failure.epoch, error = %failure.message);
        self.take_out(failure).instrument(span).await
    }

    /// [`Cluster::fail_over`]'s work, in its span.
    async fn take_out(&self, failure: StageFailure) -> bool {
        let started = std::time::Instant::now();
        let mut current = self.plan_state().await;
        if failure.epoch != current.epoch || !current.ready {
            return false; // Already replaced, or already being replaced.
        }
        self.failed_epoch.store(current.epoch, Ordering::Relaxed);
        current.ready = false;
        current.error = Some(format!("failing over: {}", failure.message));
        self.install(current.clone()).await;
        let dead = dead_stages(&self.rpc, &current.stages, self.config.probe_timeout).await;
        tracing::info!(dead = dead.len(), probe_ms = started.elapsed().as_millis(), "probed the stages");
        let workers = self.membership.workers();
        for stage in &dead {
            let index = current.stages.iter().position(|s| s.worker == stage.worker);
            let instance = index.and_then(|i| current.instances.get(i));
            let Some(w) = workers.iter().find(|w| w.id == stage.worker && Some(&w.instance) == instance) else {
                continue; // It has already left or restarted: a new member, or none.
            };
            tracing::warn!(worker = %w.id, address = %w.address, "fencing a dead worker");
            self.fence.lock().unwrap_or_else(std::sync::PoisonError::into_inner).fence(w);
            self.metrics.record_event(
                "fenced",
                current.epoch,
                &format!("worker {} at {} did not answer", w.id, w.address),
            );
        }
        true
    }

    /// Asks each spare (an admitted worker the ready plan does not use) to
    /// hold its share of the plan's shards warm; only changed choices are
    /// sent, and in the background: a spare's loading never holds up serving.
    async fn keep_spares_warm(&self) {
        let current = self.plan_state().await;
        if !current.ready {
            return;
        }
        let admitted =
            self.fence.lock().unwrap_or_else(std::sync::PoisonError::into_inner).admit(self.membership.workers());
        let (serving, spares): (Vec<_>, Vec<_>) =
            admitted.into_iter().partition(|w| current.stages.iter().any(|s| s.worker == w.id));
        for w in &serving {
            // A serving worker drops what it held warm; as a spare again it is asked anew.
            self.warm.lock().unwrap_or_else(std::sync::PoisonError::into_inner).forget(&w.id);
        }
        let source = self.config.advertise_grpc.clone().unwrap_or_default();
        for (id, held) in warm_choice(self.cost, &current.stages, &spares) {
            let Some(spare) = spares.iter().find(|w| w.id == id) else { continue };
            let mut shards = Vec::new();
            for &i in &held {
                match self.shard(current.stages[i].start..current.stages[i].end).await {
                    Ok(shard) => shards.push((current.stages[i].clone(), shard.digest)),
                    Err(e) => tracing::warn!(error = %e, "no shard to hold warm"),
                }
            }
            let digests: Vec<String> = shards.iter().map(|(_, d)| d.clone()).collect();
            if !self.warm.lock().unwrap_or_else(std::sync::PoisonError::into_inner).changed(spare, &digests) {
                continue;
            }
            let request = warm_request(&shards, &source);
            tokio::spawn(ask_to_warm(Arc::clone(&self.rpc), spare.clone(), request, Arc::clone(&self.warm)));
        }
    }

    /// As a standby: forget the plan (the leader owns it now).
    async fn step_down(&self) {
        let mut state = self.state.read().await.clone();
        if state.ready {
            tracing::info!(epoch = state.epoch, "standing down");
            state.ready = false;
            let pause = self.quiesce().await;
            self.install(state).await;
            drop(pause);
        }
    }

    /// Plans for the current workers unless the plan in force already covers them
    /// (or, on a new leader, adopts the stored plan if it still fits).
    async fn plan_if_needed(&self, force: bool) -> Result<(), CoordinatorError> {
        let current = self.plan_state().await;
        let stored = match &self.store {
            Some(store) => {
                if !current.ready {
                    if let Err(e) = store.publish_model(&model_shape(&self.config.model, &self.model)?).await {
                        tracing::warn!(error = %e, "could not publish the model shape");
                    }
                }
                store.read().await?
            }
            None => None,
        };
        let (stored_stages, stored_instances) = stored.as_ref().map(stages_of).unwrap_or_default();
        let order: Vec<String> = if current.stages.is_empty() { &stored_stages } else { &current.stages }
            .iter()
            .map(|s| s.worker.clone())
            .collect();
        let admitted =
            self.fence.lock().unwrap_or_else(std::sync::PoisonError::into_inner).admit(self.membership.workers());
        let mut workers = plan_order(admitted, &order);
        // The first plan waits for the expected workers; after that, whoever is left serves.
        if current.epoch == 0 && stored.is_none() && workers.len() < self.config.min_workers {
            return Ok(());
        }
        // After a failure, a spare takes the dead stage's range and the survivors keep theirs.
        let swapped = if force { swap_in(self.cost, &current.stages, &current.instances, &workers) } else { None };
        let (stages, instances) = match swapped {
            Some(swapped) => swapped,
            None => {
                if let Some(n) = self.config.max_stages {
                    workers.truncate(n.max(1));
                }
                // One pipeline: sessions are not yet routed over replicas.
                let options = PlanOptions { max_replicas: 1, ..PlanOptions::default() };
                let placement = plan(self.cost, &workers, &options)?;
                placement.log_prediction();
                let (best, cur, gain) = (placement.best(), &current, DEFAULT_REPLAN_GAIN);
                if !force
                    && cur.ready
                    && keep_plan_in_force(&self.cost, &cur.stages, &cur.instances, &workers, best, &options, gain)
                {
                    return Ok(());
                }
                let stages = best.stages.clone();
                let instances: Vec<String> = stages
                    .iter()
                    .map(|s| workers.iter().find(|w| w.id == s.worker).map(|w| w.instance.clone()).unwrap_or_default())
                    .collect();
                (stages, instances)
            }
        };
        // A plan in force stays while the same members would serve: moving ranges costs a pause.
        if !force && current.ready && same_members(&current, &stages, &instances) {
            return Ok(());
        }
        let failed = self.failed_epoch.load(Ordering::Relaxed);
        if let Some(rec) = stored.as_ref().filter(|r| r.ready && !current.ready && r.epoch != failed) {
            if stored_stages == stages && stored_instances == instances {
                tracing::info!(epoch = rec.epoch, "adopting the stored plan: the workers still hold it");
                let pause = self.quiesce().await;
                self.install(PlanState { epoch: rec.epoch, stages, ready: true, error: None, instances }).await;
                drop(pause);
                return Ok(());
            }
        }
        // Never reuse an epoch: continue from the highest we know, ours or etcd's.
        let epoch = current.epoch.max(stored.map_or(0, |r| r.epoch)) + 1;
        self.apply_plan(epoch, stages, instances).await
    }

    /// Loads `stages` on every worker as `epoch` and makes the plan current.
    async fn apply_plan(
        &self,
        epoch: u64,
        stages: Vec<StagePlan>,
        instances: Vec<String>,
    ) -> Result<(), CoordinatorError> {
        if let Some(store) = &self.store {
            // Reserve the epoch first, so a leader that dies mid-load has its successor skip it.
            store.write(epoch, false, &stages, &instances).await?;
        }
        tracing::info!(epoch, stages = ?stages.iter().map(|s| (s.start, s.end)).collect::<Vec<_>>(), "applying plan");
        let shard_source = self.config.advertise_grpc.clone().unwrap_or_default();
        let started = std::time::Instant::now();
        // Quiesce: nothing in flight while workers switch epochs; running sessions move over afterwards.
        let pause = self.quiesce().await;
        let mut loads = Vec::new();
        for (i, st) in stages.iter().enumerate() {
            let shard = self.shard(st.start..st.end).await?;
            let next = stages.get(i + 1).map(|n| n.address.clone()).unwrap_or_default();
            let req = pb::LoadRequest {
                epoch,
                layer_start: u32::try_from(st.start).unwrap_or(u32::MAX),
                layer_end: u32::try_from(st.end).unwrap_or(u32::MAX),
                model_id: self.config.model.display().to_string(),
                shard_digest: shard.digest,
                next_stage: next,
                wire_dtype: self.config.wire_dtype.name().to_string(),
                kv_budget_bytes: self.config.worker_kv_budget,
                shard_source: shard_source.clone(),
            };
            let (st, rpc, deadline) = (st.clone(), Arc::clone(&self.rpc), self.config.load_deadline);
            let span = tracing::info_span!("stage.load", epoch, worker = %st.worker);
            loads.push(tokio::spawn(
                async move {
                    let load = |mut c: crate::stage_rpc::StageClient| {
                        let mut request = tonic::Request::new(req);
                        TraceHeaders::current().inject(&mut request);
                        async move { c.load(request).await }
                    };
                    let reply =
                        rpc.call(&st.address, "Load", deadline, load).await.map_err(|e| CoordinatorError::Worker {
                            worker: st.worker.clone(),
                            address: st.address.clone(),
                            message: e.to_string(),
                        })?;
                    Ok::<_, CoordinatorError>(reply.transferred_bytes)
                }
                .instrument(span),
            ));
        }
        let mut failure = None;
        for l in loads {
            match l.await.map_err(|e| CoordinatorError::NotReady(format!("load task: {e}"))).and_then(|r| r) {
                Ok(bytes) => {
                    self.weight_bytes_shipped.fetch_add(bytes, Ordering::Relaxed);
                }
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        if let Some(e) = failure {
            // Some workers may hold the new epoch already: the old plan cannot serve either.
            let mut state = self.state.read().await.clone();
            state.ready = false;
            state.epoch = state.epoch.max(epoch);
            self.install(state).await;
            return Err(e);
        }
        self.install(PlanState {
            epoch,
            stages: stages.clone(),
            ready: true,
            error: None,
            instances: instances.clone(),
        })
        .await;
        drop(pause);
        if let Some(store) = &self.store {
            store.write(epoch, true, &stages, &instances).await?;
        }
        tracing::info!(epoch, load_ms = started.elapsed().as_millis(), "plan ready");
        Ok(())
    }
}

/// Whether `stages` would run on the very members (worker and process) the plan in force runs on.
fn same_members(current: &PlanState, stages: &[StagePlan], instances: &[String]) -> bool {
    let members = |stages: &[StagePlan], instances: &[String]| {
        let mut m: Vec<(String, String)> =
            stages.iter().map(|s| s.worker.clone()).zip(instances.iter().cloned()).collect();
        m.sort();
        m
    };
    current.stages.len() == stages.len() && members(&current.stages, &current.instances) == members(stages, instances)
}

/// The model's shape for the workers' probe, from the file's metadata and its first block.
fn model_shape(path: &std::path::Path, c: &ModelConfig) -> Result<potluck_etcd::ModelShape, CoordinatorError> {
    let g = potluck_engine::gguf::GgufFile::open(path)?;
    let weight_type = g
        .tensors
        .get("blk.0.ffn_up.weight")
        .map(|t| t.dtype.name())
        .ok_or_else(|| CoordinatorError::NotReady("the model has no blk.0.ffn_up.weight".into()))?;
    Ok(potluck_etcd::ModelShape {
        arch: match c.arch {
            potluck_engine::Architecture::Llama => "llama".into(),
            potluck_engine::Architecture::Qwen2 => "qwen2".into(),
        },
        layers: c.layers,
        hidden: c.hidden,
        ffn: c.ffn,
        heads: c.heads,
        kv_heads: c.kv_heads,
        weight_type: weight_type.to_string(),
    })
}
