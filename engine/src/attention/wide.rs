//! Grouped attention for 64-wide heads with AVX-512: two heads' scores per
//! 512-bit register, and one pass over the values for the whole group.
//!
//! Every result repeats the reference's operations in the reference's
//! order: a 512-bit register here is two of the reference's eight-lane
//! accumulators side by side, and shuffles inside each 256-bit half pair
//! lanes exactly as the AVX2 tree does. So the output equals one head at a
//! time bit for bit; the gain is half the instructions per score.

use std::arch::x86_64::*;

use super::{round_weights, score_head, AttnShape, Avx2, HeadKernels, Visible};
use crate::kv_cache::KvElem;

/// [`super::attend_group`] for 64-wide heads, 1 to 4 per group.
///
/// # Safety
/// The CPU must have AVX2, F16C and AVX-512 F.
#[target_feature(enable = "avx2,f16c,avx512f")]
pub(super) unsafe fn attend_group(
    shape: AttnShape,
    kv_head: usize,
    q: &[f32],
    seen: Visible<'_>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (g, tokens) = (shape.heads / shape.kv_heads, seen.tokens);
    assert!(q.len() >= g * 64 && scores.len() >= g * tokens, "group buffers too short");
    let stride = shape.kv_heads * 64;
    let keys = &seen.keys[kv_head * 64..];
    #[allow(clippy::cast_precision_loss)]
    let scale = 1.0 / 64f32.sqrt();
    let mut inv = [0.0f32; 4];
    let mut j = 0;
    while j + 2 <= g {
        let (sa, sb) = scores[j * tokens..(j + 2) * tokens].split_at_mut(tokens);
        let values = &seen.values[kv_head * 64..];
        // SAFETY: AVX-512 F is enabled here; `score_pair` checks its bounds.
        let done = unsafe {
            score_pair([&q[j * 64..(j + 1) * 64], &q[(j + 1) * 64..(j + 2) * 64]], keys, values, stride, scale, sa, sb)
        };
        for (h, s) in [(j, sa), (j + 1, sb)] {
            let qh = &q[h * 64..(h + 1) * 64];
            for (t, s) in s.iter_mut().enumerate().take(tokens).skip(done) {
                *s = super::dot(qh, &keys[t * stride..][..64]) * scale;
            }
            inv[h] = Avx2::softmax(&mut s[..tokens]);
        }
        j += 2;
    }
    if j < g {
        inv[j] = score_head::<Avx2>(shape, kv_head * g + j, &q[j * 64..(j + 1) * 64], seen, &mut scores[j * tokens..]);
    }
    for (h, &inv) in inv.iter().enumerate().take(g) {
        round_weights(&mut scores[h * tokens..(h + 1) * tokens], inv);
    }
    let values = &seen.values[kv_head * 64..];
    // SAFETY (each call): AVX-512 F is enabled here; `weigh_group` checks its bounds.
    unsafe {
        match g {
            1 => weigh_group::<1>(scores, tokens, values, keys, stride, out),
            2 => weigh_group::<2>(scores, tokens, values, keys, stride, out),
            3 => weigh_group::<3>(scores, tokens, values, keys, stride, out),
            _ => weigh_group::<4>(scores, tokens, values, keys, stride, out),
        }
    }
}

/// Scaled scores of heads `qa` and `qb` against the same keys, eight keys
/// at a time, into `sa` and `sb`; returns how many leading tokens it
/// scored (a multiple of eight: the caller scores the rest).
///
/// Lane `l` of the low half is `dot`'s `acc[l]` for `qa`, of the high half
/// for `qb`: the key's eight floats are broadcast to both halves, so each
/// half sees the reference's multiply and add.
///
/// It also asks for each scored token's values (this head's 128 bytes):
/// the value pass that follows found them in memory, a third of its time
/// waiting, and the scoring now hides most of that wait (2% fewer cycles
/// at batch 16).
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f")]
unsafe fn score_pair(
    [qa, qb]: [&[f32]; 2],
    keys: &[KvElem],
    values: &[KvElem],
    stride: usize,
    scale: f32,
    sa: &mut [f32],
    sb: &mut [f32],
) -> usize {
    assert!(qa.len() >= 64 && qb.len() >= 64, "64-wide heads");
    let tokens = sa.len().min(sb.len());
    assert!(tokens == 0 || keys.len() >= (tokens - 1) * stride + 64, "keys too short");
    // SAFETY: both queries hold 64 floats (checked above).
    let q: [__m512; 8] = std::array::from_fn(|c| unsafe {
        let (a, b) = (_mm256_loadu_ps(qa.as_ptr().add(8 * c)), _mm256_loadu_ps(qb.as_ptr().add(8 * c)));
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castpd256_pd512(_mm256_castps_pd(a)), _mm256_castps_pd(b)))
    });
    let scale = _mm512_set1_ps(scale);
    let mut t = 0;
    while t + 8 <= tokens {
        let mut acc = [_mm512_setzero_ps(); 8];
        // Prefetches never fault; the addresses are never dereferenced here.
        for k in 0..8 {
            for l in 0..2 {
                _mm_prefetch::<_MM_HINT_T0>(values.as_ptr().wrapping_add((t + k) * stride + 32 * l).cast());
            }
        }
        for (c, &qc) in q.iter().enumerate() {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: key `t + k < tokens` has 64 f16s at `(t + k) * stride` (checked above).
                let key = unsafe { broadcast8(keys.as_ptr().add((t + k) * stride + 8 * c)) };
                *a = _mm512_add_ps(*a, _mm512_mul_ps(qc, key));
            }
        }
        let s = _mm512_mul_ps(trees8(acc), scale);
        // SAFETY: `t + 8 <= tokens <= len` of both score slices.
        unsafe {
            _mm256_storeu_ps(sa.as_mut_ptr().add(t), _mm512_castps512_ps256(s));
            _mm256_storeu_ps(
                sb.as_mut_ptr().add(t),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s))),
            );
        }
        t += 8;
    }
    t
}

