use super::*;
use crate::config::{Architecture, RopeStyle};
use crate::fixture::TinyModel;
use crate::{LocalPipeline, ModelFile, SessionId, WireDtype};

/// A llama-family shape small enough for debug tests, with K-quant-friendly widths.
fn small(arch: Architecture) -> ModelConfig {
    ModelConfig {
        arch,
        layers: 2,
        hidden: 256,
        ffn: 512,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        vocab: 0,
        rms_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_style: RopeStyle::Interleaved,
        context: 256,
    }
}

fn spec(model: ModelConfig, file_type: FileType) -> SynthSpec {
    SynthSpec { model, file_type, seed: 7, threads: 2 }
}

/// A GGUF with a tokenizer to copy: the fixture's byte-level one.
fn tokenizer_source(dir: &Path) -> PathBuf {
    let sub = dir.join("tok");
    std::fs::create_dir_all(&sub).expect("mkdir");
    TinyModel { layers: 1, ..TinyModel::default() }.write_gguf(&sub).expect("fixture")
}

fn write_to(spec: &SynthSpec, tok: &Path, out: &Path) -> Result<Progress, SynthError> {
    write(spec, tok, out, &mut |_| {})
}

#[test]
fn every_file_type_loads_and_gives_finite_varied_logits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tok = tokenizer_source(dir.path());
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        for ft in FileType::ALL {
            let name = format!("{:?}-{}", arch, ft.name());
            let out = dir.path().join(format!("{name}.gguf"));
            write_to(&spec(small(arch), ft), &tok, &out).expect(&name);
            let file = ModelFile::open(&out).expect(&name);
            assert_eq!(file.config().layers, 2);
            let mut pipe = LocalPipeline::load(&file, &[0, 2], WireDtype::F32, 1 << 24, 1).expect(&name);
            let logits = pipe.prefill(SessionId(1), &[10, 200, 33, 7], 16).expect(&name);
            assert_eq!(logits.len(), 260, "{name}: the vocabulary is the tokenizer's");
            assert!(logits.iter().all(|l| l.is_finite()), "{name}: {logits:?}");
            let mean = logits.iter().sum::<f32>() / logits.len() as f32;
            let std = (logits.iter().map(|l| (l - mean).powi(2)).sum::<f32>() / logits.len() as f32).sqrt();
            assert!((0.3..30.0).contains(&std), "{name}: logit spread {std}");
            let max = logits.iter().copied().fold(f32::MIN, f32::max);
            let z: f32 = logits.iter().map(|l| (l - max).exp()).sum();
            assert!(1.0 / z < 0.9, "{name}: one token takes {:.3} of the mass", 1.0 / z);
        }
    }
}

#[test]
fn the_header_has_the_shape_the_mix_and_the_copied_tokenizer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tok = tokenizer_source(dir.path());
    let out = dir.path().join("q.gguf");
    let dims = ModelConfig { layers: 3, ..small(Architecture::Qwen2) };
    let done = write_to(&spec(dims, FileType::Q4_K_M), &tok, &out).expect("write");
    let f = GgufFile::open(&out).expect("open");
    let src = GgufFile::open(&tok).expect("open tokenizer");
    let m = &f.metadata;
    assert_eq!(m.str("general.architecture"), Some("qwen2"));
    assert_eq!(m.usize("general.file_type"), Some(15));
    for (key, want) in [
        ("qwen2.block_count", 3),
        ("qwen2.embedding_length", 256),
        ("qwen2.feed_forward_length", 512),
        ("qwen2.attention.head_count", 4),
        ("qwen2.attention.head_count_kv", 2),
        ("qwen2.rope.dimension_count", 64),
    ] {
        assert_eq!(m.usize(key), Some(want), "{key}");
    }
    let copied: Vec<_> = src.metadata.0.iter().filter(|(k, _)| k.starts_with("tokenizer.")).collect();
    assert!(copied.len() >= 5);
    for (k, v) in copied {
        assert_eq!(m.get(k), Some(v), "{k}");
    }
    // 1 embedding + 3 × (2 norms + 7 matrices + 3 biases) + output norm + output.
    assert_eq!(f.tensors.len(), 1 + 3 * 12 + 2);
    assert_eq!(done.tensors, f.tensors.len());
    let info = |n: &str| f.info(n).expect(n);
    assert_eq!(info("token_embd.weight").dims, [256, 260]);
    assert_eq!(info("output.weight").dims, [256, 260]);
    assert_eq!(info("output.weight").dtype, GgmlType::Q6_K);
    assert_eq!(info("blk.1.attn_k.weight").dims, [256, 128]);
    assert_eq!(info("blk.1.attn_k.bias").dims, [128]);
    assert_eq!(info("blk.2.ffn_down.weight").dims, [512, 256]);
    assert_eq!(info("blk.0.ffn_norm.weight").dtype, GgmlType::F32);
    // With 3 layers llama.cpp's rule gives more bits to layer 2 alone (7·3/8 = 2).
    assert_eq!(info("blk.2.attn_v.weight").dtype, GgmlType::Q6_K);
    assert_eq!(info("blk.1.attn_v.weight").dtype, GgmlType::Q4_K);
    let tensor_bytes: u64 = f.tensors.values().map(|t| t.n_bytes as u64).sum();
    assert_eq!(done.bytes, tensor_bytes);
}

