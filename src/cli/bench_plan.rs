//! `potluck bench plan`: how fast the planner plans a large pool, and how
//! good its plans are on seeded simulated mixed pools against the splits
//! other tools make (even, and in proportion to memory, both over every
//! worker in join order) and, on pools of up to six workers, against the
//! exhaustive optimum over orders, subsets and cuts. Quality is the cost
//! model's predicted decode throughput at saturation, one pipeline each.

use std::time::Instant;

use anyhow::{ensure, Context as _};
use potluck_coordinator::planner::{
    self, DeviceClass, Link, Links, ModelCost, PlanOptions, StagePlan, WorkerProfile, DEFAULT_EXPECTED_BATCH,
};
use serde_json::json;

use super::median;

/// Options of `potluck bench plan`.
#[derive(Debug, clap::Args)]
pub struct PlanBench {
    /// Workers in the pool planned for time.
    #[arg(long, default_value_t = 1000)]
    workers: usize,
    /// Layers of the model planned for time (llama3-70b's layer shape).
    #[arg(long, default_value_t = 80)]
    layers: usize,
    /// Timed plans of the large pool; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Simulated small pools (3 to 8 workers) for the quality figures.
    #[arg(long, default_value_t = 60)]
    pools: usize,
    /// Model of the quality pools: a named shape or a GGUF file.
    #[arg(long, default_value = "llama3-70b")]
    model: String,
    /// Seed of the simulated pools; the same seed gives the same pools.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// A small seeded generator (splitmix64): the same seed gives the same pools on every machine.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    #[allow(clippy::cast_precision_loss)]
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    #[allow(clippy::cast_possible_truncation)]
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Kinds of machine in a simulated pool: class, memory range in GiB, whether a GPU, and how common.
const MACHINES: &[(&str, f64, f64, bool, usize)] = &[
    ("cpu-laptop", 8.0, 16.0, false, 4),
    ("cpu-desktop", 16.0, 64.0, false, 3),
    ("cpu-server", 64.0, 256.0, false, 1),
    ("apple-m2", 8.0, 24.0, true, 2),
    ("apple-m2-max", 32.0, 96.0, true, 2),
    ("rtx-3060", 12.0, 12.0, true, 2),
    ("rtx-3090", 24.0, 24.0, true, 2),
    ("rtx-4090", 24.0, 24.0, true, 2),
    ("a100", 40.0, 80.0, true, 1),
];

/// A seeded mixed pool of `n` workers for `cost`'s model: machines drawn from
/// [`MACHINES`] with some memory already in use, most on a wired LAN, some on
/// Wi-Fi, a few across a WAN (or all on the LAN, when `wired`).
fn pool(rng: &mut Seeded, n: usize, cost: &ModelCost, wired: bool) -> (Vec<WorkerProfile>, Links) {
    let weight: usize = MACHINES.iter().map(|m| m.4).sum();
    let mut links = Links::new(Link { rtt_secs: 3e-4, bytes_per_sec: 1.25e9 });
    let workers = (0..n)
        .map(|i| {
            let mut pick = rng.below(weight);
            let m = MACHINES
                .iter()
                .find(|m| {
                    let hit = pick < m.4;
                    pick = pick.saturating_sub(m.4);
                    hit
                })
                .unwrap_or(&MACHINES[0]);
            let class = DeviceClass::named(m.0).unwrap_or(planner::DEVICE_CLASSES[0]);
            let total = rng.range(m.1, m.2 + f64::EPSILON);
            let free = total * rng.range(0.6, 0.95);
            let id = format!("w{i}-{}", m.0);
            let where_ = if wired { 0.0 } else { rng.range(0.0, 1.0) };
            if where_ > 0.9 {
                links.attach(&id, Link { rtt_secs: rng.range(0.02, 0.06), bytes_per_sec: rng.range(2.5e6, 12.5e6) });
            } else if where_ > 0.7 {
                links.attach(&id, Link { rtt_secs: rng.range(0.003, 0.01), bytes_per_sec: rng.range(6e6, 4e7) });
            }
            WorkerProfile {
                id,
                address: String::new(),
                memory_bytes: gib(free),
                memory_label: if m.3 { "device memory".into() } else { "host memory".into() },
                layer_time: Some(class.layer_time(cost)),
                threads: 1,
            }
        })
        .collect();
    (workers, links)
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn gib(x: f64) -> u64 {
    (x * f64::from(1u32 << 30)) as u64
}

/// Layer counts in proportion to `weight`, each within `cap` (water-filling
/// the excess onto the others), summing to `layers`; `None` when the caps cannot.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
fn proportional(weight: &[f64], cap: &[usize], layers: usize) -> Option<Vec<usize>> {
    if cap.iter().sum::<usize>() < layers {
        return None;
    }
    let n = weight.len();
    let mut fixed: Vec<Option<usize>> = vec![None; n];
    loop {
        let left = layers - fixed.iter().flatten().sum::<usize>();
        let open: Vec<usize> = (0..n).filter(|&i| fixed[i].is_none()).collect();
        let total: f64 = open.iter().map(|&i| weight[i]).sum::<f64>().max(f64::MIN_POSITIVE);
        let ideal: Vec<f64> =
            (0..n).map(|i| if fixed[i].is_none() { left as f64 * weight[i] / total } else { 0.0 }).collect();
        let over: Vec<usize> = open.iter().copied().filter(|&i| ideal[i] > cap[i] as f64).collect();
        if over.is_empty() {
            let mut counts: Vec<usize> = (0..n).map(|i| fixed[i].unwrap_or(ideal[i].floor() as usize)).collect();
            while counts.iter().sum::<usize>() < layers {
                let i = open
                    .iter()
                    .copied()
                    .filter(|&i| counts[i] < cap[i])
                    .max_by(|&a, &b| (ideal[a] - counts[a] as f64).total_cmp(&(ideal[b] - counts[b] as f64)))?;
                counts[i] += 1;
            }
            return Some(counts);
        }
        over.iter().for_each(|&i| fixed[i] = Some(cap[i]));
    }
}

/// The stages of a baseline split: each usable worker in pool order with its count (empty counts dropped).
fn baseline(
    cost: &ModelCost,
    workers: &[WorkerProfile],
    weight: impl Fn(&WorkerProfile) -> f64,
) -> Option<Vec<StagePlan>> {
    let usable: Vec<&WorkerProfile> = workers.iter().filter(|w| w.memory_bytes >= cost.one_layer_bytes()).collect();
    let n = usable.len();
    let cap: Vec<usize> = (0..n).map(|i| cost.capacity(usable[i].memory_bytes, i == 0, i == n - 1)).collect();
    let weights: Vec<f64> = usable.iter().map(|w| weight(w)).collect();
    let counts = proportional(&weights, &cap, cost.layers)?;
    let mut start = 0;
    let stages = usable
        .iter()
        .zip(counts)
        .filter(|(_, c)| *c > 0)
        .map(|(w, c)| {
            start += c;
            StagePlan { worker: w.id.clone(), address: String::new(), start: start - c, end: start }
        })
        .collect();
    Some(stages)
}

impl PlanBench {
    /// Runs the benchmark and prints its report.
    #[allow(clippy::cast_precision_loss)]
    pub fn run(self) -> anyhow::Result<()> {
        ensure!(
            self.workers >= 1 && self.layers >= 1 && self.runs >= 1,
            "--workers, --layers and --runs must be at least 1"
        );
        let mut rng = Seeded(self.seed);
        // Scale: one large pool, planned `runs` times.
        let big_model = ModelCost { layers: self.layers, ..crate::cli::plan::model_cost("llama3-70b", 1 << 30)? };
        let (workers, links) = pool(&mut rng, self.workers, &big_model, false);
        let options = PlanOptions { links, ..PlanOptions::default() };
        let mut times = Vec::with_capacity(self.runs);
        let mut placement = None;
        for _ in 0..self.runs {
            let started = Instant::now();
            placement = Some(planner::place(&big_model, &workers, &options).context("planning the large pool")?);
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        let big = placement.context("no run")?;
        let used: usize = big.pipelines.iter().map(|p| p.stages.len()).sum();

        // Quality: seeded small pools that hold the model, one pipeline each.
        let cost = crate::cli::plan::model_cost(&self.model, 1 << 30)?;
        let mixed = quality(&mut rng, &cost, self.pools, false);
        let wired = quality(&mut rng, &cost, self.pools, true);
        let report = json!({
            "scale": {
                "workers": self.workers, "layers": self.layers, "runs": self.runs,
                "median_ms": median(times.clone()), "max_ms": times.iter().copied().fold(0.0, f64::max),
                "pipelines": big.pipelines.len(), "workers_used": used, "left_out": big.left_out.len(),
                "predicted_tok_s_saturated": big.tokens_per_sec_saturated(),
                "predicted_tok_s_one_stream": big.tokens_per_sec_one_stream(),
            },
            "quality": { "model": self.model, "seed": self.seed, "mixed_links": mixed, "wired": wired },
        });
        if self.json {
            println!("{report}");
        } else {
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Ok(())
    }
}

/// Plan quality on `pools` seeded pools of 3 to 8 workers: our single
/// pipeline's predicted throughput over the even and memory-proportional
/// splits', and over the exhaustive optimum's on pools of up to 6.
fn quality(rng: &mut Seeded, cost: &ModelCost, pools: usize, wired: bool) -> serde_json::Value {
    let (mut vs_even, mut vs_memory, mut vs_best, mut plan_ms) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut tried = 0;
    while vs_even.len() < pools && tried < pools * 20 {
        tried += 1;
        let n = 3 + rng.below(6);
        let (workers, links) = pool(rng, n, cost, wired);
        let options = PlanOptions { batch: DEFAULT_EXPECTED_BATCH, max_replicas: 1, links };
        let started = Instant::now();
        let Ok(ours) = planner::place(cost, &workers, &options) else { continue };
        plan_ms.push(started.elapsed().as_secs_f64() * 1e3);
        let rate = |p: &planner::Pipeline| p.tokens_per_sec_saturated(options.batch);
        let score = |stages: Option<Vec<StagePlan>>| {
            stages.and_then(|s| planner::predict(cost, &s, &workers, &options)).map(|p| rate(&p))
        };
        let even = score(baseline(cost, &workers, |_| 1.0));
        #[allow(clippy::cast_precision_loss)]
        let memory = score(baseline(cost, &workers, |w| w.memory_bytes as f64));
        let (Some(even), Some(memory)) = (even, memory) else { continue };
        let ours = rate(ours.best());
        vs_even.push(ours / even);
        vs_memory.push(ours / memory);
        if n <= 6 {
            if let Some(best) = planner::exhaustive(cost, &workers, &options) {
                vs_best.push(ours / rate(&best));
            }
        }
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    json!({
        "pools": vs_even.len(),
        "median_vs_even": median(vs_even.clone()), "min_vs_even": min(&vs_even),
        "median_vs_memory": median(vs_memory.clone()), "min_vs_memory": min(&vs_memory),
        "pools_up_to_6": vs_best.len(),
        "within_2pct_of_exhaustive": vs_best.iter().filter(|&&r| r >= 0.98).count(),
        "worst_vs_exhaustive": if vs_best.is_empty() { None } else { Some(min(&vs_best)) },
        "median_plan_ms": median(plan_ms),
    })
}
