//! Packed-tile kernels on 512-bit registers: two adjacent 8-row tiles side
//! by side, sixteen weight rows per register.
//!
//! Why: on CPUs with full-width AVX-512 units (Zen 5, Sapphire Rapids and
//! later) a 512-bit `vpdpbusd` issues as fast as a 256-bit one, so batched
//! decode, which is compute-bound, gets twice the multiply-adds per
//! instruction. The packed layout is unchanged: the low half of each register
//! holds tile `t`, the high half tile `t + 1`, loaded from their two places.
//! Each lane still runs the scalar reference's chain for its own row, block
//! by block (see `x86_packed`), so results stay bit-identical.

// Value intrinsics are safe inside `#[target_feature]` functions on current
// compilers; the `unsafe` blocks keep the pointer reads explicit.
#![allow(unused_unsafe)]

use std::arch::x86_64::*;

use super::x86_packed_kquant::{k4_tile_block, Q5K_QH};
use crate::quant::kquant::{Q6K_BYTES, Q8K_BYTES};
use crate::quant::legacy::{Q4_1_BYTES, Q8_0_BYTES, Q8_1_BYTES};
use crate::quant::pack::Job;

/// The same 32 bytes at `off` of tile `t` (low half) and tile `t + 1` (high half).
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512dq,avx512vnni")]
unsafe fn load_pair(p0: *const u8, p1: *const u8, off: usize) -> __m512i {
    // SAFETY: the caller guarantees 32 readable bytes at both addresses.
    unsafe {
        let lo = _mm256_loadu_si256(p0.add(off).cast());
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), _mm256_loadu_si256(p1.add(off).cast()))
    }
}

/// The eight f16 scales at `off` of both tiles, widened to sixteen f32 lanes.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512dq,avx512vnni")]
unsafe fn scales_pair(p0: *const u8, p1: *const u8, off: usize) -> __m512 {
    // SAFETY: the caller guarantees 16 readable bytes at both addresses.
    unsafe {
        let lo = _mm_loadu_si128(p0.add(off).cast());
        _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), _mm_loadu_si128(p1.add(off).cast())))
    }
}

/// Asks for the same block of the next tile pair (`2 * tile` bytes on, in
/// both of its tiles): the first activation pass over a run of tiles streams
/// its weights from memory, and the hardware prefetchers, following two
/// interleaved streams, measured slower than this. Prefetches never fault,
/// so addresses past the end are harmless (computed with wrapping
/// arithmetic, never dereferenced).
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512dq,avx512vnni")]
unsafe fn prefetch_next_pair(p0: *const u8, tile: usize, block: usize) {
    let next = p0.wrapping_add(2 * tile);
    for half in [next, next.wrapping_add(tile)] {
        for line in (0..block).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(half.wrapping_add(line).cast());
        }
    }
}

/// The four activation bytes at `p`, in every lane.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512dq,avx512vnni")]
unsafe fn bcast(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees four readable bytes at `p`.
    unsafe { _mm512_set1_epi32(p.cast::<i32>().read_unaligned()) }
}

/// Writes lanes 0..8 to tile `t`'s output and lanes 8..16 to tile `t + 1`'s.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512dq,avx512vnni")]
unsafe fn store_pair(j: &Job, t: usize, i: usize, acc: __m512) {
    // SAFETY: the caller guarantees tiles `t` and `t + 1` of row `i` are in bounds (see `Job`).
    unsafe {
        let at = |t: usize| (*j.out.add(t * j.out_stride + i * j.row_stride)).as_mut_ptr();
        _mm256_storeu_ps(at(t), _mm512_castps512_ps256(acc));
        _mm256_storeu_ps(at(t + 1), _mm512_extractf32x8_ps::<1>(acc));
    }
}

