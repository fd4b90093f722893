//! Placement: which workers serve, in which order, holding which layers, and
//! in how many pipelines, for the most decode throughput.
//!
//! A pipeline runs at the pace of its slowest stage, so the planner
//! minimises that stage's time per micro-batch: its compute at the expected
//! batch ([`cost_model`]) plus sending its hidden states to the next stage.
//! Every stage must hold its layers, the embedding (first) or the lm_head
//! (last), and the KV budget, in the memory it computes in: a GPU's free
//! device memory, else the host's; a worker is never over-committed. The
//! search ([`pipeline_search`]) picks the order and the cuts and leaves out
//! a worker whose stage or link would slow the pipeline; [`replicas`] forms
//! several pipelines when the pool holds more than one copy's worth. Every
//! worker left out carries its reason (shown in `/v1/cluster` and by
//! `potluck plan`), and a plan that cannot be made names the shortfall.
//! A new plan replaces the one in force only when it predicts a real gain
//! ([`hysteresis`]): moving ranges costs a pause.

mod cost_model;
mod hysteresis;
mod model_cost;
mod pipeline_search;
mod profile;
mod replicas;
#[cfg(test)]
mod tests;

pub use hysteresis::{keep_plan_in_force, worth_replanning};
pub use model_cost::{ModelCost, ModelShape, WIRE_BYTES_PER_ELEMENT};
pub use profile::{DeviceClass, LayerTime, Link, Links, WorkerProfile, CLASS_BATCH, DEVICE_CLASSES};

#[cfg(test)]
pub(crate) use model_cost::test_cost;

use cost_model::{CostModel, Node};
use pipeline_search::Found;

use crate::membership::WorkerInfo;

/// Rows per micro-batch a pipeline is expected to carry when nobody says:
/// a handful of streams in flight per stage.
pub const DEFAULT_EXPECTED_BATCH: f64 = 8.0;

/// The least predicted gain (as a fraction) for which a plan in force is replaced.
pub const DEFAULT_REPLAN_GAIN: f64 = 0.10;

/// How to plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// Rows per micro-batch each stage's cost is priced at.
    pub batch: f64,
    /// The most pipelines to form. The coordinator routes every session over
    /// one pipeline today, so it asks for one; `potluck plan` asks for many.
    pub max_replicas: usize,
    /// Links between workers (unmeasured pairs cost nothing).
    pub links: Links,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self { batch: DEFAULT_EXPECTED_BATCH, max_replicas: usize::MAX, links: Links::default() }
    }
}

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StagePlan {
    /// The worker running it.
    pub worker: String,
    /// Its gRPC URL.
    pub address: String,
    /// First layer.
    pub start: usize,
    /// One past the last layer.
    pub end: usize,
}

/// One pipeline and what the cost model predicts for it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Pipeline {
    /// Its stages, first to last.
    pub stages: Vec<StagePlan>,
    /// Each stage's seconds per micro-batch: compute plus the hop onward.
    pub stage_secs: Vec<f64>,
    /// The slowest stage's seconds per micro-batch: the pipeline's pace.
    pub bottleneck_secs: f64,
    /// Seconds one token of one stream takes through every stage and hop.
    pub step_secs: f64,
}

impl Pipeline {
    /// Decode tokens per second of one stream alone.
    pub fn tokens_per_sec_one_stream(&self) -> f64 {
        1.0 / self.step_secs
    }

    /// Decode tokens per second with micro-batches of `batch` rows in every stage.
    pub fn tokens_per_sec_saturated(&self, batch: f64) -> f64 {
        batch / self.bottleneck_secs
    }
}

/// Why a worker takes no part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeftOutCause {
    /// It cannot hold one layer and the KV budget.
    Memory,
    /// Its figures make no sense (no memory, a time that is not positive).
    Invalid,
    /// With it, its pipeline would be slower (or no faster).
    Slower,
    /// Its group could not hold a copy of the model to form another replica.
    NoReplica,
}

/// A worker the planner does not use, and why: shown in `/v1/cluster` so an
/// operator sees why a GPU they added carries nothing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeftOut {
    /// The worker's id.
    pub worker: String,
    /// Which kind of reason.
    pub cause: LeftOutCause,
    /// Bytes one layer and the KV budget need.
    pub needed_bytes: u64,
    /// Bytes its stage memory has free.
    pub available_bytes: u64,
    /// The reason, in words.
    pub reason: String,
}

