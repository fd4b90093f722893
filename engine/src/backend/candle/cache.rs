//! Per-session keys and values kept on the candle device, under a byte budget.
//!
//! Each session holds, per layer, one key and one value tensor of
//! `capacity × kv_dim` f16 that a forward writes in place; capacity doubles
//! (up to the context) when a batch would pass it, so appending a token
//! costs a copy of that token, not of the whole history. Entries are f16,
//! as in the native cache, and the budget counts them the same way (tokens
//! held × [`crate::kv_cache::bytes_per_token_layer`] per layer), so a
//! planner's figures hold for either backend; spare capacity is not counted.

use std::collections::HashMap;

use candle_core::{DType, Device as CDevice, Tensor};

use crate::backend::{Device, SessionCache};
use crate::error::{EngineError, Result};
use crate::kv_cache::{bytes_per_token_layer, SessionId};

/// Smallest capacity a session starts with, in tokens.
const MIN_CAPACITY: usize = 16;

#[derive(Debug)]
struct SessionKv {
    len: usize,
    capacity: usize,
    /// Per local layer: `capacity × kv_dim` keys and values; the first `len` rows hold tokens.
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

/// Keys and values of every session for a candle stage's layers.
#[derive(Debug)]
pub struct CandleCache {
    device: CDevice,
    name: Device,
    layers: usize,
    kv_dim: usize,
    context: usize,
    budget: usize,
    used: usize,
    sessions: HashMap<SessionId, SessionKv>,
}

impl CandleCache {
    /// An empty cache for `layers` layers of width `kv_dim` on `device`.
    pub(crate) fn new(
        (device, name): (CDevice, Device),
        layers: usize,
        kv_dim: usize,
        context: usize,
        budget: usize,
    ) -> Self {
        Self { device, name, layers, kv_dim, context, budget, used: 0, sessions: HashMap::new() }
    }

    /// Bytes one token costs across this cache's layers.
    pub fn bytes_per_token(&self) -> usize {
        self.layers * bytes_per_token_layer(self.kv_dim)
    }

    /// Sessions currently holding cache.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Checks that growing each session by its tokens fits the budget, then
    /// claims the bytes and makes room on the device. Nothing changes on a
    /// budget error.
    pub(crate) fn reserve(&mut self, growth: &HashMap<SessionId, usize>) -> Result<()> {
        let tokens: usize = growth.values().sum();
        let needed = tokens * self.bytes_per_token();
        if self.used + needed > self.budget {
            return Err(EngineError::KvBudgetExceeded { needed, used: self.used, budget: self.budget });
        }
        for (&id, &extra) in growth {
            let s = self.sessions.entry(id).or_insert_with(|| SessionKv { len: 0, capacity: 0, k: vec![], v: vec![] });
            let want = s.len + extra;
            if want > s.capacity {
                let capacity = (s.capacity * 2).max(want).max(MIN_CAPACITY).min(self.context.max(want));
                let grow = |old: &[Tensor]| -> candle_core::Result<Vec<Tensor>> {
                    (0..self.layers)
                        .map(|l| {
                            let t = Tensor::zeros((capacity, self.kv_dim), DType::F16, &self.device)?;
                            if let Some(o) = old.get(l).filter(|_| s.len > 0) {
                                t.slice_set(&o.narrow(0, 0, s.len)?, 0, 0)?;
                            }
                            Ok(t)
                        })
                        .collect()
                };
                let (k, v) = (grow(&s.k), grow(&s.v));
                let fail = |e| EngineError::Candle {
                    device: self.name.to_string(),
                    op: "grow the KV cache",
                    source: Box::new(e),
                };
                s.k = k.map_err(fail)?;
                s.v = v.map_err(fail)?;
                s.capacity = capacity;
            }
        }
        self.used += needed;
        Ok(())
    }

