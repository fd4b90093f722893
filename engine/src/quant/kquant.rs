//! K-quant formats (Q4_K, Q6_K) and their 8-bit activation partner Q8_K.
//!
//! These are the "super-block" quantization formats used by GGUF files: every block covers
//! [`QK_K`] = 256 weights and carries one or two f16 super-scales plus small per-sub-block
//! integer scales. The byte layouts here are bit-compatible with llama.cpp, so blocks can be
//! read straight out of a memory-mapped GGUF tensor without any repacking.
//!
//! Matrix-vector products never dequantize the weights: the activation row is quantized to
//! Q8_K once, and [`vec_dot_q4k_q8k`] / [`vec_dot_q6k_q8k`] then work on integers per block,
//! touching floats only once per 256 elements. The scalar code in this module is the
//! *reference*: its floating-point accumulation order is fixed and documented so that faster
//! SIMD kernels can be checked against it bit for bit.
//!
//! All multi-byte fields are little-endian and parsed from byte slices explicitly (no
//! `unsafe`, no transmutes), so this code is correct on any host byte order.

use half::f16;

/// Elements per K-quant super-block; fixed by the GGUF format.
pub(crate) const QK_K: usize = 256;

/// Bytes per Q4_K block: `f16 d; f16 dmin; u8 scales[12]; u8 qs[128]`.
pub(crate) const Q4K_BYTES: usize = 144;

/// Bytes per Q6_K block: `u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d`.
pub(crate) const Q6K_BYTES: usize = 210;

/// Bytes per Q8_K block: `f32 d; i8 qs[256]; i16 bsums[16]`.
///
/// `bsums` holds the sums of each run of 16 quants; Q4_K's dot product uses them to apply the
/// per-sub-block minimum without touching the individual activations again.
pub(crate) const Q8K_BYTES: usize = 4 + QK_K + 2 * (QK_K / 16);

// Byte offsets inside a Q4_K block.
/// Offset of the f16 super-scale `d` in a Q4_K block.
const Q4K_D: usize = 0;
/// Offset of the f16 super-minimum `dmin` in a Q4_K block.
const Q4K_DMIN: usize = 2;
/// Offset of the 12 packed 6-bit scale/min bytes in a Q4_K block.
const Q4K_SCALES: usize = 4;
/// Offset of the 128 bytes of packed 4-bit quants in a Q4_K block.
const Q4K_QS: usize = 16;

// Byte offsets inside a Q6_K block.
/// Offset of the low-nibble array `ql` in a Q6_K block.
const Q6K_QL: usize = 0;
/// Offset of the high-2-bit array `qh` in a Q6_K block.
const Q6K_QH: usize = 128;
/// Offset of the 16 signed 8-bit sub-block scales in a Q6_K block.
const Q6K_SCALES: usize = 192;
/// Offset of the f16 super-scale `d` in a Q6_K block.
const Q6K_D: usize = 208;

// Byte offsets inside a Q8_K block.
/// Offset of the f32 scale `d` in a Q8_K block.
const Q8K_D: usize = 0;
/// Offset of the 256 signed 8-bit quants in a Q8_K block.
const Q8K_QS: usize = 4;
/// Offset of the 16 little-endian i16 partial sums in a Q8_K block.
const Q8K_BSUMS: usize = 4 + QK_K;