/// The planner's answer: pipelines, best first, and who was left out.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Placement {
    /// One or more pipelines (replicas), the fastest first.
    pub pipelines: Vec<Pipeline>,
    /// Workers no pipeline uses, with their reasons.
    pub left_out: Vec<LeftOut>,
    /// Rows per micro-batch the predictions assume.
    pub batch: f64,
    /// Whether every worker had a measured time, so that predictions are in
    /// seconds; otherwise speeds come from thread counts and only compare.
    pub measured: bool,
}

impl Placement {
    /// The best pipeline: the one the coordinator runs while sessions are not routed over replicas.
    pub fn best(&self) -> &Pipeline {
        &self.pipelines[0]
    }

    /// Decode tokens per second of one stream on the best pipeline.
    pub fn tokens_per_sec_one_stream(&self) -> f64 {
        self.pipelines.iter().map(Pipeline::tokens_per_sec_one_stream).fold(0.0, f64::max)
    }

    /// Decode tokens per second of every pipeline together, each kept full.
    pub fn tokens_per_sec_saturated(&self) -> f64 {
        self.pipelines.iter().map(|p| p.tokens_per_sec_saturated(self.batch)).sum()
    }

    /// Logs what the plan predicts, so an operator can set it beside what is measured.
    pub fn log_prediction(&self) {
        tracing::info!(
            pipelines = self.pipelines.len(),
            stages = ?self.best().stages.iter().map(|s| (s.worker.as_str(), s.start, s.end)).collect::<Vec<_>>(),
            predicted_tok_s_one_stream = self.tokens_per_sec_one_stream(),
            predicted_tok_s_saturated = self.tokens_per_sec_saturated(),
            in_seconds = self.measured,
            left_out = ?self.left_out.iter().map(|l| (l.worker.as_str(), l.reason.as_str())).collect::<Vec<_>>(),
            "planned"
        );
    }
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No worker has joined.
    #[error("no workers have joined")]
    NoWorkers,
    /// Every worker was left out: none can hold one layer.
    #[error("no worker can hold one layer and its KV budget ({needed} bytes); the largest has {largest} bytes free")]
    NoWorkerHoldsALayer {
        /// Bytes one layer and the KV budget need.
        needed: u64,
        /// Bytes the roomiest worker offers.
        largest: u64,
    },
    /// Every worker reported figures that cannot be planned on.
    #[error("no worker reported usable figures; `{worker}` {reason}")]
    NoUsableWorker {
        /// One of them.
        worker: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The workers' memory cannot hold the model.
    #[error("the workers' memory ({available} bytes) cannot hold the model ({needed} bytes)")]
    NotEnoughMemory {
        /// Bytes the model needs.
        needed: u64,
        /// Bytes the workers offer.
        available: u64,
    },
    /// There is memory enough in sum, but no worker can hold an end of the pipeline.
    #[error("no worker can hold the {part} with one layer and the KV budget ({needed} bytes); the largest has {largest} bytes free")]
    EndDoesNotFit {
        /// `embedding` or `lm_head`.
        part: &'static str,
        /// Bytes that end's stage needs at the least.
        needed: u64,
        /// Bytes the roomiest worker offers.
        largest: u64,
    },
    /// The memory is there but split too finely: every stage's KV budget takes its share.
    #[error("no split of the model fits the workers' memory ({available} bytes in all, each stage also keeping its KV budget of {kv_budget} bytes)")]
    NoSplitFits {
        /// Bytes the workers offer.
        available: u64,
        /// Bytes each stage keeps for its KV cache.
        kv_budget: u64,
    },
}

/// The workers the cost model can use, as nodes, and those it cannot, with reasons.
fn sort_out(cost: &ModelCost, workers: &[WorkerProfile], batch: f64) -> (Vec<Node>, Vec<LeftOut>, bool) {
    let mut left_out = Vec::new();
    let mut usable = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        match w.unusable(cost) {
            Some((cause, reason)) => left_out.push(LeftOut {
                worker: w.id.clone(),
                cause,
                needed_bytes: cost.one_layer_bytes(),
                available_bytes: w.memory_bytes,
                reason,
            }),
            None => usable.push(i),
        }
    }
    // Seconds where every worker measured; else each worker's threads set its relative speed.
    let measured = usable.iter().all(|&i| workers[i].layer_time.is_some());
    let nodes = usable
        .into_iter()
        .map(|i| {
            let w = &workers[i];
            let time = match w.layer_time {
                Some(t) if measured => t,
                _ => LayerTime::flat(1.0 / f64::from(w.threads.max(1))),
            };
            Node { input: i, id: w.id.clone(), memory: w.memory_bytes, time, t_batch: time.at(batch.max(1.0)) }
        })
        .collect();
    (nodes, left_out, measured)
}

