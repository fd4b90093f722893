//! `potluck bench serve`: aggregate decode throughput and latency of a real
//! `potluck up` cluster under growing numbers of concurrent streams, with
//! each stage's busy fraction read from `/metrics`.
//!
//! Every figure of one run comes from the same cluster, side by side, so the
//! ratio of 16 streams to 1 is meaningful on a noisy machine even when the
//! absolute numbers are not. The list is measured in several rounds
//! (`--runs`): each row is the median round, and `vs_one_stream` is the
//! median of the rounds' own ratios.
//!
//! `decode_tok_s` counts a phase from its first request to its last token,
//! so it includes the ramp-up (every stream's first prefill at once) and the
//! tail (streams finishing one by one). `all_streams_tok_s` counts only the
//! stretch when every stream was generating at once, the rate the
//! concurrency level itself sustains; `all_streams_vs_one_stream` is its
//! ratio, and `all_streams_busy_fraction` each stage's busy fraction over
//! the same stretch (from `/metrics`, sampled every 50 ms). Short phases
//! (few `--requests`) make the whole-phase and all-streams figures differ
//! most.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use serde_json::{json, Value};

use super::bench_pipeline::UpChild;

#[path = "stage_busy.rs"]
mod stage_busy;
use stage_busy::{busy_between, busy_seconds, BusySampler};

#[derive(Debug, clap::Args)]
pub struct ServeBench {
    /// Model file.
    #[arg(long, default_value = crate::cli::cluster::DEFAULT_MODEL)]
    model: PathBuf,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Compute threads per worker.
    #[arg(long, default_value_t = 1)]
    threads_per_worker: usize,
    /// Concurrent streams to measure, e.g. 1,4,16,64.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Requests each stream makes, one after another. Four make each phase
    /// long enough that its ramp-up and tail are a small part of it (with
    /// two, a 16-stream phase lasted about a second, and the two ends cut
    /// its rate by 6–9% against the rate with every stream running).
    #[arg(long, default_value_t = 4)]
    requests: usize,
    /// Tokens per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Rounds over the concurrency list; each figure is the median round
    /// (a single-stream phase lasts about a second, so one round is noisy).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Micro-batches in flight through the pipeline (default: the coordinator's, one per stage, at least 2).
    #[arg(long)]
    max_inflight: Option<usize>,
    /// Shard cache for the workers (default: a fresh directory, removed after).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// What one stream saw of one request.
struct Timing {
    /// When the request was sent.
    sent: Instant,
    /// When each token's text arrived (never empty).
    arrivals: Vec<Instant>,
    /// Completion tokens, as the final usage reports them.
    tokens: u64,
}

impl Timing {
    fn ttft(&self) -> Duration {
        self.arrivals[0] - self.sent
    }

    fn gaps(&self) -> impl Iterator<Item = Duration> + '_ {
        self.arrivals.windows(2).map(|w| w[1] - w[0])
    }
}

/// The stretch when every stream was generating at once: from the last
/// stream's first token to the first stream's last token. The whole phase
/// also holds the ramp-up (every stream's first prefill at once) and the
/// tail (streams finishing one by one), when fewer streams run; `None` if
/// the streams never all overlapped.
fn all_streams_window(streams: &[Vec<Timing>]) -> Option<(Instant, Instant)> {
    let from = streams.iter().map(|s| s.first().map(|t| t.arrivals[0])).collect::<Option<Vec<_>>>()?;
    let to = streams.iter().map(|s| s.last().and_then(|t| t.arrivals.last().copied())).collect::<Option<Vec<_>>>()?;
    let (from, to) = (*from.iter().max()?, *to.iter().min()?);
    (to > from).then_some((from, to))
}

/// Tokens per second that arrived within `window`.
#[allow(clippy::cast_precision_loss)]
fn rate_within(streams: &[Vec<Timing>], (from, to): (Instant, Instant)) -> f64 {
    let inside = streams.iter().flatten().flat_map(|t| &t.arrivals).filter(|&&a| a >= from && a <= to).count();
    inside as f64 / (to - from).as_secs_f64()
}

