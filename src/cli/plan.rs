//! `potluck plan`: what the planner would do with a pool described in a
//! file, before any machine is started. The pool file (YAML; JSON is YAML
//! too) lists the workers with their memory and per-layer times, or a device
//! class the times are priced from, and the links between them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context as _};
use potluck_coordinator::planner::{
    self, DeviceClass, LayerTime, Link, Links, ModelCost, ModelShape, Placement, PlanOptions, WorkerProfile,
    DEFAULT_EXPECTED_BATCH, DEVICE_CLASSES,
};
use serde::Deserialize;

/// Options of `potluck plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A GGUF file, or a named shape: smollm2-135m, llama2-7b, llama3-8b, llama3-70b.
    #[arg(long)]
    model: String,
    /// The pool file (YAML or JSON; see docs/operations.md).
    #[arg(long)]
    pool: PathBuf,
    /// KV cache budget each stage keeps, in MiB.
    #[arg(long, default_value_t = 1024)]
    kv_budget_mib: u64,
    /// Rows per micro-batch each stage is priced at.
    #[arg(long, default_value_t = DEFAULT_EXPECTED_BATCH)]
    batch: f64,
    /// The most pipelines (replicas) to form.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_replicas: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// The pool file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    /// The link between workers no `links` entry names (default: free).
    #[serde(default)]
    default_link: Option<LinkSpec>,
    /// The workers.
    workers: Vec<WorkerSpec>,
    /// Links between pairs of workers, both ways.
    #[serde(default)]
    links: Vec<PairSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerSpec {
    id: String,
    #[serde(default)]
    address: String,
    /// `cpu`, `cuda` or `metal`: which memory `memory_gib` is.
    #[serde(default = "cpu")]
    device: String,
    memory_gib: f64,
    #[serde(default)]
    class: Option<String>,
    #[serde(default)]
    layer_ms: Option<f64>,
    #[serde(default)]
    batch_layer_ms: Option<BatchTime>,
    #[serde(default = "one_thread")]
    threads: u32,
    /// Its own access link (Wi-Fi, a WAN): every pair with it is at most as good.
    #[serde(default)]
    link: Option<LinkSpec>,
}

fn cpu() -> String {
    "cpu".into()
}

