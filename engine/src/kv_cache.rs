//! Per-session key/value cache for one stage's layers, under a byte budget.
//!
//! The cache is passed into `Stage::forward` explicitly and keyed by
//! `SessionId`, so a session outlives any connection, and one stage serves
//! many sessions at once.

use std::collections::HashMap;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{EngineError, Result};

/// Identifies one sequence across every stage of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Default budget: enough for a few long sessions of a small model.
pub const DEFAULT_KV_BUDGET_BYTES: usize = 1 << 30;

/// One cached element. Keys and values are kept in f16, as llama.cpp's
/// CPU path keeps them: batched decode spends much of its attention time
/// waiting on the cache, and f16 halves what it reads. Queries and
/// attention weights are rounded to f16 to meet them (see `attention`),
/// which keeps the greedy text equal to llama.cpp's and the perplexity
/// within 0.1% of it (`docs/benchmarks.md`).
pub type KvElem = f16;

/// Bytes one token's key and value take in one layer of width `kv_dim`:
/// the one rule the cache's budget and the coordinator's capacity plan share.
pub fn bytes_per_token_layer(kv_dim: usize) -> usize {
    2 * kv_dim * std::mem::size_of::<KvElem>()
}

#[derive(Debug, Default)]
struct SessionKv {
    len: usize,
    /// Per local layer: `len × kv_dim` keys, then values.
    k: Vec<Vec<KvElem>>,
    v: Vec<Vec<KvElem>>,
}

/// Keys and values of every session for a stage's layers.
#[derive(Debug)]
pub struct KvCache {
    layers: usize,
    kv_dim: usize,
    budget: usize,
    used: usize,
    sessions: HashMap<SessionId, SessionKv>,
    /// Emptied per-layer buffers of released sessions, kept for new ones:
    /// a fresh buffer grows by reallocation, copying and page faults on
    /// every doubling, about 2% of a batch-16 decode step here.
    spare: Vec<Vec<KvElem>>,
    /// Capacity of `spare`, in bytes.
    spare_bytes: usize,
}

/// Most bytes of released buffers kept for reuse: an eighth of the budget.
/// They are not counted as used (no session holds them).
const SPARE_SHARE: usize = 8;

impl KvCache {
    /// An empty cache for `layers` layers of width `kv_dim`, holding at most `budget` bytes.
    pub fn new(layers: usize, kv_dim: usize, budget: usize) -> Self {
        Self { layers, kv_dim, budget, used: 0, sessions: HashMap::new(), spare: Vec::new(), spare_bytes: 0 }
    }

    /// Layers this cache holds (the stage's).
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Bytes one token costs across this cache's layers.
    pub fn bytes_per_token(&self) -> usize {
        self.layers * bytes_per_token_layer(self.kv_dim)
    }

    /// Tokens cached for `session` (0 if unknown).
    pub fn len(&self, session: SessionId) -> usize {
        self.sessions.get(&session).map_or(0, |s| s.len)
    }

    /// Bytes in use across all sessions.
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    /// The byte budget.
    pub fn budget_bytes(&self) -> usize {
        self.budget
    }

    /// Sessions currently holding cache.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Frees a session's cache; returns whether it existed.
    pub fn release(&mut self, session: SessionId) -> bool {
        match self.sessions.remove(&session) {
            Some(s) => {
                self.used -= s.len * self.bytes_per_token();
                for mut buf in s.k.into_iter().chain(s.v) {
                    let bytes = buf.capacity() * std::mem::size_of::<KvElem>();
                    if self.spare_bytes + bytes <= self.budget / SPARE_SHARE {
                        buf.clear();
                        self.spare_bytes += bytes;
                        self.spare.push(buf);
                    }
                }
                true
            }
            None => false,
        }
    }

