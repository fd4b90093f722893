//! The stage contract and its two backends.
//!
//! A stage is a layer range (with the embedding on the first stage, the
//! final norm and lm_head on the last) that runs a batch of rows from many
//! sessions, each at its own position, against an explicit per-session KV
//! cache under a byte budget: hidden states in, hidden states or logits
//! out. [`StageBackend`] states that contract once; two implementations
//! keep it:
//!
//! - `native` ([`crate::Stage`]): the project's own CPU kernels,
//!   batch-invariant and bit-exact;
//! - `candle` ([`CandleStage`]): candle-core on a CPU, CUDA or Metal device,
//!   weights quantized and the KV cache resident on that device.
//!
//! Callers that choose the backend at run time (the worker, the CLI, a
//! mixed [`crate::LocalPipeline`]) hold a [`DeviceStage`] and its
//! [`DeviceCache`]: an enum rather than a boxed trait object, so the
//! native hot path is a direct call with no allocation or copy added, and
//! a cache can never be handed to a stage of the other kind unnoticed.

mod batch_check;
pub mod candle;
mod device;
/// For tests that run candle-cpu: whether it opens here (see the function).
#[cfg(test)]
pub(crate) use device::tests::candle_cpu_opens;
mod native;
#[cfg(test)]
mod tests;

use std::ops::Range;

pub use self::candle::{CandleCache, CandleStage};
pub use device::{Device, DeviceError};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::{KvCache, SessionId};
use crate::model_file::ModelFile;
use crate::pool::ComputePool;
use crate::stage::{Logits, Row, Stage, StageInput, StageOutput};

/// Per-session keys and values of one stage's layers, under a byte budget.
///
/// Why a trait: each backend keeps its cache where its kernels read it
/// (host memory for native, device memory for candle), but the worker
/// frees sessions and reports usage the same way for both.
pub trait SessionCache {
    /// Tokens cached for `session` (0 if unknown).
    fn len(&self, session: SessionId) -> usize;
    /// Frees a session's cache; returns whether it existed.
    fn release(&mut self, session: SessionId) -> bool;
    /// Bytes in use across all sessions, counted as the budget counts them.
    fn used_bytes(&self) -> usize;
    /// The byte budget.
    fn budget_bytes(&self) -> usize;
}

/// A loaded layer range that runs batches: the one contract both backends
/// keep, so a pipeline may mix them stage by stage.
pub trait StageBackend {
    /// The KV cache this backend reads and writes.
    type Cache: SessionCache;
    /// The model's shape.
    fn config(&self) -> &ModelConfig;
    /// The layers this stage runs.
    fn range(&self) -> Range<usize>;
    /// Whether this stage takes token ids (holds the embedding).
    fn is_first(&self) -> bool;
    /// Whether this stage produces logits (holds the head).
    fn is_last(&self) -> bool;
    /// Bytes of weights held on the stage's device.
    fn weight_bytes(&self) -> usize;
    /// An empty KV cache for this stage's layers holding at most `budget_bytes`.
    fn new_cache(&self, budget_bytes: usize) -> Self::Cache;
    /// Runs the batch through this stage's layers. Every row appends its
    /// key and value to its session's cache; a batch that would pass the
    /// budget fails with [`EngineError::KvBudgetExceeded`] and changes nothing.
    fn forward(
        &self,
        rows: &[Row],
        input: StageInput<'_>,
        cache: &mut Self::Cache,
        pool: &ComputePool,
    ) -> Result<StageOutput>;
    /// Hands logits from [`StageBackend::forward`] back once read, so a
    /// backend that keeps buffers can reuse them.
    fn recycle(&self, logits: Logits);
}

/// A stage on whichever backend its device calls for.
#[derive(Debug)]
pub enum DeviceStage {
    /// The native CPU kernels.
    Native(Stage),
    /// candle on a CPU, CUDA or Metal device.
    Candle(CandleStage),
}

/// The cache of a [`DeviceStage`], of the matching kind.
#[derive(Debug)]
pub enum DeviceCache {
    /// Host-memory cache of a native stage.
    Native(KvCache),
    /// Device-resident cache of a candle stage.
    Candle(CandleCache),
}

impl DeviceStage {
    /// Loads layers `range` of `file` onto `device`.
    pub fn load(file: &ModelFile, range: Range<usize>, device: Device) -> Result<Self> {
        match device.open_candle()? {
            None => Ok(Self::Native(Stage::load(file, range)?)),
            Some(d) => Ok(Self::Candle(CandleStage::load(file, range, d, device)?)),
        }
    }

    /// The device the stage runs on.
    pub fn device(&self) -> Device {
        match self {
            Self::Native(_) => Device::Cpu,
            Self::Candle(s) => s.device(),
        }
    }
}

impl StageBackend for DeviceStage {
    type Cache = DeviceCache;

    fn config(&self) -> &ModelConfig {
        match self {
            Self::Native(s) => s.config(),
            Self::Candle(s) => s.config(),
        }
    }

    fn range(&self) -> Range<usize> {
        match self {
            Self::Native(s) => s.range(),
            Self::Candle(s) => s.range(),
        }
    }

    fn is_first(&self) -> bool {
        match self {
            Self::Native(s) => s.is_first(),
            Self::Candle(s) => s.is_first(),
        }
    }

    fn is_last(&self) -> bool {
        match self {
            Self::Native(s) => s.is_last(),
            Self::Candle(s) => s.is_last(),
        }
    }

    fn weight_bytes(&self) -> usize {
        match self {
            Self::Native(s) => s.weight_bytes(),
            Self::Candle(s) => s.weight_bytes(),
        }
    }

    fn new_cache(&self, budget_bytes: usize) -> DeviceCache {
        match self {
            Self::Native(s) => DeviceCache::Native(s.new_cache(budget_bytes)),
            Self::Candle(s) => DeviceCache::Candle(s.new_cache(budget_bytes)),
        }
    }

    fn forward(
        &self,
        rows: &[Row],
        input: StageInput<'_>,
        cache: &mut DeviceCache,
        pool: &ComputePool,
    ) -> Result<StageOutput> {
        match (self, cache) {
            (Self::Native(s), DeviceCache::Native(c)) => s.forward(rows, input, c, pool),
            (Self::Candle(s), DeviceCache::Candle(c)) => StageBackend::forward(s, rows, input, c, pool),
            _ => Err(EngineError::InvalidBatch("the KV cache belongs to a stage of the other backend".into())),
        }
    }

    fn recycle(&self, logits: Logits) {
        match self {
            Self::Native(s) => s.recycle(logits),
            Self::Candle(s) => StageBackend::recycle(s, logits),
        }
    }
}

impl SessionCache for DeviceCache {
    fn len(&self, session: SessionId) -> usize {
        match self {
            Self::Native(c) => c.len(session),
            Self::Candle(c) => SessionCache::len(c, session),
        }
    }

    fn release(&mut self, session: SessionId) -> bool {
        match self {
            Self::Native(c) => c.release(session),
            Self::Candle(c) => SessionCache::release(c, session),
        }
    }

    fn used_bytes(&self) -> usize {
        match self {
            Self::Native(c) => c.used_bytes(),
            Self::Candle(c) => SessionCache::used_bytes(c),
        }
    }

    fn budget_bytes(&self) -> usize {
        match self {
            Self::Native(c) => c.budget_bytes(),
            Self::Candle(c) => SessionCache::budget_bytes(c),
        }
    }
}
