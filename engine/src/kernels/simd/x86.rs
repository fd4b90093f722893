//! AVX2 (+F16C) kernels for x86-64.
//!
//! Integer parts are summed with `vpmaddubsw`/`vpmaddwd` (exact: every
//! intermediate is range-checked in the comments), float parts repeat the
//! scalar reference's f32 operations one for one, in block order, with
//! separate multiplies and adds (never FMA). The multi-row kernels put one
//! weight row in each of the eight f32 lanes, so every lane runs exactly the
//! reference's sequential chain for its row.
//!
//! All kernels are `unsafe fn`s with `#[target_feature]`; they are only
//! reachable through [`Avx2`], a token that exists only once the features
//! were detected at run time.

// Value intrinsics are safe inside `#[target_feature]` functions from Rust
// 1.87 on, but the workspace's MSRV (1.85) needs the `unsafe` blocks around
// them; this keeps both compilers quiet.
#![allow(unused_unsafe)]

use std::arch::x86_64::*;

use super::x86_packed::{self, DotIsa};
use super::x86_quantize;
use super::ROW_TILE;
use crate::quant::kquant::{Q4K_BYTES, Q6K_BYTES, Q8K_BYTES};
use crate::quant::legacy::{Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES, Q8_1_BYTES};
use crate::quant::pack::{PackedOperands, TileOut};
use crate::quant::GgmlType;

/// Proof that the CPU supports AVX2 and F16C (and `isa`, which the packed
/// kernels use); only [`Avx2::detect`] and [`Avx2::all`] make one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx2 {
    isa: DotIsa,
}

impl Avx2 {
    /// Returns the token if this CPU can run the AVX2 kernels, with the best
    /// packed-kernel instruction set it has (only AVX2 when `avx2_only`).
    pub(crate) fn detect(avx2_only: bool) -> Option<Self> {
        let all = Self::all();
        if avx2_only {
            all.into_iter().find(|t| t.isa == DotIsa::Avx2)
        } else {
            all.into_iter().next()
        }
    }

