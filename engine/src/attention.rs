//! Causal attention of one query row over its session's cached keys and values.
//!
//! Each (row, head) is computed on its own with a fixed summation order, so
//! a row's output never depends on the batch it came in.

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

/// Dot product with a fixed order: eight lanes, then a fixed tree.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// [`dot`] of `a` with `K` vectors at once. Each result repeats `dot`'s
/// operations in `dot`'s order (so it is bit-identical); the `K` independent
/// chains let the CPU overlap their latencies, which one `dot` cannot.
#[inline(always)]
fn dots<const K: usize>(a: &[f32], b: [&[f32]; K]) -> [f32; K] {
    let n = b.iter().fold(a.len(), |n, v| n.min(v.len()));
    let full = n / 8 * 8;
    let mut acc = [[0.0f32; 8]; K];
    for c in (0..full).step_by(8) {
        let x = &a[c..c + 8];
        for (k, bk) in b.iter().enumerate() {
            let y = &bk[c..c + 8];
            for l in 0..8 {
                acc[k][l] += x[l] * y[l];
            }
        }
    }
    for (k, bk) in b.iter().enumerate() {
        for l in 0..n - full {
            acc[k][l] += a[full + l] * bk[full + l];
        }
    }
    acc.map(|a| ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])))
}

/// The part of a session's cache one query row may see.
#[derive(Debug, Clone, Copy)]
pub struct Visible<'a> {
    /// Cached keys, `tokens × kv_dim` or more.
    pub keys: &'a [f32],
    /// Cached values, same layout.
    pub values: &'a [f32],
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
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected on this CPU.
        unsafe { attend_head_avx2(shape, head, q, seen, scores, out) };
        return;
    }
    attend_head_body(shape, head, q, seen, scores, out, dots::<4>);
}

/// [`attend_head`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_head_avx2(
    shape: AttnShape,
    head: usize,
    q: &[f32],
    seen: Visible<'_>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    // SAFETY: AVX2 is enabled on this function.
    attend_head_body(shape, head, q, seen, scores, out, |a, b| unsafe { dots4_avx2(a, b) });
}

/// [`dots`] of four vectors with AVX2 intrinsics: lane `l` of each register
/// is `dot`'s `acc[l]`, updated by the same multiply and add, and the final
/// tree is `dot`'s `((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))`.
/// (The autovectoriser turned the portable form into shuffles.)
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dots4_avx2(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = b.iter().fold(a.len(), |n, v| n.min(v.len()));
    let full = n / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); 4];
    for c in (0..full).step_by(8) {
        // SAFETY: `c + 8 <= full <= len` of `a` and of every `b[k]`.
        unsafe {
            let x = _mm256_loadu_ps(a.as_ptr().add(c));
            for (k, bk) in b.iter().enumerate() {
                acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(x, _mm256_loadu_ps(bk.as_ptr().add(c))));
            }
        }
    }
    std::array::from_fn(|k| {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds eight f32s.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[k]) };
        for l in 0..n - full {
            lanes[l] += a[full + l] * b[k][full + l];
        }
        ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
    })
}

#[inline(always)]
#[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
fn attend_head_body(
    shape: AttnShape,
    head: usize,
    q: &[f32],
    seen: Visible<'_>,
    scores: &mut [f32],
    out: &mut [f32],
    dots4: impl Fn(&[f32], [&[f32]; 4]) -> [f32; 4],
) {
    let hd = shape.head_dim;
    let kv_dim = shape.kv_heads * hd;
    let kvh = head / (shape.heads / shape.kv_heads);
    let scale = 1.0 / (hd as f32).sqrt();
    let Visible { keys, values, tokens } = seen;
    let scores = &mut scores[..tokens];
    let key = |t: usize| &keys[t * kv_dim + kvh * hd..][..hd];
    let mut t = 0;
    while t + 4 <= tokens {
        let d = dots4(q, [key(t), key(t + 1), key(t + 2), key(t + 3)]);
        for (s, d) in scores[t..t + 4].iter_mut().zip(d) {
            *s = d * scale;
        }
        t += 4;
    }
    for (t, s) in scores.iter_mut().enumerate().skip(t) {
        *s = dot(q, key(t)) * scale;
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0.0f64;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += f64::from(*s);
    }
    let inv = (1.0 / sum) as f32;
    out.fill(0.0);
    for (t, &s) in scores.iter().enumerate() {
        let w = s * inv;
        let v = &values[t * kv_dim + kvh * hd..][..hd];
        for (o, &x) in out.iter_mut().zip(v) {
            *o += w * x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Visible { keys: &[3.0, 4.0], values: &[5.0, 6.0], tokens: 1 },
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
            let b: Vec<Vec<f32>> = (0..4).map(|_| v(n)).collect();
            let got = dots(&a, [&b[0][..], &b[1][..], &b[2][..], &b[3][..]]);
            for (g, bk) in got.iter().zip(&b) {
                assert_eq!(g.to_bits(), dot(&a, bk).to_bits(), "n={n}");
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 was detected.
                let wide = unsafe { dots4_avx2(&a, [&b[0][..], &b[1][..], &b[2][..], &b[3][..]]) };
                assert_eq!(wide.map(f32::to_bits), got.map(f32::to_bits), "avx2 n={n}");
            }
        }
    }

    /// The dispatched build (AVX2 where the CPU has it) equals the baseline
    /// build bit for bit on random inputs and cache lengths.
    #[test]
    fn dispatched_equals_baseline_bit_for_bit() {
        let mut v = noise(11, 6.0);
        let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: 64 };
        for tokens in [1, 3, 4, 17, 130] {
            let keys = v(tokens * 128);
            let values = v(tokens * 128);
            for head in [0, 4] {
                let q = v(64);
                let seen = Visible { keys: &keys, values: &values, tokens };
                let (mut s1, mut s2) = (vec![0.0; tokens], vec![0.0; tokens]);
                let (mut o1, mut o2) = (vec![0.0f32; 64], vec![0.0f32; 64]);
                attend_head(shape, head, &q, seen, &mut s1, &mut o1);
                attend_head_body(shape, head, &q, seen, &mut s2, &mut o2, dots::<4>);
                let bits = |o: &[f32]| o.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&o1), bits(&o2), "tokens={tokens} head={head}");
            }
        }
    }

    #[test]
    fn equal_keys_average_values() {
        let shape = AttnShape { heads: 1, kv_heads: 1, head_dim: 2 };
        let mut out = [0.0; 2];
        let mut scores = [0.0; 2];
        let seen = Visible { keys: &[1.0, 0.0, 1.0, 0.0], values: &[2.0, 0.0, 4.0, 8.0], tokens: 2 };
        attend_head(shape, 0, &[1.0, 1.0], seen, &mut scores, &mut out);
        assert_eq!(out, [3.0, 4.0]);
    }
}
