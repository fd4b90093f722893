//! Causal attention of one query row over its session's cached keys and values.
//!
//! Each (row, head) is computed on its own with a fixed summation order, so
//! a row's output never depends on the batch it came in.
//!
//! The cache holds f16 keys and values (`kv_cache::KvElem`). Queries and
//! the softmax's weights are rounded to f16 before they meet them, as in
//! llama.cpp's CPU path: the product of two f16 values is exact in f32, so
//! every multiply here is exact and only the adds round.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::kv_cache::KvElem;

#[cfg(target_arch = "x86_64")]
mod wide;

/// Shape of the attention computation.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

/// Rounds every element to the nearest f16 (ties to even), kept as f32:
/// what a query is before it meets the cached keys.
pub(crate) fn round_to_f16(x: &mut [f32]) {
    let mut h = [f16::ZERO; 64];
    for c in x.chunks_mut(64) {
        let h = &mut h[..c.len()];
        h.convert_from_f32_slice(c);
        h.convert_to_f32_slice(c);
    }
}

/// Softmax numerators times `inv`, then rounded to f16: the weights that
/// meet the cached values. One rule for every build, so all agree.
fn round_weights(scores: &mut [f32], inv: f32) {
    for s in scores.iter_mut() {
        *s *= inv;
    }
    round_to_f16(scores);
}

/// Dot product with a fixed order: eight lanes, then a fixed tree.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[KvElem]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l].to_f32();
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] += x * y.to_f32();
    }
    crate::kernels::lanes::tree8(acc)
}

/// [`dot`] of `a` with `K` vectors at once. Each result repeats `dot`'s
/// operations in `dot`'s order (so it is bit-identical); the `K` independent
/// chains let the CPU overlap their latencies, which one `dot` cannot.
#[inline(always)]
fn dots<const K: usize>(a: &[f32], b: [&[KvElem]; K]) -> [f32; K] {
    let n = b.iter().fold(a.len(), |n, v| n.min(v.len()));
    let full = n / 8 * 8;
    let mut acc = [[0.0f32; 8]; K];
    for c in (0..full).step_by(8) {
        let x = &a[c..c + 8];
        for (k, bk) in b.iter().enumerate() {
            let y = &bk[c..c + 8];
            for l in 0..8 {
                acc[k][l] += x[l] * y[l].to_f32();
            }
        }
    }
    for (k, bk) in b.iter().enumerate() {
        for l in 0..n - full {
            acc[k][l] += a[full + l] * bk[full + l].to_f32();
        }
    }
    acc.map(crate::kernels::lanes::tree8)
}

/// The part of a session's cache one query row may see.
#[derive(Debug, Clone, Copy)]
pub struct Visible<'a> {
    /// Cached keys, `tokens × kv_dim` or more.
    pub keys: &'a [KvElem],
    /// Cached values, same layout.
    pub values: &'a [KvElem],
    /// How many leading cached tokens the row attends to (its position + 1).
    pub tokens: usize,
}

/// Attention for one head of one row: `q` is that head's query, `seen` the
/// cache it attends over. `scores` is scratch of at least `seen.tokens`.
///
/// On x86-64 CPUs with AVX2 the same code runs compiled for AVX2: each of
/// the eight accumulator lanes and each output element sees exactly the same
/// f32 operations in the same order (Rust never fuses a multiply and an add),
/// only eight lanes fit one register instead of two, so results are
/// bit-identical to the baseline build.
pub fn attend_head(shape: AttnShape, head: usize, q: &[f32], seen: Visible<'_>, scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: AVX2 and F16C were detected on this CPU.
        unsafe { attend_head_avx2(shape, head, q, seen, scores, out) };
        return;
    }
    attend_head_body::<Portable>(shape, head, q, seen, scores, out);
}

/// The three inner loops of one head's attention, so the scalar reference
/// and the AVX2 build share one body.
trait HeadKernels {
    /// `dot(a, b[k])` for eight keys.
    fn dots8(a: &[f32], b: [&[KvElem]; 8]) -> [f32; 8];
    /// `crate::kernels::softmax::softmax_scalar`.
    fn softmax(scores: &mut [f32]) -> f32;
    /// [`weigh_values`].
    fn weigh(weights: &[f32], values: &[KvElem], stride: usize, out: &mut [f32]);
}

/// The reference kernels.
struct Portable;

