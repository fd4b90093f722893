//! The candle backend against the native one on the tiny fixture models:
//! the same batches (rows of several sessions at mixed positions, in
//! mixed order) give near-equal logits, and bad input fails the same way.

use super::device::tests::candle_cpu_opens;
use super::*;
use crate::config::Architecture;
use crate::fixture::TinyModel;
use crate::quant::GgmlType;

fn open(model: &TinyModel, dir: &std::path::Path) -> ModelFile {
    ModelFile::open(&model.write_gguf(dir).expect("fixture")).expect("model")
}

/// Cosine similarity and largest absolute difference of two rows.
fn agreement(a: &[f32], b: &[f32]) -> (f64, f32) {
    let g = crate::self_check::Agreement::of(a, b, a.len());
    (g.min_cosine, g.max_abs)
}

fn row(session: u64, position: usize) -> Row {
    Row { session: SessionId(session), position, logits: true }
}

/// Steps of a mixed workload: a prompt chunk, a second session's prompt,
/// then decode rows of three sessions (one new) out of session order.
fn workload() -> Vec<(Vec<Row>, Vec<u32>)> {
    vec![
        ((0..5).map(|p| row(1, p)).collect(), vec![3, 70, 101, 9, 44]),
        ((0..3).map(|p| row(2, p)).collect(), vec![200, 17, 5]),
        (vec![row(2, 3), row(1, 5), row(3, 0), row(3, 1)], vec![31, 8, 150, 77]),
        (vec![row(3, 2), row(1, 6), row(2, 4)], vec![12, 250, 66]),
    ]
}

/// Every step's logits through a pipeline cut at `bounds` on `devices`.
fn run(file: &ModelFile, bounds: &[usize], devices: &[Device]) -> Vec<Logits> {
    let mut pipe =
        crate::LocalPipeline::load_on(file, bounds, devices, crate::WireDtype::F32, 1 << 24, 1).expect("load");
    workload().into_iter().map(|(rows, ids)| pipe.forward(&rows, &ids).expect("forward")).collect()
}

#[test]
fn candle_cpu_logits_agree_with_native_for_mixed_batches() {
    if !candle_cpu_opens() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let models = [
        TinyModel::default(),
        TinyModel { arch: Architecture::Qwen2, weight_type: GgmlType::Q8_0, tied: false, ..Default::default() },
        TinyModel { weight_type: GgmlType::Q4_K, heads: 8, kv_heads: 2, ..Default::default() },
        TinyModel { weight_type: GgmlType::Q6_K, ..Default::default() },
        TinyModel { weight_type: GgmlType::F16, tied: false, ..Default::default() },
    ];
    for model in models {
        let file = open(&model, dir.path());
        let layers = file.config().layers;
        let native = run(&file, &[0, layers], &[Device::Cpu]);
        for (bounds, devices) in [
            (vec![0, layers], vec![Device::CandleCpu]),
            (vec![0, 2, layers], vec![Device::Cpu, Device::CandleCpu]),
            (vec![0, 1, layers], vec![Device::CandleCpu, Device::Cpu]),
        ] {
            let candle = run(&file, &bounds, &devices);
            for (step, (n, c)) in native.iter().zip(&candle).enumerate() {
                assert_eq!(n.rows, c.rows);
                for i in 0..n.rows.len() {
                    let (cos, max) = agreement(n.row(i), c.row(i));
                    let scale = n.row(i).iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    let what = format!("{:?} {:?} on {devices:?}, step {step} row {i}", model.arch, model.weight_type);
                    // Bounds from the fixtures' spread (2026-12-07): cosine
                    // 0.9989 and 4% of the largest logit at worst, from Q8
                    // activation rounding flips compounding over four
                    // random-weight layers.
                    assert!(cos > 0.998, "{what}: cosine {cos}");
                    assert!(max < 0.06 * scale, "{what}: max abs difference {max}, largest logit {scale}");
                }
            }
        }
    }
}

