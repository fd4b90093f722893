//! Distributed tracing end to end: a real OTLP/gRPC collector
//! (`tests/otlp_receiver.py`), `potluck up --otlp-endpoint` with two worker
//! processes, one completion; the coordinator's and both workers' spans must
//! join the completion's trace, stage 1's forward a child of stage 0's.

use std::collections::HashSet;
use std::io::BufRead as _;

use anyhow::{ensure, Context as _};
use potluck_tests::{workspace_root, UpCluster};
use serde_json::json;

/// `POTLUCK_PYTHON` (set by `scripts/test` to its venv), else `python3`.
fn python() -> String {
    std::env::var("POTLUCK_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn receiver_deps_present(python: &str) -> bool {
    std::process::Command::new(python)
        .args(["-c", "import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The collector process; killed on drop.
struct Receiver {
    child: std::process::Child,
    port: u16,
}

impl Receiver {
    fn start(python: &str, out: &std::path::Path) -> anyhow::Result<Self> {
        let mut child = std::process::Command::new(python)
            .arg(workspace_root().join("tests/otlp_receiver.py"))
            .arg(out)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting tests/otlp_receiver.py")?;
        let stdout = child.stdout.take().context("receiver stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let mut receiver = Self { child, port: 0 };
        receiver.port = line
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| format!("receiver said {line:?}"))?;
        Ok(receiver)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    service: String,
    instance: String,
}

fn spans(path: &std::path::Path) -> anyhow::Result<Vec<Span>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            let field = |k: &str| v[k].as_str().map(str::to_string).with_context(|| format!("{k} in {l}"));
            Ok(Span {
                trace_id: field("trace_id")?,
                span_id: field("span_id")?,
                parent: field("parent")?,
                name: field("name")?,
                service: field("service")?,
                instance: field("instance")?,
            })
        })
        .collect()
}

#[test]
fn a_completion_is_one_trace_across_the_coordinator_and_both_workers() -> anyhow::Result<()> {
    let python = python();
    if !receiver_deps_present(&python) {
        ensure!(
            std::env::var("CI").is_err(),
            "CI: {python} lacks grpcio/opentelemetry-proto (scripts/test installs them into .venv)"
        );
        eprintln!(
            "SKIPPED: {python} lacks the PyPI packages grpcio and opentelemetry-proto; \
             run scripts/test (or set POTLUCK_PYTHON to a python that has them)"
        );
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("spans.jsonl");
    let receiver = Receiver::start(&python, &out)?;
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let cache = dir.path().join("cache");
    let cluster = UpCluster::start(&[
        "--workers",
        "2",
        "--threads",
        "2",
        "--otlp-endpoint",
        &endpoint,
        "--cache-dir",
        cache.to_str().context("path")?,
    ])?;
    let (status, body) = cluster
        .post("/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}))?;
    ensure!(status == 200, "status {status}: {body}");
    // SIGTERM: `potluck up` stops its workers the same way; every process flushes its spans on the way out.
    drop(cluster);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let spans = loop {
        let spans = spans(&out)?;
        let done = spans.iter().filter(|s| s.service == "potluck-worker").map(|s| &s.instance).collect::<HashSet<_>>();
        if done.len() >= 2 || std::time::Instant::now() > deadline {
            break spans;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    drop(receiver);

    let root = spans
        .iter()
        .find(|s| s.service == "potluck-coordinator" && s.name == "generate")
        .with_context(|| format!("no coordinator `generate` span among {} spans: {spans:#?}", spans.len()))?;
    assert!(root.parent.is_empty(), "the completion's span is a root: {root:?}");
    let trace: Vec<&Span> = spans.iter().filter(|s| s.trace_id == root.trace_id).collect();
    let forwards = |instance: &str| {
        trace.iter().filter(|s| s.name == "stage.forward" && s.instance == instance).copied().collect::<Vec<_>>()
    };
    let coordinator_steps: Vec<&&Span> = trace.iter().filter(|s| s.name == "decode.step").collect();
    assert!(!coordinator_steps.is_empty(), "no decode.step spans in the trace: {trace:#?}");
    let (a, b) = (forwards("worker-0"), forwards("worker-1"));
    assert!(!a.is_empty() && !b.is_empty(), "both workers' forwards join the trace: {trace:#?}");
    assert!(trace.iter().all(|s| s.service == "potluck-coordinator" || s.service == "potluck-worker"));
    // Hop by hop: stage 0's forwards are children of coordinator steps, stage 1's of stage 0's forwards.
    let ids = |v: &[&Span]| v.iter().map(|s| s.span_id.clone()).collect::<HashSet<_>>();
    let steps: HashSet<String> =
        trace.iter().filter(|s| s.service == "potluck-coordinator").map(|s| s.span_id.clone()).collect();
    let (first, second) = if a.iter().all(|s| steps.contains(&s.parent)) { (a, b) } else { (b, a) };
    assert!(first.iter().all(|s| steps.contains(&s.parent)), "stage 0 parents: {first:#?}");
    let stage0 = ids(&first);
    assert!(second.iter().all(|s| stage0.contains(&s.parent)), "stage 1 parents: {second:#?}");
    Ok(())
}
