//! Placement: contiguous layer ranges that balance compute, within memory.
//!
//! A pipeline runs at the pace of its slowest stage, so the first choice is
//! the split that gives every worker work in proportion to its speed (its
//! measured time per layer, else its compute threads), counting the last stage's lm_head, which costs as much
//! as several layers, and not the first stage's embedding, a mere lookup.
//! Each stage must hold its layers' weights, the embedding (first) or the
//! lm_head (last), and the KV budget it is asked to keep, in the memory the
//! stage runs in: a GPU's free device memory, else the host's. A worker whose
//! share does not fit is given all it can hold and the rest is split among
//! the others by the same rule, so a fast GPU takes as many layers as its
//! memory allows. A worker that cannot hold even one layer is left out (with
//! its reason in `/v1/cluster`). Where no split fits, the error names the
//! shortfall; a worker is never over-committed.

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
    /// KV cache bytes every stage is asked to keep (the workers' KV budget).
    pub kv_budget_bytes: u64,
}

impl ModelCost {
    /// Weight bytes per layer, of the embedding and of the head, from the file
    /// (the KV budget comes from the configuration).
    pub fn of_file(
        path: &std::path::Path,
        c: &potluck_engine::ModelConfig,
    ) -> Result<Self, crate::error::CoordinatorError> {
        let g = potluck_engine::gguf::GgufFile::open(path)?;
        let size = |pred: &dyn Fn(&str) -> bool| -> u64 {
            g.tensors.iter().filter(|(n, _)| pred(n)).map(|(_, t)| t.n_bytes as u64).sum()
        };
        let blocks = size(&|n| n.starts_with("blk."));
        let embed = size(&|n| n == "token_embd.weight");
        let output = size(&|n| n == "output.weight");
        let head = size(&|n| n == "output_norm.weight") + if output > 0 { output } else { embed };
        // Multiply-adds per token: one per weight of every matrix (norms and biases are noise).
        let elements = |pred: &dyn Fn(&str) -> bool| -> u64 {
            g.tensors
                .iter()
                .filter(|(n, t)| pred(n) && t.dims.len() == 2)
                .map(|(_, t)| t.dims.iter().product::<usize>() as u64)
                .sum()
        };
        let head_name = if output > 0 { "output.weight" } else { "token_embd.weight" };
        Ok(Self {
            layers: c.layers,
            layer_bytes: blocks / c.layers.max(1) as u64,
            embed_bytes: embed,
            head_bytes: head,
            layer_macs: elements(&|n| n.starts_with("blk.")) / c.layers.max(1) as u64,
            head_macs: elements(&|n| n == head_name),
            kv_budget_bytes: 0,
        })
    }

    /// Bytes the smallest possible stage needs: one layer and the KV budget.
    fn one_layer_bytes(&self) -> u64 {
        self.layer_bytes.saturating_add(self.kv_budget_bytes)
    }
}

/// A 30-layer model of 100 bytes a layer, for tests of what builds on plans.
#[cfg(test)]
pub(crate) fn test_cost(embed_bytes: u64, head_bytes: u64, kv_budget_bytes: u64) -> ModelCost {
    ModelCost { layers: 30, layer_bytes: 100, embed_bytes, head_bytes, layer_macs: 0, head_macs: 0, kv_budget_bytes }
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

/// A worker the planner does not use, and why: shown in `/v1/cluster` so an
/// operator sees why a GPU they added carries nothing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeftOut {
    /// The worker's id.
    pub worker: String,
    /// Bytes one layer and the KV budget need.
    pub needed_bytes: u64,
    /// Bytes its stage memory has free.
    pub available_bytes: u64,
    /// The same, in words.
    pub reason: String,
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
    /// The workers' memory cannot hold the model.
    #[error("the workers' memory ({available} bytes) cannot hold the model ({needed} bytes)")]
    NotEnoughMemory {
        /// Bytes the model needs.
        needed: u64,
        /// Bytes the workers offer.
        available: u64,
    },
}

/// The workers among `workers` that cannot hold a single layer and its KV
/// budget in their stage memory; [`plan`] does not use them.
pub fn left_out(cost: ModelCost, workers: &[WorkerInfo]) -> Vec<LeftOut> {
    let needed = cost.one_layer_bytes();
    workers
        .iter()
        .filter(|w| w.stage_memory_bytes() < needed)
        .map(|w| {
            let available = w.stage_memory_bytes();
            let d = &w.device_info;
            let memory = if d.kind.is_gpu() {
                format!("{} device `{}` has {} MiB free", d.kind.name(), d.name, available >> 20)
            } else {
                format!("host memory has {} MiB free", available >> 20)
            };
            LeftOut {
                worker: w.id.clone(),
                needed_bytes: needed,
                available_bytes: available,
                reason: format!("{memory}; one layer and the KV budget need {} MiB", needed.div_ceil(1 << 20)),
            }
        })
        .collect()
}