impl ServeBench {
    pub fn run(self) -> anyhow::Result<()> {
        ensure!(
            self.model.exists(),
            "model {} not found: run scripts/fetch-model or pass --model",
            self.model.display()
        );
        ensure!(self.workers >= 1, "--workers must be at least 1");
        ensure!(self.threads_per_worker >= 1, "--threads-per-worker must be at least 1");
        ensure!(
            !self.concurrency.is_empty() && self.concurrency.iter().all(|&c| c >= 1),
            "--concurrency wants counts ≥ 1"
        );
        ensure!(self.requests >= 1 && self.max_tokens >= 2, "--requests ≥ 1 and --max-tokens ≥ 2");
        ensure!(self.runs >= 1, "--runs must be at least 1");
        let temp = std::env::temp_dir().join(format!("potluck-bench-serve-{}", std::process::id()));
        let cache = self.cache_dir.clone().unwrap_or_else(|| temp.clone());
        let most = self.concurrency.iter().copied().max().unwrap_or(1);
        let (workers, threads) = (self.workers.to_string(), (self.workers * self.threads_per_worker).to_string());
        let (model, cache_s, sessions) =
            (self.model.to_string_lossy(), cache.to_string_lossy(), most.max(64).to_string());
        let inflight = self.max_inflight.map(|n| n.to_string());
        let mut args = vec![
            "--workers",
            &workers,
            "--threads",
            &threads,
            "--model",
            &model,
            "--cache-dir",
            &cache_s,
            "--max-sessions",
            &sessions,
            "--queue",
            &sessions,
        ];
        if let Some(n) = &inflight {
            args.extend(["--max-inflight", n.as_str()]);
        }
        let up = UpChild::start(&args)?;
        stream(&up.http, "warm-up", 0, 4)?;
        // Rounds go over the whole list in turn, so every concurrency is
        // measured at several moments, side by side with the others.
        let mut rounds: Vec<Vec<Option<Value>>> = Vec::new();
        for round in 0..self.runs {
            let mut rows = Vec::new();
            for &c in &self.concurrency {
                let row = self.measure(&up.http, c);
                if let Err(e) = &row {
                    eprintln!("[bench] round {} of {}: {c} streams failed: {e:#}", round + 1, self.runs);
                }
                rows.push(row.ok());
            }
            rounds.push(rows);
        }
        drop(up);
        if self.cache_dir.is_none() {
            let _ = std::fs::remove_dir_all(&temp);
        }
        let rate = |row: &Option<Value>| row.as_ref().and_then(|r| r["decode_tok_s"].as_f64());
        let steady = |row: &Option<Value>| row.as_ref().and_then(|r| r["all_streams_tok_s"].as_f64());
        let one = self.concurrency.iter().position(|&c| c == 1);
        let mut by = serde_json::Map::new();
        for (i, &c) in self.concurrency.iter().enumerate() {
            let mut runs: Vec<&Option<Value>> = rounds.iter().map(|r| &r[i]).filter(|r| r.is_some()).collect();
            runs.sort_by(|a, b| rate(a).unwrap_or(0.0).total_cmp(&rate(b).unwrap_or(0.0)));
            let mut row = runs.get(runs.len() / 2).and_then(|r| (*r).clone()).unwrap_or(Value::Null);
            let rates: Vec<f64> = rounds.iter().filter_map(|r| rate(&r[i])).collect();
            // Each round's ratio compares phases run minutes apart at most.
            let mut ratios: Vec<f64> = rounds.iter().filter_map(|r| Some(rate(&r[i])? / rate(&r[one?])?)).collect();
            if !row.is_null() {
                row["runs_decode_tok_s"] = json!(rates);
                if !ratios.is_empty() {
                    row["vs_one_stream_by_round"] = json!(ratios.clone());
                    row["vs_one_stream"] = json!(percentile(&mut ratios, 0.5));
                }
                let mut overlapped: Vec<f64> =
                    rounds.iter().filter_map(|r| Some(steady(&r[i])? / steady(&r[one?])?)).collect();
                if !overlapped.is_empty() {
                    row["all_streams_vs_one_stream"] = json!(percentile(&mut overlapped, 0.5));
                }
            }
            by.insert(c.to_string(), row);
        }
        let report = json!({
            "model": self.model.display().to_string(),
            "workers": self.workers,
            "threads_per_worker": self.threads_per_worker,
            "requests_per_stream": self.requests,
            "max_tokens": self.max_tokens,
            "runs": self.runs,
            "concurrency": Value::Object(by),
        });
        super::print_report(&report, self.json)
    }