    /// One token per packed-kernel instruction set this CPU runs, best
    /// first; empty without AVX2 and F16C.
    pub(crate) fn all() -> Vec<Self> {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")) {
            return Vec::new();
        }
        DotIsa::available().into_iter().map(|isa| Self { isa }).collect()
    }

    /// Single-row dot product, or `None` for types without an AVX2 kernel.
    ///
    /// Block counts follow the reference's `chunks_exact(..).zip(..)`: the
    /// shorter operand decides, so mismatched lengths behave identically.
    pub(crate) fn vec_dot(self, dtype: GgmlType, w: &[u8], a: &[u8]) -> Option<f32> {
        // SAFETY: the token proves AVX2 and F16C; each kernel derives its block
        // count from the slice lengths and never reads past them.
        Some(unsafe {
            match dtype {
                GgmlType::Q4_0 => q4_0_one(w, a),
                GgmlType::Q4_1 => q4_1_one(w, a),
                GgmlType::Q8_0 => q8_0_one(w, a),
                GgmlType::Q4_K => q4k_one(w, a),
                GgmlType::Q6_K => q6k_one(w, a),
                _ => return None,
            }
        })
    }

    /// Dot products of `out.len()` (1..=[`ROW_TILE`]) consecutive weight rows of
    /// `row_bytes` each, starting at `w`, with one activation row `a`.
    ///
    /// Returns `false` (leaving `out` untouched) for types without a
    /// multi-row kernel; the caller then falls back to single rows.
    pub(crate) fn vec_dot_rows(self, dtype: GgmlType, w: &[u8], row_bytes: usize, a: &[u8], out: &mut [f32]) -> bool {
        let k = out.len();
        if k == 0 || k > ROW_TILE || w.len() < k * row_bytes {
            return false;
        }
        // SAFETY: the token proves AVX2 and F16C; `w` holds `k` rows of
        // `row_bytes` (checked above) and the kernels read only whole blocks
        // that fit in both a row and `a`.
        unsafe {
            match dtype {
                GgmlType::Q4_0 => q4_0_rows(w, row_bytes, a, out),
                GgmlType::Q4_1 => q4_1_rows(w, row_bytes, a, out),
                GgmlType::Q8_0 => q8_0_rows(w, row_bytes, a, out),
                _ => return false,
            }
        }
        true
    }

    /// `quant::dot_packed` with this CPU's best packed kernels (see
    /// `x86_packed`); `false`, with nothing written, for types without one
    /// or operands too short. The tests' compact form of [`Self::dot_packed_to`].
    #[cfg(test)]
    pub(crate) fn dot_packed(self, ops: &PackedOperands<'_>, out: &mut [[f32; 8]]) -> bool {
        self.dot_packed_to(ops, TileOut::compact(out, ops.m))
    }

    /// [`Self::dot_packed`] into any [`TileOut`] layout.
    pub(crate) fn dot_packed_to(self, ops: &PackedOperands<'_>, out: TileOut) -> bool {
        x86_packed::dot_packed(self.isa, ops, out)
    }

    /// The instruction set of the packed kernels.
    pub(crate) fn isa(self) -> DotIsa {
        self.isa
    }

    /// Quantizes `x` to Q8_0 or Q8_1 blocks in `out`, byte-identical to the
    /// scalar reference; `false` for any other type.
    pub(crate) fn quantize_row(self, dtype: GgmlType, x: &[f32], out: &mut [u8]) -> bool {
        let with_sum = match dtype {
            GgmlType::Q8_0 => false,
            GgmlType::Q8_1 => true,
            _ => return false,
        };
        // SAFETY: the token proves AVX2 and F16C, and AVX-512 F and VL for
        // its AVX-512 instruction sets; the kernels walk whole blocks
        // present in both slices.
        unsafe {
            match self.isa {
                DotIsa::Avx512Vnni | DotIsa::Avx512Wide => x86_quantize::quantize_q8_wide(x, out, with_sum),
                DotIsa::Avx2 | DotIsa::AvxVnni => x86_quantize::quantize_q8(x, out, with_sum),
            }
        }
        true
    }
}

/// Reads the little-endian f16 at `b[at..at + 2]` and widens it to f32 with
/// F16C (exact, so equal to the reference's `half::f16::to_f32`, without its
/// per-call feature check).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_at(b: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
    // SAFETY: value-only intrinsics; F16C is enabled on this function.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits)))) }
}

/// Sum of the eight i32 lanes (exact, any order).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn hsum_i32(v: __m256i) -> i32 {
    // SAFETY: value-only intrinsics; AVX2 is enabled on this function.
    unsafe {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }
}

/// Lane `r` of the result is the sum of all lanes of `v[r]`: eight horizontal
/// sums transposed into one vector (integer, so exact in any order).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hsum8_i32(v: &[__m256i; 8]) -> __m256i {
    // SAFETY: value-only intrinsics; AVX2 is enabled on this function.
    unsafe {
        // Per 128-bit half, `hadd(a, b)` = [a0+a1, a2+a3, b0+b1, b2+b3].
        let ab = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        let cd = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
        // `ab` = [v0..v3 low-half sums | v0..v3 high-half sums], same for `cd`.
        let lo = _mm256_permute2x128_si256::<0x20>(ab, cd);
        let hi = _mm256_permute2x128_si256::<0x31>(ab, cd);
        _mm256_add_epi32(lo, hi)
    }
}

/// Reads the f16 at `p + off` of each of the eight rows and widens to f32
/// (exact, like `half::f16::to_f32`).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn gather_f16(rows: &[*const u8; 8], off: usize) -> __m256 {
    // SAFETY: the caller guarantees `rows[r] + off .. + 2` is readable for
    // every `r`; unaligned reads are used.
    unsafe {
        let h = |r: usize| rows[r].add(off).cast::<i16>().read_unaligned();
        let v = _mm_set_epi16(h(7), h(6), h(5), h(4), h(3), h(2), h(1), h(0));
        _mm256_cvtph_ps(v)
    }
}

