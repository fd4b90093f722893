//! K-quant formats (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and their 8-bit activation partner Q8_K.
//!
//! These are the "super-block" quantization formats used by GGUF files: every block covers
//! [`QK_K`] = 256 weights and carries one or two f16 super-scales plus small per-sub-block
//! integer scales. The byte layouts here are bit-compatible with llama.cpp, so blocks can be
//! read straight out of a memory-mapped GGUF tensor without any repacking.
//!
//! Matrix-vector products never dequantize the weights: the activation row is quantized to
//! Q8_K once, and each format's `vec_dot_*_q8k` then works on integers per block, touching
//! floats only once per 256 elements. The scalar code in these modules is the *reference*:
//! its floating-point accumulation order is fixed and documented so that faster SIMD kernels
//! can be checked against it bit for bit.
//!
//! All multi-byte fields are little-endian and parsed from byte slices explicitly (no
//! `unsafe`, no transmutes), so this code is correct on any host byte order.
//!
//! One file per format; every item other modules use is re-exported here, so callers name
//! `kquant::Q4K_BYTES` or `kquant::vec_dot_q5k_q8k` whatever file holds it.

mod q2k;
mod q3k;
mod q4k;
mod q5k;
mod q6k;
mod q8k;

use half::f16;

pub(crate) use q2k::{dequantize_q2k, quantize_q2k, vec_dot_q2k_q8k, Q2K_BYTES};
pub(crate) use q3k::{dequantize_q3k, quantize_q3k, vec_dot_q3k_q8k, Q3K_BYTES};
pub(crate) use q4k::{dequantize_q4k, quantize_q4k, vec_dot_q4k_q8k, Q4K_BYTES};
pub(crate) use q5k::{dequantize_q5k, quantize_q5k, vec_dot_q5k_q8k, Q5K_BYTES};
pub(crate) use q6k::{dequantize_q6k, quantize_q6k, vec_dot_q6k_q8k, Q6K_BYTES};
pub(crate) use q8k::{dequantize_q8k, quantize_q8k, Q8K_BYTES};

/// Elements per K-quant super-block; fixed by the GGUF format.
pub(crate) const QK_K: usize = 256;

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

/// Exact integer dot product of weight quants (already decoded to signed or unsigned
/// integers in element order) with Q8_K activation quants (`a`, raw bytes of `i8`).
#[inline]
fn dot_i32<Q: Copy + Into<i32>>(w: &[Q], a: &[u8]) -> i32 {
    w.iter().zip(a).map(|(&w, &a)| w.into() * i32::from(a as i8)).sum()
}

/// Unpacks the eight 6-bit scales and eight 6-bit minimums that Q4_K and Q5_K share
/// (ggml's `get_scale_min_k4`).
///
/// Sub-blocks 0..4 keep their scale/min in the low 6 bits of bytes 0..4 / 4..8; sub-blocks
/// 4..8 store their low 4 bits as nibbles of bytes 8..12 and their top 2 bits in the spare
/// high bits of bytes 0..8.
#[inline]
fn unpack_scales_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
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

/// Packs eight 6-bit scales and minimums into the 12-byte Q4_K/Q5_K layout (inverse of
/// [`unpack_scales_k4`]). Inputs must already be in `0..64`.
#[inline]
fn pack_scales_k4(sc: &[u8; 8], mn: &[u8; 8], s: &mut [u8]) {
    for j in 0..4 {
        s[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4);
    }
}

/// Per-run scales of an "affine" K-quant block (Q2_K, Q4_K, Q5_K), whose element `i` of run
/// `j` decodes as `d * sc[j] * q - dmin * mn[j]`, as chosen by [`affine_runs`].
struct AffineRuns<const N: usize> {
    /// f16-rounded super-scale of the steps.
    d: f32,
    /// f16-rounded super-scale of the minimums.
    dmin: f32,
    /// Integer step multiplier of each run.
    sc: [u8; N],
    /// Integer minimum multiplier of each run.
    mn: [u8; N],
}

impl<const N: usize> AffineRuns<N> {
    /// Chooses scales for `N` equal runs of `xs` with quants in `0..=levels` and integer
    /// multipliers in `0..=max_code`: a simple, deterministic min/max encoder for test
    /// fixtures (not llama.cpp's iterative search), whose output is a valid block.
    ///
    /// Each run is mapped onto `[min(0, lo), hi]` (the format can only subtract a
    /// non-negative minimum). The minimums are rounded *up* to multiples of `dmin` so the
    /// lowest value of each run stays representable; each step is then sized to cover the
    /// rest of the range (also rounding up), so nothing clips except through the f16
    /// rounding of the super-scales.
    fn choose(xs: &[f32], levels: f32, max_code: f32) -> Self {
        let run = xs.len() / N;
        let mut his = [0.0f32; N];
        let mut mins = [0.0f32; N];
        for (j, sub) in xs.chunks_exact(run).enumerate() {
            let lo = sub.iter().fold(0.0f32, |a, &v| a.min(v));
            his[j] = sub.iter().fold(lo, |a, &v| a.max(v));
            mins[j] = -lo;
        }
        let max_min = mins.iter().fold(0.0f32, |a, &v| a.max(v));
        let dmin = f16::from_f32(max_min / max_code).to_f32();
        let mut mn = [0u8; N];
        let mut steps = [0.0f32; N];
        for j in 0..N {
            if dmin > 0.0 {
                mn[j] = (mins[j] / dmin).ceil().clamp(0.0, max_code) as u8;
            }
            steps[j] = (his[j] + dmin * f32::from(mn[j])) / levels;
        }
        let max_step = steps.iter().fold(0.0f32, |a, &v| a.max(v));
        let d = f16::from_f32(max_step / max_code).to_f32();
        let mut sc = [0u8; N];
        if d > 0.0 {
            for (s, &st) in sc.iter_mut().zip(&steps) {
                *s = (st / d).ceil().clamp(0.0, max_code) as u8;
            }
        }
        Self { d, dmin, sc, mn }
    }