#[test]
fn a_seed_fixes_the_file_whatever_the_thread_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tok = tokenizer_source(dir.path());
    let bytes = |seed: u64, threads: usize| {
        let out = dir.path().join(format!("s{seed}-t{threads}.gguf"));
        let s = SynthSpec { seed, threads, ..spec(small(Architecture::Llama), FileType::Q4_0) };
        write_to(&s, &tok, &out).expect("write");
        std::fs::read(&out).expect("read")
    };
    let one = bytes(1, 1);
    assert_eq!(one, bytes(1, 3));
    assert_ne!(one, bytes(2, 1));
}

#[test]
fn bad_input_gives_clear_errors_and_leaves_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tok = tokenizer_source(dir.path());
    let msg = |e: SynthError| e.to_string();
    assert!(msg(Shape::parse("llama2-70b").expect_err("shape")).contains("llama2-7b, llama3-8b"));
    assert!(msg(FileType::parse("q3_k").expect_err("dtype")).contains("q4_k_m"));

    // A GGUF with no tokenizer metadata.
    let bare = dir.path().join("bare.gguf");
    let mut w = GgufWriter::default();
    w.meta("general.architecture", MetaValue::String("llama".into()));
    w.write(&bare).expect("bare");
    let out = dir.path().join("out.gguf");
    let s = spec(small(Architecture::Llama), FileType::Q8_0);
    let e = write_to(&s, &bare, &out).expect_err("no tokenizer");
    assert!(matches!(e, SynthError::NoTokenizer { .. }) && msg(e).contains("bare.gguf"));
    let e = write_to(&s, &dir.path().join("missing.gguf"), &out).expect_err("no file");
    assert!(matches!(e, SynthError::TokenizerFile { .. }), "{e}");

    let nowhere = dir.path().join("no-such-dir").join("out.gguf");
    let e = write_to(&s, &tok, &nowhere).expect_err("unwritable");
    assert!(matches!(e, SynthError::Write { .. }) && msg(e).contains("no-such-dir"));
    let e = write_to(&spec(ModelConfig { layers: 0, ..small(Architecture::Llama) }, FileType::Q8_0), &tok, &out);
    assert!(matches!(e, Err(SynthError::NoLayers)));
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("ls")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn shapes_have_their_published_dimensions() {
    // (shape, layers, hidden, ffn, heads, kv heads, rope θ)
    let table = [
        (Shape::Llama2_7b, 32, 4096, 11_008, 32, 32, 1e4),
        (Shape::Llama3_8b, 32, 4096, 14_336, 32, 8, 5e5),
        (Shape::Qwen2_7b, 28, 3584, 18_944, 28, 4, 1e6),
        (Shape::Mistral_7b, 32, 4096, 14_336, 32, 8, 1e4),
    ];
    for (shape, layers, hidden, ffn, heads, kv, theta) in table {
        let d = shape.config();
        assert_eq!(
            (d.layers, d.hidden, d.ffn, d.heads, d.kv_heads, d.rope_theta),
            (layers, hidden, ffn, heads, kv, theta)
        );
        assert_eq!((d.head_dim, d.q_dim()), (128, hidden));
        assert_eq!(Shape::parse(shape.name()).expect("parse"), shape);
    }
    let qwen = Shape::Qwen2_7b.config();
    assert_eq!((qwen.arch, qwen.rope_style, qwen.rms_eps), (Architecture::Qwen2, RopeStyle::HalfSplit, 1e-6));
}

#[test]
fn llama2_7b_tensors_weigh_what_the_published_quantizations_do() {
    // TheBloke's llama-2-7b.Q4_K_M.gguf and .Q4_0.gguf are 4,081,004,224 and
    // 3,825,807,360 bytes; the tensors below plus a ~741 KB header (the
    // 32,000-token vocabulary) make those sizes, and any other type mix would not.
    let model = Shape::Llama2_7b.config();
    for (ft, bytes) in [(FileType::Q4_K_M, 4_080_263_168u64), (FileType::Q4_0, 3_825_065_984)] {
        let planned = plan(&SynthSpec { model: model.clone(), file_type: ft, seed: 0, threads: 1 }, 32_000);
        let total: u64 = planned.expect("plan").iter().filter_map(|p| p.spec.n_bytes()).map(|n| n as u64).sum();
        assert_eq!(total, bytes, "{}", ft.name());
    }
}
