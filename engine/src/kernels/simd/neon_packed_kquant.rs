//! Packed-tile kernels for the K-quants (Q4_K, Q5_K and Q6_K against Q8_K
//! activations) on aarch64 with the dot product extension: eight weight
//! rows against up to four activation rows, over a run of tiles, as in
//! `neon_packed`, whose helpers (`sdot` on lane-interleaved weights, the
//! activation loads, the f16 scales, the stores) they share.
//!
//! What differs from the 32-element formats is that every 32 (Q4_K, Q5_K)
//! or 16 (Q6_K) elements of a row carry their own small integer scale,
//! different in each lane. So each sub-block's `sdot`s go to a fresh pair
//! of accumulators (rows 0..4, 4..8), which `mla` then multiplies by the
//! lanes' scales into the block sum. Everything stays exact in i32 (bounds
//! at each kernel), so the order is free; the float part per block repeats
//! the scalar reference's f32 operations one for one, per lane, as separate
//! `fmul`/`fadd`/`fsub` (never FMA), so every output equals
//! `kquant::vec_dot_q4k_q8k`, `vec_dot_q5k_q8k` or `vec_dot_q6k_q8k` bit
//! for bit. Q5_K is Q4_K with a fifth bit per quant, and its packed block
//! is Q4_K's with the high bits after it, so one kernel serves both.
//!
//! The codes are unsigned (nibbles, 5-bit and 6-bit values below 64), so
//! they are valid operands of the signed `sdot`. Q6_K's `- 32` is taken out
//! of each run's sum by starting it at `- 32 Σ q8` (the activation scalar
//! `pack::ActScalars` holds), as Q4_0's `- 8` in `neon_packed`.
//!
//! The scales are read from the packed tile block (`quant::pack`) with one
//! load per four of each row's scale bytes and spread to 32-bit lanes with
//! shifts; that work is shared by every activation row of a pass.

// NEON intrinsics are safe inside `#[target_feature]` functions on current
// compilers; the `unsafe` blocks keep the pointer reads explicit.
#![allow(unused_unsafe)]

use std::arch::aarch64::*;

use super::neon_packed::{load_acts, offset_sums, sdot_rows, store, widen_f16x8};
use crate::quant::kquant::{Q4K_BYTES, Q5K_BYTES, Q6K_BYTES, Q8K_BYTES};
use crate::quant::pack::Job;

/// Offset of the quants `qs` in a Q8_K block (after the f32 `d`).
const Q8K_QS: usize = 4;

/// Offset of `bsums` (sixteen i16 sums of 16 quants) in a Q8_K block.
const Q8K_BSUMS: usize = Q8K_QS + 256;

/// Offset of the high bits (`qh`) in a packed Q5_K tile block: after
/// Q4_K's whole block (`quant::pack`).
const Q5K_QH: usize = 8 * Q4K_BYTES;

/// Byte `k` of each 32-bit lane of `v`, zero-extended to the lane.
#[inline]
fn lane_byte(v: uint8x16_t, k: usize) -> int32x4_t {
    // SAFETY: register operations; NEON is baseline on aarch64.
    unsafe {
        let shifted = vshlq_u32(vreinterpretq_u32_u8(v), vdupq_n_s32(-8 * k as i32));
        vreinterpretq_s32_u32(vandq_u32(shifted, vdupq_n_u32(0xFF)))
    }
}

/// Byte `k` of each 32-bit lane of `v`, sign-extended to the lane.
#[inline]
fn lane_byte_signed(v: uint8x16_t, k: usize) -> int32x4_t {
    // SAFETY: register operations; NEON is baseline on aarch64.
    unsafe { vshrq_n_s32::<24>(vshlq_s32(vreinterpretq_s32_u8(v), vdupq_n_s32(24 - 8 * k as i32))) }
}

/// Q4_K×Q8_K for `M` activation rows.
///
/// # Safety
/// `j` came from [`Job::passes`] for `M` rows of Q4_K tiles; the CPU has
/// `dotprod`.
#[target_feature(enable = "dotprod")]
pub(super) unsafe fn q4_k<const M: usize>(j: &Job) {
    // SAFETY: the caller's contract, for Q4_K tiles.
    unsafe { k4::<M, false>(j) }
}

