//! Random tensor bytes whose values have a chosen spread.
//!
//! A quantized block is uniformly random bytes with its f16 scale fields
//! overwritten: the bytes are as cheap to make as `memset`, and the scales
//! keep the weights' standard deviation where the caller wants it, so
//! activations stay finite through every layer. Each block's scales get a
//! random sign, so the weights average zero whatever the format's bias
//! (Q4_0's quants run -8..=7). Formats with a minimum field (Q4_1, the
//! K-quants) also get a minimum that centres a block's values.
//!
//! Supporting one more block format is one line in [`scale_fields`].

use half::f16;

use crate::quant::{dequantize_row, GgmlType};
use crate::rng::Rng;

/// Where a block keeps its f16 scale and, if it has one, its f16 minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScaleFields {
    scale: usize,
    min: Option<usize>,
}

/// The f16 fields of each block format (ggml's block layouts).
fn scale_fields(dtype: GgmlType) -> Option<ScaleFields> {
    let (scale, min) = match dtype {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => (0, None), // d, …
        GgmlType::Q4_1 | GgmlType::Q5_1 => (0, Some(2)),               // d, m, …
        GgmlType::Q4_K | GgmlType::Q5_K => (0, Some(2)),               // d, dmin, scales[12], …
        GgmlType::Q6_K => (208, None),                                 // ql[128], qh[64], scales[16], d
        _ => return None,
    };
    Some(ScaleFields { scale, min })
}

/// Blocks sampled to measure a format's spread at unit scale.
const CALIBRATION_BLOCKS: usize = 256;
/// Seed of those blocks (any fixed value: the result must not vary).
const CALIBRATION_SEED: u64 = 0x5EED_CA1B;

/// How to fill one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Fill {
    /// Random block bytes with these f16 scale and minimum values (before the random sign).
    Blocks { dtype: GgmlType, fields: ScaleFields, scale: f16, min: f16 },
    /// F16 values uniform in `±amplitude`.
    F16 { amplitude: f32 },
    /// F32 values uniform in `center ± amplitude`.
    F32 { center: f32, amplitude: f32 },
}

/// A format's spread at unit scale: values are `scale * (a + ratio * m)`,
/// where `a` is what the scale multiplies and `m` what the minimum adds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Calibration {
    ratio: f32,
    unit_std: f32,
}

impl Calibration {
    /// Measures `dtype` by decoding random blocks with the engine's own
    /// dequantizer; `None` for formats without a [`scale_fields`] line.
    pub(crate) fn measure(dtype: GgmlType) -> Option<Self> {
        let fields = scale_fields(dtype)?;
        let mut bytes = vec![0u8; CALIBRATION_BLOCKS * dtype.block_bytes()];
        fill_random(&mut Rng::new(CALIBRATION_SEED), &mut bytes);
        let decode = |scale: f32, min: f32| {
            let mut b = bytes.clone();
            for blk in b.chunks_exact_mut(dtype.block_bytes()) {
                put_f16(blk, fields.scale, f16::from_f32(scale));
                if let Some(m) = fields.min {
                    put_f16(blk, m, f16::from_f32(min));
                }
            }
            let mut out = vec![0f32; CALIBRATION_BLOCKS * dtype.block_len()];
            dequantize_row(dtype, &b, &mut out);
            out
        };
        let a = decode(1.0, 0.0);
        // Without a minimum field `m` is all zeros and the ratio 0.
        let m = decode(0.0, 1.0);
        let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let ratio = if mean(&m) == 0.0 { 0.0 } else { -mean(&a) / mean(&m) };
        let var = a.iter().zip(&m).map(|(&x, &y)| (f64::from(x) + ratio * f64::from(y)).powi(2)).sum::<f64>()
            / a.len() as f64;
        #[allow(clippy::cast_possible_truncation)]
        Some(Self { ratio: ratio as f32, unit_std: var.sqrt() as f32 })
    }

    /// The fill giving weights of standard deviation `std`.
    pub(crate) fn fill(self, dtype: GgmlType, std: f32) -> Option<Fill> {
        let f = scale_fields(dtype)?;
        let scale = std / self.unit_std;
        Some(Fill::Blocks { dtype, fields: f, scale: f16::from_f32(scale), min: f16::from_f32(scale * self.ratio) })
    }
}

impl Fill {
    /// Uniform float values of standard deviation `std` around `center`.
    pub(crate) fn float(dtype: GgmlType, center: f32, std: f32) -> Option<Self> {
        // A uniform variable on ±a has standard deviation a / √3.
        let amplitude = std * 3f32.sqrt();
        match dtype {
            GgmlType::F16 if center == 0.0 => Some(Self::F16 { amplitude }),
            GgmlType::F32 => Some(Self::F32 { center, amplitude }),
            _ => None,
        }
    }

