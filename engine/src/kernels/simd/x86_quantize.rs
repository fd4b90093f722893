//! Activation quantization to Q8_0 and Q8_1 blocks, with AVX2 or AVX-512,
//! byte-identical to the scalar reference (`legacy::quantize_q8_0/_1`).
//!
//! One generic body holds the block loop and the shared scale arithmetic;
//! [`Ymm`] and [`Zmm`] supply the per-block steps on 256- or 512-bit
//! registers. Every step is elementwise or an exact integer or max
//! reduction, so the register width never changes a byte.

// Value intrinsics are safe inside `#[target_feature]` functions on current
// compilers; the `unsafe` blocks keep the pointer reads explicit.
#![allow(unused_unsafe)]

use std::arch::x86_64::*;

use super::x86::hsum_i32;
use crate::quant::legacy::{Q8_0_BYTES, Q8_1_BYTES};

/// The per-block steps of the quantization, on one register width.
trait BlockOps {
    /// A block's 32 floats, in registers.
    type Block;
    /// The 32 floats at the start of `xs` (which holds at least 32).
    unsafe fn load(xs: &[f32]) -> Self::Block;
    /// The block's largest magnitude; NaNs are skipped, as `f32::max` does.
    unsafe fn amax(v: &Self::Block) -> f32;
    /// Writes the block's 32 codes `(v * id).round() as i8` to `qs[..32]`
    /// and returns their sum.
    unsafe fn codes(v: &Self::Block, id: f32, qs: &mut [u8]) -> i32;
}

/// Q8_0 (`with_sum == false`) or Q8_1 quantization with AVX2.
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn quantize_q8(x: &[f32], out: &mut [u8], with_sum: bool) {
    // SAFETY: the features `Ymm` needs are enabled here.
    unsafe { quantize_blocks::<Ymm>(x, out, with_sum) }
}

/// [`quantize_q8`] on 512-bit registers: half the instructions per block.
///
/// # Safety
/// The CPU must have AVX2, F16C and AVX-512 F and VL.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl")]
pub(super) unsafe fn quantize_q8_wide(x: &[f32], out: &mut [u8], with_sum: bool) {
    // SAFETY: the features `Zmm` needs are enabled here.
    unsafe { quantize_blocks::<Zmm>(x, out, with_sum) }
}

/// Q8_0 (`with_sum == false`) or Q8_1 quantization, byte-identical to the
/// reference: `amax` ignores NaNs like `f32::max`, `d = amax / 127`,
/// `id = 1 / d` (or 0), codes `(v * id).round() as i8` with that cast's
/// saturation and NaN-to-0, and the f16 fields converted by `half` as there.
///
/// Blocks go four at a time: their scales share one vector division for `d`,
/// one for `1 / d` and one f16 conversion each for `d` and `s`. One block at
/// a time, the two scalar divisions and the conversions were a latency chain
/// per block (1.7 instructions per cycle). Each block is loaded twice (for
/// its maximum, then its codes) from L1: holding all four in one array made
/// the compiler copy it through `memcpy` per group.
///
/// # Safety
/// The CPU must have F16C and what `B` needs; callers are the
/// `#[target_feature]` entry points above, into which this is inlined.
#[inline(always)]
unsafe fn quantize_blocks<B: BlockOps>(x: &[f32], out: &mut [u8], with_sum: bool) {
    let bytes = if with_sum { Q8_1_BYTES } else { Q8_0_BYTES };
    let blocks = (x.len() / 32).min(out.len() / bytes);
    let mut b = 0;
    while b + 4 <= blocks {
        // SAFETY: blocks `b..b + 4` lie in both slices (checked by `blocks`).
        unsafe {
            let xs = |j: usize| &x[(b + j) * 32..];
            let amax = _mm_setr_ps(
                B::amax(&B::load(xs(0))),
                B::amax(&B::load(xs(1))),
                B::amax(&B::load(xs(2))),
                B::amax(&B::load(xs(3))),
            );
            let d = _mm_div_ps(amax, _mm_set1_ps(127.0));
            // `id = 0` where `d == 0`, else `1 / d`, as the reference writes it.
            let id = _mm_andnot_ps(_mm_cmpeq_ps(d, _mm_setzero_ps()), _mm_div_ps(_mm_set1_ps(1.0), d));
            let mut ids = [0.0f32; 4];
            _mm_storeu_ps(ids.as_mut_ptr(), id);
            let mut sums = [0i32; 4];
            for (j, sum) in sums.iter_mut().enumerate() {
                *sum = B::codes(&B::load(xs(j)), ids[j], &mut out[(b + j) * bytes + bytes - 32..]);
            }
            let dh = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(d);
            let sh = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_mul_ps(
                _mm_cvtepi32_ps(_mm_loadu_si128(sums.as_ptr().cast())),
                d,
            ));
            let (mut dbits, mut sbits) = ([0u16; 8], [0u16; 8]);
            _mm_storeu_si128(dbits.as_mut_ptr().cast(), dh);
            _mm_storeu_si128(sbits.as_mut_ptr().cast(), sh);
            for j in 0..4 {
                let blk = &mut out[(b + j) * bytes..];
                blk[0..2].copy_from_slice(&dbits[j].to_le_bytes());
                if with_sum {
                    blk[2..4].copy_from_slice(&sbits[j].to_le_bytes());
                }
            }
        }
        b += 4;
    }
    for b in b..blocks {
        // SAFETY: block `b` lies in both slices.
        unsafe {
            let v = B::load(&x[b * 32..]);
            let amax = B::amax(&v);
            let d = amax / 127.0;
            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
            let blk = &mut out[b * bytes..(b + 1) * bytes];
            let sum = B::codes(&v, id, &mut blk[bytes - 32..]);
            blk[0..2].copy_from_slice(&f16_bits(d));
            if with_sum {
                blk[2..4].copy_from_slice(&f16_bits(sum as f32 * d));
            }
        }
    }
}

