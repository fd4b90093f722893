//! The SwiGLU activation, `silu(gate) * up`, with glibc's `expf`
//! reproduced bit for bit on 512-bit registers.
//!
//! Why reproduce it rather than call it or approximate it:
//! - A call per element cannot vectorise. It was about 8% of a batch-8
//!   step, the largest per-row cost after attention.
//! - Any other `exp` moves some gate values by an ulp. At a near-tie that
//!   forks the greedy text, which equals llama.cpp's with glibc's `expf`.
//! - glibc's `expf` (2.27 and later, on every architecture) is plain
//!   double-precision arithmetic with one fused multiply-add: a reduction by
//!   ln 2 / 32, a 32-entry table of 2^(i/32) and a cubic polynomial. The
//!   same IEEE operations on eight double lanes give the same bits, and now
//!   they are ours: the result no longer depends on the host's libm.
//!
//! [`exp`] is the scalar reference; the AVX-512 form repeats it operation
//! for operation. Tests compare both with each other on every f32, and with
//! the host's `expf` where that is glibc's.

/// `2^(i/32)` as f64 bits, less `i << 47`, so that adding the integer part
/// of the scaled argument shifted into the exponent field gives `2^(k/32)`.
const TABLE: [u64; 32] = [
    0x3FF0_0000_0000_0000,
    0x3FEF_D9B0_D315_8574,
    0x3FEF_B558_6CF9_890F,
    0x3FEF_9301_D012_5B51,
    0x3FEF_72B8_3C7D_517B,
    0x3FEF_5487_3168_B9AA,
    0x3FEF_387A_6E75_6238,
    0x3FEF_1E9D_F51F_DEE1,
    0x3FEF_06FE_0A31_B715,
    0x3FEE_F1A7_373A_A9CB,
    0x3FEE_DEA6_4C12_3422,
    0x3FEE_CE08_6061_892D,
    0x3FEE_BFDA_D536_2A27,
    0x3FEE_B42B_569D_4F82,
    0x3FEE_AB07_DD48_5429,
    0x3FEE_A47E_B03A_5585,
    0x3FEE_A09E_667F_3BCD,
    0x3FEE_9F75_E8EC_5F74,
    0x3FEE_A114_73EB_0187,
    0x3FEE_A589_994C_CE13,
    0x3FEE_ACE5_422A_A0DB,
    0x3FEE_B737_B0CD_C5E5,
    0x3FEE_C491_82A3_F090,
    0x3FEE_D503_B23E_255D,
    0x3FEE_E89F_995A_D3AD,
    0x3FEE_FF76_F2FB_5E47,
    0x3FEF_199B_DD85_529C,
    0x3FEF_3720_DCEF_9069,
    0x3FEF_5818_DCFB_A487,
    0x3FEF_7C97_337B_9B5F,
    0x3FEF_A4AF_A2A4_90DA,
    0x3FEF_D076_5B6E_4540,
];
/// 32 / ln 2: the argument in units of 2^(1/32).
const INV_LN2_32: f64 = f64::from_bits(0x4047_1547_652B_82FE);
/// 1.5 · 2^52: adding it rounds to an integer (ties to even) held in the
/// low mantissa bits.
const SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000);
/// The cubic's coefficients for `2^(r/32)`, highest degree first.
const POLY: [f64; 3] = [
    f64::from_bits(0x3EBC_6AF8_4B91_2394),
    f64::from_bits(0x3F2E_BFCE_50FA_C4F3),
    f64::from_bits(0x3F96_2E42_FF0C_52D6),
];
/// Above this `e^x` overflows f32.
const OVERFLOW: f32 = f32::from_bits(0x42B1_7217);
/// Below this `e^x` rounds to 0.
const UNDERFLOW: f32 = f32::from_bits(0xC2CF_F1B4);
/// Magnitudes from here on (and NaN) leave the main path.
const EDGE: f32 = 88.0;

/// `e^x` with glibc's bits: the reference the SIMD form repeats.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // Written `!(a < b)` so NaN takes the edge path too.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    if !(x.abs() < EDGE) {
        return edge(x);
    }
    core(x)
}

