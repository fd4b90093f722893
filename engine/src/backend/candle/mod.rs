//! The candle backend: a stage on a `candle_core::Device` (CPU, CUDA,
//! Metal), its weights quantized on the device and its KV cache there too.
//!
//! One forward per micro-batch: every matmul takes all rows at once (candle
//! picks its kernels by batch size; on CUDA, MMVQ for a few rows and MMQ for
//! more), RoPE rotates each row at its own position, and attention runs per
//! session against that session's device-resident cache. Only token ids,
//! hidden states and the logits rows asked for cross to the host.

mod attention;
mod cache;
mod weights;

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device as CDevice, Module, Tensor};

pub use cache::CandleCache;
pub(crate) use weights::candle_dtype;

use self::attention::{attend, Rotary, Sessions};
use self::weights::{matmul_bytes, Loader};
use super::{batch_check, Device, StageBackend};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::hidden::Hidden;
use crate::model_file::ModelFile;
use crate::pool::ComputePool;
use crate::stage::{Logits, Row, StageInput, StageOutput};

struct Block {
    attn_norm: Tensor,
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    o: QMatMul,
    bias: Option<[Tensor; 3]>,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

struct Head {
    norm: Tensor,
    lm_head: QMatMul,
}

/// Layers `[start, end)` of a model loaded onto a candle device.
pub struct CandleStage {
    config: ModelConfig,
    range: Range<usize>,
    device: CDevice,
    name: Device,
    embed: Option<Arc<QTensor>>,
    blocks: Vec<Block>,
    head: Option<Head>,
    weight_bytes: usize,
}

impl std::fmt::Debug for CandleStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleStage").field("device", &self.name).field("range", &self.range).finish_non_exhaustive()
    }
}

