//! Which storage type each tensor gets in a file of a given type: the mix
//! llama.cpp's quantizer (`llama_tensor_get_type` in `src/llama-quant.cpp`)
//! picks, so a synthetic file weighs and reads what a real one does.

use super::SynthError;
use crate::quant::GgmlType;

/// A whole-file quantization, as `llama-quantize` names it.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    /// Q4_K, with Q6_K for half the attn_v/ffn_down layers and the output.
    Q4_K_M,
    /// Q5_K, with Q6_K for half the attn_v/ffn_down layers and the output.
    Q5_K_M,
    /// Q4_0, with a Q6_K output.
    Q4_0,
    /// Q8_0 throughout.
    Q8_0,
    /// Q6_K throughout.
    Q6_K,
    /// F16 throughout (not quantized).
    F16,
}

impl FileType {
    /// Every file type, for lookups by name and for tests.
    pub const ALL: [Self; 6] = [Self::Q4_K_M, Self::Q5_K_M, Self::Q4_0, Self::Q8_0, Self::Q6_K, Self::F16];

    /// The name `--dtype` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q4_K_M => "q4_k_m",
            Self::Q5_K_M => "q5_k_m",
            Self::Q4_0 => "q4_0",
            Self::Q8_0 => "q8_0",
            Self::Q6_K => "q6_k",
            Self::F16 => "f16",
        }
    }

    /// The file type called `name`, or an error listing the known ones.
    pub fn parse(name: &str) -> Result<Self, SynthError> {
        super::by_name(&Self::ALL, Self::name, name)
            .map_err(|known| SynthError::UnknownFileType { name: name.to_string(), known })
    }

    /// llama.cpp's `llama_ftype` number, written as `general.file_type`.
    pub fn llama_ftype(self) -> u32 {
        match self {
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q4_K_M => 15,
            Self::Q5_K_M => 17,
            Self::Q6_K => 18,
        }
    }

    /// The type of most matrices; an error if the engine cannot compute with it.
    pub fn base(self) -> Result<GgmlType, SynthError> {
        match self {
            Self::Q4_K_M => Ok(GgmlType::Q4_K),
            Self::Q5_K_M => Ok(GgmlType::Q5_K),
            Self::Q4_0 => Ok(GgmlType::Q4_0),
            Self::Q8_0 => Ok(GgmlType::Q8_0),
            Self::Q6_K => Ok(GgmlType::Q6_K),
            Self::F16 => Ok(GgmlType::F16),
        }
    }

    /// The storage type of tensor `name` with dimensions `dims` (innermost
    /// first) in a model of `layers` blocks.
    pub fn tensor_type(self, name: &str, dims: &[usize], layers: usize) -> Result<GgmlType, SynthError> {
        let base = self.base()?;
        // Vectors (norms, biases) are never quantized.
        if dims.len() < 2 {
            return Ok(GgmlType::F32);
        }
        if base == GgmlType::F16 {
            return Ok(base);
        }
        if name == "output.weight" {
            // A K-quant output needs whole 256-wide rows; otherwise llama.cpp falls back to Q8_0.
            let whole = dims[0].is_multiple_of(GgmlType::Q6_K.block_len());
            return Ok(if base == GgmlType::Q8_0 || !whole { GgmlType::Q8_0 } else { GgmlType::Q6_K });
        }
        let more_bits = matches!(self, Self::Q4_K_M | Self::Q5_K_M)
            && (name.ends_with(".attn_v.weight") || name.ends_with(".ffn_down.weight"))
            && layer_of(name).is_some_and(|i| use_more_bits(i, layers));
        Ok(if more_bits { GgmlType::Q6_K } else { base })
    }
}

/// The layer number of a `blk.N.…` tensor.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// llama.cpp's choice of layers that get more bits: the first and last
/// eighth, and every third layer between.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(ft: FileType, name: &str) -> GgmlType {
        let dims: &[usize] = if name.ends_with("norm.weight") { &[4096] } else { &[4096, 4096] };
        ft.tensor_type(name, dims, 32).expect("type")
    }

    #[test]
    fn the_mix_matches_llama_quantize_for_a_32_layer_model() {
        use GgmlType::{F16, F32, Q4_0, Q4_K, Q6_K, Q8_0};
        // (file type, token_embd, output, attn_q, attn_v of layer 4, attn_v of layer 6)
        let table = [
            (FileType::Q4_K_M, Q4_K, Q6_K, Q4_K, Q4_K, Q6_K),
            (FileType::Q4_0, Q4_0, Q6_K, Q4_0, Q4_0, Q4_0),
            (FileType::Q8_0, Q8_0, Q8_0, Q8_0, Q8_0, Q8_0),
            (FileType::Q6_K, Q6_K, Q6_K, Q6_K, Q6_K, Q6_K),
            (FileType::F16, F16, F16, F16, F16, F16),
        ];
        for (ft, embd, out, q, v4, v6) in table {
            let got = [
                ty(ft, "token_embd.weight"),
                ty(ft, "output.weight"),
                ty(ft, "blk.0.attn_q.weight"),
                ty(ft, "blk.4.attn_v.weight"),
                ty(ft, "blk.6.attn_v.weight"),
            ];
            assert_eq!(got, [embd, out, q, v4, v6], "{}", ft.name());
            assert_eq!(ty(ft, "blk.3.ffn_norm.weight"), F32, "{}", ft.name());
            assert_eq!(ft.tensor_type("blk.3.attn_q.bias", &[4096], 32).expect("bias"), F32);
        }
        // Q4_K_M's Q6_K layers in a 32-layer model: 0-3, 28-31 and every third from 6.
        let q6: Vec<usize> =
            (0..32).filter(|l| ty(FileType::Q4_K_M, &format!("blk.{l}.ffn_down.weight")) == Q6_K).collect();
        assert_eq!(q6, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
        let v: Vec<usize> =
            (0..32).filter(|l| ty(FileType::Q4_K_M, &format!("blk.{l}.attn_v.weight")) == Q6_K).collect();
        assert_eq!(v, q6);
        assert!((0..32).all(|l| ty(FileType::Q4_K_M, &format!("blk.{l}.ffn_up.weight")) == Q4_K));
        // An output row that is not whole 256-blocks falls back to Q8_0.
        assert_eq!(FileType::Q4_K_M.tensor_type("output.weight", &[4000, 8], 32).expect("t"), Q8_0);
    }

    #[test]
    fn names_parse_and_q5_k_m_uses_q5_k() {
        for ft in FileType::ALL {
            assert_eq!(FileType::parse(ft.name()).expect("parse"), ft);
        }
        assert!(matches!(FileType::parse("q4_k_s"), Err(SynthError::UnknownFileType { .. })));
        assert_eq!(ty(FileType::Q5_K_M, "blk.0.attn_v.weight"), GgmlType::Q6_K);
        assert_eq!(ty(FileType::Q5_K_M, "blk.4.attn_v.weight"), GgmlType::Q5_K);
        assert_eq!(ty(FileType::Q5_K_M, "blk.5.ffn_up.weight"), GgmlType::Q5_K);
    }
}