/// The main path, for `|x| < 88` (and, with subnormal results, down to
/// the underflow bound).
#[inline(always)]
#[allow(clippy::cast_possible_truncation)] // The f64 result is rounded to f32 by design.
fn core(x: f32) -> f32 {
    let xd = f64::from(x);
    let kd = INV_LN2_32 * xd + SHIFT;
    let ki = kd.to_bits();
    let kd = kd - SHIFT;
    let r = INV_LN2_32.mul_add(xd, -kd);
    let s = f64::from_bits(TABLE[(ki % 32) as usize].wrapping_add(ki << 47));
    let p = POLY[0] * r + POLY[1];
    let q = POLY[2] * r + 1.0;
    ((p * (r * r) + q) * s) as f32
}

/// NaN, infinities, overflow and underflow, as glibc answers them.
#[cold]
fn edge(x: f32) -> f32 {
    if x.is_nan() {
        x + x
    } else if x > OVERFLOW {
        f32::INFINITY
    } else if x < UNDERFLOW {
        0.0
    } else {
        core(x)
    }
}

/// `gate ← gate / (1 + e^-gate) * up`, element by element.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu: gate and up differ in length");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 F was detected on this CPU.
            unsafe { wide::swiglu(gate, up) };
            return;
        }
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: FMA was detected on this CPU.
            unsafe { swiglu_fma(gate, up) };
            return;
        }
    }
    swiglu_scalar(gate, up);
}

/// The reference loop.
#[inline(always)]
fn swiglu_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