impl HeadKernels for Portable {
    fn dots8(a: &[f32], b: [&[KvElem]; 8]) -> [f32; 8] {
        dots(a, b)
    }
    fn softmax(scores: &mut [f32]) -> f32 {
        crate::kernels::softmax::softmax_scalar(scores)
    }
    fn weigh(weights: &[f32], values: &[KvElem], stride: usize, out: &mut [f32]) {
        weigh_values(weights, values, stride, out);
    }
}

/// The AVX2 kernels; only used where AVX2 and F16C were detected.
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl HeadKernels for Avx2 {
    #[inline(always)]
    fn dots8(a: &[f32], b: [&[KvElem]; 8]) -> [f32; 8] {
        // SAFETY: `Avx2` is used only inside `attend_head_avx2`, after detection.
        unsafe { dots_avx2(a, b) }
    }
    #[inline(always)]
    fn softmax(scores: &mut [f32]) -> f32 {
        crate::kernels::softmax::softmax(scores)
    }
    #[inline(always)]
    fn weigh(weights: &[f32], values: &[KvElem], stride: usize, out: &mut [f32]) {
        // SAFETY: as above.
        unsafe { weigh_values_avx2(weights, values, stride, out) }
    }
}

/// [`attend_head`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn attend_head_avx2(
    shape: AttnShape,
    head: usize,
    q: &[f32],
    seen: Visible<'_>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_head_body::<Avx2>(shape, head, q, seen, scores, out);
}

/// `out[o] = Σ_t weights[t] * values[t * stride + o]`, summed in `t`
/// order from zero, one output element at a time: the reference the SIMD
/// form repeats.
fn weigh_values(weights: &[f32], values: &[KvElem], stride: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (t, &w) in weights.iter().enumerate() {
        let v = &values[t * stride..][..out.len()];
        for (o, &x) in out.iter_mut().zip(v) {
            *o += w * x.to_f32();
        }
    }
}

/// [`weigh_values`] with AVX2: each output element sees the same multiply
/// and add in the same `t` order, but 64 outputs at a time stay in eight
/// registers across the whole pass over `t`. (The compiled portable loop
/// stored and reloaded `out` for every token, so each token waited on the
/// previous one's stores: a third of batch-16 decode time.)
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn weigh_values_avx2(weights: &[f32], values: &[KvElem], stride: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = out.len();
    assert!(weights.is_empty() || values.len() >= (weights.len() - 1) * stride + hd, "values too short");
    /// One pass over every token for `R` registers of outputs from `c`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn pass<const R: usize>(weights: &[f32], values: &[KvElem], stride: usize, c: usize, out: &mut [f32]) {
        let mut acc = [_mm256_setzero_ps(); R];
        for (t, &w) in weights.iter().enumerate() {
            let w = _mm256_set1_ps(w);
            // SAFETY: the caller checked `values` holds `out.len()` after every `t * stride`, and `c + 8R <= out.len()`.
            let v = unsafe { values.as_ptr().add(t * stride + c) };
            for (r, a) in acc.iter_mut().enumerate() {
                // Eight f16s widened exactly to f32.
                let x = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(v.add(8 * r).cast()) });
                *a = _mm256_add_ps(*a, _mm256_mul_ps(w, x));
            }
        }
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: `c + 8R <= out.len()`.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * r), *a) };
        }
    }
    let mut c = 0;
    // SAFETY (every pass): AVX2 and F16C are enabled, and each pass stays below `hd`.
    while c + 64 <= hd {
        unsafe { pass::<8>(weights, values, stride, c, out) };
        c += 64;
    }
    while c + 8 <= hd {
        unsafe { pass::<1>(weights, values, stride, c, out) };
        c += 8;
    }
    if c < hd {
        weigh_values(weights, &values[c..], stride, &mut out[c..]);
    }
}

