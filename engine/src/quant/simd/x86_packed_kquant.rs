//! Packed-tile kernels for the K-quants (Q4_K and Q6_K against Q8_K
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
//! `kquant::vec_dot_q4k_q8k` or `vec_dot_q6k_q8k` bit for bit.
//!
//! The scales are read from the packed tile block (`quant::pack`) with one
//! load per four of each row's scale bytes, and spread to 32-bit lanes with
//! byte shuffles: that work is shared by every activation row of a pass.

// Value intrinsics are safe inside `#[target_feature]` functions on current
// compilers; the `unsafe` blocks keep the pointer reads explicit.
#![allow(unused_unsafe)]

use std::arch::x86_64::*;

use super::super::kquant::{Q4K_BYTES, Q6K_BYTES, Q8K_BYTES};
use super::super::pack::Job;
use super::x86_packed::{dot4_avx2, dot4_avx512, dot4_avxvnni};

/// Offset of `bsums` in a Q8_K block.
const BSUMS: usize = 4 + 256;

/// A `vpshufb` control that, in each 32-bit lane, puts byte `k` of that
/// lane at the byte positions `spread` marks with 1 (`0x0001_0001` for
/// both 16-bit halves, `0x0100_0000` for the top byte) and zero elsewhere.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn lane_byte(spread: u32, k: u32) -> __m256i {
    // Indices are within each 128-bit half: lane `r` starts at byte `4 r`.
    let c = |r: u32| ((!(spread * 0xFF) & 0x8080_8080) | ((4 * r + k) * spread)) as i32;
    _mm256_setr_epi32(c(0), c(1), c(2), c(3), c(0), c(1), c(2), c(3))
}

