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

/// Quantized models stay near the f32 model, closer the more bits a format spends: each
/// format's largest logit error is under its bound, and a format with more bits in the same
/// family errs less (so a decoder that dropped bits would show).
#[test]
fn quantized_weights_track_f32_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logits = |dtype| {
        let m = TinyModel { weight_type: dtype, ..TinyModel::default() };
        run_prompt(&ModelFile::open(&m.write_gguf(dir.path()).expect("fixture")).expect("open"))
    };
    let exact = logits(GgmlType::F32);
    let scale = exact.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    let error = |dtype| {
        let got = logits(dtype);
        got.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max) / scale
    };
    use GgmlType::*;
    for (dtype, bound) in [(F16, 0.01), (Q8_0, 0.1), (Q6_K, 0.1), (Q5_K, 0.25), (Q5_0, 0.25), (Q5_1, 0.25)] {
        let err = error(dtype);
        assert!(err < bound, "{dtype:?}: max error {err} of the logits' scale");
    }
    for ladder in [[Q2_K, Q3_K, Q4_K, Q5_K, Q6_K].as_slice(), &[Q4_0, Q5_0, Q8_0], &[Q4_1, Q5_1]] {
        let errs: Vec<f32> = ladder.iter().map(|&t| error(t)).collect();
        assert!(errs.windows(2).all(|w| w[1] < w[0]), "{ladder:?}: errors {errs:?} do not fall with bits");
    }
}

/// A llama.cpp-style K-quant mix (Q4_K with Q6_K, Q5_K, Q3_K and Q2_K matrices, as the
/// `Q4_K_M`, `Q5_K_M` and `Q3_K_M` file types mix them) loads with each matrix in its own
/// type and runs (each format's accuracy is checked in `quantized_weights_track_f32_weights`).
#[test]
fn k_quant_mix_loads_and_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = TinyModel { weight_type: GgmlType::Q4_K, tied: false, ..TinyModel::default() };
    let mix = [
        ("attn_output", GgmlType::Q3_K),
        ("output.weight", GgmlType::Q6_K),
        ("attn_v", GgmlType::Q6_K),
        ("ffn_down", GgmlType::Q5_K),
        ("ffn_gate", GgmlType::Q2_K),
    ];
    let path = m.write_gguf_mixed(dir.path(), &mix).expect("fixture");
    let file = ModelFile::open(&path).expect("open");
    let g = GgufFile::open(&path).expect("gguf");
    for (name, dtype) in [
        ("output.weight", GgmlType::Q6_K),
        ("blk.0.attn_v.weight", GgmlType::Q6_K),
        ("blk.1.ffn_down.weight", GgmlType::Q5_K),
        ("blk.2.attn_output.weight", GgmlType::Q3_K),
        ("blk.3.ffn_gate.weight", GgmlType::Q2_K),
        ("blk.3.ffn_up.weight", GgmlType::Q4_K),
        ("token_embd.weight", GgmlType::Q4_K),
    ] {
        assert_eq!(g.info(name).expect("tensor").dtype, dtype, "{name}");
    }
    assert_sane(&run_prompt(&file), m.vocab());
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

/// A copy of GGUF `bytes` with tensor `name`'s type id replaced by `id` (the writer only
/// writes types the engine knows), in `dir/retyped.gguf`.
fn with_type_id(bytes: &[u8], name: &str, id: u32, dir: &std::path::Path) -> std::path::PathBuf {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = bytes.windows(key.len()).position(|w| w == key).expect("tensor in the directory") + key.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
    let ty = at + 4 + 8 * n_dims;
    let mut out = bytes.to_vec();
    out[ty..ty + 4].copy_from_slice(&id.to_le_bytes());
    let p = dir.join("retyped.gguf");
    std::fs::write(&p, out).expect("write");
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

    // A K-quant tensor cut short: the error names it.
    let p = write_with(dir.path(), |w| {
        let q = potluck_engine::quant::quantize_row(GgmlType::Q5_K, &vec![0.5; 2 * 256]);
        w.tensor("blk.0.ffn_down.weight", &[256, 2], GgmlType::Q5_K, q);
    });
    let whole = std::fs::read(&p).expect("read");
    std::fs::write(&p, &whole[..whole.len() - 1]).expect("write");
    let err = ModelFile::open(&p).expect_err("truncated");
    assert!(matches!(&err, EngineError::Gguf(m) if m.contains("`blk.0.ffn_down.weight`") && m.contains("truncated")));
    assert!(err.to_string().contains("Q5_K"), "{err}");

    // A type the engine cannot compute with: the error names the tensor and the type.
    for (id, type_name) in [(16u32, "IQ2_XXS"), (23, "IQ4_XS"), (35, "TQ2_0"), (1000, "unknown ggml type 1000")] {
        let p = with_type_id(&whole, "blk.0.ffn_down.weight", id, dir.path());
        let err = ModelFile::open(&p).expect_err("unsupported type");
        assert!(
            matches!(&err, EngineError::UnsupportedDtype { name, dtype } if name == "blk.0.ffn_down.weight" && dtype.contains(type_name)),
            "{err}"
        );
        assert!(err.to_string().contains(type_name), "{err}");
    }

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