/// Q5_K×Q8_K for `M` activation rows.
///
/// # Safety
/// As for [`q4_k`], for Q5_K tiles.
#[target_feature(enable = "dotprod")]
pub(super) unsafe fn q5_k<const M: usize>(j: &Job) {
    // SAFETY: the caller's contract, for Q5_K tiles.
    unsafe { k4::<M, true>(j) }
}

/// The eight 6-bit scales and minimums of each row of the packed Q4_K/Q5_K
/// block at `p`, as `(sc, mn)`: `sc[0][h]` holds, in lane `r`, the scales
/// of sub-blocks 0..4 of row `4h + r` (one per byte), `sc[1][h]` those of
/// 4..8, and `mn` the minimums likewise (the reference's
/// `unpack_scales_k4`, on every row at once).
///
/// # Safety
/// `p` is a packed Q4_K or Q5_K block.
#[inline]
unsafe fn k4_scales(p: *const u8) -> ([[uint8x16_t; 2]; 2], [[uint8x16_t; 2]; 2]) {
    // SAFETY: the three runs of scale bytes lie at 32..128 of the block.
    unsafe {
        let (m4, m6, top) = (vdupq_n_u8(0x0F), vdupq_n_u8(0x3F), vdupq_n_u8(0x30));
        let mut sc = [[vdupq_n_u8(0); 2]; 2];
        let mut mn = sc;
        for h in 0..2 {
            // Each row's GGUF scale bytes 0..4, 4..8 and 8..12.
            let s0 = vld1q_u8(p.add(32 + 16 * h));
            let s1 = vld1q_u8(p.add(64 + 16 * h));
            let s2 = vld1q_u8(p.add(96 + 16 * h));
            sc[0][h] = vandq_u8(s0, m6);
            mn[0][h] = vandq_u8(s1, m6);
            // A nibble of bytes 8..12 with the top two bits of 0..4 or 4..8.
            sc[1][h] = vorrq_u8(vandq_u8(s2, m4), vandq_u8(vshrq_n_u8::<2>(s0), top));
            mn[1][h] = vorrq_u8(vshrq_n_u8::<4>(s2), vandq_u8(vshrq_n_u8::<2>(s1), top));
        }
        (sc, mn)
    }
}

/// Each activation row's `summs = Σ_j m[j] (bsums[2j] + bsums[2j + 1])`
/// for block `b`, per lane (weight row), exact in i32 (at most
/// 8 · 63 · 4096); `mn` as [`k4_scales`] gives it.
///
/// # Safety
/// `j` came from [`Job::passes`] for `M` rows of Q8_K activations; `b < j.nb`.
#[inline]
unsafe fn k4_mins<const M: usize>(j: &Job, b: usize, mn: &[[uint8x16_t; 2]; 2]) -> [[int32x4_t; 2]; M] {
    // SAFETY: the 32 bytes of `bsums` lie inside activation block `b`.
    unsafe {
        let mut summs = [[vdupq_n_s32(0); 2]; M];
        for (s, a) in summs.iter_mut().zip(&j.a) {
            let bs = a.add(b * Q8K_BYTES + Q8K_BSUMS);
            // Lane `k`: the sum of the 32 activations of sub-block `k`
            // (0..4, then 4..8), from adjacent pairs of i16 `bsums`.
            let pairs = [
                vpaddlq_s16(vreinterpretq_s16_u8(vld1q_u8(bs))),
                vpaddlq_s16(vreinterpretq_s16_u8(vld1q_u8(bs.add(16)))),
            ];
            for (h, s) in s.iter_mut().enumerate() {
                for (m, pair) in mn.iter().zip(&pairs) {
                    *s = vmlaq_laneq_s32::<0>(*s, lane_byte(m[h], 0), *pair);
                    *s = vmlaq_laneq_s32::<1>(*s, lane_byte(m[h], 1), *pair);
                    *s = vmlaq_laneq_s32::<2>(*s, lane_byte(m[h], 2), *pair);
                    *s = vmlaq_laneq_s32::<3>(*s, lane_byte(m[h], 3), *pair);
                }
            }
        }
        summs
    }
}