/// Reads the two adjacent f16s at `p + off` of each of the eight rows (Q4_1's
/// `d` and `m`) with one 32-bit load per row, widened to f32.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn gather_f16_pair(rows: &[*const u8; 8], off: usize) -> (__m256, __m256) {
    // SAFETY: the caller guarantees `rows[r] + off .. + 4` is readable for
    // every `r`; unaligned reads are used.
    unsafe {
        let h = |r: usize| rows[r].add(off).cast::<i32>().read_unaligned();
        let v = _mm256_set_epi32(h(7), h(6), h(5), h(4), h(3), h(2), h(1), h(0));
        let first = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF));
        let second = _mm256_srli_epi32::<16>(v);
        // packus per half: [f0..f3, s0..s3 | f4..f7, s4..s7]; reorder 64-bit
        // chunks to [f0..f3, f4..f7 | s0..s3, s4..s7].
        let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(first, second));
        (_mm256_cvtph_ps(_mm256_castsi256_si128(p)), _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(p)))
    }
}

/// Expands 16 bytes of packed nibbles into 32 bytes in Q4_0/Q4_1 element
/// order: low nibbles are elements 0..16, high nibbles 16..32.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles16(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`.
    unsafe {
        let b = _mm_loadu_si128(p.cast());
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(b), b), _mm256_set1_epi8(0x0F))
    }
}

/// Eight i32 partial sums of `Σ q4 * q8` for one Q4_1×Q8_1 block.
///
/// `vpmaddubsw` pairs are at most `2 * 15 * 128 = 3840`, far from i16 saturation.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_1_isum(x: *const u8, y: __m256i) -> __m256i {
    // SAFETY: the caller guarantees a whole Q4_1 block at `x`.
    unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles16(x.add(4)), y), _mm256_set1_epi16(1)) }
}

/// Eight i32 partial sums of `Σ (q4 - 8) * q8` for one Q4_0×Q8_0 block,
/// computed as `Σ q4 * q8 - Σ 8 * q8` per pair (each term within ±4096 in i16).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_0_isum(x: *const u8, y: __m256i) -> __m256i {
    // SAFETY: the caller guarantees a whole Q4_0 block at `x`.
    unsafe {
        let p = _mm256_maddubs_epi16(nibbles16(x.add(2)), y);
        let c = _mm256_maddubs_epi16(_mm256_set1_epi8(8), y);
        _mm256_madd_epi16(_mm256_sub_epi16(p, c), _mm256_set1_epi16(1))
    }
}

/// Eight i32 partial sums of `Σ q8 * q8` for one Q8_0×Q8_0 block.
///
/// Both sides are sign-extended to i16 so even `-128 * -128` pairs (32768,
/// which `vpmaddubsw` cannot hold) are exact in `vpmaddwd`'s i32 result.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q8_0_isum(x: *const u8, y: *const u8) -> __m256i {
    // SAFETY: the caller guarantees whole Q8_0 blocks at `x` and `y`.
    unsafe {
        let w = |p: *const u8| _mm256_cvtepi8_epi16(_mm_loadu_si128(p.cast()));
        let lo = _mm256_madd_epi16(w(x.add(2)), w(y.add(2)));
        let hi = _mm256_madd_epi16(w(x.add(18)), w(y.add(18)));
        _mm256_add_epi32(lo, hi)
    }
}

/// Blocks both operands hold completely (the reference's `zip` of `chunks_exact`).
fn blocks(w_len: usize, w_block: usize, a_len: usize, a_block: usize) -> usize {
    (w_len / w_block).min(a_len / a_block)
}

/// Q4_0×Q8_0, one row: `sumf += sumi as f32 * (dx * dy)` per block.
#[target_feature(enable = "avx2,f16c")]
unsafe fn q4_0_one(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for b in 0..blocks(w.len(), Q4_0_BYTES, a.len(), Q8_0_BYTES) {
        let (xo, yo) = (b * Q4_0_BYTES, b * Q8_0_BYTES);
        // SAFETY: block `b` lies inside both slices.
        let sumi = unsafe {
            let y = _mm256_loadu_si256(a.as_ptr().add(yo + 2).cast());
            hsum_i32(q4_0_isum(w.as_ptr().add(xo), y))
        };
        // SAFETY: F16C is enabled on this function.
        sumf += sumi as f32 * unsafe { f16_at(w, xo) * f16_at(a, yo) };
    }
    sumf
}

