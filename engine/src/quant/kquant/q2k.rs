//! Q2_K: 2-bit quants in sixteen runs of 16, each with a 4-bit scale and a 4-bit minimum.

use super::q8k::{bsum16, Q8K_BSUMS, Q8K_BYTES, Q8K_D, Q8K_QS};
use super::{affine_block_sum, dot_i32, read_f16, read_f32, write_f16, AffineRuns, QK_K};

/// Bytes per Q2_K block: `u8 scales[16]; u8 qs[64]; f16 d; f16 dmin`.
pub(crate) const Q2K_BYTES: usize = 84;

/// Offset of the 16 scale bytes (scale in the low nibble, minimum in the high one).
const Q2K_SCALES: usize = 0;
/// Offset of the 64 bytes of packed 2-bit quants in a Q2_K block.
const Q2K_QS: usize = 16;
/// Offset of the f16 super-scale `d` in a Q2_K block.
const Q2K_D: usize = 80;
/// Offset of the f16 super-minimum `dmin` in a Q2_K block.
const Q2K_DMIN: usize = 82;

/// Decodes the 256 unsigned 2-bit quants of a Q2_K block into element order.
///
/// Each half of 128 elements uses 32 bytes: element `32j + l` of the half sits in bits
/// `2j..2j+2` of byte `l`.
#[inline]
fn unpack_q2k_quants(qs: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for h in 0..2 {
        for j in 0..4 {
            for l in 0..32 {
                q[128 * h + 32 * j + l] = (qs[32 * h + l] >> (2 * j)) & 3;
            }
        }
    }
    q
}

/// Dequantizes Q2_K blocks into `out` (`blocks.len() == out.len() / 256 * 84`).
///
/// As ggml's `dequantize_row_q2_K`: element `i` of run `g` (16 elements each) is
/// `(d * (scales[g] & 15)) * q - dmin * (scales[g] >> 4)` with `q` in `0..4`.
pub(crate) fn dequantize_q2k(blocks: &[u8], out: &mut [f32]) {
    debug_assert_eq!(out.len() % QK_K, 0);
    debug_assert_eq!(blocks.len(), out.len() / QK_K * Q2K_BYTES);
    for (blk, y) in blocks.chunks_exact(Q2K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = read_f16(blk, Q2K_D);
        let dmin = read_f16(blk, Q2K_DMIN);
        let q = unpack_q2k_quants(&blk[Q2K_QS..Q2K_D]);
        let scales = &blk[Q2K_SCALES..Q2K_QS];
        for (g, (ys, qs)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let dl = d * f32::from(scales[g] & 0xF);
            let ml = dmin * f32::from(scales[g] >> 4);
            for (yv, &qv) in ys.iter_mut().zip(qs) {
                *yv = dl * f32::from(qv) - ml;
            }
        }
    }
}

/// Quantizes `x` to Q2_K (`out.len() == x.len() / 256 * 84`).
///
/// A simple, deterministic min/max encoder for test fixtures (see [`AffineRuns::choose`]),
/// not llama.cpp's search; its output is a valid Q2_K stream.
pub(crate) fn quantize_q2k(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len() % QK_K, 0);
    debug_assert_eq!(out.len(), x.len() / QK_K * Q2K_BYTES);
    for (xs, blk) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q2K_BYTES)) {
        let runs = AffineRuns::<16>::choose(xs, 3.0, 15.0);
        write_f16(blk, Q2K_D, runs.d);
        write_f16(blk, Q2K_DMIN, runs.dmin);
        for (b, (&sc, &mn)) in blk[Q2K_SCALES..Q2K_QS].iter_mut().zip(runs.sc.iter().zip(&runs.mn)) {
            *b = sc | (mn << 4);
        }
        let mut q = [0u8; QK_K];
        runs.quants(xs, 3, &mut q);
        let qs = &mut blk[Q2K_QS..Q2K_D];
        for h in 0..2 {
            for l in 0..32 {
                let e = 128 * h + l;
                qs[32 * h + l] = q[e] | (q[e + 32] << 2) | (q[e + 64] << 4) | (q[e + 96] << 6);
            }
        }
    }
}

