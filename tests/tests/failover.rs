//! Lossless failover with real processes: a worker dies (kill -9) or stops
//! (SIGSTOP) mid-stream, and every stream still ends as usual, with the text
//! an undisturbed cluster gives. With an f32 wire every plan computes the same
//! bits, so the replay on the new plan (a spare swapped in, or the pipeline
//! shrunk) continues each greedy and seeded stream exactly.
//!
//! One undisturbed run is the reference for every test here, and the tests
//! take turns (each runs a cluster of its own on the same few cores).

use std::ffi::OsStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use potluck_tests::{http_request, metric, require_real_model, wait_for, Announce, Daemon, SseStream};
use serde_json::{json, Value};

const STREAMS: usize = 16;
const TOKENS: usize = 200;
const PROMPTS: [&str; 4] = [
    "Once upon a time, in a small village by the sea,",
    "The three most important inventions in history are",
    "Here is a recipe for a simple tomato soup:",
    "Dear diary, today I learned that",
];

/// The tests take turns.
fn turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn args<'a>(a: &[&'a str]) -> Vec<&'a OsStr> {
    a.iter().map(|s| OsStr::new(*s)).collect()
}

/// Request `i`: the first half greedy, the second seeded at temperature 0.8.
fn request(i: usize) -> Value {
    let temperature = if i < STREAMS / 2 { 0.0 } else { 0.8 };
    json!({"prompt": PROMPTS[i % PROMPTS.len()], "max_tokens": TOKENS, "temperature": temperature,
        "seed": i, "stream": true})
}

/// A coordinator (f32 wire) and its workers, each a process of its own.
struct Cluster {
    http: String,
    grpc: String,
    cache: tempfile::TempDir,
    workers: Vec<(String, Option<Daemon>)>,
    coordinator: Daemon,
}

impl Cluster {
    fn start(workers: usize, max_stages: Option<usize>, extra: &[&str]) -> anyhow::Result<Self> {
        let model = require_real_model()?;
        let model = model.to_str().context("path")?;
        let stages = max_stages.unwrap_or(workers).to_string();
        let mut a = vec!["coordinator", "--model", model, "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"];
        a.extend(["--wire-dtype", "f32", "--min-workers", &stages, "--max-stages", &stages]);
        a.extend(extra);
        let (coordinator, line) = Daemon::start(&args(&a), Announce::Stderr, "coordinator: gRPC ")?;
        let (grpc, http) = line.split_once(", HTTP http://").with_context(|| format!("odd line {line:?}"))?;
        let mut c = Self {
            http: http.to_string(),
            grpc: grpc.to_string(),
            cache: tempfile::tempdir()?,
            workers: Vec::new(),
            coordinator,
        };
        for i in 0..workers {
            c.add_worker(&format!("w{i}"))?;
        }
        c.wait_ready(max_stages.unwrap_or(workers))?;
        Ok(c)
    }

    fn add_worker(&mut self, id: &str) -> anyhow::Result<()> {
        let cache = self.cache.path().to_str().context("path")?;
        let a = ["worker", "--listen", "127.0.0.1:0", "--coordinator", &self.grpc, "--threads", "1", "--id", id];
        let mut a = args(&a);
        a.extend(args(&["--cache-dir", cache]));
        let (d, _) = Daemon::start(&a, Announce::Stderr, "worker listening on ")?;
        match self.workers.iter_mut().find(|(w, _)| w == id) {
            Some(slot) => slot.1 = Some(d),
            None => self.workers.push((id.to_string(), Some(d))),
        }
        Ok(())
    }

    fn info(&self) -> anyhow::Result<Value> {
        let (status, body) = http_request(&self.http, "GET", "/v1/cluster", None)?;
        ensure!(status == 200, "/v1/cluster: {status}");
        Ok(serde_json::from_str(&body)?)
    }

    fn wait_ready(&self, stages: usize) -> anyhow::Result<Value> {
        wait_for(Duration::from_secs(120), || {
            self.info().ok().filter(|c| c["ready"] == true && c["stages"].as_array().map(Vec::len) == Some(stages))
        })
    }

    /// The process of the worker running stage `i`.
    fn stage_worker(&mut self, i: usize) -> anyhow::Result<&mut Daemon> {
        let info = self.info()?;
        let id = info["stages"][i]["worker"].as_str().context("no such stage")?.to_string();
        self.workers.iter_mut().find(|(w, _)| *w == id).and_then(|(_, d)| d.as_mut()).context("unknown worker")
    }
}

