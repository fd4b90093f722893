//! Choosing the next token from logits.
//!
//! Order of operations (llama.cpp's default chain): penalties over the
//! session's history, then top-k, top-p and min-p over the temperature-scaled
//! distribution, then a seeded draw. Temperature 0 is greedy and ignores the
//! truncations. Log-probabilities are always of the unmodified distribution,
//! as the OpenAI API reports them.

use std::collections::HashMap;

use crate::error::{EngineError, Result};
use crate::rng::Rng;

/// Per-request sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p ×` the best one (0 = off).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of seen tokens (1 = off).
    pub repetition_penalty: f32,
    /// Subtract once from every seen token's logit (0 = off).
    pub presence_penalty: f32,
    /// Subtract per occurrence (0 = off).
    pub frequency_penalty: f32,
    /// Seed of the draw; the same seed gives the same tokens.
    pub seed: u64,
    /// How many alternatives to report log-probabilities for (0 = none).
    pub top_logprobs: usize,
    /// Whether to compute the sampled token's log-probability. A softmax over
    /// the whole vocabulary costs about as much as the lm_head, so it is only
    /// paid when asked for (`top_logprobs > 0` implies it).
    pub logprobs: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            top_logprobs: 0,
            logprobs: false,
        }
    }
}

impl SamplingParams {
    /// Rejects settings that have no meaning.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(EngineError::Sampling(m.into()));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature must be a finite number ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty must be > 0");
        }
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return bad("penalties must be finite");
        }
        if self.top_logprobs > 20 {
            return bad("top_logprobs must be at most 20");
        }
        Ok(())
    }
}

/// The chosen token and what the client may want to know about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The token id.
    pub token: u32,
    /// Its log-probability under the unmodified distribution (NaN unless `logprobs` was asked for).
    pub logprob: f32,
    /// The most likely alternatives and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// A session's sampler: its parameters and its random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
}

impl Sampler {
    /// A sampler whose draws are fixed by `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self { params })
    }

    /// Picks the next token. `history` holds the tokens penalties look at.
    #[allow(clippy::cast_possible_truncation)]
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Sampled {
        let p = self.params.clone();
        // A copy only when penalties change it: a vocabulary of floats per row adds up.
        let mut l = std::borrow::Cow::Borrowed(logits);
        if p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let l = l.to_mut();
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &t in history {
                *counts.entry(t).or_default() += 1;
            }
            for (&t, &n) in &counts {
                let Some(v) = l.get_mut(t as usize) else { continue };
                if *v > 0.0 {
                    *v /= p.repetition_penalty;
                } else {
                    *v *= p.repetition_penalty;
                }
                #[allow(clippy::cast_precision_loss)]
                {
                    *v -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        let l = &l[..];
        // The draw depends only on the seed and the position (the history's length), not on how many
        // draws came before: a session replayed on a new pipeline continues exactly where it was.
        let token = if p.temperature == 0.0 { argmax(l) } else { self.draw(l, history.len()) };
        let (logprob, top) = if p.logprobs || p.top_logprobs > 0 {
            log_probs(logits, token, p.top_logprobs)
        } else {
            (f32::NAN, Vec::new())
        };
        Sampled { token, logprob, top }
    }

    /// A seeded draw from the temperature-scaled distribution, truncated by
    /// top-k, top-p and min-p. Only as much of the vocabulary is sorted as the
    /// truncations can keep (a few dozen tokens, typically, not 50,000), and
    /// with no truncation nothing is sorted at all.
    #[allow(clippy::cast_possible_truncation)]
    fn draw(&self, l: &[f32], position: usize) -> u32 {
        let p = &self.params;
        let mut rng = Rng::new(p.seed ^ (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            if let Some(max) = max_unless_nan(l) {
                return Self::draw_all(l, max, p.temperature, rng.next_f64());
            }
        }
        let mut cand: Vec<(u32, f32)> =
            l.iter().enumerate().filter(|(_, v)| !v.is_nan()).map(|(i, &v)| (i as u32, v / p.temperature)).collect();
        if cand.is_empty() {
            return argmax(l);
        }
        // Stable order: by logit descending, ties by id, so draws are reproducible.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, order);
            cand.truncate(p.top_k);
        }
        let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        // Single-precision exp (arguments are ≤ 0, results in [0, 1]) summed in f64, far below the
        // draw's resolution. The engine's own `exp` is plain arithmetic, so the pass over the whole
        // vocabulary vectorises (libm's was a call per token: a third of the last stage's time when
        // serving 16 streams), and the f64 sum runs on eight fixed lanes.
        let weight = |v: f32| f64::from(crate::kernels::softmax::exp(v - max));
        if p.top_k > 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            cand.sort_unstable_by(order);
        }
        let weights: Vec<f32> = cand.iter().map(|c| crate::kernels::softmax::exp(c.1 - max)).collect();
        let total = lane_sum(&weights);
        if p.top_p >= 1.0 && p.min_p <= 0.0 {
            // Nothing more to cut: walk the candidates as they are.
            let mut target = rng.next_f64() * total;
            for (c, &w) in cand.iter().zip(&weights) {
                target -= f64::from(w);
                if target < 0.0 {
                    return c.0;
                }
            }
            return cand[cand.len() - 1].0;
        }
        // Sort a head of the candidates, growing it until top-p and min-p are settled within it.
        let mut k = 64.min(cand.len());
        loop {
            if k < cand.len() {
                cand.select_nth_unstable_by(k - 1, order);
            }
            cand[..k].sort_unstable_by(order);
            let probs: Vec<f64> = cand[..k].iter().map(|c| weight(c.1) / total).collect();
            let mut keep = k;
            let mut settled = k == cand.len();
            if p.top_p < 1.0 {
                let mut acc = 0.0;
                if let Some(i) = probs.iter().position(|q| {
                    acc += q;
                    acc >= f64::from(p.top_p)
                }) {
                    keep = i + 1;
                    settled = true;
                }
            }
            if p.min_p > 0.0 {
                let floor = probs[0] * f64::from(p.min_p);
                let above = probs.iter().take_while(|&&q| q >= floor).count().max(1);
                keep = keep.min(above);
                settled |= above < k;
            }
            if settled {
                let kept: f64 = probs[..keep].iter().sum();
                let mut target = rng.next_f64() * kept;
                for (i, q) in probs[..keep].iter().enumerate() {
                    target -= q;
                    if target < 0.0 {
                        return cand[i].0;
                    }
                }
                return cand[keep - 1].0;
            }
            k = (k * 4).min(cand.len());
        }
    }
}