/// Defines `q4_k::<M>` and `q6_k::<M>` for one instruction set, given its
/// target features, `dot4(acc, u, s)` (see `x86_packed`; exact here, where
/// the unsigned bytes are at most 63) and `dot2(acc, a, b)`, which adds to
/// each i32 lane the products of its two i16 pairs.
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

            /// Q4_K×Q8_K. Per block and lane, exactly in i32: `sumi = Σ_j
            /// sc[j] Σ q4 q8` over the eight sub-blocks of 32 (at most
            /// 8 · 63 · 32 · 15 · 128, under 2^25) and `summs = Σ_j m[j]
            /// (bsums[2j] + bsums[2j + 1])` (at most 16 · 63 · 32768, under
            /// 2^25); then `sumf += d * sumi as f32 - dmin * summs as f32`
            /// with `d = a.d * w.d` and `dmin = a.d * w.dmin`.
            #[allow(clippy::needless_range_loop)] // Index loops read clearer across the M rows.
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn q4_k<const M: usize>(j: &Job) {
                // SAFETY: see `Job` (the operands' bounds); unaligned loads only.
                unsafe {
                    let m4 = _mm256_set1_epi8(0x0F);
                    let m6 = _mm256_set1_epi8(0x3F);
                    let top = _mm256_set1_epi8(0x30);
                    for t in 0..j.ntiles {
                        let mut acc = [_mm256_setzero_ps(); M];
                        for b in 0..j.nb {
                            let p = j.tiles.add((t * j.nb + b) * 8 * Q4K_BYTES);
                            // Lane `r` of each: row `r`'s GGUF scale bytes 0..4, 4..8, 8..12.
                            let s0 = _mm256_loadu_si256(p.add(32).cast());
                            let s1 = _mm256_loadu_si256(p.add(64).cast());
                            let s2 = _mm256_loadu_si256(p.add(96).cast());
                            // Bytes `j` and `j + 4` of a row: the low six bits, or a
                            // nibble of bytes 8..12 with the top two bits of 0..8
                            // (16-bit shifts, masked so no bits cross bytes).
                            let sc = [
                                _mm256_and_si256(s0, m6),
                                _mm256_or_si256(
                                    _mm256_and_si256(s2, m4),
                                    _mm256_and_si256(_mm256_srli_epi16::<2>(s0), top),
                                ),
                            ];
                            let mn = [
                                _mm256_and_si256(s1, m6),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(s2), m4),
                                    _mm256_and_si256(_mm256_srli_epi16::<2>(s1), top),
                                ),
                            ];
                            let mut sumi = [_mm256_setzero_si256(); M];
                            for sub in 0..8 {
                                // Sub-block `sub` is the low (even) or high (odd)
                                // nibbles of quant bytes `32 (sub / 2)..`.
                                let (g, high) = (sub / 2, sub % 2 == 1);
                                let mut dot = [_mm256_setzero_si256(); M];
                                for c in 0..8 {
                                    let w = _mm256_loadu_si256(p.add(128 + 32 * (8 * g + c)).cast());
                                    let w = if high { _mm256_srli_epi16::<4>(w) } else { w };
                                    let q = _mm256_and_si256(w, m4);
                                    for i in 0..M {
                                        let y = j.a[i].add(b * Q8K_BYTES + 4 + 32 * sub + 4 * c);
                                        dot[i] = $dot4(dot[i], q, bcast(y));
                                    }
                                }
                                let s = _mm256_shuffle_epi8(sc[sub / 4], lane_byte(1, (sub % 4) as u32));
                                for i in 0..M {
                                    sumi[i] = _mm256_add_epi32(sumi[i], _mm256_mullo_epi32(dot[i], s));
                                }
                            }
                            let mut summs = [_mm256_setzero_si256(); M];
                            for sub in 0..8 {
                                // (m, m) as i16 pairs against (bsums[2 sub], bsums[2 sub + 1]).
                                let m = _mm256_shuffle_epi8(mn[sub / 4], lane_byte(0x0001_0001, (sub % 4) as u32));
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
                    let m4 = _mm256_set1_epi8(0x0F);
                    let top = _mm256_set1_epi8(0x30);
                    for t in 0..j.ntiles {
                        let mut acc = [_mm256_setzero_ps(); M];
                        for b in 0..j.nb {
                            let p = j.tiles.add((t * j.nb + b) * 8 * Q6K_BYTES);
                            let mut isum = [_mm256_setzero_si256(); M];
                            // Element `128 h + 32 kind + l` (l in 0..32) takes its low
                            // nibble from `ql[64 h + l]` (kinds 0, 2) or `ql[64 h + 32
                            // + l]` (1, 3), low or high (kinds 2, 3), and its top two
                            // bits from bits `2 kind..` of `qh[32 h + l]`.
                            for h in 0..2 {
                                for kind in 0..4 {
                                    for half in 0..2 {
                                        let mut dot = [_mm256_setzero_si256(); M];
                                        for k in 4 * half..4 * half + 4 {
                                            let ql = _mm256_loadu_si256(
                                                p.add(144 + 32 * (16 * h + 8 * (kind % 2) + k)).cast(),
                                            );
                                            let qh = _mm256_loadu_si256(p.add(1168 + 32 * (8 * h + k)).cast());
                                            // 16-bit shifts, masked so no bits cross bytes.
                                            let (lo, hi) = match kind {
                                                0 => (ql, _mm256_slli_epi16::<4>(qh)),
                                                1 => (ql, _mm256_slli_epi16::<2>(qh)),
                                                2 => (_mm256_srli_epi16::<4>(ql), qh),
                                                _ => (_mm256_srli_epi16::<4>(ql), _mm256_srli_epi16::<2>(qh)),
                                            };
                                            let q =
                                                _mm256_or_si256(_mm256_and_si256(lo, m4), _mm256_and_si256(hi, top));
                                            for i in 0..M {
                                                let y = j.a[i].add(b * Q8K_BYTES + 4 + 128 * h + 32 * kind + 4 * k);
                                                dot[i] = $dot4(dot[i], q, bcast(y));
                                            }
                                        }
                                        let g = 8 * h + 2 * kind + half;
                                        // Scale byte `g` of each row, sign-extended to 32 bits.
                                        let sv = _mm256_loadu_si256(p.add(16 + 32 * (g / 4)).cast());
                                        let s = _mm256_srai_epi32::<24>(_mm256_shuffle_epi8(
                                            sv,
                                            lane_byte(0x0100_0000, (g % 4) as u32),
                                        ));
                                        for i in 0..M {
                                            let corr = _mm256_set1_epi32(*j.x.add((i * j.nb + b) * 16 + g) as i32);
                                            let centred = _mm256_sub_epi32(dot[i], corr);
                                            isum[i] = _mm256_add_epi32(isum[i], _mm256_mullo_epi32(centred, s));
                                        }
                                    }
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
