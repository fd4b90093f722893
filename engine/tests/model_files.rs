//! Every supported file format, weight type and architecture loads and runs;
//! every kind of bad input is a typed error.

use potluck_engine::config::Architecture;
use potluck_engine::fixture::TinyModel;
use potluck_engine::gguf::{GgufFile, GgufWriter, MetaValue};
use potluck_engine::quant::GgmlType;
use potluck_engine::{EngineError, LocalPipeline, ModelFile, Row, SessionId, Stage, StageInput, WireDtype};

fn run_prompt(file: &ModelFile) -> Vec<f32> {
    let bounds = LocalPipeline::even_boundaries(file.config().layers, 2);
    let mut pipe = LocalPipeline::load(file, &bounds, WireDtype::F32, 16 << 20, 1).expect("load");
    pipe.prefill(SessionId(1), &[1, 2, 3, 4, 5], 2).expect("prefill")
}

fn assert_sane(logits: &[f32], vocab: usize) {
    assert_eq!(logits.len(), vocab);
    assert!(logits.iter().all(|v| v.is_finite()));
    let spread =
        logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) - logits.iter().copied().fold(f32::INFINITY, f32::min);
    assert!(spread > 1e-3, "logits are flat: the model computed nothing");
}

#[test]
fn every_weight_type_and_architecture_runs_from_gguf() {
    let dir = tempfile::tempdir().expect("tempdir");
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        for dtype in GgmlType::ALL {
            let m = TinyModel { arch, weight_type: dtype, tied: dtype != GgmlType::Q8_0, ..TinyModel::default() };
            let file = ModelFile::open(&m.write_gguf(dir.path()).expect("fixture")).expect("open");
            assert_eq!(file.config().arch, arch);
            assert_sane(&run_prompt(&file), m.vocab());
        }
    }
}

#[test]
fn quantized_weights_track_f32_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logits = |dtype| {
        let m = TinyModel { weight_type: dtype, ..TinyModel::default() };
        run_prompt(&ModelFile::open(&m.write_gguf(dir.path()).expect("fixture")).expect("open"))
    };
    let exact = logits(GgmlType::F32);
    for dtype in [GgmlType::Q8_0, GgmlType::Q6_K, GgmlType::F16] {
        let got = logits(dtype);
        let err = got.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let scale = exact.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        assert!(err < 0.1 * scale, "{dtype:?}: max error {err} vs scale {scale}");
    }
}

#[test]
fn safetensors_in_every_float_type_runs_and_agrees() {
    let mut results = Vec::new();
    for dtype in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        for arch in [Architecture::Llama, Architecture::Qwen2] {
            let dir = tempfile::tempdir().expect("tempdir");
            let m = TinyModel { arch, ..TinyModel::default() };
            let file = ModelFile::open(&m.write_safetensors(dir.path(), dtype).expect("fixture")).expect("open");
            let logits = run_prompt(&file);
            assert_sane(&logits, m.vocab());
            if arch == Architecture::Llama {
                results.push(logits);
            }
        }
    }
    let err = results[1].iter().zip(&results[0]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(err < 0.05, "f16 safetensors strays {err} from f32");
}

#[test]
fn a_stage_reads_only_its_layers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = TinyModel { layers: 6, tied: false, ..TinyModel::default() };
    let file = ModelFile::open(&m.write_gguf(dir.path()).expect("fixture")).expect("open");
    let full = Stage::load(&file, 0..6).expect("full");
    let middle = Stage::load(&file, 2..4).expect("middle");
    assert!(!middle.is_first() && !middle.is_last());
    assert!(middle.weight_bytes() * 3 < full.weight_bytes());
}

fn write_with(dir: &std::path::Path, edit: impl FnOnce(&mut GgufWriter)) -> std::path::PathBuf {
    let mut w = GgufWriter::default();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("llama.block_count", MetaValue::U32(1))
        .meta("llama.embedding_length", MetaValue::U32(32))
        .meta("llama.feed_forward_length", MetaValue::U32(64))
        .meta("llama.attention.head_count", MetaValue::U32(2))
        .meta("llama.vocab_size", MetaValue::U32(8));
    edit(&mut w);
    let p = dir.join("bad.gguf");
    w.write(&p).expect("write");
    p
}