    /// Checks that growing each session to its new length fits the budget,
    /// then claims the bytes. Nothing changes on error.
    pub(crate) fn reserve(&mut self, growth: &HashMap<SessionId, usize>) -> Result<()> {
        let tokens: usize = growth.values().sum();
        let needed = tokens * self.bytes_per_token();
        if self.used + needed > self.budget {
            return Err(EngineError::KvBudgetExceeded { needed, used: self.used, budget: self.budget });
        }
        let layers = self.layers;
        for (&id, &extra) in growth {
            let s = self.sessions.entry(id).or_insert_with(|| {
                let mut buffer = || {
                    let buf = self.spare.pop().unwrap_or_default();
                    self.spare_bytes -= buf.capacity() * std::mem::size_of::<KvElem>();
                    buf
                };
                let k = (0..layers).map(|_| buffer()).collect();
                let v = (0..layers).map(|_| buffer()).collect();
                SessionKv { len: 0, k, v }
            });
            for buf in s.k.iter_mut().chain(s.v.iter_mut()) {
                buf.reserve(extra * self.kv_dim);
            }
        }
        self.used += needed;
        Ok(())
    }

    /// Moves `sessions` (those present) into a cache of their own, so one
    /// thread can run them while others run the rest. Their bytes stay
    /// counted here; [`KvCache::absorb`] moves them back.
    pub(crate) fn split_off(&mut self, sessions: impl IntoIterator<Item = SessionId>) -> KvCache {
        let mut own = KvCache::new(self.layers, self.kv_dim, 0);
        for id in sessions {
            if let Some(s) = self.sessions.remove(&id) {
                own.sessions.insert(id, s);
            }
        }
        own
    }

    /// Takes back the sessions of a cache made by [`KvCache::split_off`].
    pub(crate) fn absorb(&mut self, own: KvCache) {
        self.sessions.extend(own.sessions);
    }

    /// Appends one token's key and value for `layer` of `session`,
    /// rounded to the nearest f16 (ties to even).
    pub(crate) fn push(&mut self, layer: usize, session: SessionId, k: &[f32], v: &[f32]) {
        if let Some(s) = self.sessions.get_mut(&session) {
            // Converted through a small buffer: growing the cache by zeros
            // first cost a memset as long as the conversion.
            let mut h = [f16::ZERO; 64];
            for (buf, x) in [(&mut s.k[layer], k), (&mut s.v[layer], v)] {
                for c in x.chunks(64) {
                    let h = &mut h[..c.len()];
                    h.convert_from_f32_slice(c);
                    buf.extend_from_slice(h);
                }
            }
        }
    }

