//! A real model's layers on a device against the same layers natively:
//! the first half's hidden states from the same tokens, and the second
//! half's logits from the same (native) hidden states, so each half's
//! disagreement is its own and not the other's carried forward.

use std::ops::Range;

use serde::Serialize;

use super::Agreement;
use crate::backend::{Device, DeviceStage, StageBackend};
use crate::error::{EngineError, Result};
use crate::kv_cache::SessionId;
use crate::model_file::ModelFile;
use crate::pool::ComputePool;
use crate::stage::{Row, StageInput, StageOutput};

/// One layer range's outputs on the device against native.
#[derive(Debug, Clone, Serialize)]
pub struct RangeCheck {
    /// The layers.
    pub layers: Range<usize>,
    /// `hidden` or `logits`.
    pub output: &'static str,
    /// The device's output against native's, over every prompt position.
    pub agreement: Agreement,
}

/// Bytes of KV cache each compared stage may hold (a prompt's worth).
const KV_BUDGET: usize = 256 << 20;

/// Runs `tokens` (one sequence from position 0) through the first and the
/// second half of `file`'s layers on `device` and natively.
pub fn check(file: &ModelFile, device: Device, tokens: &[u32], pool: &ComputePool) -> Result<Vec<RangeCheck>> {
    if !device.is_candle() {
        return Err(EngineError::NotACandleDevice { device: device.to_string() });
    }
    let layers = file.config().layers;
    if layers < 2 {
        return Err(EngineError::LayerRange { start: 0, end: 2, layers });
    }
    if tokens.is_empty() {
        return Err(EngineError::InvalidBatch("the self-check prompt has no tokens".into()));
    }
    let half = layers / 2;
    let rows: Vec<Row> =
        (0..tokens.len()).map(|position| Row { session: SessionId(1), position, logits: true }).collect();
    let run = |range: Range<usize>, on: Device, input: StageInput<'_>| -> Result<StageOutput> {
        let stage = DeviceStage::load(file, range, on)?;
        let mut cache = stage.new_cache(KV_BUDGET);
        stage.forward(&rows, input, &mut cache, pool)
    };
    let unexpected = |what: &str| EngineError::InvalidBatch(format!("the self-check expected {what} from a stage"));

    let first = 0..half;
    let (StageOutput::Hidden(native), StageOutput::Hidden(got)) = (
        run(first.clone(), Device::Cpu, StageInput::Tokens(tokens))?,
        run(first.clone(), device, StageInput::Tokens(tokens))?,
    ) else {
        return Err(unexpected("hidden states"));
    };
    let hidden =
        RangeCheck { layers: first, output: "hidden", agreement: Agreement::of(&native.data, &got.data, native.dim) };

    let last = half..layers;
    let (StageOutput::Logits(reference), StageOutput::Logits(logits)) = (
        run(last.clone(), Device::Cpu, StageInput::Hidden(&native))?,
        run(last.clone(), device, StageInput::Hidden(&native))?,
    ) else {
        return Err(unexpected("logits"));
    };
    let agreement = Agreement::of(&reference.data, &logits.data, reference.vocab);
    Ok(vec![hidden, RangeCheck { layers: last, output: "logits", agreement }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::TinyModel;

    #[test]
    fn both_halves_of_a_tiny_model_agree_on_candle_cpu() {
        if !crate::backend::candle_cpu_opens() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let file = ModelFile::open(&TinyModel::default().write_gguf(dir.path()).expect("fixture")).expect("model");
        let pool = ComputePool::new(1);
        let checks = check(&file, Device::CandleCpu, &[3, 70, 101, 9, 44], &pool).expect("runs");
        let layers = file.config().layers;
        assert_eq!(
            checks.iter().map(|c| (c.layers.clone(), c.output)).collect::<Vec<_>>(),
            vec![(0..layers / 2, "hidden"), (layers / 2..layers, "logits")]
        );
        for c in &checks {
            assert!(c.agreement.min_cosine > 0.998, "{c:?}");
        }
        assert!(matches!(check(&file, Device::Cpu, &[1], &pool), Err(EngineError::NotACandleDevice { .. })));
        assert!(matches!(check(&file, Device::CandleCpu, &[], &pool), Err(EngineError::InvalidBatch(_))));
    }
}