/// Elements `4c..4c + 4` (`c = 4n + L`) of sub-block `sub` of all eight
/// rows of the packed Q4_K/Q5_K block at `p`, into each activation row's
/// sums against lane `L` of its vector `ys[i][n]`. The code is the low
/// (even `sub`) or high nibble of quant bytes `32 (sub / 2) + 4c..`, with
/// `FIVE` also bit `sub` of the row's `qh` bytes `4c..4c + 4` as bit 4.
///
/// # Safety
/// `p` is a packed block of the type `FIVE` names; the CPU has `dotprod`.
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn k4_chunk<const L: usize, const M: usize, const FIVE: bool>(
    p: *const u8,
    sub: usize,
    n: usize,
    ys: &[[int8x16_t; 2]; M],
    dot: &mut [[int32x4_t; 2]; M],
) {
    // SAFETY: the quant and `qh` bytes read lie inside the packed block.
    unsafe {
        let c = 4 * n + L;
        let mut w = [vdupq_n_s8(0); 2];
        for (h, w) in w.iter_mut().enumerate() {
            let raw = vld1q_u8(p.add(128 + 32 * (8 * (sub / 2) + c) + 16 * h));
            let mut q = if sub % 2 == 1 { vshrq_n_u8::<4>(raw) } else { vandq_u8(raw, vdupq_n_u8(0x0F)) };
            if FIVE {
                let qh = vld1q_u8(p.add(Q5K_QH + 32 * c + 16 * h));
                q = vorrq_u8(q, vandq_u8(vtstq_u8(qh, vdupq_n_u8(1 << sub)), vdupq_n_u8(0x10)));
            }
            *w = vreinterpretq_s8_u8(q);
        }
        sdot_rows::<L, M, 2>(w, ys, n, dot);
    }
}

/// Adds `sc[sub] Σ q q8` over sub-block `sub` of block `b` of the packed
/// block at `p` to `sumi`, per activation row and lane (`s`: the lanes'
/// scales of that sub-block, rows 0..4 and 4..8).
///
/// # Safety
/// As for [`k4_chunk`]; `j` came from [`Job::passes`] for `M` rows, `b < j.nb`.
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn k4_sub<const M: usize, const FIVE: bool>(
    j: &Job,
    p: *const u8,
    b: usize,
    sub: usize,
    s: [int32x4_t; 2],
    sumi: &mut [[int32x4_t; 2]; M],
) {
    // SAFETY: the caller's (`k4`'s) bounds.
    unsafe {
        let ys = load_acts::<M, 2>(j, b * Q8K_BYTES + Q8K_QS + 32 * sub);
        let mut dot = [[vdupq_n_s32(0); 2]; M];
        k4_chunk::<0, M, FIVE>(p, sub, 0, &ys, &mut dot);
        k4_chunk::<1, M, FIVE>(p, sub, 0, &ys, &mut dot);
        k4_chunk::<2, M, FIVE>(p, sub, 0, &ys, &mut dot);
        k4_chunk::<3, M, FIVE>(p, sub, 0, &ys, &mut dot);
        k4_chunk::<0, M, FIVE>(p, sub, 1, &ys, &mut dot);
        k4_chunk::<1, M, FIVE>(p, sub, 1, &ys, &mut dot);
        k4_chunk::<2, M, FIVE>(p, sub, 1, &ys, &mut dot);
        k4_chunk::<3, M, FIVE>(p, sub, 1, &ys, &mut dot);
        for (si, d) in sumi.iter_mut().zip(&dot) {
            si[0] = vmlaq_s32(si[0], d[0], s[0]);
            si[1] = vmlaq_s32(si[1], d[1], s[1]);
        }
    }
}

