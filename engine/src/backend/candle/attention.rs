//! Rotary embeddings at per-row positions and causal attention of each
//! session against its own cache, on a candle device.
//!
//! The matmuls of a layer take the whole batch; attention cannot, since
//! each session sees its own history, so it runs session by session on the
//! rows that session has in the batch (one row in decode, a chunk in prefill).

use candle_core::{DType, Device as CDevice, Result, Tensor};

use crate::config::{ModelConfig, RopeStyle};
use crate::kv_cache::SessionId;
use crate::stage::Row;

/// Rotary cosines and sines of every row of a batch, shared by every layer.
pub(super) struct Rotary {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

impl Rotary {
    /// The angles of each row at its own position, computed on the host as
    /// the native engine computes them (ggml's repeated products), so both
    /// backends rotate by the same values.
    pub fn new(c: &ModelConfig, rows: &[Row], device: &CDevice) -> Result<Self> {
        let half = c.head_dim / 2;
        let mut table = vec![(0.0f32, 0.0f32); half];
        let (mut cos, mut sin) = (Vec::with_capacity(rows.len() * half), Vec::with_capacity(rows.len() * half));
        for r in rows {
            crate::kernels::rope::angles(&mut table, c.head_dim, r.position, c.rope_theta);
            cos.extend(table.iter().map(|t| t.0));
            sin.extend(table.iter().map(|t| t.1));
        }
        let n = rows.len();
        Ok(Self {
            cos: Tensor::from_vec(cos, (n, 1, half), device)?,
            sin: Tensor::from_vec(sin, (n, 1, half), device)?,
            style: c.rope_style,
        })
    }

    /// Rotates `x` (`n × heads·head_dim`), each row by its own angles.
    pub fn rotate(&self, x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
        let n = x.dim(0)?;
        // Each row is a batch of one token: (batch, heads, seq 1, head_dim).
        let x = x.reshape((n, heads, 1, head_dim))?.contiguous()?;
        let out = match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &self.cos, &self.sin)?,
            RopeStyle::HalfSplit => candle_nn::rotary_emb::rope(&x, &self.cos, &self.sin)?,
        };
        out.reshape((n, heads * head_dim))
    }
}

/// One session's rows in a batch.
pub(super) struct SessionRows {
    /// The session.
    pub id: SessionId,
    /// Position of its first row in the batch (its rows follow in order).
    pub start: usize,
    /// How many rows it has.
    pub count: usize,
    /// Batch indices of its rows when they are not consecutive.
    pick: Option<Tensor>,
    /// First batch index when they are.
    first: usize,
}

impl SessionRows {
    /// This session's rows of `x`.
    pub fn take(&self, x: &Tensor) -> Result<Tensor> {
        match &self.pick {
            Some(idx) => x.index_select(idx, 0),
            None => x.narrow(0, self.first, self.count),
        }
    }
}

/// The batch grouped by session, and how to put per-session results back
/// into batch order.
pub(super) struct Sessions {
    pub groups: Vec<SessionRows>,
    /// Batch order from the session-grouped order, when they differ.
    unpermute: Option<Tensor>,
}

impl Sessions {
    /// Groups `rows` by session (first appearance order).
    pub fn new(rows: &[Row], device: &CDevice) -> Result<Self> {
        let mut order: Vec<(SessionId, Vec<usize>)> = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            match order.iter_mut().find(|(s, _)| *s == r.session) {
                Some((_, v)) => v.push(i),
                None => order.push((r.session, vec![i])),
            }
        }
        let flat: Vec<usize> = order.iter().flat_map(|(_, v)| v.iter().copied()).collect();
        let unpermute = if flat.iter().enumerate().all(|(i, &j)| i == j) {
            None
        } else {
            let mut inverse = vec![0u32; flat.len()];
            for (grouped, &batch) in flat.iter().enumerate() {
                inverse[batch] = u32::try_from(grouped).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            }
            Some(Tensor::new(inverse, device)?)
        };
        let groups = order
            .into_iter()
            .map(|(id, idx)| {
                let consecutive = idx.windows(2).all(|w| w[1] == w[0] + 1);
                let pick = if consecutive {
                    None
                } else {
                    let idx: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
                    Some(Tensor::new(idx, device)?)
                };
                Ok(SessionRows { id, start: rows[idx[0]].position, count: idx.len(), pick, first: idx[0] })
            })
            .collect::<Result<_>>()?;
        Ok(Self { groups, unpermute })
    }

    /// Per-session results (in [`Sessions::groups`] order) back in batch order.
    pub fn gather(&self, parts: &[Tensor]) -> Result<Tensor> {
        let all = Tensor::cat(parts, 0)?;
        match &self.unpermute {
            Some(idx) => all.index_select(idx, 0),
            None => Ok(all),
        }
    }
}

/// Causal attention of one session's `m` query rows (`m × heads·head_dim`,
/// at positions `start..start + m`) over its first `start + m` cached keys
/// and values (f16). Queries and attention weights are rounded to f16
/// before they meet the cache, as the native engine rounds them, so the
/// backends differ in summation order only.
pub(super) fn attend(c: &ModelConfig, q: &Tensor, keys: &Tensor, values: &Tensor, start: usize) -> Result<Tensor> {
    let (m, hd, kvh) = (q.dim(0)?, c.head_dim, c.kv_heads);
    let group = c.heads / kvh;
    let seen = start + m;
    // (m, heads, hd) → (heads, m, hd) → (kv_heads, group·m, hd): query
    // head h = kv_head·group + g, so a kv head's queries are consecutive.
    let q = q.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
    let q = q.reshape((m, c.heads, hd))?.transpose(0, 1)?.contiguous()?.reshape((kvh, group * m, hd))?;
    let k = keys.reshape((seen, kvh, hd))?.transpose(0, 1)?.to_dtype(DType::F32)?.contiguous()?;
    let v = values.reshape((seen, kvh, hd))?.transpose(0, 1)?.to_dtype(DType::F32)?.contiguous()?;
    #[allow(clippy::cast_precision_loss)]
    let scale = 1.0 / (hd as f64).sqrt();
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if m > 1 {
        // Row j (position start + j) sees keys 0..=start + j.
        let mut mask = vec![0.0f32; group * m * seen];
        for (r, row) in mask.chunks_exact_mut(seen).enumerate() {
            row[start + r % m + 1..].fill(f32::NEG_INFINITY);
        }
        let mask = Tensor::from_vec(mask, (group * m, seen), q.device())?;
        scores = scores.broadcast_add(&mask)?;
    }
    let weights = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
    let out = weights.matmul(&v)?; // (kv_heads, group·m, hd)
    out.reshape((c.heads, m, hd))?.transpose(0, 1)?.contiguous()?.reshape((m, c.heads * hd))
}
