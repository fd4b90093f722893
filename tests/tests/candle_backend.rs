//! The candle stage backend on its CPU device, end to end on the real
//! SmolLM2-135M Q4_1 model (release build): perplexity and greedy text
//! against native and llama.cpp, a mixed in-process pipeline, and a
//! `potluck up` cluster and an etcd cluster, each of one native and one
//! candle worker.

use anyhow::{ensure, Context as _};
use potluck_tests::etcd_cluster::EtcdCluster;
use potluck_tests::{apache_perplexity as perplexity, http_request, potluck, require_real_model, SseStream, UpCluster};
use serde_json::{json, Value};

/// Catches hangs; not a performance gate.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(180);

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

fn completion(http: &str, prompt: &str, max_tokens: usize) -> anyhow::Result<Value> {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
    let (status, text) = http_request(http, "POST", "/v1/completions", Some(&body.to_string()))?;
    ensure!(status == 200, "status {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

/// A streamed completion's text, its token count (one chunk per token) and finish reason.
fn streamed(http: &str, prompt: &str, max_tokens: usize) -> anyhow::Result<Served> {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true});
    let mut s = SseStream::open(http, "/v1/completions", &body)?;
    ensure!(s.status == 200, "stream status {}", s.status);
    let mut out = Served { text: String::new(), tokens: 0, finish: String::new() };
    for data in s.rest()? {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data)?;
        let c = &v["choices"][0];
        let piece = c["text"].as_str().unwrap_or_default();
        out.tokens += usize::from(!piece.is_empty());
        out.text.push_str(piece);
        if let Some(f) = c["finish_reason"].as_str() {
            out.finish = f.to_string();
        }
    }
    Ok(out)
}

/// What one request got back.
#[derive(Debug, Clone, PartialEq)]
struct Served {
    text: String,
    tokens: usize,
    finish: String,
}

fn whole(http: &str, prompt: &str, max_tokens: usize) -> anyhow::Result<Served> {
    let v = completion(http, prompt, max_tokens)?;
    let c = &v["choices"][0];
    Ok(Served {
        text: c["text"].as_str().context("text")?.to_string(),
        tokens: usize::try_from(v["usage"]["completion_tokens"].as_u64().context("usage")?)?,
        finish: c["finish_reason"].as_str().context("finish_reason")?.to_string(),
    })
}

/// Tokens each concurrent request asks for.
const TOKENS: usize = 10;

/// The France prompt whole and streamed, then 8 concurrent greedy requests
/// (half streamed) twice over, each prompt in the other form the second
/// time. Every request ends well: `length` with all its tokens, or `stop`
/// with fewer (the model may end its sentence: "Fact number 7 …" does at
/// its ninth token), and each prompt's text is the same in both rounds.
fn serves_mixed_completions(http: &str) -> anyhow::Result<()> {
    let france = whole(http, "The capital of France is", 12)?;
    assert!(france.text.starts_with(" Paris"), "{france:?}");
    assert_eq!(streamed(http, "The capital of France is", 12)?.text, france.text, "streamed and whole texts agree");

    let round = |round: usize| -> Vec<anyhow::Result<Served>> {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (http, prompt) = (http.to_string(), format!("Fact number {i} about the sea is that"));
                std::thread::spawn(move || {
                    if (i + round).is_multiple_of(2) {
                        whole(&http, &prompt, TOKENS)
                    } else {
                        streamed(&http, &prompt, TOKENS)
                    }
                })
            })
            .collect();
        // Every request is waited for before any is judged.
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("request thread panicked"))))
            .collect()
    };
    let (first, second) = (round(0), round(1));
    for (i, (a, b)) in first.into_iter().zip(second).enumerate() {
        let (a, b) =
            (a.with_context(|| format!("request {i}, round 1"))?, b.with_context(|| format!("request {i}, round 2"))?);
        for s in [&a, &b] {
            assert!(!s.text.is_empty(), "request {i} returned no text: {s:?}");
            match s.finish.as_str() {
                "length" => assert_eq!(s.tokens, TOKENS, "request {i}: {s:?}"),
                "stop" => assert!(s.tokens < TOKENS, "request {i}: {s:?}"),
                other => panic!("request {i}: finish reason {other:?}: {s:?}"),
            }
        }
        // Native stages are batch-invariant, and so is candle-cpu for this
        // model's Q4_1 and Q8_0 matrices (docs/architecture.md, "Numerics").
        assert_eq!(a, b, "prompt {i}: the whole and the streamed answers differ");
    }
    Ok(())
}

#[test]
fn a_cluster_of_a_native_and_a_candle_worker_serves_completions() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let dir = cache.path().to_str().context("path")?;
    let c = UpCluster::start(&["--devices", "cpu,candle-cpu", "--threads", "2", "--cache-dir", dir])?;
    let (status, plan) = c.get("/v1/cluster")?;
    ensure!(status == 200, "/v1/cluster: {status}");
    assert!(plan.contains("candle-cpu"), "the candle worker reports its device: {plan}");
    serves_mixed_completions(&c.http)
}

#[test]
fn an_etcd_cluster_of_a_native_and_a_candle_worker_serves_completions() -> anyhow::Result<()> {
    let c = EtcdCluster::new("mixed")?;
    let (_coordinator, http) = c.coordinator("coord")?;
    let _native = c.worker_on("native", "cpu")?;
    let _candle = c.worker_on("candle", "candle-cpu")?;
    let started = std::time::Instant::now();
    let plan = loop {
        let (status, body) = http_request(&http, "GET", "/v1/cluster", None)?;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if status == 200 && v["ready"] == true && v["stages"].as_array().is_some_and(|s| s.len() == 2) {
            break v;
        }
        ensure!(started.elapsed() < PATIENCE, "no ready 2-stage plan in {PATIENCE:?}: {body}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(plan.to_string().contains("candle-cpu"), "a stage runs on the candle worker: {plan}");
    serves_mixed_completions(&http)
}
