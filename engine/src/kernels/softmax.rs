//! The attention softmax: a fixed-order maximum, our own `exp`, and a
//! fixed-order sum, written once as scalar code and once with AVX2.
//!
//! Why our own `exp`: libm's `expf` is a call per score that the compiler
//! cannot vectorise, and its bits are the library's to change. The version
//! here is plain multiplies and adds (Rust never fuses them), so the scalar
//! and SIMD forms give the same bits on every CPU. Its accuracy (a
//! degree-7 Taylor polynomial after Cody–Waite range reduction) is within a
//! couple of ulps of the true value, far below the rounding the scores
//! already carry.
//!
//! Lanes: score `t` belongs to lane `t % 8` for the maximum and the sum,
//! which are then combined by one fixed tree, so the order depends only on
//! the number of scores, never on the batch or the thread.

/// Inputs are clamped here: `exp(-87)` is still a normal f32 and
/// `exp(88)` is finite, so the exponent bits below never wrap.
const LO: f32 = -87.0;
const HI: f32 = 88.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two: the high part has few mantissa bits, so `n * LN2_HI`
/// is exact for every `n` in range.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2²³: adding and subtracting it rounds to the nearest integer (ties
/// to even), and the sum's low mantissa bits are that integer.
const SHIFT: f32 = 12_582_912.0;
/// Bits of `SHIFT`.
const SHIFT_BITS: i32 = 0x4B40_0000;
/// 1/k! for k = 7 down to 2.
const C: [f32; 6] = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5];

/// `e^x`, the reference every SIMD form repeats operation for operation.
#[inline(always)]
#[allow(clippy::cast_sign_loss)] // The exponent field is in 1..=254 after clamping.
pub(crate) fn exp(x: f32) -> f32 {
    let x = if x < LO { LO } else { x };
    let x = if x > HI { HI } else { x };
    let t = x * LOG2E + SHIFT;
    let n = t - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = C[0];
    for c in &C[1..] {
        p = p * r + c;
    }
    p = (p * r + 1.0) * r + 1.0;
    let e = t.to_bits() as i32 - SHIFT_BITS + 127;
    p * f32::from_bits((e << 23) as u32)
}

/// `if a > b { a } else { b }`: the x86 `max` instruction's own rule, so
/// the scalar and SIMD maxima agree even on NaN.
#[inline(always)]
fn max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// Replaces every score `s` by `exp(s - max)` and returns `1 / Σ` (summed
/// in f64), the factor that normalises them.
#[allow(clippy::cast_possible_truncation)] // The f64 sum is narrowed on purpose.
// Only the AVX2 attention kernels call this; other targets use the reference.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn softmax(scores: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected on this CPU.
        return unsafe { x86::softmax(scores) };
    }
    softmax_scalar(scores)
}

/// [`softmax`] without SIMD: the reference.
#[allow(clippy::cast_possible_truncation)] // The f64 sum is narrowed on purpose.
pub(crate) fn softmax_scalar(scores: &mut [f32]) -> f32 {
    (1.0 / exp_sum_scalar(scores)) as f32
}