impl Sampler {
    /// The draw with nothing truncated, straight over the logits (which
    /// hold no NaN): no candidate list, and loops the compiler vectorises.
    /// `max` is the largest logit, from the pass that checked for NaN, and
    /// `u` the uniform draw in `[0, 1)`.
    fn draw_all(l: &[f32], max: f32, temperature: f32, u: f64) -> u32 {
        // Division by a positive number is monotonic, so this is the largest `v / temperature`.
        let max = max / temperature;
        thread_local! {
            /// The weights and block sums, kept between draws: a fresh vocabulary-sized
            /// allocation is a fresh mapping, and its page faults cost more than the draw.
            static WEIGHTS: std::cell::RefCell<(Vec<f32>, Vec<f64>)> =
                const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
        }
        WEIGHTS.with_borrow_mut(|(weights, blocks)| {
            let total = fill_weights(l, temperature, max, weights, blocks);
            walk(weights, blocks, u * total)
        })
    }
}

/// Weights summed per block, so the walk looks inside one block only.
const BLOCK: usize = 256;

/// The index where the running sum of `weights` passes `target`, given
/// each [`BLOCK`]'s sum: one subtraction chain per token would be the
/// longest part of the draw.
#[allow(clippy::cast_possible_truncation)]
fn walk(weights: &[f32], blocks: &[f64], mut target: f64) -> u32 {
    for (b, (block, &sum)) in weights.chunks(BLOCK).zip(blocks).enumerate() {
        if target >= sum {
            target -= sum;
            continue;
        }
        for (i, &w) in block.iter().enumerate() {
            target -= f64::from(w);
            if target < 0.0 {
                return (b * BLOCK + i) as u32;
            }
        }
    }
    (weights.len() - 1) as u32
}