/// The eight f16s at `p`, widened exactly to f32, in both 256-bit halves.
///
/// # Safety
/// Eight f16s must be readable at `p`.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f")]
unsafe fn broadcast8(p: *const KvElem) -> __m512 {
    // SAFETY: the caller guarantees 16 readable bytes at `p`.
    _mm512_cvtph_ps(_mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p.cast()) }))
}

/// `super::trees8` in each 256-bit half: lane `k` of the low half is key
/// `k`'s tree of the low halves of `acc[k]`, likewise for the high half.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f")]
fn trees8(acc: [__m512; 8]) -> __m512 {
    // Per half: `permute2f128` 0x20 and 0x31 of (acc[k], acc[k + 4]).
    let lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    let hi = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    let b: [__m512; 4] = std::array::from_fn(|k| {
        _mm512_add_ps(_mm512_permutex2var_ps(acc[k], lo, acc[k + 4]), _mm512_permutex2var_ps(acc[k], hi, acc[k + 4]))
    });
    hadd(hadd(b[0], b[1]), hadd(b[2], b[3]))
}

/// AVX2's `hadd` in every 128-bit lane: `[x0+x1, x2+x3, y0+y1, y2+y3]`.
/// The same sums: IEEE addition is commutative bit for bit.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f")]
fn hadd(x: __m512, y: __m512) -> __m512 {
    let even = _mm512_shuffle_ps::<0b10_00_10_00>(x, y);
    let odd = _mm512_shuffle_ps::<0b11_01_11_01>(x, y);
    _mm512_add_ps(even, odd)
}

/// [`super::weigh_values`] for `G` heads of width 64 at once: head `j`'s
/// weights are `weights[j * tokens..][..tokens]` and its output
/// `out[64 j..64 (j + 1)]`; `keys` (laid out as `values`) is only
/// prefetched. Each output element sees the same multiply and
/// add in the same `t` order as the reference; each value row is loaded
/// once for all `G` heads.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f")]
unsafe fn weigh_group<const G: usize>(
    weights: &[f32],
    tokens: usize,
    values: &[KvElem],
    keys: &[KvElem],
    stride: usize,
    out: &mut [f32],
) {
    assert!(weights.len() >= G * tokens && out.len() >= G * 64, "group buffers too short");
    assert!(tokens == 0 || values.len() >= (tokens - 1) * stride + 64, "values too short");
    let mut acc = [[_mm512_setzero_ps(); 4]; G];
    for t in 0..tokens {
        // SAFETY: checked above: 64 f16s at `t * stride`, widened exactly.
        let v: [__m512; 4] = std::array::from_fn(|r| unsafe {
            _mm512_cvtph_ps(_mm256_loadu_si256(values.as_ptr().add(t * stride + 16 * r).cast()))
        });
        // The next unit of work is usually the next key/value head of the
        // same row: its 64 f16s of this token follow ours. Asking for them
        // now hides part of its cache misses (1.5% fewer cycles at batch 8).
        // Prefetches never fault; the address is never dereferenced here.
        for l in 0..2 {
            _mm_prefetch::<_MM_HINT_T0>(values.as_ptr().wrapping_add(t * stride + 64 + 32 * l).cast());
            _mm_prefetch::<_MM_HINT_T0>(keys.as_ptr().wrapping_add(t * stride + 64 + 32 * l).cast());
        }
        for (j, acc) in acc.iter_mut().enumerate() {
            let w = _mm512_set1_ps(weights[j * tokens + t]);
            for (a, &x) in acc.iter_mut().zip(&v) {
                *a = _mm512_add_ps(*a, _mm512_mul_ps(w, x));
            }
        }
    }
    for (j, acc) in acc.iter().enumerate() {
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: `out` holds `G * 64` floats (checked above).
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(j * 64 + 16 * r), *a) };
        }
    }
}