    /// Bytes of one indivisible unit (a block, or one value).
    pub(crate) fn unit_bytes(&self) -> usize {
        match self {
            Self::Blocks { dtype, .. } => dtype.block_bytes(),
            Self::F16 { .. } => 2,
            Self::F32 { .. } => 4,
        }
    }

    /// Fills `out` (whole units) from `rng`.
    pub(crate) fn generate(&self, rng: &mut Rng, out: &mut [u8]) {
        match *self {
            Self::Blocks { dtype, fields, scale, min } => {
                fill_random(rng, out);
                let mut signs = 0u64;
                for (i, blk) in out.chunks_exact_mut(dtype.block_bytes()).enumerate() {
                    if i % 64 == 0 {
                        signs = rng.next_u64();
                    }
                    let flip = (signs >> (i % 64)) & 1 == 1;
                    let signed = |v: f16| if flip { -v } else { v };
                    put_f16(blk, fields.scale, signed(scale));
                    if let Some(m) = fields.min {
                        put_f16(blk, m, signed(min));
                    }
                }
            }
            Self::F16 { amplitude } => {
                for four in out.chunks_mut(8) {
                    let bits = rng.next_u64().to_le_bytes();
                    for (v, r) in four.chunks_exact_mut(2).zip(bits.chunks_exact(2)) {
                        let x = unit_from_bits(i16::from_le_bytes([r[0], r[1]])) * amplitude;
                        v.copy_from_slice(&f16::from_f32(x).to_le_bytes());
                    }
                }
            }
            Self::F32 { center, amplitude } => {
                for v in out.chunks_exact_mut(4) {
                    #[allow(clippy::cast_possible_truncation)]
                    let x = center + (rng.next_f64() as f32 * 2.0 - 1.0) * amplitude;
                    v.copy_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
}

/// Maps 16 random bits to `[-1, 1)`.
fn unit_from_bits(bits: i16) -> f32 {
    f32::from(bits) / 32_768.0
}

fn put_f16(block: &mut [u8], at: usize, v: f16) {
    block[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Uniformly random bytes, eight per generator step.
fn fill_random(rng: &mut Rng, out: &mut [u8]) {
    let mut words = out.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let tail = words.into_remainder();
    let last = rng.next_u64().to_le_bytes();
    tail.copy_from_slice(&last[..tail.len()]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mean and standard deviation of `n` values of a fill, decoded by the engine.
    fn stats(fill: &Fill, dtype: GgmlType, n: usize, seed: u64) -> (f64, f64) {
        let mut bytes = vec![0u8; dtype.row_bytes(n).expect("whole blocks")];
        fill.generate(&mut Rng::new(seed), &mut bytes);
        let mut v = vec![0f32; n];
        dequantize_row(dtype, &bytes, &mut v);
        assert!(v.iter().all(|x| x.is_finite()));
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n as f64;
        (mean, var.sqrt())
    }

    #[test]
    fn every_format_gets_the_asked_spread_and_no_bias() {
        // Every block format the engine computes with and this file has a line for.
        let dtypes: Vec<GgmlType> = GgmlType::ALL.into_iter().filter(|&t| scale_fields(t).is_some()).collect();
        assert!(dtypes.len() >= 5, "{dtypes:?}");
        for dtype in dtypes {
            let name = dtype.name();
            let fill = Calibration::measure(dtype).and_then(|c| c.fill(dtype, 0.02)).expect(name);
            let (mean, std) = stats(&fill, dtype, 1 << 16, 9);
            assert!((std / 0.02 - 1.0).abs() < 0.1, "{}: std {std}", dtype.name());
            assert!(mean.abs() < 0.02 * 0.05, "{}: mean {mean}", dtype.name());
        }
        let f16 = Fill::float(GgmlType::F16, 0.0, 0.02).expect("f16");
        let (mean, std) = stats(&f16, GgmlType::F16, 1 << 16, 9);
        assert!((std / 0.02 - 1.0).abs() < 0.05 && mean.abs() < 1e-3, "f16: {mean} {std}");
        let ones = Fill::float(GgmlType::F32, 1.0, 0.0).expect("f32");
        let (mean, std) = stats(&ones, GgmlType::F32, 64, 9);
        assert_eq!((mean, std), (1.0, 0.0));
    }

    #[test]
    fn a_seed_fixes_the_bytes() {
        let fill = Calibration::measure(GgmlType::Q4_K).and_then(|c| c.fill(GgmlType::Q4_K, 0.1)).expect("q4k");
        let make = |seed| {
            let mut b = vec![0u8; 4 * GgmlType::Q4_K.block_bytes()];
            fill.generate(&mut Rng::new(seed), &mut b);
            b
        };
        assert_eq!(make(3), make(3));
        assert_ne!(make(3), make(4));
        assert_eq!(Calibration::measure(GgmlType::Q4_K), Calibration::measure(GgmlType::Q4_K));
        assert!(Calibration::measure(GgmlType::F16).is_none());
    }
}
