//! `potluck selftest` on the candle CPU device against native, end to end
//! on the real model (release build): every matmul type and batch size is
//! reported and close, both layer halves agree, perplexity is within 0.5%
//! and decode speeds are there (the table's layout is unit-tested in the binary).

use anyhow::{ensure, Context as _};
use potluck_tests::{potluck, require_real_model, workspace_root};
use serde_json::Value;

#[test]
fn selftest_on_candle_cpu_reports_close_agreement() -> anyhow::Result<()> {
    let model = require_real_model()?;
    let text = workspace_root().join("testdata/apache-2.0.txt");
    let (m, t) = (model.to_str().context("model path")?, text.to_str().context("text path")?);
    let run = potluck(&[
        "selftest",
        "--device",
        "candle-cpu",
        "--model",
        m,
        "--text",
        t,
        "--ctx",
        "128",
        "--windows",
        "4",
        "--decode-tokens",
        "4",
        "--threads",
        "2",
        "--json",
    ])?;
    ensure!(run.success, "selftest failed: {}", run.stderr);
    let r: Value = serde_json::from_str(run.stdout.trim())?;
    eprintln!("{r}");

    let matmul = r["matmul"].as_array().context("matmul")?;
    let mut seen: Vec<(String, u64)> = Vec::new();
    for c in matmul {
        let (dtype, batch) = (c["dtype"].as_str().context("dtype")?, c["batch"].as_u64().context("batch")?);
        let g = &c["agreement"];
        let (cos, rel) = (g["min_cosine"].as_f64().context("cosine")?, g["max_rel"].as_f64().context("rel")?);
        // Both quantize activations to 8 bits and sum in f32. Figures seen
        // (2026-12-07, docs/benchmarks.md): relative error 4e-7 or less for
        // most types, 4e-4 for Q4_1, 6e-3 for Q8_0 (candle's x86 VNNI tiles
        // quantize activations their own way).
        assert!(cos > 0.9999 && rel < 2e-2, "{dtype} at batch {batch}: {c}");
        seen.push((dtype.to_string(), batch));
    }
    for dtype in ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"] {
        for batch in [1, 4, 9, 64] {
            assert!(seen.contains(&(dtype.to_string(), batch)), "{dtype} at batch {batch} is missing: {seen:?}");
        }
    }

    let layers = r["layers"].as_array().context("layers")?;
    let outputs: Vec<&str> = layers.iter().filter_map(|l| l["output"].as_str()).collect();
    assert_eq!(outputs, ["hidden", "logits"]);
    for l in layers {
        // Seen: 0.9992 for the first half's hidden states, 0.996 for the
        // worst position's logits.
        assert!(l["agreement"]["min_cosine"].as_f64().is_some_and(|c| c > 0.99), "{l}");
    }
    let p = &r["perplexity"];
    let rel = p["relative"].as_f64().context("relative perplexity")?;
    assert!(rel.abs() < 0.005, "perplexity {p}");
    for batch in ["1", "16"] {
        assert!(r["decode_tok_s"][batch].as_f64().is_some_and(|v| v > 0.0), "decode at batch {batch}: {r}");
    }

    let refused = potluck(&["selftest", "--device", "cpu", "--model", m])?;
    assert!(!refused.success && refused.stderr.contains("reference itself"), "{}", refused.stderr);
    Ok(())
}
