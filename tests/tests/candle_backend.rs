//! The candle stage backend on its CPU device, end to end on the real
//! SmolLM2-135M Q4_1 model (release build): perplexity and greedy text
//! against native and llama.cpp, a mixed in-process pipeline, and a
//! `potluck up` cluster with one native and one candle worker.

use std::sync::Arc;

use anyhow::{ensure, Context as _};
use potluck_tests::{apache_perplexity as perplexity, potluck, require_real_model, SseStream, UpCluster};
use serde_json::{json, Value};

/// llama.cpp's greedy continuation of the France prompt (`../shared/eval/README.md`).
const LLAMA_CPP_COMPLETION: &str =
    " Paris.\n\nThe United States has a population of approximately 311 million people.\n\nThe United States has a population of approximately 31";

#[test]
fn candle_cpu_and_mixed_pipelines_score_within_half_a_percent_of_native() -> anyhow::Result<()> {
    let native = perplexity(&[])?;
    for extra in [&["--device", "candle-cpu"][..], &["--stages", "2", "--devices", "cpu,candle-cpu"][..]] {
        let ppl = perplexity(extra)?;
        let rel = (ppl - native).abs() / native;
        eprintln!("{extra:?}: perplexity {ppl} vs native {native}: {:.3}%", rel * 100.0);
        assert!(rel < 0.005, "{extra:?}: perplexity {ppl} is {:.3}% from native {native}", rel * 100.0);
    }
    Ok(())
}

/// candle-cpu's greedy text follows llama.cpp's for the first four tokens
/// (" Paris", ".", "\n\n", "The") and forks at the fifth (" answer" where
/// llama.cpp says " United"), a near-tie that summation order decides
/// (docs/benchmarks.md); the shared prefix is what is promised.
#[test]
fn candle_cpu_greedy_text_follows_llama_cpp_up_to_its_fork() -> anyhow::Result<()> {
    let model = require_real_model()?;
    let prompt = "The capital of France is";
    let m = model.to_str().context("path")?;
    let run = potluck(&[
        "generate",
        "--model",
        m,
        "--prompt",
        prompt,
        "--max-tokens",
        "32",
        "--temperature",
        "0",
        "--device",
        "candle-cpu",
    ])?;
    ensure!(run.success, "generate failed: {}", run.stderr);
    let shared = " Paris.\n\nThe";
    assert!(LLAMA_CPP_COMPLETION.starts_with(shared));
    assert!(run.stdout.starts_with(shared), "{:?} leaves llama.cpp's text before its known fork", run.stdout);
    Ok(())
}

fn completion(c: &UpCluster, prompt: &str, max_tokens: usize) -> anyhow::Result<Value> {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
    let (status, text) = c.post("/v1/completions", &body)?;
    ensure!(status == 200, "status {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

fn streamed_text(c: &UpCluster, prompt: &str, max_tokens: usize) -> anyhow::Result<String> {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true});
    let mut s = SseStream::open(&c.http, "/v1/completions", &body)?;
    ensure!(s.status == 200, "stream status {}", s.status);
    let mut text = String::new();
    for data in s.rest()? {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data)?;
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or_default());
    }
    Ok(text)
}

#[test]
#[ignore = "open defect (issue 17): under 8 concurrent requests the mixed cluster returned a short completion once and hung on the rerun; run with --ignored while fixing it"]
fn a_cluster_of_a_native_and_a_candle_worker_serves_completions() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let dir = cache.path().to_str().context("path")?;
    let c = Arc::new(UpCluster::start(&["--devices", "cpu,candle-cpu", "--threads", "2", "--cache-dir", dir])?);
    let (status, plan) = c.get("/v1/cluster")?;
    ensure!(status == 200, "/v1/cluster: {status}");
    assert!(plan.contains("candle-cpu"), "the candle worker reports its device: {plan}");

    let france = completion(&c, "The capital of France is", 12)?;
    let text = france["choices"][0]["text"].as_str().context("text")?.to_string();
    assert!(text.starts_with(" Paris"), "{text:?}");
    assert_eq!(streamed_text(&c, "The capital of France is", 12)?, text, "streamed and whole texts agree");

    let prompts: Vec<String> = (0..8).map(|i| format!("Fact number {i} about the sea is that")).collect();
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (c, p) = (Arc::clone(&c), p.clone());
            std::thread::spawn(move || -> anyhow::Result<(usize, String)> {
                if i % 2 == 0 {
                    let v = completion(&c, &p, 10)?;
                    let n = v["usage"]["completion_tokens"].as_u64().context("usage")?;
                    Ok((usize::try_from(n)?, v["choices"][0]["text"].as_str().context("text")?.to_string()))
                } else {
                    Ok((10, streamed_text(&c, &p, 10)?))
                }
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (n, text) = h.join().map_err(|_| anyhow::anyhow!("request thread panicked"))??;
        assert_eq!(n, 10, "request {i}");
        assert!(!text.is_empty(), "request {i} returned no text");
    }
    Ok(())
}
