//! The distributed pipeline end to end: real worker processes, real gRPC on
//! loopback, the real model.

use anyhow::{ensure, Context as _};
use potluck_tests::{potluck, require_real_model, UpCluster};
use serde_json::json;

const PROMPTS: [&str; 5] = [
    "The capital of France is",
    "Once upon a time",
    "The Apache License grants",
    "def fibonacci(n):",
    "Water is made of",
];

/// Greedy `potluck generate` in one process; `split` adds flags such as `--split-at` and `--wire-dtype`.
fn single_process(prompt: &str, tokens: usize, split: &[&str]) -> anyhow::Result<String> {
    let model = require_real_model()?;
    let tokens = tokens.to_string();
    let mut args =
        vec!["generate", "--model", model.to_str().context("path")?, "--prompt", prompt, "--max-tokens", &tokens];
    args.extend(["--temperature", "0"]);
    args.extend(split);
    let run = potluck(&args)?;
    ensure!(run.success, "generate {split:?} failed: {}", run.stderr);
    Ok(run.stdout)
}

/// The plan's stages as `/v1/cluster` reports them: `[start, end)` layers, first to last.
fn stage_ranges(c: &UpCluster) -> anyhow::Result<Vec<(u64, u64)>> {
    let (_, body) = c.get("/v1/cluster")?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    v["stages"]
        .as_array()
        .context("stages")?
        .iter()
        .map(|s| Ok((s["layers"][0].as_u64().context("start")?, s["layers"][1].as_u64().context("end")?)))
        .collect()
}

fn completion(c: &UpCluster, prompt: &str, tokens: usize) -> anyhow::Result<String> {
    let (status, body) =
        c.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": tokens, "temperature": 0}))?;
    ensure!(status == 200, "status {status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v["choices"][0]["text"].as_str().context("text")?.to_string())
}

#[test]
fn f32_wire_pipelines_of_1_to_4_workers_equal_one_process() -> anyhow::Result<()> {
    let expected: Vec<String> = PROMPTS.iter().map(|p| single_process(p, 64, &[])).collect::<Result<_, _>>()?;
    let cache = tempfile::tempdir()?;
    for workers in [1, 2, 3, 4] {
        let c = UpCluster::start(&[
            "--workers",
            &workers.to_string(),
            "--wire-dtype",
            "f32",
            "--threads",
            "2",
            "--cache-dir",
            cache.path().to_str().context("path")?,
        ])?;
        let stages = stage_ranges(&c)?;
        assert_eq!(stages.len(), workers, "{stages:?}");
        assert_eq!(stages.last().context("last")?.1, 30);
        for (p, want) in PROMPTS.iter().zip(&expected) {
            assert_eq!(&completion(&c, p, 64)?, want, "{workers} workers, prompt {p:?}");
        }
    }
    Ok(())
}

/// The default f16 wire rounds hidden states at each stage boundary, so the
/// reference is the in-process engine rounding through f16 at the very same
/// cuts the plan chose: then every token must match.
#[test]
fn f16_wire_pipelines_equal_the_engine_f16_hand_off_at_the_same_cuts() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    for workers in [2, 3] {
        let c = UpCluster::start(&[
            "--workers",
            &workers.to_string(),
            "--threads",
            "2",
            "--cache-dir",
            cache.path().to_str().context("path")?,
        ])?;
        let stages = stage_ranges(&c)?;
        assert_eq!(stages.len(), workers, "{stages:?}");
        assert_eq!((stages[0].0, stages[workers - 1].1), (0, 30), "{stages:?}");
        assert!(stages.windows(2).all(|w| w[0].1 == w[1].0), "stages must be contiguous: {stages:?}");
        let cuts = stages[1..].iter().map(|s| s.0.to_string()).collect::<Vec<_>>().join(",");
        for p in PROMPTS {
            let want = single_process(p, 64, &["--split-at", &cuts, "--wire-dtype", "f16"])?;
            assert_eq!(completion(&c, p, 64)?, want, "{workers} workers cut at {cuts}, prompt {p:?}");
        }
    }
    Ok(())
}

#[test]
fn a_second_cluster_with_the_same_cache_transfers_no_weights() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let dir = cache.path().to_str().context("path")?;
    let shipped = |c: &UpCluster| -> anyhow::Result<u64> {
        let (_, body) = c.get("/v1/cluster")?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        v["weight_bytes_shipped"].as_u64().context("weight_bytes_shipped")
    };
    let first = UpCluster::start(&["--workers", "2", "--cache-dir", dir])?;
    let cold = shipped(&first)?;
    drop(first);
    let second = UpCluster::start(&["--workers", "2", "--cache-dir", dir])?;
    assert!(cold > 50_000_000, "first start shipped only {cold} bytes");
    assert_eq!(shipped(&second)?, 0, "a warm cache must transfer nothing");
    // And it serves.
    assert!(!completion(&second, "Hello", 4)?.is_empty());
    Ok(())
}

#[test]
fn concurrent_requests_and_bad_requests_do_not_fail_the_server() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let dir = cache.path().to_str().context("path")?;
    let c = std::sync::Arc::new(UpCluster::start(&["--workers", "2", "--cache-dir", dir])?);
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let c = std::sync::Arc::clone(&c);
            std::thread::spawn(move || completion(&c, PROMPTS[i], 8))
        })
        .collect();
    for h in handles {
        let text = h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
        assert!(!text.is_empty());
    }
    for (body, want) in [
        ("{not json", 400),
        (r#"{"prompt": 5}"#, 400),
        (r#"{"prompt": "x", "max_tokens": -3}"#, 400),
        (r#"{"prompt": "x", "model": "gpt-17"}"#, 404),
    ] {
        let (status, text) = potluck_tests::http_request(&c.http, "POST", "/v1/completions", Some(body))?;
        assert_eq!(status, want, "{body}: {text}");
        assert!(text.contains("\"error\""), "{body}: not OpenAI-shaped: {text}");
    }
    assert_eq!(completion(&c, "The capital of France is", 2)?, " Paris.");
    Ok(())
}
