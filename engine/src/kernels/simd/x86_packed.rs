//! Packed-tile kernels for x86-64: eight weight rows (one per 32-bit lane)
//! against up to eight activation rows, over a run of tiles.
//!
//! The lane-interleaved layout (see `quant::pack`) puts four consecutive
//! quant bytes of row `r` in lane `r` of each 32-byte load, so a 4-way byte
//! dot product against the matching four activation bytes (broadcast to all
//! lanes) accumulates every row's exact integer block sum in its own lane:
//! no horizontal sums, the cost that capped the previous kernels. Three
//! instruction sets compute the 4-way dot product:
//! - AVX-512 VNNI (+VL): `vpdpbusd` on 256-bit registers (32 of them hold
//!   eight Q4_1 activation rows per pass, four for Q8_0);
//! - AVX-VNNI: the same instruction, VEX-encoded (16 registers, four rows);
//! - AVX2: `vpmaddubsw` + `vpmaddwd`, exact only while the unsigned operand
//!   is at most 127 (pairs within ±32512 in i16), so Q8_0's bytes are split
//!   into nibbles.
//!
//! Q4_K, Q5_K and Q6_K, whose sub-block scales differ per row, are in
//! `x86_packed_kquant`.
//!
//! Integer sums are exact in any order. The float part repeats the scalar
//! reference's f32 operations one for one, in block order, per lane, with
//! separate multiplies and adds (never FMA), so every output equals the
//! reference bit for bit, whatever the instruction set or activation count.

// Value intrinsics are safe inside `#[target_feature]` functions on current
// compilers; the `unsafe` blocks keep the pointer reads explicit.
#![allow(unused_unsafe)]

use std::arch::x86_64::*;

use crate::quant::legacy::{Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q8_0_BYTES, Q8_1_BYTES};
use crate::quant::pack::{Job, PackedOperands, TileOut, PACKED};
use crate::quant::GgmlType;

/// The instruction set used for the 4-way byte dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DotIsa {
    /// `vpmaddubsw` + `vpmaddwd` (any AVX2 CPU).
    Avx2,
    /// VEX `vpdpbusd` (AVX-VNNI).
    AvxVnni,
    /// EVEX `vpdpbusd` on 256-bit registers (AVX-512 F + VL + VNNI).
    Avx512Vnni,
    /// EVEX `vpdpbusd` on 512-bit registers, two tiles at a time
    /// (`x86_tile_pair`; also AVX-512 DQ). Chosen first where the CPU runs
    /// 512-bit operations at full width; on double-pumped units it is no
    /// slower.
    Avx512Wide,
}

impl DotIsa {
    /// Every instruction set this CPU can run, best first (AVX2 is assumed:
    /// callers hold an AVX2 token).
    pub(crate) fn available() -> Vec<Self> {
        let mut v = Vec::new();
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
        {
            if is_x86_feature_detected!("avx512dq") {
                v.push(Self::Avx512Wide);
            }
            v.push(Self::Avx512Vnni);
        }
        if is_x86_feature_detected!("avxvnni") {
            v.push(Self::AvxVnni);
        }
        v.push(Self::Avx2);
        v
    }

    /// Name for logs and benchmarks.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Avx2 => "avx2",
            Self::AvxVnni => "avx2+avxvnni",
            Self::Avx512Vnni => "avx2+avx512vnni",
            Self::Avx512Wide => "avx512vnni-512",
        }
    }

    /// Activation rows one kernel pass keeps in registers. AVX-512's 32
    /// registers hold eight rows' Q4_1 accumulators (about 6% faster than
    /// two passes of four). For Q8_0 the 512-bit tile-pair kernel takes
    /// eight as well: SmolLM2's lm_head at eight rows went from 1.3–1.6 ms
    /// to 0.88–0.95 ms on a Zen 5 (`cargo run --release --example
    /// matmul_speed -p potluck-engine`), where a Xeon had shown no gain.
    /// Two passes of four meant each weight block loaded twice and its
    /// unpacking paid for four rows, not eight. The 16-register sets take
    /// four.
    /// Q4_0 and the K-quants keep one accumulator more per row than Q4_1
    /// (the sub-block sums), which 32 registers hold for eight rows too.
    fn max_rows(self, dtype: GgmlType) -> usize {
        match (self, dtype) {
            (
                Self::Avx512Vnni | Self::Avx512Wide,
                GgmlType::Q4_1 | GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K,
            )
            | (Self::Avx512Wide, GgmlType::Q8_0) => 8,
            _ => 4,
        }
    }
}