    /// Runs `c` streams at once, each making `requests` requests, and summarises them.
    #[allow(clippy::cast_precision_loss)]
    fn measure(&self, http: &str, c: usize) -> anyhow::Result<Value> {
        let before = busy_seconds(http)?;
        let sampler = BusySampler::start(http);
        let start = Instant::now();
        let handles: Vec<_> = (0..c)
            .map(|i| {
                let (http, requests, max_tokens) = (http.to_string(), self.requests, self.max_tokens);
                std::thread::spawn(move || -> anyhow::Result<Vec<Timing>> {
                    (0..requests)
                        .map(|r| stream(&http, &format!("Stream {i}, request {r}:"), i * 100 + r, max_tokens))
                        .collect()
                })
            })
            .collect();
        let mut streams = Vec::new();
        for h in handles {
            streams.push(h.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))??);
        }
        let wall = start.elapsed().as_secs_f64();
        let after = busy_seconds(http)?;
        let samples = sampler.finish();
        let window = all_streams_window(&streams);
        let timings: Vec<&Timing> = streams.iter().flatten().collect();
        let tokens: u64 = timings.iter().map(|t| t.tokens).sum();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut ttft: Vec<f64> = timings.iter().map(|t| ms(t.ttft())).collect();
        let mut itl: Vec<f64> = timings.iter().flat_map(|t| t.gaps().map(ms)).collect();
        let busy: Vec<f64> = after.iter().zip(&before).map(|(a, b)| (a - b) / wall).collect();
        let row = json!({
            "decode_tok_s": tokens as f64 / wall,
            "all_streams_tok_s": window.map(|w| rate_within(&streams, w)),
            "all_streams_busy_fraction": window.and_then(|(from, to)| busy_between(&samples, from, to)),
            "tokens": tokens,
            "seconds": wall,
            "ttft_ms": {"p50": percentile(&mut ttft, 0.5), "p99": percentile(&mut ttft, 0.99)},
            "itl_ms": {"p50": percentile(&mut itl, 0.5), "p99": percentile(&mut itl, 0.99)},
            "stage_busy_fraction": busy,
        });
        eprintln!("[bench] {c} streams: {:.1} tok/s", tokens as f64 / wall);
        Ok(row)
    }
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

/// One streaming completion over HTTP/1.0 (events are plain lines); times each token's arrival.
fn stream(http: &str, prompt: &str, seed: usize, max_tokens: usize) -> anyhow::Result<Timing> {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed, "stream": true,
        "stream_options": {"include_usage": true}})
    .to_string();
    let sent = Instant::now();
    let mut s = std::net::TcpStream::connect(http)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(
        s,
        "POST /v1/completions HTTP/1.0\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    ensure!(line.contains(" 200 "), "request failed: {line}");
    let (mut arrivals, mut tokens) = (Vec::new(), 0);
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).context("an event that is not JSON")?;
        ensure!(v.get("error").is_none(), "stream failed: {data}");
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        } else if v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
            arrivals.push(Instant::now());
        }
    }
    ensure!(!arrivals.is_empty(), "no token arrived");
    Ok(Timing { sent, arrivals, tokens })
}
