//! `potluck bench …`: benchmarks anyone can rerun. Figures are medians over
//! several runs; compare ratios measured side by side, not absolute times.

use std::time::Instant;

use anyhow::Context as _;
use potluck_engine::{LocalPipeline, ModelFile, Row, SessionId, Stage, WireDtype};

#[path = "bench_bandwidth.rs"]
mod bench_bandwidth;
#[path = "bench_pipeline.rs"]
mod bench_pipeline;
#[path = "bench_plan.rs"]
mod bench_plan;
#[path = "bench_serve.rs"]
mod bench_serve;
#[path = "bench_synth.rs"]
mod bench_synth;

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Read bandwidth of one thread from memory: the bound of batch-1 decode.
    Bandwidth(bench_bandwidth::BandwidthBench),
    /// Prompt and decode throughput of the engine in this process.
    Engine(EngineBench),
    /// Weight bytes and peak RSS of a process holding one layer range.
    Memory(MemoryBench),
    /// Planning time on a large pool, and plan quality on seeded simulated pools against other splits.
    Plan(bench_plan::PlanBench),
    /// Single-stream decode of 1..N-worker loopback clusters and the cost per hop.
    Pipeline(bench_pipeline::PipelineBench),
    /// Aggregate decode, time to first token and inter-token latency under concurrent streams.
    Serve(bench_serve::ServeBench),
    /// Write a random-weight GGUF with a real model's shape (llama2-7b, …) for benchmarks at full size.
    ///
    /// The file has the shape's layers, widths and heads, and the per-tensor
    /// type mix llama-quantize gives the file type. The tokenizer (and so the
    /// vocabulary) is copied from --tokenizer-from, not the named model's. The
    /// weights are random, with a spread that keeps logits finite and varied.
    Synth(bench_synth::SynthBench),
}

#[derive(Debug, clap::Args)]
pub struct EngineBench {
    /// Model file.
    #[arg(long)]
    model: std::path::PathBuf,
    /// Compute threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Device: `cpu` (native kernels), `candle-cpu`, `cuda[:N]` or `metal`.
    #[arg(long, default_value = "cpu")]
    device: potluck_engine::Device,
    /// Runs per figure; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Prompt length for the prefill figure.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens per decode run.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Decode batch sizes to measure, comma-separated (each 1..=256). A
    /// pipeline's micro-batches are a share of the streams, so
    /// `--batches 8` shows what one stage sees under 16 streams.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16", value_parser = clap::value_parser!(u16).range(1..=256))]
    batches: Vec<u16>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct MemoryBench {
    /// Model file.
    #[arg(long)]
    model: std::path::PathBuf,
    /// Layer range `START..END` (default: all layers).
    #[arg(long)]
    layers: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

impl Bench {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Bandwidth(b) => b.run(),
            Self::Engine(b) => b.run(),
            Self::Memory(b) => b.run(),
            Self::Pipeline(b) => b.run(),
            Self::Plan(b) => b.run(),
            Self::Serve(b) => b.run(),
            Self::Synth(b) => b.run(),
        }
    }
}

/// Peak resident set size of this process, from the kernel's high-water mark.
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Prints a benchmark's report: one JSON line for scripts, or indented for people.
fn print_report(report: &serde_json::Value, one_line: bool) -> anyhow::Result<()> {
    if one_line {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(report)?);
    }
    Ok(())
}

/// Seconds this process's threads have spent on a CPU (the sum over
/// `/proc/self/task/*/schedstat`, nanosecond resolution; 0 where that is
/// unavailable). On a shared host a process waits for a core while others
/// run; tokens per on-CPU second show the engine's own speed despite that.
pub fn cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    let ns: u64 = tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ns as f64 / 1e9
}

/// Wall-clock and on-CPU rates of one timed run.
pub(super) struct Rate {
    /// Items per wall-clock second.
    pub wall: f64,
    /// Items per on-CPU second.
    pub cpu: f64,
}

