//! Batch invariance and split equality on tiny random models: a row's logits
//! are bit-identical however it is batched, chunked, threaded or split.

use potluck_engine::fixture::TinyModel;
use potluck_engine::quant::GgmlType;
use potluck_engine::{LocalPipeline, ModelFile, Row, SessionId, WireDtype};

const BUDGET: usize = 64 << 20;

fn prompt(session: u64, len: usize) -> Vec<u32> {
    (0..len as u64).map(|i| ((session * 31 + i * 7) % 256) as u32).collect()
}

fn load(file: &ModelFile, stages: usize, threads: usize) -> LocalPipeline {
    let bounds = LocalPipeline::even_boundaries(file.config().layers, stages);
    LocalPipeline::load(file, &bounds, WireDtype::F32, BUDGET, threads).expect("load")
}

/// Prefills `prompt` as one session in `chunk`-token pieces, then decodes
/// `steps` fixed tokens; returns the logits of every step.
fn run_alone(pipe: &mut LocalPipeline, s: SessionId, prompt: &[u32], chunk: usize, steps: usize) -> Vec<Vec<f32>> {
    let mut out = vec![pipe.prefill(s, prompt, chunk).expect("prefill")];
    for k in 0..steps {
        let row = Row { session: s, position: prompt.len() + k, logits: true };
        let logits = pipe.forward(&[row], &[next_token(s, k)]).expect("decode");
        out.push(logits.row(0).to_vec());
        // The next step reuses this buffer: stale values must never show.
        pipe.recycle(logits);
    }
    out
}

fn next_token(s: SessionId, k: usize) -> u32 {
    ((s.0 as usize * 13 + k * 5) % 256) as u32
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn eight_sessions_decoded_together_equal_each_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The last is a K-quant mix like llama.cpp's Q4_K_M (Q6_K and Q5_K beside Q4_K).
    let k_mix = [("attn_v", GgmlType::Q6_K), ("ffn_down", GgmlType::Q5_K), ("output", GgmlType::Q6_K)];
    for (dtype, mix) in [
        (GgmlType::Q4_1, &[][..]),
        (GgmlType::Q8_0, &[]),
        (GgmlType::Q4_K, &[]),
        (GgmlType::F16, &[]),
        (GgmlType::Q4_K, &k_mix),
    ] {
        let m = TinyModel { weight_type: dtype, tied: mix.is_empty(), ..TinyModel::default() };
        let path = m.write_gguf_mixed(dir.path(), mix).expect("fixture");
        let file = ModelFile::open(&path).expect("open");
        let lens = [1usize, 3, 5, 8, 13, 21, 34, 40];
        let steps = 4;
        let alone: Vec<_> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let mut pipe = load(&file, 1, 1);
                run_alone(&mut pipe, SessionId(i as u64), &prompt(i as u64, len), 64, steps)
            })
            .collect();

        // All prompts in ONE batch, then every session decodes in one batch,
        // on a pipeline whose buffers (scratch, logits, a released session's
        // cache) hold another session's values.
        let mut pipe = load(&file, 1, 2);
        run_alone(&mut pipe, SessionId(100), &prompt(100, 50), 64, 2);
        pipe.release(SessionId(100));
        let (mut rows, mut toks) = (Vec::new(), Vec::new());
        for (i, &len) in lens.iter().enumerate() {
            for (p, t) in prompt(i as u64, len).into_iter().enumerate() {
                rows.push(Row { session: SessionId(i as u64), position: p, logits: p + 1 == len });
                toks.push(t);
            }
        }
        let first = pipe.forward(&rows, &toks).expect("batched prefill");
        for (i, a) in alone.iter().enumerate() {
            assert_eq!(bits(first.row(i)), bits(&a[0]), "{dtype:?} {mix:?} session {i} prefill");
        }
        pipe.recycle(first);
        for k in 0..steps {
            let rows: Vec<Row> = lens
                .iter()
                .enumerate()
                .map(|(i, &len)| Row { session: SessionId(i as u64), position: len + k, logits: true })
                .collect();
            let toks: Vec<u32> = (0..lens.len()).map(|i| next_token(SessionId(i as u64), k)).collect();
            let step = pipe.forward(&rows, &toks).expect("batched decode");
            for (i, a) in alone.iter().enumerate() {
                assert_eq!(bits(step.row(i)), bits(&a[k + 1]), "{dtype:?} {mix:?} session {i} step {k}");
            }
            pipe.recycle(step);
        }
    }
}

#[test]
fn prefill_chunking_does_not_change_logits() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The default Q4_1 model, and a K-quant mix (Q4_K with Q6_K and Q5_K).
    let k_mix = [("attn_v", GgmlType::Q6_K), ("ffn_down", GgmlType::Q5_K)];
    for (dtype, mix) in [(GgmlType::Q4_1, &[][..]), (GgmlType::Q4_K, &k_mix)] {
        let m = TinyModel { weight_type: dtype, ..TinyModel::default() };
        let file = ModelFile::open(&m.write_gguf_mixed(dir.path(), mix).expect("fixture")).expect("open");
        let p = prompt(5, 100);
        let reference = run_alone(&mut load(&file, 1, 1), SessionId(1), &p, p.len(), 3);
        for chunk in [1, 7, 64] {
            for threads in [1, 2, 3] {
                let got = run_alone(&mut load(&file, 1, threads), SessionId(1), &p, chunk, 3);
                for (a, b) in got.iter().zip(&reference) {
                    assert_eq!(bits(a), bits(b), "{dtype:?} {mix:?} chunk {chunk}, {threads} threads");
                }
            }
        }
    }
}

#[test]
fn split_stages_with_f32_wire_are_bit_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = TinyModel { layers: 5, ..TinyModel::default() }.write_gguf(dir.path()).expect("fixture");
    let file = ModelFile::open(&path).expect("open");
    let p = prompt(2, 30);
    let reference = run_alone(&mut load(&file, 1, 1), SessionId(1), &p, 8, 3);
    for stages in [2, 3, 5] {
        let got = run_alone(&mut load(&file, stages, 2), SessionId(1), &p, 8, 3);
        for (a, b) in got.iter().zip(&reference) {
            assert_eq!(bits(a), bits(b), "{stages} stages");
        }
    }
    // A 16-bit hand-off rounds hidden states, so logits move, but only a little.
    let bounds = LocalPipeline::even_boundaries(5, 2);
    let mut f16 = LocalPipeline::load(&file, &bounds, WireDtype::F16, BUDGET, 1).expect("load");
    let got = run_alone(&mut f16, SessionId(1), &p, 8, 0);
    let diff = got[0].iter().zip(&reference[0]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff > 0.0 && diff < 0.1, "f16 hand-off moved logits by {diff}");
}
