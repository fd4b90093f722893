//! A stage: a contiguous range of transformer blocks, plus the embedding on
//! the first stage and the final norm and lm_head on the last.
//!
//! `forward` takes a batch of rows, one token each. Rows may belong to
//! different sessions at different positions (batched decode) or be a run of
//! one session's prompt (chunked prefill), or both. Every row reads and
//! writes its own session's cache, and every kernel below computes a row on
//! its own, so a row's result never depends on its batch-mates.

mod block;
mod load;

use std::collections::HashMap;
use std::ops::Range;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::hidden::Hidden;
use crate::kernels::matmul::{Activations, Matrix};
use crate::kernels::norm::rms_norm;
use crate::kernels::rope;
use crate::kv_cache::{KvCache, SessionId};
use crate::pool::ComputePool;
use block::Block;

/// One token of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// The sequence this token belongs to.
    pub session: SessionId,
    /// Its position in that sequence (0-based).
    pub position: usize,
    /// Whether the last stage should return logits for it.
    pub logits: bool,
}

/// What a stage consumes.
#[derive(Debug, Clone, Copy)]
pub enum StageInput<'a> {
    /// Token ids, one per row (first stage only).
    Tokens(&'a [u32]),
    /// Hidden states from the previous stage.
    Hidden(&'a Hidden),
}

/// What a stage produces.
#[derive(Debug, Clone, PartialEq)]
pub enum StageOutput {
    /// Hidden states for the next stage.
    Hidden(Hidden),
    /// Logits for the rows that asked for them (last stage only).
    Logits(Logits),
}

/// Logits of selected rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    /// Index in the batch of each logits row.
    pub rows: Vec<usize>,
    /// Vocabulary size (row width).
    pub vocab: usize,
    /// `rows.len() × vocab` values.
    pub data: Vec<f32>,
}

impl Logits {
    /// The logits of the `i`-th returned row.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
}

#[derive(Debug)]
struct Head {
    norm: Vec<f32>,
    lm_head: Matrix,
}

/// Layers `[start, end)` of a model, loaded and ready to run.
#[derive(Debug)]
pub struct Stage {
    config: ModelConfig,
    range: Range<usize>,
    embed: Option<Matrix>,
    blocks: Vec<Block>,
    head: Option<Head>,
    /// The last call's buffers, reused by the next: fresh ones cost page
    /// faults and zeroing on every step. One set per row group (see
    /// [`row_groups`]).
    scratch: std::sync::Mutex<Vec<Scratch>>,
    /// The single-thread pool a row group runs its layers on.
    serial: ComputePool,
    /// A logits buffer handed back by [`Stage::recycle`]: at batch 16 a
    /// fresh one is 3 MB to zero (and fault in) on the calling thread while
    /// the others wait.
    spare_logits: std::sync::Mutex<Vec<f32>>,
}

impl Stage {
    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The layers this stage runs.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Whether this stage takes token ids.
    pub fn is_first(&self) -> bool {
        self.embed.is_some()
    }