/// [`dots`] of `K` vectors with AVX2 intrinsics: lane `l` of each register
/// is `dot`'s `acc[l]`, updated by the same multiply and add, and the final
/// tree is `dot`'s `((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))`.
/// (The autovectoriser turned the portable form into shuffles.)
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn dots_avx2<const K: usize>(a: &[f32], b: [&[KvElem]; K]) -> [f32; K] {
    use std::arch::x86_64::*;
    let n = b.iter().fold(a.len(), |n, v| n.min(v.len()));
    let full = n / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); K];
    for c in (0..full).step_by(8) {
        // SAFETY: `c + 8 <= full <= len` of `a` and of every `b[k]`.
        unsafe {
            let x = _mm256_loadu_ps(a.as_ptr().add(c));
            for (k, bk) in b.iter().enumerate() {
                let y = _mm256_cvtph_ps(_mm_loadu_si128(bk.as_ptr().add(c).cast()));
                acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(x, y));
            }
        }
    }
    if full == n {
        if let Ok(eight) = <[__m256; 8]>::try_from(&acc[..]) {
            let mut out = [0.0f32; K];
            // SAFETY: AVX2 is enabled here; `out` holds K = 8 f32s.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), trees8(eight)) };
            return out;
        }
    }
    std::array::from_fn(|k| {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds eight f32s.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[k]) };
        for l in 0..n - full {
            lanes[l] += a[full + l] * b[k][full + l].to_f32();
        }
        crate::kernels::lanes::tree8(lanes)
    })
}

/// `dot`'s final tree `((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))`
/// of eight accumulators at once, lane `k` of the result for `acc[k]`:
/// the same adds, paired by shuffles instead of one key at a time through
/// memory.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn trees8(acc: [std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // b[k] = [a0+a4, a1+a5, a2+a6, a3+a7] of key k (low half), of key k+4 (high half).
    let b: [__m256; 4] = std::array::from_fn(|k| {
        let low = _mm256_permute2f128_ps::<0x20>(acc[k], acc[k + 4]);
        let high = _mm256_permute2f128_ps::<0x31>(acc[k], acc[k + 4]);
        _mm256_add_ps(low, high)
    });
    // hadd(x, y) = [x0+x1, x2+x3, y0+y1, y2+y3] per 128-bit half.
    let pairs01 = _mm256_hadd_ps(b[0], b[1]);
    let pairs23 = _mm256_hadd_ps(b[2], b[3]);
    _mm256_hadd_ps(pairs01, pairs23)
}

#[inline(always)]
fn attend_head_body<K: HeadKernels>(
    shape: AttnShape,
    head: usize,
    q: &[f32],
    seen: Visible<'_>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (hd, kv_dim) = (shape.head_dim, shape.kv_heads * shape.head_dim);
    let kvh = head / (shape.heads / shape.kv_heads);
    let inv = score_head::<K>(shape, head, q, seen, scores);
    round_weights(&mut scores[..seen.tokens], inv);
    K::weigh(&scores[..seen.tokens], &seen.values[kvh * hd..], kv_dim, &mut out[..hd]);
}

/// One head's scaled scores against the cache in `scores[..tokens]`,
/// softmaxed in place; returns the factor that normalises them.
#[inline(always)]
#[allow(clippy::cast_precision_loss)]
fn score_head<K: HeadKernels>(shape: AttnShape, head: usize, q: &[f32], seen: Visible<'_>, scores: &mut [f32]) -> f32 {
    let hd = shape.head_dim;
    let kv_dim = shape.kv_heads * hd;
    let kvh = head / (shape.heads / shape.kv_heads);
    let scale = 1.0 / (hd as f32).sqrt();
    let Visible { keys, tokens, .. } = seen;
    let scores = &mut scores[..tokens];
    let key = |t: usize| &keys[t * kv_dim + kvh * hd..][..hd];
    let mut t = 0;
    // Eight keys at a time: eight independent add chains hide the adds' latency.
    while t + 8 <= tokens {
        let d = K::dots8(q, std::array::from_fn(|i| key(t + i)));
        for (s, d) in scores[t..t + 8].iter_mut().zip(d) {
            *s = d * scale;
        }
        t += 8;
    }
    for (t, s) in scores.iter_mut().enumerate().skip(t) {
        *s = dot(q, key(t)) * scale;
    }
    K::softmax(scores)
}