    /// Marks `tokens` more tokens as cached for `session` once every layer has them.
    pub(crate) fn commit(&mut self, session: SessionId, tokens: usize) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.len += tokens;
        }
    }

    /// Asks for the lines the next [`KvCache::push`] of `session` into
    /// `layer` will write, with intent to write. Why: they are cold (fresh
    /// capacity), and writing them on demand stalled each push (2.4% of a
    /// batch-16 step); asked for before the layer's projections, they
    /// arrive while those compute. Never changes what the cache holds.
    pub(crate) fn prefetch_slot(&self, layer: usize, session: SessionId) {
        #[cfg(target_arch = "x86_64")]
        if let Some(s) = self.sessions.get(&session) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
            for buf in [&s.k[layer], &s.v[layer]] {
                let end = buf.as_ptr().wrapping_add(buf.len()).cast::<u8>();
                for off in (0..self.kv_dim * std::mem::size_of::<KvElem>()).step_by(64) {
                    // SAFETY: SSE is part of x86-64; prefetches never fault,
                    // and the address is never dereferenced.
                    unsafe { _mm_prefetch::<_MM_HINT_ET0>(end.wrapping_add(off).cast()) };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (layer, session);
    }

    /// Keys and values of `layer` for `session`, `tokens × kv_dim` each.
    pub(crate) fn layer(&self, layer: usize, session: SessionId) -> (&[KvElem], &[KvElem]) {
        self.sessions.get(&session).map_or((&[][..], &[][..]), |s| (&s.k[layer][..], &s.v[layer][..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grow(cache: &mut KvCache, session: SessionId, tokens: usize, value: f32) {
        cache.reserve(&HashMap::from([(session, tokens)])).expect("the test budget holds these tokens");
        let row = vec![value; cache.kv_dim];
        for layer in 0..cache.layers {
            for _ in 0..tokens {
                cache.push(layer, session, &row, &row);
            }
        }
        cache.commit(session, tokens);
    }

    #[test]
    fn released_buffers_serve_new_sessions_empty_and_uncounted() {
        let (a, b) = (SessionId(1), SessionId(2));
        let mut cache = KvCache::new(2, 4, 1 << 20);
        grow(&mut cache, a, 10, 1.0);
        assert_eq!(cache.used_bytes(), 10 * cache.bytes_per_token());
        assert!(cache.release(a));
        assert_eq!(cache.used_bytes(), 0);
        assert_eq!(cache.spare.len(), 4, "two layers of keys and values kept");

        grow(&mut cache, b, 3, 2.0);
        assert!(cache.spare.is_empty(), "the new session took the kept buffers");
        assert_eq!(cache.spare_bytes, 0);
        assert_eq!(cache.used_bytes(), 3 * cache.bytes_per_token());
        for layer in 0..2 {
            let (k, v) = cache.layer(layer, b);
            assert_eq!(k, &[f16::from_f32(2.0); 12][..], "no key of the released session shows");
            assert_eq!(v, &[f16::from_f32(2.0); 12][..]);
        }
    }

    #[test]
    fn entries_are_rounded_to_the_nearest_f16() {
        let s = SessionId(9);
        let mut cache = KvCache::new(1, 3, 1 << 20);
        cache.reserve(&HashMap::from([(s, 1)])).expect("the test budget holds one token");
        // 1 + 2^-11 is halfway between two f16s: ties go to the even one (1.0).
        let tie = 1.0 + f32::powi(2.0, -11);
        cache.push(0, s, &[tie, 0.1, -65_504.0], &[1e-8, 3.0, 70_000.0]);
        let (k, v) = cache.layer(0, s);
        assert_eq!(k.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), [1.0, f16::from_f32(0.1).to_f32(), -65_504.0]);
        assert_eq!(v[0].to_f32(), 0.0, "below f16's smallest subnormal");
        assert_eq!(v[1].to_f32(), 3.0);
        assert!(v[2].is_infinite(), "past f16's range");
    }

    #[test]
    fn asking_for_the_next_slot_changes_nothing() {
        let s = SessionId(4);
        let mut cache = KvCache::new(2, 8, 1 << 20);
        grow(&mut cache, s, 3, 1.5);
        let before: Vec<Vec<KvElem>> = (0..2).map(|l| cache.layer(l, s).0.to_vec()).collect();
        cache.prefetch_slot(1, s);
        cache.prefetch_slot(0, SessionId(77));
        assert_eq!((0..2).map(|l| cache.layer(l, s).0.to_vec()).collect::<Vec<_>>(), before);
        assert_eq!((cache.len(s), cache.used_bytes()), (3, 3 * cache.bytes_per_token()));
    }

    #[test]
    fn kept_buffers_stay_within_an_eighth_of_the_budget() {
        let mut cache = KvCache::new(1, 64, 64 * 64 * 2 * 16);
        // Each session's two buffers hold 64 × 64 f16s: 8 KiB each, and
        // the budget's eighth (16 KiB) keeps two buffers.
        for s in 0..3 {
            grow(&mut cache, SessionId(s), 64, 0.5);
            cache.release(SessionId(s));
        }
        assert!(cache.spare_bytes <= cache.budget_bytes() / SPARE_SHARE);
        assert_eq!(cache.spare.len(), 2);
    }
}
