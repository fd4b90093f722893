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
//! down to one are tried, and the one with the highest total throughput wins
//! (at a tie, more replicas: shorter pipelines, quicker single streams).

use super::cost_model::{CostModel, Node};
use super::pipeline_search::{search, Found};

/// Replica counts tried near the most the memory allows, before halving.
const NEAR_MAX_TRIES: usize = 3;

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

/// The replica counts worth trying when at most `most` fit.
fn counts_to_try(most: usize) -> Vec<usize> {
    let mut r: Vec<usize> = (0..NEAR_MAX_TRIES).filter_map(|k| most.checked_sub(k)).collect();
    let mut x = most;
    while x > 1 {
        x = x * 3 / 4;
        r.push(x);
    }
    r.push(1);
    r.retain(|&x| x >= 1);
    r.dedup();
    r.sort_unstable_by(|a, b| b.cmp(a));
    r.dedup();
    r
}

/// The nodes dealt into `r` groups of alike speed, each first filled to hold a copy.
fn deal(cm: &CostModel<'_>, nodes: &[Node], r: usize) -> Vec<Vec<usize>> {
    let cost = cm.cost;
    let ends = (cost.embed_bytes + cost.head_bytes).div_ceil(cost.layer_bytes.max(1));
    let copy = cost.layers + usize::try_from(ends).unwrap_or(usize::MAX);
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by(|&a, &b| nodes[a].time.at(cm.batch).total_cmp(&nodes[b].time.at(cm.batch)));
    let mut groups: Vec<(f64, usize, Vec<usize>)> = vec![(0.0, 0, Vec::new()); r];
    for i in order {
        let short = groups.iter().any(|g| g.1 < copy);
        let pick = (0..r)
            .filter(|&g| !short || groups[g].1 < copy)
            .min_by(|&a, &b| groups[a].0.total_cmp(&groups[b].0).then(a.cmp(&b)))
            .unwrap_or(0);
        let g = &mut groups[pick];
        g.0 += 1.0 / nodes[i].time.at(cm.batch);
        g.1 += cost.capacity(nodes[i].memory, false, false);
        g.2.push(i);
    }
    groups.into_iter().map(|g| g.2).collect()
}

/// Pipelines for `nodes`, at most `max_replicas` of them, or `None` when no pipeline fits.
pub(crate) fn form(cm: &CostModel<'_>, nodes: &[Node], max_replicas: usize) -> Option<Formed> {
    let capacity: usize = nodes.iter().map(|n| cm.cost.capacity(n.memory, false, false)).sum();
    let most = max_replicas.min(nodes.len()).min(capacity / cm.cost.layers.max(1)).max(1);
    // The best trial so far: total throughput, the groups dealt, and each group's pipeline.
    type Trial = (f64, Vec<Vec<usize>>, Vec<Option<Found>>);
    let mut best: Option<Trial> = None;
    for r in counts_to_try(most) {
        let groups = if r == 1 { vec![(0..nodes.len()).collect()] } else { deal(cm, nodes, r) };
        let found: Vec<Option<Found>> = groups.iter().map(|g| search(cm, nodes, g)).collect();
        let formed: Vec<Found> = found.iter().flatten().cloned().collect();
        let total = throughput(cm, &formed);
        if formed.is_empty() {
            continue;
        }
        if best.as_ref().is_none_or(|b| total > b.0 * (1.0 + 1e-9)) {
            best = Some((total, groups, found));
        }
    }
    let (_, groups, found) = best?;
    let mut pipelines: Vec<(Found, Vec<usize>)> =
        found.into_iter().zip(groups).filter_map(|(f, g)| f.map(|f| (f, g))).collect();
    pipelines.sort_by(|a, b| a.0.score.bottleneck.total_cmp(&b.0.score.bottleneck));
    let mut unused: Vec<(usize, Option<usize>)> = (0..nodes.len())
        .filter(|i| !pipelines.iter().any(|(p, _)| p.order.contains(i)))
        .map(|i| (i, pipelines.iter().position(|(_, g)| g.contains(&i))))
        .collect();
    unused.sort_unstable();
    Some(Formed { pipelines: pipelines.into_iter().map(|(p, _)| p).collect(), unused })
}

#[cfg(test)]
mod tests {
    use super::counts_to_try;

    #[test]
    fn replica_counts_start_at_the_most_and_reach_one() {
        assert_eq!(counts_to_try(1), vec![1]);
        assert_eq!(counts_to_try(2), vec![2, 1]);
        assert_eq!(counts_to_try(8), vec![8, 7, 6, 4, 3, 2, 1]);
        assert_eq!(
            counts_to_try(100).len(),
            counts_to_try(100).iter().collect::<std::collections::BTreeSet<_>>().len()
        );
    }
}