#[test]
fn candle_cpu_is_batch_invariant() {
    if !candle_cpu_opens() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = open(&TinyModel::default(), dir.path());
    let layers = file.config().layers;
    let stage = DeviceStage::load(&file, 0..layers, Device::CandleCpu).expect("load");
    let pool = ComputePool::new(1);
    let logits = |rows: &[Row], ids: &[u32], cache: &mut DeviceCache| match stage.forward(
        rows,
        StageInput::Tokens(ids),
        cache,
        &pool,
    ) {
        Ok(StageOutput::Logits(l)) => l,
        other => panic!("expected logits, got {other:?}"),
    };
    // The same two sessions' histories, then the same decode row alone or beside others.
    let mut alone = stage.new_cache(1 << 24);
    let mut batched = stage.new_cache(1 << 24);
    for cache in [&mut alone, &mut batched] {
        logits(&(0..4).map(|p| row(1, p)).collect::<Vec<_>>(), &[5, 6, 7, 8], cache);
        logits(&(0..9).map(|p| row(2, p)).collect::<Vec<_>>(), &[1, 2, 3, 4, 5, 6, 7, 8, 9], cache);
    }
    let one = logits(&[row(1, 4)], &[42], &mut alone);
    let many = logits(&[row(2, 9), row(1, 4), row(3, 0), row(3, 1)], &[7, 42, 1, 2], &mut batched);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(one.row(0)), bits(many.row(1)), "a row's logits do not depend on its batch-mates");
}

#[test]
fn a_cache_of_the_other_backend_is_refused() {
    if !candle_cpu_opens() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = open(&TinyModel::default(), dir.path());
    let native = DeviceStage::load(&file, 0..2, Device::Cpu).expect("native");
    let candle = DeviceStage::load(&file, 0..2, Device::CandleCpu).expect("candle");
    let mut cache = candle.new_cache(1 << 20);
    let err = native.forward(&[row(1, 0)], StageInput::Tokens(&[1]), &mut cache, &ComputePool::new(1));
    assert!(matches!(err, Err(EngineError::InvalidBatch(_))), "{err:?}");
}

#[test]
fn candle_stages_fail_on_bad_batches_and_budgets_as_native_ones_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = open(&TinyModel::default(), dir.path());
    let pool = ComputePool::new(1);
    for device in [Device::Cpu].into_iter().chain(candle_cpu_opens().then_some(Device::CandleCpu)) {
        let first = DeviceStage::load(&file, 0..2, device).expect("first");
        let later = DeviceStage::load(&file, 2..4, device).expect("later");
        assert_eq!((first.is_first(), first.is_last(), later.is_last()), (true, false, true));
        assert!(first.weight_bytes() > 0);
        let bpt = 2 * crate::kv_cache::bytes_per_token_layer(file.config().kv_dim());
        let mut cache = first.new_cache(3 * bpt);
        let out = first.forward(&[row(1, 0), row(1, 1)], StageInput::Tokens(&[1, 2]), &mut cache, &pool);
        assert!(matches!(out, Ok(StageOutput::Hidden(_))), "{device}");
        assert_eq!((cache.len(SessionId(1)), cache.used_bytes()), (2, 2 * bpt), "{device}");
        let over = first.forward(&[row(1, 2), row(2, 0)], StageInput::Tokens(&[1, 2]), &mut cache, &pool);
        assert!(matches!(over, Err(EngineError::KvBudgetExceeded { .. })), "{device}: {over:?}");
        assert_eq!(cache.used_bytes(), 2 * bpt, "{device}: a refused batch claims nothing");
        for (rows, ids) in [(vec![row(1, 5)], vec![1]), (vec![row(4, 0)], vec![9999]), (vec![], vec![])] {
            let bad = first.forward(&rows, StageInput::Tokens(&ids), &mut cache, &pool);
            assert!(matches!(bad, Err(EngineError::InvalidBatch(_))), "{device}: {bad:?}");
        }
        let hidden = crate::Hidden { rows: 1, dim: 3, data: vec![0.0; 3] };
        let mut later_cache = later.new_cache(1 << 20);
        let bad = later.forward(&[row(1, 0)], StageInput::Hidden(&hidden), &mut later_cache, &pool);
        assert!(matches!(bad, Err(EngineError::InvalidBatch(_))), "{device}: {bad:?}");
        assert!(cache.release(SessionId(1)));
        assert_eq!(cache.used_bytes(), 0);
        let range = DeviceStage::load(&file, 3..9, device);
        assert!(matches!(range, Err(EngineError::LayerRange { .. })), "{device}");
    }
}
