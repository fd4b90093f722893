//! Placement: contiguous layer ranges that balance compute, within memory.
//!
//! A pipeline runs at the pace of its slowest stage, so the first choice is
//! the split that gives every worker work in proportion to its speed (its
//! measured time per layer, else its compute threads), counting the last stage's lm_head, which costs as much
//! as several layers, and not the first stage's embedding, a mere lookup.
//! If that split does not fit some worker's memory, layers go in proportion
//! to memory instead, where the first stage also holds the embedding and the
//! last the lm_head. A plan that fits neither way is an error naming the
//! shortfall; it never over-commits a worker.

use crate::membership::WorkerInfo;

/// What the planner needs to know about the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelCost {
    /// Transformer blocks.
    pub layers: usize,
    /// Weight bytes of one block.
    pub layer_bytes: u64,
    /// Weight bytes of the embedding (first stage).
    pub embed_bytes: u64,
    /// Weight bytes of the final norm and lm_head (last stage).
    pub head_bytes: u64,
    /// Multiply-adds of one block per token (0 = unknown: split by memory).
    pub layer_macs: u64,
    /// Multiply-adds of the lm_head per token.
    pub head_macs: u64,
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

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No worker has joined.
    #[error("no workers have joined")]
    NoWorkers,
    /// The workers' memory cannot hold the model.
    #[error("the workers' memory ({available} bytes) cannot hold the model ({needed} bytes)")]
    NotEnoughMemory {
        /// Bytes the model needs.
        needed: u64,
        /// Bytes the workers offer.
        available: u64,
    },
}

/// Splits the model over `workers` (in order): compute-balanced if it fits, else by memory.
#[allow(clippy::cast_precision_loss)]
pub fn plan(cost: ModelCost, workers: &[WorkerInfo]) -> Result<Vec<StagePlan>, PlanError> {
    if workers.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    let workers = &workers[..workers.len().min(cost.layers)];
    let n = workers.len();
    let total = cost.layers as u64 * cost.layer_bytes + cost.embed_bytes + cost.head_bytes;
    let mem: Vec<f64> = workers.iter().map(|w| w.free_memory_bytes as f64).collect();
    let available: u64 = workers.iter().map(|w| w.free_memory_bytes).sum();
    if available < total {
        return Err(PlanError::NotEnoughMemory { needed: total, available });
    }
    let weight_bytes = |i: usize, layers: usize| {
        layers as u64 * cost.layer_bytes
            + if i == 0 { cost.embed_bytes } else { 0 }
            + if i == n - 1 { cost.head_bytes } else { 0 }
    };
    let fits = |counts: &[usize]| {
        counts.iter().enumerate().find_map(|(i, &c)| {
            let need = weight_bytes(i, c);
            (need > workers[i].free_memory_bytes)
                .then_some(PlanError::NotEnoughMemory { needed: need, available: workers[i].free_memory_bytes })
        })
    };
    let mut counts = None;
    if cost.layer_macs > 0 {
        let speed = speeds(workers);
        let by_compute = split(cost.layers, cost.layer_macs, &speed, |i| if i == n - 1 { cost.head_macs } else { 0 });
        if fits(&by_compute).is_none() {
            counts = Some(by_compute);
        }
    }
    let counts = match counts {
        Some(c) => c,
        None => {
            let by_memory = split(cost.layers, cost.layer_bytes, &mem, |i| weight_bytes(i, 0));
            if let Some(e) = fits(&by_memory) {
                return Err(e);
            }
            by_memory
        }
    };
    let mut start = 0;
    Ok(workers
        .iter()
        .zip(&counts)
        .map(|(w, &c)| {
            let stage = StagePlan { worker: w.id.clone(), address: w.address.clone(), start, end: start + c };
            start += c;
            stage
        })
        .collect())
}

/// Each worker's relative speed: the inverse of its measured time per layer
/// when every worker has measured one (the start-up probe, published with
/// etcd membership), else its compute threads.
fn speeds(workers: &[WorkerInfo]) -> Vec<f64> {
    let measured: Option<Vec<f64>> =
        workers.iter().map(|w| w.layer_micros.filter(|&t| t.is_finite() && t > 0.0).map(|t| 1.0 / t)).collect();
    measured.unwrap_or_else(|| workers.iter().map(|w| f64::from(w.threads.max(1))).collect())
}