/// Dot product of a Q2_K weight row with a Q8_K activation row (`n / 256` blocks each).
///
/// The reference order; SIMD kernels must reproduce it. Per block, all integer work is
/// exact (i32), as in ggml's `ggml_vec_dot_q2_K_q8_K`:
/// - `sumi  = Σ_g (scales[g] & 15) * Σ_{16 elements of run g} q2 * q8`
/// - `summs = Σ_g (scales[g] >> 4) * bsums[g]`
///
/// then, in f32 with no fused multiply-add:
/// - `d    = a.d * f16(w.d)`, `dmin = a.d * f16(w.dmin)`
/// - `sumf = sumf + (d * sumi as f32 - dmin * summs as f32)`
///
/// with `sumf` starting at 0.0 and blocks accumulated sequentially in order.
pub(crate) fn vec_dot_q2k_q8k(w: &[u8], a: &[u8]) -> f32 {
    debug_assert_eq!(w.len() % Q2K_BYTES, 0);
    debug_assert_eq!(w.len() / Q2K_BYTES, a.len() / Q8K_BYTES);
    debug_assert_eq!(a.len() % Q8K_BYTES, 0);
    let mut sumf = 0.0f32;
    for (wb, ab) in w.chunks_exact(Q2K_BYTES).zip(a.chunks_exact(Q8K_BYTES)) {
        let q2 = unpack_q2k_quants(&wb[Q2K_QS..Q2K_D]);
        let q8 = &ab[Q8K_QS..Q8K_BSUMS];
        let scales = &wb[Q2K_SCALES..Q2K_QS];
        let mut sumi = 0i32;
        let mut summs = 0i32;
        for g in 0..16 {
            sumi += i32::from(scales[g] & 0xF) * dot_i32(&q2[16 * g..16 * g + 16], &q8[16 * g..16 * g + 16]);
            summs += i32::from(scales[g] >> 4) * bsum16(ab, g);
        }
        sumf += affine_block_sum(read_f32(ab, Q8K_D), read_f16(wb, Q2K_D), read_f16(wb, Q2K_DMIN), sumi, summs);
    }
    sumf
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::super::tests::{check_roundtrip, data, Format};
    use super::*;

    const Q2K: Format =
        Format { bytes: Q2K_BYTES, quantize: quantize_q2k, dequantize: dequantize_q2k, vec_dot: vec_dot_q2k_q8k };

    #[test]
    fn q2k_roundtrip() {
        let x = data(5, 8 * QK_K);
        let (_, y) = Q2K.round_trip(&x);
        // 2 bits: half a step is 1/6 of a run's range (at most twice the block's amax),
        // and 4-bit scales rounded up add up to a step of the largest run.
        check_roundtrip(&x, &y, 0.45, 0.3);
    }

    #[test]
    fn q2k_vec_dot_matches_dequantized_and_zero_blocks() {
        Q2K.check_vec_dot();
        Q2K.check_zero();
    }

    #[test]
    fn q2k_hand_block() {
        let mut blk = vec![0u8; Q2K_BYTES];
        for g in 0..16u8 {
            blk[usize::from(g)] = g | ((15 - g) << 4); // scale g, minimum 15 - g
        }
        // Quants 0, 1, 2, 3 for j = 0..4 in the first half, 3, 2, 1, 0 in the second,
        // except byte 5 (all 3) and byte 49 (all 0).
        blk[16..48].fill(0xE4);
        blk[48..80].fill(0x1B);
        blk[16 + 5] = 0xFF;
        blk[16 + 49] = 0x00;
        blk[80..82].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        blk[82..84].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        let mut y = vec![0.0f32; QK_K];
        dequantize_q2k(&blk, &mut y);
        // y = 0.5 * g * q - 0.25 * (15 - g), g = e / 16.
        assert_eq!(y[0], -3.75); // q = 0, g = 0
        assert_eq!(y[37], -0.25); // byte 5, j = 1: q = 3, g = 2
        assert_eq!(y[70], 1.25); // byte 6, j = 2: q = 2, g = 4
        assert_eq!(y[101], 6.75); // byte 5, j = 3: q = 3, g = 6
        assert_eq!(y[140], 10.25); // byte 44, j = 0: q = 3, g = 8
        assert_eq!(y[177], -1.0); // byte 49, j = 1: q = 0, g = 11
        assert_eq!(y[200], 5.25); // byte 40, j = 2: q = 1, g = 12
    }
}
