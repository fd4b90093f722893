//! Hidden states handed from one stage to the next, and their wire encoding.

use half::{bf16, f16};

use crate::error::{EngineError, Result};

/// How hidden states travel between stages. f16 halves the bytes of f32;
/// f32 makes a split run bit-identical to a single process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireDtype {
    /// 4 bytes per value, exact.
    F32,
    /// 2 bytes per value (the default).
    #[default]
    F16,
    /// 2 bytes per value, f32's range.
    BF16,
}

impl WireDtype {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// Lower-case name, as flags and the wire spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }
}

impl std::str::FromStr for WireDtype {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::BF16),
            other => Err(EngineError::Hidden(format!("unknown dtype `{other}` (use f32, f16 or bf16)"))),
        }
    }
}

/// `rows × dim` hidden states in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Hidden {
    /// Rows (tokens) in the batch.
    pub rows: usize,
    /// Width of a row.
    pub dim: usize,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl Hidden {
    /// Rounds every value through `dtype`, exactly as a trip over the wire would.
    pub fn round_trip(&mut self, dtype: WireDtype) {
        match dtype {
            WireDtype::F32 => {}
            WireDtype::F16 => self.data.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
            WireDtype::BF16 => self.data.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        }
    }

    /// Little-endian bytes in `dtype`.
    pub fn encode(&self, dtype: WireDtype) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data.len() * dtype.size());
        for &v in &self.data {
            match dtype {
                WireDtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
                WireDtype::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
                WireDtype::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
            }
        }
        out
    }

    /// Decodes bytes received for a `rows × dim` batch, checking the size and
    /// that every value is finite.
    pub fn decode(dtype: WireDtype, rows: usize, dim: usize, bytes: &[u8]) -> Result<Self> {
        let expected = rows.checked_mul(dim).and_then(|n| n.checked_mul(dtype.size()));
        if expected != Some(bytes.len()) {
            return Err(EngineError::Hidden(format!(
                "{} bytes do not hold {rows}×{dim} {} values",
                bytes.len(),
                dtype.name()
            )));
        }
        let data: Vec<f32> = match dtype {
            WireDtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            WireDtype::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            WireDtype::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        };
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(EngineError::Hidden(format!("value {i} is not finite")));
        }
        Ok(Self { rows, dim, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let h = Hidden { rows: 2, dim: 2, data: vec![1.0, -2.5, 3.25, 0.0] };
        for dt in [WireDtype::F32, WireDtype::F16, WireDtype::BF16] {
            let back = Hidden::decode(dt, 2, 2, &h.encode(dt)).expect("decode");
            assert_eq!(back, h);
        }
        assert!(Hidden::decode(WireDtype::F16, 2, 3, &h.encode(WireDtype::F16)).is_err());
        assert!(Hidden::decode(WireDtype::F32, 1, 1, &f32::NAN.to_le_bytes()).is_err());
        assert!(Hidden::decode(WireDtype::F32, usize::MAX, 2, &[]).is_err());
    }
}