/// The reference loop with the fused multiply-add as one instruction
/// rather than a library call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn swiglu_fma(gate: &mut [f32], up: &[f32]) {
    swiglu_scalar(gate, up);
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use super::{EDGE, INV_LN2_32, POLY, SHIFT, TABLE};

    /// Sixteen gates at a time; a group with any `|x| ≥ 88` or NaN, and
    /// the tail, go through the scalar reference.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `up` is as long as `gate`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
        // SAFETY: each load reads 8 of the table's 32 entries.
        let table = unsafe {
            [
                _mm512_loadu_si512(TABLE[0..].as_ptr().cast()),
                _mm512_loadu_si512(TABLE[8..].as_ptr().cast()),
                _mm512_loadu_si512(TABLE[16..].as_ptr().cast()),
                _mm512_loadu_si512(TABLE[24..].as_ptr().cast()),
            ]
        };
        let mut g = gate.chunks_exact_mut(16);
        let mut u = up.chunks_exact(16);
        for (g, u) in (&mut g).zip(&mut u) {
            // SAFETY: both chunks hold 16 floats.
            let (gv, uv) = unsafe { (_mm512_loadu_ps(g.as_ptr()), _mm512_loadu_ps(u.as_ptr())) };
            let x = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(gv), _mm512_set1_epi32(i32::MIN)));
            if _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(_mm512_abs_ps(x), _mm512_set1_ps(EDGE)) != 0 {
                super::swiglu_scalar(g, u);
                continue;
            }
            let lo = exp8(_mm512_cvtps_pd(_mm512_castps512_ps256(x)), &table);
            let hi = exp8(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)))), &table);
            let e = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                _mm512_castps_pd(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo))),
                _mm256_castps_pd(_mm512_cvtpd_ps(hi)),
            ));
            let out = _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0), e)), uv);
            // SAFETY: the chunk holds 16 floats.
            unsafe { _mm512_storeu_ps(g.as_mut_ptr(), out) };
        }
        super::swiglu_scalar(g.into_remainder(), u.remainder());
    }

    /// [`super::core`] on eight lanes, up to the final rounding to f32.
    #[inline(always)]
    fn exp8(xd: __m512d, table: &[__m512i; 4]) -> __m512d {
        // SAFETY (whole body): register-only intrinsics, and the caller's
        // `target_feature` enables AVX-512 F.
        unsafe {
            let shift = _mm512_set1_pd(SHIFT);
            let inv = _mm512_set1_pd(INV_LN2_32);
            let kd = _mm512_add_pd(_mm512_mul_pd(inv, xd), shift);
            let ki = _mm512_castpd_si512(kd);
            let kd = _mm512_sub_pd(kd, shift);
            let r = _mm512_fmsub_pd(inv, xd, kd);
            let low = _mm512_permutex2var_epi64(table[0], ki, table[1]);
            let high = _mm512_permutex2var_epi64(table[2], ki, table[3]);
            let t = _mm512_mask_blend_epi64(_mm512_test_epi64_mask(ki, _mm512_set1_epi64(16)), low, high);
            let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
            let p = _mm512_add_pd(_mm512_mul_pd(_mm512_set1_pd(POLY[0]), r), _mm512_set1_pd(POLY[1]));
            let q = _mm512_add_pd(_mm512_mul_pd(_mm512_set1_pd(POLY[2]), r), _mm512_set1_pd(1.0));
            _mm512_mul_pd(_mm512_add_pd(_mm512_mul_pd(p, _mm512_mul_pd(r, r)), q), s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `step`-th f32 bit pattern, plus the edges.
    fn patterns(step: u32) -> impl Iterator<Item = f32> {
        let edges = [
            0.0,
            -0.0,
            EDGE,
            -EDGE,
            OVERFLOW,
            UNDERFLOW,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
        ];
        (0..=u32::MAX / step).map(move |i| f32::from_bits(i * step)).chain(edges)
    }

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn table_is_two_to_the_i_over_32() {
        for (i, &t) in (0u64..).zip(&TABLE) {
            #[allow(clippy::cast_precision_loss)]
            let want = (i as f64 / 32.0).exp2().to_bits() - (i << 47);
            assert_eq!(t, want, "entry {i}");
        }
    }

    /// glibc's `expf` is what the fidelity figures were measured with.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn equals_glibc_expf() {
        for x in patterns(9973) {
            assert!(same(exp(x), x.exp()), "exp({x:e}) = {:e}, glibc {:e}", exp(x), x.exp());
        }
    }

    /// The same over all 2³² inputs (a minute in release:
    /// `cargo test --release -p potluck-engine -- --ignored every_f32`).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    #[ignore = "exhaustive; run in release"]
    fn equals_glibc_expf_on_every_f32() {
        let wrong = patterns(1).filter(|&x| !same(exp(x), x.exp())).count();
        assert_eq!(wrong, 0);
    }

    /// In blocks, so the exhaustive run needs no 32 GB of inputs.
    fn swiglu_matches_reference(step: u32) {
        let mut all = patterns(step).peekable();
        while all.peek().is_some() {
            let gates: Vec<f32> = all.by_ref().take(1 << 20).collect();
            let ups: Vec<f32> = [-3.0, -2.0, -0.5, 0.0, 1.0, 2.5, 3.0].into_iter().cycle().take(gates.len()).collect();
            let mut want = gates.clone();
            swiglu_scalar(&mut want, &ups);
            let mut got = gates.clone();
            swiglu(&mut got, &ups);
            for ((w, g), x) in want.iter().zip(&got).zip(&gates) {
                assert!(same(*w, *g), "gate {x:e}: {g:e}, reference {w:e}");
            }
        }
    }

    #[test]
    fn widest_form_equals_the_reference() {
        swiglu_matches_reference(4099);
    }

    /// `cargo test --release -p potluck-engine -- --ignored every_gate`.
    #[test]
    #[ignore = "exhaustive; run in release"]
    fn widest_form_equals_the_reference_on_every_gate() {
        swiglu_matches_reference(1);
    }

    #[test]
    fn zero_gate_and_large_gates() {
        let mut g = [0.0, 10.0, 200.0, -200.0];
        swiglu(&mut g, &[5.0, 2.0, 1.0, 1.0]);
        assert_eq!(g[..3], [0.0, 2.0 * 10.0 / (1.0 + exp(-10.0)), 200.0]);
        assert_eq!(g[3].to_bits(), (-0.0f32).to_bits());
    }
}
