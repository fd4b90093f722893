//! Several stages chained in one process.
//!
//! This is what `potluck generate` and `potluck perplexity` run, and the
//! reference a distributed pipeline is compared against: hidden states pass
//! between stages rounded through the wire dtype, exactly as they would
//! travel over the network. Each stage may run on its own device (native
//! CPU, candle CPU, CUDA, Metal), so a mixed pipeline can be checked in one
//! process.

use crate::backend::{Device, DeviceCache, DeviceError, DeviceStage, SessionCache, StageBackend};
use crate::error::{EngineError, Result};
use crate::hidden::WireDtype;
use crate::kv_cache::SessionId;
use crate::model_file::ModelFile;
use crate::pool::ComputePool;
use crate::sampling::{Sampled, Sampler};
use crate::stage::{Logits, Row, StageInput, StageOutput};

/// Default prompt chunk: long enough to batch well, short enough to bound scratch memory.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// Stages `[b0, b1), [b1, b2), …` of one model, with their caches.
#[derive(Debug)]
pub struct LocalPipeline {
    stages: Vec<(DeviceStage, DeviceCache)>,
    wire: WireDtype,
    pool: ComputePool,
}

impl LocalPipeline {
    /// Loads the stages cut at `boundaries` (e.g. `[0, 10, 30]`; `[0, layers]` for one stage)
    /// on the native CPU backend.
    pub fn load(
        file: &ModelFile,
        boundaries: &[usize],
        wire: WireDtype,
        kv_budget: usize,
        threads: usize,
    ) -> Result<Self> {
        let stages = boundaries.len().saturating_sub(1);
        Self::load_on(file, boundaries, &vec![Device::Cpu; stages], wire, kv_budget, threads)
    }

    /// Loads the stages cut at `boundaries`, stage `i` on `devices[i]`.
    pub fn load_on(
        file: &ModelFile,
        boundaries: &[usize],
        devices: &[Device],
        wire: WireDtype,
        kv_budget: usize,
        threads: usize,
    ) -> Result<Self> {
        let layers = file.config().layers;
        if boundaries.len() < 2 || boundaries[0] != 0 || boundaries.last() != Some(&layers) {
            return Err(EngineError::LayerRange {
                start: boundaries.first().copied().unwrap_or(0),
                end: boundaries.last().copied().unwrap_or(0),
                layers,
            });
        }
        if devices.len() + 1 != boundaries.len() {
            let stages = boundaries.len().saturating_sub(1);
            return Err(DeviceError::PerStage { devices: devices.len(), stages }.into());
        }
        let stages = boundaries
            .windows(2)
            .zip(devices)
            .map(|(w, &device)| {
                let stage = DeviceStage::load(file, w[0]..w[1], device)?;
                let cache = stage.new_cache(kv_budget);
                Ok((stage, cache))
            })
            .collect::<Result<_>>()?;
        Ok(Self { stages, wire, pool: ComputePool::new(threads) })
    }

    /// Cut points splitting `layers` into `parts` near-equal consecutive stages.
    pub fn even_boundaries(layers: usize, parts: usize) -> Vec<usize> {
        let parts = parts.clamp(1, layers.max(1));
        (0..=parts).map(|i| i * layers / parts).collect()
    }

    /// Threads the compute pool uses.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Runs one batch through every stage.
    pub fn forward(&mut self, rows: &[Row], tokens: &[u32]) -> Result<Logits> {
        let mut input: Option<crate::hidden::Hidden> = None;
        for (stage, cache) in &mut self.stages {
            let out = match &input {
                None => stage.forward(rows, StageInput::Tokens(tokens), cache, &self.pool)?,
                Some(h) => stage.forward(rows, StageInput::Hidden(h), cache, &self.pool)?,
            };
            match out {
                StageOutput::Hidden(mut h) => {
                    h.round_trip(self.wire);
                    input = Some(h);
                }
                StageOutput::Logits(l) => return Ok(l),
            }
        }
        Err(EngineError::InvalidBatch("the pipeline has no last stage".into()))
    }

    /// Hands logits from [`LocalPipeline::forward`] back once read, so the
    /// next step reuses their buffer (see [`crate::Stage::recycle`]).
    pub fn recycle(&self, logits: Logits) {
        if let Some((stage, _)) = self.stages.last() {
            stage.recycle(logits);
        }
    }

    /// Frees a session on every stage.
    pub fn release(&mut self, session: SessionId) {
        for (_, cache) in &mut self.stages {
            cache.release(session);
        }
    }

    /// Bytes of KV cache in use across stages.
    pub fn kv_bytes(&self) -> usize {
        self.stages.iter().map(|(_, c)| c.used_bytes()).sum()
    }

    /// Feeds `prompt` in chunks of `chunk` tokens and returns the logits of its last token.
    pub fn prefill(&mut self, session: SessionId, prompt: &[u32], chunk: usize) -> Result<Vec<f32>> {
        let start = self.stages.first().map_or(0, |(_, c)| c.len(session));
        let mut last = Vec::new();
        let chunk = chunk.max(1);
        for (ci, piece) in prompt.chunks(chunk).enumerate() {
            let rows: Vec<Row> = (0..piece.len())
                .map(|j| Row { session, position: start + ci * chunk + j, logits: ci * chunk + j + 1 == prompt.len() })
                .collect();
            let logits = self.forward(&rows, piece)?;
            if !logits.rows.is_empty() {
                last = logits.row(0).to_vec();
            }
            self.recycle(logits);
        }
        if last.is_empty() {
            return Err(EngineError::InvalidBatch("empty prompt".into()));
        }
        Ok(last)
    }

    /// Generates up to `max_tokens` after `prompt`, stopping after a token
    /// for which `stop` is true (that token is still reported).
    pub fn generate(
        &mut self,
        session: SessionId,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        stop: impl Fn(u32) -> bool,
        mut on_token: impl FnMut(&Sampled),
    ) -> Result<Vec<u32>> {
        let context = self.stages.first().map_or(0, |(s, _)| s.config().context);
        if prompt.len() + max_tokens > context {
            return Err(EngineError::ContextExceeded { position: prompt.len() + max_tokens, context });
        }
        let mut logits = self.prefill(session, prompt, DEFAULT_PREFILL_CHUNK)?;
        let mut history = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..max_tokens {
            let s = sampler.sample(&logits, &history);
            on_token(&s);
            out.push(s.token);
            history.push(s.token);
            if stop(s.token) || out.len() == max_tokens {
                break;
            }
            let row = Row { session, position: history.len() - 1, logits: true };
            let step = self.forward(&[row], &[s.token])?;
            logits = step.row(0).to_vec();
            self.recycle(step);
        }
        Ok(out)
    }
}