/// Q4_K×Q8_K, or Q5_K×Q8_K with `FIVE`. Per block and lane, exactly in
/// i32: `sumi = Σ_j sc[j] Σ q q8` over the eight sub-blocks of 32 (at most
/// 8 · 63 · 32 · 31 · 128, under 2^26) and `summs` ([`k4_mins`]); then
/// `sumf += d * sumi as f32 - dmin * summs as f32` with `d = a.d * w.d` and
/// `dmin = a.d * w.dmin`, block by block.
///
/// # Safety
/// As for [`q4_k`], for tiles of the type `FIVE` names.
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn k4<const M: usize, const FIVE: bool>(j: &Job) {
    // SAFETY: see `Job` (the operands' bounds); unaligned loads only.
    unsafe {
        let tbb = 8 * if FIVE { Q5K_BYTES } else { Q4K_BYTES };
        for t in 0..j.ntiles {
            let mut acc = [[vdupq_n_f32(0.0); 2]; M];
            for b in 0..j.nb {
                let p = j.tiles.add((t * j.nb + b) * tbb);
                let (sc, mn) = k4_scales(p);
                let summs = k4_mins::<M>(j, b, &mn);
                let mut sumi = [[vdupq_n_s32(0); 2]; M];
                for sub in 0..8 {
                    let s = [lane_byte(sc[sub / 4][0], sub % 4), lane_byte(sc[sub / 4][1], sub % 4)];
                    k4_sub::<M, FIVE>(j, p, b, sub, s, &mut sumi);
                }
                let dx = widen_f16x8(p);
                let mx = widen_f16x8(p.add(16));
                for (i, a) in acc.iter_mut().enumerate() {
                    let ad = vdupq_n_f32(*j.d.add(i * j.nb + b));
                    for h in 0..2 {
                        let d = vmulq_f32(ad, dx[h]);
                        let dmin = vmulq_f32(ad, mx[h]);
                        let scaled = vmulq_f32(d, vcvtq_f32_s32(sumi[i][h]));
                        let mins = vmulq_f32(dmin, vcvtq_f32_s32(summs[i][h]));
                        a[h] = vaddq_f32(a[h], vsubq_f32(scaled, mins));
                    }
                }
            }
            store(j, t, &acc);
        }
    }
}

/// Elements `4k..4k + 4` (`k = k0 + L`) of `ql`/`qh` chunk kind `KIND` in
/// half `h` of the packed Q6_K block at `p`, all eight rows, into each
/// activation row's sums against lane `L` of its run vector. Element
/// `128 h + 32 KIND + l` takes its low nibble from `ql[64 h + l]` (kinds 0
/// and 2) or `ql[64 h + 32 + l]` (1 and 3), low or high (kinds 2 and 3),
/// and its top two bits from bits `2 KIND..` of `qh[32 h + l]`.
///
/// # Safety
/// `p` is a packed Q6_K block, `h < 2`, `k0 + L < 8`; the CPU has `dotprod`.
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn q6_k_chunk<const L: usize, const M: usize, const KIND: usize>(
    p: *const u8,
    h: usize,
    k0: usize,
    ys: &[[int8x16_t; 1]; M],
    dot: &mut [[int32x4_t; 2]; M],
) {
    // SAFETY: the `ql` and `qh` bytes read lie inside the packed block.
    unsafe {
        let (m4, top) = (vdupq_n_u8(0x0F), vdupq_n_u8(0x30));
        let k = k0 + L;
        let mut w = [vdupq_n_s8(0); 2];
        for (r, w) in w.iter_mut().enumerate() {
            let ql = vld1q_u8(p.add(144 + 32 * (16 * h + 8 * (KIND % 2) + k) + 16 * r));
            let qh = vld1q_u8(p.add(1168 + 32 * (8 * h + k) + 16 * r));
            let lo = if KIND < 2 { vandq_u8(ql, m4) } else { vshrq_n_u8::<4>(ql) };
            let hi = match KIND {
                0 => vshlq_n_u8::<4>(qh),
                1 => vshlq_n_u8::<2>(qh),
                2 => qh,
                _ => vshrq_n_u8::<2>(qh),
            };
            *w = vreinterpretq_s8_u8(vorrq_u8(lo, vandq_u8(hi, top)));
        }
        sdot_rows::<L, M, 1>(w, ys, 0, dot);
    }
}

