//! The 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the activation type Q8_1.
//!
//! Layouts match GGUF byte for byte. In each dot product the integer part of a
//! block is exact in any order; the float part is accumulated block by block,
//! in block order, with the expressions written here. That is the reference
//! order a vectorised kernel must reproduce.

use half::f16;

use super::f16_at;

const QK: usize = 32;
pub(crate) const Q4_0_BYTES: usize = 2 + QK / 2;
pub(crate) const Q4_1_BYTES: usize = 4 + QK / 2;
/// `f16 d; u8 qh[4]; u8 qs[16]`: low nibbles as Q4_0, bit `j` of the little-endian
/// `qh` word is bit 4 of element `j`.
pub(crate) const Q5_0_BYTES: usize = 2 + 4 + QK / 2;
/// `f16 d; f16 m; u8 qh[4]; u8 qs[16]`: Q5_0's quants with Q4_1's scale and minimum.
pub(crate) const Q5_1_BYTES: usize = 4 + 4 + QK / 2;
pub(crate) const Q8_0_BYTES: usize = 2 + QK;
pub(crate) const Q8_1_BYTES: usize = 4 + QK;

fn put_f16(out: &mut [u8], at: usize, v: f32) {
    out[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

pub(crate) fn dequantize_q4_0(b: &[u8], out: &mut [f32]) {
    for (blk, o) in b.chunks_exact(Q4_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        for (j, q) in blk[2..].iter().enumerate() {
            o[j] = f32::from(i16::from(q & 0xF) - 8) * d;
            o[j + QK / 2] = f32::from(i16::from(q >> 4) - 8) * d;
        }
    }
}

pub(crate) fn dequantize_q4_1(b: &[u8], out: &mut [f32]) {
    for (blk, o) in b.chunks_exact(Q4_1_BYTES).zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
        for (j, q) in blk[4..].iter().enumerate() {
            o[j] = f32::from(q & 0xF) * d + m;
            o[j + QK / 2] = f32::from(q >> 4) * d + m;
        }
    }
}

/// The 32 five-bit quants of a Q5_0/Q5_1 block, in element order, from its `qh` word and
/// 16 nibble bytes: element `j < 16` is the low nibble of byte `j`, element `j + 16` the
/// high one, and bit `j` of `qh` (read little-endian) is bit 4 of element `j`.
#[inline]
fn q5_quants(qh: &[u8], qs: &[u8]) -> [u8; QK] {
    let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; QK];
    for (j, b) in qs.iter().enumerate() {
        q[j] = (b & 0xF) | ((((h >> j) & 1) as u8) << 4);
        q[j + QK / 2] = (b >> 4) | ((((h >> (j + QK / 2)) & 1) as u8) << 4);
    }
    q
}

/// Packs 32 five-bit quants (element order) into a `qh` word and 16 nibble bytes: the
/// inverse of [`q5_quants`].
fn put_q5_quants(q: &[u8; QK], qh: &mut [u8], qs: &mut [u8]) {
    let mut h = 0u32;
    for (j, b) in qs.iter_mut().enumerate() {
        let (lo, hi) = (q[j], q[j + QK / 2]);
        *b = (lo & 0xF) | ((hi & 0xF) << 4);
        h |= u32::from(lo >> 4) << j | u32::from(hi >> 4) << (j + QK / 2);
    }
    qh[..4].copy_from_slice(&h.to_le_bytes());
}

/// As ggml's `dequantize_row_q5_0`: `(q - 16) * d`.
pub(crate) fn dequantize_q5_0(b: &[u8], out: &mut [f32]) {
    for (blk, o) in b.chunks_exact(Q5_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        for (v, q) in o.iter_mut().zip(q5_quants(&blk[2..6], &blk[6..])) {
            *v = f32::from(i16::from(q) - 16) * d;
        }
    }
}

/// As ggml's `dequantize_row_q5_1`: `q * d + m`.
pub(crate) fn dequantize_q5_1(b: &[u8], out: &mut [f32]) {
    for (blk, o) in b.chunks_exact(Q5_1_BYTES).zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
        for (v, q) in o.iter_mut().zip(q5_quants(&blk[4..8], &blk[8..])) {
            *v = f32::from(q) * d + m;
        }
    }
}

pub(crate) fn dequantize_q8_0(b: &[u8], out: &mut [f32]) {
    for (blk, o) in b.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        for (v, q) in o.iter_mut().zip(&blk[2..]) {
            *v = f32::from(*q as i8) * d;
        }
    }
}

