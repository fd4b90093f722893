//! Q8_K: the 8-bit activation format every K-quant's dot product takes.

use super::{nearest_int, QK_K};

/// Bytes per Q8_K block: `f32 d; i8 qs[256]; i16 bsums[16]`.
///
/// `bsums` holds the sums of each run of 16 quants; the dot products of the formats with a
/// per-run minimum (Q2_K, Q4_K, Q5_K) use them to apply it without touching the individual
/// activations again.
pub(crate) const Q8K_BYTES: usize = 4 + QK_K + 2 * (QK_K / 16);

/// Offset of the f32 scale `d` in a Q8_K block.
pub(super) const Q8K_D: usize = 0;
/// Offset of the 256 signed 8-bit quants in a Q8_K block.
pub(super) const Q8K_QS: usize = 4;
/// Offset of the 16 little-endian i16 partial sums in a Q8_K block.
pub(super) const Q8K_BSUMS: usize = 4 + QK_K;

/// Quantizes an activation row to Q8_K (`out.len() == x.len() / 256 * Q8K_BYTES`).
///
/// Follows llama.cpp's `quantize_row_q8_K_ref` exactly: the element of largest magnitude
/// (sign kept) maps to -127, so `d` carries the opposite sign of that element; other values
/// are rounded to nearest (ties to even) and clamped at +127. `bsums` caches the sum of each
/// run of 16 quants for the minimum corrections.
pub(crate) fn quantize_q8k(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len() % QK_K, 0);
    debug_assert_eq!(out.len(), x.len() / QK_K * Q8K_BYTES);
    for (xs, blk) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q8K_BYTES)) {
        let mut max = 0.0f32;
        let mut amax = 0.0f32;
        for &v in xs {
            let av = v.abs();
            if av > amax {
                amax = av;
                max = v;
            }
        }
        if amax == 0.0 {
            blk.fill(0);
            continue;
        }
        let iscale = -127.0f32 / max;
        let mut q = [0i8; QK_K];
        for (qv, &v) in q.iter_mut().zip(xs) {
            // The lower end cannot go past -127 because |v| <= amax; clamp anyway so
            // non-finite inputs cannot wrap.
            *qv = nearest_int(iscale * v).clamp(-128, 127) as i8;
        }
        blk[Q8K_D..Q8K_D + 4].copy_from_slice(&(1.0f32 / iscale).to_le_bytes());
        for (b, &qv) in blk[Q8K_QS..Q8K_BSUMS].iter_mut().zip(&q) {
            *b = qv as u8;
        }
        for (k, run) in q.chunks_exact(16).enumerate() {
            let sum: i16 = run.iter().map(|&v| i16::from(v)).sum();
            let off = Q8K_BSUMS + 2 * k;
            blk[off..off + 2].copy_from_slice(&sum.to_le_bytes());
        }
    }
}

/// Decodes Q8_K blocks into `out`. Q8_K only appears as activations; decoding serves tests
/// and debugging.
pub(crate) fn dequantize_q8k(blocks: &[u8], out: &mut [f32]) {
    for (b, o) in blocks.chunks_exact(Q8K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = super::read_f32(b, Q8K_D);
        for (v, &q) in o.iter_mut().zip(&b[Q8K_QS..Q8K_BSUMS]) {
            *v = d * f32::from(q as i8);
        }
    }
}

/// Sum of the Q8_K quants of run `g` (16 elements).
#[inline]
pub(super) fn bsum16(ab: &[u8], g: usize) -> i32 {
    i32::from(super::read_i16(ab, Q8K_BSUMS + 2 * g))
}

/// Sum of the Q8_K quants of runs `2j` and `2j + 1` (the 32 elements of sub-block `j`).
#[inline]
pub(super) fn bsum32(ab: &[u8], j: usize) -> i32 {
    bsum16(ab, 2 * j) + bsum16(ab, 2 * j + 1)
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::read_i16;
    use super::super::tests::{check_roundtrip, data};
    use super::*;

    /// A whole Q8_K row decoded.
    pub(in super::super) fn dequantize_q8k(a: &[u8]) -> Vec<f32> {
        let mut out = vec![0.0; a.len() / Q8K_BYTES * QK_K];
        super::dequantize_q8k(a, &mut out);
        out
    }

    #[test]
    fn q8k_roundtrip() {
        let n = 4 * QK_K;
        let x = data(3, n);
        let mut b = vec![0u8; n / QK_K * Q8K_BYTES];
        quantize_q8k(&x, &mut b);
        let y = dequantize_q8k(&b);
        check_roundtrip(&x, &y, 0.5 / 127.0 + 1e-6, 0.01);
        for blk in b.chunks_exact(Q8K_BYTES) {
            for k in 0..16 {
                let s: i32 = blk[Q8K_QS + 16 * k..Q8K_QS + 16 * k + 16].iter().map(|&q| i32::from(q as i8)).sum();
                assert_eq!(s, i32::from(read_i16(blk, Q8K_BSUMS + 2 * k)));
            }
        }
    }

    #[test]
    fn q8k_hand_block() {
        // max = -127/64 makes iscale exactly 64, so every product below is exact.
        let mut x = vec![0.0f32; QK_K];
        x[5] = -127.0 / 64.0;
        x[17] = 1.0; // 64
        x[40] = 0.5; // 32
        x[41] = 2.5 / 64.0; // 2.5: ties to even -> 2, as llama.cpp's nearest_int
        x[42] = -3.5 / 64.0; // -3.5 -> -4
        let mut b = vec![0u8; Q8K_BYTES];
        quantize_q8k(&x, &mut b);
        assert_eq!(super::super::read_f32(&b, Q8K_D), 1.0 / 64.0);
        let q = |i: usize| b[Q8K_QS + i] as i8;
        assert_eq!((q(5), q(17), q(40), q(41), q(42), q(0)), (-127, 64, 32, 2, -4, 0));
        assert_eq!(read_i16(&b, Q8K_BSUMS), -127);
        assert_eq!(read_i16(&b, Q8K_BSUMS + 2), 64);
        assert_eq!(read_i16(&b, Q8K_BSUMS + 4), 32 + 2 - 4);
        assert!((3..16).all(|k| read_i16(&b, Q8K_BSUMS + 2 * k) == 0));
        assert_eq!(bsum32(&b, 0), -127 + 64);
        assert_eq!(bsum32(&b, 1), 30);

        let mut zero = vec![0xAAu8; 2 * Q8K_BYTES];
        quantize_q8k(&[0.0; 2 * QK_K], &mut zero);
        assert!(zero.iter().all(|&v| v == 0));
    }
}
