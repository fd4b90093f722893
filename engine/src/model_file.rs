//! One front door for model files: GGUF, or safetensors plus `config.json`.
//!
//! Tensors are named the GGUF way (`blk.3.attn_q.weight`) inside the engine;
//! safetensors names are mapped at this edge. Only the tensors a stage asks
//! for are read, and every one is checked against the shape the config
//! implies before it is used.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kernels::matmul::Matrix;
use crate::quant::{self, GgmlType};
use crate::tokenizer::Tokenizer;
use crate::weight_bytes::WeightArena;

/// Bytes of a packed matrix a loader thread reads from the file at once:
/// a run of whole tiles small enough to stay in L2 while it is packed.
const READ_RUN_BYTES: usize = 256 << 10;

/// An opened model: its config, and a way to read any tensor by name.
#[derive(Debug)]
pub struct ModelFile {
    config: ModelConfig,
    source: Source,
}

#[derive(Debug)]
enum Source {
    Gguf(GgufFile),
    Safetensors(SafetensorsDir),
}

impl ModelFile {
    /// Opens a `.gguf` file, or a safetensors model (a directory, or a
    /// `.safetensors` file, with `config.json` beside it).
    pub fn open(path: &Path) -> Result<Self> {
        let is_safetensors = path.is_dir() || path.extension().is_some_and(|e| e == "safetensors");
        if is_safetensors {
            let dir = SafetensorsDir::open(path)?;
            Ok(Self { config: dir.config.clone(), source: Source::Safetensors(dir) })
        } else {
            let gguf = GgufFile::open(path)?;
            let config = ModelConfig::from_gguf(&gguf.metadata)?;
            Ok(Self { config, source: Source::Gguf(gguf) })
        }
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Whether the file holds `name`.
    pub fn has(&self, name: &str) -> bool {
        match &self.source {
            Source::Gguf(g) => g.tensors.contains_key(name),
            Source::Safetensors(s) => s.find(name).is_some(),
        }
    }

    /// Reads a `rows × cols` weight matrix, checking its shape.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let (dtype, dims, bytes) = self.raw(name)?;
        if dims != [cols, rows] {
            return Err(EngineError::TensorShape { name: name.into(), expected: vec![cols, rows], actual: dims });
        }
        Matrix::new(dtype, rows, cols, bytes)
            .ok_or_else(|| EngineError::UnsupportedDtype { name: name.into(), dtype: dtype.name().into() })
    }

    /// Bytes `name` takes in the file, if it is there: what a loader
    /// reserves for it before reading.
    pub(crate) fn stored_bytes(&self, name: &str) -> Option<usize> {
        match &self.source {
            Source::Gguf(g) => g.tensors.get(name).map(|t| t.n_bytes),
            Source::Safetensors(s) => s.find(name).map(|(_, _, t)| t.end.saturating_sub(t.start)),
        }
    }

    /// `(type, row bytes, bytes)` of the `rows × cols` matrix `name`, or
    /// the error [`ModelFile::matrix`] would give, without reading it.
    pub(crate) fn stored_shape(&self, name: &str, rows: usize, cols: usize) -> Result<(GgmlType, usize, usize)> {
        let (dtype, dims) = match &self.source {
            Source::Gguf(g) => g.info(name).map(|i| (i.dtype, i.dims.clone()))?,
            Source::Safetensors(s) => {
                let (_, _, t) = s.find(name).ok_or_else(|| EngineError::MissingTensor(hf_name(name)))?;
                (t.dtype, t.shape.iter().rev().copied().collect())
            }
        };
        if dims != [cols, rows] {
            return Err(EngineError::TensorShape { name: name.into(), expected: vec![cols, rows], actual: dims });
        }
        let unsupported = || EngineError::UnsupportedDtype { name: name.into(), dtype: dtype.name().into() };
        let (row_bytes, len) = Matrix::stored_len(dtype, rows, cols).ok_or_else(unsupported)?;
        if self.stored_bytes(name) != Some(len) {
            return Err(unsupported());
        }
        Ok((dtype, row_bytes, len))
    }

