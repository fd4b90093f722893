//! Membership on a real etcd with real `potluck worker` and `potluck
//! coordinator` processes and the real model: workers join and leave a live
//! cluster, a killed worker's lease runs out, a standby coordinator takes
//! over, etcd restarts, stale epochs are fenced, and `potluck status` reads
//! what `/v1/cluster` shows.
//!
//! Two tests, each sharing one etcd and one cluster across its steps to keep
//! the wall time down; short TTLs and hold-downs. Durations are printed as
//! figures, never used as pass/fail gates (only generous timeouts that catch hangs).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use potluck_proto::v1 as pb;
use potluck_tests::etcd_cluster::EtcdCluster as Cluster;
use potluck_tests::etcd_cluster::{HOLD_DOWN_MS, TTL};
use potluck_tests::process::Proc;
use potluck_tests::{http_request, potluck};
use serde_json::{json, Value};

/// Catches hangs; not a performance gate.
const PATIENCE: Duration = Duration::from_secs(120);

fn cluster_json(http: &str) -> anyhow::Result<Value> {
    let (status, body) = http_request(http, "GET", "/v1/cluster", None)?;
    ensure!(status == 200, "/v1/cluster: {status} {body}");
    Ok(serde_json::from_str(&body)?)
}

fn complete(http: &str, prompt: &str, tokens: usize) -> anyhow::Result<(u16, String)> {
    let body = json!({"prompt": prompt, "max_tokens": tokens, "temperature": 0}).to_string();
    http_request(http, "POST", "/v1/completions", Some(&body))
}

fn ok_completion(http: &str) -> anyhow::Result<()> {
    let (status, body) = complete(http, "The capital of France is", 8)?;
    ensure!(status == 200, "completion failed: {status} {body}");
    let v: Value = serde_json::from_str(&body)?;
    ensure!(v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()), "no text: {body}");
    Ok(())
}

/// Polls `/v1/cluster` until `pred` holds; returns the view and how long it took.
fn wait_cluster(http: &str, what: &str, pred: impl Fn(&Value) -> bool) -> anyhow::Result<(Value, Duration)> {
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < PATIENCE {
        if let Ok(v) = cluster_json(http) {
            if pred(&v) {
                return Ok((v, start.elapsed()));
            }
            last = v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("{what}: not reached in {PATIENCE:?}; last /v1/cluster: {last}")
}

fn stages(v: &Value) -> usize {
    v["stages"].as_array().map_or(0, Vec::len)
}

fn epoch(v: &Value) -> u64 {
    v["epoch"].as_u64().unwrap_or(0)
}

fn ready(v: &Value) -> bool {
    v["ready"].as_bool() == Some(true)
}

/// Completions in a loop on another thread, counting successes and errors.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<String>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(http: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (s, o, e) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&errors));
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match complete(&http, "Once upon a time", 12) {
                    Ok((200, _)) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((code, body)) => {
                        e.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(format!("{code}: {body}"))
                    }
                    Err(err) => e.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(err.to_string()),
                }
            }
        });
        Self { stop, ok, errors, handle: Some(handle) }
    }

    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let errors = self.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        (self.ok.load(Ordering::Relaxed), errors)
    }
}

/// A `Forward` stamped with `epoch`, straight to a worker; returns the gRPC outcome.
fn forward_with_epoch(address: &str, epoch: u64) -> anyhow::Result<Result<pb::ForwardReply, tonic::Status>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut client = pb::stage_client::StageClient::connect(address.to_string()).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(pb::ForwardRequest {
            epoch,
            batch_id: 1,
            rows: vec![pb::Row { session: 999_999, position: 0, sample: true, sampling: None }],
            tokens: vec![1],
            hidden: None,
            traceparent: String::new(),
            tracestate: String::new(),
        })
        .await?;
        let mut replies = match client.forward(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Ok(Err(s)),
        };
        let reply = tokio::time::timeout(Duration::from_secs(30), replies.message()).await?;
        Ok(match reply {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(tonic::Status::unknown("stream ended without a reply")),
            Err(s) => Err(s),
        })
    })
}