    /// Writes `k` and `v` (`m × kv_dim`, f32) as `session`'s entries
    /// `at..at + m` of `layer`, rounded to f16 (room made by [`CandleCache::reserve`]).
    pub(crate) fn write(
        &self,
        layer: usize,
        session: SessionId,
        at: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<()> {
        let s = self
            .sessions
            .get(&session)
            .ok_or_else(|| candle_core::Error::Msg(format!("session {session} has no room reserved")))?;
        s.k[layer].slice_set(&k.to_dtype(DType::F16)?.contiguous()?, 0, at)?;
        s.v[layer].slice_set(&v.to_dtype(DType::F16)?.contiguous()?, 0, at)
    }

    /// The first `tokens` keys and values of `layer` for `session`, `tokens × kv_dim` each (f16).
    pub(crate) fn view(
        &self,
        layer: usize,
        session: SessionId,
        tokens: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let s = self
            .sessions
            .get(&session)
            .ok_or_else(|| candle_core::Error::Msg(format!("session {session} has no cache")))?;
        Ok((s.k[layer].narrow(0, 0, tokens)?, s.v[layer].narrow(0, 0, tokens)?))
    }

    /// Marks `tokens` more tokens as cached for `session` once every layer has them.
    pub(crate) fn commit(&mut self, session: SessionId, tokens: usize) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.len += tokens;
        }
    }

    /// Gives back the bytes [`CandleCache::reserve`] claimed when the
    /// forward that claimed them failed, so a failed batch leaves usage as it was.
    pub(crate) fn unreserve(&mut self, growth: &HashMap<SessionId, usize>) {
        let tokens: usize = growth.values().sum();
        self.used -= tokens * self.bytes_per_token();
    }
}

impl SessionCache for CandleCache {
    fn len(&self, session: SessionId) -> usize {
        self.sessions.get(&session).map_or(0, |s| s.len)
    }

    fn release(&mut self, session: SessionId) -> bool {
        match self.sessions.remove(&session) {
            Some(s) => {
                self.used -= s.len * self.bytes_per_token();
                true
            }
            None => false,
        }
    }

    fn used_bytes(&self) -> usize {
        self.used
    }

    fn budget_bytes(&self) -> usize {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_grow_in_place_and_the_budget_counts_tokens() {
        let s = SessionId(3);
        let mut cache = CandleCache::new((CDevice::Cpu, Device::CandleCpu), 2, 4, 64, 1 << 20);
        let row = |x: f32, n: usize| Tensor::full(x, (n, 4), &CDevice::Cpu).expect("tensor");
        for (step, n) in [(0usize, 10usize), (10, 9), (19, 1)] {
            cache.reserve(&HashMap::from([(s, n)])).expect("budget");
            for l in 0..2 {
                cache.write(l, s, step, &row(step as f32, n), &row(-(step as f32), n)).expect("write");
            }
            cache.commit(s, n);
        }
        assert_eq!(SessionCache::len(&cache, s), 20);
        assert_eq!(cache.used_bytes(), 20 * cache.bytes_per_token());
        let (k, v) = cache.view(1, s, 20).expect("view");
        let k: Vec<f32> = k.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()).expect("k");
        assert_eq!(k[0], 0.0);
        assert_eq!(k[10 * 4], 10.0, "kept across growth");
        assert_eq!(k[19 * 4], 19.0);
        assert_eq!(v.dims(), &[20, 4]);

        let tight = cache.bytes_per_token() * 21;
        let mut small = CandleCache::new((CDevice::Cpu, Device::CandleCpu), 2, 4, 64, tight);
        small.reserve(&HashMap::from([(s, 20)])).expect("fits");
        let err = small.reserve(&HashMap::from([(s, 2)])).expect_err("over budget");
        assert!(matches!(err, EngineError::KvBudgetExceeded { .. }), "{err}");
        assert_eq!(small.used_bytes(), 20 * small.bytes_per_token(), "a refused batch claims nothing");
        assert!(cache.release(s));
        assert_eq!((cache.used_bytes(), cache.session_count()), (0, 0));
    }
}