/// Q4_1×Q8_1 over `j.ntiles` (even) tiles, `M` activation rows: lane `r` of
/// activation `i` runs `sumf += (dx * dy) * sumi as f32 + mx * sy` per block.
///
/// # Safety
/// `j` came from `pack::Job::passes` (then split by `run_pairs`), with an even tile
/// count, and the CPU has this module's target features.
#[allow(clippy::needless_range_loop)] // Index loops read clearer across the M rows.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512dq,avx512vnni")]
pub(super) unsafe fn q4_1<const M: usize>(j: &Job) {
    // SAFETY: see `pack::Job` (the operands' bounds); unaligned loads only.
    unsafe {
        let m4 = _mm512_set1_epi8(0x0F);
        let tile = j.nb * 8 * Q4_1_BYTES;
        for t in (0..j.ntiles).step_by(2) {
            let mut acc = [_mm512_setzero_ps(); M];
            // Block `b + 1`'s integer sums are issued before block `b`'s
            // float part, so the two overlap in program order rather than
            // only as far as the scheduler's window reaches; and each row
            // keeps one integer chain (eight rows are eight independent
            // chains, enough for the 4-cycle `vpdpbusd`), saving the add
            // that joined two. At eight rows: 4% fewer cycles
            // (`examples/kernel_cycles.rs`); at two to six, within ±1.5%.
            let sums = |b: usize| {
                let p0 = j.tiles.add(t * tile + b * 8 * Q4_1_BYTES);
                let p1 = p0.add(tile);
                prefetch_next_pair(p0, tile, 8 * Q4_1_BYTES);
                let mut sum = [_mm512_setzero_si512(); M];
                for g in 0..4 {
                    let w = load_pair(p0, p1, 32 + 32 * g);
                    let lo = _mm512_and_si512(w, m4);
                    // 32-bit shifts (AVX-512 F): the mask drops the bits that cross bytes.
                    let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(w), m4);
                    for i in 0..M {
                        let y = j.a[i].add(b * Q8_1_BYTES + 4 + 4 * g);
                        sum[i] = _mm512_dpbusd_epi32(sum[i], lo, bcast(y));
                    }
                    for i in 0..M {
                        let y = j.a[i].add(b * Q8_1_BYTES + 4 + 4 * g);
                        sum[i] = _mm512_dpbusd_epi32(sum[i], hi, bcast(y.add(16)));
                    }
                }
                sum
            };
            let mut cur = sums(0);
            for b in 0..j.nb {
                let next = if b + 1 < j.nb { sums(b + 1) } else { [_mm512_setzero_si512(); M] };
                let p0 = j.tiles.add(t * tile + b * 8 * Q4_1_BYTES);
                let p1 = p0.add(tile);
                let dx = scales_pair(p0, p1, 0);
                let mx = scales_pair(p0, p1, 16);
                for i in 0..M {
                    let k = i * j.nb + b;
                    let sumi = _mm512_cvtepi32_ps(cur[i]);
                    let dy = _mm512_set1_ps(*j.d.add(k));
                    let sy = _mm512_castsi512_ps(_mm512_set1_epi32(*j.x.add(k) as i32));
                    let s = _mm512_mul_ps(_mm512_mul_ps(dx, dy), sumi);
                    acc[i] = _mm512_add_ps(acc[i], _mm512_add_ps(s, _mm512_mul_ps(mx, sy)));
                }
                cur = next;
            }
            for i in 0..M {
                store_pair(j, t, i, acc[i]);
            }
        }
    }
}