/// Reads a little-endian f16 at `off` and widens it to f32.
#[inline]
fn read_f16(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// Writes `v` as a little-endian f16 at `off` and returns the value actually stored, so the
/// quantizers can compute their integer parts against the rounded scale.
#[inline]
fn write_f16(b: &mut [u8], off: usize, v: f32) -> f32 {
    let h = f16::from_f32(v);
    b[off..off + 2].copy_from_slice(&h.to_le_bytes());
    h.to_f32()
}

/// Reads a little-endian f32 at `off`.
#[inline]
fn read_f32(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Reads a little-endian i16 at `off`.
#[inline]
fn read_i16(b: &[u8], off: usize) -> i16 {
    i16::from_le_bytes([b[off], b[off + 1]])
}

/// Rounds to the nearest integer, ties to even.
///
/// llama.cpp's `nearest_int` uses the "add 1.5·2^23" trick, which rounds in the FPU's default
/// mode (ties to even); matching it keeps our Q8_K activations byte-identical to llama.cpp's.
/// The `as i32` cast saturates (and maps NaN to 0), so this never panics.
#[inline]
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// Unpacks the eight 6-bit scales and eight 6-bit minimums of a Q4_K block.
///
/// Sub-blocks 0..4 keep their scale/min in the low 6 bits of bytes 0..4 / 4..8; sub-blocks
/// 4..8 store their low 4 bits as nibbles of bytes 8..12 and their top 2 bits in the spare
/// high bits of bytes 0..8.
#[inline]
fn unpack_q4k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
    }
    for j in 4..8 {
        sc[j] = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    (sc, mn)
}

/// Packs eight 6-bit scales and minimums into the 12-byte Q4_K layout (inverse of
/// [`unpack_q4k_scales`]). Inputs must already be in `0..64`.
#[inline]
fn pack_q4k_scales(sc: &[u8; 8], mn: &[u8; 8], s: &mut [u8]) {
    for j in 0..4 {
        s[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4);
    }
}

/// Decodes the 256 unsigned 4-bit quants of a Q4_K block into element order.
///
/// Each group of 64 elements uses 32 bytes: low nibbles are elements 0..32 of the group,
/// high nibbles elements 32..64.
#[inline]
fn unpack_q4k_quants(qs: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for g in 0..QK_K / 64 {
        for l in 0..32 {
            let b = qs[32 * g + l];
            q[64 * g + l] = b & 0xF;
            q[64 * g + 32 + l] = b >> 4;
        }
    }
    q
}

/// Decodes the 256 6-bit quants of a Q6_K block into element order, already re-centred to
/// the signed range `-32..32`.
///
/// Each half of 128 elements uses 64 `ql` bytes (low nibbles) and 32 `qh` bytes (four 2-bit
/// high parts per byte); see the module's format notes in [`dequantize_q6k`].
#[inline]
fn unpack_q6k_quants(ql: &[u8], qh: &[u8]) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for h in 0..2 {
        let ql = &ql[64 * h..64 * h + 64];
        let qh = &qh[32 * h..32 * h + 32];
        let y = &mut q[128 * h..128 * h + 128];
        for l in 0..32 {
            let hb = qh[l];
            // Each value is < 64, so the subtraction stays within i8.
            y[l] = ((ql[l] & 0xF) | ((hb & 3) << 4)) as i8 - 32;
            y[l + 32] = ((ql[l + 32] & 0xF) | (((hb >> 2) & 3) << 4)) as i8 - 32;
            y[l + 64] = ((ql[l] >> 4) | (((hb >> 4) & 3) << 4)) as i8 - 32;
            y[l + 96] = ((ql[l + 32] >> 4) | (((hb >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    q
}

/// Dequantizes Q4_K blocks into `out` (`blocks.len() == out.len() / 256 * 144`).
///
/// Element `i` of sub-block `j` (32 elements each) is `d * sc[j] * q - dmin * m[j]`, with the
/// 4-bit quant `q` taken from the nibble layout described in [`unpack_q4k_quants`].
pub(crate) fn dequantize_q4k(blocks: &[u8], out: &mut [f32]) {
    debug_assert_eq!(out.len() % QK_K, 0);
    debug_assert_eq!(blocks.len(), out.len() / QK_K * Q4K_BYTES);
    for (blk, y) in blocks.chunks_exact(Q4K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = read_f16(blk, Q4K_D);
        let dmin = read_f16(blk, Q4K_DMIN);
        let (sc, mn) = unpack_q4k_scales(&blk[Q4K_SCALES..Q4K_QS]);
        let q = unpack_q4k_quants(&blk[Q4K_QS..Q4K_BYTES]);
        for (j, (ys, qs)) in y.chunks_exact_mut(32).zip(q.chunks_exact(32)).enumerate() {
            let scale = d * f32::from(sc[j]);
            let min = dmin * f32::from(mn[j]);
            for (yv, &qv) in ys.iter_mut().zip(qs) {
                *yv = scale * f32::from(qv) - min;
            }
        }
    }
}

/// Dequantizes Q6_K blocks into `out` (`blocks.len() == out.len() / 256 * 210`).
///
/// Layout per half of 128 elements (`ql` advances 64 bytes, `qh` 32, scales 8): for
/// `l in 0..32`, elements `l`, `l+32`, `l+64`, `l+96` take their low nibble from
/// `ql[l] & 0xF`, `ql[l+32] & 0xF`, `ql[l] >> 4`, `ql[l+32] >> 4` and their top two bits from
/// bits 0-1, 2-3, 4-5, 6-7 of `qh[l]`. Every run of 16 consecutive elements shares one signed
/// scale, and the value is `d * scale * (q - 32)`.
pub(crate) fn dequantize_q6k(blocks: &[u8], out: &mut [f32]) {
    debug_assert_eq!(out.len() % QK_K, 0);
    debug_assert_eq!(blocks.len(), out.len() / QK_K * Q6K_BYTES);
    for (blk, y) in blocks.chunks_exact(Q6K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = read_f16(blk, Q6K_D);
        let q = unpack_q6k_quants(&blk[Q6K_QL..Q6K_QH], &blk[Q6K_QH..Q6K_SCALES]);
        let scales = &blk[Q6K_SCALES..Q6K_D];
        for (g, (ys, qs)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let scale = d * f32::from(scales[g] as i8);
            for (yv, &qv) in ys.iter_mut().zip(qs) {
                *yv = scale * f32::from(qv);
            }
        }
    }
}

/// Quantizes an activation row to Q8_K (`out.len() == x.len() / 256 * Q8K_BYTES`).
///
/// Follows llama.cpp's `quantize_row_q8_K_ref` exactly: the element of largest magnitude
/// (sign kept) maps to -127, so `d` carries the opposite sign of that element; other values
/// are rounded to nearest (ties to even) and clamped at +127. `bsums` caches the sum of each
/// run of 16 quants for the Q4_K minimum correction.
pub(crate) fn quantize_q8k(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len() % QK_K, 0);
    debug_assert_eq!(out.len(), x.len() / QK_K * Q8K_BYTES);
    for (xs, blk) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q8K_BYTES)) {
        let mut max = 0.0f32;
        let mut amax = 0.0f32;
        for &v in xs {
            let av = v.abs();
            if av > amax {
                amax = av;
                max = v;
            }
        }
        if amax == 0.0 {
            blk.fill(0);
            continue;
        }
        let iscale = -127.0f32 / max;
        let mut q = [0i8; QK_K];
        for (qv, &v) in q.iter_mut().zip(xs) {
            // The lower end cannot go past -127 because |v| <= amax; clamp anyway so
            // non-finite inputs cannot wrap.
            *qv = nearest_int(iscale * v).clamp(-128, 127) as i8;
        }
        blk[Q8K_D..Q8K_D + 4].copy_from_slice(&(1.0f32 / iscale).to_le_bytes());
        for (b, &qv) in blk[Q8K_QS..Q8K_BSUMS].iter_mut().zip(&q) {
            *b = qv as u8;
        }
        for (k, run) in q.chunks_exact(16).enumerate() {
            let sum: i16 = run.iter().map(|&v| i16::from(v)).sum();
            let off = Q8K_BSUMS + 2 * k;
            blk[off..off + 2].copy_from_slice(&sum.to_le_bytes());
        }
    }
}

/// Quantizes `x` to Q4_K (`out.len() == x.len() / 256 * 144`).
///
/// This is a simple, deterministic min/max encoder meant for building test fixtures; it does
/// not reproduce llama.cpp's iterative scale search, but its output is a valid Q4_K stream.
/// Each sub-block of 32 is mapped onto `[min(0, lo), hi]` in 15 steps (the format can only
/// subtract a non-negative minimum); the per-sub-block minimum and step are expressed as
/// 6-bit multiples of the f16 super-scales `dmin` and `d`, rounded up so the range is covered.
pub(crate) fn quantize_q4k(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len() % QK_K, 0);
    debug_assert_eq!(out.len(), x.len() / QK_K * Q4K_BYTES);
    for (xs, blk) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q4K_BYTES)) {
        let mut his = [0.0f32; 8];
        let mut mins = [0.0f32; 8];
        for (j, sub) in xs.chunks_exact(32).enumerate() {
            let lo = sub.iter().fold(0.0f32, |a, &v| a.min(v));
            his[j] = sub.iter().fold(lo, |a, &v| a.max(v));
            mins[j] = -lo;
        }
        // Round the minimums *up* so the lowest value of each sub-block stays representable,
        // then size each step to cover the rest of the range (also rounding up), so nothing
        // clips except through the final f16/6-bit rounding of the largest sub-block.
        let max_min = mins.iter().fold(0.0f32, |a, &v| a.max(v));
        let dmin = write_f16(blk, Q4K_DMIN, max_min / 63.0);
        let mut mn = [0u8; 8];
        let mut steps = [0.0f32; 8];
        for j in 0..8 {
            if dmin > 0.0 {
                mn[j] = (mins[j] / dmin).ceil().clamp(0.0, 63.0) as u8;
            }
            steps[j] = (his[j] + dmin * f32::from(mn[j])) / 15.0;
        }
        let max_step = steps.iter().fold(0.0f32, |a, &v| a.max(v));
        let d = write_f16(blk, Q4K_D, max_step / 63.0);
        let mut sc = [0u8; 8];
        if d > 0.0 {
            for (s, &st) in sc.iter_mut().zip(&steps) {
                *s = (st / d).ceil().clamp(0.0, 63.0) as u8;
            }
        }
        pack_q4k_scales(&sc, &mn, &mut blk[Q4K_SCALES..Q4K_QS]);

        // Quantize against the scales exactly as the decoder will reconstruct them.
        let mut q = [0u8; QK_K];
        for (j, (qs, sub)) in q.chunks_exact_mut(32).zip(xs.chunks_exact(32)).enumerate() {
            let scale = d * f32::from(sc[j]);
            let min = dmin * f32::from(mn[j]);
            if scale > 0.0 {
                for (qv, &v) in qs.iter_mut().zip(sub) {
                    *qv = nearest_int((v + min) / scale).clamp(0, 15) as u8;
                }
            }
        }
        let qs = &mut blk[Q4K_QS..Q4K_BYTES];
        for g in 0..QK_K / 64 {
            for l in 0..32 {
                qs[32 * g + l] = q[64 * g + l] | (q[64 * g + 32 + l] << 4);
            }
        }
    }
}

