//! The search for one pipeline over a group of workers: which of them take
//! part, in what order, and where the cuts fall.
//!
//! For a fixed order the cuts are exact: a dynamic programme over (stage,
//! first layer) finds the cut points that minimise the slowest stage within
//! every worker's memory. Orders are searched by local moves from a few
//! seeds (fastest first, slowest first, the given order): move a worker,
//! swap two, drop one, take an unused one back; each move is scored by the
//! exact cuts and kept when it lowers the slowest stage (or, at a tie, the
//! single-stream step). Dropping is how a worker whose stage or link would
//! slow the pipeline is left out. [`exhaustive`] tries every order of
//! every subset instead, for the benchmark's comparison on small pools.

use super::cost_model::{CostModel, Node, Score};

/// Groups larger than this are searched with cheap moves only (drops and adjacent swaps).
const FULL_SEARCH_MAX: usize = 10;

/// Rounds of improving moves before the search settles for what it has.
const MAX_ROUNDS: usize = 64;

/// One pipeline: node indexes in stage order, their layer counts, and its score.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Found {
    pub order: Vec<usize>,
    pub counts: Vec<usize>,
    pub score: Score,
}

/// The cut points for `order` that minimise the slowest stage, or `None`
/// when no cut fits memory with every stage holding at least one layer.
pub(crate) fn cuts(cm: &CostModel<'_>, nodes: &[Node], order: &[usize]) -> Option<Found> {
    let (m, layers) = (order.len(), cm.cost.layers);
    if m == 0 || m > layers {
        return None;
    }
    let width = layers + 1;
    // best[i * width + l]: the slowest stage among stages i.. when stage i starts at layer l.
    let mut best = vec![f64::INFINITY; m * width];
    let mut take = vec![0usize; m * width];
    for i in (0..m).rev() {
        let node = &nodes[order[i]];
        let (first, last) = (i == 0, i == m - 1);
        let next = order.get(i + 1).map(|&j| &nodes[j]);
        let cap = cm.cost.capacity(node.memory, first, last);
        let starts = if first { 0..=0 } else { i..=layers - (m - i) };
        for l in starts {
            if last {
                let k = layers - l;
                if k >= 1 && k <= cap {
                    best[i * width + l] = cm.stage(node, k, None);
                    take[i * width + l] = k;
                }
                continue;
            }
            let most = cap.min(layers - l - (m - 1 - i));
            for k in 1..=most {
                let here = cm.stage(node, k, next);
                if here >= best[i * width + l] {
                    break;
                }
                let value = here.max(best[(i + 1) * width + l + k]);
                if value < best[i * width + l] {
                    best[i * width + l] = value;
                    take[i * width + l] = k;
                }
            }
        }
    }
    if !best[0].is_finite() {
        return None;
    }
    let mut counts = Vec::with_capacity(m);
    let mut l = 0;
    for i in 0..m {
        let k = take[i * width + l];
        counts.push(k);
        l += k;
    }
    let score = cm.score(nodes, order, &counts)?;
    Some(Found { order: order.to_vec(), counts, score })
}

/// Whether `a` is a better pipeline than `b`; at equal scores, the one whose
/// order comes first in the input (the plan in force, then join order), so
/// that ties do not reshuffle stages.
fn better(a: &Option<Found>, b: &Option<Found>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.score.beats(&b.score) || (!b.score.beats(&a.score) && a.order < b.order),
        (Some(_), None) => true,
        _ => false,
    }
}

/// Every order the moves reach from `order` in one step, with `spare` the group's members not in it.
fn neighbours(order: &[usize], spare: &[usize], full: bool) -> Vec<Vec<usize>> {
    let m = order.len();
    let mut out = Vec::new();
    if m > 1 {
        for i in 0..m {
            let mut o = order.to_vec();
            o.remove(i);
            out.push(o);
        }
    }
    if full {
        for i in 0..m {
            for j in 0..m {
                if i != j {
                    let mut o = order.to_vec();
                    let w = o.remove(i);
                    o.insert(j, w);
                    out.push(o);
                }
            }
        }
        for i in 0..m {
            for j in i + 2..m {
                let mut o = order.to_vec();
                o.swap(i, j);
                out.push(o);
            }
        }
        for &s in spare {
            for j in 0..=m {
                let mut o = order.to_vec();
                o.insert(j, s);
                out.push(o);
            }
        }
    } else {
        for i in 0..m.saturating_sub(1) {
            let mut o = order.to_vec();
            o.swap(i, i + 1);
            out.push(o);
        }
        for &s in spare.iter().take(4) {
            let mut o = order.to_vec();
            o.push(s);
            out.push(o);
        }
    }
    out
}

