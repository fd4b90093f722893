//! Tiny random-weight models, written to disk in GGUF or safetensors form.
//!
//! Fast tests and benchmarks use these instead of a real model: they load in
//! milliseconds and exercise the same file readers, shapes and kernels. The
//! vocabulary is GPT-2 byte-level (one token per byte) plus a few specials.

use std::path::{Path, PathBuf};

use crate::config::Architecture;
use crate::error::{EngineError, Result};
use crate::gguf::{GgufWriter, MetaValue};
use crate::quant::{quantize_row, GgmlType};
use crate::rng::Rng;

/// The shape and storage of a fixture model.
#[derive(Debug, Clone)]
pub struct TinyModel {
    /// Decoder family (qwen2 adds q/k/v biases).
    pub arch: Architecture,
    /// Transformer blocks.
    pub layers: usize,
    /// Residual width (a multiple of 256 when using K-quants).
    pub hidden: usize,
    /// MLP width.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Storage type of the projection matrices.
    pub weight_type: GgmlType,
    /// Whether lm_head shares the embedding.
    pub tied: bool,
    /// Context length written to the metadata.
    pub context: usize,
    /// Seed of the weights.
    pub seed: u64,
}

/// Special tokens appended after the 256 byte tokens.
pub const SPECIALS: [&str; 4] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"];

impl Default for TinyModel {
    fn default() -> Self {
        Self {
            arch: Architecture::Llama,
            layers: 4,
            hidden: 256,
            ffn: 512,
            heads: 4,
            kv_heads: 2,
            weight_type: GgmlType::Q4_1,
            tied: true,
            context: 512,
            seed: 1,
        }
    }
}

/// GPT-2's printable stand-in for every byte.
pub fn byte_tokens() -> Vec<String> {
    let mut n = 0u32;
    (0u32..256)
        .map(|b| {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let c = if printable {
                b
            } else {
                n += 1;
                255 + n
            };
            char::from_u32(c).map(String::from).unwrap_or_default()
        })
        .collect()
}

impl TinyModel {
    /// Vocabulary size: bytes plus specials.
    pub fn vocab(&self) -> usize {
        256 + SPECIALS.len()
    }

    /// Every tensor as (GGUF name, rows, cols) with `cols` innermost; vectors have rows = 1.
    fn tensors(&self) -> Vec<(String, usize, usize)> {
        let (d, hd) = (self.hidden, self.hidden / self.heads);
        let kv = self.kv_heads * hd;
        let mut t = vec![("token_embd.weight".to_string(), self.vocab(), d)];
        for l in 0..self.layers {
            let b = |s: &str| format!("blk.{l}.{s}");
            t.push((b("attn_norm.weight"), 1, d));
            t.push((b("attn_q.weight"), d, d));
            t.push((b("attn_k.weight"), kv, d));
            t.push((b("attn_v.weight"), kv, d));
            if self.arch.has_qkv_bias() {
                t.push((b("attn_q.bias"), 1, d));
                t.push((b("attn_k.bias"), 1, kv));
                t.push((b("attn_v.bias"), 1, kv));
            }
            t.push((b("attn_output.weight"), d, d));
            t.push((b("ffn_norm.weight"), 1, d));
            t.push((b("ffn_gate.weight"), self.ffn, d));
            t.push((b("ffn_up.weight"), self.ffn, d));
            t.push((b("ffn_down.weight"), d, self.ffn));
        }
        t.push(("output_norm.weight".to_string(), 1, d));
        if !self.tied {
            t.push(("output.weight".to_string(), self.vocab(), d));
        }
        t
    }

    /// Random values for one tensor: norms near 1, weights scaled by fan-in.
    #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
    fn values(&self, name: &str, rows: usize, cols: usize, rng: &mut Rng) -> Vec<f32> {
        let scale = if name.contains("norm") { 0.2 } else { 2.0 / (cols as f32).sqrt() };
        let base = if name.contains("norm") { 1.0 } else { 0.0 };
        (0..rows * cols).map(|_| base + scale * (rng.next_f64() as f32 * 2.0 - 1.0)).collect()
    }