    /// Whether this stage produces logits.
    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let m = |m: &Matrix| m.bytes();
        let blocks: usize = self.blocks.iter().map(|b| b.matrices().into_iter().map(m).sum::<usize>()).sum();
        let head = match (&self.head, &self.embed) {
            (Some(h), Some(e)) if h.lm_head.shares_storage(e) => 0,
            (Some(h), _) => m(&h.lm_head),
            (None, _) => 0,
        };
        blocks + self.embed.as_ref().map_or(0, m) + head
    }

    /// An empty KV cache for this stage's layers.
    pub fn new_cache(&self, budget_bytes: usize) -> KvCache {
        KvCache::new(self.blocks.len(), self.config.kv_dim(), budget_bytes)
    }

    /// Runs the batch through this stage's layers.
    pub fn forward(
        &self,
        rows: &[Row],
        input: StageInput<'_>,
        cache: &mut KvCache,
        pool: &ComputePool,
    ) -> Result<StageOutput> {
        let c = &self.config;
        let n = rows.len();
        let growth = self.validate(rows, input, cache)?;
        let mut x = match (input, &self.embed) {
            (StageInput::Tokens(ids), Some(embed)) => {
                let mut x = vec![0.0; n * c.hidden];
                for (&id, out) in ids.iter().zip(x.chunks_exact_mut(c.hidden)) {
                    embed.dequantize_row_into(id as usize, out);
                }
                x
            }
            (StageInput::Hidden(h), None) => h.data.clone(),
            _ => return Err(EngineError::InvalidBatch("input kind does not match the stage".into())),
        };
        cache.reserve(&growth)?;
        let picked = self.picked(rows);
        // Every element is written by the head's matmul, so a recycled
        // buffer's old values need no zeroing (`resize` only zeroes growth).
        let mut data = if picked.is_empty() { Vec::new() } else { std::mem::take(&mut *lock(&self.spare_logits)) };
        data.resize(picked.len() * c.vocab, 0.0);
        match row_groups(rows, pool.threads()) {
            Some(groups) => self.by_row_group(rows, &groups, &mut x, &mut data, cache, pool),
            None => {
                let mut scratch = lock(&self.scratch);
                scratch.resize_with(1, Scratch::default);
                let whole =
                    Group { rows, picked: &picked, x: &mut x, logits: &mut data, cache, scratch: &mut scratch[0] };
                self.run(whole, pool);
            }
        }
        for (&session, &tokens) in &growth {
            cache.commit(session, tokens);
        }
        match &self.head {
            None => Ok(StageOutput::Hidden(Hidden { rows: n, dim: c.hidden, data: x })),
            Some(_) => Ok(StageOutput::Logits(Logits { rows: picked, vocab: c.vocab, data })),
        }
    }

    /// Runs the layers, and the head's logits into `logits` when this is
    /// the last stage, with each thread of `pool` taking one row group
    /// through all of them on its own (see [`row_groups`]); each group's
    /// sessions move to a cache of their own meanwhile.
    fn by_row_group(
        &self,
        rows: &[Row],
        groups: &[Range<usize>],
        x: &mut [f32],
        logits: &mut [f32],
        cache: &mut KvCache,
        pool: &ComputePool,
    ) {
        let c = &self.config;
        let mut scratch = lock(&self.scratch);
        scratch.resize_with(groups.len(), Scratch::default);
        let (mut xs, mut ls) = (x, logits);
        // Each group's sessions move to a cache of their own for the run.
        let mut owns: Vec<KvCache> =
            groups.iter().map(|g| cache.split_off(rows[g.clone()].iter().map(|r| r.session))).collect();
        let picks: Vec<Vec<usize>> = groups.iter().map(|g| self.picked(&rows[g.clone()])).collect();
        let mut parts: Vec<std::sync::Mutex<Option<Group<'_>>>> = Vec::with_capacity(groups.len());
        for (((g, s), own), picked) in groups.iter().zip(scratch.iter_mut()).zip(owns.iter_mut()).zip(&picks) {
            let rows = &rows[g.clone()];
            // This group's rows of `x`, and its rows' logits, which follow
            // the previous group's (logits rows keep the batch's order).
            let (x, rest) = std::mem::take(&mut xs).split_at_mut(rows.len() * c.hidden);
            xs = rest;
            let (logits, rest) = std::mem::take(&mut ls).split_at_mut(picked.len() * c.vocab);
            ls = rest;
            parts.push(std::sync::Mutex::new(Some(Group { rows, picked, x, logits, cache: own, scratch: s })));
        }
        pool.run(&|part| {
            if let Some(group) = parts.get(part).and_then(|g| lock(g).take()) {
                self.run(group, &self.serial);
            }
        });
        drop(parts);
        for own in owns {
            cache.absorb(own);
        }
    }

    /// Runs `g`'s rows through every layer, then the head's logits when
    /// this is the last stage: the whole batch on the shared pool, or one
    /// row group on its thread's own.
    fn run(&self, g: Group<'_>, pool: &ComputePool) {
        let c = &self.config;
        g.scratch.fit(c, g.rows.len());
        g.scratch.fill_angles(c, g.rows);
        for (local, block) in self.blocks.iter().enumerate() {
            block.forward(c, local, g.rows, g.x, g.cache, g.scratch, pool);
        }
        if let Some(head) = &self.head {
            head.logits_into(c, g.x, g.picked, g.logits, pool);
        }
    }

    /// Indices in `rows` of the rows whose logits this stage returns (none
    /// before the last stage).
    fn picked(&self, rows: &[Row]) -> Vec<usize> {
        match self.head {
            Some(_) => (0..rows.len()).filter(|&i| rows[i].logits).collect(),
            None => Vec::new(),
        }
    }

    /// Hands a [`Logits`] from [`Stage::forward`] back once it has been
    /// read, so the next call reuses its buffer.
    pub fn recycle(&self, logits: Logits) {
        let mut spare = lock(&self.spare_logits);
        if logits.data.capacity() > spare.capacity() {
            *spare = logits.data;
        }
    }

    /// Checks the batch against the stage and the cache; returns each session's growth.
    fn validate(&self, rows: &[Row], input: StageInput<'_>, cache: &KvCache) -> Result<HashMap<SessionId, usize>> {
        let c = &self.config;
        let bad = |m: String| Err(EngineError::InvalidBatch(m));
        if rows.is_empty() {
            return bad("the batch has no rows".into());
        }
        match input {
            StageInput::Tokens(ids) => {
                if !self.is_first() {
                    return bad(format!("stage {:?} takes hidden states, not tokens", self.range));
                }
                if ids.len() != rows.len() {
                    return bad(format!("{} token ids for {} rows", ids.len(), rows.len()));
                }
                if let Some(id) = ids.iter().find(|&&id| id as usize >= c.vocab) {
                    return bad(format!("token id {id} is outside the vocabulary of {}", c.vocab));
                }
            }
            StageInput::Hidden(h) => {
                if self.is_first() {
                    return bad("the first stage takes token ids, not hidden states".into());
                }
                if h.rows != rows.len() || h.dim != c.hidden || h.data.len() != h.rows * h.dim {
                    return bad(format!(
                        "hidden states are {}×{} for {} rows of width {}",
                        h.rows,
                        h.dim,
                        rows.len(),
                        c.hidden
                    ));
                }
            }
        }
        let mut next: HashMap<SessionId, usize> = HashMap::new();
        for r in rows {
            if r.position >= c.context {
                return Err(EngineError::ContextExceeded { position: r.position, context: c.context });
            }
            let expected = next.entry(r.session).or_insert_with(|| cache.len(r.session));
            if r.position != *expected {
                return bad(format!(
                    "session {} row at position {} but the cache expects position {}",
                    r.session, r.position, expected
                ));
            }
            *expected += 1;
        }
        Ok(next.into_iter().map(|(s, end)| (s, end - cache.len(s))).collect())
    }
}