/// Q4_1×Q8_1, one row: `sumf += (dx * dy) * sumi as f32 + mx * sy` per block.
#[target_feature(enable = "avx2,f16c")]
unsafe fn q4_1_one(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for b in 0..blocks(w.len(), Q4_1_BYTES, a.len(), Q8_1_BYTES) {
        let (xo, yo) = (b * Q4_1_BYTES, b * Q8_1_BYTES);
        // SAFETY: block `b` lies inside both slices.
        let sumi = unsafe {
            let y = _mm256_loadu_si256(a.as_ptr().add(yo + 4).cast());
            hsum_i32(q4_1_isum(w.as_ptr().add(xo), y))
        };
        // SAFETY: F16C is enabled on this function.
        let (dx, dy, mx, sy) = unsafe { (f16_at(w, xo), f16_at(a, yo), f16_at(w, xo + 2), f16_at(a, yo + 2)) };
        sumf += (dx * dy) * sumi as f32 + mx * sy;
    }
    sumf
}

/// Q8_0×Q8_0, one row: `sumf += sumi as f32 * (dx * dy)` per block.
#[target_feature(enable = "avx2,f16c")]
unsafe fn q8_0_one(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for b in 0..blocks(w.len(), Q8_0_BYTES, a.len(), Q8_0_BYTES) {
        let o = b * Q8_0_BYTES;
        // SAFETY: block `b` lies inside both slices.
        let sumi = unsafe { hsum_i32(q8_0_isum(w.as_ptr().add(o), a.as_ptr().add(o))) };
        // SAFETY: F16C is enabled on this function.
        sumf += sumi as f32 * unsafe { f16_at(w, o) * f16_at(a, o) };
    }
    sumf
}

/// Start pointers of up to eight rows; missing rows repeat row 0 so every lane
/// reads valid memory (their results are discarded).
fn row_ptrs(w: &[u8], row_bytes: usize, k: usize) -> [*const u8; 8] {
    std::array::from_fn(|r| w[if r < k { r * row_bytes } else { 0 }..].as_ptr())
}

/// Copies the first `out.len()` lanes of `acc` to `out`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store_lanes(acc: __m256, out: &mut [f32]) {
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds exactly eight f32s.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    out.copy_from_slice(&lanes[..out.len()]);
}

/// Q4_0×Q8_0 for up to eight rows, one row per lane, reference order per lane.
#[target_feature(enable = "avx2,f16c")]
unsafe fn q4_0_rows(w: &[u8], row_bytes: usize, a: &[u8], out: &mut [f32]) {
    let rows = row_ptrs(w, row_bytes, out.len());
    let mut acc = _mm256_setzero_ps();
    let nb = blocks(row_bytes, Q4_0_BYTES, a.len(), Q8_0_BYTES);
    for b in 0..nb {
        let (xo, yo) = (b * Q4_0_BYTES, b * Q8_0_BYTES);
        // SAFETY: block `b` lies inside every row (`row_bytes` long, all inside
        // `w`) and inside `a`.
        unsafe {
            let y = _mm256_loadu_si256(a.as_ptr().add(yo + 2).cast());
            let s: [__m256i; 8] = std::array::from_fn(|r| q4_0_isum(rows[r].add(xo), y));
            let sumi = _mm256_cvtepi32_ps(hsum8_i32(&s));
            let d = _mm256_mul_ps(gather_f16(&rows, xo), _mm256_set1_ps(f16_at(a, yo)));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(sumi, d));
        }
    }
    // SAFETY: AVX2 is enabled on this function.
    unsafe { store_lanes(acc, out) };
}

