//! The shape of a model, read from GGUF metadata or a Hugging Face `config.json`.

use serde::Deserialize;

use crate::error::{EngineError, Result};
use crate::gguf::Metadata;

/// Default RoPE base when a file does not say.
pub const DEFAULT_ROPE_THETA: f32 = 10_000.0;
/// Widest attention head the kernels support.
pub const MAX_HEAD_DIM: usize = 512;
/// Default RMSNorm epsilon when a file does not say.
pub const DEFAULT_RMS_EPS: f32 = 1e-5;

/// The decoder families the engine implements. Anything else is rejected by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, Mistral, SmolLM: no attention biases.
    Llama,
    /// Qwen2: biases on the q, k and v projections.
    Qwen2,
}

impl Architecture {
    /// Parses GGUF's `general.architecture` or a `config.json` `model_type`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "mistral" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(EngineError::UnknownArchitecture(other.to_string())),
        }
    }

    /// Whether q, k and v projections carry biases.
    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Self::Qwen2)
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): GGUF llama files, whose q/k rows were permuted on conversion.
    Interleaved,
    /// Halves (i, i + d/2): Hugging Face weights and GGUF qwen2.
    HalfSplit,
}

/// Everything about a model's shape that the engine computes with.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Decoder family.
    pub arch: Architecture,
    /// Transformer blocks.
    pub layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// MLP inner width.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RoPE dimension pairing.
    pub rope_style: RopeStyle,
    /// Longest sequence the model was trained for.
    pub context: usize,
}

impl ModelConfig {
    /// Reads the config from GGUF metadata.
    pub fn from_gguf(meta: &Metadata) -> Result<Self> {
        let arch_name = meta
            .str("general.architecture")
            .ok_or(EngineError::MissingMetadata { key: "general.architecture".into(), expected: "a string" })?;
        let arch = Architecture::parse(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let need = |k: &str| {
            meta.usize(&key(k))
                .filter(|&v| v > 0)
                .ok_or(EngineError::MissingMetadata { key: key(k), expected: "a positive integer" })
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let kv_heads = meta.usize(&key("attention.head_count_kv")).unwrap_or(heads);
        let head_dim = meta.usize(&key("attention.key_length")).unwrap_or(hidden / heads.max(1));
        let vocab = meta
            .usize(&key("vocab_size"))
            .or_else(|| meta.str_array("tokenizer.ggml.tokens").map(|t| t.len()))
            .ok_or(EngineError::MissingMetadata { key: key("vocab_size"), expected: "an integer" })?;
        let config = Self {
            arch,
            layers: need("block_count")?,
            hidden,
            ffn: need("feed_forward_length")?,
            heads,
            kv_heads,
            head_dim,
            vocab,
            rms_eps: meta.f32(&key("attention.layer_norm_rms_epsilon")).unwrap_or(DEFAULT_RMS_EPS),
            rope_theta: meta.f32(&key("rope.freq_base")).unwrap_or(DEFAULT_ROPE_THETA),
            rope_style: match arch {
                Architecture::Llama => RopeStyle::Interleaved,
                Architecture::Qwen2 => RopeStyle::HalfSplit,
            },
            context: meta.usize(&key("context_length")).unwrap_or(2048),
        };
        config.validate()
    }

    /// Reads the config from a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            model_type: String,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            vocab_size: usize,
            rms_norm_eps: Option<f32>,
            rope_theta: Option<f32>,
            max_position_embeddings: Option<usize>,
        }
        let hf: Hf = serde_json::from_str(text).map_err(|e| EngineError::Safetensors(format!("config.json: {e}")))?;
        let config = Self {
            arch: Architecture::parse(&hf.model_type)?,
            layers: hf.num_hidden_layers,
            hidden: hf.hidden_size,
            ffn: hf.intermediate_size,
            heads: hf.num_attention_heads,
            kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            vocab: hf.vocab_size,
            rms_eps: hf.rms_norm_eps.unwrap_or(DEFAULT_RMS_EPS),
            rope_theta: hf.rope_theta.unwrap_or(DEFAULT_ROPE_THETA),
            rope_style: RopeStyle::HalfSplit,
            context: hf.max_position_embeddings.unwrap_or(2048),
        };
        config.validate()
    }

    fn validate(self) -> Result<Self> {
        let bad = |what: String| Err(EngineError::Gguf(format!("inconsistent model shape: {what}")));
        if self.layers == 0 || self.hidden == 0 || self.heads == 0 || self.vocab == 0 || self.ffn == 0 {
            return bad("a dimension is zero".into());
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!("{} heads do not group into {} KV heads", self.heads, self.kv_heads));
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim == 0 || self.head_dim > MAX_HEAD_DIM {
            return bad(format!("head dimension {} is not even and at most {MAX_HEAD_DIM}", self.head_dim));
        }
        Ok(self)
    }

    /// Width of the key (and value) projection.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Width of the query projection.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// KV cache bytes per token per layer (f16 keys and values): what the
    /// coordinator plans capacity with.
    pub fn kv_bytes_per_token_layer(&self) -> usize {
        crate::kv_cache::bytes_per_token_layer(self.kv_dim())
    }
}