/// Q8_0×Q8_0 over `j.ntiles` (even) tiles: weights stored as `q + 128`, so
/// the block sum is `Σ (q + 128) y - 128 Σ y`, exact in i32; then lane `r`
/// runs `sumf += sumi as f32 * (dx * dy)`.
///
/// # Safety
/// As for [`q4_1`].
#[allow(clippy::needless_range_loop)] // Index loops read clearer across the M rows.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512dq,avx512vnni")]
pub(super) unsafe fn q8_0<const M: usize>(j: &Job) {
    // SAFETY: see `pack::Job` (the operands' bounds); unaligned loads only.
    unsafe {
        let tile = j.nb * 8 * Q8_0_BYTES;
        for t in (0..j.ntiles).step_by(2) {
            let mut acc = [_mm512_setzero_ps(); M];
            // As in `q4_1`: block `b + 1`'s integer sums go before block
            // `b`'s float part (4.5% fewer cycles at eight rows).
            let sums = |b: usize| {
                let p0 = j.tiles.add(t * tile + b * 8 * Q8_0_BYTES);
                let p1 = p0.add(tile);
                prefetch_next_pair(p0, tile, 8 * Q8_0_BYTES);
                let mut sum = [_mm512_setzero_si512(); M];
                for g in 0..8 {
                    let w = load_pair(p0, p1, 16 + 32 * g);
                    for i in 0..M {
                        sum[i] = _mm512_dpbusd_epi32(sum[i], w, bcast(j.a[i].add(b * Q8_0_BYTES + 2 + 4 * g)));
                    }
                }
                sum
            };
            let mut cur = sums(0);
            for b in 0..j.nb {
                let next = if b + 1 < j.nb { sums(b + 1) } else { [_mm512_setzero_si512(); M] };
                let p0 = j.tiles.add(t * tile + b * 8 * Q8_0_BYTES);
                let dx = scales_pair(p0, p0.add(tile), 0);
                for i in 0..M {
                    let k = i * j.nb + b;
                    let corr = _mm512_set1_epi32(*j.x.add(k) as i32);
                    let sumi = _mm512_sub_epi32(cur[i], corr);
                    let d = _mm512_mul_ps(dx, _mm512_set1_ps(*j.d.add(k)));
                    acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(_mm512_cvtepi32_ps(sumi), d));
                }
                cur = next;
            }
            for i in 0..M {
                store_pair(j, t, i, acc[i]);
            }
        }
    }
}

/// Byte `k` of each 32-bit lane of `v`, zero-extended to the lane.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512dq,avx512vnni")]
unsafe fn lane_byte(v: __m512i, k: usize) -> __m512i {
    _mm512_and_si512(_mm512_srl_epi32(v, _mm_cvtsi32_si128(8 * k as i32)), _mm512_set1_epi32(0xFF))
}

/// Q4_K×Q8_K over `j.ntiles` (even) tiles.
///
/// # Safety
/// As for [`q4_1`].
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512dq,avx512vnni")]
pub(super) unsafe fn q4_k<const M: usize>(j: &Job) {
    // SAFETY: the caller's contract, for Q4_K tiles.
    unsafe { k4::<M, false>(j) }
}

/// Q5_K×Q8_K over `j.ntiles` (even) tiles.
///
/// # Safety
/// As for [`q4_1`].
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512dq,avx512vnni")]
pub(super) unsafe fn q5_k<const M: usize>(j: &Job) {
    // SAFETY: the caller's contract, for Q5_K tiles.
    unsafe { k4::<M, true>(j) }
}

