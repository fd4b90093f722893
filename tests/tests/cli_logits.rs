//! `potluck logits` writes exactly the logits the engine computes: the file
//! another engine's logits are compared against must not be a near copy.

use anyhow::Context as _;
use potluck_engine::fixture::TinyModel;
use potluck_engine::{LocalPipeline, ModelFile, Row, SessionId, WireDtype};
use potluck_tests::potluck;

#[test]
fn logits_file_equals_the_engines_logits_bit_for_bit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = TinyModel { layers: 3, ..TinyModel::default() }.write_gguf(dir.path())?;
    let tokens: Vec<u32> = (0..40u32).map(|i| (i * 37 + 5) % 260).collect();
    let list = tokens.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let out = dir.path().join("logits.f32");
    let m = model.to_str().context("path")?;
    let o = out.to_str().context("path")?;
    // Chunks of 16 rows and two stages: the file must not depend on either.
    let run = potluck(&["logits", "--model", m, "--tokens", &list, "--out", o, "--chunk", "16", "--stages", "2"])?;
    assert!(run.success, "potluck logits failed: {}", run.stderr);
    let written: Vec<u32> =
        std::fs::read(&out)?.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_bits()).collect();

    let file = ModelFile::open(&model)?;
    let layers = file.config().layers;
    let mut pipe = LocalPipeline::load(&file, &[0, layers], WireDtype::F32, 1 << 24, 1)?;
    let rows: Vec<Row> = (0..tokens.len()).map(|p| Row { session: SessionId(7), position: p, logits: true }).collect();
    let expected: Vec<u32> = pipe.forward(&rows, &tokens)?.data.iter().map(|v| v.to_bits()).collect();
    assert_eq!(written.len(), tokens.len() * file.config().vocab);
    assert!(written == expected, "the logits file differs from the engine's logits");

    let bad = potluck(&["logits", "--model", m, "--tokens", "1,99999", "--out", o])?;
    assert!(!bad.success && bad.stderr.contains("outside the vocabulary"), "{}", bad.stderr);
    Ok(())
}