/// What one run of the layers works on: the whole batch, or one row
/// group (see [`row_groups`]) with its sessions' own cache.
struct Group<'a> {
    rows: &'a [Row],
    /// Indices in `rows` of the rows whose logits are returned.
    picked: &'a [usize],
    x: &'a mut [f32],
    logits: &'a mut [f32],
    cache: &'a mut KvCache,
    scratch: &'a mut Scratch,
}

impl Head {
    /// The logits of rows `picked` of `x` into `out` (`picked.len() × vocab`).
    fn logits_into(&self, c: &ModelConfig, x: &[f32], picked: &[usize], out: &mut [f32], pool: &ComputePool) {
        if picked.is_empty() {
            return;
        }
        let mut h = Vec::with_capacity(picked.len() * c.hidden);
        for &i in picked {
            h.extend_from_slice(&x[i * c.hidden..(i + 1) * c.hidden]);
        }
        let mut normed = vec![0.0; h.len()];
        rms_norm(&h, &self.norm, c.rms_eps, &mut normed);
        self.lm_head.matmul(&Activations::new(&normed, picked.len(), c.hidden), out, pool);
    }
}

/// Buffers reused across the blocks of one forward call, and across calls.
/// Every block overwrites what it reads back, so stale contents never leak.
#[derive(Debug, Default)]
struct Scratch {
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Attention scores, one `max_tokens` slice per pool part (grown on demand).
    scores: Vec<f32>,
    /// Each row's rotary angles (`head_dim / 2` pairs a row), filled once
    /// per call for every layer.
    angles: Vec<(f32, f32)>,
}