/// Runs the packed kernels of `isa` on `ops` (the contract of
/// `quant::dot_packed`); `false`, with nothing written, for other types or
/// operands too short (checked by [`Job::passes`]).
pub(crate) fn dot_packed(isa: DotIsa, ops: &PackedOperands<'_>, out: TileOut) -> bool {
    let dtype = ops.dtype;
    // The last arms of each instruction set below take Q6_K.
    if !PACKED.contains(&dtype) {
        return false;
    }
    let tbb = 8 * dtype.block_bytes();
    Job::passes(ops, out, isa.max_rows(dtype), |job, k| {
        // SAFETY: `Job::passes` checked the operands of `job` for `k` rows.
        // The target features are enabled because the caller's `isa` came
        // from `DotIsa::available` on this CPU.
        unsafe {
            use super::x86_packed_kquant as kq;
            match (isa, dtype) {
                (DotIsa::Avx512Wide, GgmlType::Q4_1) => {
                    run_pairs(k, job, tbb, false, upto8!(super::x86_tile_pair::q4_1), upto8!(avx512::q4_1));
                }
                (DotIsa::Avx512Wide, GgmlType::Q8_0) => {
                    run_pairs(k, job, tbb, false, upto8!(super::x86_tile_pair::q8_0), upto8!(avx512::q8_0));
                }
                (DotIsa::Avx512Vnni, GgmlType::Q4_1) => run_k(k, job, upto8!(avx512::q4_1)),
                (DotIsa::Avx512Vnni, GgmlType::Q8_0) => run_k(k, job, upto4!(avx512::q8_0)),
                (DotIsa::Avx512Vnni | DotIsa::Avx512Wide, GgmlType::Q4_0) => run_k(k, job, upto8!(avx512::q4_0)),
                (DotIsa::Avx512Vnni | DotIsa::Avx512Wide, GgmlType::Q5_0) => run_k(k, job, upto8!(avx512::q5_0)),
                (DotIsa::Avx512Wide, GgmlType::Q4_K) => {
                    run_pairs(k, job, tbb, false, upto8!(super::x86_tile_pair::q4_k), upto8!(kq::avx512::q4_k));
                }
                (DotIsa::Avx512Vnni, GgmlType::Q4_K) => run_k(k, job, upto8!(kq::avx512::q4_k)),
                (DotIsa::Avx512Wide, GgmlType::Q5_K) => {
                    run_pairs(k, job, tbb, false, upto8!(super::x86_tile_pair::q5_k), upto8!(kq::avx512::q5_k));
                }
                (DotIsa::Avx512Vnni, GgmlType::Q5_K) => run_k(k, job, upto8!(kq::avx512::q5_k)),
                (DotIsa::Avx512Wide, _) => {
                    run_pairs(k, job, tbb, true, upto8!(super::x86_tile_pair::q6_k), upto8!(kq::avx512::q6_k));
                }
                (DotIsa::Avx512Vnni, _) => run_k(k, job, upto8!(kq::avx512::q6_k)),
                (DotIsa::AvxVnni, GgmlType::Q4_1) => run_k(k, job, upto4!(avxvnni::q4_1)),
                (DotIsa::AvxVnni, GgmlType::Q8_0) => run_k(k, job, upto4!(avxvnni::q8_0)),
                (DotIsa::AvxVnni, GgmlType::Q4_0) => run_k(k, job, upto4!(avxvnni::q4_0)),
                (DotIsa::AvxVnni, GgmlType::Q5_0) => run_k(k, job, upto4!(avxvnni::q5_0)),
                (DotIsa::AvxVnni, GgmlType::Q4_K) => run_k(k, job, upto4!(kq::avxvnni::q4_k)),
                (DotIsa::AvxVnni, GgmlType::Q5_K) => run_k(k, job, upto4!(kq::avxvnni::q5_k)),
                (DotIsa::AvxVnni, _) => run_k(k, job, upto4!(kq::avxvnni::q6_k)),
                (DotIsa::Avx2, GgmlType::Q4_1) => run_k(k, job, upto4!(avx2::q4_1)),
                (DotIsa::Avx2, GgmlType::Q8_0) => run_k(k, job, upto4!(avx2::q8_0)),
                (DotIsa::Avx2, GgmlType::Q4_0) => run_k(k, job, upto4!(avx2::q4_0)),
                (DotIsa::Avx2, GgmlType::Q5_0) => run_k(k, job, upto4!(avx2::q5_0)),
                (DotIsa::Avx2, GgmlType::Q4_K) => run_k(k, job, upto4!(kq::avx2::q4_k)),
                (DotIsa::Avx2, GgmlType::Q5_K) => run_k(k, job, upto4!(kq::avx2::q5_k)),
                (DotIsa::Avx2, _) => run_k(k, job, upto4!(kq::avx2::q6_k)),
            }
        }
    })
}

