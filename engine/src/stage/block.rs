//! One transformer block's forward pass: norms, attention with its KV
//! cache, and the gated feed-forward, each split across a pool.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Row, Scratch};
use crate::config::ModelConfig;
use crate::kernels::activation::swiglu;
use crate::kernels::attention::{attend_group, round_to_f16, AttnShape, Visible};
use crate::kernels::matmul::{Activations, Matrix};
use crate::kernels::norm::rms_norm;
use crate::kernels::rope;
use crate::kv_cache::KvCache;
use crate::pool::ComputePool;

/// One layer's weights.
#[derive(Debug)]
pub(super) struct Block {
    pub(super) attn_norm: Vec<f32>,
    pub(super) q: Matrix,
    pub(super) k: Matrix,
    pub(super) v: Matrix,
    pub(super) o: Matrix,
    pub(super) bias: Option<[Vec<f32>; 3]>,
    pub(super) ffn_norm: Vec<f32>,
    pub(super) gate: Matrix,
    pub(super) up: Matrix,
    pub(super) down: Matrix,
}

impl Block {
    pub(super) fn matrices(&self) -> [&Matrix; 7] {
        [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down]
    }

    pub(super) fn matrices_mut(&mut self) -> [&mut Matrix; 7] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o, &mut self.gate, &mut self.up, &mut self.down]
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &self,
        c: &ModelConfig,
        local: usize,
        rows: &[Row],
        x: &mut [f32],
        cache: &mut KvCache,
        s: &mut Scratch,
        pool: &ComputePool,
    ) {
        let n = rows.len();
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let (hidden, eps) = (c.hidden, c.rms_eps);
        let norm = |w: &[f32], x: &[f32], h: &mut [f32]| {
            par_rows(pool, h, hidden, |r, out| rms_norm(&x[r.start * hidden..r.end * hidden], w, eps, out));
        };
        for r in rows {
            cache.prefetch_slot(local, r.session);
        }
        norm(&self.attn_norm, x, &mut s.h);
        {
            // One pool job for all three: the threads wake once.
            let a = Activations::new(&s.h, n, c.hidden);
            Matrix::matmul_group(&[&self.q, &self.k, &self.v], &a, &mut [&mut s.q, &mut s.k, &mut s.v], pool);
        }
        if let Some([bq, bk, bv]) = &self.bias {
            add_bias(&mut s.q, bq);
            add_bias(&mut s.k, bk);
            add_bias(&mut s.v, bv);
        }
        Self::rotate(c, &s.angles, &mut s.q, &mut s.k, pool);
        for (i, r) in rows.iter().enumerate() {
            cache.push(local, r.session, &s.k[i * kv_dim..(i + 1) * kv_dim], &s.v[i * kv_dim..(i + 1) * kv_dim]);
        }
        self.attention(c, local, rows, cache, s, pool);
        self.o.matmul(&Activations::new(&s.attn, n, q_dim), &mut s.proj, pool);
        add_in_place(x, &s.proj);
        norm(&self.ffn_norm, x, &mut s.h);
        {
            let a = Activations::new(&s.h, n, c.hidden);
            Matrix::matmul_group(&[&self.gate, &self.up], &a, &mut [&mut s.gate, &mut s.up], pool);
        }
        let (ffn, up) = (c.ffn, &s.up);
        par_rows(pool, &mut s.gate, ffn, |r, g| swiglu(g, &up[r.start * ffn..r.end * ffn]));
        self.down.matmul(&Activations::new(&s.gate, n, c.ffn), &mut s.proj, pool);
        add_in_place(x, &s.proj);
    }

    /// Rotary embeddings of every row's query and key by its angles (see
    /// [`Scratch::fill_angles`]), rows split across the pool; the queries
    /// are then rounded to f16.
    fn rotate(c: &ModelConfig, angles: &[(f32, f32)], q: &mut [f32], k: &mut [f32], pool: &ComputePool) {
        let (q_dim, kv_dim, half) = (c.q_dim(), c.kv_dim(), c.head_dim / 2);
        let kp = SharedSlice(k.as_mut_ptr());
        par_rows(pool, q, q_dim, |r, qs| {
            let kp = &kp;
            // SAFETY: the parts' row ranges are disjoint, so are their key rows
            // (inside `k`, which outlives this call).
            let ks = unsafe { std::slice::from_raw_parts_mut(kp.0.add(r.start * kv_dim), r.len() * kv_dim) };
            for (j, i) in r.enumerate() {
                let (qr, kr) = (&mut qs[j * q_dim..(j + 1) * q_dim], &mut ks[j * kv_dim..(j + 1) * kv_dim]);
                rope::rotate(qr, kr, c.head_dim, &angles[i * half..(i + 1) * half], c.rope_style);
                // Queries meet the f16 cache as f16 (see `attention`).
                round_to_f16(qr);
            }
        });
    }

    /// Every (row, head) pair attends on its own; threads split the pairs.
    fn attention(
        &self,
        c: &ModelConfig,
        local: usize,
        rows: &[Row],
        cache: &KvCache,
        s: &mut Scratch,
        pool: &ComputePool,
    ) {
        let shape = AttnShape { heads: c.heads, kv_heads: c.kv_heads, head_dim: c.head_dim };
        // Work goes by (row, key/value head): the query heads sharing a
        // key/value head attend together (grouped-query attention).
        let group = c.heads / c.kv_heads.max(1);
        let width = group * c.head_dim;
        let units = rows.len() * c.kv_heads;
        let scratch = group * rows.iter().map(|r| r.position + 1).max().unwrap_or(0);
        // One scores buffer per part, reused across layers and calls.
        let threads = pool.threads();
        if s.scores.len() < threads * scratch {
            s.scores.resize(threads * scratch, 0.0);
        }
        let out = SharedSlice(s.attn.as_mut_ptr());
        let scores_all = SharedSlice(s.scores.as_mut_ptr());
        let q = &s.q;
        let next = AtomicUsize::new(0);
        pool.run(&|part| {
            let (out, scores_all) = (&out, &scores_all);
            // SAFETY: part `part` alone uses `scores[part * scratch..][..scratch]`,
            // inside the buffer (sized above), which outlives `pool.run`.
            let scores = unsafe { std::slice::from_raw_parts_mut(scores_all.0.add(part * scratch), scratch) };
            // Parts claim small runs of units from a shared counter: in a
            // prompt, later rows attend over more tokens, and a descheduled
            // thread's units go to the others.
            while let Some(run) = claim(&next, units) {
                for unit in run {
                    let (i, kvh) = (unit / c.kv_heads, unit % c.kv_heads);
                    let r = rows[i];
                    let (keys, values) = cache.layer(local, r.session);
                    let at = i * c.q_dim() + kvh * width;
                    // SAFETY: each (row, key/value head) unit owns the disjoint
                    // range `at..at + width` of `s.attn` (its group's heads are
                    // consecutive), which outlives `pool.run`.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(at), width) };
                    let seen = Visible { keys, values, tokens: r.position + 1 };
                    // The cache this thread reads next for this head, requested
                    // while this call computes: the next row's, and after the
                    // last row the first row's next layer. Only when one thread
                    // walks the units in order; with more, another may take it.
                    let next = match rows.get(i + 1) {
                        _ if threads > 1 => None,
                        Some(n) => Some((local, n)),
                        None => Some((local + 1, &rows[0])).filter(|&(l, _)| l < cache.layers()),
                    };
                    let ahead = next.map(|(l, n)| {
                        let (keys, values) = cache.layer(l, n.session);
                        Visible { keys, values, tokens: n.position + 1 }
                    });
                    attend_group(shape, kvh, &q[at..at + width], seen, ahead, scores, dst);
                }
            }
        });
    }
}

