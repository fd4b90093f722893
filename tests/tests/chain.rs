//! Chain, not hub: per decode step the coordinator exchanges only
//! token-sized messages with stage 0, while hidden states go worker to worker.

use anyhow::{ensure, Context as _};
use potluck_tests::UpCluster;
use serde_json::{json, Value};

/// SmolLM2-135M's hidden size.
const HIDDEN: u64 = 576;
/// Bytes per value on an f16 wire.
const F16: u64 = 2;
/// Tokens generated.
const TOKENS: u64 = 32;

fn cluster(c: &UpCluster) -> anyhow::Result<Value> {
    let (status, body) = c.get("/v1/cluster")?;
    ensure!(status == 200, "status {status}: {body}");
    Ok(serde_json::from_str(&body)?)
}

fn counter(v: &Value, key: &str) -> anyhow::Result<u64> {
    v["traffic"][key].as_u64().with_context(|| format!("traffic.{key} in {v}"))
}

fn stage(v: &Value, i: usize, key: &str) -> anyhow::Result<u64> {
    v["stages"][i][key].as_u64().with_context(|| format!("stages[{i}].{key} in {v}"))
}

#[test]
fn the_coordinator_moves_tokens_and_stages_move_hidden_states() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let dir = cache.path().to_str().context("path")?;
    let c = UpCluster::start(&["--workers", "3", "--wire-dtype", "f16", "--threads", "3", "--cache-dir", dir])?;
    let before = cluster(&c)?;
    ensure!(before["stages"].as_array().map(Vec::len) == Some(3), "{before}");

    let req = json!({"prompt": "Once upon a time", "max_tokens": TOKENS, "temperature": 0});
    let (status, body) = c.post("/v1/completions", &req)?;
    ensure!(status == 200, "status {status}: {body}");
    let reply: Value = serde_json::from_str(&body)?;
    let prompt = reply["usage"]["prompt_tokens"].as_u64().context("prompt_tokens")?;
    let completion = reply["usage"]["completion_tokens"].as_u64().context("completion_tokens")?;
    ensure!(completion == TOKENS, "generation stopped early: {body}");
    let after = cluster(&c)?;

    let delta = |key: &str| -> anyhow::Result<u64> { Ok(counter(&after, key)? - counter(&before, key)?) };
    let requests = delta("forward_requests")?;
    let replies = delta("forward_replies")?;
    let request_bytes = delta("forward_request_bytes")?;
    let reply_bytes = delta("forward_reply_bytes")?;
    // One prefill step, then one step per further token.
    assert_eq!(requests, TOKENS, "{after}");
    assert_eq!(replies, TOKENS, "{after}");
    eprintln!("coordinator: {requests} requests ({request_bytes} B), {replies} replies ({reply_bytes} B)");
    assert!(request_bytes / requests < 512, "{request_bytes} request bytes over {requests} steps");
    assert!(reply_bytes / replies < 512, "{reply_bytes} reply bytes over {replies} steps");

    // Every row's hidden state crosses each of the two links, once.
    let rows_bytes = (prompt + TOKENS - 1) * HIDDEN * F16;
    let hidden = |i: usize, key: &str| -> anyhow::Result<u64> { Ok(stage(&after, i, key)? - stage(&before, i, key)?) };
    for i in 0..2 {
        let sent = hidden(i, "hidden_bytes_sent")?;
        eprintln!("stage {i}: sent {sent} B of hidden states downstream");
        assert!(sent >= rows_bytes, "stage {i} sent {sent} B, expected ≥ {rows_bytes}");
        assert_eq!(hidden(i + 1, "hidden_bytes_received")?, sent, "link {i}→{}", i + 1);
    }
    assert_eq!(hidden(0, "hidden_bytes_received")?, 0, "stage 0 takes tokens, not hidden states");
    assert_eq!(hidden(2, "hidden_bytes_sent")?, 0, "the last stage samples");
    assert!(request_bytes + reply_bytes < rows_bytes, "the coordinator moved {request_bytes}+{reply_bytes} B");
    Ok(())
}