/// Attention for every query head that shares key/value head `kv_head`
/// (grouped-query attention): `q` holds those heads' queries one after
/// another, `out` receives their outputs the same way, and `scores` is
/// scratch of at least `heads per group × seen.tokens`. Each head's output
/// equals [`attend_head`]'s bit for bit.
///
/// Why: with AVX-512 and 64-wide heads, two heads share each 512-bit score
/// register, and the value pass reads each cached value row once for the
/// whole group, keeping every head's 64 sums in 512-bit registers: about
/// half the instructions of one head at a time.
///
/// `ahead` is the cache the caller's next call for this key/value head will
/// read (the next row's), if it knows it: the AVX-512 path requests it from
/// memory while this call computes. It cannot change any result.
pub fn attend_group(
    shape: AttnShape,
    kv_head: usize,
    q: &[f32],
    seen: Visible<'_>,
    ahead: Option<Visible<'_>>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (g, hd, tokens) = (shape.heads / shape.kv_heads.max(1), shape.head_dim, seen.tokens);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ahead;
    #[cfg(target_arch = "x86_64")]
    if hd == 64
        && (1..=4).contains(&g)
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("f16c")
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        // SAFETY: AVX2, F16C and AVX-512 F were detected on this CPU.
        unsafe { wide::attend_group(shape, kv_head, q, seen, ahead, scores, out) };
        return;
    }
    for j in 0..g {
        let head = kv_head * g + j;
        attend_head(
            shape,
            head,
            &q[j * hd..(j + 1) * hd],
            seen,
            &mut scores[j * tokens..],
            &mut out[j * hd..(j + 1) * hd],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x` rounded to f16, as the cache holds it.
    fn h(x: &[f32]) -> Vec<KvElem> {
        x.iter().map(|&v| f16::from_f32(v)).collect()
    }

    /// Values in `[-scale/2, scale/2)` from a fixed LCG, `n` at a time.
    #[allow(clippy::cast_precision_loss)]
    fn noise(seed: u64, scale: f32) -> impl FnMut(usize) -> Vec<f32> {
        let mut s = seed;
        move |n| {
            (0..n)
                .map(|_| {
                    s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
                })
                .collect()
        }
    }

    #[test]
    fn single_token_returns_its_value() {
        let shape = AttnShape { heads: 2, kv_heads: 1, head_dim: 2 };
        let mut out = [0.0; 2];
        let mut scores = [0.0; 1];
        attend_head(
            shape,
            1,
            &[1.0, 2.0],
            Visible { keys: &h(&[3.0, 4.0]), values: &h(&[5.0, 6.0]), tokens: 1 },
            &mut scores,
            &mut out,
        );
        assert_eq!(out, [5.0, 6.0]);
    }

    #[test]
    fn dots_equal_dot_bit_for_bit() {
        let mut v = noise(7, 10.0);
        for n in [1, 7, 8, 13, 64, 100] {
            let a = v(n);
            let b: Vec<Vec<KvElem>> = (0..4).map(|_| h(&v(n))).collect();
            let got = dots(&a, [&b[0][..], &b[1][..], &b[2][..], &b[3][..]]);
            for (g, bk) in got.iter().zip(&b) {
                assert_eq!(g.to_bits(), dot(&a, bk).to_bits(), "n={n}");
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 was detected.
                let wide = unsafe { dots_avx2(&a, [&b[0][..], &b[1][..], &b[2][..], &b[3][..]]) };
                assert_eq!(wide.map(f32::to_bits), got.map(f32::to_bits), "avx2 n={n}");
                // Eight keys: the shuffled tree when `n` is a multiple of 8.
                let b8: Vec<Vec<KvElem>> = (0..8).map(|_| h(&v(n))).collect();
                let eight = unsafe { dots_avx2(&a, std::array::from_fn::<_, 8, _>(|k| &b8[k][..])) };
                for (g, bk) in eight.iter().zip(&b8) {
                    assert_eq!(g.to_bits(), dot(&a, bk).to_bits(), "avx2 eight n={n}");
                }
            }
        }
    }

    /// The dispatched build (AVX2 where the CPU has it) equals the baseline
    /// build bit for bit on random inputs and cache lengths.
    #[test]
    fn dispatched_equals_baseline_bit_for_bit() {
        let mut v = noise(11, 6.0);
        // Head widths that cover the 64-wide, 8-wide and scalar value passes.
        for hd in [64, 84, 12] {
            let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: hd };
            for tokens in [1, 3, 4, 8, 17, 130] {
                let keys = h(&v(tokens * 2 * hd));
                let values = h(&v(tokens * 2 * hd));
                for head in [0, 4] {
                    let q = v(hd);
                    let seen = Visible { keys: &keys, values: &values, tokens };
                    let (mut s1, mut s2) = (vec![0.0; tokens], vec![0.0; tokens]);
                    let (mut o1, mut o2) = (vec![0.0f32; hd], vec![0.0f32; hd]);
                    attend_head(shape, head, &q, seen, &mut s1, &mut o1);
                    attend_head_body::<Portable>(shape, head, &q, seen, &mut s2, &mut o2);
                    let bits = |o: &[f32]| o.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&o1), bits(&o2), "hd={hd} tokens={tokens} head={head}");
                }
            }
        }
    }

    /// A group of query heads attended together equals each head alone,
    /// bit for bit, for AVX-512's 64-wide path and the fallback.
    #[test]
    fn a_group_equals_its_heads_alone() {
        let mut v = noise(23, 6.0);
        for (heads, kv_heads, hd) in [(9, 3, 64), (4, 1, 64), (6, 3, 64), (2, 2, 64), (6, 2, 12), (10, 2, 64)] {
            let shape = AttnShape { heads, kv_heads, head_dim: hd };
            let g = heads / kv_heads;
            for tokens in [1, 2, 5, 7, 8, 15, 33, 71, 100] {
                let keys = h(&v(tokens * kv_heads * hd));
                let values = h(&v(tokens * kv_heads * hd));
                let seen = Visible { keys: &keys, values: &values, tokens };
                for kvh in 0..kv_heads {
                    let q = v(g * hd);
                    let mut scores = vec![0.0; g * tokens];
                    let mut out = vec![f32::NAN; g * hd];
                    attend_group(shape, kvh, &q, seen, Some(seen), &mut scores, &mut out);
                    for j in 0..g {
                        let (mut s, mut alone) = (vec![0.0; tokens], vec![0.0f32; hd]);
                        attend_head(shape, kvh * g + j, &q[j * hd..(j + 1) * hd], seen, &mut s, &mut alone);
                        let bits = |o: &[f32]| o.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&out[j * hd..(j + 1) * hd]),
                            bits(&alone),
                            "{shape:?} t={tokens} kvh={kvh} j={j}"
                        );
                    }
                }
            }
        }
    }

    /// The softmax's weights meet the values as f16: with two tokens whose
    /// weights are 1/3 and 2/3, the output is the f16-rounded weights'
    /// combination, not the exact thirds'.
    #[test]
    fn weights_are_rounded_to_f16_before_the_values() {
        let shape = AttnShape { heads: 1, kv_heads: 1, head_dim: 1 };
        // Scores 0 and ln 2 (key 1, query ln 2, scale 1 at width 1): weights 1/3, 2/3.
        let (keys, values) = (h(&[0.0, 1.0]), h(&[3.0, 3.0]));
        let q = [f16::from_f32(std::f32::consts::LN_2).to_f32()];
        let (mut scores, mut out) = ([0.0; 2], [0.0]);
        attend_head(shape, 0, &q, Visible { keys: &keys, values: &values, tokens: 2 }, &mut scores, &mut out);
        let w: Vec<f32> = scores.iter().map(|&s| f16::from_f32(s).to_f32()).collect();
        assert_eq!(scores.to_vec(), w, "the weights left in `scores` are f16 values");
        assert_eq!(out[0], w[0] * 3.0 + w[1] * 3.0);
        assert!((out[0] - 3.0).abs() < 3e-3, "the weights still sum to about one: {}", out[0]);
    }

    #[test]
    fn round_to_f16_rounds_ties_to_even_at_any_length() {
        let tie = 1.0 + f32::powi(2.0, -11);
        let above = 1.0 + f32::powi(2.0, -11) + f32::powi(2.0, -20);
        for n in [1, 7, 64, 65, 130] {
            let mut x: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { tie } else { above }).collect();
            round_to_f16(&mut x);
            for (i, v) in x.iter().enumerate() {
                let want = if i % 2 == 0 { 1.0 } else { 1.0 + f32::powi(2.0, -10) };
                assert_eq!(*v, want, "n={n} i={i}");
            }
        }
    }

    #[test]
    fn equal_keys_average_values() {
        let shape = AttnShape { heads: 1, kv_heads: 1, head_dim: 2 };
        let mut out = [0.0; 2];
        let mut scores = [0.0; 2];
        let (keys, values) = (h(&[1.0, 0.0, 1.0, 0.0]), h(&[2.0, 0.0, 4.0, 8.0]));
        let seen = Visible { keys: &keys, values: &values, tokens: 2 };
        attend_head(shape, 0, &[1.0, 1.0], seen, &mut scores, &mut out);
        assert_eq!(out, [3.0, 4.0]);
    }
}
