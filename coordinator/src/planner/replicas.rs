//! Replicas: when the pool holds more than one copy of the model, several
//! shorter pipelines serve more than one long one. A pipeline has at most
//! one stage per layer, every stage pays a hop, and the last stage's lm_head
//! cannot be split, so past a few stages a deeper pipeline gains little;
//! two pipelines each carry their own stream of micro-batches.
//!
//! For a replica count `r` the workers are dealt into `r` groups, fastest
//! first, each to the group with the least speed so far (a group still short
//! of memory for a copy first), so the groups come out alike; each group is
//! then searched as one pipeline. Counts from the most the memory allows
//! down to one are tried (a large count judged by a sample of its groups,
//! as they are dealt alike), and the one with the highest total throughput wins
//! (at a tie, more replicas: shorter pipelines, quicker single streams).
//! Counts are tried from the most down, stopping once a few in a row gain nothing.

use super::cost_model::{CostModel, Node};
use super::pipeline_search::{search, Found};

/// Pools of at most this many workers are searched from every start.
const THOROUGH_UP_TO: usize = 12;

/// Replica counts tried in a row without a gain before the search stops.
const GIVE_UP_AFTER: usize = 2;

/// Pipelines formed over the nodes, and the nodes no pipeline uses.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Formed {
    /// The pipelines, best first.
    pub pipelines: Vec<Found>,
    /// Unused node indexes, each with the pipeline (index into `pipelines`)
    /// its group formed, if its group formed one.
    pub unused: Vec<(usize, Option<usize>)>,
}

/// Total decode throughput of `pipelines`, in rows per second.
pub(crate) fn throughput(cm: &CostModel<'_>, pipelines: &[Found]) -> f64 {
    pipelines.iter().map(|p| cm.batch / p.score.bottleneck).sum()
}

/// Up to this many replicas, every count is tried.
const ALL_COUNTS_UP_TO: usize = 8;

/// The replica counts worth trying when at most `most` fit, most first:
/// every one for a few, else a geometric sweep down to one.
fn counts_to_try(most: usize) -> Vec<usize> {
    if most <= ALL_COUNTS_UP_TO {
        return (1..=most).rev().collect();
    }
    let mut r = vec![most];
    let mut x = most;
    while x > 1 {
        x = (x * 3 / 4).max(1);
        r.push(x);
    }
    r.dedup();
    r
}

/// The nodes dealt into `r` groups of alike speed, each first filled to hold a copy.
fn deal(cm: &CostModel<'_>, nodes: &[Node], r: usize) -> Vec<Vec<usize>> {
    let cost = cm.cost;
    let ends = (cost.embed_bytes + cost.head_bytes).div_ceil(cost.layer_bytes.max(1));
    let copy = cost.layers + usize::try_from(ends).unwrap_or(usize::MAX);
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by(|&a, &b| nodes[a].t_batch.total_cmp(&nodes[b].t_batch));
    let mut groups: Vec<(f64, usize, Vec<usize>)> = vec![(0.0, 0, Vec::new()); r];
    for i in order {
        let short = groups.iter().any(|g| g.1 < copy);
        let pick = (0..r)
            .filter(|&g| !short || groups[g].1 < copy)
            .min_by(|&a, &b| groups[a].0.total_cmp(&groups[b].0).then(a.cmp(&b)))
            .unwrap_or(0);
        let g = &mut groups[pick];
        g.0 += 1.0 / nodes[i].t_batch;
        g.1 += cost.capacity(nodes[i].memory, false, false);
        g.2.push(i);
    }
    groups.into_iter().map(|g| g.2).collect()
}

/// Groups searched to estimate a replica count's throughput: with more
/// groups than this, every group is dealt alike, so a spread sample of them
/// stands for the rest and only the chosen count is searched in full.
const SAMPLED_GROUPS: usize = 16;