/// The best pipeline the local search finds over `members` (node indexes,
/// in the order they were given: join order, or the plan in force first).
pub(crate) fn search(cm: &CostModel<'_>, nodes: &[Node], members: &[usize]) -> Option<Found> {
    let layers = cm.cost.layers;
    let speed_order = |rev: bool| {
        let mut o = members.to_vec();
        o.sort_by(|&a, &b| {
            let (ta, tb) = (nodes[a].time.at(cm.batch), nodes[b].time.at(cm.batch));
            if rev {
                tb.total_cmp(&ta)
            } else {
                ta.total_cmp(&tb)
            }
        });
        o
    };
    // A pipeline has at most one stage per layer: the fastest workers are the ones worth trying.
    let fastest = speed_order(false);
    let pool: Vec<usize> = if members.len() > layers { fastest[..layers].to_vec() } else { members.to_vec() };
    let mut roomiest = pool.clone();
    roomiest.sort_by_key(|&i| std::cmp::Reverse(nodes[i].memory));
    let mut seeds = vec![pool.clone(), speed_order(false), speed_order(true), roomiest.clone()];
    for s in &mut seeds {
        s.retain(|i| pool.contains(i));
    }
    // The fastest worker alone, when it holds the whole model, is the floor every pipeline must beat.
    seeds.push(fastest[..1].to_vec());
    seeds.push(roomiest[..1].to_vec());
    let mut current: Option<Found> = None;
    for seed in &seeds {
        let found = cuts(cm, nodes, seed).or_else(|| fill(cm, nodes, seed));
        if better(&found, &current) {
            current = found;
        }
    }
    let mut current = current?;
    let full = pool.len() <= FULL_SEARCH_MAX;
    for _ in 0..MAX_ROUNDS {
        let spare: Vec<usize> = pool.iter().copied().filter(|i| !current.order.contains(i)).collect();
        let mut next = None;
        for o in neighbours(&current.order, &spare, full) {
            let found = cuts(cm, nodes, &o);
            if better(&found, &next) {
                next = found;
            }
        }
        match next {
            Some(n) if n.score.beats(&current.score) => current = n,
            _ => break,
        }
    }
    Some(current)
}

/// For a seed too big to fit in the given order: its members while they
/// are needed, in order, dropping the rest, so the search starts somewhere.
fn fill(cm: &CostModel<'_>, nodes: &[Node], seed: &[usize]) -> Option<Found> {
    (1..=seed.len()).rev().find_map(|n| cuts(cm, nodes, &seed[..n]))
}

/// The best pipeline over every order of every subset of `members`: exact, and
/// feasible only for a handful of workers (the benchmark's yardstick).
pub(crate) fn exhaustive(cm: &CostModel<'_>, nodes: &[Node], members: &[usize]) -> Option<Found> {
    fn walk(cm: &CostModel<'_>, nodes: &[Node], members: &[usize], order: &mut Vec<usize>, best: &mut Option<Found>) {
        if !order.is_empty() {
            let found = cuts(cm, nodes, order);
            if better(&found, best) {
                *best = found;
            }
        }
        for &w in members {
            if !order.contains(&w) && order.len() < cm.cost.layers {
                order.push(w);
                walk(cm, nodes, members, order, best);
                order.pop();
            }
        }
    }
    let mut best = None;
    walk(cm, nodes, members, &mut Vec::new(), &mut best);
    best
}

/// What the pipeline `found` would score with `node` added where it helps most:
/// the evidence for leaving it out.
pub(crate) fn with_added(cm: &CostModel<'_>, nodes: &[Node], found: &Found, node: usize) -> Option<Score> {
    let m = found.order.len();
    let positions: Vec<usize> = if m <= FULL_SEARCH_MAX { (0..=m).collect() } else { vec![0, m] };
    positions
        .into_iter()
        .filter_map(|j| {
            let mut o = found.order.clone();
            o.insert(j, node);
            cuts(cm, nodes, &o).map(|f| f.score)
        })
        .reduce(|a, b| if b.beats(&a) { b } else { a })
}