    fn arch_name(&self) -> &'static str {
        match self.arch {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// Writes `dir/tiny.gguf` and returns its path.
    pub fn write_gguf(&self, dir: &Path) -> Result<PathBuf> {
        self.write_gguf_mixed(dir, &[])
    }

    /// [`TinyModel::write_gguf`] with a per-tensor type mix, as llama.cpp's `Q4_K_M` and
    /// similar file types have: a matrix whose name contains an `overrides` pattern takes
    /// that pattern's type (the first match wins), the others `weight_type`.
    pub fn write_gguf_mixed(&self, dir: &Path, overrides: &[(&str, GgmlType)]) -> Result<PathBuf> {
        let a = self.arch_name();
        let u = |v: usize| MetaValue::U32(u32::try_from(v).unwrap_or(u32::MAX));
        let mut w = GgufWriter::default();
        w.meta("general.architecture", MetaValue::String(a.into()))
            .meta(&format!("{a}.block_count"), u(self.layers))
            .meta(&format!("{a}.context_length"), u(self.context))
            .meta(&format!("{a}.embedding_length"), u(self.hidden))
            .meta(&format!("{a}.feed_forward_length"), u(self.ffn))
            .meta(&format!("{a}.attention.head_count"), u(self.heads))
            .meta(&format!("{a}.attention.head_count_kv"), u(self.kv_heads))
            .meta(&format!("{a}.attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-5))
            .meta(&format!("{a}.rope.freq_base"), MetaValue::F32(10_000.0))
            .meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
            .meta("tokenizer.ggml.pre", MetaValue::String("gpt2".into()));
        let mut tokens = byte_tokens();
        tokens.extend(SPECIALS.iter().map(|s| (*s).to_string()));
        let types: Vec<MetaValue> = (0..tokens.len()).map(|i| MetaValue::I32(if i < 256 { 1 } else { 3 })).collect();
        w.meta("tokenizer.ggml.tokens", MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()))
            .meta("tokenizer.ggml.token_type", MetaValue::Array(types))
            .meta("tokenizer.ggml.merges", MetaValue::Array(vec![MetaValue::String("Ġ t".into())]))
            .meta("tokenizer.ggml.eos_token_id", u(256 + 2))
            .meta("tokenizer.ggml.bos_token_id", u(256))
            .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(false));
        let mut rng = Rng::new(self.seed);
        for (name, rows, cols) in self.tensors() {
            let v = self.values(&name, rows, cols, &mut rng);
            let is_vector = rows == 1;
            let mixed = overrides.iter().find(|(pattern, _)| name.contains(pattern)).map(|&(_, t)| t);
            let dtype = if is_vector { GgmlType::F32 } else { mixed.unwrap_or(self.weight_type) };
            let dims: Vec<usize> = if is_vector { vec![cols] } else { vec![cols, rows] };
            let bytes: Vec<u8> = v.chunks_exact(cols).flat_map(|r| quantize_row(dtype, r)).collect();
            w.tensor(&name, &dims, dtype, bytes);
        }
        let path = dir.join("tiny.gguf");
        w.write(&path)?;
        Ok(path)
    }

    /// Writes a safetensors model (`config.json` + `model.safetensors`) into `dir`
    /// with weights in `dtype` (F32, F16 or BF16).
    pub fn write_safetensors(&self, dir: &Path, dtype: GgmlType) -> Result<PathBuf> {
        let st_dtype = match dtype {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            other => return Err(EngineError::UnsupportedDtype { name: "fixture".into(), dtype: other.name().into() }),
        };
        let io = |source| EngineError::Io { path: dir.to_path_buf(), source };
        let config = serde_json::json!({
            "model_type": self.arch_name(),
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab(),
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": self.context,
            "tie_word_embeddings": self.tied,
        });
        std::fs::write(dir.join("config.json"), config.to_string()).map_err(io)?;
        let mut rng = Rng::new(self.seed);
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, rows, cols) in self.tensors() {
            let v = self.values(&name, rows, cols, &mut rng);
            let bytes = quantize_row(dtype, &v);
            let shape: Vec<usize> = if rows == 1 { vec![cols] } else { vec![rows, cols] };
            let hf = crate::model_file::hf_name(&name);
            header.insert(
                hf,
                serde_json::json!({"dtype": st_dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
            );
            data.extend_from_slice(&bytes);
        }
        let mut head = serde_json::Value::Object(header).to_string().into_bytes();
        head.resize(head.len().div_ceil(8) * 8, b' ');
        let mut file = (head.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&head);
        file.extend_from_slice(&data);
        let path = dir.join("model.safetensors");
        std::fs::write(&path, file).map_err(io)?;
        Ok(dir.to_path_buf())
    }
}

/// A `rows × cols` quantized matrix (Q4_0, Q5_0, Q4_1, Q8_0, Q4_K, Q5_K or Q6_K) with
/// every f16 block scale (and minimum) 1.0 and pseudo-random quants and
/// sub-block scales from `seed`: a kernel benchmark's workload, whose
/// outputs are finite whatever the quants. `None` for other types or a
/// width that is not a whole number of blocks.
pub fn unit_scale_matrix(
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    seed: u64,
) -> Option<crate::kernels::matmul::Matrix> {
    // Byte offsets of the f16 scales within a block.
    let scales: &[usize] = match dtype {
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => return None,
    };
    let block = dtype.block_bytes();
    let row_bytes = dtype.row_bytes(cols)?;
    let mut s = seed;
    let mut data = vec![0u8; rows * row_bytes];
    for b in data.chunks_exact_mut(block) {
        for q in b.iter_mut() {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            *q = (s >> 56) as u8;
        }
        for &at in scales {
            b[at..at + 2].copy_from_slice(&0x3C00u16.to_le_bytes());
        }
    }
    crate::kernels::matmul::Matrix::new(dtype, rows, cols, data)
}
