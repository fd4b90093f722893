//! The cost model: how long a stage takes per micro-batch, and what a
//! pipeline delivers. A pipeline with micro-batches in flight runs at the
//! pace of its slowest stage, and a stage's step is its compute at the
//! expected batch (its layers, plus the lm_head on the last stage, which
//! costs as much as several layers) plus sending its hidden states to the
//! next stage (round trip plus bytes over bandwidth). One stream instead
//! waits for every stage and every hop in turn.

use super::model_cost::ModelCost;
use super::profile::{LayerTime, Links};

/// A usable worker, reduced to what the search needs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    /// Index into the planner's input.
    pub input: usize,
    /// Its id (for the link table).
    pub id: String,
    /// Bytes a stage on it may fill.
    pub memory: u64,
    /// Its time per layer.
    pub time: LayerTime,
    /// Its time per layer at the expected batch (what the search weighs).
    pub t_batch: f64,
}

/// The model, the links and the expected batch: everything a stage's cost depends on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CostModel<'a> {
    pub cost: &'a ModelCost,
    pub links: &'a Links,
    /// Rows per micro-batch the pipeline is expected to carry.
    pub batch: f64,
    /// The lm_head's work, in layers.
    pub head_layers: f64,
}

/// What one pipeline (an order of workers and their layer counts) delivers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Score {
    /// Seconds the slowest stage takes per micro-batch.
    pub bottleneck: f64,
    /// Seconds one token of one stream takes through every stage and hop.
    pub step: f64,
}

impl Score {
    /// Whether `self` is better than `other`: a faster slowest stage, then a shorter single-stream step.
    pub fn beats(&self, other: &Self) -> bool {
        const EPS: f64 = 1e-9;
        if self.bottleneck < other.bottleneck * (1.0 - EPS) {
            return true;
        }
        self.bottleneck <= other.bottleneck * (1.0 + EPS) && self.step < other.step * (1.0 - EPS)
    }
}

impl<'a> CostModel<'a> {
    /// The cost model for `cost` over `links` at micro-batches of `batch` rows.
    pub fn new(cost: &'a ModelCost, links: &'a Links, batch: f64) -> Self {
        Self { cost, links, batch: batch.max(1.0), head_layers: cost.head_layers() }
    }

    /// Seconds `node`'s compute takes per micro-batch for `layers` layers (and the head if `last`).
    #[allow(clippy::cast_precision_loss)]
    pub fn compute(&self, node: &Node, layers: usize, last: bool, batch: f64) -> f64 {
        let work = layers as f64 + if last { self.head_layers } else { 0.0 };
        work * if batch == self.batch { node.t_batch } else { node.time.at(batch) }
    }

    /// Seconds to hand a micro-batch of `batch` rows from `from` to `to`.
    #[allow(clippy::cast_precision_loss)]
    pub fn hop(&self, from: &Node, to: &Node, batch: f64) -> f64 {
        self.links.get(&from.id, &to.id).secs(batch * self.cost.hidden_bytes as f64)
    }

    /// A stage's time per micro-batch at the expected batch: compute plus the hop to `next`.
    pub fn stage(&self, node: &Node, layers: usize, next: Option<&Node>) -> f64 {
        self.compute(node, layers, next.is_none(), self.batch) + next.map_or(0.0, |n| self.hop(node, n, self.batch))
    }

    /// The score of running `counts[i]` layers on `order[i]`, or `None` when
    /// a stage is empty, the counts miss the model, or a stage does not fit.
    pub fn score(&self, nodes: &[Node], order: &[usize], counts: &[usize]) -> Option<Score> {
        let n = order.len();
        if n == 0 || counts.len() != n || counts.iter().sum::<usize>() != self.cost.layers {
            return None;
        }
        let mut score = Score { bottleneck: 0.0, step: 0.0 };
        for (i, (&w, &k)) in order.iter().zip(counts).enumerate() {
            let (node, first, last) = (&nodes[w], i == 0, i == n - 1);
            if k == 0 || self.cost.stage_bytes(k, first, last) > node.memory {
                return None;
            }
            let next = order.get(i + 1).map(|&j| &nodes[j]);
            score.bottleneck = score.bottleneck.max(self.stage(node, k, next));
            score.step += self.compute(node, k, last, 1.0) + next.map_or(0.0, |nx| self.hop(node, nx, 1.0));
        }
        Some(score)
    }
}