pub(crate) fn dequantize_q8_1(b: &[u8], out: &mut [f32]) {
    for (blk, o) in b.chunks_exact(Q8_1_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        for (v, q) in o.iter_mut().zip(&blk[4..]) {
            *v = f32::from(*q as i8) * d;
        }
    }
}

fn amax_signed(x: &[f32]) -> (f32, f32) {
    x.iter().fold((0.0f32, 0.0f32), |(amax, max), &v| if v.abs() > amax { (v.abs(), v) } else { (amax, max) })
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub(crate) fn quantize_q4_0(x: &[f32], out: &mut [u8]) {
    for (xs, blk) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q4_0_BYTES)) {
        let (_, max) = amax_signed(xs);
        let d = max / -8.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        put_f16(blk, 0, d);
        for j in 0..QK / 2 {
            let lo = ((xs[j] * id + 8.5) as i32).clamp(0, 15) as u8;
            let hi = ((xs[j + QK / 2] * id + 8.5) as i32).clamp(0, 15) as u8;
            blk[2 + j] = lo | (hi << 4);
        }
    }
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub(crate) fn quantize_q4_1(x: &[f32], out: &mut [u8]) {
    for (xs, blk) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q4_1_BYTES)) {
        let min = xs.iter().copied().fold(f32::INFINITY, f32::min);
        let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        put_f16(blk, 0, d);
        put_f16(blk, 2, min);
        for j in 0..QK / 2 {
            let lo = (((xs[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
            let hi = (((xs[j + QK / 2] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
            blk[4 + j] = lo | (hi << 4);
        }
    }
}

/// llama.cpp's reference Q5_0 encoder: the element of largest magnitude maps to code 0.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub(crate) fn quantize_q5_0(x: &[f32], out: &mut [u8]) {
    for (xs, blk) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q5_0_BYTES)) {
        let (_, max) = amax_signed(xs);
        let d = max / -16.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        put_f16(blk, 0, d);
        let mut q = [0u8; QK];
        for (c, v) in q.iter_mut().zip(xs) {
            *c = ((v * id + 16.5) as i32).clamp(0, 31) as u8;
        }
        let (qh, qs) = blk[2..].split_at_mut(4);
        put_q5_quants(&q, qh, qs);
    }
}

/// llama.cpp's reference Q5_1 encoder: the block's range in 31 steps from its minimum.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub(crate) fn quantize_q5_1(x: &[f32], out: &mut [u8]) {
    for (xs, blk) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q5_1_BYTES)) {
        let min = xs.iter().copied().fold(f32::INFINITY, f32::min);
        let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 31.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        put_f16(blk, 0, d);
        put_f16(blk, 2, min);
        let mut q = [0u8; QK];
        for (c, v) in q.iter_mut().zip(xs) {
            *c = (((v - min) * id + 0.5) as i32).clamp(0, 31) as u8;
        }
        let (qh, qs) = blk[4..].split_at_mut(4);
        put_q5_quants(&q, qh, qs);
    }
}

/// Scale and 8-bit codes of one block, llama.cpp's reference rounding
/// (`roundf`: half away from zero).
#[allow(clippy::cast_possible_truncation)]
fn q8_block(xs: &[f32], qs: &mut [u8]) -> (f32, i32) {
    let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(xs) {
        let c = (v * id).round() as i8;
        sum += i32::from(c);
        *q = c as u8;
    }
    (d, sum)
}

pub(crate) fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (xs, blk) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
        let (d, _) = q8_block(xs, &mut blk[2..]);
        put_f16(blk, 0, d);
    }
}

#[allow(clippy::cast_precision_loss)]
pub(crate) fn quantize_q8_1(x: &[f32], out: &mut [u8]) {
    for (xs, blk) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8_1_BYTES)) {
        let (d, sum) = q8_block(xs, &mut blk[4..]);
        put_f16(blk, 0, d);
        put_f16(blk, 2, sum as f32 * d);
    }
}

#[inline]
fn i8s(b: &[u8]) -> impl Iterator<Item = i32> + '_ {
    b.iter().map(|&q| i32::from(q as i8))
}

