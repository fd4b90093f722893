//! `potluck selftest`: how a device's kernels agree with the native CPU
//! ones, and how fast it decodes, in one command an operator runs on a new
//! GPU before giving it a stage. Figures, not pass/fail: agreement within a
//! device's float order is expected, and what is close enough is the
//! operator's call (docs/operations.md gives the figures seen so far).

use anyhow::Context as _;
use potluck_engine::self_check::{matmul, stage};
use potluck_engine::{ComputePool, Device, LocalPipeline, ModelFile, SessionId, WireDtype};
use serde_json::{json, Value};

use super::bench::decode_rate;

/// Decode batch sizes measured.
const DECODE_BATCHES: [usize; 2] = [1, 16];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The device to check (`candle-cpu`, `cuda[:N]`, `metal`) against the native CPU kernels.
    #[arg(long)]
    device: Device,
    /// Model file (GGUF) for the layer, perplexity and speed checks.
    #[arg(long)]
    model: std::path::PathBuf,
    /// Text for the perplexity check.
    #[arg(long, default_value = "testdata/apache-2.0.txt")]
    text: std::path::PathBuf,
    /// Perplexity window in tokens.
    #[arg(long, default_value_t = 256)]
    ctx: usize,
    /// Score only the first N perplexity windows (0 = the whole text), for a quicker check.
    #[arg(long, default_value_t = 0)]
    windows: usize,
    /// Prompt tokens (from the text's start) for the layer check.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Tokens per decode run.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Native compute threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn threads(n: usize) -> usize {
    match n {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n,
    }
}