fn one_thread() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchTime {
    batch: u32,
    ms: f64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkSpec {
    rtt_ms: f64,
    mbit_per_s: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PairSpec {
    between: [String; 2],
    rtt_ms: f64,
    mbit_per_s: f64,
}

impl LinkSpec {
    fn link(self, what: &str) -> anyhow::Result<Link> {
        ensure!(self.rtt_ms.is_finite() && self.rtt_ms >= 0.0, "{what}: rtt_ms {} is not a time", self.rtt_ms);
        ensure!(self.mbit_per_s > 0.0, "{what}: mbit_per_s {} is not a positive rate", self.mbit_per_s);
        Ok(Link { rtt_secs: self.rtt_ms / 1e3, bytes_per_sec: self.mbit_per_s * 1e6 / 8.0 })
    }
}

/// Named model shapes, for planning a model without its file.
const SHAPES: &[(&str, ModelShape)] = &[
    (
        "smollm2-135m",
        ModelShape { layers: 30, hidden: 576, ffn: 1536, kv_width: 192, vocab: 49_152, bits_per_weight: 5.0 },
    ),
    (
        "llama2-7b",
        ModelShape { layers: 32, hidden: 4096, ffn: 11_008, kv_width: 4096, vocab: 32_000, bits_per_weight: 4.85 },
    ),
    (
        "llama3-8b",
        ModelShape { layers: 32, hidden: 4096, ffn: 14_336, kv_width: 1024, vocab: 128_256, bits_per_weight: 4.85 },
    ),
    (
        "llama3-70b",
        ModelShape { layers: 80, hidden: 8192, ffn: 28_672, kv_width: 1024, vocab: 128_256, bits_per_weight: 4.85 },
    ),
];

/// The cost of `model`: a named shape, else a GGUF file.
pub fn model_cost(model: &str, kv_budget_bytes: u64) -> anyhow::Result<ModelCost> {
    if let Some((_, shape)) = SHAPES.iter().find(|(name, _)| *name == model) {
        return Ok(ModelCost::of_shape(*shape, kv_budget_bytes));
    }
    let path = Path::new(model);
    if !path.exists() {
        let names: Vec<&str> = SHAPES.iter().map(|(n, _)| *n).collect();
        bail!("--model {model}: no such file, nor a known shape ({})", names.join(", "));
    }
    let file = potluck_engine::ModelFile::open(path).with_context(|| format!("loading {model}"))?;
    let cost = ModelCost::of_file(path, file.config()).with_context(|| format!("pricing {model}"))?;
    Ok(ModelCost { kv_budget_bytes, ..cost })
}

impl PoolFile {
    /// Reads and parses the pool file at `path`.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("pool file {}", path.display()))
    }

    fn parse(text: &str) -> anyhow::Result<Self> {
        let pool: Self = serde_yaml::from_str(text).context("malformed pool file")?;
        ensure!(!pool.workers.is_empty(), "the pool lists no workers");
        Ok(pool)
    }

    /// The workers as the planner sees them, and the link table; refuses what
    /// cannot mean anything (duplicate ids, unknown classes, links to nobody).
    /// Figures that are merely nonsense (no memory, a negative time) pass, so
    /// the planner leaves that worker out with its reason.
    pub fn profiles(&self, cost: &ModelCost) -> anyhow::Result<(Vec<WorkerProfile>, Links)> {
        let mut seen = BTreeSet::new();
        let mut profiles = Vec::with_capacity(self.workers.len());
        for w in &self.workers {
            ensure!(seen.insert(w.id.as_str()), "worker `{}` is listed twice", w.id);
            let kind: potluck_etcd::DeviceKind = w.device.parse().with_context(|| format!("worker `{}`", w.id))?;
            let layer_time = match (&w.class, w.layer_ms) {
                (Some(_), Some(_)) => bail!("worker `{}`: give layer_ms or class, not both", w.id),
                (None, None) => bail!("worker `{}`: give its time per layer (layer_ms) or a device class", w.id),
                (Some(class), None) => match DeviceClass::named(class) {
                    Some(c) => c.layer_time(cost),
                    None => {
                        let known: Vec<&str> = DEVICE_CLASSES.iter().map(|c| c.name).collect();
                        bail!("worker `{}`: unknown device class `{class}` (known: {})", w.id, known.join(", "))
                    }
                },
                (None, Some(ms)) => LayerTime {
                    batch1_secs: ms / 1e3,
                    at_batch: w.batch_layer_ms.as_ref().map(|b| (b.batch, b.ms / 1e3)),
                },
            };
            profiles.push(WorkerProfile {
                id: w.id.clone(),
                address: w.address.clone(),
                memory_bytes: gib_to_bytes(w.memory_gib),
                memory_label: if kind.is_gpu() {
                    format!("{} device memory", kind.name())
                } else {
                    "host memory".into()
                },
                layer_time: Some(layer_time),
                threads: w.threads,
            });
        }
        let default = match self.default_link {
            Some(l) => l.link("default_link")?,
            None => Link::FREE,
        };
        let mut links = Links::new(default);
        for w in &self.workers {
            if let Some(l) = w.link {
                links.attach(&w.id, l.link(&format!("worker `{}`'s link", w.id))?);
            }
        }
        for p in &self.links {
            let [a, b] = &p.between;
            let what = format!("link {a}–{b}");
            for id in [a, b] {
                ensure!(seen.contains(id.as_str()), "{what}: no worker `{id}` in the pool");
            }
            ensure!(a != b, "{what}: a link joins two different workers");
            links.insert(a, b, LinkSpec { rtt_ms: p.rtt_ms, mbit_per_s: p.mbit_per_s }.link(&what)?);
        }
        Ok((profiles, links))
    }
}

/// Bytes in `gib` GiB; nothing for a figure that is not a positive number.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn gib_to_bytes(gib: f64) -> u64 {
    if gib.is_finite() && gib > 0.0 {
        (gib * f64::from(1u32 << 30)).min(u64::MAX as f64) as u64
    } else {
        0
    }
}

