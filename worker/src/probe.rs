//! The start-up probe: how long one decode step spends in one layer of the
//! cluster's model on this machine. The leader publishes the model's shape in
//! etcd; the probe builds a random two-layer model of that shape with the
//! engine's fixture code, loads its first layer as a stage and times it.

use std::time::Instant;

use potluck_engine::fixture::TinyModel;
use potluck_engine::quant::GgmlType;
use potluck_engine::{
    Architecture, ComputePool, Device, DeviceStage, ModelFile, Row, SessionId, StageBackend, StageInput,
};
use potluck_etcd::ModelShape;

use crate::error::WorkerError;

/// Timed decode steps (after one warm-up); the median is reported.
const STEPS: usize = 7;

/// Median microseconds of one single-row decode step through one layer
/// shaped like `shape`, on `device` (the one the worker's stages will run on).
pub fn layer_micros(shape: &ModelShape, threads: usize, device: Device) -> Result<f64, WorkerError> {
    let engine = |e: potluck_engine::EngineError| WorkerError::Engine(e);
    let weight_type = GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == shape.weight_type)
        .ok_or_else(|| WorkerError::Probe(format!("unknown weight type `{}`", shape.weight_type)))?;
    let fixture = TinyModel {
        arch: Architecture::parse(&shape.arch).map_err(engine)?,
        layers: 2,
        hidden: shape.hidden,
        ffn: shape.ffn,
        heads: shape.heads,
        kv_heads: shape.kv_heads,
        weight_type,
        tied: true,
        context: 64,
        seed: 7,
    };
    let dir = std::env::temp_dir().join(format!("potluck-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| WorkerError::Io { path: dir.clone(), source })?;
    let result = (|| {
        let path = fixture.write_gguf(&dir).map_err(engine)?;
        let file = ModelFile::open(&path).map_err(engine)?;
        let stage = DeviceStage::load(&file, 0..1, device).map_err(engine)?;
        let mut cache = stage.new_cache(16 << 20);
        let pool = ComputePool::new(threads.max(1));
        let mut times = Vec::with_capacity(STEPS);
        for position in 0..=STEPS {
            let row = Row { session: SessionId(1), position, logits: false };
            let started = Instant::now();
            stage
                .forward(&[row], StageInput::Tokens(&[u32::try_from(position).unwrap_or(0)]), &mut cache, &pool)
                .map_err(engine)?;
            if position > 0 {
                times.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_a_small_shape_and_rejects_unknown_types() {
        let shape = ModelShape {
            arch: "llama".into(),
            layers: 30,
            hidden: 64,
            ffn: 128,
            heads: 4,
            kv_heads: 2,
            weight_type: "Q8_0".into(),
        };
        for device in [Device::Cpu, Device::CandleCpu] {
            let us = layer_micros(&shape, 1, device).expect("probe runs");
            assert!(us > 0.0 && us.is_finite(), "{device}: {us}");
        }
        let bad = ModelShape { weight_type: "Q3_XXL".into(), ..shape.clone() };
        assert!(layer_micros(&bad, 1, Device::Cpu).is_err());
        let bad = ModelShape { arch: "gpt2".into(), ..shape };
        assert!(layer_micros(&bad, 1, Device::Cpu).is_err());
    }
}