impl CandleStage {
    /// Loads the tensors of `range` (and embedding/head when at an end) from
    /// `file` onto `device` (`name` is how errors and reports call it).
    pub fn load(file: &ModelFile, range: Range<usize>, device: CDevice, name: Device) -> Result<Self> {
        let c = file.config().clone();
        if range.start >= range.end || range.end > c.layers {
            return Err(EngineError::LayerRange { start: range.start, end: range.end, layers: c.layers });
        }
        let l = Loader { file, device: &device, name };
        let (d, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
        let blocks: Vec<Block> = range
            .clone()
            .map(|i| {
                let n = |t: &str| format!("blk.{i}.{t}");
                let bias = if c.arch.has_qkv_bias() {
                    Some([
                        l.vector(&n("attn_q.bias"), q)?,
                        l.vector(&n("attn_k.bias"), kv)?,
                        l.vector(&n("attn_v.bias"), kv)?,
                    ])
                } else {
                    None
                };
                Ok(Block {
                    attn_norm: l.vector(&n("attn_norm.weight"), d)?,
                    q: l.matmul(&n("attn_q.weight"), q, d)?,
                    k: l.matmul(&n("attn_k.weight"), kv, d)?,
                    v: l.matmul(&n("attn_v.weight"), kv, d)?,
                    o: l.matmul(&n("attn_output.weight"), d, q)?,
                    bias,
                    ffn_norm: l.vector(&n("ffn_norm.weight"), d)?,
                    gate: l.matmul(&n("ffn_gate.weight"), f, d)?,
                    up: l.matmul(&n("ffn_up.weight"), f, d)?,
                    down: l.matmul(&n("ffn_down.weight"), d, f)?,
                })
            })
            .collect::<Result<_>>()?;
        let tied = !file.has("output.weight");
        let (first, last) = (range.start == 0, range.end == c.layers);
        let embed = if first { Some(l.qtensor("token_embd.weight", c.vocab, d)?) } else { None };
        let head = if last {
            let lm_head = match (&embed, tied) {
                (Some(e), true) => QMatMul::from_arc(e.clone()).map_err(|e| l.load_error("token_embd.weight", 0, e))?,
                (None, true) => l.matmul("token_embd.weight", c.vocab, d)?,
                (_, false) => l.matmul("output.weight", c.vocab, d)?,
            };
            Some(Head { norm: l.vector("output_norm.weight", d)?, lm_head })
        } else {
            None
        };
        let mut weight_bytes: usize =
            blocks.iter().flat_map(|b| [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]).map(matmul_bytes).sum();
        weight_bytes += embed.as_ref().map_or(0, |e| e.storage_size_in_bytes());
        weight_bytes += match (&head, &embed) {
            // A tied head shares the embedding's storage unless candle made it dense.
            (Some(h), Some(_)) if tied && matches!(h.lm_head, QMatMul::QTensor(_)) => 0,
            (Some(h), _) => matmul_bytes(&h.lm_head),
            (None, _) => 0,
        };
        Ok(Self { config: c, range, device, name, embed, blocks, head, weight_bytes })
    }

    /// The device the stage runs on.
    pub fn device(&self) -> Device {
        self.name
    }

    fn fail(&self, op: &'static str) -> impl Fn(candle_core::Error) -> EngineError + '_ {
        move |source| EngineError::Candle { device: self.name.to_string(), op, source: Box::new(source) }
    }

    /// The layers and head over a batch whose cache room is reserved.
    fn run(&self, rows: &[Row], input: StageInput<'_>, cache: &CandleCache) -> candle_core::Result<StageOutput> {
        let c = &self.config;
        let n = rows.len();
        let mut x = match (input, &self.embed) {
            (StageInput::Tokens(ids), Some(embed)) => embed.embedding(&Tensor::new(ids, &self.device)?)?,
            (StageInput::Hidden(h), _) => Tensor::from_slice(&h.data, (n, c.hidden), &self.device)?,
            (StageInput::Tokens(_), None) => candle_core::bail!("tokens given to a stage without the embedding"),
        };
        let rotary = Rotary::new(c, rows, &self.device)?;
        let sessions = Sessions::new(rows, &self.device)?;
        for (local, block) in self.blocks.iter().enumerate() {
            x = self.block(block, local, &x, &rotary, &sessions, cache)?;
        }
        match &self.head {
            None => Ok(StageOutput::Hidden(Hidden { rows: n, dim: c.hidden, data: x.flatten_all()?.to_vec1()? })),
            Some(head) => {
                let picked: Vec<usize> = (0..n).filter(|&i| rows[i].logits).collect();
                if picked.is_empty() {
                    return Ok(StageOutput::Logits(Logits { rows: picked, vocab: c.vocab, data: Vec::new() }));
                }
                let idx: Vec<u32> = picked.iter().map(|&i| i as u32).collect();
                let x = x.index_select(&Tensor::new(idx, &self.device)?, 0)?;
                let h = candle_nn::ops::rms_norm(&x, &head.norm, c.rms_eps)?;
                let data = head.lm_head.forward(&h)?.flatten_all()?.to_vec1()?;
                Ok(StageOutput::Logits(Logits { rows: picked, vocab: c.vocab, data }))
            }
        }
    }

    fn block(
        &self,
        b: &Block,
        local: usize,
        x: &Tensor,
        rotary: &Rotary,
        sessions: &Sessions,
        cache: &CandleCache,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let h = candle_nn::ops::rms_norm(x, &b.attn_norm, c.rms_eps)?;
        let (mut q, mut k, mut v) = (b.q.forward(&h)?, b.k.forward(&h)?, b.v.forward(&h)?);
        if let Some([bq, bk, bv]) = &b.bias {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        let q = rotary.rotate(&q, c.heads, c.head_dim)?;
        let k = rotary.rotate(&k, c.kv_heads, c.head_dim)?;
        let mut parts = Vec::with_capacity(sessions.groups.len());
        for s in &sessions.groups {
            cache.write(local, s.id, s.start, &s.take(&k)?, &s.take(&v)?)?;
            let (keys, values) = cache.view(local, s.id, s.start + s.count)?;
            parts.push(attend(c, &s.take(&q)?, &keys, &values, s.start)?);
        }
        let attn = sessions.gather(&parts)?;
        let x = (x + b.o.forward(&attn)?)?;
        let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, c.rms_eps)?;
        let act = (candle_nn::ops::silu(&b.gate.forward(&h)?)? * b.up.forward(&h)?)?;
        x + b.down.forward(&act)?
    }
}

impl StageBackend for CandleStage {
    type Cache = CandleCache;

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    fn is_first(&self) -> bool {
        self.embed.is_some()
    }

    fn is_last(&self) -> bool {
        self.head.is_some()
    }

    fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    fn new_cache(&self, budget_bytes: usize) -> CandleCache {
        let c = &self.config;
        CandleCache::new((self.device.clone(), self.name), self.blocks.len(), c.kv_dim(), c.context, budget_bytes)
    }

    fn forward(
        &self,
        rows: &[Row],
        input: StageInput<'_>,
        cache: &mut CandleCache,
        _pool: &ComputePool,
    ) -> Result<StageOutput> {
        let growth =
            batch_check::growth(&self.config, self.is_first(), rows, input, |s| super::SessionCache::len(cache, s))?;
        cache.reserve(&growth)?;
        match self.run(rows, input, cache) {
            Ok(out) => {
                for (&session, &tokens) in &growth {
                    cache.commit(session, tokens);
                }
                Ok(out)
            }
            Err(e) => {
                cache.unreserve(&growth);
                Err(self.fail("run a batch")(e))
            }
        }
    }

    /// candle allocates each call's outputs itself, so there is no buffer to keep.
    fn recycle(&self, _logits: Logits) {}
}