/// Layer counts (at least one each, summing to `layers`) that give worker `i`
/// a share of the total cost in proportion to `share[i]`, where a layer costs
/// `unit` and worker `i` also carries `extra(i)`.
#[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss, clippy::cast_sign_loss)]
fn split(layers: usize, unit: u64, share: &[f64], extra: impl Fn(usize) -> u64) -> Vec<usize> {
    let n = share.len();
    let total = (layers as u64 * unit + (0..n).map(&extra).sum::<u64>()) as f64;
    let shares: f64 = share.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let mut ideal: Vec<f64> =
        (0..n).map(|i| ((total * share[i] / shares - extra(i) as f64) / unit.max(1) as f64).max(1.0)).collect();
    let sum: f64 = ideal.iter().sum();
    ideal.iter_mut().for_each(|x| *x *= layers as f64 / sum);
    // Largest-remainder rounding, at least one layer each.
    let mut counts: Vec<usize> = ideal.iter().map(|x| (x.floor() as usize).max(1)).collect();
    while counts.iter().sum::<usize>() > layers {
        let i = (0..n)
            .filter(|&i| counts[i] > 1)
            .max_by(|&a, &b| (counts[a] as f64 - ideal[a]).total_cmp(&(counts[b] as f64 - ideal[b])));
        match i {
            Some(i) => counts[i] -= 1,
            None => break,
        }
    }
    while counts.iter().sum::<usize>() < layers {
        let i = (0..n)
            .max_by(|&a, &b| (ideal[a] - counts[a] as f64).total_cmp(&(ideal[b] - counts[b] as f64)).then(b.cmp(&a)));
        counts[i.unwrap_or(0)] += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, mem: u64) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            address: format!("http://{id}"),
            device: "cpu".into(),
            threads: 1,
            free_memory_bytes: mem,
            version: String::new(),
            joined: 0,
            layer_micros: None,
            instance: String::new(),
        }
    }

    fn ranges(p: &[StagePlan]) -> Vec<(usize, usize)> {
        p.iter().map(|s| (s.start, s.end)).collect()
    }

    #[test]
    fn table() {
        let smol =
            ModelCost { layers: 30, layer_bytes: 1, embed_bytes: 10, head_bytes: 0, layer_macs: 0, head_macs: 0 };
        // SmolLM2's shape: a block is 3.5 M multiply-adds, the lm_head 28 M (8 blocks' worth).
        let compute =
            ModelCost { layers: 30, layer_bytes: 2, embed_bytes: 30, head_bytes: 30, layer_macs: 35, head_macs: 283 };
        type Case = (&'static str, ModelCost, Vec<u64>, Vec<(usize, usize)>);
        let cases: Vec<Case> = vec![
            ("one worker takes all", smol, vec![100], vec![(0, 30)]),
            ("equal memory: the embedding holder gets fewer layers", smol, vec![100, 100], vec![(0, 10), (10, 30)]),
            ("three equal", smol, vec![100, 100, 100], vec![(0, 4), (4, 17), (17, 30)]),
            ("a big worker takes more", smol, vec![100, 300], vec![(0, 1), (1, 30)]),
            ("compute: the lm_head's stage gets fewer layers", compute, vec![1000, 1000], vec![(0, 19), (19, 30)]),
            ("compute: three equal", compute, vec![1000, 1000, 1000], vec![(0, 13), (13, 26), (26, 30)]),
            ("compute does not fit: by memory", compute, vec![60, 1000], vec![(0, 1), (1, 30)]),
            (
                "more workers than layers",
                ModelCost { layers: 2, layer_bytes: 1, embed_bytes: 0, head_bytes: 0, layer_macs: 0, head_macs: 0 },
                vec![9, 9, 9],
                vec![(0, 1), (1, 2)],
            ),
        ];
        for (name, cost, mems, want) in cases {
            let ws: Vec<WorkerInfo> = mems.iter().enumerate().map(|(i, &m)| worker(&format!("w{i}"), m)).collect();
            let got = plan(cost, &ws).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(ranges(&got), want, "{name}");
        }
    }

    #[test]
    fn measured_speed_wins_over_threads() {
        let cost =
            ModelCost { layers: 30, layer_bytes: 2, embed_bytes: 30, head_bytes: 30, layer_macs: 35, head_macs: 283 };
        let mut fast = worker("fast", 1000);
        let mut slow = worker("slow", 1000);
        (fast.threads, slow.threads) = (1, 8);
        (fast.layer_micros, slow.layer_micros) = (Some(100.0), Some(300.0));
        // Measured: `fast` does three times the work, though it has fewer threads.
        assert_eq!(ranges(&plan(cost, &[fast.clone(), slow.clone()]).expect("fits")), vec![(0, 29), (29, 30)]);
        // One worker without a measurement: threads decide for all.
        slow.layer_micros = None;
        assert_eq!(ranges(&plan(cost, &[fast, slow]).expect("fits")), vec![(0, 4), (4, 30)]);
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let cost =
            ModelCost { layers: 10, layer_bytes: 10, embed_bytes: 50, head_bytes: 50, layer_macs: 1, head_macs: 1 };
        assert_eq!(plan(cost, &[]), Err(PlanError::NoWorkers));
        assert!(matches!(plan(cost, &[worker("a", 100)]), Err(PlanError::NotEnoughMemory { needed: 200, .. })));
    }
}
