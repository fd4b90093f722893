//! Cutting a stage's slice out of a GGUF model.
//!
//! A shard is itself a GGUF file: all of the model's metadata, and only the
//! tensors of one layer range (plus the embedding on the first stage and the
//! final norm and lm_head on the last). Tensors stay in their stored format,
//! so a quantized model stays quantized on the wire and on the worker.

use std::ops::Range;
use std::path::Path;

use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, GgufWriter};

/// Whether tensor `name` belongs to the shard of `range` in a model of `layers` layers.
pub fn in_shard(name: &str, range: &Range<usize>, layers: usize, tied: bool) -> bool {
    let last = range.end == layers;
    if let Some(rest) = name.strip_prefix("blk.") {
        return rest.split('.').next().and_then(|l| l.parse::<usize>().ok()).is_some_and(|l| range.contains(&l));
    }
    match name {
        "token_embd.weight" => range.start == 0 || (last && tied),
        "output_norm.weight" | "output.weight" => last,
        // Anything else (rope tables and the like) travels with every shard.
        _ => true,
    }
}

/// Writes the shard of `range` from `src` to `out`.
pub fn write_shard(src: &GgufFile, range: Range<usize>, out: &Path) -> Result<()> {
    let layers = src
        .metadata
        .str("general.architecture")
        .and_then(|a| src.metadata.usize(&format!("{a}.block_count")))
        .ok_or_else(|| EngineError::MissingMetadata { key: "<arch>.block_count".into(), expected: "an integer" })?;
    if range.start >= range.end || range.end > layers {
        return Err(EngineError::LayerRange { start: range.start, end: range.end, layers });
    }
    let tied = !src.tensors.contains_key("output.weight");
    let mut w = GgufWriter::default();
    for (k, v) in &src.metadata.0 {
        if k != "general.alignment" {
            w.meta(k, v.clone());
        }
    }
    for (name, info) in &src.tensors {
        if in_shard(name, &range, layers, tied) {
            w.tensor(name, &info.dims, info.dtype, src.read(name)?);
        }
    }
    w.write(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::TinyModel;
    use crate::{ComputePool, ModelFile, Row, SessionId, Stage, StageInput, StageOutput};

    #[test]
    fn a_shard_holds_its_range_and_computes_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let full = TinyModel::default().write_gguf(dir.path()).expect("fixture");
        let src = GgufFile::open(&full).expect("open");
        let shard = dir.path().join("shard.gguf");
        write_shard(&src, 2..4, &shard).expect("shard");
        let s = GgufFile::open(&shard).expect("open shard");
        assert!(s.tensors.contains_key("blk.2.attn_q.weight") && s.tensors.contains_key("token_embd.weight"));
        assert!(!s.tensors.contains_key("blk.1.attn_q.weight"));
        assert!(std::fs::metadata(&shard).expect("meta").len() < std::fs::metadata(&full).expect("meta").len());
        // The last stage built from its shard computes exactly what it does from the full file.
        let full_file = ModelFile::open(&full).expect("model");
        let shard_file = ModelFile::open(&shard).expect("shard model");
        let pool = ComputePool::new(1);
        let rows = [Row { session: SessionId(1), position: 0, logits: true }];
        let first = Stage::load(&full_file, 0..2).expect("stage");
        let mut c0 = first.new_cache(1 << 20);
        let StageOutput::Hidden(h) = first.forward(&rows, StageInput::Tokens(&[7]), &mut c0, &pool).expect("fwd")
        else {
            panic!("first stage returned logits")
        };
        let run = |f: &ModelFile| {
            let st = Stage::load(f, 2..4).expect("stage");
            let mut c = st.new_cache(1 << 20);
            st.forward(&rows, StageInput::Hidden(&h), &mut c, &pool).expect("fwd")
        };
        assert_eq!(run(&full_file), run(&shard_file));
        assert!(matches!(write_shard(&src, 3..9, &shard), Err(EngineError::LayerRange { .. })));
    }
}
