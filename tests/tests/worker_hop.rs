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
/// The paused engine's idle time per step: about a loopback round trip plus gRPC work.
const PAUSE: Duration = Duration::from_micros(300);

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// CPU time (ns) the process `pid` has run so far, summed over its threads
/// (`/proc/<pid>/task/*/schedstat`): under load, wall time measures the
/// other tenants too, CPU time mostly this process's own work.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
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

/// In-process: prefill, then `tokens` decode steps of forward + greedy sample; µs per step (pauses
/// excluded) and the tokens. A `pause` after each step idles the thread as a worker's compute thread
/// idles while its reply travels and the next request comes: it tells how much of a worker's extra
/// CPU time is the engine running on a cache that went cold meanwhile.
fn engine_run(
    pipe: &mut LocalPipeline,
    session: u64,
    prompt: &[u32],
    tokens: usize,
    pause: Duration,
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
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    let us = t.elapsed().saturating_sub(pause * u32::try_from(tokens)?).as_secs_f64() * 1e6 / tokens as f64;
    pipe.release(s);
    Ok((us, out))
}

type Stream = (tokio::sync::mpsc::Sender<pb::ForwardRequest>, tonic::Streaming<pb::ForwardReply>);

/// One micro-batch to the worker and its sampled token back.
async fn step(stream: &mut Stream, request: pb::ForwardRequest) -> anyhow::Result<u32> {
    stream.0.send(request).await.map_err(|_| anyhow::anyhow!("stream closed"))?;
    let reply = stream.1.message().await?.context("stream ended")?;
    reply.tokens.first().map(|t| t.token).context("no token")
}

/// Straight to the worker: the same steps over one Forward stream; µs per step and the tokens.
async fn worker_run(
    stream: &mut Stream,
    epoch: u64,
    session: u64,
    prompt: &[u32],
    tokens: usize,
) -> anyhow::Result<(f64, Vec<u32>)> {
    let batch = |batch_id: u64, rows: Vec<pb::Row>, tokens: Vec<u32>| pb::ForwardRequest {
        epoch,
        batch_id,
        rows,
        tokens,
        ..Default::default()
    };
    let greedy = pb::Sampling { temperature: 0.0, ..Default::default() };
    let rows = (0..prompt.len())
        .map(|i| {
            Ok(pb::Row {
                session,
                position: u32::try_from(i)?,
                sample: i + 1 == prompt.len(),
                sampling: (i == 0).then_some(greedy),
            })
        })
        .collect::<Result<_, std::num::TryFromIntError>>()?;
    let mut token = step(stream, batch(0, rows, prompt.to_vec())).await?;
    let mut out = vec![token];
    let t = Instant::now();
    for i in 0..tokens {
        let row = pb::Row { session, position: u32::try_from(prompt.len() + i)?, sample: true, sampling: None };
        token = step(stream, batch(1 + i as u64, vec![row], vec![token])).await?;
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
        .into_iter()
        .map(OsStr::new)
        .chain([model.as_os_str()])
        .collect();
    let (coordinator, line) = Daemon::start(&args, Announce::Stderr, "coordinator: gRPC ")?;
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
    .into_iter()
    .map(OsStr::new)
    .chain([cache.path().as_os_str()])
    .collect();
    let (worker, _) = Daemon::start(&worker_args, Announce::Stderr, "worker listening on ")?;
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

    let (me, wp, cp) = (std::process::id(), worker.pid(), coordinator.pid());
    // CPU µs per token of the processes in `pids` while `f` runs (prefill included: it is the same on every path).
    let cpu = |pids: &[u32], f: &mut dyn FnMut() -> anyhow::Result<f64>| -> anyhow::Result<(f64, f64)> {
        let before: u64 = pids.iter().map(|&p| cpu_ns(p)).sum();
        let wall = f()?;
        let after: u64 = pids.iter().map(|&p| cpu_ns(p)).sum();
        Ok((wall, (after - before) as f64 / 1e3 / tokens as f64))
    };
    let mut rows: [Vec<f64>; 8] = Default::default();
    for run in 0..runs {
        let session = 1_000_000 + run as u64;
        let mut want = Vec::new();
        let (e, e_cpu) = cpu(&[me], &mut || {
            let (us, t) = engine_run(&mut pipe, session, &prompt, tokens, Duration::ZERO)?;
            want = t;
            Ok(us)
        })?;
        let (p, p_cpu) = cpu(&[me], &mut || Ok(engine_run(&mut pipe, session + 500, &prompt, tokens, PAUSE)?.0))?;
        let (w, w_cpu) = cpu(&[wp], &mut || {
            let (us, got) = rt.block_on(worker_run(&mut stream, epoch, session, &prompt, tokens))?;
            ensure!(got == want, "the worker's tokens differ from the engine's:\n{got:?}\n{want:?}");
            Ok(us)
        })?;
        let (c, c_cpu) = cpu(&[wp, cp], &mut || Ok(coordinator_run(http, tokens)?.0))?;
        eprintln!(
            "run {run}: µs/token wall (cpu): engine {e:.0} ({e_cpu:.0}), paused engine {p:.0} ({p_cpu:.0}), \
             worker {w:.0} ({w_cpu:.0}), via coordinator {c:.0} ({c_cpu:.0}); load {}",
            load_average()
        );
        for (row, v) in rows.iter_mut().zip([e, w, c, e_cpu, w_cpu, c_cpu, p, p_cpu]) {
            row.push(v);
        }
    }
    let [e, w, c, e_cpu, w_cpu, c_cpu, p, p_cpu] = rows.map(median);
    let report = json!({
        "tokens": tokens,
        "runs": runs,
        "load_average": load_average(),
        "engine_pause_us": PAUSE.as_micros(),
        "wall_us_per_token": {"engine": e.round(), "paused_engine": p.round(), "worker_direct": w.round(), "via_coordinator": c.round()},
        "cpu_us_per_token": {"engine": e_cpu.round(), "paused_engine": p_cpu.round(), "worker_direct": w_cpu.round(),
            "via_coordinator_worker_plus_coordinator": c_cpu.round()},
        "worker_overhead_us": {"wall": (w - e).round(), "cpu": (w_cpu - e_cpu).round()},
        "coordinator_overhead_us": {"wall": (c - w).round(), "cpu": (c_cpu - w_cpu).round()},
    });
    println!("{report}");
    Ok(())
}
