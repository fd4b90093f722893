//! Q3_K: 3-bit signed quants in sixteen runs of 16, each with a signed 6-bit scale.

use super::q8k::{Q8K_BSUMS, Q8K_BYTES, Q8K_D, Q8K_QS};
use super::{dot_i32, nearest_int, read_f16, read_f32, write_f16, QK_K};

/// Bytes per Q3_K block: `u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d`.
pub(crate) const Q3K_BYTES: usize = 110;

/// Offset of the 32 bytes of high bits in a Q3_K block.
const Q3K_HMASK: usize = 0;
/// Offset of the 64 bytes of packed low 2-bit quants in a Q3_K block.
const Q3K_QS: usize = 32;
/// Offset of the 12 bytes of packed 6-bit scales in a Q3_K block.
const Q3K_SCALES: usize = 96;
/// Offset of the f16 super-scale `d` in a Q3_K block.
const Q3K_D: usize = 108;

/// Unpacks the sixteen 6-bit scales of a Q3_K block, re-centred to `-32..32`.
///
/// Scale `i` keeps its low four bits in byte `i` (low nibble, `i < 8`) or byte `i - 8` (high
/// nibble), and its top two bits in bits `2 * (i / 4)` of byte `8 + i % 4`.
#[inline]
fn unpack_q3k_scales(s: &[u8]) -> [i8; 16] {
    let mut sc = [0i8; 16];
    for (i, v) in sc.iter_mut().enumerate() {
        let low = if i < 8 { s[i] & 0xF } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        // A 6-bit value minus 32 fits in i8.
        *v = (low | (high << 4)) as i8 - 32;
    }
    sc
}

/// Decodes the 256 3-bit quants of a Q3_K block into element order, in `-4..4`.
///
/// Element `e` takes its low two bits from bits `2j..2j+2` of `qs[32h + l]` (`h = e / 128`,
/// `j = e % 128 / 32`, `l = e % 32`) and its high bit from bit `e / 32` of `hmask[l]`; a
/// clear high bit subtracts 4.
#[inline]
fn unpack_q3k_quants(hmask: &[u8], qs: &[u8]) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for (e, v) in q.iter_mut().enumerate() {
        let (h, j, l) = (e / 128, e % 128 / 32, e % 32);
        let low = ((qs[32 * h + l] >> (2 * j)) & 3) as i8;
        let high = (hmask[l] >> (e / 32)) & 1;
        *v = if high == 1 { low } else { low - 4 };
    }
    q
}

/// Dequantizes Q3_K blocks into `out` (`blocks.len() == out.len() / 256 * 110`).
///
/// As ggml's `dequantize_row_q3_K`: element `i` of run `g` (16 elements each) is
/// `(d * sc[g]) * q` with the signed scale and quant of [`unpack_q3k_scales`] and
/// [`unpack_q3k_quants`].
pub(crate) fn dequantize_q3k(blocks: &[u8], out: &mut [f32]) {
    debug_assert_eq!(out.len() % QK_K, 0);
    debug_assert_eq!(blocks.len(), out.len() / QK_K * Q3K_BYTES);
    for (blk, y) in blocks.chunks_exact(Q3K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = read_f16(blk, Q3K_D);
        let sc = unpack_q3k_scales(&blk[Q3K_SCALES..Q3K_D]);
        let q = unpack_q3k_quants(&blk[Q3K_HMASK..Q3K_QS], &blk[Q3K_QS..Q3K_SCALES]);
        for (g, (ys, qs)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let dl = d * f32::from(sc[g]);
            for (yv, &qv) in ys.iter_mut().zip(qs) {
                *yv = dl * f32::from(qv);
            }
        }
    }
}

/// Quantizes `x` to Q3_K (`out.len() == x.len() / 256 * 110`).
///
/// A simple deterministic encoder for test fixtures, shaped like llama.cpp's reference
/// without its search: each run of 16 gets the smallest signed step whose quants `-4..=3`
/// cover the run's range (the sign picks which end gets the extra level), and the run with
/// the largest step maps to scale -32, fixing `d`.
pub(crate) fn quantize_q3k(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len() % QK_K, 0);
    debug_assert_eq!(out.len(), x.len() / QK_K * Q3K_BYTES);
    for (xs, blk) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q3K_BYTES)) {
        let mut steps = [0.0f32; 16];
        for (st, sub) in steps.iter_mut().zip(xs.chunks_exact(16)) {
            let lo = sub.iter().fold(0.0f32, |m, &v| m.min(v));
            let hi = sub.iter().fold(0.0f32, |m, &v| m.max(v));
            // A positive step reaches -4 steps down and 3 up; a negative one the reverse.
            let up = (-lo / 4.0).max(hi / 3.0);
            let down = (-lo / 3.0).max(hi / 4.0);
            *st = if up <= down { up } else { -down };
        }
        let max_step = steps.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = write_f16(blk, Q3K_D, max_step / -32.0);
        let mut sc = [0i8; 16];
        if d != 0.0 {
            for (s, &st) in sc.iter_mut().zip(&steps) {
                *s = nearest_int(st / d).clamp(-32, 31) as i8;
            }
        }
        let scales = &mut blk[Q3K_SCALES..Q3K_D];
        scales.fill(0);
        for (i, &s) in sc.iter().enumerate() {
            // `s + 32` is in 0..64.
            let code = (s + 32) as u8;
            if i < 8 {
                scales[i] |= code & 0xF;
            } else {
                scales[i - 8] |= (code & 0xF) << 4;
            }
            scales[8 + i % 4] |= (code >> 4) << (2 * (i / 4));
        }

        // Quants offset to 0..8 in element order, against the scales as decoded.
        let mut q = [4u8; QK_K];
        for (g, (qs, sub)) in q.chunks_exact_mut(16).zip(xs.chunks_exact(16)).enumerate() {
            let scale = d * f32::from(sc[g]);
            if scale != 0.0 {
                for (qv, &v) in qs.iter_mut().zip(sub) {
                    *qv = (nearest_int(v / scale).clamp(-4, 3) + 4) as u8;
                }
            }
        }
        let (hmask, rest) = blk[..Q3K_SCALES].split_at_mut(Q3K_QS);
        hmask.fill(0);
        rest.fill(0);
        for (e, &v) in q.iter().enumerate() {
            let (h, j, l) = (e / 128, e % 128 / 32, e % 32);
            hmask[l] |= (v >> 2) << (e / 32);
            rest[32 * h + l] |= (v & 3) << (2 * j);
        }
    }
}

