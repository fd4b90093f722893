//! Loading a stage: which matrices it holds, read from the model file in
//! the order a forward pass reads them, into one weight mapping.

use std::ops::Range;

use super::block::Block;
use super::{Head, Stage};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kernels::matmul::Matrix;
use crate::model_file::ModelFile;
use crate::pool::ComputePool;

impl Stage {
    /// Loads the tensors of `range` (and embedding/head when at an end) from `file`.
    pub fn load(file: &ModelFile, range: Range<usize>) -> Result<Self> {
        let c = file.config().clone();
        if range.start >= range.end || range.end > c.layers {
            return Err(EngineError::LayerRange { start: range.start, end: range.end, layers: c.layers });
        }
        // Every matrix, in the order a forward pass reads them: the blocks,
        // the head, then the embedding (looked up a row at a time) unless
        // the head is tied to it. Read on every core: loading is reading,
        // repacking and first touches of fresh pages, all of which scale.
        let tied = !file.has("output.weight");
        let (first, last) = (range.start == 0, range.end == c.layers);
        let mut plan: Vec<(String, usize, usize)> = Vec::new();
        for l in range.clone() {
            let (d, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
            let shapes = [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)];
            plan.extend(Block::MATRICES.iter().zip(shapes).map(|(t, (r, k))| (format!("blk.{l}.{t}"), r, k)));
        }
        if last {
            plan.push((if tied { "token_embd.weight" } else { "output.weight" }.into(), c.vocab, c.hidden));
        }
        if first && !(last && tied) {
            plan.push(("token_embd.weight".into(), c.vocab, c.hidden));
        }
        // A bad file names the tensor a reader would look at first: the
        // embedding, then each block's norm, before any weights are read.
        if first {
            file.stored_shape("token_embd.weight", c.vocab, c.hidden)?;
        }
        for l in range.clone() {
            file.vector(&format!("blk.{l}.attn_norm.weight"), c.hidden)?;
        }
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let (mats, arena) = file.matrices_into(&plan, threads)?;
        let mut mats = mats.into_iter();
        let mut blocks: Vec<Block> =
            range.clone().map(|l| Block::load(file, &c, l, &mut mats)).collect::<Result<_>>()?;
        let mut head = if last {
            let lm_head = mats.next().ok_or_else(|| EngineError::MissingTensor("output.weight".into()))?;
            Some(Head { norm: file.vector("output_norm.weight", c.hidden)?, lm_head })
        } else {
            None
        };
        let mut embed = match (first, &head) {
            (false, _) => None,
            (true, Some(h)) if tied => Some(h.lm_head.clone()),
            (true, _) => Some(mats.next().ok_or_else(|| EngineError::MissingTensor("token_embd.weight".into()))?),
        };
        let mut mats: Vec<&mut Matrix> = blocks.iter_mut().flat_map(Block::matrices_mut).collect();
        mats.extend(head.as_mut().map(|h| &mut h.lm_head));
        mats.extend(embed.as_mut());
        Matrix::finish_arena(arena, &mut mats);
        Ok(Self {
            config: c,
            range,
            embed,
            blocks,
            head,
            scratch: std::sync::Mutex::default(),
            serial: ComputePool::new(1),
            spare_logits: std::sync::Mutex::default(),
        })
    }
}

impl Block {
    /// The seven matrices' names within a block, in [`Block::matrices`] order
    /// (the order a forward pass reads them).
    const MATRICES: [&str; 7] = [
        "attn_q.weight",
        "attn_k.weight",
        "attn_v.weight",
        "attn_output.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
        "ffn_down.weight",
    ];

    /// Block `layer`, its seven matrices taken in [`Block::MATRICES`] order
    /// from `mats` (read by [`ModelFile::matrices_into`]), its vectors from
    /// `file`.
    fn load(file: &ModelFile, c: &ModelConfig, layer: usize, mats: &mut impl Iterator<Item = Matrix>) -> Result<Self> {
        let name = |t: &str| format!("blk.{layer}.{t}");
        let mut m = || mats.next().ok_or_else(|| EngineError::MissingTensor(name("weights")));
        let (d, q, kv) = (c.hidden, c.q_dim(), c.kv_dim());
        let bias = if c.arch.has_qkv_bias() {
            Some([
                file.vector(&name("attn_q.bias"), q)?,
                file.vector(&name("attn_k.bias"), kv)?,
                file.vector(&name("attn_v.bias"), kv)?,
            ])
        } else {
            None
        };
        Ok(Self {
            attn_norm: file.vector(&name("attn_norm.weight"), d)?,
            q: m()?,
            k: m()?,
            v: m()?,
            o: m()?,
            bias,
            ffn_norm: file.vector(&name("ffn_norm.weight"), d)?,
            gate: m()?,
            up: m()?,
            down: m()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loaded_stage_holds_its_weights_in_one_mapping_and_a_tied_head_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = crate::fixture::TinyModel::default().write_gguf(dir.path()).expect("fixture");
        let file = crate::ModelFile::open(&path).expect("model");
        let whole = Stage::load(&file, 0..file.config().layers).expect("stage");
        let (embed, head) = (whole.embed.as_ref().expect("first"), &whole.head.as_ref().expect("last").lm_head);
        assert!(whole.blocks.len() > 1);
        let mut all: Vec<&Matrix> = whole.blocks.iter().flat_map(Block::matrices).collect();
        all.extend([head, embed]);
        assert!(all.iter().all(|m| m.is_gathered()));
        assert!(head.shares_storage(embed), "the fixture ties its lm_head");
        let sum: usize = all.iter().map(|m| m.bytes()).sum();
        assert_eq!(whole.weight_bytes(), sum - embed.bytes());
    }
}