/// Q4_K×Q8_K, or Q5_K×Q8_K with `FIVE`, over `j.ntiles` (even) tiles, as
/// `x86_packed_kquant`'s one-tile kernel on twice the rows: per block and
/// lane, exactly in i32, `sumi = Σ_j sc[j] Σ q q8` and `summs = Σ_j m[j]
/// (bsums[2j] + bsums[2j + 1])` (both under 2^26), then `sumf += d * sumi
/// as f32 - dmin * summs as f32` with `d = a.d * w.d`, `dmin = a.d *
/// w.dmin`.
///
/// # Safety
/// As for [`q4_1`], for tiles of the type `FIVE` names.
#[allow(clippy::needless_range_loop)] // Index loops read clearer across the M rows.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512dq,avx512vnni")]
unsafe fn k4<const M: usize, const FIVE: bool>(j: &Job) {
    // SAFETY: see `pack::Job` (the operands' bounds); unaligned loads only.
    unsafe {
        let m4 = _mm512_set1_epi8(0x0F);
        let m6 = _mm512_set1_epi8(0x3F);
        let top = _mm512_set1_epi8(0x30);
        let b4 = _mm512_set1_epi8(0x10);
        let tbb = k4_tile_block(FIVE);
        let tile = j.nb * tbb;
        for t in (0..j.ntiles).step_by(2) {
            let mut acc = [_mm512_setzero_ps(); M];
            for b in 0..j.nb {
                let p0 = j.tiles.add(t * tile + b * tbb);
                let p1 = p0.add(tile);
                prefetch_next_pair(p0, tile, tbb);
                // The scales as in the one-tile kernel; 32-bit shifts (AVX-512 F),
                // masked so no bits cross bytes.
                let s0 = load_pair(p0, p1, 32);
                let s1 = load_pair(p0, p1, 64);
                let s2 = load_pair(p0, p1, 96);
                let sc = [
                    _mm512_and_si512(s0, m6),
                    _mm512_or_si512(_mm512_and_si512(s2, m4), _mm512_and_si512(_mm512_srli_epi32::<2>(s0), top)),
                ];
                let mn = [
                    _mm512_and_si512(s1, m6),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi32::<4>(s2), m4),
                        _mm512_and_si512(_mm512_srli_epi32::<2>(s1), top),
                    ),
                ];
                let mut sumi = [_mm512_setzero_si512(); M];
                for sub in 0..8 {
                    let (g, high) = (sub / 2, sub % 2 == 1);
                    let mut dot = [_mm512_setzero_si512(); M];
                    for c in 0..8 {
                        let w = load_pair(p0, p1, 128 + 32 * (8 * g + c));
                        let w = if high { _mm512_srli_epi32::<4>(w) } else { w };
                        let mut q = _mm512_and_si512(w, m4);
                        if FIVE {
                            // Bit `sub` of each `qh` byte moved to bit 4.
                            let qh = load_pair(p0, p1, Q5K_QH + 32 * c);
                            let h = if sub <= 4 {
                                _mm512_sll_epi32(qh, _mm_cvtsi32_si128((4 - sub) as i32))
                            } else {
                                _mm512_srl_epi32(qh, _mm_cvtsi32_si128((sub - 4) as i32))
                            };
                            q = _mm512_or_si512(q, _mm512_and_si512(h, b4));
                        }
                        for i in 0..M {
                            let y = j.a[i].add(b * Q8K_BYTES + 4 + 32 * sub + 4 * c);
                            dot[i] = _mm512_dpbusd_epi32(dot[i], q, bcast(y));
                        }
                    }
                    let s = lane_byte(sc[sub / 4], sub % 4);
                    for i in 0..M {
                        sumi[i] = _mm512_add_epi32(sumi[i], _mm512_mullo_epi32(dot[i], s));
                    }
                }
                let mut summs = [_mm512_setzero_si512(); M];
                for sub in 0..8 {
                    // (m, m) as i16 pairs against (bsums[2 sub], bsums[2 sub + 1]).
                    let m = lane_byte(mn[sub / 4], sub % 4);
                    let m = _mm512_or_si512(m, _mm512_slli_epi32::<16>(m));
                    for i in 0..M {
                        let bs = bcast(j.a[i].add(b * Q8K_BYTES + 260 + 4 * sub));
                        summs[i] = _mm512_dpwssd_epi32(summs[i], m, bs);
                    }
                }
                let dx = scales_pair(p0, p1, 0);
                let mx = scales_pair(p0, p1, 16);
                for i in 0..M {
                    let ad = _mm512_set1_ps(*j.d.add(i * j.nb + b));
                    let d = _mm512_mul_ps(ad, dx);
                    let dmin = _mm512_mul_ps(ad, mx);
                    let s = _mm512_sub_ps(
                        _mm512_mul_ps(d, _mm512_cvtepi32_ps(sumi[i])),
                        _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(summs[i])),
                    );
                    acc[i] = _mm512_add_ps(acc[i], s);
                }
            }
            for i in 0..M {
                store_pair(j, t, i, acc[i]);
            }
        }
    }
}