/// Join (1 → 3 under load), fencing, `potluck status`, graceful leave, kill -9.
#[test]
fn workers_join_leave_and_die_on_a_live_cluster() -> anyhow::Result<()> {
    let started = Instant::now();
    let c = Cluster::new("membership")?;
    let (_coord, http) = c.coordinator("coord-a")?;
    let mut w1 = c.worker("w1")?;
    let (one, _) = wait_cluster(&http, "first plan", |v| ready(v) && stages(v) == 1)?;
    ok_completion(&http)?;

    // Join: a 2nd and a 3rd worker while a client loops on completions.
    let load = Load::start(http.clone());
    std::thread::sleep(Duration::from_millis(500));
    let mut w2 = c.worker("w2")?;
    let mut w3 = c.worker("w3")?;
    let (three, took) = wait_cluster(&http, "3 stages", |v| ready(v) && stages(v) == 3 && epoch(v) > epoch(&one))?;
    eprintln!("figure: 1 -> 3 workers re-planned in {took:?} (epoch {} -> {})", epoch(&one), epoch(&three));
    std::thread::sleep(Duration::from_secs(1));
    let (ok, errors) = load.finish();
    ensure!(errors.is_empty(), "the client saw errors during the join: {errors:?}");
    ensure!(ok > 0, "the looping client completed nothing");
    eprintln!("figure: {ok} completions, 0 errors, across the join");
    let mut workers: Vec<&str> =
        three["workers"].as_array().context("workers")?.iter().filter_map(|w| w["id"].as_str()).collect();
    workers.sort_unstable();
    ensure!(workers == ["w1", "w2", "w3"], "workers {workers:?}");
    ensure!(three["leader"] == "coord-a", "leader: {}", three["leader"]);
    ensure!(
        three["workers"][0]["layer_micros"].as_f64().is_some_and(|us| us > 0.0),
        "no start-up probe figure: {}",
        three["workers"][0]
    );

    // A flap shorter than the hold-down (w3's key deleted and written back at
    // once, as a blip would look to the watch) causes no re-plan.
    c.etcd.flap(&format!("/potluck/{}/workers/w3", c.name))?;
    std::thread::sleep(Duration::from_millis(3 * HOLD_DOWN_MS.parse::<u64>()?));
    let after_flap = cluster_json(&http)?;
    ensure!(epoch(&after_flap) == epoch(&three) && ready(&after_flap), "a flap re-planned: {after_flap}");
    let flapped = stages(&after_flap);
    ensure!(flapped == 3, "after the flap: {after_flap}");

    // Fencing: stage 0 refuses a Forward stamped with the previous epoch.
    let stage0 = three["stages"][0]["address"].as_str().context("stage 0 address")?;
    let stale = forward_with_epoch(stage0, epoch(&three) - 1)?;
    let status = stale.err().context("a stale-epoch Forward was accepted")?;
    ensure!(status.code() == tonic::Code::FailedPrecondition, "code {:?}: {}", status.code(), status.message());
    ensure!(status.message().contains("stale epoch"), "{}", status.message());
    ok_completion(&http)?;

    // `potluck status` prints what /v1/cluster shows.
    let etcd = c.etcd.endpoint();
    let run = potluck(&["status", "--etcd", &etcd, "--cluster", &c.name, "--json"])?;
    ensure!(run.success, "status failed: {}", run.stderr);
    let st: Value = serde_json::from_str(&run.stdout)?;
    let now = cluster_json(&http)?;
    ensure!(st["epoch"] == now["epoch"] && st["leader"] == now["leader"], "status {st} vs cluster {now}");
    let brief = |v: &Value| -> Vec<(Value, Value)> {
        v["stages"]
            .as_array()
            .map(|a| a.iter().map(|s| (s["worker"].clone(), s["layers"].clone())).collect())
            .unwrap_or_default()
    };
    ensure!(brief(&st) == brief(&now), "stages: status {st} vs cluster {now}");
    let ids = |v: &Value| -> Vec<Value> {
        v["workers"].as_array().map(|a| a.iter().map(|w| w["id"].clone()).collect()).unwrap_or_default()
    };
    ensure!(ids(&st) == ids(&now), "workers: status {st} vs cluster {now}");
    let text = potluck(&["status", "--etcd", &etcd, "--cluster", &c.name])?;
    ensure!(text.success, "status failed: {}", text.stderr);
    for needle in ["leader  coord-a", &format!("epoch   {}", epoch(&now)), "workers 3", "stages  3", "w1", "w2", "w3"] {
        ensure!(text.stdout.contains(needle), "`{needle}` missing from:\n{}", text.stdout);
    }

    // Graceful leave: w3 stops, the cluster re-plans to 2 stages, later requests succeed.
    let before = epoch(&now);
    w3.stop();
    ensure!(w3.log().contains("deregistered from etcd"), "w3 did not revoke its lease on SIGTERM: {}", w3.log());
    let (two, took) = wait_cluster(&http, "2 stages", |v| ready(v) && stages(v) == 2 && epoch(v) > before)?;
    eprintln!("figure: graceful leave re-planned in {took:?}");
    ok_completion(&http)?;

    // kill -9 mid-request: the coordinator fails over at once (the dead worker is fenced while
    // its lease still runs) and the request in flight completes; the record goes with the lease.
    let h = http.clone();
    let in_flight = std::thread::spawn(move || complete(&h, "1, 2, 3, 4, 5, 6, 7,", 400));
    std::thread::sleep(Duration::from_millis(800));
    let killed_at = Instant::now();
    w2.kill9();
    let (code, body) = join_within(in_flight, PATIENCE).context("the in-flight request hung after kill -9")??;
    eprintln!("figure: in-flight request answered {:?} after the kill: {code}", killed_at.elapsed());
    ensure!(code == 200, "the in-flight request should survive its worker's death: {code} {body}");
    let (_, took) = wait_cluster(&http, "1 stage", |v| ready(v) && stages(v) == 1 && epoch(v) > epoch(&two))?;
    eprintln!("figure: kill -9 failed over to 1 stage {took:?} after the kill (lease TTL {TTL} s)");
    wait_cluster(&http, "the dead worker's record to go", |v| v["workers"].as_array().map_or(0, Vec::len) == 1)?;
    ok_completion(&http)?;
    ensure!(w1.running(), "w1 exited: {}", w1.log());
    eprintln!("figure: workers_join_leave_and_die wall time {:?}", started.elapsed());
    Ok(())
}