/// Dot product of a Q3_K weight row with a Q8_K activation row (`n / 256` blocks each).
///
/// The reference order; SIMD kernels must reproduce it. Per block, the integer sum is exact
/// (i32): `isum = Σ_{g in 0..16} sc[g] * Σ_{16 elements of run g} q3 * q8` with the signed
/// scales and quants; then, in f32 with no fused multiply-add,
/// `sumf = sumf + (f16(w.d) * a.d) * isum as f32`, with `sumf` starting at 0.0 and blocks
/// accumulated sequentially in order.
pub(crate) fn vec_dot_q3k_q8k(w: &[u8], a: &[u8]) -> f32 {
    debug_assert_eq!(w.len() % Q3K_BYTES, 0);
    debug_assert_eq!(w.len() / Q3K_BYTES, a.len() / Q8K_BYTES);
    debug_assert_eq!(a.len() % Q8K_BYTES, 0);
    let mut sumf = 0.0f32;
    for (wb, ab) in w.chunks_exact(Q3K_BYTES).zip(a.chunks_exact(Q8K_BYTES)) {
        let sc = unpack_q3k_scales(&wb[Q3K_SCALES..Q3K_D]);
        let q3 = unpack_q3k_quants(&wb[Q3K_HMASK..Q3K_QS], &wb[Q3K_QS..Q3K_SCALES]);
        let q8 = &ab[Q8K_QS..Q8K_BSUMS];
        let mut isum = 0i32;
        for g in 0..16 {
            isum += i32::from(sc[g]) * dot_i32(&q3[16 * g..16 * g + 16], &q8[16 * g..16 * g + 16]);
        }
        sumf += (read_f16(wb, Q3K_D) * read_f32(ab, Q8K_D)) * isum as f32;
    }
    sumf
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::super::tests::{check_roundtrip, data, Format};
    use super::*;

    const Q3K: Format =
        Format { bytes: Q3K_BYTES, quantize: quantize_q3k, dequantize: dequantize_q3k, vec_dot: vec_dot_q3k_q8k };

    #[test]
    fn q3k_roundtrip() {
        let x = data(6, 8 * QK_K);
        let (_, y) = Q3K.round_trip(&x);
        // 3 bits: a step is a quarter of a run's amax, plus the 6-bit scale rounding.
        check_roundtrip(&x, &y, 0.2, 0.15);
    }

    #[test]
    fn q3k_vec_dot_matches_dequantized_and_zero_blocks() {
        Q3K.check_vec_dot();
        Q3K.check_zero();
    }

    #[test]
    fn q3k_hand_block() {
        // Scale codes 24..40 (scales -8..=7), packed by hand: low nibbles 8..16 then 0..8,
        // top two bits 1 for scales 0..8 and 2 for 8..16.
        let scales = [0x08, 0x19, 0x2A, 0x3B, 0x4C, 0x5D, 0x6E, 0x7F, 0xA5, 0xA5, 0xA5, 0xA5];
        assert_eq!(unpack_q3k_scales(&scales), [-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7]);
        let mut blk = vec![0u8; Q3K_BYTES];
        blk[0..32].fill(0xAA); // high bit set for e / 32 odd
        blk[3] = 0x55; // ... but for l = 3, for e / 32 even
        blk[32..96].fill(0xE4); // low bits j = 0..4: 0, 1, 2, 3
        blk[32 + 3] = 0x1B; // ... but 3, 2, 1, 0 for byte 3
        blk[96..108].copy_from_slice(&scales);
        blk[108..110].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        let mut y = vec![0.0f32; QK_K];
        dequantize_q3k(&blk, &mut y);
        // y = 0.5 * (e / 16 - 8) * q.
        assert_eq!(y[0], 16.0); // low 0, no high bit: q = -4, scale -8
        assert_eq!(y[3], -12.0); // byte 3: low 3, high bit: q = 3, scale -8
        assert_eq!(y[35], 6.0); // byte 3, j = 1: low 2, no high bit: q = -2, scale -6
        assert_eq!(y[100], -3.0); // j = 3: low 3, high bit: q = 3, scale -2
        assert_eq!(y[150], -2.0); // low 0, no high bit: q = -4, scale 1
        assert_eq!(y[163], -3.0); // byte 35, j = 1: low 1, hmask[3] bit 5 clear: q = -3, scale 2
        assert_eq!(y[200], -4.0); // j = 2: low 2, no high bit: q = -2, scale 4
        assert_eq!(y[227], -3.0); // j = 3: low 3, hmask[3] bit 7 clear: q = -1, scale 6
        assert_eq!(y[255], 10.5); // low 3, high bit: q = 3, scale 7
    }
}