/// One stream's text, how it ended, and when each token arrived.
#[derive(Debug, Default)]
struct Outcome {
    text: String,
    finish: Option<String>,
    error: Option<String>,
    arrivals: Vec<Instant>,
}

/// Runs every request at once; `during` is called once `at_tokens` tokens have arrived in all.
fn run_streams(
    http: &str,
    at_tokens: usize,
    during: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Outcome>> {
    let outcomes: Arc<Vec<Mutex<Outcome>>> = Arc::new((0..STREAMS).map(|_| Mutex::default()).collect());
    let mut readers = Vec::new();
    for i in 0..STREAMS {
        let (http, outcomes) = (http.to_string(), Arc::clone(&outcomes));
        readers.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let mut s = SseStream::open(&http, "/v1/completions", &request(i))?;
            ensure!(s.status == 200, "stream {i}: status {}", s.status);
            while let Some(d) = s.next_data()? {
                if d == "[DONE]" {
                    break;
                }
                let v: Value = serde_json::from_str(&d)?;
                let mut o = outcomes[i].lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                if let Some(e) = v.get("error") {
                    o.error = Some(e.to_string());
                    break;
                }
                let choice = &v["choices"][0];
                o.text.push_str(choice["text"].as_str().unwrap_or(""));
                o.arrivals.push(Instant::now());
                if let Some(f) = choice["finish_reason"].as_str() {
                    o.finish = Some(f.to_string());
                }
            }
            Ok(())
        }));
    }
    let count = || outcomes.iter().map(|o| o.lock().map_or(0, |o| o.arrivals.len())).sum::<usize>();
    wait_for(Duration::from_secs(300), || (count() >= at_tokens).then_some(()))?;
    during()?;
    for r in readers {
        r.join().map_err(|_| anyhow::anyhow!("a reader panicked"))??;
    }
    let outcomes = Arc::try_unwrap(outcomes).map_err(|_| anyhow::anyhow!("readers still hold the outcomes"))?;
    outcomes.into_iter().map(|o| o.into_inner().map_err(|_| anyhow::anyhow!("poisoned"))).collect()
}

/// The texts of an undisturbed cluster, computed once for every test.
fn reference() -> anyhow::Result<&'static Vec<String>> {
    static REFERENCE: OnceLock<Vec<String>> = OnceLock::new();
    if let Some(r) = REFERENCE.get() {
        return Ok(r);
    }
    let c = Cluster::start(3, None, &[])?;
    let outcomes = run_streams(&c.http, 0, || Ok(()))?;
    let texts = outcomes
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            ensure!(o.error.is_none() && o.finish.is_some(), "reference stream {i}: {o:?}");
            Ok(o.text)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(REFERENCE.get_or_init(|| texts))
}

/// Checks every stream against the reference and returns each one's
/// largest gap between two tokens after `since`.
fn check(outcomes: &[Outcome], since: Instant, what: &str) -> anyhow::Result<Vec<Duration>> {
    let want = reference()?;
    let mut stalls = Vec::new();
    for (i, (o, w)) in outcomes.iter().zip(want).enumerate() {
        ensure!(o.error.is_none(), "{what}: stream {i} failed: {:?}", o.error);
        ensure!(o.finish.is_some(), "{what}: stream {i} has no finish_reason");
        ensure!(&o.text == w, "{what}: stream {i} differs from the undisturbed run:\n{:?}\n{:?}", o.text, w);
        let gap = o.arrivals.windows(2).filter(|p| p[1] > since).map(|p| p[1] - p[0]).max().unwrap_or_default();
        stalls.push(gap);
    }
    stalls.sort();
    Ok(stalls)
}

fn report(what: &str, stalls: &[Duration]) {
    let median = stalls.get(stalls.len() / 2).copied().unwrap_or_default();
    let max = stalls.last().copied().unwrap_or_default();
    eprintln!("[stall] {what}: median {:.2} s, max {:.2} s", median.as_secs_f64(), max.as_secs_f64());
}

/// Prints when the kill happened and the coordinator's log of the failover
/// steps (its timestamps are UTC), so a stall can be taken apart.
fn show_failover_steps(c: &Cluster, killed: std::time::SystemTime) {
    let since = killed.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let day = since.as_secs_f64() % 86_400.0;
    let (h, m, sec) = ((day / 3600.0) as u64, (day % 3600.0 / 60.0) as u64, day % 60.0);
    eprintln!("[stall] killed at {h:02}:{m:02}:{sec:06.3} UTC");
    let steps = ["WARN", "probed the stages", "applying plan", "plan ready", "failover done", "replayed", "joined"];
    for line in c.coordinator.log().lines().filter(|l| steps.iter().any(|s| l.contains(s))) {
        eprintln!("[stall]   {line}");
    }
}

