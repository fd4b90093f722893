//! Synthetic full-size models: a GGUF file with a real model's shape and
//! llama.cpp's per-tensor type mix, random weights, and a real tokenizer.
//!
//! Benchmarks at 7B scale need a 7B file but not 7B's knowledge: random
//! weights of the right spread give the same matrices, the same bytes to
//! read per token, and finite, varied logits that two engines can compare.
//! The tokenizer (`tokenizer.*` metadata, chat template included) is copied
//! from another GGUF file, so the vocabulary, and with it the embedding and
//! output rows, is that file's.
//!
//! The file is streamed tensor by tensor in chunks generated on several
//! threads; each chunk's generator is seeded from (seed, tensor, chunk), so
//! the bytes do not depend on the thread count.

mod fill;
mod mix;
mod shape;

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use mix::FileType;
pub use shape::Shape;

use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::gguf::{GgufFile, GgufWriter, MetaValue, TensorSpec};
use crate::quant::GgmlType;
use crate::rng::Rng;
use fill::{Calibration, Fill};

/// Bytes generated per chunk (rounded down to whole blocks): large enough to
/// amortise a thread hand-off, small enough to keep memory flat. Tests use
/// small chunks so that their small tensors span several.
const CHUNK_BYTES: usize = if cfg!(test) { 4 << 10 } else { 4 << 20 };
/// Logit spread relative to a unit-variance projection, so the output
/// distribution has a clear head, as a trained model's does.
const OUTPUT_GAIN: f32 = 2.0;
/// Spread of the qwen2 q/k/v biases.
const BIAS_STD: f32 = 0.1;

/// Why a synthetic model could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// `--shape` names no known shape.
    #[error("unknown shape `{name}` (known: {known})")]
    UnknownShape {
        /// The name given.
        name: String,
        /// The names accepted.
        known: String,
    },
    /// `--dtype` names no known file type.
    #[error("unknown file type `{name}` (known: {known})")]
    UnknownFileType {
        /// The name given.
        name: String,
        /// The names accepted.
        known: String,
    },
    /// The file type needs a block format the engine cannot compute with yet.
    #[error("{file_type} needs {dtype}, which this engine cannot compute with yet")]
    EngineLacksType {
        /// The file type asked for.
        file_type: &'static str,
        /// The missing block format.
        dtype: &'static str,
    },
    /// The tokenizer source could not be read as GGUF.
    #[error("cannot read the tokenizer from {path}")]
    TokenizerFile {
        /// The `--tokenizer-from` file.
        path: PathBuf,
        /// What the GGUF reader found.
        source: EngineError,
    },
    /// The tokenizer source has no vocabulary.
    #[error("{path} has no tokenizer (no `tokenizer.ggml.tokens` metadata)")]
    NoTokenizer {
        /// The `--tokenizer-from` file.
        path: PathBuf,
    },
    /// A layer count of zero.
    #[error("a model needs at least one layer")]
    NoLayers,
    /// The output file could not be created or written.
    #[error("cannot write {path}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

/// What to write.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// The model's shape (a [`Shape`]'s, or a smaller one for tests). Its
    /// `vocab` is ignored: the vocabulary is the tokenizer's.
    pub model: ModelConfig,
    /// Per-tensor storage types.
    pub file_type: FileType,
    /// Seed of every random byte.
    pub seed: u64,
    /// Generator threads (0 = one per core).
    pub threads: usize,
}

/// How far a write has got, reported after every tensor.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Tensors written.
    pub tensors_done: usize,
    /// Tensors in the file.
    pub tensors: usize,
    /// Tensor bytes written.
    pub bytes_done: u64,
    /// Tensor bytes in the file.
    pub bytes: u64,
    /// Seconds since the write began.
    pub seconds: f64,
}

/// One tensor to generate.
struct Planned {
    spec: TensorSpec,
    fill: Fill,
}

