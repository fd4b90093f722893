//! The search for one pipeline over a group of workers: which of them take
//! part, in what order, and where the cuts fall.
//!
//! For a fixed order the cuts are exact: a dynamic programme over (stage,
//! first layer) finds the cut points that minimise the slowest stage within
//! every worker's memory. Orders are searched by local moves from a few
//! seeds (fastest first, slowest first, roomiest first, the given order):
//! move a worker, swap two, drop one, take an unused one back, drop one and
//! move another; each move is scored by the
//! exact cuts and kept when it lowers the slowest stage (or, at a tie, the
//! single-stream step). Dropping is how a worker whose stage or link would
//! slow the pipeline is left out. [`exhaustive`] tries every order of
//! every subset instead, for the benchmark's comparison on small pools.

use super::cost_model::{CostModel, Node, Score};

/// Groups larger than this are searched with cheap moves only (drops and adjacent swaps).
const FULL_SEARCH_MAX: usize = 8;

/// Rounds of improving moves before the search settles for what it has.
const MAX_ROUNDS: usize = 64;

/// Rounds of cheap moves on a larger group: each costs a cut search per move.
const CHEAP_ROUNDS: usize = 3;

/// One pipeline: node indexes in stage order, their layer counts, and its score.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Found {
    pub order: Vec<usize>,
    pub counts: Vec<usize>,
    pub score: Score,
}

/// The cut points for `order` that minimise the slowest stage, or `None`
/// when no cut fits memory with every stage holding at least one layer.
#[allow(clippy::cast_precision_loss)]
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
        // The hop onward and the time per layer are the same for every cut: weigh them once.
        let hop = order.get(i + 1).map_or(0.0, |&j| cm.hop(node, &nodes[j], cm.batch));
        let (t, head) = (node.t_batch, if last { cm.head_layers * node.t_batch } else { 0.0 });
        let cap = cm.cost.capacity(node.memory, first, last);
        let starts = if first { 0..=0 } else { i..=layers - (m - i) };
        // Where this stage's time first reaches the rest's best: it never moves down as the start does.
        let mut cross = 1;
        for l in starts.rev() {
            if last {
                let k = layers - l;
                if k >= 1 && k <= cap {
                    best[i * width + l] = k as f64 * t + head;
                    take[i * width + l] = k;
                }
                continue;
            }
            let most = cap.min(layers - l - (m - 1 - i));
            if most == 0 {
                continue;
            }
            // This stage's time rises with its layers and the rest's best falls (never rises):
            // the optimum sits where they cross. An earlier start leaves the rest more to do,
            // so the crossing only moves up as `l` comes down: one pass finds them all.
            let own = |k: usize| k as f64 * t + hop;
            let rest = |k: usize| best[(i + 1) * width + l + k];
            while cross <= most && own(cross) < rest(cross) {
                cross += 1;
            }
            let (mut value, mut k) = (f64::INFINITY, 0);
            if cross <= most {
                (value, k) = (own(cross), cross);
            }
            if cross > 1 && rest(cross - 1) <= value {
                // The rest is the slowest there: the fewest layers giving the same rest win ties.
                let v = rest(cross - 1);
                (value, k) = (v, first_true(1, cross - 1, |j| rest(j) <= v));
            }
            best[i * width + l] = value;
            take[i * width + l] = k;
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

/// The least `k` in `lo..hi` for which `pred` holds (`hi` if none), for a
/// `pred` that once true stays true.
fn first_true(mut lo: usize, mut hi: usize, pred: impl Fn(usize) -> bool) -> usize {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
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

/// Every order the moves reach from `order` in one step, with `spare` the group's members not in it
/// (`full`: every move, else the cheap ones; `compound`: also drop-and-move pairs).
fn neighbours(order: &[usize], spare: &[usize], full: bool, compound: bool) -> Vec<Vec<usize>> {
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
        // Drop one and move another: leaving a worker out often needs someone else at its end.
        for d in (0..m).filter(|_| compound) {
            let mut rest = order.to_vec();
            rest.remove(d);
            for i in 0..rest.len() {
                for j in 0..rest.len() {
                    if i != j {
                        let mut o = rest.clone();
                        let w = o.remove(i);
                        o.insert(j, w);
                        out.push(o);
                    }
                }
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
/// A `thorough` search climbs from every seed (and from each member alone)
/// rather than from the best seed only, with compound moves too: for small
/// pools, where it is cheap.
pub(crate) fn search(cm: &CostModel<'_>, nodes: &[Node], members: &[usize], thorough: bool) -> Option<Found> {
    let layers = cm.cost.layers;
    let speed_order = |rev: bool| {
        let mut o = members.to_vec();
        o.sort_by(|&a, &b| {
            let (ta, tb) = (nodes[a].t_batch, nodes[b].t_batch);
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
    if thorough {
        seeds.extend(pool.iter().map(|&i| vec![i]));
    }
    let mut starts: Vec<Found> = Vec::new();
    for (k, seed) in seeds.iter().enumerate() {
        if seeds[..k].contains(seed) {
            continue;
        }
        if let Some(found) = cuts(cm, nodes, seed).or_else(|| fill(cm, nodes, seed)) {
            starts.push(found);
        }
    }
    if !thorough {
        let first =
            starts.iter().cloned().reduce(|a, b| if better(&Some(b.clone()), &Some(a.clone())) { b } else { a });
        starts = first.into_iter().collect();
    }
    let mut best: Option<Found> = None;
    for start in starts {
        let found = Some(climb(cm, nodes, &pool, start, thorough));
        if better(&found, &best) {
            best = found;
        }
    }
    best
}

/// Improving moves from `current` until none improves (or the rounds run
/// out). A `thorough` climb takes the best move of each round (and tries
/// compound moves); a quick one takes the first that improves.
fn climb(cm: &CostModel<'_>, nodes: &[Node], pool: &[usize], mut current: Found, thorough: bool) -> Found {
    let full = pool.len() <= FULL_SEARCH_MAX;
    'rounds: for _ in 0..if full { MAX_ROUNDS } else { CHEAP_ROUNDS } {
        let spare: Vec<usize> = pool.iter().copied().filter(|i| !current.order.contains(i)).collect();
        let mut next = None;
        for o in neighbours(&current.order, &spare, full, thorough) {
            let found = cuts(cm, nodes, &o);
            if !thorough {
                if let Some(f) = found.filter(|f| f.score.beats(&current.score)) {
                    current = f;
                    continue 'rounds;
                }
            } else if better(&found, &next) {
                next = found;
            }
        }
        match next {
            Some(n) if n.score.beats(&current.score) => current = n,
            _ => break,
        }
    }
    current
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