    /// [`ModelFile::matrix`] for each `(name, rows, cols)` of `plan`, read
    /// straight into a slot of one new [`WeightArena`] in `plan`'s order and
    /// repacked there when its kernel packs, on up to `threads` threads: no
    /// second copy of the weights builds up, and reading, repacking and the
    /// first touch of the mapping's pages share the cores. Each slot holds
    /// its matrix stored or packed (rows padded to whole tiles); without a
    /// mapping the matrices go on the heap as before. Call
    /// [`Matrix::finish_arena`] with every returned matrix before use.
    pub(crate) fn matrices_into(
        &self,
        plan: &[(String, usize, usize)],
        threads: usize,
    ) -> Result<(Vec<Matrix>, WeightArena)> {
        self.matrices_in_runs(plan, threads, READ_RUN_BYTES)
    }

    /// [`ModelFile::matrices_into`], reading packed matrices about
    /// `run_bytes` at a time (at least one tile): tests read one tile at a
    /// time, so small matrices take several runs.
    fn matrices_in_runs(
        &self,
        plan: &[(String, usize, usize)],
        threads: usize,
        run_bytes: usize,
    ) -> Result<(Vec<Matrix>, WeightArena)> {
        let shapes: Vec<(GgmlType, usize, usize)> =
            plan.iter().map(|(name, rows, cols)| self.stored_shape(name, *rows, *cols)).collect::<Result<_>>()?;
        let sizes: Vec<usize> = plan
            .iter()
            .zip(&shapes)
            .map(|((_, rows, _), &(_, rb, len))| len.max(rows.div_ceil(quant::TILE) * quant::TILE * rb))
            .collect();
        let mut arena = WeightArena::new(&sizes);
        let Some(slots) = arena.slots() else {
            let mats = plan.iter().map(|(n, r, c)| self.matrix(n, *r, *c)).collect::<Result<_>>()?;
            return Ok((mats, arena));
        };
        // Bytes read at once from a packed matrix of `row_bytes` rows: whole tiles.
        let run_of = |row_bytes: usize| {
            let tile_bytes = quant::TILE * row_bytes;
            (run_bytes / tile_bytes.max(1)).max(1) * tile_bytes
        };
        // Packed matrices are read a run of whole tiles at a time into a
        // buffer of the thread's own that stays in cache, and packed from
        // there into their slot: the slot's pages are written once. Others
        // are read straight into their slot. Returns whether the slot
        // holds the matrix packed, and its length.
        let fill = |i: usize, slot: &mut [u8], buf: &mut [u8]| -> Result<(bool, usize)> {
            let ((name, rows, _), &(dtype, row_bytes, len)) = (&plan[i], &shapes[i]);
            let tile_bytes = quant::TILE * row_bytes;
            if !quant::packs(dtype) || tile_bytes == 0 {
                self.read_at(name, 0, &mut slot[..len])?;
                return Ok((false, len));
            }
            let packed_len = rows.div_ceil(quant::TILE) * tile_bytes;
            let run = run_of(row_bytes);
            // Tile `t` of the packed matrix holds GGUF rows `8t..8t + 8`,
            // and starts at the same byte offset as they do.
            for (k, dst) in slot[..packed_len].chunks_mut(run).enumerate() {
                let start = k * run;
                let src = &mut buf[..dst.len().min(len.saturating_sub(start))];
                self.read_at(name, start, src)?;
                if !quant::pack_matrix_into(dtype, src, row_bytes, dst) {
                    return Err(EngineError::UnsupportedDtype { name: name.clone(), dtype: dtype.name().into() });
                }
            }
            Ok((true, packed_len))
        };
        // Matrices dealt round-robin, so each thread gets some of every size.
        let threads = threads.clamp(1, plan.len().max(1));
        let mut work: Vec<Vec<(usize, &mut [u8])>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, slot) in slots.into_iter().enumerate() {
            work[i % threads].push((i, slot));
        }
        let buf_len = shapes.iter().map(|&(_, rb, _)| run_of(rb)).max().unwrap_or(0);
        let mut filled: Vec<(usize, Result<(bool, usize)>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = work
                .into_iter()
                .map(|jobs| {
                    scope.spawn(|| {
                        let mut buf = vec![0u8; buf_len];
                        jobs.into_iter().map(|(i, slot)| (i, fill(i, slot, &mut buf))).collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        });
        filled.sort_by_key(|(i, _)| *i);
        if filled.len() != plan.len() {
            return Err(EngineError::Gguf("a weight loader thread panicked".into()));
        }
        let mut mats = Vec::with_capacity(plan.len());
        for (i, f) in filled {
            let ((_, rows, cols), &(dtype, ..)) = (&plan[i], &shapes[i]);
            let (packed, len) = f?;
            mats.push(Matrix::from_parts(dtype, *rows, *cols, packed, arena.claim(i, len)));
        }
        Ok((mats, arena))
    }

    /// Reads a vector (a norm weight or a bias) as f32, checking its length.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (dtype, dims, bytes) = self.raw(name)?;
        if dims != [len] || dtype.row_bytes(len) != Some(bytes.len()) {
            return Err(EngineError::TensorShape { name: name.into(), expected: vec![len], actual: dims });
        }
        let mut out = vec![0.0; len];
        quant::dequantize_row(dtype, &bytes, &mut out);
        Ok(out)
    }

    /// Bytes `start..start + out.len()` of tensor `name` into `out`.
    fn read_at(&self, name: &str, start: usize, out: &mut [u8]) -> Result<()> {
        match &self.source {
            Source::Gguf(g) => g.read_at(name, start, out),
            Source::Safetensors(s) => {
                let src = s.bytes(name)?.get(start..start.saturating_add(out.len())).ok_or_else(|| {
                    EngineError::Safetensors(format!("tensor `{}` is shorter than its shape", hf_name(name)))
                })?;
                out.copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// A tensor's storage type, dimensions (innermost first) and bytes, as
    /// stored: what a backend that keeps its own layout loads from.
    pub(crate) fn raw(&self, name: &str) -> Result<(GgmlType, Vec<usize>, Vec<u8>)> {
        match &self.source {
            Source::Gguf(g) => {
                let info = g.info(name)?;
                Ok((info.dtype, info.dims.clone(), g.read(name)?))
            }
            Source::Safetensors(s) => s.read(name),
        }
    }

    /// Builds the tokenizer the file describes.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match &self.source {
            Source::Gguf(g) => Tokenizer::from_gguf(&g.metadata),
            Source::Safetensors(s) => {
                let config = s.dir.join("tokenizer_config.json");
                Tokenizer::from_files(&s.dir.join("tokenizer.json"), config.exists().then_some(config.as_path()))
            }
        }
    }
}

/// The Hugging Face name of a GGUF-style tensor name.
pub(crate) fn hf_name(gguf: &str) -> String {
    const TOP: [(&str, &str); 3] = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ];
    const BLOCK: [(&str, &str); 9] = [
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ];
    if let Some((_, hf)) = TOP.iter().find(|(g, _)| *g == gguf) {
        return (*hf).to_string();
    }
    let mut parts = gguf.splitn(3, '.');
    if let (Some("blk"), Some(layer), Some(rest)) = (parts.next(), parts.next(), parts.next()) {
        if let Some((kind, suffix)) = rest.split_once('.') {
            if let Some((_, hf)) = BLOCK.iter().find(|(g, _)| *g == kind) {
                return format!("model.layers.{layer}.{hf}.{suffix}");
            }
        }
    }
    gguf.to_string()
}

/// A safetensors model: every `*.safetensors` file in a directory, memory-mapped.
#[derive(Debug)]
struct SafetensorsDir {
    dir: PathBuf,
    config: ModelConfig,
    files: Vec<(PathBuf, Mmap, usize, HashMap<String, StTensor>)>,
}

#[derive(Debug)]
struct StTensor {
    dtype: GgmlType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

impl SafetensorsDir {
    fn open(path: &Path) -> Result<Self> {
        let dir =
            if path.is_dir() { path.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).to_path_buf() };
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| EngineError::Io { path: p, source }
        };
        let config_path = dir.join("config.json");
        let config = ModelConfig::from_hf_json(&std::fs::read_to_string(&config_path).map_err(io(&config_path))?)?;
        let mut paths: Vec<PathBuf> = if path.is_dir() {
            std::fs::read_dir(&dir)
                .map_err(io(&dir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect()
        } else {
            vec![path.to_path_buf()]
        };
        paths.sort();
        if paths.is_empty() {
            return Err(EngineError::Safetensors(format!("no .safetensors files in {}", dir.display())));
        }
        let mut files = Vec::new();
        for p in paths {
            let file = File::open(&p).map_err(io(&p))?;
            // SAFETY: the map is read-only; a model file being rewritten while
            // served is outside what any inference server can defend against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io(&p))?;
            let (header, meta) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| EngineError::Safetensors(format!("{}: {e}", p.display())))?;
            let mut tensors = HashMap::new();
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    safetensors::Dtype::F32 => GgmlType::F32,
                    safetensors::Dtype::F16 => GgmlType::F16,
                    safetensors::Dtype::BF16 => GgmlType::BF16,
                    other => {
                        return Err(EngineError::UnsupportedDtype { name, dtype: format!("{other:?}") });
                    }
                };
                let (start, end) = info.data_offsets;
                tensors.insert(name, StTensor { dtype, shape: info.shape.clone(), start, end });
            }
            files.push((p, mmap, 8 + header, tensors));
        }
        Ok(Self { dir, config, files })
    }

    fn find(&self, name: &str) -> Option<(&Mmap, usize, &StTensor)> {
        let hf = hf_name(name);
        self.files.iter().find_map(|(_, mmap, base, t)| t.get(&hf).map(|t| (mmap, *base, t)))
    }

    fn read(&self, name: &str) -> Result<(GgmlType, Vec<usize>, Vec<u8>)> {
        let (_, _, t) = self.find(name).ok_or_else(|| EngineError::MissingTensor(hf_name(name)))?;
        // safetensors lists the outermost dimension first; GGUF the innermost.
        let dims: Vec<usize> = t.shape.iter().rev().copied().collect();
        Ok((t.dtype, dims, self.bytes(name)?.to_vec()))
    }

    /// A tensor's bytes, where its file is mapped.
    fn bytes(&self, name: &str) -> Result<&[u8]> {
        let (mmap, base, t) = self.find(name).ok_or_else(|| EngineError::MissingTensor(hf_name(name)))?;
        mmap.get(base + t.start..base + t.end)
            .ok_or_else(|| EngineError::Safetensors(format!("tensor `{}` lies outside its file", hf_name(name))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_read_into_an_arena_equal_those_read_onto_the_heap() {
        let dir = tempfile::tempdir().expect("tempdir");
        for weight_type in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::F16] {
            let model = crate::fixture::TinyModel { layers: 1, tied: false, weight_type, ..Default::default() };
            let file = ModelFile::open(&model.write_gguf(dir.path()).expect("fixture")).expect("model");
            let c = file.config().clone();
            let plan: Vec<(String, usize, usize)> =
                [("blk.0.attn_q.weight", c.hidden, c.hidden), ("blk.0.ffn_down.weight", c.hidden, c.ffn)]
                    .into_iter()
                    .chain([("output.weight", c.vocab, c.hidden)])
                    .map(|(n, r, k)| (n.to_string(), r, k))
                    .collect();
            // More threads than matrices, and one; whole matrices at once,
            // and a tile at a time.
            for (threads, run) in [(1, READ_RUN_BYTES), (5, READ_RUN_BYTES), (2, 1)] {
                let (mut mats, arena) = file.matrices_in_runs(&plan, threads, run).expect("read");
                Matrix::finish_arena(arena, &mut mats.iter_mut().collect::<Vec<_>>());
                for (m, (name, rows, cols)) in mats.iter().zip(&plan) {
                    assert!(m.is_gathered(), "{name}");
                    let heap = file.matrix(name, *rows, *cols).expect("heap copy");
                    assert_eq!(m.bytes(), heap.bytes(), "{name}");
                    let (mut a, mut b) = (vec![0.0f32; *cols], vec![0.0f32; *cols]);
                    for r in 0..*rows {
                        m.dequantize_row_into(r, &mut a);
                        heap.dequantize_row_into(r, &mut b);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&a), bits(&b), "{weight_type:?} {name} row {r}");
                    }
                }
            }
        }
        let file = ModelFile::open(&crate::fixture::TinyModel::default().write_gguf(dir.path()).expect("fixture"))
            .expect("model");
        let d = file.config().hidden;
        let bad = [("blk.0.attn_q.weight".to_string(), d + 1, d)];
        assert!(matches!(file.matrices_into(&bad, 2), Err(EngineError::TensorShape { .. })));
    }

    #[test]
    fn maps_names() {
        assert_eq!(hf_name("blk.12.attn_q.bias"), "model.layers.12.self_attn.q_proj.bias");
        assert_eq!(hf_name("blk.0.ffn_norm.weight"), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(hf_name("output.weight"), "lm_head.weight");
    }
}
