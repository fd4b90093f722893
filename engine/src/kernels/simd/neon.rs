//! NEON kernels for aarch64 (single-row, 32-element block formats).
//!
//! NEON is part of the aarch64 baseline, so these need no run-time check.
//! Only the exact integer part of each block is vectorised: products are
//! widened to i16 with `vmull_s8` (|p| <= 16384, exact even for -128 * -128)
//! and pairwise-accumulated into i32 lanes. The float part is the scalar
//! reference's expression, block by block, so results are bit-identical.
//! K-quants have no single-row kernel here (the scalar reference runs).
//! The packed multi-row kernels (`neon_packed`, `neon_packed_kquant`), which
//! cover every packed layout, need the dot product extension.

use std::arch::aarch64::*;

use super::neon_packed::DotProd;
use crate::quant::legacy::{Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES, Q8_1_BYTES};
use crate::quant::pack::PACKED;
use crate::quant::{f16_at, GgmlType};

/// Handle for the NEON kernels (always available on aarch64), and for the
/// packed ones when the CPU has `dotprod`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Neon {
    dot: Option<DotProd>,
}

impl Neon {
    /// The kernels this CPU runs; callers detect once and keep the handle.
    pub(crate) fn detect() -> Self {
        Self { dot: DotProd::detect() }
    }

    /// Whether there is a packed-tile kernel for `dtype` (every type of
    /// `pack::PACKED`, with `dotprod`); without one the GGUF layout and row
    /// kernels stay.
    pub(crate) fn packs(self, dtype: GgmlType) -> bool {
        self.dot.is_some() && PACKED.contains(&dtype)
    }

    /// The packed-tile kernels (`neon_packed`), if the CPU has `dotprod`.
    pub(crate) fn dotprod(self) -> Option<DotProd> {
        self.dot
    }

    /// Single-row dot product, or `None` for types without a NEON kernel.
    ///
    /// Block counts follow the reference's `chunks_exact(..).zip(..)`.
    pub(crate) fn vec_dot(self, dtype: GgmlType, w: &[u8], a: &[u8]) -> Option<f32> {
        let (wb, ab, qw, qa) = match dtype {
            GgmlType::Q4_0 => (Q4_0_BYTES, Q8_0_BYTES, 2, 2),
            GgmlType::Q4_1 => (Q4_1_BYTES, Q8_1_BYTES, 4, 4),
            GgmlType::Q8_0 => (Q8_0_BYTES, Q8_0_BYTES, 2, 2),
            _ => return None,
        };
        let nb = (w.len() / wb).min(a.len() / ab);
        let mut sumf = 0.0f32;
        for b in 0..nb {
            let (x, y) = (&w[b * wb..(b + 1) * wb], &a[b * ab..(b + 1) * ab]);
            // SAFETY: NEON is baseline on aarch64; `x[qw..]` holds 16 (4-bit)
            // or 32 (8-bit) bytes and `y[qa..]` 32 bytes, all that is read.
            let sumi = unsafe {
                match dtype {
                    GgmlType::Q8_0 => {
                        dot32(vld1q_s8(x[qw..].as_ptr().cast()), vld1q_s8(x[qw + 16..].as_ptr().cast()), y, qa)
                    }
                    _ => {
                        let bytes = vld1q_u8(x[qw..].as_ptr());
                        let mut lo = vreinterpretq_s8_u8(vandq_u8(bytes, vdupq_n_u8(0x0F)));
                        let mut hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(bytes));
                        if dtype == GgmlType::Q4_0 {
                            lo = vsubq_s8(lo, vdupq_n_s8(8));
                            hi = vsubq_s8(hi, vdupq_n_s8(8));
                        }
                        dot32(lo, hi, y, qa)
                    }
                }
            };
            sumf += match dtype {
                GgmlType::Q4_1 => (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32 + f16_at(x, 2) * f16_at(y, 2),
                _ => sumi as f32 * (f16_at(x, 0) * f16_at(y, 0)),
            };
        }
        Some(sumf)
    }
}

/// Exact `Σ w[i] * y[qa + i]` over 32 elements, with the weights given as two
/// vectors of 16 signed values (elements 0..16 and 16..32).
///
/// # Safety
/// `y` must hold at least `qa + 32` bytes (checked in debug builds).
#[inline]
unsafe fn dot32(w0: int8x16_t, w1: int8x16_t, y: &[u8], qa: usize) -> i32 {
    debug_assert!(y.len() >= qa + 32);
    // SAFETY: the caller guarantees 32 bytes at `y[qa..]`; NEON is baseline.
    unsafe {
        let y0 = vld1q_s8(y.as_ptr().add(qa).cast());
        let y1 = vld1q_s8(y.as_ptr().add(qa + 16).cast());
        let mut acc = vdupq_n_s32(0);
        acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w0), vget_low_s8(y0)));
        acc = vpadalq_s16(acc, vmull_s8(vget_high_s8(w0), vget_high_s8(y0)));
        acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w1), vget_low_s8(y1)));
        acc = vpadalq_s16(acc, vmull_s8(vget_high_s8(w1), vget_high_s8(y1)));
        vaddvq_s32(acc)
    }
}