impl Scratch {
    /// Sizes every buffer for `n` rows (keeping capacity from earlier calls).
    fn fit(&mut self, c: &ModelConfig, n: usize) {
        for (buf, width) in [
            (&mut self.h, c.hidden),
            (&mut self.q, c.q_dim()),
            (&mut self.k, c.kv_dim()),
            (&mut self.v, c.kv_dim()),
            (&mut self.attn, c.q_dim()),
            (&mut self.proj, c.hidden),
            (&mut self.gate, c.ffn),
            (&mut self.up, c.ffn),
        ] {
            buf.resize(n * width, 0.0);
        }
    }

    /// Fills every row's rotary angles.
    fn fill_angles(&mut self, c: &ModelConfig, rows: &[Row]) {
        let half = c.head_dim / 2;
        self.angles.resize(rows.len() * half, (0.0, 0.0));
        for (table, r) in self.angles.chunks_exact_mut(half.max(1)).zip(rows) {
            rope::angles(table, c.head_dim, r.position, c.rope_theta);
        }
    }
}

/// Rows each thread must get before a batch is cut into row groups.
const MIN_GROUP_ROWS: usize = 4;

/// Contiguous row ranges, one per thread, cut between sessions, when the
/// batch is worth cutting; `None` keeps the whole batch together.
///
/// Why: with a row group per thread, each thread runs every layer for its
/// rows alone (one pass of up to eight rows over each weight matrix, and
/// the attention of its own sessions) with no hand-off between the
/// matmuls, norms and attention of a layer, and one thread's attention,
/// bound by memory, overlaps another's matmuls, bound by arithmetic.
/// Measured here at batch 16 and 2 threads: two single-thread processes
/// of 8 rows each decoded 1.6× as fast as one process splitting every
/// matmul. Small batches stay whole: there each thread reading all the
/// weights costs more than the hand-offs.
///
/// A session's rows must stay in one group (later rows attend to the
/// cache entries of earlier ones), so every session's rows must be
/// consecutive; groups may differ by a quarter of their mean at most.
/// Which thread computes a row cannot change its values.
fn row_groups(rows: &[Row], threads: usize) -> Option<Vec<Range<usize>>> {
    let n = rows.len();
    if threads < 2 || n < threads * MIN_GROUP_ROWS {
        return None;
    }
    let mut seen = std::collections::HashSet::new();
    let mut groups: Vec<Range<usize>> = Vec::with_capacity(threads);
    let mut start = 0;
    for i in 0..n {
        let s = rows[i].session;
        if i > 0 && rows[i - 1].session == s {
            continue;
        }
        if !seen.insert(s) {
            return None;
        }
        // A session starts at row i: close the group here if it has reached its share.
        if i > start && i * threads >= (groups.len() + 1) * n && groups.len() + 1 < threads {
            groups.push(start..i);
            start = i;
        }
    }
    groups.push(start..n);
    let most = groups.iter().map(Range::len).max().unwrap_or(0);
    let least = groups.iter().map(Range::len).min().unwrap_or(0);
    (groups.len() == threads && least >= MIN_GROUP_ROWS && 4 * most * threads <= 5 * n).then_some(groups)
}

/// The guarded value, whether or not another holder panicked: buffers are
/// fully rewritten before any read, and a row group is taken whole.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(sessions: &[u64]) -> Vec<Row> {
        sessions.iter().map(|&s| Row { session: SessionId(s), position: 0, logits: true }).collect()
    }

    #[test]
    fn row_groups_cut_between_sessions_evenly_or_not_at_all() {
        let decode: Vec<u64> = (0..16).collect();
        assert_eq!(row_groups(&batch(&decode), 2), Some(vec![0..8, 8..16]));
        assert_eq!(row_groups(&batch(&decode), 3), Some(vec![0..6, 6..11, 11..16]));
        assert_eq!(row_groups(&batch(&decode), 1), None, "one thread");
        assert_eq!(row_groups(&batch(&decode[..7]), 2), None, "fewer than four rows a thread");
        // Sessions of several rows stay whole.
        let runs = [1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 4];
        assert_eq!(row_groups(&batch(&runs), 2), Some(vec![0..6, 6..12]));
        // A session whose rows are not consecutive keeps the batch whole.
        assert_eq!(row_groups(&batch(&[1, 2, 3, 4, 5, 6, 7, 1]), 2), None);
        // So does one that would leave the groups too uneven.
        assert_eq!(row_groups(&batch(&[1, 1, 1, 1, 1, 1, 1, 2, 3, 4]), 2), None);
    }
}