/// Runs the tile-pair kernels of `wide` over the even number of leading
/// tiles of `job` and, for an odd count, the one-tile kernels of `narrow`
/// over the last (`tbb` bytes per packed block). With one activation row
/// only `wide_single` types take pairs.
///
/// # Safety
/// As for [`run_k`], for both kernel sets.
unsafe fn run_pairs<const N: usize>(
    k: usize,
    job: &Job,
    tbb: usize,
    wide_single: bool,
    wide: [KernelFn; N],
    narrow: [KernelFn; N],
) {
    // One activation row streams the weights from memory; the one-tile
    // kernels keep a single stream and measured faster there, except for
    // Q6_K, whose unpacking of 6-bit codes the pairs do for sixteen rows.
    let even = if k == 1 && !wide_single { 0 } else { job.ntiles & !1 };
    // SAFETY: forwarded contract; the tail job starts at tile `even`, within
    // the same tiles and outputs.
    unsafe {
        if even > 0 {
            run_k(k, &Job { ntiles: even, ..*job }, wide);
        }
        if even < job.ntiles {
            let tail = Job {
                tiles: job.tiles.add(even * job.nb * tbb),
                ntiles: job.ntiles - even,
                out: job.out.add(even * job.out_stride),
                ..*job
            };
            run_k(k, &tail, narrow);
        }
    }
}

type KernelFn = unsafe fn(&Job);

/// The instances `f::<1>` to `f::<4>` of a kernel, by row count.
macro_rules! upto4 {
    ($($f:ident)::+) => {
        [$($f)::+::<1> as KernelFn, $($f)::+::<2>, $($f)::+::<3>, $($f)::+::<4>]
    };
}

/// The instances `f::<1>` to `f::<8>` of a kernel, by row count.
macro_rules! upto8 {
    ($($f:ident)::+) => {
        [
            $($f)::+::<1> as KernelFn,
            $($f)::+::<2>,
            $($f)::+::<3>,
            $($f)::+::<4>,
            $($f)::+::<5>,
            $($f)::+::<6>,
            $($f)::+::<7>,
            $($f)::+::<8>,
        ]
    };
}
pub(super) use {upto4, upto8};

/// Calls the kernel instance for `k` (1..=N) activation rows from `ks`,
/// which holds the instances for 1 to N rows.
///
/// # Safety
/// As for the kernels: `job` came from [`Job::passes`] for `k` rows and the
/// CPU has the kernels' target features.
unsafe fn run_k<const N: usize>(k: usize, job: &Job, ks: [KernelFn; N]) {
    debug_assert!((1..=N).contains(&k));
    // SAFETY: forwarded contract.
    unsafe { ks[k - 1](job) }
}

