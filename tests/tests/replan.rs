//! A planned change under load: a worker joins a serving cluster while
//! streams are mid-generation. The coordinator pauses the pipeline, loads
//! the new plan, and re-prefills every running session from its tokens on
//! the new stages, so the streams go on without an error and, with an f32
//! wire, end exactly as a single process would have generated them (greedy
//! and seeded alike: a draw depends only on the seed and the position).

use anyhow::{ensure, Context as _};
use std::ffi::OsStr;

use potluck_tests::{http_request, metric, potluck, require_real_model, wait_for, Announce, Daemon, SseStream};
use serde_json::{json, Value};

const PROMPT: &str = "Once upon a time, in a small village by the sea,";
const TOKENS: usize = 300;

fn args<'a>(a: &[&'a str]) -> Vec<&'a OsStr> {
    a.iter().map(|s| OsStr::new(*s)).collect()
}

fn generate(model: &str, temperature: &str, seed: &str) -> anyhow::Result<String> {
    let run = potluck(&[
        "generate",
        "--model",
        model,
        "--prompt",
        PROMPT,
        "--max-tokens",
        &TOKENS.to_string(),
        "--temperature",
        temperature,
        "--seed",
        seed,
    ])?;
    ensure!(run.success, "generate failed: {}", run.stderr);
    Ok(run.stdout)
}

fn cluster(http: &str) -> anyhow::Result<Value> {
    let (status, body) = http_request(http, "GET", "/v1/cluster", None)?;
    ensure!(status == 200, "/v1/cluster: {status}");
    Ok(serde_json::from_str(&body)?)
}

#[test]
fn streams_survive_a_worker_joining_and_end_as_one_process_would() -> anyhow::Result<()> {
    let model = require_real_model()?;
    let model = model.to_str().context("path")?;
    let dir = tempfile::tempdir()?;
    let (_coordinator, line) = Daemon::start(
        &args(&[
            "coordinator",
            "--model",
            model,
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--wire-dtype",
            "f32",
        ]),
        Announce::Stderr,
        "coordinator: gRPC ",
    )?;
    let (grpc, http) = line.split_once(", HTTP http://").with_context(|| format!("odd line {line:?}"))?;
    let (grpc, http) = (grpc.to_string(), http.to_string());
    let cache = dir.path().to_str().context("path")?;
    let worker = |id: &str| {
        let a = args(&[
            "worker",
            "--listen",
            "127.0.0.1:0",
            "--coordinator",
            &grpc,
            "--threads",
            "1",
            "--id",
            id,
            "--cache-dir",
            cache,
        ]);
        Daemon::start(&a, Announce::Stderr, "worker listening on ").map(|(d, _)| d)
    };
    let _first = worker("first")?;
    wait_for(std::time::Duration::from_secs(60), || cluster(&http).ok().filter(|c| c["ready"] == true).map(|_| ()))?;
    let requests = [("0", "0"), ("0.9", "5")];
    let mut streams = Vec::new();
    for (temperature, seed) in requests {
        let body = json!({"prompt": PROMPT, "max_tokens": TOKENS, "temperature": temperature.parse::<f32>()?,
            "seed": seed.parse::<u64>()?, "stream": true});
        let mut s = SseStream::open(&http, "/v1/completions", &body)?;
        ensure!(s.status == 200, "status {}", s.status);
        let first = s.next_data()?.context("no first token")?;
        streams.push((s, vec![first]));
    }
    let _second = worker("second")?;
    let after = wait_for(std::time::Duration::from_secs(60), || {
        cluster(&http).ok().filter(|c| c["epoch"].as_u64() >= Some(2) && c["ready"] == true)
    })?;
    assert_eq!(after["stages"].as_array().map(Vec::len), Some(2), "{after}");
    for ((temperature, seed), (mut s, mut events)) in requests.into_iter().zip(streams) {
        events.extend(s.rest()?);
        let mut text = String::new();
        for e in &events {
            if e == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(e)?;
            ensure!(v.get("error").is_none(), "the stream failed across the re-plan: {e}");
            text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
        }
        assert_eq!(text, generate(model, temperature, seed)?, "temperature {temperature}, seed {seed}");
    }
    let (_, m) = http_request(&http, "GET", "/metrics", None)?;
    let replayed: f64 = metric(&m, "potluck_replayed_sessions_total").iter().map(|(_, v)| v).sum();
    assert!(replayed >= 2.0, "both streams should have moved to the new plan mid-stream: {replayed}");
    Ok(())
}
