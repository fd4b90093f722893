//! Run-time selected SIMD kernels for the quantized dot products and the
//! activation quantizers.
//!
//! Every kernel here reproduces the scalar reference in `legacy`/`kquant` bit
//! for bit (determinism rule: results never depend on the CPU's features).
//! The kernel set is chosen once per process: the best one the CPU supports,
//! unless `POTLUCK_KERNEL=scalar` forces the reference path (for tests and
//! benchmarks). Each entry point returns `None`/`false` when it has no kernel
//! for a type, and the caller then runs the scalar reference.
//!
//! All `unsafe` code of the quantized kernels lives in this module's children.

use std::sync::OnceLock;

use crate::quant::GgmlType;

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "aarch64")]
mod neon_packed;
#[cfg(target_arch = "aarch64")]
mod neon_packed_kquant;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_packed;
#[cfg(target_arch = "x86_64")]
mod x86_packed_kquant;
#[cfg(target_arch = "x86_64")]
mod x86_quantize;
#[cfg(target_arch = "x86_64")]
mod x86_tile_pair;

/// Most weight rows one [`vec_dot_rows`] call handles: one per f32 lane of an
/// AVX2 register, so each lane keeps the reference's sequential block order.
pub(crate) const ROW_TILE: usize = 8;

/// Most activation rows one [`dot_packed`] call takes: each weight tile is
/// loaded once for all of them (AVX-512 keeps eight rows' Q4_1 sums in
/// registers; narrower kernels take them in passes of four).
pub(crate) const MAX_ACT: usize = crate::quant::pack::MAX_ACT;

/// The kernel family in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// The scalar reference only.
    Scalar,
    /// AVX2 + F16C (the token proves detection succeeded).
    #[cfg(target_arch = "x86_64")]
    Avx2(x86::Avx2),
    /// NEON (aarch64 baseline), with packed kernels for every packed
    /// layout where `dotprod` is.
    #[cfg(target_arch = "aarch64")]
    Neon(neon::Neon),
}

/// The process-wide kernel choice, detected on first use.
fn kernel() -> Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    *KERNEL.get_or_init(|| match std::env::var("POTLUCK_KERNEL").map(|v| v.to_ascii_lowercase()).as_deref() {
        Ok("scalar") => Kernel::Scalar,
        Ok("avx2") => best(true),
        _ => best(false),
    })
}

/// The fastest kernel family this CPU supports (on x86-64 without VNNI
/// when `avx2_only`, `POTLUCK_KERNEL=avx2`, to measure or test that path).
fn best(avx2_only: bool) -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = x86::Avx2::detect(avx2_only) {
        return Kernel::Avx2(t);
    }
    #[cfg(target_arch = "aarch64")]
    return {
        let _ = avx2_only;
        Kernel::Neon(neon::Neon::detect())
    };
    #[allow(unreachable_code)]
    Kernel::Scalar
}

/// Name of the kernel family in use (for logs and benchmarks).
pub(crate) fn kernel_name() -> &'static str {
    match kernel() {
        Kernel::Scalar => "scalar",
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2(k) => k.isa().name(),
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon(_) => "neon",
    }
}

/// Single-row quantized dot product, or `None` to use the scalar reference.
#[inline]
pub(crate) fn vec_dot(dtype: GgmlType, w: &[u8], a: &[u8]) -> Option<f32> {
    match kernel() {
        Kernel::Scalar => None,
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2(k) => k.vec_dot(dtype, w, a),
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon(k) => k.vec_dot(dtype, w, a),
    }
}

/// Dot products of `out.len()` (at most [`ROW_TILE`]) consecutive weight rows
/// of `row_bytes` each (`w`) with one quantized activation row `a`.
///
/// Returns `false` when there is no multi-row kernel for `dtype` (nothing
/// written); the caller then computes the rows one by one.
#[inline]
pub(crate) fn vec_dot_rows(dtype: GgmlType, w: &[u8], row_bytes: usize, a: &[u8], out: &mut [f32]) -> bool {
    match kernel() {
        Kernel::Scalar => false,
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2(k) => k.vec_dot_rows(dtype, w, row_bytes, a, out),
        // No multi-row NEON kernel: the packed tiles serve batches there.
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon(_) => {
            let _ = (dtype, w, row_bytes, a, out);
            false
        }
    }
}

/// Whether the kernel in use has a packed-tile kernel for `dtype` (see
/// `quant::pack`); matrices of such types are packed at load time.
pub(crate) fn packs(dtype: GgmlType) -> bool {
    match kernel() {
        Kernel::Scalar => false,
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2(_) => crate::quant::pack::PACKED.contains(&dtype),
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon(k) => k.packs(dtype),
    }
}

/// Dot products of the eight rows of each packed tile of `ops` with its
/// activation rows, into `out` ([`crate::quant::pack::TileOut`]). Returns `false`
/// (nothing written) when there is no packed kernel or the operands are short.
#[inline]
pub(crate) fn dot_packed(ops: &crate::quant::pack::PackedOperands<'_>, out: crate::quant::pack::TileOut) -> bool {
    match kernel() {
        Kernel::Scalar => false,
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2(k) => k.dot_packed_to(ops, out),
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon(k) => k.dotprod().is_some_and(|d| d.dot_packed_to(ops, out)),
    }
}

/// Quantizes an activation row into `out` (sized by the caller), or returns
/// `false` to use the scalar reference.
#[inline]
pub(crate) fn quantize_row(dtype: GgmlType, x: &[f32], out: &mut [u8]) -> bool {
    match kernel() {
        Kernel::Scalar => false,
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2(k) => k.quantize_row(dtype, x, out),
        // NEON quantization is not written yet: the scalar reference runs.
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon(_) => {
            let _ = (dtype, x, out);
            false
        }
    }
}

#[cfg(test)]
mod tests;
