//! Where a single worker's per-token time goes, side by side in one run:
//! - the engine in this process: one stage forward plus greedy sampling per token;
//! - the same steps sent straight to a `potluck worker --threads 1` process over its
//!   Forward stream (the worker's whole hot path: gRPC decode, validation, compute
//!   thread hand-off, sampling, reply);
//! - full greedy completions through the coordinator's HTTP API (adds the coordinator).
//!
//! A benchmark, not a gate: it asserts only that the three paths produce the
//! same tokens, and prints medians. Run it on a quiet host with
//! `cargo test --release -p potluck-tests --test worker_hop -- --ignored --nocapture`
//! (`POTLUCK_HOP_TOKENS`, `POTLUCK_HOP_RUNS` to change the defaults 64 and 7).

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use potluck_engine::{LocalPipeline, ModelFile, Row, Sampler, SamplingParams, SessionId, WireDtype};
use potluck_proto::v1 as pb;
use potluck_tests::{http_request, require_real_model, Announce, Daemon};
use serde_json::{json, Value};

const PROMPT: &str = "Once upon a time";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// In-process: prefill, then `tokens` decode steps of forward + greedy sample; µs per step and the tokens.
fn engine_run(
    pipe: &mut LocalPipeline,
    session: u64,
    prompt: &[u32],
    tokens: usize,
) -> anyhow::Result<(f64, Vec<u32>)> {
    let s = SessionId(session);
    let mut sampler = Sampler::new(SamplingParams { temperature: 0.0, ..SamplingParams::default() })?;
    let mut history = prompt.to_vec();
    let logits = pipe.prefill(s, prompt, prompt.len())?;
    let mut token = sampler.sample(&logits, &history).token;
    let mut out = vec![token];
    let t = Instant::now();
    for _ in 0..tokens {
        history.push(token);
        let row = Row { session: s, position: history.len() - 1, logits: true };
        let logits = pipe.forward(&[row], &[token])?;
        token = sampler.sample(logits.row(0), &history).token;
        out.push(token);
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / tokens as f64;
    pipe.release(s);
    Ok((us, out))
}

/// Straight to the worker: the same steps over one Forward stream; µs per step and the tokens.
async fn worker_run(
    stream: &mut (tokio::sync::mpsc::Sender<pb::ForwardRequest>, tonic::Streaming<pb::ForwardReply>),
    epoch: u64,
    session: u64,
    prompt: &[u32],
    tokens: usize,
) -> anyhow::Result<(f64, Vec<u32>)> {
    let mut batch_id = session << 16;
    let mut step = |rows: Vec<pb::Row>, tokens: Vec<u32>| {
        batch_id += 1;
        let request = pb::ForwardRequest { epoch, batch_id, rows, tokens, ..Default::default() };
        let (tx, rx) = (&stream.0, &mut stream.1);
        async move {
            tx.send(request).await.map_err(|_| anyhow::anyhow!("stream closed"))?;
            let reply = rx.message().await?.context("stream ended")?;
            reply.tokens.first().map(|t| t.token).context("no token")
        }
    };
    let greedy = pb::Sampling { temperature: 0.0, ..Default::default() };
    let rows = (0..prompt.len())
        .map(|i| pb::Row {
            session,
            position: u32::try_from(i)?,
            sample: i + 1 == prompt.len(),
            sampling: (i == 0).then_some(greedy),
        })
        .collect::<Result<_, std::num::TryFromIntError>>()?;
    let mut token = step(rows, prompt.to_vec()).await?;
    let mut out = vec![token];
    let t = Instant::now();
    for i in 0..tokens {
        let row = pb::Row { session, position: u32::try_from(prompt.len() + i)?, sample: true, sampling: None };
        token = step(vec![row], vec![token]).await?;
        out.push(token);
    }
    Ok((t.elapsed().as_secs_f64() * 1e6 / tokens as f64, out))
}

/// Through the coordinator: a (1 + tokens)-token completion minus a 1-token one, in µs per token; and the text.
fn coordinator_run(http: &str, tokens: usize) -> anyhow::Result<(f64, String)> {
    let complete = |n: usize| -> anyhow::Result<(Duration, Value)> {
        let body = json!({"prompt": PROMPT, "max_tokens": n, "temperature": 0}).to_string();
        let t = Instant::now();
        let (status, reply) = http_request(http, "POST", "/v1/completions", Some(&body))?;
        let took = t.elapsed();
        ensure!(status == 200, "{status}: {reply}");
        Ok((took, serde_json::from_str(&reply)?))
    };
    let (short, _) = complete(1)?;
    let (long, v) = complete(1 + tokens)?;
    ensure!(v["usage"]["completion_tokens"] == 1 + tokens, "stopped early: {v}");
    let text = v["choices"][0]["text"].as_str().context("text")?.to_string();
    Ok(((long.saturating_sub(short)).as_secs_f64() * 1e6 / tokens as f64, text))
}

#[test]
#[ignore = "a benchmark: run it on a quiet host with --ignored --nocapture"]
fn one_worker_per_token_cost_side_by_side() -> anyhow::Result<()> {
    let (tokens, runs) = (env_or("POTLUCK_HOP_TOKENS", 64), env_or("POTLUCK_HOP_RUNS", 7).max(1));
    let model = require_real_model()?;
    let cache = tempfile::tempdir()?;
    let args: Vec<&OsStr> = ["coordinator", "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0", "--model"]
        .iter()
        .map(OsStr::new)
        .chain([model.as_os_str()])
        .collect();
    let (_coordinator, line) = Daemon::start(&args, Announce::Stderr, "coordinator: gRPC ")?;
    let (grpc, http) = line.split_once(", HTTP http://").context("coordinator line")?;
    let worker_args: Vec<&OsStr> = [
        "worker",
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--progress",
        "off",
        "--coordinator",
        grpc,
        "--cache-dir",
    ]
    .iter()
    .map(OsStr::new)
    .chain([cache.path().as_os_str()])
    .collect();
    let (_worker, _) = Daemon::start(&worker_args, Announce::Stderr, "worker listening on ")?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let cluster = loop {
        let v: Value = serde_json::from_str(&http_request(http, "GET", "/v1/cluster", None)?.1)?;
        if v["ready"] == true {
            break v;
        }
        ensure!(Instant::now() < deadline, "no plan: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let epoch = cluster["epoch"].as_u64().context("epoch")?;
    let address = cluster["stages"][0]["address"].as_str().context("address")?.to_string();

    let file = ModelFile::open(&model)?;
    let prompt = file.tokenizer()?.encode(PROMPT, true)?;
    let mut pipe = LocalPipeline::load(&file, &[0, file.config().layers], WireDtype::F32, 1 << 30, 1)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut stream = rt.block_on(async {
        let mut client = pb::stage_client::StageClient::connect(address.clone()).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let replies = client.forward(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        anyhow::Ok((tx, replies))
    })?;
    coordinator_run(http, 4)?; // warm-up: the coordinator's stream is open, caches are warm

    let (mut engine, mut worker, mut coordinator) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let session = 1_000_000 + run as u64;
        let (e, want) = engine_run(&mut pipe, session, &prompt, tokens)?;
        let (w, got) = rt.block_on(worker_run(&mut stream, epoch, session, &prompt, tokens))?;
        ensure!(got == want, "the worker's tokens differ from the engine's:\n{got:?}\n{want:?}");
        let (c, _) = coordinator_run(http, tokens)?;
        eprintln!("run {run}: engine {e:.0} µs/token, worker {w:.0}, via coordinator {c:.0} (load {})", load_average());
        (engine.push(e), worker.push(w), coordinator.push(c));
    }
    let (e, w, c) = (median(engine), median(worker), median(coordinator));
    let report = json!({
        "tokens": tokens,
        "runs": runs,
        "load_average": load_average(),
        "engine_us_per_token": e.round(),
        "worker_direct_us_per_token": w.round(),
        "via_coordinator_us_per_token": c.round(),
        "worker_overhead_us": (w - e).round(),
        "coordinator_overhead_us": (c - w).round(),
    });
    println!("{report}");
    Ok(())
}