/// Q4_1×Q8_1 for up to eight rows, one row per lane, reference order per lane.
#[target_feature(enable = "avx2,f16c")]
unsafe fn q4_1_rows(w: &[u8], row_bytes: usize, a: &[u8], out: &mut [f32]) {
    let rows = row_ptrs(w, row_bytes, out.len());
    let mut acc = _mm256_setzero_ps();
    let nb = blocks(row_bytes, Q4_1_BYTES, a.len(), Q8_1_BYTES);
    for b in 0..nb {
        let (xo, yo) = (b * Q4_1_BYTES, b * Q8_1_BYTES);
        // SAFETY: block `b` lies inside every row (`row_bytes` long, all inside
        // `w`) and inside `a`.
        unsafe {
            let y = _mm256_loadu_si256(a.as_ptr().add(yo + 4).cast());
            let s: [__m256i; 8] = std::array::from_fn(|r| q4_1_isum(rows[r].add(xo), y));
            let sumi = _mm256_cvtepi32_ps(hsum8_i32(&s));
            let (dx, mx) = gather_f16_pair(&rows, xo);
            let t = _mm256_mul_ps(_mm256_mul_ps(dx, _mm256_set1_ps(f16_at(a, yo))), sumi);
            let u = _mm256_mul_ps(mx, _mm256_set1_ps(f16_at(a, yo + 2)));
            acc = _mm256_add_ps(acc, _mm256_add_ps(t, u));
        }
    }
    // SAFETY: AVX2 is enabled on this function.
    unsafe { store_lanes(acc, out) };
}

/// Q8_0×Q8_0 for up to eight rows, one row per lane, reference order per lane.
#[target_feature(enable = "avx2,f16c")]
unsafe fn q8_0_rows(w: &[u8], row_bytes: usize, a: &[u8], out: &mut [f32]) {
    let rows = row_ptrs(w, row_bytes, out.len());
    let mut acc = _mm256_setzero_ps();
    let nb = blocks(row_bytes, Q8_0_BYTES, a.len(), Q8_0_BYTES);
    for b in 0..nb {
        let o = b * Q8_0_BYTES;
        // SAFETY: block `b` lies inside every row (`row_bytes` long, all inside
        // `w`) and inside `a`.
        unsafe {
            let y = a.as_ptr().add(o);
            let s: [__m256i; 8] = std::array::from_fn(|r| q8_0_isum(rows[r].add(o), y));
            let sumi = _mm256_cvtepi32_ps(hsum8_i32(&s));
            let d = _mm256_mul_ps(gather_f16(&rows, o), _mm256_set1_ps(f16_at(a, o)));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(sumi, d));
        }
    }
    // SAFETY: AVX2 is enabled on this function.
    unsafe { store_lanes(acc, out) };
}