/// Writes the model `spec` describes to `out`, with the tokenizer of
/// `tokenizer_from`. The file appears under its name only when complete.
pub fn write(
    spec: &SynthSpec,
    tokenizer_from: &Path,
    out: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Progress, SynthError> {
    let (header, vocab) = header(spec, tokenizer_from)?;
    let plan = plan(spec, vocab)?;
    let specs: Vec<TensorSpec> = plan.iter().map(|p| p.spec.clone()).collect();
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let result = stream(spec, &header, &plan, &specs, &partial, progress).and_then(|done| {
        std::fs::rename(&partial, out).map_err(|source| SynthError::Write { path: out.to_path_buf(), source })?;
        Ok(done)
    });
    if result.is_err() {
        // Best effort: a half-written file is worthless, and disk is scarce.
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// The metadata: the shape's keys, then the tokenizer's. Returns the vocabulary size too.
fn header(spec: &SynthSpec, tokenizer_from: &Path) -> Result<(GgufWriter, usize), SynthError> {
    let src = GgufFile::open(tokenizer_from)
        .map_err(|source| SynthError::TokenizerFile { path: tokenizer_from.to_path_buf(), source })?;
    let vocab = src
        .metadata
        .str_array("tokenizer.ggml.tokens")
        .map(|t| t.len())
        .filter(|&n| n > 0)
        .ok_or_else(|| SynthError::NoTokenizer { path: tokenizer_from.to_path_buf() })?;
    let d = &spec.model;
    let a = shape::arch_name(d.arch);
    let u = |v: usize| MetaValue::U32(u32::try_from(v).unwrap_or(u32::MAX));
    let mut w = GgufWriter::default();
    w.meta("general.architecture", MetaValue::String(a.into()))
        .meta("general.name", MetaValue::String(format!("potluck synthetic {a} ({})", spec.file_type.name())))
        .meta("general.file_type", MetaValue::U32(spec.file_type.llama_ftype()))
        .meta("general.quantization_version", MetaValue::U32(2))
        .meta(&format!("{a}.block_count"), u(d.layers))
        .meta(&format!("{a}.context_length"), u(d.context))
        .meta(&format!("{a}.embedding_length"), u(d.hidden))
        .meta(&format!("{a}.feed_forward_length"), u(d.ffn))
        .meta(&format!("{a}.attention.head_count"), u(d.heads))
        .meta(&format!("{a}.attention.head_count_kv"), u(d.kv_heads))
        .meta(&format!("{a}.attention.layer_norm_rms_epsilon"), MetaValue::F32(d.rms_eps))
        .meta(&format!("{a}.rope.freq_base"), MetaValue::F32(d.rope_theta))
        .meta(&format!("{a}.rope.dimension_count"), u(d.head_dim));
    for (k, v) in &src.metadata.0 {
        if k.starts_with("tokenizer.") {
            w.meta(k, v.clone());
        }
    }
    Ok((w, vocab))
}

/// Every tensor in file order, with its type and fill.
fn plan(spec: &SynthSpec, vocab: usize) -> Result<Vec<Planned>, SynthError> {
    let d = &spec.model;
    if d.layers == 0 {
        return Err(SynthError::NoLayers);
    }
    let (q, kv) = (d.q_dim(), d.kv_dim());
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("token_embd.weight".into(), vec![d.hidden, vocab])];
    for l in 0..d.layers {
        let b = |s: &str| format!("blk.{l}.{s}");
        shapes.push((b("attn_norm.weight"), vec![d.hidden]));
        shapes.push((b("attn_q.weight"), vec![d.hidden, q]));
        shapes.push((b("attn_k.weight"), vec![d.hidden, kv]));
        shapes.push((b("attn_v.weight"), vec![d.hidden, kv]));
        if d.arch.has_qkv_bias() {
            shapes.push((b("attn_q.bias"), vec![q]));
            shapes.push((b("attn_k.bias"), vec![kv]));
            shapes.push((b("attn_v.bias"), vec![kv]));
        }
        shapes.push((b("attn_output.weight"), vec![q, d.hidden]));
        shapes.push((b("ffn_norm.weight"), vec![d.hidden]));
        shapes.push((b("ffn_gate.weight"), vec![d.hidden, d.ffn]));
        shapes.push((b("ffn_up.weight"), vec![d.hidden, d.ffn]));
        shapes.push((b("ffn_down.weight"), vec![d.ffn, d.hidden]));
    }
    shapes.push(("output_norm.weight".into(), vec![d.hidden]));
    shapes.push(("output.weight".into(), vec![d.hidden, vocab]));

    let mut calibrations: HashMap<GgmlType, Option<Calibration>> = HashMap::new();
    let lacks = |dtype: GgmlType| SynthError::EngineLacksType { file_type: spec.file_type.name(), dtype: dtype.name() };
    shapes
        .into_iter()
        .map(|(name, dims)| {
            let dtype = spec.file_type.tensor_type(&name, &dims, d.layers)?;
            #[allow(clippy::cast_precision_loss)]
            let fan_in = (dims[0] as f32).sqrt();
            let fill = if dims.len() == 1 {
                let (center, std) = if name.ends_with(".bias") { (0.0, BIAS_STD) } else { (1.0, 0.0) };
                Fill::float(GgmlType::F32, center, std)
            } else {
                // An embedding row is looked up, not multiplied: unit spread keeps
                // the token's identity visible beside the layers' outputs.
                let std = match name.as_str() {
                    "token_embd.weight" => 1.0,
                    "output.weight" => OUTPUT_GAIN / fan_in,
                    _ => 1.0 / fan_in,
                };
                match dtype {
                    GgmlType::F16 => Fill::float(dtype, 0.0, std),
                    _ => calibrations
                        .entry(dtype)
                        .or_insert_with(|| Calibration::measure(dtype))
                        .and_then(|c| c.fill(dtype, std)),
                }
            };
            let fill = fill.ok_or_else(|| lacks(dtype))?;
            Ok(Planned { spec: TensorSpec { name, dims, dtype }, fill })
        })
        .collect()
}

/// Writes header and tensors to `path`.
fn stream(
    spec: &SynthSpec,
    header: &GgufWriter,
    plan: &[Planned],
    specs: &[TensorSpec],
    path: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Progress, SynthError> {
    let io = |source| SynthError::Write { path: path.to_path_buf(), source };
    let file = File::create(path).map_err(io)?;
    let mut out = header.stream(BufWriter::with_capacity(1 << 20, file), specs).map_err(io)?;
    let threads = match spec.threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let bytes: u64 = specs.iter().filter_map(TensorSpec::n_bytes).map(|n| n as u64).sum();
    let start = Instant::now();
    let mut done = Progress { tensors_done: 0, tensors: plan.len(), bytes_done: 0, bytes, seconds: 0.0 };
    let jobs = chunks(plan);
    // Double-buffered rounds of one chunk per thread: the workers fill one
    // round while this thread writes the previous one.
    let mut ready: Vec<Vec<u8>> = Vec::new();
    let mut filling: Vec<Vec<u8>> = vec![Vec::new(); threads];
    let mut rounds = jobs.chunks(threads);
    let mut written = jobs.iter();
    loop {
        let next = rounds.next();
        let result = std::thread::scope(|s| {
            for (job, buf) in next.into_iter().flatten().zip(filling.iter_mut()) {
                buf.resize(job.len, 0);
                let fill = plan[job.tensor].fill;
                let mut rng = Rng::new(chunk_seed(spec.seed, job.tensor, job.chunk));
                s.spawn(move || fill.generate(&mut rng, buf));
            }
            for buf in &ready {
                out.write_data(buf).map_err(io)?;
                if let Some(job) = written.next().filter(|j| j.last) {
                    done.tensors_done = job.tensor + 1;
                    done.bytes_done += specs[job.tensor].n_bytes().unwrap_or(0) as u64;
                    done.seconds = start.elapsed().as_secs_f64();
                    progress(&done);
                }
            }
            Ok::<(), SynthError>(())
        });
        result?;
        let Some(round) = next else { break };
        std::mem::swap(&mut ready, &mut filling);
        ready.truncate(round.len());
        filling.resize(threads, Vec::new());
    }
    out.finish().map_err(io)?;
    Ok(done)
}

/// One chunk of one tensor.
struct Job {
    tensor: usize,
    chunk: usize,
    len: usize,
    /// Whether the chunk ends its tensor.
    last: bool,
}

/// Every chunk of every tensor, in file order. Chunk boundaries depend only
/// on the tensor, so the bytes do not depend on the thread count.
fn chunks(plan: &[Planned]) -> Vec<Job> {
    let mut jobs = Vec::new();
    for (tensor, p) in plan.iter().enumerate() {
        let n = p.spec.n_bytes().unwrap_or(0);
        let unit = p.fill.unit_bytes();
        let size = (CHUNK_BYTES / unit).max(1) * unit;
        let count = n.div_ceil(size);
        jobs.extend((0..count).map(|chunk| Job {
            tensor,
            chunk,
            len: size.min(n - chunk * size),
            last: chunk + 1 == count,
        }));
    }
    jobs
}

/// The item of `all` called `wanted`, or else the known names, comma-separated.
fn by_name<T: Copy>(all: &[T], name: fn(T) -> &'static str, wanted: &str) -> Result<T, String> {
    all.iter()
        .copied()
        .find(|&t| name(t) == wanted)
        .ok_or_else(|| all.iter().map(|&t| name(t)).collect::<Vec<_>>().join(", "))
}

/// A generator seed unique to (seed, tensor, chunk).
fn chunk_seed(seed: u64, tensor: usize, chunk: usize) -> u64 {
    let step = |h: u64, v: usize| Rng::new(h ^ v as u64).next_u64();
    step(step(Rng::new(seed).next_u64(), tensor), chunk)
}

#[cfg(test)]
mod tests;