/// The workers among `workers` that cannot take part whatever the others
/// (no room for one layer and its KV budget, or nonsense figures).
pub fn left_out(cost: ModelCost, workers: &[WorkerInfo]) -> Vec<LeftOut> {
    let profiles: Vec<WorkerProfile> = workers.iter().map(WorkerProfile::from).collect();
    sort_out(&cost, &profiles, DEFAULT_EXPECTED_BATCH).1
}

/// What `/v1/cluster` shows of placement: the cost model's prediction for
/// the plan in force (`None` if it has no stages or cannot run on today's
/// workers), and the workers it does not use, with the planner's reasons, so
/// an operator sees predicted beside measured and why a machine is idle.
pub fn in_force(cost: ModelCost, stages: &[StagePlan], workers: &[WorkerInfo]) -> (Option<Pipeline>, Vec<LeftOut>) {
    let options = PlanOptions { max_replicas: 1, ..PlanOptions::default() };
    let profiles: Vec<WorkerProfile> = workers.iter().map(WorkerProfile::from).collect();
    let predicted = if stages.is_empty() { None } else { predict(&cost, stages, &profiles, &options) };
    let mut out = match place(&cost, &profiles, &options) {
        Ok(p) => p.left_out,
        Err(_) => sort_out(&cost, &profiles, options.batch).1,
    };
    out.retain(|l| !stages.iter().any(|s| s.worker == l.worker));
    (predicted, out)
}

/// Plans over the coordinator's members, in the order given (the plan in force first).
pub fn plan(cost: ModelCost, workers: &[WorkerInfo], options: &PlanOptions) -> Result<Placement, PlanError> {
    let profiles: Vec<WorkerProfile> = workers.iter().map(WorkerProfile::from).collect();
    place(&cost, &profiles, options)
}

/// Plans over `workers`: the pipelines with the highest predicted throughput.
pub fn place(cost: &ModelCost, workers: &[WorkerProfile], options: &PlanOptions) -> Result<Placement, PlanError> {
    if workers.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    let (nodes, mut left_out, measured) = sort_out(cost, workers, options.batch);
    if nodes.is_empty() {
        return Err(nothing_usable(cost, workers, &left_out));
    }
    let available = nodes.iter().map(|n| n.memory).fold(0u64, u64::saturating_add);
    if available < cost.whole_model_bytes() {
        return Err(PlanError::NotEnoughMemory { needed: cost.whole_model_bytes(), available });
    }
    let cm = CostModel::new(cost, &options.links, options.batch);
    let Some(formed) = replicas::form(&cm, &nodes, options.max_replicas.max(1)) else {
        return Err(no_split(cost, &nodes, available));
    };
    for &(i, pipeline) in &formed.unused {
        let node = &nodes[i];
        let (cause, reason) = match pipeline {
            Some(p) => (LeftOutCause::Slower, slower_reason(&cm, &nodes, &formed.pipelines[p], i, measured)),
            None => {
                (LeftOutCause::NoReplica, "the workers grouped with it cannot hold another copy of the model".into())
            }
        };
        left_out.push(LeftOut {
            worker: node.id.clone(),
            cause,
            needed_bytes: cost.one_layer_bytes(),
            available_bytes: node.memory,
            reason,
        });
    }
    let pipelines = formed.pipelines.iter().map(|f| pipeline_of(&cm, &nodes, workers, f)).collect();
    Ok(Placement { pipelines, left_out, batch: cm.batch, measured })
}

/// The error for a pool where no worker can be used.
fn nothing_usable(cost: &ModelCost, workers: &[WorkerProfile], left_out: &[LeftOut]) -> PlanError {
    match left_out.iter().find(|l| l.cause == LeftOutCause::Memory) {
        Some(_) => PlanError::NoWorkerHoldsALayer {
            needed: cost.one_layer_bytes(),
            largest: workers.iter().map(|w| w.memory_bytes).max().unwrap_or(0),
        },
        None => {
            let first = &left_out[0];
            PlanError::NoUsableWorker { worker: first.worker.clone(), reason: first.reason.clone() }
        }
    }
}

