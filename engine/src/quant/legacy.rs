//! The 32-element block formats: Q4_0, Q4_1, Q8_0 and the activation type Q8_1.
//!
//! Layouts match GGUF byte for byte. In each dot product the integer part of a
//! block is exact in any order; the float part is accumulated block by block,
//! in block order, with the expressions written here. That is the reference
//! order a vectorised kernel must reproduce.

use half::f16;

use super::f16_at;

const QK: usize = 32;
pub(super) const Q4_0_BYTES: usize = 2 + QK / 2;
pub(super) const Q4_1_BYTES: usize = 4 + QK / 2;
pub(super) const Q8_0_BYTES: usize = 2 + QK;
pub(super) const Q8_1_BYTES: usize = 4 + QK;

fn put_f16(out: &mut [u8], at: usize, v: f32) {
    out[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

pub(super) fn dequantize_q4_0(b: &[u8], out: &mut [f32]) {
    for (blk, o) in b.chunks_exact(Q4_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        for (j, q) in blk[2..].iter().enumerate() {
            o[j] = f32::from(i16::from(q & 0xF) - 8) * d;
            o[j + QK / 2] = f32::from(i16::from(q >> 4) - 8) * d;
        }
    }
}

pub(super) fn dequantize_q4_1(b: &[u8], out: &mut [f32]) {
    for (blk, o) in b.chunks_exact(Q4_1_BYTES).zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
        for (j, q) in blk[4..].iter().enumerate() {
            o[j] = f32::from(q & 0xF) * d + m;
            o[j + QK / 2] = f32::from(q >> 4) * d + m;
        }
    }
}

pub(super) fn dequantize_q8_0(b: &[u8], out: &mut [f32]) {
    for (blk, o) in b.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        for (v, q) in o.iter_mut().zip(&blk[2..]) {
            *v = f32::from(*q as i8) * d;
        }
    }
}

pub(super) fn dequantize_q8_1(b: &[u8], out: &mut [f32]) {
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
pub(super) fn quantize_q4_0(x: &[f32], out: &mut [u8]) {
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
pub(super) fn quantize_q4_1(x: &[f32], out: &mut [u8]) {
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

pub(super) fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (xs, blk) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
        let (d, _) = q8_block(xs, &mut blk[2..]);
        put_f16(blk, 0, d);
    }
}

#[allow(clippy::cast_precision_loss)]
pub(super) fn quantize_q8_1(x: &[f32], out: &mut [u8]) {
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
pub(super) fn vec_dot_q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
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
pub(super) fn vec_dot_q4_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
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

#[allow(clippy::cast_precision_loss)]
pub(super) fn vec_dot_q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
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
