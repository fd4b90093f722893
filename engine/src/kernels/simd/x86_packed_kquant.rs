//! Packed-tile kernels for the K-quants (Q4_K, Q5_K and Q6_K against Q8_K
//! activations) on x86-64: eight weight rows, one per 32-bit lane, against
//! up to eight activation rows, as in `x86_packed`.
//!
//! What differs from the 32-element formats is that every 16 or 32 elements
//! of a row carry their own small integer scale, different in each lane.
//! So each sub-block's 4-way byte dot products go to a fresh accumulator,
//! which is then multiplied by the lanes' scales (`vpmulld`) and added to
//! the block sum. Everything stays exact in i32 (bounds at each kernel), so
//! the order is free; the float part per block repeats the scalar
//! reference's f32 operations one for one, per lane, with separate
//! multiplies and adds (never FMA), so every output equals
//! `kquant::vec_dot_q4k_q8k`, `vec_dot_q5k_q8k` or `vec_dot_q6k_q8k` bit
//! for bit. Q5_K is Q4_K with a fifth bit per quant, and its packed block
//! Q4_K's with the high bits after it, so one kernel serves both.
//!
//! The scales are read from the packed tile block (`quant::pack`) with one
//! load per four of each row's scale bytes, and spread to 32-bit lanes with
//! shifts: that work is shared by every activation row of a pass.

// Value intrinsics are safe inside `#[target_feature]` functions on current
// compilers; the `unsafe` blocks keep the pointer reads explicit.
#![allow(unused_unsafe)]

use std::arch::x86_64::*;

use super::x86_packed::{dot4_avx2, dot4_avx512, dot4_avxvnni};
use crate::quant::kquant::{Q4K_BYTES, Q5K_BYTES, Q6K_BYTES, Q8K_BYTES};
use crate::quant::pack::Job;

/// Offset of `bsums` in a Q8_K block.
const BSUMS: usize = 4 + 256;

/// Byte `k` of each 32-bit lane of `v`, zero-extended to the lane.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn lane_byte(v: __m256i, k: usize) -> __m256i {
    _mm256_and_si256(_mm256_srl_epi32(v, _mm_cvtsi32_si128(8 * k as i32)), _mm256_set1_epi32(0xFF))
}

/// Byte `k` of each 32-bit lane of `v`, sign-extended to the lane.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn lane_byte_signed(v: __m256i, k: usize) -> __m256i {
    _mm256_srai_epi32::<24>(_mm256_sll_epi32(v, _mm_cvtsi32_si128(24 - 8 * k as i32)))
}

/// Offset of the high bits (`qh`) in a packed Q5_K tile block: after
/// Q4_K's whole block (`quant::pack`).
pub(super) const Q5K_QH: usize = 8 * Q4K_BYTES;

/// Packed tile block bytes of Q5_K (`five`) or Q4_K.
pub(super) const fn k4_tile_block(five: bool) -> usize {
    8 * if five { Q5K_BYTES } else { Q4K_BYTES }
}

