//! Unquantized storage: f32, f16 and bf16 rows, with f32 dot products.
//!
//! The dot products accumulate in a fixed order (eight f32 lanes, then a
//! fixed pairwise reduction) so a vectorised kernel can match them exactly.

use half::{bf16, f16};

const LANES: usize = 8;

pub(super) fn decode_f32(b: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

pub(super) fn decode_f16(b: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

pub(super) fn decode_bf16(b: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

pub(super) fn encode_f32(x: &[f32], out: &mut [u8]) {
    for (v, c) in x.iter().zip(out.chunks_exact_mut(4)) {
        c.copy_from_slice(&v.to_le_bytes());
    }
}

pub(super) fn encode_f16(x: &[f32], out: &mut [u8]) {
    for (v, c) in x.iter().zip(out.chunks_exact_mut(2)) {
        c.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
    }
}

pub(super) fn encode_bf16(x: &[f32], out: &mut [u8]) {
    for (v, c) in x.iter().zip(out.chunks_exact_mut(2)) {
        c.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
    }
}

/// The one summation order for float dot products.
#[inline]
fn lane_dot(n: usize, mut w: impl FnMut(usize) -> f32, a: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let full = n / LANES * LANES;
    for i in (0..full).step_by(LANES) {
        for l in 0..LANES {
            acc[l] += w(i + l) * a[i + l];
        }
    }
    for i in full..n {
        acc[i - full] += w(i) * a[i];
    }
    crate::kernels::lanes::tree8(acc)
}

pub(super) fn dot_f32(w: &[u8], a: &[f32]) -> f32 {
    lane_dot(a.len(), |i| f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]]), a)
}

pub(super) fn dot_f16(w: &[u8], a: &[f32]) -> f32 {
    lane_dot(a.len(), |i| f16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32(), a)
}

pub(super) fn dot_bf16(w: &[u8], a: &[f32]) -> f32 {
    lane_dot(a.len(), |i| bf16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32(), a)
}