fn kill_stage_mid_stream(workers: usize, stages: usize, stage: usize) -> anyhow::Result<Vec<Duration>> {
    let mut c = Cluster::start(workers, Some(stages), &[])?;
    let what = format!("kill -9 stage {stage} of {stages}, {} spare(s)", workers - stages);
    let http = c.http.clone();
    let mut killed_at = Instant::now();
    let mut killed_wall = std::time::SystemTime::now();
    let outcomes = run_streams(&http, STREAMS * TOKENS / 3, || {
        killed_at = Instant::now();
        killed_wall = std::time::SystemTime::now();
        c.stage_worker(stage)?.kill_hard()
    })?;
    let stalls = check(&outcomes, killed_at, &what)?;
    report(&what, &stalls);
    show_failover_steps(&c, killed_wall);
    let after = c.info()?;
    ensure!(after["ready"] == true, "{what}: not ready after: {after}");
    let failovers: f64 = metric(&http_request(&c.http, "GET", "/metrics", None)?.1, "potluck_failovers_total")
        .iter()
        .map(|(_, v)| v)
        .sum();
    ensure!(failovers >= 1.0, "{what}: no failover counted");
    Ok(stalls)
}

#[test]
fn kill_9_of_any_stage_with_a_spare_loses_nothing() -> anyhow::Result<()> {
    let _turn = turn();
    reference()?;
    for stage in [0, 1, 2] {
        kill_stage_mid_stream(4, 3, stage)?;
    }
    Ok(())
}

#[test]
fn kill_9_without_a_spare_shrinks_the_pipeline_and_loses_nothing() -> anyhow::Result<()> {
    let _turn = turn();
    reference()?;
    kill_stage_mid_stream(3, 3, 1)?;
    Ok(())
}

#[test]
fn a_stopped_worker_is_treated_as_dead_and_does_no_harm_when_it_continues() -> anyhow::Result<()> {
    let _turn = turn();
    reference()?;
    let mut c = Cluster::start(4, Some(3), &["--deadline-floor", "2"])?;
    let pid = c.stage_worker(1)?.pid().to_string();
    let before = c.info()?;
    let stopped_id = before["stages"][1]["worker"].as_str().context("stage 1")?.to_string();
    let stopped_instance = before["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["id"] == stopped_id.as_str()))
        .map(|w| w["instance"].clone())
        .context("the stopped worker's record")?;
    let mut stopped_at = Instant::now();
    let outcomes = run_streams(&c.http.clone(), STREAMS * TOKENS / 3, || {
        stopped_at = Instant::now();
        let s = std::process::Command::new("kill").args(["-STOP", &pid]).status()?;
        ensure!(s.success(), "kill -STOP failed");
        Ok(())
    })?;
    let stalls = check(&outcomes, stopped_at, "SIGSTOP stage 1")?;
    report("SIGSTOP stage 1 of 3, 1 spare", &stalls);
    let s = std::process::Command::new("kill").args(["-CONT", &pid]).status()?;
    ensure!(s.success(), "kill -CONT failed");
    // Whatever the continued worker still sends carries the old epoch, and every stage refuses it.
    let now = c.info()?;
    ensure!(now["epoch"].as_u64() > before["epoch"].as_u64(), "a new epoch after the failover: {now}");
    let first = now["stages"][0]["address"].as_str().context("stage 0")?;
    stale_epoch_is_refused(first, before["epoch"].as_u64().context("epoch")?)?;
    // The continued worker holds a stale epoch: it is out of the plan, and serving goes on untouched.
    let outcomes = run_streams(&c.http.clone(), 0, || Ok(()))?;
    check(&outcomes, Instant::now(), "after SIGCONT")?;
    // It notices its freeze and joins again as a new member: the only spare now.
    wait_for(Duration::from_secs(60), || {
        let info = c.info().ok()?;
        let me = info["workers"].as_array()?.iter().find(|w| w["id"] == stopped_id.as_str())?.clone();
        (me["instance"] != stopped_instance).then_some(())
    })
    .context("the continued worker did not join again")?;
    // Kill a serving stage: the re-joined worker must take its place.
    let mut killed_at = Instant::now();
    let outcomes = run_streams(&c.http.clone(), STREAMS * TOKENS / 3, || {
        killed_at = Instant::now();
        c.stage_worker(0)?.kill_hard()
    })?;
    let stalls = check(&outcomes, killed_at, "kill -9 after the re-join")?;
    report("kill -9 stage 0 of 3, the re-joined worker as spare", &stalls);
    let info = c.wait_ready(3)?;
    let serving: Vec<&str> =
        info["stages"].as_array().context("stages")?.iter().filter_map(|s| s["worker"].as_str()).collect();
    ensure!(serving.contains(&stopped_id.as_str()), "the re-joined worker should serve now: {serving:?}");
    Ok(())
}

/// Sends stage 0 at `address` a micro-batch stamped with `epoch` and expects "stale epoch".
fn stale_epoch_is_refused(address: &str, epoch: u64) -> anyhow::Result<()> {
    use potluck_proto::v1 as pb;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut client = pb::stage_client::StageClient::connect(address.to_string()).await?;
        let row = pb::Row { session: 1 << 40, position: 0, sample: true, sampling: None };
        let request = pb::ForwardRequest { epoch, batch_id: 1, rows: vec![row], tokens: vec![1], ..Default::default() };
        let mut replies = client.forward(tokio_stream::iter(vec![request])).await?.into_inner();
        match replies.message().await {
            Err(s) => ensure!(
                s.code() == tonic::Code::FailedPrecondition && s.message().contains("stale epoch"),
                "expected a stale epoch refusal, got {s:?}"
            ),
            Ok(r) => anyhow::bail!("a micro-batch of epoch {epoch} was served: {r:?}"),
        }
        Ok(())
    })
}

