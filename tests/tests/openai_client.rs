//! The official `openai` Python package, unchanged, against `potluck up`
//! with API keys on: completions and chat, streaming and not, models, and
//! its typed errors for an unknown model and a wrong key.
//!
//! The package comes from PyPI into `.venv` (scripts/test installs it);
//! `POTLUCK_PYTHON` names that interpreter.

use anyhow::{ensure, Context as _};
use potluck_tests::{http_exchange, UpCluster};
use serde_json::{json, Value};

const KEY: &str = "sk-potluck-test-7d1f";

fn python() -> String {
    std::env::var("POTLUCK_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[test]
fn the_openai_python_client_works_unchanged() -> anyhow::Result<()> {
    let python = python();
    let probe = std::process::Command::new(&python).args(["-c", "import openai"]).output()?;
    ensure!(
        probe.status.success(),
        "{python} lacks the PyPI package `openai`: run scripts/test, or set POTLUCK_PYTHON to a python that has it"
    );
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("# API keys\n{KEY}\n"))?;
    let cache = dir.path().join("cache");
    let c = UpCluster::start(&[
        "--workers",
        "2",
        "--threads",
        "2",
        "--api-key-file",
        keys.to_str().context("path")?,
        "--cache-dir",
        cache.to_str().context("path")?,
    ])?;
    // Without a key, or with a wrong one: 401 in OpenAI's shape; probes stay open.
    let body = json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}).to_string();
    for auth in ["", "Authorization: Bearer nope\r\n"] {
        let (status, _, text) = http_exchange(&c.http, "POST", "/v1/completions", body.as_bytes(), auth)?;
        assert_eq!(status, 401, "{auth:?}: {text}");
        assert!(text.contains("\"authentication_error\""), "{text}");
    }
    assert_eq!(c.get("/health")?.0, 200);
    let auth = format!("Authorization: Bearer {KEY}\r\n");
    let (status, _, text) = http_exchange(&c.http, "POST", "/v1/completions", body.as_bytes(), &auth)?;
    ensure!(status == 200, "with the key: {status} {text}");
    let raw: Value = serde_json::from_str(&text)?;

    let script = potluck_tests::workspace_root().join("tests/python/openai_client.py");
    let model = "SmolLM2-135M-Instruct.Q4_1.gguf";
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args([&format!("http://{}/v1", c.http), KEY, model])
        .output()?;
    ensure!(out.status.success(), "the openai client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).context("the script's JSON")?;

    assert_eq!(v["completion"], raw["choices"][0]["text"], "{v}");
    assert_eq!(v["completion_stream"], v["completion"], "{v}");
    assert_eq!(v["completion_finish"], "length");
    assert_eq!(v["completion_usage"], json!([5, 8, 13]));
    assert!(v["chat"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
    assert_eq!(v["chat_stream"], v["chat"], "{v}");
    assert_eq!(v["chat_role"], "assistant");
    assert!(v["chat_stream_usage"].as_u64().is_some_and(|n| n >= 1), "{v}");
    assert_eq!(v["models"], json!([model]));
    assert_eq!(v["unknown_model"], 404);
    assert_eq!(v["wrong_key"], 401);
    Ok(())
}
