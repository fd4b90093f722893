//! Grouped attention for 64-wide heads with AVX-512: two heads' scores per
//! 512-bit register, and one pass over the values for the whole group.
//!
//! Every result repeats the reference's operations in the reference's
//! order: a 512-bit register here is two of the reference's eight-lane
//! accumulators side by side, and shuffles inside each 256-bit half pair
//! lanes exactly as the AVX2 tree does. So the output equals one head at a
//! time bit for bit; the gain is half the instructions per score.

use std::arch::x86_64::*;

use super::{round_weights, AttnShape, Avx2, HeadKernels, Visible};
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
    ahead: Option<Visible<'_>>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (g, tokens) = (shape.heads / shape.kv_heads, seen.tokens);
    assert!(q.len() >= g * 64 && scores.len() >= g * tokens, "group buffers too short");
    let stride = shape.kv_heads * 64;
    let keys = &seen.keys[kv_head * 64..];
    #[allow(clippy::cast_precision_loss)]
    let scale = 1.0 / 64f32.sqrt();
    let values = &seen.values[kv_head * 64..];
    let scale_v = _mm512_set1_ps(scale);
    let mut t = 0;
    while t < tokens {
        // Eight keys a block; the last block may hold fewer.
        let valid = (tokens - t).min(8);
        // This head's values for the same tokens, for the value pass: it
        // found them in memory, a third of its time waiting. Prefetches
        // never fault; the addresses are never dereferenced here.
        for k in 0..valid {
            for l in 0..2 {
                _mm_prefetch::<_MM_HINT_T0>(values.as_ptr().wrapping_add((t + k) * stride + 32 * l).cast());
            }
        }
        // SAFETY (each call): AVX-512 F is enabled here; `score_block` checks its bounds.
        unsafe {
            match g {
                1 => score_block::<1>(q, keys, stride, t, valid, scale_v, scores, tokens),
                2 => score_block::<2>(q, keys, stride, t, valid, scale_v, scores, tokens),
                3 => score_block::<3>(q, keys, stride, t, valid, scale_v, scores, tokens),
                _ => score_block::<4>(q, keys, stride, t, valid, scale_v, scores, tokens),
            }
        }
        t += valid;
    }
    // Each head's weights.
    for h in 0..g {
        let s = &mut scores[h * tokens..(h + 1) * tokens];
        let inv = Avx2::softmax(s);
        round_weights(s, inv);
    }
    let ahead = ahead.map_or(Ahead { keys: keys.as_ptr(), values: values.as_ptr(), tokens: 0 }, |a| Ahead {
        keys: a.keys.as_ptr().wrapping_add(kv_head * 64),
        values: a.values.as_ptr().wrapping_add(kv_head * 64),
        tokens: a.tokens,
    });
    // SAFETY (each call): AVX-512 F is enabled here; `weigh_group` checks its bounds.
    unsafe {
        match g {
            1 => weigh_group::<1>(scores, tokens, values, ahead, stride, out),
            2 => weigh_group::<2>(scores, tokens, values, ahead, stride, out),
            3 => weigh_group::<3>(scores, tokens, values, ahead, stride, out),
            _ => weigh_group::<4>(scores, tokens, values, ahead, stride, out),
        }
    }
}

/// Where the next call's keys and values for this head begin, and how many
/// tokens it has: only ever prefetched, never read.
#[derive(Clone, Copy)]
struct Ahead {
    keys: *const KvElem,
    values: *const KvElem,
    tokens: usize,
}

impl Ahead {
    /// Requests token `t`'s 64 keys and 64 values (two lines each).
    /// Prefetches never fault; the addresses are never dereferenced.
    #[inline]
    #[target_feature(enable = "avx2,f16c,avx512f")]
    fn request(self, t: usize, stride: usize) {
        for l in 0..2 {
            _mm_prefetch::<_MM_HINT_T0>(self.keys.wrapping_add(t * stride + 32 * l).cast());
            _mm_prefetch::<_MM_HINT_T0>(self.values.wrapping_add(t * stride + 32 * l).cast());
        }
    }
}