/// Defines `q4_k::<M>`, `q5_k::<M>` and `q6_k::<M>` for one instruction
/// set, given its target features, `dot4(acc, u, s)` (see `x86_packed`;
/// exact here, where the unsigned bytes are at most 63) and `dot2(acc, a,
/// b)`, which adds to each i32 lane the products of its two i16 pairs.
macro_rules! kquant_kernels {
    ($module:ident, $features:literal, $dot4:expr, $dot2:expr) => {
        pub(super) mod $module {
            use super::*;

            /// The four activation bytes at `p`, in every lane.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn bcast(p: *const u8) -> __m256i {
                // SAFETY: the caller guarantees four readable bytes at `p`.
                unsafe { _mm256_set1_epi32(p.cast::<i32>().read_unaligned()) }
            }

            /// Adds `s * Σ q q8` over sub-block `2 g` (`HIGH`: `2 g + 1`) of
            /// block `b` of the tile block at `p` to `sumi`, per row and lane
            /// (`s`: the lanes' scales of that sub-block); `q` is the 4-bit
            /// quant, or with `FIVE` the 5-bit one, whose bit 4 is bit
            /// `2 g + HIGH` of the row's `qh` byte for that element.
            #[allow(clippy::needless_range_loop)] // Index loops read clearer across the M rows.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn k4_sub<const M: usize, const FIVE: bool, const HIGH: bool>(
                j: &Job,
                p: *const u8,
                b: usize,
                g: usize,
                s: __m256i,
                sumi: &mut [__m256i; M],
            ) {
                // SAFETY: the caller's (`k4`'s) bounds.
                unsafe {
                    let m4 = _mm256_set1_epi8(0x0F);
                    let b4 = _mm256_set1_epi8(0x10);
                    let mut dot = [_mm256_setzero_si256(); M];
                    for c in 0..8 {
                        let w = _mm256_loadu_si256(p.add(128 + 32 * (8 * g + c)).cast());
                        let w = if HIGH { _mm256_srli_epi16::<4>(w) } else { w };
                        let mut q = _mm256_and_si256(w, m4);
                        if FIVE {
                            // Bit `2 g + HIGH` of each `qh` byte moved to bit 4
                            // (16-bit shifts, masked so no bits cross bytes).
                            let qh = _mm256_loadu_si256(p.add(Q5K_QH + 32 * c).cast());
                            let k = 2 * g + usize::from(HIGH);
                            let h = if k <= 4 {
                                _mm256_sll_epi16(qh, _mm_cvtsi32_si128((4 - k) as i32))
                            } else {
                                _mm256_srl_epi16(qh, _mm_cvtsi32_si128((k - 4) as i32))
                            };
                            q = _mm256_or_si256(q, _mm256_and_si256(h, b4));
                        }
                        for i in 0..M {
                            let y = j.a[i].add(b * Q8K_BYTES + 4 + 64 * g + 32 * usize::from(HIGH) + 4 * c);
                            dot[i] = $dot4(dot[i], q, bcast(y));
                        }
                    }
                    for i in 0..M {
                        sumi[i] = _mm256_add_epi32(sumi[i], _mm256_mullo_epi32(dot[i], s));
                    }
                }
            }

            /// Q4_K×Q8_K.
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn q4_k<const M: usize>(j: &Job) {
                // SAFETY: the caller's contract, for Q4_K tiles.
                unsafe { k4::<M, false>(j) }
            }

            /// Q5_K×Q8_K.
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn q5_k<const M: usize>(j: &Job) {
                // SAFETY: the caller's contract, for Q5_K tiles.
                unsafe { k4::<M, true>(j) }
            }

            /// Q4_K×Q8_K, or Q5_K×Q8_K with `FIVE`. Per block and lane,
            /// exactly in i32: `sumi = Σ_j sc[j] Σ q q8` over the eight
            /// sub-blocks of 32 (at most 8 · 63 · 32 · 31 · 128, under 2^26)
            /// and `summs = Σ_j m[j] (bsums[2j] + bsums[2j + 1])` (at most
            /// 16 · 63 · 32768, under 2^25); then `sumf += d * sumi as f32 -
            /// dmin * summs as f32` with `d = a.d * w.d` and `dmin = a.d *
            /// w.dmin`.
            #[allow(clippy::needless_range_loop)] // Index loops read clearer across the M rows.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn k4<const M: usize, const FIVE: bool>(j: &Job) {
                // SAFETY: see `Job` (the operands' bounds); unaligned loads only.
                unsafe {
                    let m4 = _mm256_set1_epi8(0x0F);
                    let m6 = _mm256_set1_epi8(0x3F);
                    let top = _mm256_set1_epi8(0x30);
                    for t in 0..j.ntiles {
                        let mut acc = [_mm256_setzero_ps(); M];
                        for b in 0..j.nb {
                            let p = j.tiles.add((t * j.nb + b) * k4_tile_block(FIVE));
                            // Lane `r` of each: row `r`'s GGUF scale bytes 0..4, 4..8, 8..12.
                            let s0 = _mm256_loadu_si256(p.add(32).cast());
                            let s1 = _mm256_loadu_si256(p.add(64).cast());
                            let s2 = _mm256_loadu_si256(p.add(96).cast());
                            // Bytes `j` and `j + 4` of a row: the low six bits, or a
                            // nibble of bytes 8..12 with the top two bits of 0..8
                            // (16-bit shifts, masked so no bits cross bytes).
                            let sc_lo = _mm256_and_si256(s0, m6);
                            let sc_hi = _mm256_or_si256(
                                _mm256_and_si256(s2, m4),
                                _mm256_and_si256(_mm256_srli_epi16::<2>(s0), top),
                            );
                            let mn = [
                                _mm256_and_si256(s1, m6),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(s2), m4),
                                    _mm256_and_si256(_mm256_srli_epi16::<2>(s1), top),
                                ),
                            ];
                            let mut sumi = [_mm256_setzero_si256(); M];
                            for g in 0..4 {
                                // Sub-blocks `2 g` and `2 g + 1`: the low and high
                                // nibbles of quant bytes `32 g..32 g + 32`.
                                let sc = if g < 2 { sc_lo } else { sc_hi };
                                let s = lane_byte(sc, (2 * g) % 4);
                                k4_sub::<M, FIVE, false>(j, p, b, g, s, &mut sumi);
                                let s = lane_byte(sc, (2 * g + 1) % 4);
                                k4_sub::<M, FIVE, true>(j, p, b, g, s, &mut sumi);
                            }
                            let mut summs = [_mm256_setzero_si256(); M];
                            for sub in 0..8 {
                                // (m, m) as i16 pairs against (bsums[2 sub], bsums[2 sub + 1]).
                                let m = lane_byte(mn[sub / 4], sub % 4);
                                let m = _mm256_or_si256(m, _mm256_slli_epi32::<16>(m));
                                for i in 0..M {
                                    summs[i] = $dot2(summs[i], m, bcast(j.a[i].add(b * Q8K_BYTES + BSUMS + 4 * sub)));
                                }
                            }
                            let dx = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
                            let mx = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast()));
                            for i in 0..M {
                                let ad = _mm256_set1_ps(*j.d.add(i * j.nb + b));
                                let d = _mm256_mul_ps(ad, dx);
                                let dmin = _mm256_mul_ps(ad, mx);
                                let s = _mm256_sub_ps(
                                    _mm256_mul_ps(d, _mm256_cvtepi32_ps(sumi[i])),
                                    _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(summs[i])),
                                );
                                acc[i] = _mm256_add_ps(acc[i], s);
                            }
                        }
                        for i in 0..M {
                            _mm256_storeu_ps((*j.out.add(t * j.out_stride + i * j.row_stride)).as_mut_ptr(), acc[i]);
                        }
                    }
                }
            }

            /// Adds `scale[g] (Σ q6 q8 - 32 Σ q8)` over run
            /// `g = 8 h + 2 KIND + half` of block `b` of the tile block at `p`
            /// to `isum`, per row and lane. Element `128 h + 32 KIND + l`
            /// (l in 0..32) takes its low nibble from `ql[64 h + l]` (kinds 0
            /// and 2) or `ql[64 h + 32 + l]` (1 and 3), low or high (kinds 2
            /// and 3), and its top two bits from bits `2 KIND..` of
            /// `qh[32 h + l]`.
            #[allow(clippy::needless_range_loop)] // Index loops read clearer across the M rows.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn q6_k_sub<const M: usize, const KIND: usize>(
                j: &Job,
                p: *const u8,
                b: usize,
                h: usize,
                half: usize,
                isum: &mut [__m256i; M],
            ) {
                // SAFETY: the caller's (`q6_k`'s) bounds.
                unsafe {
                    let m4 = _mm256_set1_epi8(0x0F);
                    let top = _mm256_set1_epi8(0x30);
                    let mut dot = [_mm256_setzero_si256(); M];
                    for k in 4 * half..4 * half + 4 {
                        let ql = _mm256_loadu_si256(p.add(144 + 32 * (16 * h + 8 * (KIND % 2) + k)).cast());
                        let qh = _mm256_loadu_si256(p.add(1168 + 32 * (8 * h + k)).cast());
                        // 16-bit shifts, masked so no bits cross bytes.
                        let (lo, hi) = match KIND {
                            0 => (ql, _mm256_slli_epi16::<4>(qh)),
                            1 => (ql, _mm256_slli_epi16::<2>(qh)),
                            2 => (_mm256_srli_epi16::<4>(ql), qh),
                            _ => (_mm256_srli_epi16::<4>(ql), _mm256_srli_epi16::<2>(qh)),
                        };
                        let q = _mm256_or_si256(_mm256_and_si256(lo, m4), _mm256_and_si256(hi, top));
                        for i in 0..M {
                            let y = j.a[i].add(b * Q8K_BYTES + 4 + 128 * h + 32 * KIND + 4 * k);
                            dot[i] = $dot4(dot[i], q, bcast(y));
                        }
                    }
                    let g = 8 * h + 2 * KIND + half;
                    let s = lane_byte_signed(_mm256_loadu_si256(p.add(16 + 32 * (g / 4)).cast()), g % 4);
                    for i in 0..M {
                        let corr = _mm256_set1_epi32(*j.x.add((i * j.nb + b) * 16 + g) as i32);
                        isum[i] = _mm256_add_epi32(isum[i], _mm256_mullo_epi32(_mm256_sub_epi32(dot[i], corr), s));
                    }
                }
            }

            /// Q6_K×Q8_K. Per block and lane, exactly in i32: `isum = Σ_g
            /// scale[g] (Σ q6 q8 - 32 Σ q8)` over the sixteen runs of 16,
            /// with the unsigned 6-bit codes `q6` and `32 Σ q8` from the
            /// scalars `x` (each term at most 128 · 16 · 32 · 128, the sum
            /// under 2^28); then `sumf += (w.d * a.d) * isum as f32`.
            #[allow(clippy::needless_range_loop)] // Index loops read clearer across the M rows.
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn q6_k<const M: usize>(j: &Job) {
                // SAFETY: see `Job` (the operands' bounds); unaligned loads only.
                unsafe {
                    for t in 0..j.ntiles {
                        let mut acc = [_mm256_setzero_ps(); M];
                        for b in 0..j.nb {
                            let p = j.tiles.add((t * j.nb + b) * 8 * Q6K_BYTES);
                            let mut isum = [_mm256_setzero_si256(); M];
                            // The sixteen runs, in any order (the sums are exact).
                            for h in 0..2 {
                                for half in 0..2 {
                                    q6_k_sub::<M, 0>(j, p, b, h, half, &mut isum);
                                    q6_k_sub::<M, 1>(j, p, b, h, half, &mut isum);
                                    q6_k_sub::<M, 2>(j, p, b, h, half, &mut isum);
                                    q6_k_sub::<M, 3>(j, p, b, h, half, &mut isum);
                                }
                            }
                            let dx = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
                            for i in 0..M {
                                let d = _mm256_mul_ps(dx, _mm256_set1_ps(*j.d.add(i * j.nb + b)));
                                acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(d, _mm256_cvtepi32_ps(isum[i])));
                            }
                        }
                        for i in 0..M {
                            _mm256_storeu_ps((*j.out.add(t * j.out_stride + i * j.row_stride)).as_mut_ptr(), acc[i]);
                        }
                    }
                }
            }
        }
    };
}

/// `vpmaddwd` + add: exact unless both pairs are -32768 · -32768, which the
/// callers' unsigned 6-bit minimums never give.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot2_avx2(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
}

/// VEX `vpdpwssd` (as above, fused).
#[inline]
#[target_feature(enable = "avxvnni")]
unsafe fn dot2_avxvnni(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_dpwssd_avx_epi32(acc, a, b)
}

/// EVEX `vpdpwssd` on 256-bit registers.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512vnni")]
unsafe fn dot2_avx512(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_dpwssd_epi32(acc, a, b)
}

kquant_kernels!(avx2, "avx2,f16c", dot4_avx2, dot2_avx2);
kquant_kernels!(avxvnni, "avx2,f16c,avxvnni", dot4_avxvnni, dot2_avxvnni);
kquant_kernels!(avx512, "avx2,f16c,avx512f,avx512vl,avx512vnni", dot4_avx512, dot2_avx512);
