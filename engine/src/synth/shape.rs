//! The model shapes a synthetic file can take: the published dimensions of
//! common 7-8B models, so a benchmark multiplies matrices of the real size
//! without downloading the real weights.

use super::SynthError;
use crate::config::{Architecture, ModelConfig, RopeStyle};

/// A named model shape.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Llama 2 7B: full multi-head attention.
    Llama2_7b,
    /// Llama 3 8B: grouped-query attention, wide MLP.
    Llama3_8b,
    /// Qwen2 7B: q/k/v biases, 4 KV heads.
    Qwen2_7b,
    /// Mistral 7B (v0.1): Llama 3's widths with Llama 2's RoPE base.
    Mistral_7b,
}

impl Shape {
    /// Every shape, for lookups by name and for tests.
    pub const ALL: [Self; 4] = [Self::Llama2_7b, Self::Llama3_8b, Self::Qwen2_7b, Self::Mistral_7b];

    /// The name `--shape` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama2_7b => "llama2-7b",
            Self::Llama3_8b => "llama3-8b",
            Self::Qwen2_7b => "qwen2-7b",
            Self::Mistral_7b => "mistral-7b",
        }
    }

    /// The shape called `name`, or an error listing the known ones.
    pub fn parse(name: &str) -> Result<Self, SynthError> {
        super::by_name(&Self::ALL, Self::name, name)
            .map_err(|known| SynthError::UnknownShape { name: name.to_string(), known })
    }

    /// The dimensions, from each model's Hugging Face `config.json`
    /// (`vocab` included, though a synthetic file takes its tokenizer's).
    pub fn config(self) -> ModelConfig {
        let llama = |ffn, kv_heads, vocab, context, rope_theta| ModelConfig {
            arch: Architecture::Llama,
            layers: 32,
            hidden: 4096,
            ffn,
            heads: 32,
            kv_heads,
            head_dim: 128,
            vocab,
            rms_eps: 1e-5,
            rope_theta,
            rope_style: RopeStyle::Interleaved,
            context,
        };
        match self {
            Self::Llama2_7b => llama(11_008, 32, 32_000, 4096, 10_000.0),
            Self::Llama3_8b => llama(14_336, 8, 128_256, 8192, 500_000.0),
            Self::Mistral_7b => llama(14_336, 8, 32_000, 32_768, 10_000.0),
            Self::Qwen2_7b => ModelConfig {
                arch: Architecture::Qwen2,
                layers: 28,
                hidden: 3584,
                ffn: 18_944,
                heads: 28,
                kv_heads: 4,
                head_dim: 128,
                vocab: 152_064,
                rms_eps: 1e-6,
                rope_theta: 1_000_000.0,
                rope_style: RopeStyle::HalfSplit,
                context: 32_768,
            },
        }
    }
}

/// GGUF's architecture name, the prefix of a model's metadata keys.
pub(crate) fn arch_name(arch: Architecture) -> &'static str {
    match arch {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
    }
}