#[test]
fn bad_model_files_are_typed_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = TinyModel::default().write_gguf(dir.path()).expect("fixture");
    let bytes = std::fs::read(&good).expect("read");

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).expect("write");
    assert!(matches!(ModelFile::open(&truncated), Err(EngineError::Gguf(m)) if m.contains("truncated")));

    let random = dir.path().join("random.gguf");
    std::fs::write(&random, (0..10_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<_>>())
        .expect("write");
    assert!(matches!(ModelFile::open(&random), Err(EngineError::Gguf(_))));

    let p = write_with(dir.path(), |w| {
        w.meta("general.architecture", MetaValue::String("mamba".into()));
    });
    // The second `general.architecture` wins in the map, as in llama.cpp.
    assert!(matches!(ModelFile::open(&p), Err(EngineError::UnknownArchitecture(a)) if a == "mamba"));

    let p = write_with(dir.path(), |w| {
        w.tensor("token_embd.weight", &[32, 7], GgmlType::F32, vec![0; 32 * 7 * 4]);
    });
    let file = ModelFile::open(&p).expect("header is fine");
    assert!(
        matches!(Stage::load(&file, 0..1), Err(EngineError::TensorShape { name, .. }) if name == "token_embd.weight")
    );

    let p = write_with(dir.path(), |w| {
        w.tensor("token_embd.weight", &[32, 8], GgmlType::F32, vec![0; 32 * 8 * 4]);
    });
    let file = ModelFile::open(&p).expect("header is fine");
    assert!(matches!(Stage::load(&file, 0..1), Err(EngineError::MissingTensor(n)) if n == "blk.0.attn_norm.weight"));
    assert!(matches!(Stage::load(&file, 0..2), Err(EngineError::LayerRange { .. })));
    assert!(GgufFile::open(&dir.path().join("absent.gguf")).is_err());
}

#[test]
fn bad_batches_context_and_budget_are_typed_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = TinyModel { context: 64, ..TinyModel::default() };
    let file = ModelFile::open(&m.write_gguf(dir.path()).expect("fixture")).expect("open");
    let pool = potluck_engine::ComputePool::new(1);
    let stage = Stage::load(&file, 0..m.layers).expect("load");
    let mut cache = stage.new_cache(1 << 20);
    let row = |s, p| Row { session: SessionId(s), position: p, logits: true };
    let bad = |r: potluck_engine::Result<_>| matches!(r, Err(EngineError::InvalidBatch(_)));

    assert!(bad(stage.forward(&[], StageInput::Tokens(&[]), &mut cache, &pool)));
    assert!(bad(stage.forward(&[row(1, 0)], StageInput::Tokens(&[9999]), &mut cache, &pool)));
    assert!(bad(stage.forward(&[row(1, 3)], StageInput::Tokens(&[1]), &mut cache, &pool)), "gap");
    assert!(bad(stage.forward(&[row(1, 0)], StageInput::Tokens(&[1, 2]), &mut cache, &pool)));
    let h = potluck_engine::Hidden { rows: 1, dim: 256, data: vec![0.0; 256] };
    assert!(bad(stage.forward(&[row(1, 0)], StageInput::Hidden(&h), &mut cache, &pool)), "first stage");
    assert_eq!(cache.used_bytes(), 0, "failed batches must not claim cache");

    // Context: position 64 is past a context of 64.
    let rows: Vec<Row> = (0..65).map(|p| row(2, p)).collect();
    let toks = vec![1u32; 65];
    assert!(matches!(
        stage.forward(&rows, StageInput::Tokens(&toks), &mut cache, &pool),
        Err(EngineError::ContextExceeded { position: 64, context: 64 })
    ));
    let bounds = [0, m.layers];
    let mut pipe = LocalPipeline::load(&file, &bounds, WireDtype::F32, 1 << 20, 1).expect("load");
    let mut sampler = potluck_engine::Sampler::new(potluck_engine::SamplingParams::default()).expect("params");
    let long = vec![1u32; 60];
    assert!(matches!(
        pipe.generate(SessionId(3), &long, 10, &mut sampler, |_| false, |_| {}),
        Err(EngineError::ContextExceeded { .. })
    ));

    // Budget: room for 10 tokens only.
    let mut small = stage.new_cache(10 * stage.new_cache(0).bytes_per_token());
    let rows: Vec<Row> = (0..11).map(|p| row(4, p)).collect();
    let toks = vec![1u32; 11];
    assert!(matches!(
        stage.forward(&rows, StageInput::Tokens(&toks), &mut small, &pool),
        Err(EngineError::KvBudgetExceeded { .. })
    ));
    assert_eq!(small.used_bytes(), 0);
    stage.forward(&rows[..10], StageInput::Tokens(&toks[..10]), &mut small, &pool).expect("fits");
    assert_eq!(small.used_bytes(), small.budget_bytes());
    assert!(small.release(SessionId(4)));
    assert_eq!(small.used_bytes(), 0);
    assert!(!small.release(SessionId(4)));
}