#[allow(clippy::cast_precision_loss)]
pub(crate) fn vec_dot_q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(Q4_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)) {
        let ys = &y[2..];
        let mut sumi = 0i32;
        for (j, q) in x[2..].iter().enumerate() {
            sumi += (i32::from(q & 0xF) - 8) * i32::from(ys[j] as i8);
            sumi += (i32::from(q >> 4) - 8) * i32::from(ys[j + QK / 2] as i8);
        }
        sumf += sumi as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sumf
}

#[allow(clippy::cast_precision_loss)]
pub(crate) fn vec_dot_q4_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(Q4_1_BYTES).zip(a.chunks_exact(Q8_1_BYTES)) {
        let ys = &y[4..];
        let mut sumi = 0i32;
        for (j, q) in x[4..].iter().enumerate() {
            sumi += i32::from(q & 0xF) * i32::from(ys[j] as i8);
            sumi += i32::from(q >> 4) * i32::from(ys[j + QK / 2] as i8);
        }
        sumf += (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32 + f16_at(x, 2) * f16_at(y, 2);
    }
    sumf
}

/// Q5_0 by Q8_0, as ggml's `ggml_vec_dot_q5_0_q8_0`: per block the exact
/// `sumi = Σ (q5 - 16) * q8`, then `sumf += sumi as f32 * (f16(w.d) * f16(a.d))`, blocks
/// in order, no fused multiply-add.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn vec_dot_q5_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(Q5_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)) {
        let q = q5_quants(&x[2..6], &x[6..]);
        let sumi: i32 = q.iter().zip(i8s(&y[2..])).map(|(&w, a)| (i32::from(w) - 16) * a).sum();
        sumf += sumi as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sumf
}

/// Q5_1 by Q8_1, as ggml's `ggml_vec_dot_q5_1_q8_1`: per block the exact
/// `sumi = Σ q5 * q8`, then `sumf += (f16(w.d) * f16(a.d)) * sumi as f32 + f16(w.m) * f16(a.s)`,
/// blocks in order, no fused multiply-add.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn vec_dot_q5_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(Q5_1_BYTES).zip(a.chunks_exact(Q8_1_BYTES)) {
        let q = q5_quants(&x[4..8], &x[8..]);
        let sumi: i32 = q.iter().zip(i8s(&y[4..])).map(|(&w, a)| i32::from(w) * a).sum();
        sumf += (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32 + f16_at(x, 2) * f16_at(y, 2);
    }
    sumf
}