/// Adds `scale[g] (Σ q6 q8 - 32 Σ q8)` over run `g = 8 h + 2 KIND + half`
/// (elements `16 g..16 g + 16`) of block `b` of the packed Q6_K block at
/// `p` to `isum`, per activation row and lane; the run's sums start at the
/// activation scalar `- 32 Σ q8`.
///
/// # Safety
/// As for [`q6_k_chunk`]; `j` came from [`Job::passes`] for `M` rows, `b < j.nb`.
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn q6_k_run<const M: usize, const KIND: usize>(
    j: &Job,
    p: *const u8,
    b: usize,
    h: usize,
    half: usize,
    isum: &mut [[int32x4_t; 2]; M],
) {
    // SAFETY: the caller's (`q6_k`'s) bounds; run `g` is below 16.
    unsafe {
        let g = 8 * h + 2 * KIND + half;
        let ys = load_acts::<M, 1>(j, b * Q8K_BYTES + Q8K_QS + 16 * g);
        let mut dot = offset_sums::<M>(j, b, 16, g);
        q6_k_chunk::<0, M, KIND>(p, h, 4 * half, &ys, &mut dot);
        q6_k_chunk::<1, M, KIND>(p, h, 4 * half, &ys, &mut dot);
        q6_k_chunk::<2, M, KIND>(p, h, 4 * half, &ys, &mut dot);
        q6_k_chunk::<3, M, KIND>(p, h, 4 * half, &ys, &mut dot);
        // Scale byte `g` of each row, sign-extended.
        let at = 16 + 32 * (g / 4);
        let s = [lane_byte_signed(vld1q_u8(p.add(at)), g % 4), lane_byte_signed(vld1q_u8(p.add(at + 16)), g % 4)];
        for (is, d) in isum.iter_mut().zip(&dot) {
            is[0] = vmlaq_s32(is[0], d[0], s[0]);
            is[1] = vmlaq_s32(is[1], d[1], s[1]);
        }
    }
}

/// Q6_K×Q8_K for `M` activation rows. Per block and lane, exactly in i32:
/// `isum = Σ_g scale[g] (Σ q6 q8 - 32 Σ q8)` over the sixteen runs of 16,
/// with the unsigned 6-bit codes `q6` (each term at most 128 · 16 · 32 ·
/// 128, the sum under 2^28); then `sumf += (w.d * a.d) * isum as f32`,
/// block by block.
///
/// # Safety
/// `j` came from [`Job::passes`] for `M` rows of Q6_K tiles; the CPU has
/// `dotprod`.
#[target_feature(enable = "dotprod")]
pub(super) unsafe fn q6_k<const M: usize>(j: &Job) {
    // SAFETY: see `Job` (the operands' bounds); unaligned loads only.
    unsafe {
        for t in 0..j.ntiles {
            let mut acc = [[vdupq_n_f32(0.0); 2]; M];
            for b in 0..j.nb {
                let p = j.tiles.add((t * j.nb + b) * 8 * Q6K_BYTES);
                let mut isum = [[vdupq_n_s32(0); 2]; M];
                // The sixteen runs, in any order (the sums are exact).
                for h in 0..2 {
                    for half in 0..2 {
                        q6_k_run::<M, 0>(j, p, b, h, half, &mut isum);
                        q6_k_run::<M, 1>(j, p, b, h, half, &mut isum);
                        q6_k_run::<M, 2>(j, p, b, h, half, &mut isum);
                        q6_k_run::<M, 3>(j, p, b, h, half, &mut isum);
                    }
                }
                let dx = widen_f16x8(p);
                for (i, a) in acc.iter_mut().enumerate() {
                    let ad = vdupq_n_f32(*j.d.add(i * j.nb + b));
                    for h in 0..2 {
                        a[h] = vaddq_f32(a[h], vmulq_f32(vmulq_f32(dx[h], ad), vcvtq_f32_s32(isum[i][h])));
                    }
                }
            }
            store(j, t, &acc);
        }
    }
}
