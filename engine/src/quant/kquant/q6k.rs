//! Q6_K: 6-bit quants in sixteen runs of 16, each with a signed 8-bit scale.

use super::q8k::{Q8K_BSUMS, Q8K_BYTES, Q8K_D, Q8K_QS};
use super::{dot_i32, nearest_int, read_f16, read_f32, write_f16, QK_K};

/// Bytes per Q6_K block: `u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d`.
pub(crate) const Q6K_BYTES: usize = 210;

/// Offset of the low-nibble array `ql` in a Q6_K block.
const Q6K_QL: usize = 0;
/// Offset of the high-2-bit array `qh` in a Q6_K block.
const Q6K_QH: usize = 128;
/// Offset of the 16 signed 8-bit sub-block scales in a Q6_K block.
const Q6K_SCALES: usize = 192;
/// Offset of the f16 super-scale `d` in a Q6_K block.
const Q6K_D: usize = 208;

/// Decodes the 256 6-bit quants of a Q6_K block into element order, already re-centred to
/// the signed range `-32..32`.
///
/// Each half of 128 elements uses 64 `ql` bytes (low nibbles) and 32 `qh` bytes (four 2-bit
/// high parts per byte); see the format notes in [`dequantize_q6k`].
#[inline]
fn unpack_q6k_quants(ql: &[u8], qh: &[u8]) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for h in 0..2 {
        let ql = &ql[64 * h..64 * h + 64];
        let qh = &qh[32 * h..32 * h + 32];
        let y = &mut q[128 * h..128 * h + 128];
        for l in 0..32 {
            let hb = qh[l];
            // Each value is < 64, so the subtraction stays within i8.
            y[l] = ((ql[l] & 0xF) | ((hb & 3) << 4)) as i8 - 32;
            y[l + 32] = ((ql[l + 32] & 0xF) | (((hb >> 2) & 3) << 4)) as i8 - 32;
            y[l + 64] = ((ql[l] >> 4) | (((hb >> 4) & 3) << 4)) as i8 - 32;
            y[l + 96] = ((ql[l + 32] >> 4) | (((hb >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    q
}

/// Dequantizes Q6_K blocks into `out` (`blocks.len() == out.len() / 256 * 210`).
///
/// Layout per half of 128 elements (`ql` advances 64 bytes, `qh` 32, scales 8): for
/// `l in 0..32`, elements `l`, `l+32`, `l+64`, `l+96` take their low nibble from
/// `ql[l] & 0xF`, `ql[l+32] & 0xF`, `ql[l] >> 4`, `ql[l+32] >> 4` and their top two bits from
/// bits 0-1, 2-3, 4-5, 6-7 of `qh[l]`. Every run of 16 consecutive elements shares one signed
/// scale, and the value is `d * scale * (q - 32)`.
pub(crate) fn dequantize_q6k(blocks: &[u8], out: &mut [f32]) {
    debug_assert_eq!(out.len() % QK_K, 0);
    debug_assert_eq!(blocks.len(), out.len() / QK_K * Q6K_BYTES);
    for (blk, y) in blocks.chunks_exact(Q6K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = read_f16(blk, Q6K_D);
        let q = unpack_q6k_quants(&blk[Q6K_QL..Q6K_QH], &blk[Q6K_QH..Q6K_SCALES]);
        let scales = &blk[Q6K_SCALES..Q6K_D];
        for (g, (ys, qs)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let scale = d * f32::from(scales[g] as i8);
            for (yv, &qv) in ys.iter_mut().zip(qs) {
                *yv = scale * f32::from(qv);
            }
        }
    }
}

/// Quantizes `x` to Q6_K (`out.len() == x.len() / 256 * 210`).
///
/// A simple deterministic encoder for test fixtures. Each run of 16 gets a signed step
/// chosen so its largest-magnitude element maps to -32 (using the full asymmetric 6-bit
/// range, as llama.cpp does); the steps are then expressed as signed 8-bit multiples of the
/// f16 super-scale `d`.
pub(crate) fn quantize_q6k(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len() % QK_K, 0);
    debug_assert_eq!(out.len(), x.len() / QK_K * Q6K_BYTES);
    for (xs, blk) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q6K_BYTES)) {
        let mut steps = [0.0f32; 16];
        for (g, sub) in xs.chunks_exact(16).enumerate() {
            let mut max = 0.0f32;
            for &v in sub {
                if v.abs() > max.abs() {
                    max = v;
                }
            }
            steps[g] = max / -32.0;
        }
        let max_step = steps.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
        let d = write_f16(blk, Q6K_D, max_step / 127.0);

        let mut sc = [0i8; 16];
        if d > 0.0 {
            for (s, &st) in sc.iter_mut().zip(&steps) {
                *s = nearest_int(st / d).clamp(-127, 127) as i8;
            }
        }
        for (b, &s) in blk[Q6K_SCALES..Q6K_D].iter_mut().zip(&sc) {
            *b = s as u8;
        }

        // Unsigned quants (q + 32) in element order.
        let mut q = [32u8; QK_K];
        for (g, (qs, sub)) in q.chunks_exact_mut(16).zip(xs.chunks_exact(16)).enumerate() {
            let scale = d * f32::from(sc[g]);
            if scale != 0.0 {
                for (qv, &v) in qs.iter_mut().zip(sub) {
                    *qv = (nearest_int(v / scale).clamp(-32, 31) + 32) as u8;
                }
            }
        }
        let (ql, rest) = blk.split_at_mut(Q6K_QH);
        let qh = &mut rest[..Q6K_SCALES - Q6K_QH];
        for h in 0..2 {
            let y = &q[128 * h..128 * h + 128];
            let ql = &mut ql[64 * h..64 * h + 64];
            let qh = &mut qh[32 * h..32 * h + 32];
            for l in 0..32 {
                let (q1, q2, q3, q4) = (y[l], y[l + 32], y[l + 64], y[l + 96]);
                ql[l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
                ql[l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
                qh[l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
    }
}

/// Dot product of a Q6_K weight row with a Q8_K activation row (`n / 256` blocks each).
///
/// The reference order; SIMD kernels must reproduce it. Per block, the integer sum is exact
/// (i32): `isum = Σ_{g in 0..16} scales[g] * Σ_{16 elements of run g} (q6 - 32) * q8`; then,
/// in f32 with no fused multiply-add, `sumf = sumf + (f16(w.d) * a.d) * isum as f32`, with
/// `sumf` starting at 0.0 and blocks accumulated sequentially in order.
pub(crate) fn vec_dot_q6k_q8k(w: &[u8], a: &[u8]) -> f32 {
    debug_assert_eq!(w.len() % Q6K_BYTES, 0);
    debug_assert_eq!(w.len() / Q6K_BYTES, a.len() / Q8K_BYTES);
    debug_assert_eq!(a.len() % Q8K_BYTES, 0);
    let mut sumf = 0.0f32;
    for (wb, ab) in w.chunks_exact(Q6K_BYTES).zip(a.chunks_exact(Q8K_BYTES)) {
        let q6 = unpack_q6k_quants(&wb[Q6K_QL..Q6K_QH], &wb[Q6K_QH..Q6K_SCALES]);
        let q8 = &ab[Q8K_QS..Q8K_BSUMS];
        let scales = &wb[Q6K_SCALES..Q6K_D];
        let mut isum = 0i32;
        for g in 0..16 {
            isum += i32::from(scales[g] as i8) * dot_i32(&q6[16 * g..16 * g + 16], &q8[16 * g..16 * g + 16]);
        }
        sumf += (read_f16(wb, Q6K_D) * read_f32(ab, Q8K_D)) * isum as f32;
    }
    sumf
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::super::tests::{check_roundtrip, data, Format};
    use super::*;

    const Q6K: Format =
        Format { bytes: Q6K_BYTES, quantize: quantize_q6k, dequantize: dequantize_q6k, vec_dot: vec_dot_q6k_q8k };

    #[test]
    fn q6k_roundtrip() {
        let x = data(2, 8 * QK_K);
        let (_, y) = Q6K.round_trip(&x);
        // 6 bits: half a step is 1/64 of a run's amax, plus 8-bit scale rounding.
        check_roundtrip(&x, &y, 0.035, 0.02);
    }

    #[test]
    fn q6k_vec_dot_matches_dequantized_and_zero_blocks() {
        Q6K.check_vec_dot();
        Q6K.check_zero();
        let mut y = vec![1.0f32; QK_K];
        dequantize_q6k(&[0u8; Q6K_BYTES], &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn q6k_hand_block() {
        let mut blk = vec![0u8; Q6K_BYTES];
        for (i, b) in blk[..128].iter_mut().enumerate() {
            *b = i as u8; // ql
        }
        for i in 0..64 {
            blk[128 + i] = 0xE4; // qh: high bits 0, 1, 2, 3 for q1..q4
        }
        for g in 0..16 {
            blk[192 + g] = (g as i8 - 8) as u8; // scales -8..=7
        }
        blk[208..210].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        let mut y = vec![0.0f32; QK_K];
        dequantize_q6k(&blk, &mut y);
        assert_eq!(y[0], 64.0); // q=0-32, sc[0]=-8
        assert_eq!(y[37], 16.5); // ql[37]&15=5 | 1<<4 = 21 -> -11, sc[2]=-6
        assert_eq!(y[84], -0.75); // ql[20]>>4=1 | 2<<4 = 33 -> 1, sc[5]=-3
        assert_eq!(y[100], -9.0); // ql[36]>>4=2 | 3<<4 = 50 -> 18, sc[6]=-2
        assert_eq!(y[178], -10.5); // ql[114]&15=2 | 1<<4 = 18 -> -14, sc[11]=3
        assert_eq!(y[255], 40.25); // ql[127]>>4=7 | 3<<4 = 55 -> 23, sc[15]=7
    }
}