/// Narrows `v` to f16 bits with F16C, rounding to nearest even as
/// `half::f16::from_f32` does.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_bits(v: f32) -> [u8; 2] {
    // SAFETY: value-only intrinsics; F16C is enabled on this function.
    let h = unsafe { _mm_cvtsi128_si32(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(v))) };
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // The low 16 bits are the f16.
    (h as u16).to_le_bytes()
}

/// 256-bit registers: a block is four of them.
struct Ymm;

impl BlockOps for Ymm {
    type Block = [__m256; 4];

    #[inline(always)]
    unsafe fn load(xs: &[f32]) -> Self::Block {
        // SAFETY: the caller runs with AVX2 enabled.
        unsafe { load_256(xs) }
    }

    #[inline(always)]
    unsafe fn amax(v: &Self::Block) -> f32 {
        // SAFETY: as above.
        unsafe { amax_256(v) }
    }

    #[inline(always)]
    unsafe fn codes(v: &Self::Block, id: f32, qs: &mut [u8]) -> i32 {
        // SAFETY: as above.
        unsafe { codes_256(v, id, qs) }
    }
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_256(xs: &[f32]) -> [__m256; 4] {
    assert!(xs.len() >= 32, "a block is 32 floats");
    // SAFETY: 32 floats are readable at `xs`.
    std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * i)) })
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn amax_256(v: &[__m256; 4]) -> f32 {
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    // `maxps` returns its second operand when either is NaN, so a NaN
    // input leaves the running maximum unchanged.
    let mut m = _mm256_setzero_ps();
    for &vi in v {
        m = _mm256_max_ps(_mm256_and_ps(vi, abs), m);
    }
    hmax_256(m)
}

/// The largest of eight lanes that hold no NaN (exact in any order).
#[inline]
#[target_feature(enable = "avx2")]
fn hmax_256(m: __m256) -> f32 {
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)))
}

/// Rounds each lane half away from zero (`f32::round`), exactly: the
/// fractional part `t - trunc(t)` is exact, so comparing it with 0.5 decides.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn round_away_256(t: __m256) -> __m256 {
    let tr = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(t);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let frac = _mm256_and_ps(_mm256_sub_ps(t, tr), abs);
    let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
    let one = _mm256_or_ps(_mm256_andnot_ps(abs, t), _mm256_set1_ps(1.0));
    _mm256_add_ps(tr, _mm256_and_ps(up, one))
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn codes_256(v: &[__m256; 4], id: f32, qs: &mut [u8]) -> i32 {
    assert!(qs.len() >= 32, "a block has 32 codes");
    let idv = _mm256_set1_ps(id);
    let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    // SAFETY: value-only intrinsics (AVX2 is enabled here).
    let codes: [__m256i; 4] = std::array::from_fn(|i| unsafe {
        let r = round_away_256(_mm256_mul_ps(v[i], idv));
        // NaN -> 0, then saturate: the semantics of `as i8`.
        let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r));
        _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
    });
    let total = _mm256_add_epi32(_mm256_add_epi32(codes[0], codes[1]), _mm256_add_epi32(codes[2], codes[3]));
    // Packing interleaves 128-bit halves: 32-bit groups come out as
    // [c0a c1a c2a c3a c0b c1b c2b c3b]; the permute restores order.
    let p = _mm256_packs_epi16(_mm256_packs_epi32(codes[0], codes[1]), _mm256_packs_epi32(codes[2], codes[3]));
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: `qs` holds at least 32 bytes (checked above).
    unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), p) };
    // SAFETY: AVX2 is enabled here.
    unsafe { hsum_i32(total) }
}