#[test]
fn with_every_worker_gone_requests_wait_then_get_503_and_a_returning_worker_restores_service() -> anyhow::Result<()> {
    let _turn = turn();
    let mut c = Cluster::start(1, None, &["--failover-timeout", "3"])?;
    c.stage_worker(0)?.kill_hard()?;
    let body = json!({"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}).to_string();
    let asked = Instant::now();
    let (status, text) = http_request(&c.http, "POST", "/v1/completions", Some(&body))?;
    ensure!(status == 503, "expected 503 with no workers, got {status}: {text}");
    ensure!(text.contains("no capacity"), "the 503 should say why: {text}");
    ensure!(asked.elapsed() >= Duration::from_secs(3), "the request should have waited for capacity first");
    let (ready, why) = http_request(&c.http, "GET", "/ready", None)?;
    ensure!(ready == 503 && why.contains("no capacity"), "/ready: {ready} {why}");
    c.add_worker("back")?;
    c.wait_ready(1)?;
    let (status, text) = http_request(&c.http, "POST", "/v1/completions", Some(&body))?;
    ensure!(status == 200, "service should resume by itself: {status} {text}");
    Ok(())
}

/// Child processes of `parent` whose command line holds `needle`, as (pid, command line).
fn children_of(parent: u32, needle: &str) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The parent is the second field after the parenthesised command name.
            let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).ok()?.replace('\0', " ");
            (ppid == parent && cmd.contains(needle)).then_some((pid, cmd))
        })
        .collect()
}