/// Quantizes `x` to Q6_K (`out.len() == x.len() / 256 * 210`).
///
/// Like [`quantize_q4k`], a simple deterministic encoder for test fixtures. Each run of 16
/// gets a signed step chosen so its largest-magnitude element maps to -32 (using the full
/// asymmetric 6-bit range, as llama.cpp does); the steps are then expressed as signed 8-bit
/// multiples of the f16 super-scale `d`.
pub(crate) fn quantize_q6k(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len() % QK_K, 0);
    debug_assert_eq!(out.len(), x.len() / QK_K * Q6K_BYTES);
    for (xs, blk) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q6K_BYTES)) {
        let mut steps = [0.0f32; 16];
        for (g, sub) in xs.chunks_exact(16).enumerate() {
            let mut max = 0.0f32;
            for &v in sub {
                if v.abs() > max.abs() {
                    max = v;
                }
            }
            steps[g] = max / -32.0;
        }
        let max_step = steps.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
        let d = write_f16(blk, Q6K_D, max_step / 127.0);

        let mut sc = [0i8; 16];
        if d > 0.0 {
            for (s, &st) in sc.iter_mut().zip(&steps) {
                *s = nearest_int(st / d).clamp(-127, 127) as i8;
            }
        }
        for (b, &s) in blk[Q6K_SCALES..Q6K_D].iter_mut().zip(&sc) {
            *b = s as u8;
        }

        // Unsigned quants (q + 32) in element order.
        let mut q = [32u8; QK_K];
        for (g, (qs, sub)) in q.chunks_exact_mut(16).zip(xs.chunks_exact(16)).enumerate() {
            let scale = d * f32::from(sc[g]);
            if scale != 0.0 {
                for (qv, &v) in qs.iter_mut().zip(sub) {
                    *qv = (nearest_int(v / scale).clamp(-32, 31) + 32) as u8;
                }
            }
        }
        let (ql, rest) = blk.split_at_mut(Q6K_QH);
        let qh = &mut rest[..Q6K_SCALES - Q6K_QH];
        for h in 0..2 {
            let y = &q[128 * h..128 * h + 128];
            let ql = &mut ql[64 * h..64 * h + 64];
            let qh = &mut qh[32 * h..32 * h + 32];
            for l in 0..32 {
                let (q1, q2, q3, q4) = (y[l], y[l + 32], y[l + 64], y[l + 96]);
                ql[l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
                ql[l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
                qh[l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
    }
}

/// Dot product of a Q4_K weight row with a Q8_K activation row (`n / 256` blocks each).
///
/// The reference order; SIMD kernels must reproduce it. Per block, all integer work is
/// exact (i32):
/// - `sumi  = Σ_j sc[j] * Σ_{32 elements of sub-block j} q4 * q8`
/// - `summs = Σ_j m[j] * (bsums[2j] + bsums[2j+1])`
///
/// then, in f32 with no fused multiply-add:
/// - `d    = a.d * f16(w.d)`, `dmin = a.d * f16(w.dmin)`
/// - `sumf = sumf + (d * sumi as f32 - dmin * summs as f32)`
///
/// with `sumf` starting at 0.0 and blocks accumulated sequentially in order.
pub(crate) fn vec_dot_q4k_q8k(w: &[u8], a: &[u8]) -> f32 {
    debug_assert_eq!(w.len() % Q4K_BYTES, 0);
    debug_assert_eq!(w.len() / Q4K_BYTES, a.len() / Q8K_BYTES);
    debug_assert_eq!(a.len() % Q8K_BYTES, 0);
    let mut sumf = 0.0f32;
    for (wb, ab) in w.chunks_exact(Q4K_BYTES).zip(a.chunks_exact(Q8K_BYTES)) {
        let (sc, mn) = unpack_q4k_scales(&wb[Q4K_SCALES..Q4K_QS]);
        let q4 = unpack_q4k_quants(&wb[Q4K_QS..Q4K_BYTES]);
        let q8 = &ab[Q8K_QS..Q8K_BSUMS];
        let mut sumi = 0i32;
        let mut summs = 0i32;
        for j in 0..8 {
            let dot: i32 = q4[32 * j..32 * j + 32]
                .iter()
                .zip(&q8[32 * j..32 * j + 32])
                .map(|(&w, &a)| i32::from(w) * i32::from(a as i8))
                .sum();
            sumi += i32::from(sc[j]) * dot;
            let bs = i32::from(read_i16(ab, Q8K_BSUMS + 4 * j)) + i32::from(read_i16(ab, Q8K_BSUMS + 4 * j + 2));
            summs += i32::from(mn[j]) * bs;
        }
        let ad = read_f32(ab, Q8K_D);
        let d = ad * read_f16(wb, Q4K_D);
        let dmin = ad * read_f16(wb, Q4K_DMIN);
        sumf += d * sumi as f32 - dmin * summs as f32;
    }
    sumf
}

/// Dot product of a Q6_K weight row with a Q8_K activation row (`n / 256` blocks each).
///
/// The reference order; SIMD kernels must reproduce it. Per block, the integer sum is exact
/// (i32): `isum = Σ_{g in 0..16} scales[g] * Σ_{16 elements of run g} (q6 - 32) * q8`; then,
/// in f32 with no fused multiply-add, `sumf = sumf + (f16(w.d) * a.d) * isum as f32`, with
/// `sumf` starting at 0.0 and blocks accumulated sequentially in order.
pub(crate) fn vec_dot_q6k_q8k(w: &[u8], a: &[u8]) -> f32 {
    debug_assert_eq!(w.len() % Q6K_BYTES, 0);
    debug_assert_eq!(w.len() / Q6K_BYTES, a.len() / Q8K_BYTES);
    debug_assert_eq!(a.len() % Q8K_BYTES, 0);
    let mut sumf = 0.0f32;
    for (wb, ab) in w.chunks_exact(Q6K_BYTES).zip(a.chunks_exact(Q8K_BYTES)) {
        let q6 = unpack_q6k_quants(&wb[Q6K_QL..Q6K_QH], &wb[Q6K_QH..Q6K_SCALES]);
        let q8 = &ab[Q8K_QS..Q8K_BSUMS];
        let scales = &wb[Q6K_SCALES..Q6K_D];
        let mut isum = 0i32;
        for g in 0..16 {
            let dot: i32 = q6[16 * g..16 * g + 16]
                .iter()
                .zip(&q8[16 * g..16 * g + 16])
                .map(|(&w, &a)| i32::from(w) * i32::from(a as i8))
                .sum();
            isum += i32::from(scales[g] as i8) * dot;
        }
        sumf += (read_f16(wb, Q6K_D) * read_f32(ab, Q8K_D)) * isum as f32;
    }
    sumf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiny deterministic LCG so tests need no `rand` dependency.
    struct Lcg(u64);

    impl Lcg {
        /// Uniform f32 in `[-1, 1)`.
        fn next_f32(&mut self) -> f32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// `n` pseudo-random values with varied per-32 magnitudes and, for some runs, an offset,
    /// so both the scale and the minimum paths of the encoders are exercised.
    fn data(seed: u64, n: usize) -> Vec<f32> {
        let mut r = Lcg(seed);
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            let run = i / 32;
            let mag = 0.05 + (run % 7) as f32 * 0.4;
            let off = if run % 3 == 0 { 0.5 * mag } else { 0.0 };
            v.push(r.next_f32() * mag + off);
        }
        v
    }

    fn dequantize_q8k(a: &[u8]) -> Vec<f32> {
        let mut out = Vec::new();
        for b in a.chunks_exact(Q8K_BYTES) {
            let d = read_f32(b, Q8K_D);
            out.extend(b[Q8K_QS..Q8K_BSUMS].iter().map(|&q| d * f32::from(q as i8)));
        }
        out
    }

    /// Checks per-block max error against `max_rel * block amax` and overall relative RMS.
    fn check_roundtrip(x: &[f32], y: &[f32], max_rel: f32, rms_rel: f64) {
        for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact(QK_K)) {
            let amax = xb.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
            for (&a, &b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= max_rel * amax, "x={a} y={b} amax={amax}");
            }
        }
        let err: f64 = x.iter().zip(y).map(|(&a, &b)| f64::from(a - b).powi(2)).sum();
        let sig: f64 = x.iter().map(|&a| f64::from(a).powi(2)).sum();
        let rel = (err / sig).sqrt();
        assert!(rel < rms_rel, "relative rms error {rel}");
    }

    #[test]
    fn q4k_roundtrip() {
        let n = 8 * QK_K;
        let x = data(1, n);
        let mut b = vec![0u8; n / QK_K * Q4K_BYTES];
        quantize_q4k(&x, &mut b);
        let mut y = vec![0.0f32; n];
        dequantize_q4k(&b, &mut y);
        // 4 bits: half a step is 1/30 of a sub-block's range, and a range is at most twice
        // the block's amax; uniform data gives ~0.055 relative RMS.
        check_roundtrip(&x, &y, 0.08, 0.07);
    }

    #[test]
    fn q6k_roundtrip() {
        let n = 8 * QK_K;
        let x = data(2, n);
        let mut b = vec![0u8; n / QK_K * Q6K_BYTES];
        quantize_q6k(&x, &mut b);
        let mut y = vec![0.0f32; n];
        dequantize_q6k(&b, &mut y);
        // 6 bits: half a step is 1/64 of a run's amax, plus 8-bit scale rounding.
        check_roundtrip(&x, &y, 0.035, 0.02);
    }

    #[test]
    fn q8k_roundtrip() {
        let n = 4 * QK_K;
        let x = data(3, n);
        let mut b = vec![0u8; n / QK_K * Q8K_BYTES];
        quantize_q8k(&x, &mut b);
        let y = dequantize_q8k(&b);
        check_roundtrip(&x, &y, 0.5 / 127.0 + 1e-6, 0.01);
        for blk in b.chunks_exact(Q8K_BYTES) {
            for k in 0..16 {
                let s: i32 = blk[Q8K_QS + 16 * k..Q8K_QS + 16 * k + 16].iter().map(|&q| i32::from(q as i8)).sum();
                assert_eq!(s, i32::from(read_i16(blk, Q8K_BSUMS + 2 * k)));
            }
        }
    }

    #[test]
    fn q8k_hand_block() {
        // max = -127/64 makes iscale exactly 64, so every product below is exact.
        let mut x = vec![0.0f32; QK_K];
        x[5] = -127.0 / 64.0;
        x[17] = 1.0; // 64
        x[40] = 0.5; // 32
        x[41] = 2.5 / 64.0; // 2.5: ties to even -> 2, as llama.cpp's nearest_int
        x[42] = -3.5 / 64.0; // -3.5 -> -4
        let mut b = vec![0u8; Q8K_BYTES];
        quantize_q8k(&x, &mut b);
        assert_eq!(read_f32(&b, Q8K_D), 1.0 / 64.0);
        let q = |i: usize| b[Q8K_QS + i] as i8;
        assert_eq!((q(5), q(17), q(40), q(41), q(42), q(0)), (-127, 64, 32, 2, -4, 0));
        assert_eq!(read_i16(&b, Q8K_BSUMS), -127);
        assert_eq!(read_i16(&b, Q8K_BSUMS + 2), 64);
        assert_eq!(read_i16(&b, Q8K_BSUMS + 4), 32 + 2 - 4);
        assert!((3..16).all(|k| read_i16(&b, Q8K_BSUMS + 2 * k) == 0));
    }

    #[test]
    fn zero_blocks() {
        let x = vec![0.0f32; 2 * QK_K];
        let mut y = vec![1.0f32; 2 * QK_K];

        let mut b4 = vec![0xAAu8; 2 * Q4K_BYTES];
        quantize_q4k(&x, &mut b4);
        dequantize_q4k(&b4, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));

        y.fill(1.0);
        let mut b6 = vec![0xAAu8; 2 * Q6K_BYTES];
        quantize_q6k(&x, &mut b6);
        dequantize_q6k(&b6, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));

        let mut b8 = vec![0xAAu8; 2 * Q8K_BYTES];
        quantize_q8k(&x, &mut b8);
        assert!(b8.iter().all(|&v| v == 0));

        assert_eq!(vec_dot_q4k_q8k(&b4, &b8), 0.0);
        assert_eq!(vec_dot_q6k_q8k(&b6, &b8), 0.0);

        // All-zero bytes are valid blocks that decode to zero.
        let z4 = vec![0u8; Q4K_BYTES];
        let z6 = vec![0u8; Q6K_BYTES];
        let mut y1 = vec![1.0f32; QK_K];
        dequantize_q4k(&z4, &mut y1);
        assert!(y1.iter().all(|&v| v == 0.0));
        y1.fill(1.0);
        dequantize_q6k(&z6, &mut y1);
        assert!(y1.iter().all(|&v| v == 0.0));

        // Empty inputs are fine too.
        assert_eq!(vec_dot_q4k_q8k(&[], &[]), 0.0);
        dequantize_q4k(&[], &mut []);
    }

    #[test]
    fn q4k_hand_block() {
        // sc = [1, 2, 3, 4, 21, 38, 63, 8], m = [5, 6, 7, 8, 25, 42, 48, 3], packed by hand.
        let scales = [0x41, 0x82, 0xC3, 0x04, 0x45, 0x86, 0xC7, 0x08, 0x95, 0xA6, 0x0F, 0x38];
        let mut blk = vec![0u8; Q4K_BYTES];
        blk[0..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        blk[2..4].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        blk[4..16].copy_from_slice(&scales);
        for i in 0..128 {
            blk[16 + i] = (i % 16) as u8 | ((15 - i % 16) as u8) << 4;
        }
        let (sc, mn) = unpack_q4k_scales(&scales);
        assert_eq!(sc, [1, 2, 3, 4, 21, 38, 63, 8]);
        assert_eq!(mn, [5, 6, 7, 8, 25, 42, 48, 3]);
        let mut packed = [0u8; 12];
        pack_q4k_scales(&sc, &mn, &mut packed);
        assert_eq!(packed, scales);

        let mut y = vec![0.0f32; QK_K];
        dequantize_q4k(&blk, &mut y);
        assert_eq!(y[0], -2.5); // sub 0, q=0: 1*0 - 0.5*5
        assert_eq!(y[33], 25.0); // sub 1, qs[1] high=14: 2*14 - 0.5*6
        assert_eq!(y[130], 29.5); // sub 4, qs[66] low=2: 21*2 - 0.5*25
        assert_eq!(y[170], 169.0); // sub 5, qs[74] high=5: 38*5 - 0.5*42
        assert_eq!(y[200], 480.0); // sub 6, qs[104] low=8: 63*8 - 0.5*48
        assert_eq!(y[255], -1.5); // sub 7, qs[127] high=0: 8*0 - 0.5*3
    }

    #[test]
    fn q6k_hand_block() {
        let mut blk = vec![0u8; Q6K_BYTES];
        for (i, b) in blk[..128].iter_mut().enumerate() {
            *b = i as u8; // ql
        }
        for i in 0..64 {
            blk[128 + i] = 0xE4; // qh: high bits 0, 1, 2, 3 for q1..q4
        }
        for g in 0..16 {
            blk[192 + g] = (g as i8 - 8) as u8; // scales -8..=7
        }
        blk[208..210].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        let mut y = vec![0.0f32; QK_K];
        dequantize_q6k(&blk, &mut y);
        assert_eq!(y[0], 64.0); // q=0-32, sc[0]=-8
        assert_eq!(y[37], 16.5); // ql[37]&15=5 | 1<<4 = 21 -> -11, sc[2]=-6
        assert_eq!(y[84], -0.75); // ql[20]>>4=1 | 2<<4 = 33 -> 1, sc[5]=-3
        assert_eq!(y[100], -9.0); // ql[36]>>4=2 | 3<<4 = 50 -> 18, sc[6]=-2
        assert_eq!(y[178], -10.5); // ql[114]&15=2 | 1<<4 = 18 -> -14, sc[11]=3
        assert_eq!(y[255], 40.25); // ql[127]>>4=7 | 3<<4 = 55 -> 23, sc[15]=7
    }

    fn f64_dot(w: &[f32], a: &[f32]) -> (f64, f64) {
        let dot = w.iter().zip(a).map(|(&w, &a)| f64::from(w) * f64::from(a)).sum();
        let mag = w.iter().zip(a).map(|(&w, &a)| (f64::from(w) * f64::from(a)).abs()).sum();
        (dot, mag)
    }

    #[test]
    fn vec_dot_matches_dequantized() {
        let n = 6 * QK_K;
        let nb = n / QK_K;
        for seed in 0..4 {
            let w = data(10 + seed, n);
            let act = data(100 + seed, n);
            let mut a = vec![0u8; nb * Q8K_BYTES];
            quantize_q8k(&act, &mut a);
            let ad = dequantize_q8k(&a);

            let mut w4 = vec![0u8; nb * Q4K_BYTES];
            quantize_q4k(&w, &mut w4);
            let mut wd = vec![0.0f32; n];
            dequantize_q4k(&w4, &mut wd);
            let (exact, mag) = f64_dot(&wd, &ad);
            let got = f64::from(vec_dot_q4k_q8k(&w4, &a));
            assert!((got - exact).abs() <= 1e-5 * mag, "q4k {got} vs {exact}");

            let mut w6 = vec![0u8; nb * Q6K_BYTES];
            quantize_q6k(&w, &mut w6);
            dequantize_q6k(&w6, &mut wd);
            let (exact, mag) = f64_dot(&wd, &ad);
            let got = f64::from(vec_dot_q6k_q8k(&w6, &a));
            assert!((got - exact).abs() <= 1e-5 * mag, "q6k {got} vs {exact}");
        }
    }

    #[test]
    fn vec_dot_accumulates_blocks_in_order() {
        let n = 5 * QK_K;
        let nb = n / QK_K;
        let w = data(7, n);
        let mut a = vec![0u8; nb * Q8K_BYTES];
        quantize_q8k(&data(8, n), &mut a);
        let mut w4 = vec![0u8; nb * Q4K_BYTES];
        quantize_q4k(&w, &mut w4);
        let mut w6 = vec![0u8; nb * Q6K_BYTES];
        quantize_q6k(&w, &mut w6);

        let mut s4 = 0.0f32;
        let mut s6 = 0.0f32;
        for i in 0..nb {
            let ab = &a[i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
            s4 += vec_dot_q4k_q8k(&w4[i * Q4K_BYTES..(i + 1) * Q4K_BYTES], ab);
            s6 += vec_dot_q6k_q8k(&w6[i * Q6K_BYTES..(i + 1) * Q6K_BYTES], ab);
        }
        assert_eq!(vec_dot_q4k_q8k(&w4, &a).to_bits(), s4.to_bits());
        assert_eq!(vec_dot_q6k_q8k(&w6, &a).to_bits(), s6.to_bits());
    }
}