/// Estimated total throughput of `r` replicas: exact up to [`SAMPLED_GROUPS`], else from a spread sample.
#[allow(clippy::cast_precision_loss)]
fn estimate(cm: &CostModel<'_>, nodes: &[Node], r: usize, thorough: bool) -> f64 {
    let groups = dealt(cm, nodes, r);
    let step = groups.len().div_ceil(SAMPLED_GROUPS).max(1);
    let sample: Vec<&Vec<usize>> = groups.iter().step_by(step).collect();
    let found: Vec<Found> = sample.iter().filter_map(|g| search(cm, nodes, g, thorough)).collect();
    throughput(cm, &found) * groups.len() as f64 / sample.len().max(1) as f64
}

fn dealt(cm: &CostModel<'_>, nodes: &[Node], r: usize) -> Vec<Vec<usize>> {
    if r == 1 {
        vec![(0..nodes.len()).collect()]
    } else {
        deal(cm, nodes, r)
    }
}

/// Pipelines for `nodes`, at most `max_replicas` of them, or `None` when no pipeline fits.
pub(crate) fn form(cm: &CostModel<'_>, nodes: &[Node], max_replicas: usize) -> Option<Formed> {
    let capacity: usize = nodes.iter().map(|n| cm.cost.capacity(n.memory, false, false)).sum();
    let most = max_replicas.min(nodes.len()).min(capacity / cm.cost.layers.max(1)).max(1);
    let thorough = nodes.len() <= THOROUGH_UP_TO;
    let mut best: Option<(usize, f64)> = None;
    let mut tried = Vec::new();
    let mut worse = 0;
    let consider = |r: usize, best: &mut Option<(usize, f64)>| {
        let total = estimate(cm, nodes, r, thorough);
        let gain = total > 0.0 && best.is_none_or(|b| total > b.1 * (1.0 + 1e-9));
        if gain {
            *best = Some((r, total));
        }
        gain
    };
    for r in counts_to_try(most) {
        tried.push(r);
        if consider(r, &mut best) {
            worse = 0;
        } else {
            // Throughput rises with the replica count up to a peak: past it, stop looking.
            worse += 1;
            if worse == GIVE_UP_AFTER {
                break;
            }
        }
    }
    // The sweep steps geometrically: look between the best count and its neighbours too.
    let b = best?.0;
    let above = tried.iter().copied().filter(|&r| r > b).min();
    let below = tried.iter().copied().filter(|&r| r < b).max();
    for r in [above.map(|a| (a + b) / 2), below.map(|c| (b + c).div_ceil(2))].into_iter().flatten() {
        if !tried.contains(&r) {
            consider(r, &mut best);
        }
    }
    let groups = dealt(cm, nodes, best?.0);
    let mut pipelines: Vec<(Found, &Vec<usize>)> =
        groups.iter().filter_map(|g| search(cm, nodes, g, thorough).map(|f| (f, g))).collect();
    if pipelines.is_empty() {
        return None;
    }
    pipelines.sort_by(|a, b| a.0.score.bottleneck.total_cmp(&b.0.score.bottleneck));
    let mut pipeline_of = vec![None; nodes.len()];
    let mut used = vec![false; nodes.len()];
    for (k, (p, g)) in pipelines.iter().enumerate() {
        g.iter().for_each(|&i| pipeline_of[i] = Some(k));
        p.order.iter().for_each(|&i| used[i] = true);
    }
    let unused = (0..nodes.len()).filter(|&i| !used[i]).map(|i| (i, pipeline_of[i])).collect();
    Some(Formed { pipelines: pipelines.into_iter().map(|(p, _)| p).collect(), unused })
}

#[cfg(test)]
mod tests {
    use super::counts_to_try;

    #[test]
    fn replica_counts_start_at_the_most_and_reach_one() {
        assert_eq!(counts_to_try(1), vec![1]);
        assert_eq!(counts_to_try(2), vec![2, 1]);
        assert_eq!(counts_to_try(8), vec![8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(counts_to_try(20), vec![20, 15, 11, 8, 6, 4, 3, 2, 1]);
        assert_eq!(
            counts_to_try(100).len(),
            counts_to_try(100).iter().collect::<std::collections::BTreeSet<_>>().len()
        );
    }
}