/// Scaled scores of the group's `G` heads (`q`, 64 floats each) against
/// keys `t..t + valid` (`valid` at most 8), into `scores[h * tokens +
/// t..][..valid]` for head `h`. A short block (a row's last tokens) fills
/// its empty places with its last key and drops their scores: before, those
/// tokens went one at a time through the scalar `dot`, a quarter of this
/// function's time at batch 16.
///
/// Two keys share a register: the low half holds key `2p`'s eight
/// accumulator lanes, the high half key `2p + 1`'s, and the query's eight
/// floats are broadcast to both halves, so lane `l` of each half is the
/// reference `dot`'s `acc[l]`, updated by the same multiply and add in the
/// same order. Each key is loaded and widened once for every head of the
/// group, and no head's register is half wasted, as when heads were paired
/// instead (the odd third head of SmolLM2's groups filled one alone).
///
/// # Safety
/// The CPU must have AVX2, F16C and AVX-512 F.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f")]
#[allow(clippy::too_many_arguments)] // One block's operands.
unsafe fn score_block<const G: usize>(
    q: &[f32],
    keys: &[KvElem],
    stride: usize,
    t: usize,
    valid: usize,
    scale: __m512,
    scores: &mut [f32],
    tokens: usize,
) {
    assert!((1..=8).contains(&valid), "a block holds one to eight keys");
    assert!(q.len() >= G * 64 && keys.len() >= (t + valid - 1) * stride + 64, "block operands too short");
    assert!(t + valid <= tokens && scores.len() >= (G - 1) * tokens + t + valid, "scores too short");
    let mut acc = [[_mm512_setzero_ps(); 4]; G];
    for r in 0..4 {
        // Chunks 2r and 2r + 1 (eight floats each) of every head's query, in both halves.
        // SAFETY: `h * 64 + 16 r + 8 i + 8 <= G * 64 <= q.len()` (checked above).
        let qc: [[__m512; 2]; G] = std::array::from_fn(|h| {
            std::array::from_fn(|i| unsafe {
                _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(
                    q.as_ptr().add(h * 64 + 16 * r + 8 * i).cast(),
                )))
            })
        });
        for p in 0..4 {
            // Floats 16r..16r + 16 of keys 2p and 2p + 1, widened exactly.
            // SAFETY: both keys are below `t + valid` (clamped; checked above).
            let (a, b) = unsafe {
                let at = |k: usize| keys.as_ptr().add((t + k.min(valid - 1)) * stride + 16 * r).cast::<__m256i>();
                (_mm512_cvtph_ps(_mm256_loadu_si256(at(2 * p))), _mm512_cvtph_ps(_mm256_loadu_si256(at(2 * p + 1))))
            };
            // Chunk 2r of both keys, then chunk 2r + 1 (128-bit blocks 0, 1 and 2, 3 of each).
            let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
            let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
            for (acc, qc) in acc.iter_mut().zip(&qc) {
                acc[p] = _mm512_add_ps(acc[p], _mm512_mul_ps(qc[0], lo));
                acc[p] = _mm512_add_ps(acc[p], _mm512_mul_ps(qc[1], hi));
            }
        }
    }
    for (h, acc) in acc.iter().enumerate() {
        let s = _mm256_mul_ps(key_trees(*acc), _mm512_castps512_ps256(scale));
        let at = h * tokens + t;
        if valid == 8 {
            // SAFETY: `h * tokens + t + 8 <= scores.len()` (checked above).
            unsafe { _mm256_storeu_ps(scores.as_mut_ptr().add(at), s) };
        } else {
            let mut all = [0.0f32; 8];
            // SAFETY: `all` holds eight floats.
            unsafe { _mm256_storeu_ps(all.as_mut_ptr(), s) };
            scores[at..at + valid].copy_from_slice(&all[..valid]);
        }
    }
}

/// The reference `dot`'s final tree, `((a0 + a4) + (a1 + a5)) +
/// ((a2 + a6) + (a3 + a7))`, for eight keys held two per register as
/// [`score_block`] holds them: lane `k` of the result is key `k`'s. The
/// same adds, paired by shuffles (IEEE addition is commutative bit for bit).
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f")]
fn key_trees(acc: [__m512; 4]) -> __m256 {
    // Per key: [a0+a4, a1+a5, a2+a6, a3+a7] in both 128-bit blocks of its half.
    let b: [__m512; 4] =
        std::array::from_fn(|p| _mm512_add_ps(acc[p], _mm512_shuffle_f32x4::<0b10_11_00_01>(acc[p], acc[p])));
    // Block i: keys i (x) and i + 4 (y).
    let x = _mm512_shuffle_f32x4::<0b10_00_10_00>(b[0], b[1]);
    let y = _mm512_shuffle_f32x4::<0b10_00_10_00>(b[2], b[3]);
    // Block i: [key i's two pair sums, key i + 4's], then [key i, key i + 4, ...].
    let sums = hadd(x, y);
    let keys = hadd(sums, sums);
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_castps512_ps256(_mm512_permutexvar_ps(order, keys))
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
/// `out[64 j..64 (j + 1)]`. The next call's cache (`ahead`) is requested
/// token by token alongside. Each output element sees the same multiply and
/// add in the same `t` order as the reference; each value row is loaded
/// once for all `G` heads.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f")]
unsafe fn weigh_group<const G: usize>(
    weights: &[f32],
    tokens: usize,
    values: &[KvElem],
    ahead: Ahead,
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
        if t < ahead.tokens {
            ahead.request(t, stride);
        }
        for (j, acc) in acc.iter_mut().enumerate() {
            let w = _mm512_set1_ps(weights[j * tokens + t]);
            for (a, &x) in acc.iter_mut().zip(&v) {
                *a = _mm512_add_ps(*a, _mm512_mul_ps(w, x));
            }
        }
    }
    for t in tokens..ahead.tokens {
        ahead.request(t, stride);
    }
    for (j, acc) in acc.iter().enumerate() {
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: `out` holds `G * 64` floats (checked above).
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(j * 64 + 16 * r), *a) };
        }
    }
}
