//! Placement: contiguous layer ranges, in proportion to each worker's memory.
//!
//! The first stage also holds the embedding and the last the lm_head, so
//! they get fewer layers for the same memory. A plan that does not fit is an
//! error naming the shortfall; it never over-commits a worker.

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

/// Splits the model over `workers` (in order) in proportion to their free memory.
#[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss, clippy::cast_sign_loss)]
pub fn plan(cost: ModelCost, workers: &[WorkerInfo]) -> Result<Vec<StagePlan>, PlanError> {
    if workers.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    let workers = &workers[..workers.len().min(cost.layers)];
    let n = workers.len();
    let total = cost.layers as u64 * cost.layer_bytes + cost.embed_bytes + cost.head_bytes;
    let mem: Vec<u64> = workers.iter().map(|w| w.free_memory_bytes).collect();
    let available: u64 = mem.iter().sum();
    if available < total {
        return Err(PlanError::NotEnoughMemory { needed: total, available });
    }
    // Ideal weight share of each worker, minus its fixed extras, in layers.
    let mut ideal: Vec<f64> = mem
        .iter()
        .enumerate()
        .map(|(i, &m)| {
            let share = total as f64 * m as f64 / available as f64;
            let extra = if i == 0 { cost.embed_bytes } else { 0 } + if i == n - 1 { cost.head_bytes } else { 0 };
            ((share - extra as f64) / cost.layer_bytes.max(1) as f64).max(1.0)
        })
        .collect();
    let sum: f64 = ideal.iter().sum();
    ideal.iter_mut().for_each(|x| *x *= cost.layers as f64 / sum);
    // Largest-remainder rounding, at least one layer each.
    let mut counts: Vec<usize> = ideal.iter().map(|x| (x.floor() as usize).max(1)).collect();
    while counts.iter().sum::<usize>() > cost.layers {
        let i = (0..n)
            .filter(|&i| counts[i] > 1)
            .max_by(|&a, &b| (counts[a] as f64 - ideal[a]).total_cmp(&(counts[b] as f64 - ideal[b])));
        match i {
            Some(i) => counts[i] -= 1,
            None => break,
        }
    }
    while counts.iter().sum::<usize>() < cost.layers {
        let i = (0..n)
            .max_by(|&a, &b| (ideal[a] - counts[a] as f64).total_cmp(&(ideal[b] - counts[b] as f64)).then(b.cmp(&a)));
        counts[i.unwrap_or(0)] += 1;
    }
    let mut start = 0;
    let mut stages = Vec::with_capacity(n);
    for (i, (w, &c)) in workers.iter().zip(&counts).enumerate() {
        let need = c as u64 * cost.layer_bytes
            + if i == 0 { cost.embed_bytes } else { 0 }
            + if i == n - 1 { cost.head_bytes } else { 0 };
        if need > w.free_memory_bytes {
            return Err(PlanError::NotEnoughMemory { needed: need, available: w.free_memory_bytes });
        }
        stages.push(StagePlan { worker: w.id.clone(), address: w.address.clone(), start, end: start + c });
        start += c;
    }
    Ok(stages)
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
        let smol = ModelCost { layers: 30, layer_bytes: 1, embed_bytes: 10, head_bytes: 0 };
        type Case = (&'static str, ModelCost, Vec<u64>, Vec<(usize, usize)>);
        let cases: Vec<Case> = vec![
            ("one worker takes all", smol, vec![100], vec![(0, 30)]),
            ("equal memory: the embedding holder gets fewer layers", smol, vec![100, 100], vec![(0, 10), (10, 30)]),
            ("three equal", smol, vec![100, 100, 100], vec![(0, 4), (4, 17), (17, 30)]),
            ("a big worker takes more", smol, vec![100, 300], vec![(0, 1), (1, 30)]),
            (
                "more workers than layers",
                ModelCost { layers: 2, layer_bytes: 1, embed_bytes: 0, head_bytes: 0 },
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
    fn refuses_what_does_not_fit() {
        let cost = ModelCost { layers: 10, layer_bytes: 10, embed_bytes: 50, head_bytes: 50 };
        assert_eq!(plan(cost, &[]), Err(PlanError::NoWorkers));
        assert!(matches!(plan(cost, &[worker("a", 100)]), Err(PlanError::NotEnoughMemory { needed: 200, .. })));
    }
}
