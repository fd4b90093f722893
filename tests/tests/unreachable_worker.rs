//! An unreachable worker is named, and nothing hangs: a coordinator and
//! workers as separate processes, one of them killed with SIGKILL between
//! requests (the cluster fails over to the worker left, and names the dead
//! one in its events; with none left, requests get a 503 that says why), or
//! joining with an address nobody listens on.

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use potluck_tests::{http_request, require_real_model, Announce, Daemon};
use serde_json::{json, Value};

/// A `potluck coordinator` on ports of its own, waiting for `workers` workers.
struct Coordinator {
    daemon: Daemon,
    grpc: String,
    http: String,
}

impl Coordinator {
    fn start(workers: usize, extra: &[&str]) -> anyhow::Result<Self> {
        let model = require_real_model()?;
        let workers = workers.to_string();
        let mut args: Vec<&OsStr> = vec![
            "coordinator".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--grpc".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--http".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--min-workers".as_ref(),
            workers.as_ref(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        // "[potluck] coordinator: gRPC 127.0.0.1:X, HTTP http://127.0.0.1:Y"
        let (daemon, line) = Daemon::start(&args, Announce::Stderr, "coordinator: gRPC ")?;
        let (grpc, http) = line.split_once(", HTTP http://").with_context(|| format!("odd line {line:?}"))?;
        Ok(Self { daemon, grpc: grpc.to_string(), http: http.to_string() })
    }

    fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_request(&self.http, "GET", path, None)
    }

    fn cluster(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&self.get("/v1/cluster")?.1)?)
    }

    fn complete(&self, prompt: &str, tokens: usize) -> anyhow::Result<(u16, String)> {
        let body = json!({"prompt": prompt, "max_tokens": tokens, "temperature": 0}).to_string();
        http_request(&self.http, "POST", "/v1/completions", Some(&body))
    }

    /// Polls `/v1/cluster` until `done` holds for it (a plan takes a while: shards are cut and shipped).
    fn wait_for(&self, what: &str, done: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let v = self.cluster()?;
            if done(&v) {
                return Ok(v);
            }
            ensure!(Instant::now() < deadline, "no {what} after 180 s: {v}\ncoordinator said:\n{}", self.daemon.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A `potluck worker` joined to `coordinator`, with `extra` flags; returns it and its listening address.
fn worker(c: &Coordinator, id: &str, cache: &std::path::Path, extra: &[&str]) -> anyhow::Result<(Daemon, String)> {
    let mut args: Vec<&OsStr> = ["worker", "--listen", "127.0.0.1:0", "--coordinator", &c.grpc, "--threads", "1"]
        .into_iter()
        .map(OsStr::new)
        .collect();
    args.extend([OsStr::new("--id"), OsStr::new(id), OsStr::new("--cache-dir"), cache.as_os_str()]);
    args.extend(extra.iter().map(OsStr::new));
    let (daemon, listen) = Daemon::start(&args, Announce::Stderr, "worker listening on ")?;
    Ok((daemon, format!("http://{listen}")))
}

/// The error message of an OpenAI-shaped error body, checked to be a server-side (5xx) failure.
fn server_error(status: u16, body: &str) -> anyhow::Result<String> {
    ensure!((500..600).contains(&status), "expected a 5xx, got {status}: {body}");
    let v: Value = serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?;
    Ok(v["error"]["message"].as_str().with_context(|| format!("no error.message: {body}"))?.to_string())
}

#[test]
fn a_killed_worker_is_failed_over_and_named_and_nothing_hangs() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let c = Coordinator::start(2, &["--failover-timeout", "2"])?;
    let mut workers = Vec::new();
    for id in ["w-a", "w-b"] {
        let (daemon, addr) = worker(&c, id, cache.path(), &[])?;
        workers.push((id, daemon, addr));
    }
    let v = c.wait_for("plan", |v| v["ready"] == true)?;
    let stages = v["stages"].as_array().context("stages")?;
    ensure!(stages.len() == 2, "{v}");
    // Stage order is the planner's; take the workers in that order.
    for (i, stage) in stages.iter().enumerate() {
        let id = stage["worker"].as_str().context("worker")?;
        let at = workers.iter().position(|w| w.0 == id).with_context(|| format!("unknown worker {id}"))?;
        workers.swap(i, at);
    }
    let (first_id, mut first_stage, first_stage_addr) = workers.remove(0);
    let (last_id, mut last_stage, last_addr) = workers.remove(0);
    let (status, body) = c.complete("The capital of France is", 4)?;
    ensure!(status == 200, "{status}: {body}");

    // The last stage dies between requests: the next request fails over to the worker left and is served.
    last_stage.kill_hard()?;
    let (status, body) = c.complete("The capital of France is", 4)?;
    ensure!(status == 200, "the request should be served after a failover: {status} {body}");
    let v = c.wait_for("a plan without the dead worker", |v| {
        v["ready"] == true && v["stages"].as_array().map(Vec::len) == Some(1)
    })?;
    let named = format!("worker {last_id} at {last_addr}");
    let events = v["events"].to_string();
    eprintln!("events after the last stage died: {events}");
    assert!(events.contains("failover") && events.contains(&named), "the events do not name {named}: {events}");

    // Then stage 0, the last worker: requests wait out the failover timeout, then 503 naming it.
    first_stage.kill_hard()?;
    for attempt in 0..2 {
        let (status, body) = c.complete("The capital of France is", 4)?;
        let message = server_error(status, &body)?;
        eprintln!("every worker killed, request {attempt}: {status} {message}");
        assert_eq!(status, 503, "request {attempt}: {message}");
        assert!(message.contains("no capacity"), "request {attempt}: the error does not say why: {message}");
    }
    let v = c.cluster()?;
    let events = v["events"].to_string();
    let named = format!("worker {first_id} at {first_stage_addr}");
    assert!(events.contains(&named), "the events do not name {named}: {events}");
    // The coordinator itself still answers.
    ensure!(c.get("/health")?.0 == 200, "coordinator unhealthy");
    Ok(())
}

#[test]
fn a_worker_advertising_an_address_nobody_listens_on_is_named() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let c = Coordinator::start(2, &[])?;
    // A port that was free a moment ago and has no listener now.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("http://{}", l.local_addr()?)
    };
    let _good = worker(&c, "w-good", cache.path(), &[])?;
    let _bad = worker(&c, "w-ghost", cache.path(), &["--advertise", &dead])?;
    let v = c.wait_for("planning error", |v| !v["error"].is_null())?;
    let error = v["error"].as_str().context("error")?;
    eprintln!("/v1/cluster error: {error}");
    assert!(error.contains("w-ghost") && error.contains(&dead), "the error does not name w-ghost at {dead}: {v}");
    assert_eq!(v["ready"], false, "{v}");
    let (status, body) = c.get("/ready")?;
    assert_eq!(status, 503, "/ready: {body}");
    let (status, body) = c.complete("Hello", 2)?;
    let message = server_error(status, &body)?;
    eprintln!("completion: {status} {message}");
    assert!(message.contains("w-ghost") && message.contains(&dead), "the error does not name w-ghost: {message}");
    Ok(())
}