/// Whole-model perplexity of `tokens` on `device`.
fn perplexity(file: &ModelFile, device: Device, tokens: &[u32], ctx: usize, threads: usize) -> anyhow::Result<f64> {
    let layers = file.config().layers;
    let mut pipe = LocalPipeline::load_on(file, &[0, layers], &[device], WireDtype::F32, 1 << 30, threads)?;
    let report = potluck_engine::perplexity::perplexity(&mut pipe, tokens, ctx, |done, total, ppl| {
        eprintln!("[selftest] perplexity on {device}: window {done}/{total}, running {ppl:.4}");
    })?;
    Ok(report.ppl)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.device.is_candle(), "--device cpu is the reference itself; name candle-cpu, cuda[:N] or metal");
    let threads = threads(a.threads);
    let pool = ComputePool::new(threads);
    let file = ModelFile::open(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    let tokens = file.tokenizer()?.encode(&text, true)?;
    anyhow::ensure!(tokens.len() >= a.prompt_tokens.max(1), "{} has too few tokens", a.text.display());

    eprintln!("[selftest] quantized matmuls on {} against native", a.device);
    let matmuls = matmul::check_all(a.device, &pool)?;
    eprintln!("[selftest] layers of {} on {} against native", a.model.display(), a.device);
    let ranges = stage::check(&file, a.device, &tokens[..a.prompt_tokens.max(1)], &pool)?;
    let scored = match a.windows {
        0 => &tokens[..],
        n => &tokens[..tokens.len().min(n.saturating_mul(a.ctx))],
    };
    let native_ppl = perplexity(&file, Device::Cpu, scored, a.ctx, threads)?;
    let device_ppl = perplexity(&file, a.device, scored, a.ctx, threads)?;

    let layers = file.config().layers;
    let vocab = file.config().vocab;
    let mut pipe = LocalPipeline::load_on(&file, &[0, layers], &[a.device], WireDtype::F32, 1 << 30, threads)?;
    let mut decode = Vec::new();
    let mut next = 0u64;
    for batch in DECODE_BATCHES {
        let sessions: Vec<SessionId> = (0..batch)
            .map(|_| {
                next += 1;
                SessionId(next)
            })
            .collect();
        let rate = decode_rate(&mut pipe, &sessions, a.decode_tokens, vocab)?;
        eprintln!("[selftest] decode on {} at batch {batch}: {:.1} tok/s", a.device, rate.wall);
        decode.push((batch, rate.wall));
    }

    let report = json!({
        "device": a.device.to_string(),
        "model": a.model.display().to_string(),
        "threads": threads,
        "matmul": matmuls,
        "layers": ranges,
        "perplexity": {
            "text": a.text.display().to_string(),
            "ctx": a.ctx,
            "tokens": scored.len(),
            "native": native_ppl,
            "device": device_ppl,
            "relative": (device_ppl - native_ppl) / native_ppl,
        },
        "decode_tok_s": decode.iter().map(|(b, r)| (b.to_string(), json!(r))).collect::<serde_json::Map<_, _>>(),
    });
    if a.json {
        println!("{report}");
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// An agreement's cosine, max absolute and max relative error as table cells.
fn agreement_cells(g: &Value) -> String {
    let f = |k: &str| g[k].as_f64().unwrap_or(f64::NAN);
    format!("{:>12.8} {:>10.3e} {:>10.3e}", f("min_cosine"), f("max_abs"), f("max_rel"))
}

/// The report as a table for people.
fn table(r: &Value) -> String {
    use std::fmt::Write as _;
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut out = String::new();
    let device = r["device"].as_str().unwrap_or("?");
    let _ = writeln!(
        out,
        "potluck selftest: {device} against the native CPU kernels ({})",
        r["model"].as_str().unwrap_or("?")
    );
    let _ = writeln!(out, "\nquantized matmul ({}x{} weights)", matmul::ROWS, matmul::COLS);
    let _ = writeln!(out, "{:<6} {:>5} {:>12} {:>10} {:>10}", "type", "batch", "min cosine", "max abs", "max rel");
    for m in r["matmul"].as_array().into_iter().flatten() {
        let label = format!("{:<6} {:>5}", m["dtype"].as_str().unwrap_or("?"), m["batch"].as_u64().unwrap_or(0));
        let _ = writeln!(out, "{label} {}", agreement_cells(&m["agreement"]));
    }
    let _ = writeln!(out, "\nlayer ranges (same input on both)");
    let _ = writeln!(out, "{:<10} {:<7} {:>12} {:>10} {:>10}", "layers", "output", "min cosine", "max abs", "max rel");
    for c in r["layers"].as_array().into_iter().flatten() {
        let range = format!("{}..{}", c["layers"]["start"], c["layers"]["end"]);
        let label = format!("{range:<10} {:<7}", c["output"].as_str().unwrap_or("?"));
        let _ = writeln!(out, "{label} {}", agreement_cells(&c["agreement"]));
    }
    let p = &r["perplexity"];
    let _ = writeln!(
        out,
        "\nperplexity ({}, ctx {}): native {:.4}, {device} {:.4} ({:+.3}%)",
        p["text"].as_str().unwrap_or("?"),
        p["ctx"],
        f(&p["native"]),
        f(&p["device"]),
        f(&p["relative"]) * 100.0
    );
    let decode: Vec<String> = r["decode_tok_s"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(b, v)| format!("batch {b}: {:.1} tok/s", f(v)))
        .collect();
    let _ = writeln!(out, "decode on {device}: {}", decode.join(", "));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_every_figure_of_the_report() {
        let report = json!({
            "device": "cuda:0", "model": "m.gguf",
            "matmul": [{"dtype": "Q6_K", "batch": 9, "agreement": {"min_cosine": 0.99999, "max_abs": 0.002, "max_rel": 0.0001}}],
            "layers": [{"layers": {"start": 0, "end": 15}, "output": "hidden",
                        "agreement": {"min_cosine": 0.9995, "max_abs": 0.5, "max_rel": 0.001}}],
            "perplexity": {"text": "t.txt", "ctx": 256, "native": 17.75, "device": 17.77, "relative": 0.0011},
            "decode_tok_s": {"1": 120.5, "16": 900.0},
        });
        let t = table(&report);
        for needle in [
            "cuda:0 against the native CPU kernels (m.gguf)",
            "Q6_K       9   0.99999000   2.000e-3",
            "0..15      hidden",
            "native 17.7500, cuda:0 17.7700 (+0.110%)",
            "decode on cuda:0: batch 1: 120.5 tok/s, batch 16: 900.0 tok/s",
        ] {
            assert!(t.contains(needle), "{needle:?} missing from:\n{t}");
        }
    }
}
