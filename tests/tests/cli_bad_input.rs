//! Bad input to the CLI is a clear error and a non-zero exit, never a panic.

use anyhow::Context as _;
use potluck_engine::fixture::TinyModel;
use potluck_tests::potluck;

fn assert_clean_failure(args: &[&str], needle: &str) -> anyhow::Result<()> {
    let run = potluck(args)?;
    assert!(!run.success, "{args:?} succeeded");
    assert!(!run.stderr.contains("panicked"), "{args:?} panicked: {}", run.stderr);
    assert!(run.stderr.contains(needle), "{args:?}: expected `{needle}` in: {}", run.stderr);
    Ok(())
}

#[test]
fn bad_models_prompts_and_flags_fail_cleanly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let random = dir.path().join("random.gguf");
    std::fs::write(&random, (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8).collect::<Vec<_>>())?;
    let r = random.to_str().context("path")?;
    assert_clean_failure(&["generate", "--model", r, "--prompt", "x"], "malformed GGUF")?;
    assert_clean_failure(&["generate", "--model", "/nonexistent.gguf", "--prompt", "x"], "cannot read")?;

    let tiny = TinyModel { context: 32, ..TinyModel::default() }.write_gguf(dir.path())?;
    let t = tiny.to_str().context("path")?;
    let long = "a".repeat(40);
    assert_clean_failure(&["generate", "--model", t, "--prompt", &long, "--max-tokens", "4"], "context length")?;
    assert_clean_failure(&["generate", "--model", t, "--prompt", "hi", "--temperature=-1"], "temperature")?;
    assert_clean_failure(&["generate", "--model", t, "--prompt", "hi", "--wire-dtype", "f8"], "f8")?;
    assert_clean_failure(&["generate", "--model", t, "--prompt", "hi", "--split-at", "9"], "outside 1..")?;
    assert_clean_failure(&["generate", "--model", t, "--prompt", "hi", "--split-at", "x"], "--split-at")?;
    assert_clean_failure(
        &["generate", "--model", t, "--prompt", "hi", "--split-at", "1", "--stages", "2"],
        "cannot be used",
    )?;
    assert_clean_failure(&["bench", "memory", "--model", t, "--layers", "3..99"], "invalid")?;
    assert_clean_failure(&["bench", "bandwidth", "--mib", "1"], "not in 64..=16384")?;
    assert_clean_failure(&["bench", "bandwidth", "--passes", "0"], "not in 1..=1000")?;
    let ok = potluck(&["generate", "--model", t, "--prompt", "hi", "--max-tokens", "4", "--temperature", "0"])?;
    assert!(ok.success, "tiny model failed: {}", ok.stderr);
    Ok(())
}

#[test]
fn bad_devices_fail_cleanly_and_say_why() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tiny = TinyModel::default().write_gguf(dir.path())?;
    let t = tiny.to_str().context("path")?;
    let generate =
        |device: &'static str| ["generate", "--model", t, "--prompt", "hi", "--max-tokens", "2", "--device", device];
    assert_clean_failure(&generate("tpu"), "unknown device `tpu`")?;
    if cfg!(target_os = "linux") {
        assert_clean_failure(&generate("metal"), "needs macOS")?;
    }
    // This suite builds without the `cuda` feature: the error names it and the build script.
    for args in [
        &generate("cuda:0")[..],
        &["perplexity", "--model", t, "--file", t, "--device", "cuda"],
        &["bench", "engine", "--model", t, "--device", "cuda:7"],
        &["worker", "--coordinator", "127.0.0.1:1", "--device", "cuda:0"],
        &["up", "--model", t, "--devices", "cpu,cuda:0"],
    ] {
        assert_clean_failure(args, "`cuda` feature")?;
        assert_clean_failure(args, "scripts/build-cuda")?;
    }
    assert_clean_failure(
        &["generate", "--model", t, "--prompt", "hi", "--stages", "2", "--devices", "cpu,candle-cpu,cpu"],
        "3 devices for 2 stages",
    )?;
    let ok = potluck(&["generate", "--model", t, "--prompt", "hi", "--max-tokens", "4", "--device", "candle-cpu"])?;
    assert!(ok.success, "candle-cpu failed: {}", ok.stderr);
    Ok(())
}

#[test]
fn bad_pool_files_fail_cleanly_and_a_good_one_plans() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tiny = TinyModel::default().write_gguf(dir.path())?;
    let pool = dir.path().join("pool.yaml");
    let p = pool.to_str().context("path")?;
    let plan = |model: &'static str| ["plan", "--model", model, "--pool", p];
    for (text, needle) in [
        ("workers: [ {id: a", "malformed pool file"),
        ("workers: [{id: a, memory_gib: 8}]", "give its time per layer"),
        (
            "workers: [{id: a, memory_gib: 2, layer_ms: 1}, {id: b, memory_gib: 2, layer_ms: 1}]",
            "cannot hold the model",
        ),
        ("workers: [{id: a, memory_gib: 0, layer_ms: -1}]", "no free memory"),
        ("workers: [{id: a, memory_gib: 1, layer_ms: 1}]", "no worker can hold one layer"),
    ] {
        std::fs::write(&pool, text)?;
        assert_clean_failure(&plan("llama3-8b"), needle)?;
    }
    assert_clean_failure(&["plan", "--model", "llama3-8b", "--pool", "/nonexistent.yaml"], "cannot read")?;
    assert_clean_failure(&plan("no-such-shape"), "nor a known shape")?;
    std::fs::write(&pool, "workers: [{id: a, memory_gib: 4, layer_ms: 1}, {id: b, memory_gib: 4, layer_ms: 1}]")?;
    let t = tiny.to_str().context("path")?;
    let ok = potluck(&["plan", "--model", t, "--pool", p, "--json"])?;
    assert!(ok.success, "plan failed: {}", ok.stderr);
    let report: serde_json::Value = serde_json::from_str(&ok.stdout)?;
    assert!(report["tokens_per_sec_saturated"].as_f64().is_some_and(|x| x > 0.0), "{report}");
    Ok(())
}