/// The error for usable workers that hold the model's bytes in sum but admit no split.
fn no_split(cost: &ModelCost, nodes: &[Node], available: u64) -> PlanError {
    let largest = nodes.iter().map(|n| n.memory).max().unwrap_or(0);
    let ends = [("embedding", cost.stage_bytes(1, true, false)), ("lm_head", cost.stage_bytes(1, false, true))];
    match ends.into_iter().find(|&(_, needed)| needed > largest) {
        Some((part, needed)) => PlanError::EndDoesNotFit { part, needed, largest },
        None => PlanError::NoSplitFits { available, kv_budget: cost.kv_budget_bytes },
    }
}

/// Why node `i` is not in `found`, its group's pipeline, in words.
fn slower_reason(cm: &CostModel<'_>, nodes: &[Node], found: &Found, i: usize, measured: bool) -> String {
    let unit = |s: f64| if measured { format!("{:.3} ms", s * 1e3) } else { format!("{s:.3} (relative)") };
    match pipeline_search::with_added(cm, nodes, found, i) {
        Some(with) if with.bottleneck > found.score.bottleneck * (1.0 + 1e-9) => format!(
            "with it the slowest stage would take {} per micro-batch instead of {}",
            unit(with.bottleneck),
            unit(found.score.bottleneck)
        ),
        Some(_) => format!(
            "it would not speed its pipeline up (the slowest stage stays at {} per micro-batch) and would add a hop",
            unit(found.score.bottleneck)
        ),
        None => "no split that includes it fits the memory of its pipeline".into(),
    }
}

/// The public form of a found pipeline.
fn pipeline_of(cm: &CostModel<'_>, nodes: &[Node], workers: &[WorkerProfile], f: &Found) -> Pipeline {
    let mut start = 0;
    let mut stages = Vec::with_capacity(f.order.len());
    let mut stage_secs = Vec::with_capacity(f.order.len());
    for (i, (&n, &k)) in f.order.iter().zip(&f.counts).enumerate() {
        let w = &workers[nodes[n].input];
        stages.push(StagePlan { worker: w.id.clone(), address: w.address.clone(), start, end: start + k });
        stage_secs.push(cm.stage(&nodes[n], k, f.order.get(i + 1).map(|&j| &nodes[j])));
        start += k;
    }
    Pipeline { stages, stage_secs, bottleneck_secs: f.score.bottleneck, step_secs: f.score.step }
}

/// What the cost model predicts for running `stages` on `workers` (the plan
/// in force, or a baseline split), or `None` when a stage's worker is gone or
/// unusable, a stage does not fit, or the stages do not cover the model.
pub fn predict(
    cost: &ModelCost,
    stages: &[StagePlan],
    workers: &[WorkerProfile],
    options: &PlanOptions,
) -> Option<Pipeline> {
    let (nodes, _, _) = sort_out(cost, workers, options.batch);
    let mut expected = 0;
    let mut order = Vec::with_capacity(stages.len());
    for s in stages {
        if s.start != expected || s.end <= s.start {
            return None;
        }
        expected = s.end;
        order.push(nodes.iter().position(|n| n.id == s.worker)?);
    }
    let counts: Vec<usize> = stages.iter().map(|s| s.end - s.start).collect();
    let cm = CostModel::new(cost, &options.links, options.batch);
    let score = cm.score(&nodes, &order, &counts)?;
    let found = Found { order, counts, score };
    Some(pipeline_of(&cm, &nodes, workers, &found))
}

/// The best pipeline over every order of every subset of `workers` (one
/// replica): exact but exponential, the yardstick `potluck bench plan` holds
/// the planner's search to on pools of a few workers.
pub fn exhaustive(cost: &ModelCost, workers: &[WorkerProfile], options: &PlanOptions) -> Option<Pipeline> {
    let (nodes, _, _) = sort_out(cost, workers, options.batch);
    let cm = CostModel::new(cost, &options.links, options.batch);
    let members: Vec<usize> = (0..nodes.len()).collect();
    pipeline_search::exhaustive(&cm, &nodes, &members).map(|f| pipeline_of(&cm, &nodes, workers, &f))
}