/// Splits the model over `workers` (in order), leaving out those that cannot
/// hold a layer: compute-balanced, each worker capped at what its memory holds.
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
pub fn plan(cost: ModelCost, workers: &[WorkerInfo]) -> Result<Vec<StagePlan>, PlanError> {
    if workers.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    let needed = cost.one_layer_bytes();
    let usable: Vec<&WorkerInfo> = workers.iter().filter(|w| w.stage_memory_bytes() >= needed).collect();
    if usable.is_empty() {
        let largest = workers.iter().map(WorkerInfo::stage_memory_bytes).max().unwrap_or(0);
        return Err(PlanError::NoWorkerHoldsALayer { needed, largest });
    }
    let workers = &usable[..usable.len().min(cost.layers)];
    let n = workers.len();
    let memory: Vec<u64> = workers.iter().map(|w| w.stage_memory_bytes()).collect();
    // Bytes stage `i` needs for `layers` layers.
    let stage_bytes = |i: usize, layers: usize| {
        (layers as u64 * cost.layer_bytes)
            + if i == 0 { cost.embed_bytes } else { 0 }
            + if i == n - 1 { cost.head_bytes } else { 0 }
            + cost.kv_budget_bytes
    };
    let total = cost.layers as u64 * cost.layer_bytes + (0..n).map(|i| stage_bytes(i, 0)).sum::<u64>();
    let available: u64 = memory.iter().sum();
    if available < total {
        return Err(PlanError::NotEnoughMemory { needed: total, available });
    }
    // The most layers each worker holds in its place.
    let cap: Vec<usize> = (0..n)
        .map(|i| {
            let room = memory[i].saturating_sub(stage_bytes(i, 0)) / cost.layer_bytes.max(1);
            usize::try_from(room).unwrap_or(usize::MAX).min(cost.layers)
        })
        .collect();
    if let Some(i) = (0..n).find(|&i| cap[i] == 0) {
        return Err(PlanError::NotEnoughMemory { needed: stage_bytes(i, 1), available: memory[i] });
    }
    if cap.iter().sum::<usize>() < cost.layers {
        return Err(PlanError::NotEnoughMemory { needed: total, available });
    }
    let counts = if cost.layer_macs > 0 {
        let speed = speeds(workers);
        capped_split(cost.layers, cost.layer_macs, &speed, |i| if i == n - 1 { cost.head_macs } else { 0 }, &cap)
    } else {
        let mem: Vec<f64> = memory.iter().map(|&m| m as f64).collect();
        capped_split(cost.layers, cost.layer_bytes, &mem, |i| stage_bytes(i, 0), &cap)
    };
    if let Some(i) = (0..n).find(|&i| stage_bytes(i, counts[i]) > memory[i]) {
        return Err(PlanError::NotEnoughMemory { needed: stage_bytes(i, counts[i]), available: memory[i] });
    }
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

/// [`split`], with worker `i` held to at most `cap[i]` layers: a worker whose
/// share is over its cap gets its cap, and the other workers split the rest
/// by the same rule. Needs `cap` to sum to at least `layers`, each at least 1.
fn capped_split(layers: usize, unit: u64, share: &[f64], extra: impl Fn(usize) -> u64, cap: &[usize]) -> Vec<usize> {
    let n = share.len();
    let mut fixed: Vec<Option<usize>> = vec![None; n];
    loop {
        let open: Vec<usize> = (0..n).filter(|&i| fixed[i].is_none()).collect();
        let mut taken: usize = fixed.iter().flatten().sum();
        // Every open worker needs a layer: take them back from the largest capped ones.
        while layers.saturating_sub(taken) < open.len() {
            let Some(i) = (0..n).filter(|&i| fixed[i].is_some_and(|c| c > 1)).max_by_key(|&i| fixed[i]) else {
                break;
            };
            fixed[i] = fixed[i].map(|c| c - 1);
            taken -= 1;
        }
        let sub = if open.is_empty() {
            Vec::new()
        } else {
            let shares: Vec<f64> = open.iter().map(|&i| share[i]).collect();
            split(layers - taken, unit, &shares, |k| extra(open[k]))
        };
        let over: Vec<usize> = open.iter().zip(&sub).filter(|&(&i, &c)| c > cap[i]).map(|(&i, _)| i).collect();
        if over.is_empty() {
            let mut counts: Vec<usize> = fixed.iter().map(|c| c.unwrap_or(0)).collect();
            open.iter().zip(&sub).for_each(|(&i, &c)| counts[i] = c);
            return counts;
        }
        over.iter().for_each(|&i| fixed[i] = Some(cap[i]));
    }
}

/// Each worker's relative speed: the inverse of its measured time per layer
/// when every worker has measured one (the start-up probe, published with
/// etcd membership), else its compute threads.
fn speeds(workers: &[&WorkerInfo]) -> Vec<f64> {
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
    use potluck_etcd::DeviceInfo;

    use super::*;

    fn worker(id: &str, mem: u64) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            address: format!("http://{id}"),
            device: "cpu".into(),
            threads: 1,
            free_memory_bytes: mem,
            device_info: DeviceInfo::default(),
            version: String::new(),
            joined: 0,
            layer_micros: None,
            instance: String::new(),
        }
    }

    /// A model with no KV budget: these cases are about weights and compute.
    fn cost(layers: usize, layer_bytes: u64, embed: u64, head: u64, layer_macs: u64, head_macs: u64) -> ModelCost {
        ModelCost {
            layers,
            layer_bytes,
            embed_bytes: embed,
            head_bytes: head,
            layer_macs,
            head_macs,
            kv_budget_bytes: 0,
        }
    }

    fn ranges(p: &[StagePlan]) -> Vec<(usize, usize)> {
        p.iter().map(|s| (s.start, s.end)).collect()
    }

    #[test]
    fn table() {
        let smol = cost(30, 1, 10, 0, 0, 0);
        // SmolLM2's shape: a block is 3.5 M multiply-adds, the lm_head 28 M (8 blocks' worth).
        let compute = cost(30, 2, 30, 30, 35, 283);
        type Case = (&'static str, ModelCost, Vec<u64>, Vec<(usize, usize)>);
        let cases: Vec<Case> = vec![
            ("one worker takes all", smol, vec![100], vec![(0, 30)]),
            ("equal memory: the embedding holder gets fewer layers", smol, vec![100, 100], vec![(0, 10), (10, 30)]),
            ("three equal", smol, vec![100, 100, 100], vec![(0, 4), (4, 17), (17, 30)]),
            ("a big worker takes more", smol, vec![100, 300], vec![(0, 1), (1, 30)]),
            ("compute: the lm_head's stage gets fewer layers", compute, vec![1000, 1000], vec![(0, 19), (19, 30)]),
            ("compute: three equal", compute, vec![1000, 1000, 1000], vec![(0, 13), (13, 26), (26, 30)]),
            // 60 bytes hold the embedding and 15 layers: the rest go to the other worker.
            ("compute does not fit: the small worker is filled", compute, vec![60, 1000], vec![(0, 15), (15, 30)]),
            ("a worker without room for a layer is left out", compute, vec![1, 1000], vec![(0, 30)]),
            ("more workers than layers", cost(2, 1, 0, 0, 0, 0), vec![9, 9, 9], vec![(0, 1), (1, 2)]),
        ];
        for (name, cost, mems, want) in cases {
            let ws: Vec<WorkerInfo> = mems.iter().enumerate().map(|(i, &m)| worker(&format!("w{i}"), m)).collect();
            let got = plan(cost, &ws).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(ranges(&got), want, "{name}");
        }
    }

    #[test]
    fn measured_speed_wins_over_threads() {
        let cost = cost(30, 2, 30, 30, 35, 283);
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
        let cost = cost(10, 10, 50, 50, 1, 1);
        assert_eq!(plan(cost, &[]), Err(PlanError::NoWorkers));
        assert!(matches!(plan(cost, &[worker("a", 100)]), Err(PlanError::NotEnoughMemory { needed: 200, .. })));
    }
}