/// Unpacks Q4_K's eight 6-bit scales and minimums (same layout as the
/// reference's decoder in `kquant`).
fn q4k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// Reads a little-endian f32.
fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Q4_K×Q8_K, one row. Per block: `sumi = Σ_j sc[j] Σ q4 q8` and
/// `summs = Σ_j m[j] (bsum[2j] + bsum[2j+1])` exactly, then
/// `sumf += d * sumi as f32 - dmin * summs as f32` with `d = a.d * w.d`,
/// `dmin = a.d * w.dmin`, as the reference.
#[target_feature(enable = "avx2,f16c")]
unsafe fn q4k_one(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for b in 0..blocks(w.len(), Q4K_BYTES, a.len(), Q8K_BYTES) {
        let wb = &w[b * Q4K_BYTES..(b + 1) * Q4K_BYTES];
        let ab = &a[b * Q8K_BYTES..(b + 1) * Q8K_BYTES];
        let (sc, mn) = q4k_scales(&wb[4..16]);
        // SAFETY: `wb` and `ab` are whole blocks; reads stay at
        // `wb[16..144]` and `ab[4..260]`.
        let sumi = unsafe {
            let q = wb.as_ptr().add(16);
            let y = ab.as_ptr().add(4);
            let mask = _mm256_set1_epi8(0x0F);
            let mut acc = _mm256_setzero_si256();
            for g in 0..4 {
                let bits = _mm256_loadu_si256(q.add(32 * g).cast());
                let lo = _mm256_and_si256(bits, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), mask);
                // Pairs are within ±3840; times a scale < 64, twice, fits i32.
                let plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(y.add(64 * g).cast()));
                let phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(y.add(64 * g + 32).cast()));
                let slo = _mm256_set1_epi16(i16::from(sc[2 * g]));
                let shi = _mm256_set1_epi16(i16::from(sc[2 * g + 1]));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(plo, slo));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(phi, shi));
            }
            hsum_i32(acc)
        };
        let bsum = |k: usize| i32::from(i16::from_le_bytes([ab[260 + 2 * k], ab[261 + 2 * k]]));
        let summs: i32 = (0..8).map(|j| i32::from(mn[j]) * (bsum(2 * j) + bsum(2 * j + 1))).sum();
        let ad = f32_at(ab, 0);
        // SAFETY: F16C is enabled on this function.
        let (wd, wdmin) = unsafe { (f16_at(wb, 0), f16_at(wb, 2)) };
        let d = ad * wd;
        let dmin = ad * wdmin;
        sumf += d * sumi as f32 - dmin * summs as f32;
    }
    sumf
}

/// Q6_K×Q8_K, one row. Per block: `isum = Σ_g scale[g] Σ (q6 - 32) q8`
/// exactly, then `sumf += (w.d * a.d) * isum as f32`, as the reference.
#[target_feature(enable = "avx2,f16c")]
unsafe fn q6k_one(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for b in 0..blocks(w.len(), Q6K_BYTES, a.len(), Q8K_BYTES) {
        let wb = &w[b * Q6K_BYTES..(b + 1) * Q6K_BYTES];
        let ab = &a[b * Q8K_BYTES..(b + 1) * Q8K_BYTES];
        let sc = |g: usize| i16::from(wb[192 + g] as i8);
        // SAFETY: `wb` and `ab` are whole blocks; reads stay at `wb[0..192]`
        // and `ab[4..260]`.
        let isum = unsafe {
            let y = ab.as_ptr().add(4);
            let m4 = _mm256_set1_epi8(0x0F);
            let m2 = _mm256_set1_epi8(0x03);
            let m2_hi = _mm256_set1_epi8(0x30);
            let c32 = _mm256_set1_epi8(32);
            let mut acc = _mm256_setzero_si256();
            for h in 0..2 {
                let ql0 = _mm256_loadu_si256(wb.as_ptr().add(64 * h).cast());
                let ql1 = _mm256_loadu_si256(wb.as_ptr().add(64 * h + 32).cast());
                let qh = _mm256_loadu_si256(wb.as_ptr().add(128 + 32 * h).cast());
                // Unsigned 6-bit codes of elements l, l+32, l+64, l+96 (l in 0..32);
                // the 16-bit shifts are masked so no bits cross bytes.
                let q = [
                    _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m2))),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        _mm256_slli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C))),
                    ),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4), _mm256_and_si256(qh, m2_hi)),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2_hi),
                    ),
                ];
                for (k, qk) in q.iter().enumerate() {
                    let e = 128 * h + 32 * k;
                    let yk = _mm256_loadu_si256(y.add(e).cast());
                    // Pairs: q*y within ±16128, 32*y within ±8192; the difference fits i16.
                    let p = _mm256_sub_epi16(_mm256_maddubs_epi16(*qk, yk), _mm256_maddubs_epi16(c32, yk));
                    let g = e / 16;
                    let s = _mm256_set_m128i(_mm_set1_epi16(sc(g + 1)), _mm_set1_epi16(sc(g)));
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, s));
                }
            }
            hsum_i32(acc)
        };
        // SAFETY: F16C is enabled on this function.
        let wd = unsafe { f16_at(wb, 208) };
        sumf += (wd * f32_at(ab, 0)) * isum as f32;
    }
    sumf
}