/// 512-bit registers: a block is two of them.
struct Zmm;

impl BlockOps for Zmm {
    type Block = [__m512; 2];

    #[inline(always)]
    unsafe fn load(xs: &[f32]) -> Self::Block {
        // SAFETY: the caller runs with AVX-512 F enabled.
        unsafe { load_512(xs) }
    }

    #[inline(always)]
    unsafe fn amax(v: &Self::Block) -> f32 {
        // SAFETY: as above.
        unsafe { amax_512(v) }
    }

    #[inline(always)]
    unsafe fn codes(v: &Self::Block, id: f32, qs: &mut [u8]) -> i32 {
        // SAFETY: as above.
        unsafe { codes_512(v, id, qs) }
    }
}

#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl")]
unsafe fn load_512(xs: &[f32]) -> [__m512; 2] {
    assert!(xs.len() >= 32, "a block is 32 floats");
    // SAFETY: 32 floats are readable at `xs`.
    unsafe { [_mm512_loadu_ps(xs.as_ptr()), _mm512_loadu_ps(xs.as_ptr().add(16))] }
}

#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl")]
unsafe fn amax_512(v: &[__m512; 2]) -> f32 {
    // As in `amax_256`: a NaN lane leaves the running maximum unchanged,
    // so what is reduced below holds no NaN, and its maximum is exact in
    // any order. (`abs` clears the sign bit, as the 256-bit mask does.)
    let mut m = _mm512_setzero_ps();
    for &vi in v {
        m = _mm512_max_ps(_mm512_abs_ps(vi), m);
    }
    hmax_256(_mm256_max_ps(
        _mm512_castps512_ps256(m),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(m))),
    ))
}

/// [`round_away_256`] on sixteen lanes, the same operations.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl")]
unsafe fn round_away_512(t: __m512) -> __m512 {
    let tr = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(t);
    let frac = _mm512_abs_ps(_mm512_sub_ps(t, tr));
    let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5));
    // 1.0 with the sign of `t` (integer ops: AVX-512 F has no float `and`).
    let sign = _mm512_and_si512(_mm512_castps_si512(t), _mm512_set1_epi32(i32::MIN));
    let one = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_castps_si512(_mm512_set1_ps(1.0))));
    // Adds +0.0 where not rounding up, as the 256-bit form's mask does.
    _mm512_add_ps(tr, _mm512_maskz_mov_ps(up, one))
}

#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl")]
unsafe fn codes_512(v: &[__m512; 2], id: f32, qs: &mut [u8]) -> i32 {
    assert!(qs.len() >= 32, "a block has 32 codes");
    let idv = _mm512_set1_ps(id);
    let (lo, hi) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
    let codes: [__m512i; 2] = std::array::from_fn(|i| {
        // SAFETY: value-only intrinsics (AVX-512 F is enabled here).
        unsafe {
            let r = round_away_512(_mm512_mul_ps(v[i], idv));
            // NaN -> 0, then saturate: the semantics of `as i8`.
            let r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(r, r), r);
            _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi))
        }
    });
    // The codes are already within i8, so the saturating narrowing is exact.
    // SAFETY: `qs` holds at least 32 bytes (checked above).
    unsafe {
        _mm_storeu_si128(qs.as_mut_ptr().cast(), _mm512_cvtsepi32_epi8(codes[0]));
        _mm_storeu_si128(qs.as_mut_ptr().add(16).cast(), _mm512_cvtsepi32_epi8(codes[1]));
    }
    _mm512_reduce_add_epi32(_mm512_add_epi32(codes[0], codes[1]))
}