#[cfg(test)]
mod device_memory_tests {
    use potluck_etcd::{DeviceInfo, DeviceKind};

    use super::*;

    const MIB: u64 = 1 << 20;

    /// SmolLM2-135M Q4_1's shape in MiB-sized units: 30 blocks of 3 MiB, a
    /// 30 MiB embedding and head, a 64 MiB KV budget per stage.
    const SMOL: ModelCost = ModelCost {
        layers: 30,
        layer_bytes: 3 * MIB,
        embed_bytes: 30 * MIB,
        head_bytes: 30 * MIB,
        layer_macs: 35,
        head_macs: 283,
        kv_budget_bytes: 64 * MIB,
    };

    /// A CUDA worker with `device` bytes of GPU memory free (and plenty of host RAM, which must not count).
    fn gpu(id: &str, device: u64, layer_micros: f64) -> WorkerInfo {
        WorkerInfo {
            device: "cuda:0".into(),
            device_info: DeviceInfo {
                kind: DeviceKind::Cuda,
                name: format!("{id}-gpu"),
                total_bytes: device,
                free_bytes: device,
            },
            layer_micros: Some(layer_micros),
            ..cpu(id, 1 << 40, layer_micros)
        }
    }

    fn cpu(id: &str, host: u64, layer_micros: f64) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            address: format!("http://{id}"),
            device: "cpu".into(),
            threads: 8,
            free_memory_bytes: host,
            device_info: DeviceInfo { kind: DeviceKind::Cpu, name: "cpu".into(), total_bytes: host, free_bytes: host },
            version: String::new(),
            joined: 0,
            layer_micros: Some(layer_micros),
            instance: String::new(),
        }
    }

    #[test]
    fn a_ten_times_faster_gpu_takes_layers_up_to_its_device_memory() {
        // The GPU (first: it also holds the 30 MiB embedding and the 64 MiB KV budget) probes 10× faster.
        type Case = (&'static str, u64, Vec<(usize, usize)>);
        let cases: Vec<Case> = vec![
            ("room for all: compute balance leaves the CPU one layer", 1 << 30, vec![(0, 29), (29, 30)]),
            ("room for 20 layers", (30 + 64 + 20 * 3) * MIB, vec![(0, 20), (20, 30)]),
            ("room for 20 layers and a bit", (30 + 64 + 20 * 3 + 2) * MIB, vec![(0, 20), (20, 30)]),
            ("room for 5 layers", (30 + 64 + 5 * 3) * MIB, vec![(0, 5), (5, 30)]),
            ("room for one layer", (30 + 64 + 3) * MIB, vec![(0, 1), (1, 30)]),
        ];
        for (name, device, want) in cases {
            let workers = [gpu("gpu", device, 10.0), cpu("cpu", 8 << 30, 100.0)];
            let got = plan(SMOL, &workers).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got.iter().map(|s| (s.start, s.end)).collect::<Vec<_>>(), want, "{name}");
            assert!(left_out(SMOL, &workers).is_empty(), "{name}");
        }
    }

    #[test]
    fn three_workers_the_fast_gpu_filled_the_rest_balanced() {
        let workers = [gpu("gpu", (30 + 64 + 10 * 3) * MIB, 10.0), cpu("a", 8 << 30, 100.0), cpu("b", 8 << 30, 100.0)];
        let got = plan(SMOL, &workers).expect("fits");
        // 10 on the GPU; the two equal CPUs split the other 20, the lm_head's stage taking fewer.
        assert_eq!(got.iter().map(|s| (s.start, s.end)).collect::<Vec<_>>(), vec![(0, 10), (10, 24), (24, 30)]);
    }

    #[test]
    fn a_gpu_too_small_for_any_layer_is_left_out_with_its_reason() {
        // 66 MiB: less than one 3 MiB layer plus the 64 MiB KV budget.
        let workers = [gpu("small", 66 * MIB, 1.0), cpu("a", 8 << 30, 100.0), cpu("b", 8 << 30, 100.0)];
        let got = plan(SMOL, &workers).expect("the CPUs carry the model");
        assert_eq!(got.iter().map(|s| s.worker.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);
        let out = left_out(SMOL, &workers);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].worker.as_str(), out[0].needed_bytes, out[0].available_bytes),
            ("small", 67 * MIB, 66 * MIB)
        );
        assert!(out[0].reason.contains("cuda device `small-gpu` has 66 MiB free"), "{}", out[0].reason);
        assert!(out[0].reason.contains("need 67 MiB"), "{}", out[0].reason);
        // Alone, it is an error that says what one layer needs.
        assert_eq!(
            plan(SMOL, &workers[..1]),
            Err(PlanError::NoWorkerHoldsALayer { needed: 67 * MIB, largest: 66 * MIB })
        );
    }

    #[test]
    fn a_gpu_stage_is_budgeted_by_device_memory_not_host_ram() {
        // Host RAM is 1 TiB, the GPU has room for the embedding, KV budget and 2 layers.
        let workers = [gpu("gpu", (30 + 64 + 2 * 3) * MIB, 1.0), cpu("cpu", 8 << 30, 10.0)];
        assert_eq!(workers[0].stage_memory_bytes(), (30 + 64 + 6) * MIB);
        let got = plan(SMOL, &workers).expect("fits");
        assert_eq!((got[0].start, got[0].end), (0, 2));
        // The KV budget counts: without it the same GPU holds 23 layers.
        let got = plan(ModelCost { kv_budget_bytes: 0, ..SMOL }, &workers).expect("fits");
        assert_eq!((got[0].start, got[0].end), (0, 23));
    }
}