impl Rate {
    /// Times `f`, which processes `items`.
    fn measure(items: usize, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Self> {
        let (t, c) = (Instant::now(), cpu_seconds());
        f()?;
        let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
        let items = items as f64;
        Ok(Self { wall: items / wall, cpu: if cpu > 0.0 { items / cpu } else { 0.0 } })
    }
}

/// Medians of the wall-clock and on-CPU rates of several runs.
fn medians(v: &[Rate]) -> (f64, f64) {
    (median(v.iter().map(|r| r.wall).collect()), median(v.iter().map(|r| r.cpu).collect()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Decodes `tokens` steps of `sessions` (all fresh) as one batch after a
/// short shared-length prompt each, so decode attends over a realistic
/// cache; the sessions are released after.
pub(super) fn decode_rate(
    pipe: &mut LocalPipeline,
    sessions: &[SessionId],
    tokens: usize,
    vocab: usize,
) -> anyhow::Result<Rate> {
    let batch = sessions.len();
    for (b, &s) in sessions.iter().enumerate() {
        let ids: Vec<u32> = (0..16).map(|i| token(i + b, vocab)).collect();
        pipe.prefill(s, &ids, 16)?;
    }
    let rate = Rate::measure(batch * tokens, || {
        for step in 0..tokens {
            let rows: Vec<Row> =
                sessions.iter().map(|&s| Row { session: s, position: 16 + step, logits: true }).collect();
            let ids: Vec<u32> = (0..batch).map(|b| token(step * 31 + b, vocab)).collect();
            let logits = pipe.forward(&rows, &ids)?;
            pipe.recycle(logits);
        }
        Ok(())
    });
    for &s in sessions {
        pipe.release(s);
    }
    rate
}

/// Deterministic pseudo-text token ids (the figure does not depend on content).
fn token(i: usize, vocab: usize) -> u32 {
    u32::try_from((i * 7919 + 13) % vocab.max(1)).unwrap_or(0)
}

impl EngineBench {
    #[allow(clippy::cast_precision_loss)]
    fn run(self) -> anyhow::Result<()> {
        let file = ModelFile::open(&self.model).with_context(|| format!("loading {}", self.model.display()))?;
        let layers = file.config().layers;
        let vocab = file.config().vocab;
        let mut pipe =
            LocalPipeline::load_on(&file, &[0, layers], &[self.device], WireDtype::F32, 4 << 30, self.threads)?;
        let runs = self.runs.max(1);
        let mut session = 0u64;
        let mut next_session = || {
            session += 1;
            SessionId(session)
        };

        let mut prompt = Vec::new();
        for _ in 0..runs {
            let s = next_session();
            let ids: Vec<u32> = (0..self.prompt_tokens).map(|i| token(i, vocab)).collect();
            prompt.push(Rate::measure(self.prompt_tokens, || Ok(pipe.prefill(s, &ids, 512).map(drop)?))?);
            pipe.release(s);
            eprintln!("[bench] prompt run: {:.1} tok/s", prompt.last().map_or(0.0, |r| r.wall));
        }

        let mut decode = |batch: usize, pipe: &mut LocalPipeline| -> anyhow::Result<(f64, f64)> {
            let mut rates = Vec::new();
            for _ in 0..runs {
                let sessions: Vec<SessionId> = (0..batch).map(|_| next_session()).collect();
                rates.push(decode_rate(pipe, &sessions, self.decode_tokens, vocab)?);
                eprintln!("[bench] decode batch {batch}: {:.1} tok/s", rates.last().map_or(0.0, |r| r.wall));
            }
            Ok(medians(&rates))
        };
        // Each size once, smallest first.
        let batches: std::collections::BTreeSet<usize> = self.batches.iter().map(|&b| usize::from(b)).collect();
        let mut report = serde_json::Map::new();
        report.insert("model".into(), self.model.display().to_string().into());
        report.insert("device".into(), self.device.to_string().into());
        report.insert("threads".into(), pipe.threads().into());
        report.insert("runs".into(), runs.into());
        let prompt = medians(&prompt);
        report.insert("prompt_tok_s".into(), prompt.0.into());
        // Tokens per second of on-CPU time (all threads): the engine's
        // speed while it holds its cores, whatever else loads the host.
        report.insert("prompt_tok_per_cpu_s".into(), prompt.1.into());
        let mut wall = std::collections::BTreeMap::new();
        for batch in batches {
            let (w, cpu) = decode(batch, &mut pipe)?;
            let name = if batch == 1 { "decode".to_owned() } else { format!("decode_batch{batch}") };
            report.insert(format!("{name}_tok_s"), w.into());
            report.insert(format!("{name}_tok_per_cpu_s"), cpu.into());
            wall.insert(batch, w);
        }
        if let (Some(one), Some(sixteen)) = (wall.get(&1), wall.get(&16)) {
            report.insert("batch16_over_batch1".into(), (sixteen / one).into());
        }
        report.insert("peak_rss_mb".into(), peak_rss_mb().into());
        let report = serde_json::Value::Object(report);
        if self.json {
            println!("{report}");
        } else {
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Ok(())
    }
}

impl MemoryBench {
    #[allow(clippy::cast_precision_loss)]
    fn run(self) -> anyhow::Result<()> {
        let file = ModelFile::open(&self.model).with_context(|| format!("loading {}", self.model.display()))?;
        let layers = file.config().layers;
        let range = match &self.layers {
            None => 0..layers,
            Some(spec) => {
                let (a, b) = spec.split_once("..").context("--layers wants START..END, e.g. 10..20")?;
                a.trim().parse::<usize>().context("--layers start")?
                    ..b.trim().parse::<usize>().context("--layers end")?
            }
        };
        let stage = Stage::load(&file, range.clone())?;
        let report = serde_json::json!({
            "layers": [range.start, range.end],
            "first": stage.is_first(),
            "last": stage.is_last(),
            "weight_mb": stage.weight_bytes() as f64 / (1u64 << 20) as f64,
            "peak_rss_mb": peak_rss_mb(),
        });
        if self.json {
            println!("{report}");
        } else {
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Ok(())
    }
}