#[allow(clippy::cast_precision_loss)]
pub(crate) fn vec_dot_q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(Q8_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)) {
        let sumi: i32 = i8s(&x[2..]).zip(i8s(&y[2..])).map(|(p, q)| p * q).sum();
        sumf += sumi as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sumf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_decodes_by_hand() {
        let mut blk = vec![0u8; Q4_1_BYTES];
        put_f16(&mut blk, 0, 0.5);
        put_f16(&mut blk, 2, -1.0);
        blk[4] = 0x3A; // element 0 = 10, element 16 = 3
        let mut out = vec![0.0; QK];
        dequantize_q4_1(&blk, &mut out);
        assert_eq!(out[0], 4.0);
        assert_eq!(out[16], 0.5);
        assert_eq!(out[1], -1.0);
    }

    /// A Q5_0 and a Q5_1 block written by hand decode to the values of ggml's formulas.
    #[test]
    fn q5_blocks_decode_by_hand() {
        // qh = 0x8001_0002: bit 1 (element 1), bit 16 (element 16), bit 31 (element 31).
        let qh = [0x02, 0x00, 0x01, 0x80];
        let mut qs = [0u8; 16];
        qs[0] = 0x3A; // element 0 = 10, element 16 = 3 | 16 = 19
        qs[1] = 0x07; // element 1 = 7 | 16 = 23, element 17 = 0
        qs[15] = 0xF0; // element 15 = 0, element 31 = 15 | 16 = 31

        let mut b0 = vec![0u8; Q5_0_BYTES];
        put_f16(&mut b0, 0, 0.5);
        b0[2..6].copy_from_slice(&qh);
        b0[6..].copy_from_slice(&qs);
        let mut out = vec![0.0; QK];
        dequantize_q5_0(&b0, &mut out);
        // (q - 16) * 0.5
        assert_eq!((out[0], out[1], out[2], out[15]), (-3.0, 3.5, -8.0, -8.0));
        assert_eq!((out[16], out[17], out[31]), (1.5, -8.0, 7.5));

        let mut b1 = vec![0u8; Q5_1_BYTES];
        put_f16(&mut b1, 0, 0.25);
        put_f16(&mut b1, 2, -2.0);
        b1[4..8].copy_from_slice(&qh);
        b1[8..].copy_from_slice(&qs);
        dequantize_q5_1(&b1, &mut out);
        // q * 0.25 - 2
        assert_eq!((out[0], out[1], out[2], out[15]), (0.5, 3.75, -2.0, -2.0));
        assert_eq!((out[16], out[17], out[31]), (2.75, -2.0, 5.75));

        // The encoders write the same layout back.
        let mut again = vec![0u8; Q5_1_BYTES];
        quantize_q5_1(&out, &mut again);
        let mut decoded = vec![0.0; QK];
        dequantize_q5_1(&again, &mut decoded);
        assert_eq!(decoded, out);
        assert_eq!(q5_quants(&again[4..8], &again[8..]), q5_quants(&qh, &qs));
    }

    /// Each Q5 dot product equals the f64 dot product of both sides decoded, up to float
    /// rounding (Q5_1's `m * s` term uses the f16-rounded `s`, as the decoded Q8_1 row does
    /// not, so it is checked against the codes' own sum).
    #[test]
    fn q5_vec_dots_match_dequantized() {
        let n = 4 * QK;
        let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
        let act: Vec<f32> = (0..n).map(|i| ((i * 53 % 89) as f32 - 44.0) / 30.0).collect();
        let mut w = vec![0u8; n / QK * Q5_0_BYTES];
        quantize_q5_0(&x, &mut w);
        let mut a = vec![0u8; n / QK * Q8_0_BYTES];
        quantize_q8_0(&act, &mut a);
        let (mut wd, mut ad) = (vec![0.0; n], vec![0.0; n]);
        dequantize_q5_0(&w, &mut wd);
        dequantize_q8_0(&a, &mut ad);
        let exact: f64 = wd.iter().zip(&ad).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum();
        let got = f64::from(vec_dot_q5_0_q8_0(&w, &a));
        assert!((got - exact).abs() < 1e-4 * (1.0 + exact.abs()), "q5_0 {got} vs {exact}");
        // ggml's encoder maps the largest magnitude to -16 steps, so the other end can clip
        // by up to one step (1/16 of the block's largest magnitude).
        assert!(wd.iter().zip(&x).all(|(p, q)| (p - q).abs() <= 1.26 / 16.0), "q5_0 round trip");

        let mut w = vec![0u8; n / QK * Q5_1_BYTES];
        quantize_q5_1(&x, &mut w);
        let mut a = vec![0u8; n / QK * Q8_1_BYTES];
        quantize_q8_1(&act, &mut a);
        dequantize_q5_1(&w, &mut wd);
        let mut exact = 0.0f64;
        for (x, y) in w.chunks_exact(Q5_1_BYTES).zip(a.chunks_exact(Q8_1_BYTES)) {
            let q = q5_quants(&x[4..8], &x[8..]);
            let dot: i32 = q.iter().zip(i8s(&y[4..])).map(|(&w, a)| i32::from(w) * a).sum();
            exact += f64::from(f16_at(x, 0)) * f64::from(f16_at(y, 0)) * f64::from(dot)
                + f64::from(f16_at(x, 2)) * f64::from(f16_at(y, 2));
        }
        let got = f64::from(vec_dot_q5_1_q8_1(&w, &a));
        assert!((got - exact).abs() < 1e-4 * (1.0 + exact.abs()), "q5_1 {got} vs {exact}");
        assert!(wd.iter().zip(&x).all(|(p, q)| (p - q).abs() <= 2.5 / 62.0 + 1e-3), "q5_1 round trip");
    }

    #[test]
    fn q8_1_sum_field_matches_codes() {
        let x: Vec<f32> = (0..QK).map(|i| i as f32 - 10.0).collect();
        let mut blk = vec![0u8; Q8_1_BYTES];
        quantize_q8_1(&x, &mut blk);
        let codes: i32 = i8s(&blk[4..]).sum();
        // `s` is the code sum times the unrounded scale, then rounded to f16.
        let expected = half::f16::from_f32(codes as f32 * (21.0 / 127.0)).to_f32();
        assert_eq!(f16_at(&blk, 2), expected);
        assert_eq!(blk[4 + 31] as i8, 127);
    }
}