    /// Quantizes `xs` against these scales exactly as the decoder reconstructs them, into
    /// unsigned quants in element order (0 where a run's step is zero).
    fn quants(&self, xs: &[f32], levels: i32, q: &mut [u8]) {
        let run = xs.len() / N;
        for (j, (qs, sub)) in q.chunks_exact_mut(run).zip(xs.chunks_exact(run)).enumerate() {
            let scale = self.d * f32::from(self.sc[j]);
            let min = self.dmin * f32::from(self.mn[j]);
            if scale > 0.0 {
                for (qv, &v) in qs.iter_mut().zip(sub) {
                    *qv = nearest_int((v + min) / scale).clamp(0, levels) as u8;
                }
            } else {
                qs.fill(0);
            }
        }
    }
}

/// The formats that share Q4_K's header, `f16 d; f16 dmin; u8 scales[12]` (six-bit scales
/// and minimums of eight sub-blocks of 32, see [`unpack_scales_k4`]), and differ only in how
/// their quants follow it: Q4_K and Q5_K.
struct K4Layout {
    /// Bytes per block.
    bytes: usize,
    /// The block's 256 unsigned quants in element order, from the bytes after the header.
    quants: fn(&[u8]) -> [u8; QK_K],
}

impl K4Layout {
    /// Offset of the f16 super-scale `d`.
    const D: usize = 0;
    /// Offset of the f16 super-minimum `dmin`.
    const DMIN: usize = 2;
    /// Offset of the 12 packed scale/minimum bytes.
    const SCALES: usize = 4;
    /// Offset of the quants.
    const QUANTS: usize = 16;

    /// Decodes blocks into `out`: element `i` of sub-block `j` is `d * sc[j] * q - dmin * m[j]`
    /// (ggml's `dequantize_row_q4_K` / `_q5_K`).
    fn dequantize(&self, blocks: &[u8], out: &mut [f32]) {
        debug_assert_eq!(out.len() % QK_K, 0);
        debug_assert_eq!(blocks.len(), out.len() / QK_K * self.bytes);
        for (blk, y) in blocks.chunks_exact(self.bytes).zip(out.chunks_exact_mut(QK_K)) {
            let d = read_f16(blk, Self::D);
            let dmin = read_f16(blk, Self::DMIN);
            let (sc, mn) = unpack_scales_k4(&blk[Self::SCALES..Self::QUANTS]);
            let q = (self.quants)(&blk[Self::QUANTS..]);
            for (j, (ys, qs)) in y.chunks_exact_mut(32).zip(q.chunks_exact(32)).enumerate() {
                let scale = d * f32::from(sc[j]);
                let min = dmin * f32::from(mn[j]);
                for (yv, &qv) in ys.iter_mut().zip(qs) {
                    *yv = scale * f32::from(qv) - min;
                }
            }
        }
    }

    /// Writes the header of an encoded block; the caller writes the quants.
    fn write_header(blk: &mut [u8], runs: &AffineRuns<8>) {
        write_f16(blk, Self::D, runs.d);
        write_f16(blk, Self::DMIN, runs.dmin);
        pack_scales_k4(&runs.sc, &runs.mn, &mut blk[Self::SCALES..Self::QUANTS]);
    }

    /// The reference dot product with a Q8_K row, in the order `vec_dot_q4k_q8k` documents.
    fn vec_dot(&self, w: &[u8], a: &[u8]) -> f32 {
        debug_assert_eq!(w.len() % self.bytes, 0);
        debug_assert_eq!(w.len() / self.bytes, a.len() / Q8K_BYTES);
        debug_assert_eq!(a.len() % Q8K_BYTES, 0);
        let mut sumf = 0.0f32;
        for (wb, ab) in w.chunks_exact(self.bytes).zip(a.chunks_exact(Q8K_BYTES)) {
            let (sc, mn) = unpack_scales_k4(&wb[Self::SCALES..Self::QUANTS]);
            let q = (self.quants)(&wb[Self::QUANTS..]);
            let q8 = &ab[q8k::Q8K_QS..q8k::Q8K_BSUMS];
            let mut sumi = 0i32;
            let mut summs = 0i32;
            for j in 0..8 {
                sumi += i32::from(sc[j]) * dot_i32(&q[32 * j..32 * j + 32], &q8[32 * j..32 * j + 32]);
                summs += i32::from(mn[j]) * q8k::bsum32(ab, j);
            }
            let (wd, wdmin) = (read_f16(wb, Self::D), read_f16(wb, Self::DMIN));
            sumf += affine_block_sum(read_f32(ab, q8k::Q8K_D), wd, wdmin, sumi, summs);
        }
        sumf
    }
}