fn process_exists(pid: u32) -> bool {
    // A zombie has no command line left: it is gone as far as this test cares.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

#[test]
fn potluck_up_restarts_a_killed_worker_and_keeps_serving() -> anyhow::Result<()> {
    let _turn = turn();
    reference()?;
    let up = potluck_tests::UpCluster::start(&["--workers", "3", "--spares", "1", "--wire-dtype", "f32"])?;
    let info = |http: &str| -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&http_request(http, "GET", "/v1/cluster", None)?.1)?)
    };
    let before = info(&up.http)?;
    let victim = before["stages"][1]["worker"].as_str().context("no stage 1")?.to_string();
    let instance = |c: &Value| {
        c["workers"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["id"] == victim.as_str()))
            .map(|w| w["instance"].clone())
    };
    let old_instance = instance(&before).context("the victim is not a member")?;
    let pids: Vec<u32> = children_of(up.pid(), " worker ").into_iter().map(|(p, _)| p).collect();
    ensure!(pids.len() == 4, "potluck up should run 4 workers: {pids:?}");
    let (pid, _) =
        children_of(up.pid(), &format!("--id {victim}")).into_iter().next().context("the victim's process")?;
    // /ready is watched throughout: the spare can hold the model, so it never says no.
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let not_ready = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let (http, watching, not_ready) = (up.http.clone(), Arc::clone(&watching), Arc::clone(&not_ready));
        std::thread::spawn(move || {
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((status, body)) = http_request(&http, "GET", "/ready", None) {
                    if status != 200 {
                        if let Ok(mut n) = not_ready.lock() {
                            n.push(format!("{status} {body}"));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut killed_at = Instant::now();
    let outcomes = run_streams(&up.http, STREAMS * TOKENS / 3, || {
        killed_at = Instant::now();
        let s = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status()?;
        ensure!(s.success(), "kill -9 failed");
        Ok(())
    })?;
    let stalls = check(&outcomes, killed_at, "potluck up, kill -9 stage 1")?;
    report("potluck up, kill -9 stage 1 of 3, 1 spare", &stalls);
    wait_for(Duration::from_secs(60), || {
        info(&up.http).ok().and_then(|c| instance(&c)).filter(|i| *i != old_instance).map(|_| ())
    })
    .context("the killed worker did not come back as a new member")?;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    watcher.join().map_err(|_| anyhow::anyhow!("the watcher panicked"))?;
    let not_ready = not_ready.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    ensure!(not_ready.is_empty(), "/ready said no while a spare could serve: {not_ready:?}");
    let workers: Vec<u32> = children_of(up.pid(), " worker ").into_iter().map(|(p, _)| p).collect();
    drop(up);
    wait_for(Duration::from_secs(15), || workers.iter().all(|&p| !process_exists(p)).then_some(()))
        .context("potluck up left worker processes behind")?;
    Ok(())
}

/// A small deterministic generator, so a failing chaos run can be repeated.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

#[test]
fn chaos_under_load_loses_nothing() -> anyhow::Result<()> {
    let _turn = turn();
    reference()?;
    let seconds: u64 = std::env::var("POTLUCK_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let mut c = Cluster::start(4, Some(3), &["--deadline-floor", "2"])?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let (http, stop) = (c.http.clone(), Arc::clone(&stop));
            std::thread::spawn(move || -> anyhow::Result<usize> {
                let want = &reference()?[i];
                let mut body = request(i);
                body["stream"] = json!(false);
                let mut done = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, text) = http_request(&http, "POST", "/v1/completions", Some(&body.to_string()))?;
                    ensure!(status == 200, "client {i}: {status} {text}");
                    let v: Value = serde_json::from_str(&text)?;
                    ensure!(
                        v["choices"][0]["text"].as_str() == Some(want.as_str()),
                        "client {i}: the text differs: {text}"
                    );
                    done += 1;
                }
                Ok(done)
            })
        })
        .collect();
    let mut dice = Dice(seconds);
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(3000 + dice.below(5000)));
        let ids: Vec<String> = c.workers.iter().map(|(id, _)| id.clone()).collect();
        let id = ids[usize::try_from(dice.below(ids.len() as u64))?].clone();
        let Some(d) = c.workers.iter_mut().find(|(w, _)| *w == id).and_then(|(_, d)| d.as_mut()) else { continue };
        match dice.below(3) {
            0 => d.kill_hard()?,
            1 => {
                let pid = d.pid().to_string();
                std::process::Command::new("kill").args(["-STOP", &pid]).status()?;
                std::thread::sleep(Duration::from_millis(2000 + dice.below(2000)));
                std::process::Command::new("kill").args(["-CONT", &pid]).status()?;
            }
            _ => {}
        }
        // Every action ends with the worker started again: a new member.
        if let Some((_, slot)) = c.workers.iter_mut().find(|(w, _)| *w == id) {
            *slot = None;
        }
        c.add_worker(&id)?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut served = 0;
    for client in clients {
        served += client.join().map_err(|_| anyhow::anyhow!("a client panicked"))??;
    }
    ensure!(served > 0, "no request completed");
    let kv = wait_for(Duration::from_secs(30), || {
        let m = http_request(&c.http, "GET", "/metrics", None).ok()?.1;
        let kv = metric(&m, "potluck_worker_kv_bytes");
        (!kv.is_empty() && kv.iter().all(|(_, v)| *v == 0.0)).then_some(kv)
    })
    .context("KV bytes did not return to 0 on the workers")?;
    eprintln!("[chaos] {seconds} s, {served} requests served, KV after: {kv:?}");
    let pids: Vec<u32> = c.workers.iter().filter_map(|(_, d)| d.as_ref().map(Daemon::pid)).collect();
    drop(c);
    wait_for(Duration::from_secs(15), || pids.iter().all(|&p| !process_exists(p)).then_some(()))
        .context("worker processes were left behind")?;
    Ok(())
}
