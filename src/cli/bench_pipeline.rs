//! `potluck bench pipeline`: single-stream decode speed of real `potluck up`
//! clusters of growing length, one thread per worker, and from it the cost
//! of one pipeline hop; plus the engine in this process as the floor.

use std::io::{BufRead as _, Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use potluck_engine::{LocalPipeline, ModelFile, Row, SessionId, WireDtype};
use serde_json::{json, Value};

use super::{median, token};

/// Prompt of every timed request (short, so prefill barely counts).
const PROMPT: &str = "Once upon a time";
/// How long a cluster may take to report its URL.
const START_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, clap::Args)]
pub struct PipelineBench {
    /// Model file.
    #[arg(long, default_value = crate::cli::cluster::DEFAULT_MODEL)]
    model: PathBuf,
    /// Cluster sizes to measure, e.g. 1,2,3 (each worker gets one thread).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    workers: Vec<usize>,
    /// Runs per figure; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Greedy tokens per decode run.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// How hidden states travel between stages.
    #[arg(long, default_value = "f16")]
    wire_dtype: String,
    /// Shard cache for the workers (default: a fresh directory under the temp dir, removed after).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Print one JSON object instead of pretty JSON.
    #[arg(long)]
    json: bool,
}

/// A `potluck up` child process; SIGTERM on drop so its workers exit too.
pub(super) struct UpChild {
    child: Child,
    /// `host:port` of its HTTP API.
    pub(super) http: String,
}

impl Drop for UpChild {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PipelineBench {
    #[allow(clippy::cast_precision_loss)]
    pub fn run(self) -> anyhow::Result<()> {
        ensure!(
            self.model.exists(),
            "model {} not found: run scripts/fetch-model or pass --model",
            self.model.display()
        );
        ensure!(!self.workers.is_empty() && self.workers.iter().all(|&w| w >= 1), "--workers wants sizes ≥ 1");
        ensure!(self.decode_tokens >= 1, "--decode-tokens must be at least 1");
        let runs = self.runs.max(1);
        let temp = std::env::temp_dir().join(format!("potluck-bench-shards-{}", std::process::id()));
        let cache = self.cache_dir.clone().unwrap_or_else(|| temp.clone());
        let engine = self.engine_tok_s(runs)?;
        let mut clusters = Vec::new();
        for &n in &self.workers {
            let rate = self.cluster_tok_s(n, runs, &cache);
            clusters.push((n, rate));
        }
        if self.cache_dir.is_none() {
            let _ = std::fs::remove_dir_all(&temp);
        }
        let mut by_workers = serde_json::Map::new();
        for (n, rate) in &clusters {
            by_workers.insert(n.to_string(), json!(rate.as_ref().map_err(ToString::to_string).ok()));
            if let Err(e) = rate {
                eprintln!("[bench] {n} workers failed: {e:#}");
            }
        }
        let one = clusters.iter().find(|(n, _)| *n == 1).and_then(|(_, r)| r.as_ref().ok().copied());
        let mut per_hop = serde_json::Map::new();
        for (n, rate) in &clusters {
            if let (true, Some(base), Ok(r)) = (*n > 1, one, rate) {
                let us = (1.0 / r - 1.0 / base) / (*n - 1) as f64 * 1e6;
                per_hop.insert(n.to_string(), json!(us));
            }
        }
        let report = json!({
            "model": self.model.display().to_string(),
            "wire_dtype": self.wire_dtype,
            "threads_per_worker": 1,
            "runs": runs,
            "decode_tokens": self.decode_tokens,
            "engine_decode_tok_s": engine,
            "pipeline_decode_tok_s": Value::Object(by_workers),
            "overhead_per_hop_us": Value::Object(per_hop),
            "one_worker_overhead_vs_engine_us": one.map(|r| (1.0 / r - 1.0 / engine) * 1e6),
        });
        super::print_report(&report, self.json)
    }