/// Defines `q4_1::<M>`, `q8_0::<M>`, `q4_0::<M>` and `q5_0::<M>` for one
/// instruction set, given its target features and `dot4(acc, u, s)`, which
/// adds to each i32 lane the dot product of the lane's four unsigned bytes
/// of `u` (each at most 31)
/// with the four signed bytes of `s`, and `dot4_byte`, the same for any
/// unsigned byte.
macro_rules! packed_kernels {
    ($module:ident, $features:literal, $dot4:expr, $dot4_byte:expr) => {
        mod $module {
            use super::*;

            /// The four activation bytes at `p`, in every lane.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn bcast(p: *const u8) -> __m256i {
                // SAFETY: the caller guarantees four readable bytes at `p`.
                unsafe { _mm256_set1_epi32(p.cast::<i32>().read_unaligned()) }
            }

            /// Q4_1×Q8_1: lane `r` of activation `i` runs the reference chain
            /// `sumf += (dx * dy) * sumi as f32 + mx * sy`, block by block.
            #[allow(clippy::needless_range_loop)] // Index loops read clearer across the M rows.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn q4_1<const M: usize>(j: &Job) {
                // SAFETY: see `Job` (the operands' bounds); unaligned loads only.
                unsafe {
                    let m4 = _mm256_set1_epi8(0x0F);
                    for t in 0..j.ntiles {
                        let mut acc = [_mm256_setzero_ps(); M];
                        for b in 0..j.nb {
                            let p = j.tiles.add((t * j.nb + b) * 8 * Q4_1_BYTES);
                            let mut lo_sum = [_mm256_setzero_si256(); M];
                            let mut hi_sum = [_mm256_setzero_si256(); M];
                            for g in 0..4 {
                                let w = _mm256_loadu_si256(p.add(32 + 32 * g).cast());
                                let lo = _mm256_and_si256(w, m4);
                                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), m4);
                                for i in 0..M {
                                    let y = j.a[i].add(b * Q8_1_BYTES + 4 + 4 * g);
                                    lo_sum[i] = $dot4(lo_sum[i], lo, bcast(y));
                                    hi_sum[i] = $dot4(hi_sum[i], hi, bcast(y.add(16)));
                                }
                            }
                            let dx = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
                            let mx = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast()));
                            for i in 0..M {
                                let k = i * j.nb + b;
                                let sumi = _mm256_cvtepi32_ps(_mm256_add_epi32(lo_sum[i], hi_sum[i]));
                                let dy = _mm256_set1_ps(*j.d.add(k));
                                let sy = _mm256_castsi256_ps(_mm256_set1_epi32(*j.x.add(k) as i32));
                                let s = _mm256_mul_ps(_mm256_mul_ps(dx, dy), sumi);
                                acc[i] = _mm256_add_ps(acc[i], _mm256_add_ps(s, _mm256_mul_ps(mx, sy)));
                            }
                        }
                        for i in 0..M {
                            _mm256_storeu_ps((*j.out.add(t * j.out_stride + i * j.row_stride)).as_mut_ptr(), acc[i]);
                        }
                    }
                }
            }

            /// Q8_0×Q8_0: weights are stored as `q + 128`, so the block sum
            /// is `Σ (q + 128) y - 128 Σ y`, exact in i32; then lane `r` runs
            /// `sumf += sumi as f32 * (dx * dy)`.
            #[allow(clippy::needless_range_loop)] // Index loops read clearer across the M rows.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn q8_0<const M: usize>(j: &Job) {
                // SAFETY: see `Job` (the operands' bounds); unaligned loads only.
                unsafe {
                    for t in 0..j.ntiles {
                        let mut acc = [_mm256_setzero_ps(); M];
                        for b in 0..j.nb {
                            let p = j.tiles.add((t * j.nb + b) * 8 * Q8_0_BYTES);
                            let mut even = [_mm256_setzero_si256(); M];
                            let mut odd = [_mm256_setzero_si256(); M];
                            for g in (0..8).step_by(2) {
                                let w0 = _mm256_loadu_si256(p.add(16 + 32 * g).cast());
                                let w1 = _mm256_loadu_si256(p.add(48 + 32 * g).cast());
                                for i in 0..M {
                                    let y = j.a[i].add(b * Q8_0_BYTES + 2 + 4 * g);
                                    even[i] = $dot4_byte(even[i], w0, bcast(y));
                                    odd[i] = $dot4_byte(odd[i], w1, bcast(y.add(4)));
                                }
                            }
                            let dx = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
                            for i in 0..M {
                                let k = i * j.nb + b;
                                let corr = _mm256_set1_epi32(*j.x.add(k) as i32);
                                let sumi = _mm256_sub_epi32(_mm256_add_epi32(even[i], odd[i]), corr);
                                let d = _mm256_mul_ps(dx, _mm256_set1_ps(*j.d.add(k)));
                                acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(_mm256_cvtepi32_ps(sumi), d));
                            }
                        }
                        for i in 0..M {
                            _mm256_storeu_ps((*j.out.add(t * j.out_stride + i * j.row_stride)).as_mut_ptr(), acc[i]);
                        }
                    }
                }
            }

            /// Q4_0×Q8_0.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn q4_0<const M: usize>(j: &Job) {
                // SAFETY: the caller's contract, for Q4_0 tiles.
                unsafe { offset_nibbles::<M, false>(j) }
            }

            /// Q5_0×Q8_0.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn q5_0<const M: usize>(j: &Job) {
                // SAFETY: the caller's contract, for Q5_0 tiles.
                unsafe { offset_nibbles::<M, true>(j) }
            }

            /// Q4_0×Q8_0, or Q5_0×Q8_0 with `FIVE`: the block sum is
            /// `Σ q y - 8 Σ y` (Q5_0: `- 16 Σ y`), exact in i32 (the scalar
            /// `x` holds the correction); then lane `r` runs
            /// `sumf += sumi as f32 * (dx * dy)`.
            #[allow(clippy::needless_range_loop)] // Index loops read clearer across the M rows.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn offset_nibbles<const M: usize, const FIVE: bool>(j: &Job) {
                // SAFETY: see `Job` (the operands' bounds); unaligned loads only.
                unsafe {
                    let m4 = _mm256_set1_epi8(0x0F);
                    let (tbb, qs) = if FIVE { (8 * Q5_0_BYTES, 48) } else { (8 * Q4_0_BYTES, 16) };
                    for t in 0..j.ntiles {
                        let mut acc = [_mm256_setzero_ps(); M];
                        for b in 0..j.nb {
                            let p = j.tiles.add((t * j.nb + b) * tbb);
                            let mut sum = [_mm256_setzero_si256(); M];
                            // Lane `r`: row `r`'s `qh` word (Q5_0).
                            let qh = if FIVE { _mm256_loadu_si256(p.add(16).cast()) } else { _mm256_setzero_si256() };
                            for g in 0..4 {
                                let w = _mm256_loadu_si256(p.add(qs + 32 * g).cast());
                                let mut lo = _mm256_and_si256(w, m4);
                                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), m4);
                                if FIVE {
                                    // Elements `4 g..4 g + 4` and `16 + 4 g..`.
                                    lo = _mm256_or_si256(lo, high_bits(qh, 4 * g));
                                    hi = _mm256_or_si256(hi, high_bits(qh, 16 + 4 * g));
                                }
                                for i in 0..M {
                                    let y = j.a[i].add(b * Q8_0_BYTES + 2 + 4 * g);
                                    sum[i] = $dot4(sum[i], lo, bcast(y));
                                    sum[i] = $dot4(sum[i], hi, bcast(y.add(16)));
                                }
                            }
                            let dx = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
                            for i in 0..M {
                                let k = i * j.nb + b;
                                let sumi = _mm256_sub_epi32(sum[i], _mm256_set1_epi32(*j.x.add(k) as i32));
                                let d = _mm256_mul_ps(dx, _mm256_set1_ps(*j.d.add(k)));
                                acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(_mm256_cvtepi32_ps(sumi), d));
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

/// 0x10 in byte `k` of each 32-bit lane where bit `e + k` of the lane's
/// word in `qh` is set (`e` a multiple of 4 below 32): the fifth bits of
/// Q5_0's elements `e..e + 4`, to OR onto their nibbles.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn high_bits(qh: __m256i, e: usize) -> __m256i {
    // Byte `e / 8` of each lane's word, copied to the lane's four bytes.
    let lanes = _mm256_setr_epi32(0, 0x0404_0404, 0x0808_0808, 0x0C0C_0C0C, 0, 0x0404_0404, 0x0808_0808, 0x0C0C_0C0C);
    let spread = _mm256_shuffle_epi8(qh, _mm256_add_epi8(lanes, _mm256_set1_epi8((e / 8) as i8)));
    // Bit `e % 8 + k` of byte `k`.
    let s = e % 8;
    let mask = _mm256_set1_epi32(((1u32 << s) | (1 << (s + 9)) | (1 << (s + 18)) | (1 << (s + 27))) as i32);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// `vpmaddubsw` + `vpmaddwd`: exact while every unsigned byte is at most
/// 127 (pair sums within ±32512 in i16); the kernels give it nibbles (±3840),
/// 5-bit codes (±7936) or Q6_K's 6-bit codes (±16128).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot4_avx2(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
}