/// Defines a function whose body is compiled three times, for AVX-512, for
/// AVX2 and for the build's baseline, and runs the widest the CPU has.
/// Only for bodies that are elementwise or keep their own fixed lanes:
/// the compiler never reorders float operations, so each build gives the
/// same bits and only the width of the instructions changes.
macro_rules! widest {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) -> $r:ty $body:block) => {
        $(#[$m])*
        fn $name($($a: $t),*) -> $r {
            #[inline(always)]
            fn body($($a: $t),*) -> $r $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,avx512f,avx512vl")]
                unsafe fn avx512($($a: $t),*) -> $r {
                    body($($a),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($a: $t),*) -> $r {
                    body($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vl") {
                    // SAFETY: AVX-512 F and VL (and so AVX2) were detected on this CPU.
                    return unsafe { avx512($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 was detected on this CPU.
                    return unsafe { avx2($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}

widest! {
    /// `exp(v / temperature - max)` of every logit, into `out`, with the
    /// engine's `exp` (plain arithmetic, so every width gives the same
    /// bits). Puts each [`BLOCK`]'s [`lane_sum`] into `blocks`, while the
    /// block is in L1, and returns the blocks' sum in block order.
    ///
    /// Why the total is a sum of block sums: one eight-lane chain over the
    /// whole vocabulary (6,144 dependent adds) was a fifth of the draw,
    /// where the blocks' chains are short and independent. The order is
    /// still fixed by the vocabulary's size alone.
    fn fill_weights(l: &[f32], temperature: f32, max: f32, out: &mut Vec<f32>, blocks: &mut Vec<f64>) -> f64 {
        out.resize(l.len(), 0.0);
        blocks.clear();
        for (lb, ob) in l.chunks(BLOCK).zip(out.chunks_mut(BLOCK)) {
            for (o, &v) in ob.iter_mut().zip(lb) {
                *o = crate::kernels::softmax::exp(v / temperature - max);
            }
            blocks.push(crate::kernels::lanes::sum8_f64(ob, f64::from));
        }
        blocks.iter().sum()
    }
}

widest! {
    /// The largest of `l`, or `None` if `l` is empty or holds a NaN: one
    /// pass, with no early exit so the loop vectorises (an `any` stopping
    /// at the first NaN took 11 µs of a 47 µs draw over 49,152 logits).
    /// The maximum runs over eight lanes, then the remainder and the lanes
    /// in a fixed order.
    fn max_unless_nan(l: &[f32]) -> Option<f32> {
        let mut lanes = [f32::NEG_INFINITY; 8];
        let mut nan = [false; 8];
        let mut chunks = l.chunks_exact(8);
        for c in &mut chunks {
            for ((m, n), &v) in lanes.iter_mut().zip(&mut nan).zip(c) {
                *m = if v > *m { v } else { *m };
                *n |= v.is_nan();
            }
        }
        let rest = chunks.remainder();
        if l.is_empty() || nan.contains(&true) || rest.iter().any(|v| v.is_nan()) {
            return None;
        }
        Some(rest.iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m }))
    }
}

widest! {
    /// `Σ w` in f64 over eight fixed lanes (element `i` in lane `i % 8`) and
    /// one fixed tree: a fixed order, which one sequential chain also was,
    /// but eight times shorter.
    fn lane_sum(w: &[f32]) -> f64 {
        crate::kernels::lanes::sum8_f64(w, f64::from)
    }
}

/// Index of the largest logit; the lowest id wins a tie.
#[allow(clippy::cast_possible_truncation)]
pub fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in l.iter().enumerate() {
        if *v > l[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-softmax at `token`, and the `n` most likely tokens with theirs.
#[allow(clippy::cast_possible_truncation)]
pub fn log_probs(logits: &[f32], token: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = f64::from(max) + logits.iter().map(|&v| f64::from((v - max).exp())).sum::<f64>().ln();
    let lp = |v: f32| (f64::from(v) - lse) as f32;
    let mut top = Vec::new();
    if n > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let n = n.min(idx.len());
        idx.select_nth_unstable_by(n - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        idx.truncate(n);
        idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        top = idx.into_iter().map(|t| (t, lp(logits[t as usize]))).collect();
    }
    (logits.get(token as usize).map_or(f32::NEG_INFINITY, |&v| lp(v)), top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    /// The dispatched forms (AVX-512 or AVX2 where the CPU has them) equal
    /// plain loops compiled for the baseline, bit for bit, at lengths that
    /// leave every remainder.
    #[test]
    #[allow(clippy::cast_precision_loss)]
    fn widest_forms_equal_the_baseline() {
        let mut rng = Rng::new(5);
        for n in [1, 7, 8, 15, 16, 17, 100, 1003, 49_152] {
            let l: Vec<f32> = (0..n).map(|_| (rng.next_f64() as f32 - 0.5) * 40.0).collect();
            let max = l.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
            assert_eq!(max_unless_nan(&l).map(f32::to_bits), Some(max.to_bits()), "max n={n}");
            let (mut wide, mut blocks) = (Vec::new(), Vec::new());
            let total = fill_weights(&l, 0.7, max / 0.7, &mut wide, &mut blocks);
            let plain: Vec<f32> = l.iter().map(|&v| crate::kernels::softmax::exp(v / 0.7 - max / 0.7)).collect();
            assert_eq!(
                wide.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
                plain.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
                "weights n={n}"
            );
            // Each block's sum: lane `i % 8`, then the tree; the total: the blocks in order.
            let lane_tree = |w: &[f32]| {
                let mut lanes = [0.0f64; 8];
                for (i, &w) in w.iter().enumerate() {
                    lanes[i % 8] += f64::from(w);
                }
                crate::kernels::lanes::tree8(lanes)
            };
            let per_block: Vec<f64> = plain.chunks(BLOCK).map(lane_tree).collect();
            assert_eq!(
                blocks.iter().map(|b| b.to_bits()).collect::<Vec<_>>(),
                per_block.iter().map(|b| b.to_bits()).collect::<Vec<_>>(),
                "blocks n={n}"
            );
            assert_eq!(total.to_bits(), per_block.iter().fold(0.0, |a, b| a + b).to_bits(), "total n={n}");
            for at in [0, n / 2, n - 1] {
                let mut with_nan = l.clone();
                with_nan[at] = f32::NAN;
                assert_eq!(max_unless_nan(&with_nan), None, "nan at {at} of {n}");
            }
        }
        assert_eq!(max_unless_nan(&[]), None);
    }

    /// The walk over block sums picks the token a plain running sum, token
    /// by token, picks (at draws away from a boundary, where the two
    /// orders of summation cannot disagree).
    #[test]
    #[allow(clippy::cast_possible_truncation)]
    fn the_walk_equals_a_running_sum() {
        let mut rng = Rng::new(9);
        let l: Vec<f32> = (0..5000).map(|_| (rng.next_f64() as f32 - 0.5) * 20.0).collect();
        let max = max_unless_nan(&l).expect("no NaN");
        let (mut w, mut blocks) = (Vec::new(), Vec::new());
        let total = fill_weights(&l, 1.0, max, &mut w, &mut blocks);
        let mut seen = std::collections::HashSet::new();
        for u in [0.0, 0.1, 0.37, 0.5, 0.93, 0.999] {
            let target = u * total;
            let mut running = 0.0;
            let plain = w.iter().position(|&x| {
                running += f64::from(x);
                running > target
            });
            let got = walk(&w, &blocks, target);
            assert_eq!(Some(got as usize), plain, "u={u}");
            seen.insert(got);
        }
        assert_eq!(seen.len(), 6, "the draws land on different tokens");
    }

    #[test]
    fn log_probabilities_are_only_computed_when_asked_for() {
        let quiet = Sampler::new(SamplingParams::default()).expect("params").sample(&logits(), &[]);
        assert!(quiet.logprob.is_nan() && quiet.top.is_empty());
        let asked = Sampler::new(SamplingParams { logprobs: true, ..Default::default() }).expect("params");
        let out = asked.clone().sample(&logits(), &[]);
        assert_eq!(out.token, quiet.token);
        assert!(out.logprob < 0.0 && out.top.is_empty());
    }

    #[test]
    fn greedy_picks_max_and_reports_logprobs() {
        let mut s = Sampler::new(SamplingParams { top_logprobs: 2, ..Default::default() }).expect("params");
        let out = s.sample(&logits(), &[]);
        assert_eq!(out.token, 1);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 4]);
        assert!(out.logprob < 0.0 && out.logprob > -1.0);
    }

    #[test]
    fn penalties_move_the_choice() {
        let mut s = Sampler::new(SamplingParams { presence_penalty: 0.5, ..Default::default() }).expect("params");
        assert_eq!(s.sample(&logits(), &[1]).token, 4);
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..Default::default() }).expect("params");
        assert_eq!(s.sample(&logits(), &[1, 4]).token, 2);
        let mut s = Sampler::new(SamplingParams { frequency_penalty: 0.1, ..Default::default() }).expect("params");
        assert_eq!(s.sample(&logits(), &[1, 1]).token, 4);
    }

    #[test]
    fn seeded_draws_repeat_and_truncation_holds() {
        let params = SamplingParams { temperature: 1.5, seed: 42, ..Default::default() };
        let run = |p: SamplingParams| {
            let mut s = Sampler::new(p).expect("params");
            // A growing history: each draw is at a new position.
            (0..50).map(|i| s.sample(&logits(), &vec![0; i]).token).collect::<Vec<_>>()
        };
        assert_eq!(run(params.clone()), run(params.clone()));
        assert!(run(SamplingParams { top_k: 2, ..params.clone() }).iter().all(|t| [1, 4].contains(t)));
        assert!(run(SamplingParams { min_p: 0.5, ..params.clone() }).iter().all(|t| [1, 4, 2].contains(t)));
        assert!(run(SamplingParams { top_p: 0.01, ..params }).iter().all(|&t| t == 1));
    }

    #[test]
    fn partial_sorting_keeps_exactly_the_nucleus() {
        // A big vocabulary: the head of the sort must grow until top-p and min-p are settled.
        let mut rng = Rng::new(7);
        #[allow(clippy::cast_possible_truncation)]
        let logits: Vec<f32> = (0..3000).map(|_| (rng.next_f64() * 12.0) as f32).collect();
        let mut sorted: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let weights: Vec<f64> = sorted.iter().map(|c| f64::from(c.1 - sorted[0].1).exp()).collect();
        let total: f64 = weights.iter().sum();
        for (top_p, min_p) in [(0.9, 0.0), (0.5, 0.0), (1.0, 0.2), (0.95, 0.05)] {
            let mut acc = 0.0;
            let by_p = weights.iter().position(|w| {
                acc += w / total;
                acc >= f64::from(top_p)
            });
            let by_p = by_p.map_or(weights.len(), |i| i + 1);
            let by_min = weights.iter().take_while(|&&w| w >= weights[0] * f64::from(min_p)).count();
            let nucleus: std::collections::HashSet<u32> = sorted[..by_p.min(by_min)].iter().map(|c| c.0).collect();
            let params = SamplingParams { temperature: 1.0, top_p, min_p, seed: 3, ..Default::default() };
            let mut s = Sampler::new(params).expect("params");
            let drawn: Vec<u32> = (0..300).map(|i| s.sample(&logits, &vec![0; i]).token).collect();
            assert!(drawn.iter().collect::<std::collections::HashSet<_>>().len() > 1, "draws vary with position");
            assert!(drawn.iter().all(|t| nucleus.contains(t)), "top_p {top_p} min_p {min_p}");
            assert!(nucleus.len() > 64 || top_p < 0.9, "the head had to grow past its first 64");
        }
    }

    #[test]
    fn a_draw_depends_on_seed_and_position_only() {
        let params = SamplingParams { temperature: 1.0, seed: 11, ..Default::default() };
        let history: Vec<u32> = (0..20).collect();
        let mut a = Sampler::new(params.clone()).expect("params");
        let sequential: Vec<u32> = (0..20).map(|i| a.sample(&logits(), &history[..i]).token).collect();
        // A fresh sampler (a replay on a new pipeline) at position 13 continues the same stream.
        let mut b = Sampler::new(params).expect("params");
        assert_eq!(b.sample(&logits(), &history[..13]).token, sequential[13]);
    }

    /// The untruncated draw splits [0, 1) by probability, in vocabulary
    /// order; a NaN logit is never drawn.
    #[test]
    fn untruncated_draw_follows_the_probabilities() {
        let l = [0.0, 3.0f32.ln()];
        assert_eq!(Sampler::draw_all(&l, l[1], 1.0, 0.2), 0, "p = 1/4");
        assert_eq!(Sampler::draw_all(&l, l[1], 1.0, 0.3), 1, "p = 3/4");
        assert_eq!(Sampler::draw_all(&l, l[1], 1.0, 0.999_999), 1);
        // Temperature 0.5 squares the odds: 1/10 and 9/10.
        assert_eq!(Sampler::draw_all(&l, l[1], 0.5, 0.09), 0);
        assert_eq!(Sampler::draw_all(&l, l[1], 0.5, 0.11), 1);
        // NaN logits take the candidate path, where they weigh nothing.
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, ..SamplingParams::default() }).expect("valid");
        for i in 0..20 {
            assert_ne!(s.sample(&[0.0, f32::NAN, 1.0], &vec![7; i]).token, 1);
        }
    }

    #[test]
    fn bad_params_are_rejected() {
        for p in [
            SamplingParams { temperature: -1.0, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { min_p: 2.0, ..Default::default() },
            SamplingParams { temperature: f32::NAN, ..Default::default() },
        ] {
            assert!(Sampler::new(p).is_err());
        }
    }
}
