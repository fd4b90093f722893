//! Q4_K: 4-bit quants in eight sub-blocks of 32, each with a 6-bit scale and minimum.

use super::{AffineRuns, K4Layout, QK_K};

/// Bytes per Q4_K block: `f16 d; f16 dmin; u8 scales[12]; u8 qs[128]`.
pub(crate) const Q4K_BYTES: usize = 144;

/// Q4_K's place among the formats with Q4_K's header.
const LAYOUT: K4Layout = K4Layout { bytes: Q4K_BYTES, quants: unpack_q4k_quants };

/// Decodes the 256 unsigned 4-bit quants of a Q4_K block into element order.
///
/// Each group of 64 elements uses 32 bytes: low nibbles are elements 0..32 of the group,
/// high nibbles elements 32..64.
#[inline]
fn unpack_q4k_quants(qs: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for g in 0..QK_K / 64 {
        for l in 0..32 {
            let b = qs[32 * g + l];
            q[64 * g + l] = b & 0xF;
            q[64 * g + 32 + l] = b >> 4;
        }
    }
    q
}

/// Dequantizes Q4_K blocks into `out` (`blocks.len() == out.len() / 256 * 144`).
///
/// Element `i` of sub-block `j` (32 elements each) is `d * sc[j] * q - dmin * m[j]`, with the
/// 4-bit quant `q` taken from the nibble layout described in [`unpack_q4k_quants`].
pub(crate) fn dequantize_q4k(blocks: &[u8], out: &mut [f32]) {
    LAYOUT.dequantize(blocks, out);
}

/// Quantizes `x` to Q4_K (`out.len() == x.len() / 256 * 144`).
///
/// A simple, deterministic min/max encoder for test fixtures (see [`AffineRuns::choose`]);
/// it does not reproduce llama.cpp's iterative scale search, but its output is a valid Q4_K
/// stream.
pub(crate) fn quantize_q4k(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len() % QK_K, 0);
    debug_assert_eq!(out.len(), x.len() / QK_K * Q4K_BYTES);
    for (xs, blk) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q4K_BYTES)) {
        let runs = AffineRuns::<8>::choose(xs, 15.0, 63.0);
        K4Layout::write_header(blk, &runs);
        let mut q = [0u8; QK_K];
        runs.quants(xs, 15, &mut q);
        let qs = &mut blk[K4Layout::QUANTS..];
        for g in 0..QK_K / 64 {
            for l in 0..32 {
                qs[32 * g + l] = q[64 * g + l] | (q[64 * g + 32 + l] << 4);
            }
        }
    }
}

/// Dot product of a Q4_K weight row with a Q8_K activation row (`n / 256` blocks each).
///
/// The reference order; SIMD kernels must reproduce it. Per block, all integer work is
/// exact (i32):
/// - `sumi  = Σ_j sc[j] * Σ_{32 elements of sub-block j} q4 * q8`
/// - `summs = Σ_j m[j] * (bsums[2j] + bsums[2j+1])`
///
/// then, in f32 with no fused multiply-add:
/// - `d    = a.d * f16(w.d)`, `dmin = a.d * f16(w.dmin)`
/// - `sumf = sumf + (d * sumi as f32 - dmin * summs as f32)`
///
/// with `sumf` starting at 0.0 and blocks accumulated sequentially in order.
pub(crate) fn vec_dot_q4k_q8k(w: &[u8], a: &[u8]) -> f32 {
    LAYOUT.vec_dot(w, a)
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::super::tests::{check_roundtrip, data, Format};
    use super::super::{pack_scales_k4, unpack_scales_k4};
    use super::*;

    const Q4K: Format =
        Format { bytes: Q4K_BYTES, quantize: quantize_q4k, dequantize: dequantize_q4k, vec_dot: vec_dot_q4k_q8k };

    #[test]
    fn q4k_roundtrip() {
        let x = data(1, 8 * QK_K);
        let (_, y) = Q4K.round_trip(&x);
        // 4 bits: half a step is 1/30 of a sub-block's range, and a range is at most twice
        // the block's amax; uniform data gives ~0.055 relative RMS.
        check_roundtrip(&x, &y, 0.08, 0.07);
    }

    #[test]
    fn q4k_vec_dot_matches_dequantized_and_zero_blocks() {
        Q4K.check_vec_dot();
        Q4K.check_zero();
        // All-zero bytes are a valid block that decodes to zero.
        let mut y = vec![1.0f32; QK_K];
        dequantize_q4k(&[0u8; Q4K_BYTES], &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn q4k_hand_block() {
        // sc = [1, 2, 3, 4, 21, 38, 63, 8], m = [5, 6, 7, 8, 25, 42, 48, 3], packed by hand.
        let scales = [0x41, 0x82, 0xC3, 0x04, 0x45, 0x86, 0xC7, 0x08, 0x95, 0xA6, 0x0F, 0x38];
        let mut blk = vec![0u8; Q4K_BYTES];
        blk[0..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        blk[2..4].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        blk[4..16].copy_from_slice(&scales);
        for i in 0..128 {
            blk[16 + i] = (i % 16) as u8 | ((15 - i % 16) as u8) << 4;
        }
        let (sc, mn) = unpack_scales_k4(&scales);
        assert_eq!(sc, [1, 2, 3, 4, 21, 38, 63, 8]);
        assert_eq!(mn, [5, 6, 7, 8, 25, 42, 48, 3]);
        let mut packed = [0u8; 12];
        pack_scales_k4(&sc, &mn, &mut packed);
        assert_eq!(packed, scales);

        let mut y = vec![0.0f32; QK_K];
        dequantize_q4k(&blk, &mut y);
        assert_eq!(y[0], -2.5); // sub 0, q=0: 1*0 - 0.5*5
        assert_eq!(y[33], 25.0); // sub 1, qs[1] high=14: 2*14 - 0.5*6
        assert_eq!(y[130], 29.5); // sub 4, qs[66] low=2: 21*2 - 0.5*25
        assert_eq!(y[170], 169.0); // sub 5, qs[74] high=5: 38*5 - 0.5*42
        assert_eq!(y[200], 480.0); // sub 6, qs[104] low=8: 63*8 - 0.5*48
        assert_eq!(y[255], -1.5); // sub 7, qs[127] high=0: 8*0 - 0.5*3
    }
}