/// Any unsigned byte on AVX2: `u = 16 hi + lo` with both nibbles at most 15.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot4_byte_avx2(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    let m4 = _mm256_set1_epi8(0x0F);
    // SAFETY: AVX2 is enabled on this function.
    let (lo, hi) = unsafe {
        (
            dot4_avx2(_mm256_setzero_si256(), _mm256_and_si256(u, m4), s),
            dot4_avx2(_mm256_setzero_si256(), _mm256_and_si256(_mm256_srli_epi16::<4>(u), m4), s),
        )
    };
    _mm256_add_epi32(acc, _mm256_add_epi32(lo, _mm256_slli_epi32::<4>(hi)))
}

/// VEX `vpdpbusd`: exact for any bytes (at most 4 · 255 · 128 per lane and step).
#[inline]
#[target_feature(enable = "avxvnni")]
pub(super) unsafe fn dot4_avxvnni(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(acc, u, s)
}

/// EVEX `vpdpbusd` on 256-bit registers (exact, as above).
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512vnni")]
pub(super) unsafe fn dot4_avx512(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, u, s)
}

packed_kernels!(avx2, "avx2,f16c", dot4_avx2, dot4_byte_avx2);
packed_kernels!(avxvnni, "avx2,f16c,avxvnni", dot4_avxvnni, dot4_avxvnni);
packed_kernels!(avx512, "avx2,f16c,avx512f,avx512vl,avx512vnni", dot4_avx512, dot4_avx512);