    /// In-process decode at one thread: the floor a pipeline is compared with.
    #[allow(clippy::cast_precision_loss)]
    fn engine_tok_s(&self, runs: usize) -> anyhow::Result<f64> {
        let file = ModelFile::open(&self.model).with_context(|| format!("loading {}", self.model.display()))?;
        let (layers, vocab) = (file.config().layers, file.config().vocab);
        let mut pipe = LocalPipeline::load(&file, &[0, layers], WireDtype::F32, 1 << 30, 1)?;
        let mut rates = Vec::new();
        for run in 0..runs {
            let s = SessionId(run as u64 + 1);
            let ids: Vec<u32> = (0..4).map(|i| token(i, vocab)).collect();
            pipe.prefill(s, &ids, 4)?;
            let t = Instant::now();
            for step in 0..self.decode_tokens {
                pipe.forward(&[Row { session: s, position: 4 + step, logits: true }], &[token(step * 31, vocab)])?;
            }
            rates.push(self.decode_tokens as f64 / t.elapsed().as_secs_f64());
            pipe.release(s);
            eprintln!("[bench] engine, 1 thread: {:.1} tok/s", rates.last().copied().unwrap_or(0.0));
        }
        Ok(median(rates))
    }

    /// Median decode tok/s of a `potluck up` cluster of `n` workers: the time
    /// of a (1 + decode_tokens)-token request minus that of a 1-token one.
    #[allow(clippy::cast_precision_loss)]
    fn cluster_tok_s(&self, n: usize, runs: usize, cache: &std::path::Path) -> anyhow::Result<f64> {
        let up = self.start(n, cache)?;
        completion(&up.http, 4)?; // warm-up: connects the stream, fills caches
        let mut rates = Vec::new();
        for _ in 0..runs {
            let (short, _) = completion(&up.http, 1)?;
            let (long, generated) = completion(&up.http, 1 + self.decode_tokens)?;
            ensure!(generated > 1 && long > short, "the model stopped after {generated} tokens");
            rates.push((generated - 1) as f64 / (long - short).as_secs_f64());
            eprintln!("[bench] {n} workers: {:.1} tok/s", rates.last().copied().unwrap_or(0.0));
        }
        Ok(median(rates))
    }

    fn start(&self, n: usize, cache: &std::path::Path) -> anyhow::Result<UpChild> {
        let n = n.to_string();
        let cache = cache.to_string_lossy();
        let model = self.model.to_string_lossy();
        UpChild::start(&[
            "--workers",
            &n,
            "--threads",
            &n,
            "--wire-dtype",
            &self.wire_dtype,
            "--model",
            &model,
            "--cache-dir",
            &cache,
        ])
    }
}

impl UpChild {
    /// Starts `potluck up --http 127.0.0.1:0 ARGS` and waits until it prints its URL.
    pub(super) fn start(args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["up", "--http", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting potluck up")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut up = UpChild { child, http: String::new() };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.split(" on http://").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        up.http = rx.recv_timeout(START_TIMEOUT).map_err(|_| anyhow::anyhow!("potluck up did not become ready"))?;
        Ok(up)
    }
}

/// One greedy completion; returns its wall time and tokens generated.
fn completion(addr: &str, max_tokens: usize) -> anyhow::Result<(Duration, u64)> {
    let body = json!({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).to_string();
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let elapsed = t.elapsed();
    let (head, rest) = raw.split_once("\r\n\r\n").context("malformed HTTP response")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "completion failed: {head} {rest}");
    let start = rest.find('{').context("no JSON in the response")?;
    let end = rest.rfind('}').context("no JSON in the response")?;
    let v: Value = serde_json::from_str(rest.get(start..=end).context("no JSON in the response")?)?;
    let generated = v["usage"]["completion_tokens"].as_u64().context("usage.completion_tokens")?;
    Ok((elapsed, generated))
}