/// Runs `potluck plan`.
pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(args.batch.is_finite() && args.batch >= 1.0, "--batch {} must be at least 1", args.batch);
    let cost = model_cost(&args.model, args.kv_budget_mib << 20)?;
    let pool = PoolFile::read(&args.pool)?;
    let (profiles, links) = pool.profiles(&cost)?;
    let options = PlanOptions {
        batch: args.batch,
        max_replicas: usize::try_from(args.max_replicas).unwrap_or(usize::MAX),
        links,
    };
    let placement = planner::place(&cost, &profiles, &options).context("no plan")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report(&placement))?);
    } else {
        print!("{}", table(&args.model, &cost, &placement));
    }
    Ok(())
}

/// The JSON report: the placement with its totals.
pub fn report(p: &Placement) -> serde_json::Value {
    serde_json::json!({
        "pipelines": p.pipelines,
        "left_out": p.left_out,
        "batch": p.batch,
        "tokens_per_sec_one_stream": p.tokens_per_sec_one_stream(),
        "tokens_per_sec_saturated": p.tokens_per_sec_saturated(),
    })
}

/// The report for people.
#[allow(clippy::cast_precision_loss)]
fn table(model: &str, cost: &ModelCost, p: &Placement) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{model}: {} layers of {:.1} MiB, KV budget {} MiB a stage; micro-batches of {} rows",
        cost.layers,
        cost.layer_bytes as f64 / f64::from(1u32 << 20),
        cost.kv_budget_bytes >> 20,
        p.batch
    );
    for (i, pipe) in p.pipelines.iter().enumerate() {
        let _ = writeln!(
            out,
            "pipeline {}: {:.1} tok/s saturated, {:.1} tok/s one stream",
            i + 1,
            pipe.tokens_per_sec_saturated(p.batch),
            pipe.tokens_per_sec_one_stream()
        );
        for (s, secs) in pipe.stages.iter().zip(&pipe.stage_secs) {
            let _ = writeln!(
                out,
                "  {:<20} layers {:>3}..{:<3} ({:>3})  {:>9.3} ms a micro-batch",
                s.worker,
                s.start,
                s.end,
                s.end - s.start,
                secs * 1e3
            );
        }
    }
    if !p.left_out.is_empty() {
        let _ = writeln!(out, "left out:");
        for l in &p.left_out {
            let _ = writeln!(out, "  {:<20} {}", l.worker, l.reason);
        }
    }
    let _ = writeln!(
        out,
        "predicted decode: {:.1} tok/s for one stream, {:.1} tok/s at saturation over {} pipeline(s)",
        p.tokens_per_sec_one_stream(),
        p.tokens_per_sec_saturated(),
        p.pipelines.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use potluck_coordinator::planner::{LeftOutCause, PlanError};

    use super::*;

    const POOL: &str = r"
default_link: { rtt_ms: 0.5, mbit_per_s: 1000 }
workers:
  - { id: gpu, device: cuda, memory_gib: 24, class: rtx-4090 }
  - { id: mac, device: metal, memory_gib: 48, layer_ms: 1.1, batch_layer_ms: { batch: 16, ms: 2.0 } }
  - { id: laptop, memory_gib: 16, class: cpu-laptop, link: { rtt_ms: 5, mbit_per_s: 100 } }
  - { id: broken, memory_gib: 0, layer_ms: 1.0 }
  - { id: liar, memory_gib: 8, layer_ms: -3 }
links:
  - { between: [laptop, gpu], rtt_ms: 8, mbit_per_s: 80 }
";

    fn plan_text(text: &str, model: &str) -> anyhow::Result<Placement> {
        let cost = model_cost(model, 512 << 20)?;
        let (profiles, links) = PoolFile::parse(text)?.profiles(&cost)?;
        Ok(planner::place(&cost, &profiles, &PlanOptions { links, ..PlanOptions::default() })?)
    }

    #[test]
    fn a_pool_file_plans_and_leaves_out_nonsense_with_reasons() {
        let p = plan_text(POOL, "llama3-70b").expect("plans");
        let out: Vec<(&str, LeftOutCause)> = p.left_out.iter().map(|l| (l.worker.as_str(), l.cause)).collect();
        assert!(out.contains(&("broken", LeftOutCause::Invalid)), "{out:?}");
        assert!(out.contains(&("liar", LeftOutCause::Invalid)), "{out:?}");
        assert!(p.tokens_per_sec_saturated() > 0.0 && p.tokens_per_sec_one_stream() > 0.0);
        let text = table("llama3-70b", &model_cost("llama3-70b", 0).expect("shape"), &p);
        assert!(text.contains("pipeline 1:") && text.contains("left out:"), "{text}");
        let json = report(&p);
        assert!(json["pipelines"][0]["stages"][0]["worker"].is_string(), "{json}");
    }

    #[test]
    fn json_is_a_pool_file_too() {
        let json = r#"{"workers": [{"id": "a", "memory_gib": 64, "layer_ms": 2}, {"id": "b", "memory_gib": 64, "layer_ms": 2}]}"#;
        let p = plan_text(json, "llama3-8b").expect("plans");
        assert_eq!(p.pipelines.iter().map(|x| x.stages.len()).sum::<usize>(), 2);
    }

    #[test]
    fn bad_pool_files_are_clear_errors() {
        let err = |text: &str| plan_text(text, "llama3-8b").map(|_| ()).map_err(|e| format!("{e:#}")).unwrap_err();
        type Case = (&'static str, &'static str, &'static str);
        let cases: [Case; 9] = [
            ("not YAML", "workers: [ {id: a", "malformed pool file"),
            ("no workers", "workers: []", "lists no workers"),
            ("unknown field", "workers: [{id: a, memory_gib: 8, layer_ms: 1, speed: 9}]", "unknown field `speed`"),
            ("twice", "workers: [{id: a, memory_gib: 8, layer_ms: 1}, {id: a, memory_gib: 8, layer_ms: 1}]", "listed twice"),
            ("no time", "workers: [{id: a, memory_gib: 8}]", "give its time per layer"),
            ("bad class", "workers: [{id: a, memory_gib: 8, class: abacus}]", "unknown device class `abacus`"),
            ("bad device", "workers: [{id: a, device: tpu, memory_gib: 8, layer_ms: 1}]", "unknown device kind `tpu`"),
            (
                "link to nobody",
                "workers: [{id: a, memory_gib: 8, layer_ms: 1}]\nlinks: [{between: [a, z], rtt_ms: 1, mbit_per_s: 9}]",
                "no worker `z`",
            ),
            (
                "negative bandwidth",
                "workers: [{id: a, memory_gib: 8, layer_ms: 1}, {id: b, memory_gib: 8, layer_ms: 1}]\nlinks: [{between: [a, b], rtt_ms: 1, mbit_per_s: -9}]",
                "not a positive rate",
            ),
        ];
        for (name, text, needle) in cases {
            let e = err(text);
            assert!(e.contains(needle), "{name}: {e}");
        }
    }

    #[test]
    fn a_pool_that_cannot_hold_the_model_names_the_shortfall() {
        let e = plan_text(
            "workers: [{id: a, memory_gib: 2, layer_ms: 1}, {id: b, memory_gib: 1, layer_ms: 1}]",
            "llama3-8b",
        )
        .expect_err("too small");
        let plan_error = e.downcast_ref::<PlanError>().expect("a plan error");
        assert!(matches!(plan_error, PlanError::NotEnoughMemory { .. }), "{plan_error}");
        assert!(e.to_string().contains("cannot hold the model"), "{e}");
        let e = plan_text("workers: [{id: a, memory_gib: -4, layer_ms: 1}]", "llama3-8b").expect_err("nothing usable");
        assert!(e.to_string().contains("reports no free memory"), "{e}");
        assert!(model_cost("no-such-model", 0).is_err());
    }
}
