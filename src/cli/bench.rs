//! `potluck bench …`: benchmarks anyone can rerun. Figures are medians over
//! several runs; compare ratios measured side by side, not absolute times.

use std::time::Instant;

use anyhow::Context as _;
use potluck_engine::{LocalPipeline, ModelFile, Row, SessionId, Stage, WireDtype};

#[path = "bench_pipeline.rs"]
mod bench_pipeline;
#[path = "bench_serve.rs"]
mod bench_serve;

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Prompt and decode throughput of the engine in this process.
    Engine(EngineBench),
    /// Weight bytes and peak RSS of a process holding one layer range.
    Memory(MemoryBench),
    /// Single-stream decode of 1..N-worker loopback clusters and the cost per hop.
    Pipeline(bench_pipeline::PipelineBench),
    /// Aggregate decode, time to first token and inter-token latency under concurrent streams.
    Serve(bench_serve::ServeBench),
}

#[derive(Debug, clap::Args)]
pub struct EngineBench {
    /// Model file.
    #[arg(long)]
    model: std::path::PathBuf,
    /// Compute threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Runs per figure; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Prompt length for the prefill figure.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens per decode run.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
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
            Self::Engine(b) => b.run(),
            Self::Memory(b) => b.run(),
            Self::Pipeline(b) => b.run(),
            Self::Serve(b) => b.run(),
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
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
        let mut pipe = LocalPipeline::load(&file, &[0, layers], WireDtype::F32, 4 << 30, self.threads)?;
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
            let t = Instant::now();
            pipe.prefill(s, &ids, 512)?;
            prompt.push(self.prompt_tokens as f64 / t.elapsed().as_secs_f64());
            pipe.release(s);
            eprintln!("[bench] prompt run: {:.1} tok/s", prompt.last().copied().unwrap_or(0.0));
        }

        let mut decode = |batch: usize, pipe: &mut LocalPipeline| -> anyhow::Result<f64> {
            let mut rates = Vec::new();
            for _ in 0..runs {
                let sessions: Vec<SessionId> = (0..batch).map(|_| next_session()).collect();
                // A short shared-length prompt, so decode attends over a realistic cache.
                for (b, &s) in sessions.iter().enumerate() {
                    let ids: Vec<u32> = (0..16).map(|i| token(i + b, vocab)).collect();
                    pipe.prefill(s, &ids, 16)?;
                }
                let t = Instant::now();
                for step in 0..self.decode_tokens {
                    let rows: Vec<Row> =
                        sessions.iter().map(|&s| Row { session: s, position: 16 + step, logits: true }).collect();
                    let ids: Vec<u32> = (0..batch).map(|b| token(step * 31 + b, vocab)).collect();
                    pipe.forward(&rows, &ids)?;
                }
                rates.push((batch * self.decode_tokens) as f64 / t.elapsed().as_secs_f64());
                for s in sessions {
                    pipe.release(s);
                }
                eprintln!("[bench] decode batch {batch}: {:.1} tok/s", rates.last().copied().unwrap_or(0.0));
            }
            Ok(median(rates))
        };
        let d1 = decode(1, &mut pipe)?;
        let d4 = decode(4, &mut pipe)?;
        let d16 = decode(16, &mut pipe)?;
        let report = serde_json::json!({
            "model": self.model.display().to_string(),
            "threads": pipe.threads(),
            "runs": runs,
            "prompt_tok_s": median(prompt),
            "decode_tok_s": d1,
            "decode_batch4_tok_s": d4,
            "decode_batch16_tok_s": d16,
            "batch16_over_batch1": d16 / d1,
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
