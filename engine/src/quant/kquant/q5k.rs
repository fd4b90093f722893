//! Q5_K: 5-bit quants in eight sub-blocks of 32, each with a 6-bit scale and minimum.
//!
//! Q4_K's layout plus one high bit per quant: the low four bits sit in `qs` exactly as in
//! Q4_K, and bit `e / 32` of `qh[e % 32]` is bit 4 of element `e`.

use super::{AffineRuns, K4Layout, QK_K};

/// Bytes per Q5_K block: `f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]`.
pub(crate) const Q5K_BYTES: usize = 176;

/// Q5_K's place among the formats with Q4_K's header.
const LAYOUT: K4Layout = K4Layout { bytes: Q5K_BYTES, quants: unpack_q5k_quants };

/// Bytes of high bits after the header; the 128 bytes of low nibbles follow them.
const QH_BYTES: usize = 32;

/// Decodes the 256 unsigned 5-bit quants of a Q5_K block into element order.
///
/// Group `g` of 64 elements takes its low nibbles from `qs[32g..32g+32]` (low nibbles for
/// elements 0..32 of the group, high nibbles for 32..64) and its high bits from bits `2g`
/// and `2g + 1` of `qh[0..32]`.
#[inline]
fn unpack_q5k_quants(quants: &[u8]) -> [u8; QK_K] {
    let (qh, qs) = quants.split_at(QH_BYTES);
    let mut q = [0u8; QK_K];
    for g in 0..QK_K / 64 {
        for l in 0..32 {
            let (b, h) = (qs[32 * g + l], qh[l] >> (2 * g));
            q[64 * g + l] = (b & 0xF) | ((h & 1) << 4);
            q[64 * g + 32 + l] = (b >> 4) | (((h >> 1) & 1) << 4);
        }
    }
    q
}

/// Dequantizes Q5_K blocks into `out` (`blocks.len() == out.len() / 256 * 176`).
///
/// As ggml's `dequantize_row_q5_K`: element `i` of sub-block `j` (32 elements each) is
/// `d * sc[j] * q - dmin * m[j]` with `q` in `0..32`.
pub(crate) fn dequantize_q5k(blocks: &[u8], out: &mut [f32]) {
    LAYOUT.dequantize(blocks, out);
}

/// Quantizes `x` to Q5_K (`out.len() == x.len() / 256 * 176`).
///
/// A simple, deterministic min/max encoder for test fixtures (see [`AffineRuns::choose`]),
/// not llama.cpp's search; its output is a valid Q5_K stream.
pub(crate) fn quantize_q5k(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len() % QK_K, 0);
    debug_assert_eq!(out.len(), x.len() / QK_K * Q5K_BYTES);
    for (xs, blk) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q5K_BYTES)) {
        let runs = AffineRuns::<8>::choose(xs, 31.0, 63.0);
        K4Layout::write_header(blk, &runs);
        let mut q = [0u8; QK_K];
        runs.quants(xs, 31, &mut q);
        let (qh, qs) = blk[K4Layout::QUANTS..].split_at_mut(QH_BYTES);
        qh.fill(0);
        for g in 0..QK_K / 64 {
            for l in 0..32 {
                let (lo, hi) = (q[64 * g + l], q[64 * g + 32 + l]);
                qs[32 * g + l] = (lo & 0xF) | ((hi & 0xF) << 4);
                qh[l] |= ((lo >> 4) << (2 * g)) | ((hi >> 4) << (2 * g + 1));
            }
        }
    }
}

/// Dot product of a Q5_K weight row with a Q8_K activation row (`n / 256` blocks each).
///
/// The reference order; SIMD kernels must reproduce it. It is Q4_K's with 5-bit quants.
/// Per block, all integer work is exact (i32):
/// - `sumi  = Σ_j sc[j] * Σ_{32 elements of sub-block j} q5 * q8`
/// - `summs = Σ_j m[j] * (bsums[2j] + bsums[2j+1])`
///
/// then, in f32 with no fused multiply-add:
/// - `d    = a.d * f16(w.d)`, `dmin = a.d * f16(w.dmin)`
/// - `sumf = sumf + (d * sumi as f32 - dmin * summs as f32)`
///
/// with `sumf` starting at 0.0 and blocks accumulated sequentially in order.
pub(crate) fn vec_dot_q5k_q8k(w: &[u8], a: &[u8]) -> f32 {
    LAYOUT.vec_dot(w, a)
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::super::tests::{check_roundtrip, data, Format};
    use super::*;

    const Q5K: Format =
        Format { bytes: Q5K_BYTES, quantize: quantize_q5k, dequantize: dequantize_q5k, vec_dot: vec_dot_q5k_q8k };

    #[test]
    fn q5k_roundtrip() {
        let x = data(4, 8 * QK_K);
        let (_, y) = Q5K.round_trip(&x);
        // 5 bits: half a step is 1/62 of a sub-block's range (at most twice the amax).
        check_roundtrip(&x, &y, 0.045, 0.035);
    }

    #[test]
    fn q5k_vec_dot_matches_dequantized_and_zero_blocks() {
        Q5K.check_vec_dot();
        Q5K.check_zero();
    }

    #[test]
    fn q5k_hand_block() {
        // Q4_K's hand-packed scales: sc = [1, 2, 3, 4, 21, 38, 63, 8], m = [5, 6, 7, 8, 25, 42, 48, 3].
        let scales = [0x41, 0x82, 0xC3, 0x04, 0x45, 0x86, 0xC7, 0x08, 0x95, 0xA6, 0x0F, 0x38];
        let mut blk = vec![0u8; Q5K_BYTES];
        blk[0..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        blk[2..4].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        blk[4..16].copy_from_slice(&scales);
        // qh = 0b0101_1010: high bit set for sub-blocks 1, 3, 4 and 6.
        blk[16..48].fill(0x5A);
        for i in 0..128 {
            blk[48 + i] = (i % 16) as u8 | ((15 - i % 16) as u8) << 4;
        }
        let mut y = vec![0.0f32; QK_K];
        dequantize_q5k(&blk, &mut y);
        assert_eq!(y[0], -2.5); // sub 0, qs[0] low=0, no high bit: 1*0 - 0.5*5
        assert_eq!(y[33], 57.0); // sub 1, qs[1] high=14 +16 = 30: 2*30 - 0.5*6
        assert_eq!(y[130], 365.5); // sub 4, qs[66] low=2 +16 = 18: 21*18 - 0.5*25
        assert_eq!(y[170], 169.0); // sub 5, qs[74] high=5, no high bit: 38*5 - 0.5*42
        assert_eq!(y[200], 1488.0); // sub 6, qs[104] low=8 +16 = 24: 63*24 - 0.5*48
        assert_eq!(y[223], 1929.0); // sub 6, qs[127] low=15 +16 = 31: 63*31 - 0.5*48
        assert_eq!(y[255], -1.5); // sub 7, qs[127] high=0, no high bit: 8*0 - 0.5*3
    }
}