/// The next run of attention units for a thread, or `None` when all are taken.
fn claim(next: &AtomicUsize, units: usize) -> Option<Range<usize>> {
    const RUN: usize = 2;
    let start = next.fetch_add(RUN, Ordering::Relaxed);
    (start < units).then(|| start..(start + RUN).min(units))
}

/// A buffer written by several threads at disjoint ranges.
struct SharedSlice(*mut f32);
// SAFETY: writers only touch disjoint ranges; see `Block::attention`,
// `Block::rotate` and `par_rows`.
unsafe impl Sync for SharedSlice {}

/// Batches below this many rows run row-wise work on the calling thread:
/// fewer rows do not pay for a hand-off.
const MIN_PARALLEL_ROWS: usize = 4;

/// `f(rows, out_rows)` over disjoint row ranges of `out` (`width` floats per
/// row) across the pool. Row-wise work only, so the split cannot change a
/// result.
fn par_rows(pool: &ComputePool, out: &mut [f32], width: usize, f: impl Fn(Range<usize>, &mut [f32]) + Sync) {
    let n = out.len() / width.max(1);
    let o = SharedSlice(out.as_mut_ptr());
    pool.rows(n, MIN_PARALLEL_ROWS, &|r| {
        let o = &o;
        // SAFETY: parts get disjoint row ranges inside `out`, which outlives `pool.rows`.
        let mine = unsafe { std::slice::from_raw_parts_mut(o.0.add(r.start * width), r.len() * width) };
        f(r, mine);
    });
}

fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add_in_place(row, bias);
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