/// The f32 tail every "affine" K-quant dot product (Q2_K, Q4_K, Q5_K) shares, in this
/// order and with no fused multiply-add: `d = a.d * f16(w.d)`, `dmin = a.d * f16(w.dmin)`,
/// then `d * sumi - dmin * summs`.
#[inline]
fn affine_block_sum(ad: f32, wd: f32, wdmin: f32, sumi: i32, summs: i32) -> f32 {
    let d = ad * wd;
    let dmin = ad * wdmin;
    d * sumi as f32 - dmin * summs as f32
}

#[cfg(test)]
mod tests {
    //! Test data and checks the format modules share.

    pub(super) use super::q8k::tests::dequantize_q8k;

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
    pub(super) fn data(seed: u64, n: usize) -> Vec<f32> {
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

    /// Checks per-block max error against `max_rel * block amax` and overall relative RMS.
    pub(super) fn check_roundtrip(x: &[f32], y: &[f32], max_rel: f32, rms_rel: f64) {
        for (xb, yb) in x.chunks_exact(super::QK_K).zip(y.chunks_exact(super::QK_K)) {
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

    /// The exact dot product of two decoded rows, and the sum of the products' magnitudes
    /// (the scale a float error bound is relative to).
    pub(super) fn f64_dot(w: &[f32], a: &[f32]) -> (f64, f64) {
        let dot = w.iter().zip(a).map(|(&w, &a)| f64::from(w) * f64::from(a)).sum();
        let mag = w.iter().zip(a).map(|(&w, &a)| (f64::from(w) * f64::from(a)).abs()).sum();
        (dot, mag)
    }

    /// A format's encoder, decoder and dot product, for the checks every K-quant shares.
    pub(super) struct Format {
        pub(super) bytes: usize,
        pub(super) quantize: fn(&[f32], &mut [u8]),
        pub(super) dequantize: fn(&[u8], &mut [f32]),
        pub(super) vec_dot: fn(&[u8], &[u8]) -> f32,
    }

    impl Format {
        /// Encodes and decodes `x`.
        pub(super) fn round_trip(&self, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
            let mut b = vec![0u8; x.len() / super::QK_K * self.bytes];
            (self.quantize)(x, &mut b);
            let mut y = vec![0.0f32; x.len()];
            (self.dequantize)(&b, &mut y);
            (b, y)
        }

        /// The reference dot product equals the f64 dot product of the decoded weights and
        /// decoded activations up to float rounding, and sums its blocks in order (a row's
        /// result is the in-order f32 sum of its blocks' results), bit for bit.
        pub(super) fn check_vec_dot(&self) {
            let nb = 5;
            let n = nb * super::QK_K;
            for seed in 0..4 {
                let (w, wd) = self.round_trip(&data(10 + seed, n));
                let mut a = vec![0u8; nb * super::Q8K_BYTES];
                super::quantize_q8k(&data(100 + seed, n), &mut a);
                let ad = dequantize_q8k(&a);
                let (exact, mag) = f64_dot(&wd, &ad);
                let got = f64::from((self.vec_dot)(&w, &a));
                assert!((got - exact).abs() <= 1e-5 * mag, "{got} vs {exact}");

                let mut sum = 0.0f32;
                for (wb, ab) in w.chunks_exact(self.bytes).zip(a.chunks_exact(super::Q8K_BYTES)) {
                    sum += (self.vec_dot)(wb, ab);
                }
                assert_eq!((self.vec_dot)(&w, &a).to_bits(), sum.to_bits());
            }
        }

        /// All-zero input encodes to blocks that decode to zero and dot to zero, whatever
        /// the output buffer held before; empty rows are fine too.
        pub(super) fn check_zero(&self) {
            let x = vec![0.0f32; 2 * super::QK_K];
            let mut b = vec![0xAAu8; 2 * self.bytes];
            (self.quantize)(&x, &mut b);
            let mut y = vec![1.0f32; x.len()];
            (self.dequantize)(&b, &mut y);
            assert!(y.iter().all(|&v| v == 0.0));
            let mut a = vec![0u8; 2 * super::Q8K_BYTES];
            super::quantize_q8k(&data(5, x.len()), &mut a);
            assert_eq!((self.vec_dot)(&b, &a), 0.0);
            assert_eq!((self.vec_dot)(&[], &[]), 0.0);
            (self.dequantize)(&[], &mut []);
        }
    }
}
