//! What the planner needs to know about the model: bytes and work per layer,
//! what the first and last stage hold besides, and what crosses a link.

/// Bytes on the wire per element of a hidden state when the model's shape
/// is all we know: the default hand-off dtype is f16.
pub const WIRE_BYTES_PER_ELEMENT: u64 = 2;

/// The model as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelCost {
    /// Transformer blocks.
    pub layers: usize,
    /// Weight bytes of one block.
    pub layer_bytes: u64,
    /// Weight bytes of the embedding (first stage).
    pub embed_bytes: u64,
    /// Weight bytes of the final norm and lm_head (last stage).
    pub head_bytes: u64,
    /// Multiply-adds of one block per token (0 = unknown: the head is then
    /// counted as free, and compute is split by speed alone).
    pub layer_macs: u64,
    /// Multiply-adds of the lm_head per token.
    pub head_macs: u64,
    /// KV cache bytes every stage is asked to keep (the workers' KV budget).
    pub kv_budget_bytes: u64,
    /// Bytes one row's hidden state takes on the wire between two stages.
    pub hidden_bytes: u64,
}

/// A model's dimensions, for pricing a model the planner has no file of
/// (`potluck plan` and `potluck bench plan` with a named shape).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelShape {
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden size.
    pub hidden: u64,
    /// Feed-forward size.
    pub ffn: u64,
    /// Width of the K and V projections (KV heads × head size).
    pub kv_width: u64,
    /// Vocabulary (the last stage holds a head of this many rows even when
    /// the file ties it to the embedding: the stages are on different workers).
    pub vocab: u64,
    /// Average weight bits per parameter of the file type (quantized).
    pub bits_per_weight: f64,
}

impl ModelCost {
    /// Weight bytes per layer, of the embedding and of the head, from the file
    /// (the KV budget comes from the configuration).
    pub fn of_file(
        path: &std::path::Path,
        c: &potluck_engine::ModelConfig,
    ) -> Result<Self, crate::error::CoordinatorError> {
        let g = potluck_engine::gguf::GgufFile::open(path)?;
        let size = |pred: &dyn Fn(&str) -> bool| -> u64 {
            g.tensors.iter().filter(|(n, _)| pred(n)).map(|(_, t)| t.n_bytes as u64).sum()
        };
        let blocks = size(&|n| n.starts_with("blk."));
        let embed = size(&|n| n == "token_embd.weight");
        let output = size(&|n| n == "output.weight");
        let head = size(&|n| n == "output_norm.weight") + if output > 0 { output } else { embed };
        // Multiply-adds per token: one per weight of every matrix (norms and biases are noise).
        let elements = |pred: &dyn Fn(&str) -> bool| -> u64 {
            g.tensors
                .iter()
                .filter(|(n, t)| pred(n) && t.dims.len() == 2)
                .map(|(_, t)| t.dims.iter().product::<usize>() as u64)
                .sum()
        };
        let head_name = if output > 0 { "output.weight" } else { "token_embd.weight" };
        Ok(Self {
            layers: c.layers,
            layer_bytes: blocks / c.layers.max(1) as u64,
            embed_bytes: embed,
            head_bytes: head,
            layer_macs: elements(&|n| n.starts_with("blk.")) / c.layers.max(1) as u64,
            head_macs: elements(&|n| n == head_name),
            kv_budget_bytes: 0,
            hidden_bytes: c.hidden as u64 * WIRE_BYTES_PER_ELEMENT,
        })
    }

    /// The cost of a model known only by its dimensions.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    pub fn of_shape(s: ModelShape, kv_budget_bytes: u64) -> Self {
        let bytes = |params: u64| (params as f64 * s.bits_per_weight / 8.0).ceil() as u64;
        let layer_params = 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_width + 3 * s.hidden * s.ffn;
        let table = s.vocab * s.hidden;
        Self {
            layers: s.layers,
            layer_bytes: bytes(layer_params),
            embed_bytes: bytes(table),
            head_bytes: bytes(table) + s.hidden * 4,
            layer_macs: layer_params,
            head_macs: table,
            kv_budget_bytes,
            hidden_bytes: s.hidden * WIRE_BYTES_PER_ELEMENT,
        }
    }

    /// The lm_head's work in layers: what the last stage pays on top of its blocks.
    #[allow(clippy::cast_precision_loss)]
    pub fn head_layers(&self) -> f64 {
        if self.layer_macs == 0 {
            0.0
        } else {
            self.head_macs as f64 / self.layer_macs as f64
        }
    }

    /// Bytes a stage of `layers` layers needs: its weights, the embedding if
    /// it is first, the head if it is last, and the KV budget.
    pub fn stage_bytes(&self, layers: usize, first: bool, last: bool) -> u64 {
        (layers as u64)
            .saturating_mul(self.layer_bytes)
            .saturating_add(if first { self.embed_bytes } else { 0 })
            .saturating_add(if last { self.head_bytes } else { 0 })
            .saturating_add(self.kv_budget_bytes)
    }

    /// The most layers `memory` holds in a stage at that place (capped at the model's).
    pub fn capacity(&self, memory: u64, first: bool, last: bool) -> usize {
        let room = memory.saturating_sub(self.stage_bytes(0, first, last));
        let layers = room / self.layer_bytes.max(1);
        usize::try_from(layers).unwrap_or(usize::MAX).min(self.layers)
    }

    /// Bytes the smallest possible stage needs: one layer and the KV budget.
    pub fn one_layer_bytes(&self) -> u64 {
        self.stage_bytes(1, false, false)
    }

    /// Bytes the whole model needs on one worker: the least any pool must offer.
    pub fn whole_model_bytes(&self) -> u64 {
        self.stage_bytes(self.layers, true, true)
    }
}

/// A 30-layer model of 100 bytes a layer, for tests of what builds on plans.
#[cfg(test)]
pub(crate) fn test_cost(embed_bytes: u64, head_bytes: u64, kv_budget_bytes: u64) -> ModelCost {
    ModelCost {
        layers: 30,
        layer_bytes: 100,
        embed_bytes,
        head_bytes,
        layer_macs: 0,
        head_macs: 0,
        kv_budget_bytes,
        hidden_bytes: 0,
    }
}