fn join_within<T: Send + 'static>(h: std::thread::JoinHandle<T>, within: Duration) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    while !h.is_finished() {
        ensure!(Instant::now() < deadline, "did not finish in {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    h.join().map_err(|_| anyhow::anyhow!("thread panicked"))
}

/// Two coordinators: the standby redirects to the leader and takes over when
/// it is killed; then etcd restarts under the running cluster.
#[test]
fn standby_takes_over_and_etcd_restarts() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut c = Cluster::new("ha")?;
    let (mut a, http_a) = c.coordinator("coord-a")?;
    let w1 = c.worker("w1")?;
    let w2 = c.worker("w2")?;
    let (planned, _) = wait_cluster(&http_a, "first plan", |v| ready(v) && stages(v) == 2)?;
    ensure!(planned["leader"] == "coord-a", "{planned}");
    let (mut b, http_b) = c.coordinator("coord-b")?;

    // The standby redirects to the leader (and answers its own /health).
    let deadline = Instant::now() + PATIENCE;
    let (code, body) = loop {
        let r = http_request(&http_b, "GET", "/v1/cluster", None)?;
        if r.0 != 503 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(code == 307 && body.contains("coord-a"), "standby answered {code}: {body}");
    let (code, _) = http_request(&http_b, "GET", "/health", None)?;
    ensure!(code == 200, "standby /health: {code}");

    // Leader loss: kill -9 the leader; the standby serves.
    a.kill9();
    let killed = Instant::now();
    let mut last = String::new();
    while killed.elapsed() < PATIENCE {
        match complete(&http_b, "The capital of France is", 4) {
            Ok((200, _)) => break,
            Ok((code, body)) => last = format!("{code}: {body}"),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = killed.elapsed();
    ensure!(took < PATIENCE, "the standby never served; last answer {last}");
    eprintln!("figure: standby served {took:?} after the leader was killed (leader TTL {TTL} s)");
    let now = cluster_json(&http_b)?;
    ensure!(now["leader"] == "coord-b" && stages(&now) == 2, "{now}");
    ensure!(epoch(&now) >= epoch(&planned), "epoch went back: {} < {}", epoch(&now), epoch(&planned));
    ok_completion(&http_b)?;

    // etcd restart, down for longer than the lease TTL: the workers' leases and
    // the leadership lapse. Nothing of Potluck restarts; the workers register
    // again, coord-b is elected again, and the cluster serves.
    let registrations = |w: &Proc| w.log().matches("registered in etcd").count();
    let before = (registrations(&w1), registrations(&w2));
    c.etcd.restart(Duration::from_secs(3))?;
    let back = Instant::now();
    let mut served = false;
    while back.elapsed() < PATIENCE {
        if matches!(complete(&http_b, "Once upon a time", 4), Ok((200, _))) {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(served, "the cluster did not serve after the etcd restart");
    eprintln!("figure: serving again {:?} after etcd came back", back.elapsed());
    let etcd = c.etcd.endpoint();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let run = potluck(&["status", "--etcd", &etcd, "--cluster", &c.name, "--json"])?;
        let st: Value = serde_json::from_str(&run.stdout).unwrap_or(Value::Null);
        if st["workers"].as_array().map_or(0, Vec::len) == 2 && st["leader"] == "coord-b" {
            break;
        }
        ensure!(Instant::now() < deadline, "after the etcd restart: {}", run.stdout);
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + PATIENCE;
    while registrations(&w1) <= before.0 || registrations(&w2) <= before.1 {
        ensure!(Instant::now() < deadline, "the workers did not register again: {}\n{}", w1.log(), w2.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(b.running(), "coordinator b exited: {}", b.log());
    ok_completion(&http_b)?;
    eprintln!("figure: standby_takes_over_and_etcd_restarts wall time {:?}", started.elapsed());
    Ok(())
}

/// One stream's end: its text, its `finish_reason`, or the error event that ended it.
#[derive(Debug, Default)]
struct StreamEnd {
    text: String,
    finish: Option<String>,
    error: Option<String>,
}

/// Streams `requests` at once; `during` runs once `at_tokens` tokens have arrived in all.
/// Returns how each stream ended, and how many were still open when `during` returned.
fn stream_all(
    http: &str,
    requests: &[Value],
    at_tokens: usize,
    during: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<(Vec<StreamEnd>, usize)> {
    let tokens = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = requests
        .iter()
        .map(|body| {
            let (http, body, tokens, ended) = (http.to_string(), body.clone(), Arc::clone(&tokens), Arc::clone(&ended));
            std::thread::spawn(move || -> anyhow::Result<StreamEnd> {
                let mut sse = potluck_tests::SseStream::open(&http, "/v1/completions", &body)?;
                ensure!(sse.status == 200, "stream status {}", sse.status);
                let mut end = StreamEnd::default();
                while let Some(data) = sse.next_data()? {
                    if data == "[DONE]" {
                        break;
                    }
                    let v: Value = serde_json::from_str(&data)?;
                    if let Some(e) = v.get("error") {
                        end.error = Some(e.to_string());
                        break;
                    }
                    end.text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
                    end.finish = v["choices"][0]["finish_reason"].as_str().map(String::from).or(end.finish);
                    tokens.fetch_add(1, Ordering::Relaxed);
                }
                ended.fetch_add(1, Ordering::Relaxed);
                Ok(end)
            })
        })
        .collect();
    potluck_tests::wait_for(PATIENCE, || (tokens.load(Ordering::Relaxed) >= at_tokens).then_some(()))?;
    during()?;
    let open = requests.len() - ended.load(Ordering::Relaxed);
    let ends: anyhow::Result<Vec<StreamEnd>> =
        readers.into_iter().map(|r| r.join().map_err(|_| anyhow::anyhow!("a reader panicked"))?).collect();
    Ok((ends?, open))
}

/// Tokens per stream in the etcd restart test: enough to outlast the restart.
const TOKENS: usize = 300;

/// etcd restarts (same data, same ports), down for longer than every lease's
/// TTL, while completions stream through a cluster on etcd membership: every
/// stream ends as usual with the text the undisturbed cluster gave, the
/// workers register again with new leases, and the coordinator leads again.
#[test]
fn etcd_restart_during_streams_loses_nothing() -> anyhow::Result<()> {
    let mut c = Cluster::new("restart")?;
    let (mut coordinator, http) = c.coordinator_with("coord-a", &["--wire-dtype", "f32", "--min-workers", "2"])?;
    let (mut w1, mut w2) = (c.worker("w1")?, c.worker("w2")?);
    wait_cluster(&http, "first plan", |v| ready(v) && stages(v) == 2)?;
    let prompts = ["Once upon a time, in a small village by the sea,", "Here is a recipe for a simple tomato soup:"];
    let requests: Vec<Value> = (0..6)
        .map(|i| {
            let temperature = if i < 3 { 0.0 } else { 0.8 };
            json!({"prompt": prompts[i % 2], "max_tokens": TOKENS, "temperature": temperature, "seed": i, "stream": true})
        })
        .collect();
    let (reference, _) = stream_all(&http, &requests, 0, || Ok(()))?;
    for (i, r) in reference.iter().enumerate() {
        ensure!(r.error.is_none() && r.finish.is_some(), "undisturbed stream {i}: {r:?}");
    }

    let registrations = |w: &Proc| w.log().matches("registered in etcd").count();
    let before = (registrations(&w1), registrations(&w2));
    let stood_down = |p: &Proc| p.log().matches("standing down").count();
    let stood_down_before = stood_down(&coordinator);
    let mut restarted_at = Instant::now();
    let (disturbed, open) = stream_all(&http, &requests, requests.len() * TOKENS / 5, || {
        restarted_at = Instant::now();
        c.etcd.restart(Duration::from_secs(4))
    })?;
    eprintln!(
        "figure: streams ended {:?} after etcd went down (down 4 s); {open} of {} still open when etcd was back; \
         the coordinator stood down {} time(s)",
        restarted_at.elapsed(),
        requests.len(),
        stood_down(&coordinator) - stood_down_before
    );
    // Otherwise every stream ended before etcd was back, and the test shows nothing.
    ensure!(open > 0, "every stream ended before etcd came back: lengthen them");
    for (i, (got, want)) in disturbed.iter().zip(&reference).enumerate() {
        ensure!(got.error.is_none(), "stream {i} failed across the etcd restart: {:?}", got.error);
        ensure!(got.finish.is_some(), "stream {i} has no finish_reason");
        ensure!(got.text == want.text, "stream {i} differs from the undisturbed run:\n{:?}\n{:?}", got.text, want.text);
    }

    // The leases lapsed while etcd was down: each worker registers again, and
    // the coordinator leads and serves again with both workers.
    let deadline = Instant::now() + PATIENCE;
    while registrations(&w1) <= before.0 || registrations(&w2) <= before.1 {
        ensure!(Instant::now() < deadline, "the workers did not register again: {}\n{}", w1.log(), w2.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (after, _) = wait_cluster(&http, "both workers back", |v| {
        ready(v) && v["leader"] == "coord-a" && v["workers"].as_array().map_or(0, Vec::len) == 2
    })?;
    ensure!(stages(&after) == 2, "{after}");
    ok_completion(&http)?;
    ensure!(coordinator.running() && w1.running() && w2.running(), "a process exited: {}", coordinator.log());
    Ok(())
}