/// The reference's exponentials in place and their f64 sum (the part of
/// the softmax whose order the SIMD forms must keep).
fn exp_sum_scalar(scores: &mut [f32]) -> f64 {
    let mut m = [f32::NEG_INFINITY; 8];
    for (t, &s) in scores.iter().enumerate() {
        m[t % 8] = max(s, m[t % 8]);
    }
    let top = max(max(max(m[0], m[4]), max(m[1], m[5])), max(max(m[2], m[6]), max(m[3], m[7])));
    let mut sum = [0.0f64; 8];
    for (t, s) in scores.iter_mut().enumerate() {
        *s = exp(*s - top);
        sum[t % 8] += f64::from(*s);
    }
    crate::kernels::lanes::tree8(sum)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! [`super::softmax`] with AVX2: lane `l` of each register is lane `l`
    //! of the scalar form, fed the same operations in the same order.

    use std::arch::x86_64::*;

    use super::{max, C, HI, LN2_HI, LN2_LO, LO, LOG2E, SHIFT, SHIFT_BITS};

    /// [`super::exp`] on eight lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn exp8(x: __m256) -> __m256 {
        // `max_ps(a, b)` is `a > b ? a : b` and `min_ps(a, b)` is
        // `a < b ? a : b`, the scalar clamps' exact rules.
        let x = _mm256_max_ps(_mm256_set1_ps(LO), x);
        let x = _mm256_min_ps(_mm256_set1_ps(HI), x);
        let t = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _mm256_set1_ps(SHIFT));
        let n = _mm256_sub_ps(t, _mm256_set1_ps(SHIFT));
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI))),
            _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)),
        );
        let mut p = _mm256_set1_ps(C[0]);
        for &c in &C[1..] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
        }
        let one = _mm256_set1_ps(1.0);
        p = _mm256_add_ps(_mm256_mul_ps(_mm256_add_ps(_mm256_mul_ps(p, r), one), r), one);
        let e = _mm256_add_epi32(
            _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(SHIFT_BITS)),
            _mm256_set1_epi32(127),
        );
        _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e)))
    }

    /// See [`super::softmax`].
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[allow(clippy::cast_possible_truncation)] // The f64 sum is narrowed on purpose.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn softmax(scores: &mut [f32]) -> f32 {
        // SAFETY: forwarded.
        (1.0 / unsafe { exp_sum(scores) }) as f32
    }

    /// `super::exp_sum_scalar` on AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn exp_sum(scores: &mut [f32]) -> f64 {
        let full = scores.len() / 8 * 8;
        let p = scores.as_mut_ptr();
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in (0..full).step_by(8) {
            // SAFETY: `c + 8 <= full <= scores.len()`.
            mv = _mm256_max_ps(unsafe { _mm256_loadu_ps(p.add(c)) }, mv);
        }
        // The last scores (fewer than eight) in their lanes, the others
        // -inf: `max(-inf, m)` is `m` under the instruction's rule, NaN
        // included, so those lanes keep what they had, as in the scalar form.
        let rest = scores.len() - full;
        let mut tail = [f32::NEG_INFINITY; 8];
        tail[..rest].copy_from_slice(&scores[full..]);
        // SAFETY: `tail` holds eight f32s.
        mv = _mm256_max_ps(unsafe { _mm256_loadu_ps(tail.as_ptr()) }, mv);
        let mut m = [0.0f32; 8];
        // SAFETY: `m` holds eight f32s.
        unsafe { _mm256_storeu_ps(m.as_mut_ptr(), mv) };
        let top = max(max(max(m[0], m[4]), max(m[1], m[5])), max(max(m[2], m[6]), max(m[3], m[7])));
        let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        for c in (0..full).step_by(8) {
            // SAFETY: as above.
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(c)), _mm256_set1_ps(top)));
                _mm256_storeu_ps(p.add(c), e);
                lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
                hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
            }
        }
        if rest > 0 {
            // The last scores on eight lanes too: `exp8` is `exp` lane for
            // lane. The empty lanes add +0.0, which leaves every sum as it
            // was (the sums are never -0.0), so only the stored lanes count.
            // SAFETY: `tail` holds eight f32s.
            let e = unsafe { exp8(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), _mm256_set1_ps(top))) };
            let live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                _mm256_set1_epi32(i32::try_from(rest).unwrap_or(8)),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            ));
            let e = _mm256_and_ps(e, live);
            let mut out = [0.0f32; 8];
            // SAFETY: `out` holds eight f32s.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), e) };
            scores[full..].copy_from_slice(&out[..rest]);
            lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
        }
        let mut sum = [0.0f64; 8];
        // SAFETY: `sum` holds eight f64s.
        unsafe {
            _mm256_storeu_pd(sum.as_mut_ptr(), lo);
            _mm256_storeu_pd(sum.as_mut_ptr().add(4), hi);
        }
        crate::kernels::lanes::tree8(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::cast_precision_loss)]
    fn exp_is_within_two_ulps_of_f64() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            let ulp = f64::from(f32::EPSILON) * want;
            worst = worst.max((got - want).abs() / ulp);
        }
        assert!(worst < 2.0, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(f32::NAN).is_nan());
    }

    /// The AVX2 form equals the scalar reference bit for bit for every
    /// length (whole registers and remainders), including awkward values.
    #[test]
    #[allow(clippy::cast_precision_loss)]
    fn simd_equals_scalar_bit_for_bit() {
        let mut s = 5u64;
        let mut next = || {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 40.0
        };
        // Lane 0's terms 1, ε, ε with ε about 0.6 of an f64 ulp of 1: added
        // in order they round up twice, ε + ε first rounds once; so any
        // change in the order of the f64 sums shows.
        let mut order = vec![-1000.0f32; 32];
        (order[0], order[16], order[24]) = (0.0, -36.55, -36.55);
        for n in [1, 3, 7, 8, 9, 16, 31, 32, 130, 1000] {
            let mut a: Vec<f32> = if n == 32 { order.clone() } else { (0..n).map(|_| next()).collect() };
            if n > 5 && n != 32 {
                a[2] = -1e30;
                a[4] = f32::NEG_INFINITY;
                a[5] = -0.0;
            }
            let mut b = a.clone();
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // The f64 sums before narrowing: an order change can hide in
                // the f32 result, not here.
                let (mut w, mut r) = (a.clone(), a.clone());
                // SAFETY: AVX2 was detected.
                let simd = unsafe { x86::exp_sum(&mut w) };
                assert_eq!(simd.to_bits(), exp_sum_scalar(&mut r).to_bits(), "n={n}, f64 sum");
            }
            let inv_a = softmax(&mut a);
            let inv_b = softmax_scalar(&mut b);
            assert_eq!(inv_a.to_bits(), inv_b.to_bits(), "n={n}");
            assert_eq!(
                a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            let total: f32 = a.iter().map(|x| x * inv_a).sum();
            assert!((total - 1.0).abs() < 1e-5, "n={n}: {total}");
        }
    }
}
