//! The native backend keeps the contract with the stage and cache it
//! already has: each method forwards to the inherent one of the same name,
//! which the compiler resolves statically, so nothing is added to its path.

use std::ops::Range;

use super::{SessionCache, StageBackend};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv_cache::{KvCache, SessionId};
use crate::pool::ComputePool;
use crate::stage::{Logits, Row, Stage, StageInput, StageOutput};

impl SessionCache for KvCache {
    fn len(&self, session: SessionId) -> usize {
        KvCache::len(self, session)
    }

    fn release(&mut self, session: SessionId) -> bool {
        KvCache::release(self, session)
    }

    fn used_bytes(&self) -> usize {
        KvCache::used_bytes(self)
    }

    fn budget_bytes(&self) -> usize {
        KvCache::budget_bytes(self)
    }
}

impl StageBackend for Stage {
    type Cache = KvCache;

    fn config(&self) -> &ModelConfig {
        Stage::config(self)
    }

    fn range(&self) -> Range<usize> {
        Stage::range(self)
    }

    fn is_first(&self) -> bool {
        Stage::is_first(self)
    }

    fn is_last(&self) -> bool {
        Stage::is_last(self)
    }

    fn weight_bytes(&self) -> usize {
        Stage::weight_bytes(self)
    }

    fn new_cache(&self, budget_bytes: usize) -> KvCache {
        Stage::new_cache(self, budget_bytes)
    }

    fn forward(
        &self,
        rows: &[Row],
        input: StageInput<'_>,
        cache: &mut KvCache,
        pool: &ComputePool,
    ) -> Result<StageOutput> {
        Stage::forward(self, rows, input, cache, pool)
    }

    fn recycle(&self, logits: Logits) {
        Stage::recycle(self, logits);
    }
}