/// Adds `scale[g] (Σ q6 q8 - 32 Σ q8)` over run `g = 8 h + 2 KIND + half`
/// of block `b` to `isum`, for both tiles (`p0`, `p1`): as
/// `x86_packed_kquant`'s one-tile helper, with 32-bit shifts (AVX-512 F),
/// masked so no bits cross bytes.
#[allow(clippy::needless_range_loop)] // Index loops read clearer across the M rows.
#[allow(clippy::too_many_arguments)] // One run's operands.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512dq,avx512vnni")]
unsafe fn q6_k_sub<const M: usize, const KIND: usize>(
    j: &Job,
    p0: *const u8,
    p1: *const u8,
    b: usize,
    h: usize,
    half: usize,
    isum: &mut [__m512i; M],
) {
    // SAFETY: the caller's (`q6_k`'s) bounds.
    unsafe {
        let m4 = _mm512_set1_epi8(0x0F);
        let top = _mm512_set1_epi8(0x30);
        let mut dot = [_mm512_setzero_si512(); M];
        for k in 4 * half..4 * half + 4 {
            let ql = load_pair(p0, p1, 144 + 32 * (16 * h + 8 * (KIND % 2) + k));
            let qh = load_pair(p0, p1, 1168 + 32 * (8 * h + k));
            let (lo, hi) = match KIND {
                0 => (ql, _mm512_slli_epi32::<4>(qh)),
                1 => (ql, _mm512_slli_epi32::<2>(qh)),
                2 => (_mm512_srli_epi32::<4>(ql), qh),
                _ => (_mm512_srli_epi32::<4>(ql), _mm512_srli_epi32::<2>(qh)),
            };
            let q = _mm512_or_si512(_mm512_and_si512(lo, m4), _mm512_and_si512(hi, top));
            for i in 0..M {
                let y = j.a[i].add(b * Q8K_BYTES + 4 + 128 * h + 32 * KIND + 4 * k);
                dot[i] = _mm512_dpbusd_epi32(dot[i], q, bcast(y));
            }
        }
        let g = 8 * h + 2 * KIND + half;
        // Scale byte `g` of each row, sign-extended to 32 bits.
        let sv = load_pair(p0, p1, 16 + 32 * (g / 4));
        let s = _mm512_srai_epi32::<24>(_mm512_sll_epi32(sv, _mm_cvtsi32_si128(24 - 8 * (g % 4) as i32)));
        for i in 0..M {
            let corr = _mm512_set1_epi32(*j.x.add((i * j.nb + b) * 16 + g) as i32);
            isum[i] = _mm512_add_epi32(isum[i], _mm512_mullo_epi32(_mm512_sub_epi32(dot[i], corr), s));
        }
    }
}

/// Q6_K×Q8_K over `j.ntiles` (even) tiles, as `x86_packed_kquant`'s
/// one-tile kernel on twice the rows: per block and lane, exactly in i32,
/// `isum = Σ_g scale[g] (Σ q6 q8 - 32 Σ q8)` (under 2^28), then
/// `sumf += (w.d * a.d) * isum as f32`.
///
/// # Safety
/// As for [`q4_1`].
#[allow(clippy::needless_range_loop)] // Index loops read clearer across the M rows.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512dq,avx512vnni")]
pub(super) unsafe fn q6_k<const M: usize>(j: &Job) {
    // SAFETY: see `pack::Job` (the operands' bounds); unaligned loads only.
    unsafe {
        let tile = j.nb * 8 * Q6K_BYTES;
        for t in (0..j.ntiles).step_by(2) {
            let mut acc = [_mm512_setzero_ps(); M];
            for b in 0..j.nb {
                let p0 = j.tiles.add(t * tile + b * 8 * Q6K_BYTES);
                let p1 = p0.add(tile);
                prefetch_next_pair(p0, tile, 8 * Q6K_BYTES);
                let mut isum = [_mm512_setzero_si512(); M];
                for h in 0..2 {
                    for half in 0..2 {
                        q6_k_sub::<M, 0>(j, p0, p1, b, h, half, &mut isum);
                        q6_k_sub::<M, 1>(j, p0, p1, b, h, half, &mut isum);
                        q6_k_sub::<M, 2>(j, p0, p1, b, h, half, &mut isum);
                        q6_k_sub::<M, 3>(j, p0, p1, b, h, half, &mut isum);
                    }
                }
                let dx = scales_pair(p0, p1, 0);
                for i in 0..M {
                    let d = _mm512_mul_ps(dx, _mm512_set1_ps(*j.d.add(i * j.nb + b)));
                    acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(d, _mm512_cvtepi32_ps(isum[i])));
                }
            }
            for i in 0..M {
                store_pair(j, t, i, acc[i]);
            }
        }
    }
}
