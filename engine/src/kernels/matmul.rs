//! Weight matrices kept in their file format, and the matmul over a batch.

use std::cell::OnceCell;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::pool::{split, ComputePool};
use crate::quant::{self, GgmlType};
use crate::weight_bytes::WeightBytes;

/// A `rows × cols` weight matrix (`rows` outputs, `cols` inputs), row-major,
/// each row a run of `dtype` blocks exactly as GGUF stores it, or, when the
/// kernel in use has a packed kernel for the type, repacked into tiles of
/// [`quant::TILE`] rows (see [`quant::pack_matrix`]) holding the same bytes.
#[derive(Debug, Clone)]
pub struct Matrix {
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// Whether `data` holds packed tiles rather than GGUF rows.
    packed: bool,
    /// Shared, so a tied lm_head and the embedding hold one copy.
    data: WeightBytes,
}

/// Chunks of output tiles per compute thread in one matmul job. Each matrix
/// of a group is cut separately, so a group still has several chunks per
/// thread, claimed from a shared counter: a stalled thread's unclaimed
/// chunks are taken over. Measured here at 2 threads, one chunk per thread
/// and matrix beat four by 28% at batch 1 and 8% at batch 16 (fewer, longer
/// kernel runs and fewer contended claims).
const CHUNKS_PER_THREAD: usize = 1;

// The unpacked path cuts rows at the same tile boundaries as the packed one.
const _: () = assert!(quant::ROW_TILE == quant::TILE);

/// Tiles per packed-kernel call: at most about 250 KB of weights (SmolLM2's
/// widest rows), which stay in L2 while every group of activation rows
/// passes over them, and enough tiles to amortise the kernel's per-call
/// set-up. 32 measured 2–4% faster than 16 at batch 16. Even, so the
/// 512-bit kernels get whole tile pairs.
const TILE_RUN: usize = 32;

impl Matrix {
    /// Wraps raw bytes; `None` if the length does not match the shape and type.
    pub fn new(dtype: GgmlType, rows: usize, cols: usize, data: Vec<u8>) -> Option<Self> {
        let row_bytes = Self::stored_len(dtype, rows, cols).filter(|&(_, len)| len == data.len())?.0;
        let (packed, data) = match quant::pack_matrix(dtype, &data, rows, row_bytes) {
            Some(p) => (true, p),
            None => (false, data),
        };
        Some(Self { dtype, rows, cols, row_bytes, packed, data: WeightBytes::heap(data) })
    }

    /// `(row bytes, total bytes)` of a `rows × cols` matrix of `dtype` as
    /// GGUF stores it; `None` for a type matrices cannot use or a shape
    /// that does not fit it.
    pub(crate) fn stored_len(dtype: GgmlType, rows: usize, cols: usize) -> Option<(usize, usize)> {
        let row_bytes = dtype.row_bytes(cols)?;
        dtype.is_weight_type().then_some(())?;
        Some((row_bytes, row_bytes.checked_mul(rows)?))
    }

    /// A matrix over bytes a loader already put in place (a stage's
    /// [`crate::weight_bytes::WeightArena`]): `packed` says whether
    /// [`quant::pack_matrix`] made them, else they are GGUF rows.
    pub(crate) fn from_parts(dtype: GgmlType, rows: usize, cols: usize, packed: bool, data: WeightBytes) -> Self {
        let row_bytes = dtype.row_bytes(cols).unwrap_or(0);
        Self { dtype, rows, cols, row_bytes, packed, data }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Storage type.
    pub fn dtype(&self) -> GgmlType {
        self.dtype
    }

    /// Whether `other` shares this matrix's storage (a tied lm_head).
    pub fn shares_storage(&self, other: &Self) -> bool {
        self.data.same(&other.data)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.as_slice().len()
    }

    /// Points matrices read into `arena` at its mapping, once every one is
    /// in (see the `weight_bytes` module).
    pub(crate) fn finish_arena(arena: crate::weight_bytes::WeightArena, mats: &mut [&mut Matrix]) {
        let mut parts: Vec<&mut WeightBytes> = mats.iter_mut().map(|m| &mut m.data).collect();
        arena.finish(&mut parts);
    }

    /// Whether the bytes sit in their stage's shared mapping.
    pub fn is_gathered(&self) -> bool {
        self.data.is_mapped()
    }

    /// Decodes row `r` (an embedding lookup) into `out`.
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        if self.packed {
            let mut row = vec![0u8; self.row_bytes];
            quant::unpack_row(self.dtype, self.data.as_slice(), self.row_bytes, r, &mut row);
            quant::dequantize_row(self.dtype, &row, out);
        } else {
            quant::dequantize_row(self.dtype, &self.data.as_slice()[r * self.row_bytes..(r + 1) * self.row_bytes], out);
        }
    }

    /// `out[i][o] = dot(self[o], x[i])` for every row `i` of `x`.
    ///
    /// Each output element is one `vec_dot` in the reference order, so a
    /// row's result is the same whatever else is in the batch and however
    /// many threads run. Threads split the output features; each weight row
    /// is read once for the whole batch.
    pub fn matmul(&self, x: &Activations<'_>, out: &mut [f32], pool: &ComputePool) {
        Self::matmul_group(&[self], x, &mut [out], pool);
    }

    /// [`Matrix::matmul`] of several matrices with the same input (q, k, v;
    /// gate, up) in one pool job, so the threads wake once instead of once
    /// per matrix. Each thread takes the same share of every matrix's output
    /// features; results equal separate `matmul` calls bit for bit.
    pub fn matmul_group(mats: &[&Matrix], x: &Activations<'_>, outs: &mut [&mut [f32]], pool: &ComputePool) {
        debug_assert_eq!(mats.len(), outs.len());
        // Quantize first, rows split across the pool; the lazily filled
        // cache itself is only touched on this thread (it is not `Sync`).
        for m in mats {
            x.prepare_on(m.dtype, m.packed, pool);
        }
        let jobs: Vec<(&Matrix, &[u8], Option<&quant::ActScalars>, SharedOut)> = mats
            .iter()
            .zip(outs.iter_mut())
            .map(|(m, out)| {
                debug_assert_eq!(x.dim, m.cols);
                debug_assert_eq!(out.len(), x.n * m.rows);
                // `prepare_on` above decoded them for every packed matrix.
                let pre = if m.packed { x.scalars(m.dtype) } else { None };
                debug_assert_eq!(pre.is_some(), m.packed);
                (*m, x.quantized(m.dtype.vec_dot_type()), pre, SharedOut(out.as_mut_ptr()))
            })
            .collect();
        let (n, dim, xs) = (x.n, x.dim, x.x);
        // Each matrix's tiles are cut into a few chunks per thread, and parts
        // claim chunks from a shared counter: if a thread is descheduled (a
        // busy shared host), the others take over its unclaimed chunks
        // instead of waiting. Who computes a tile cannot change its values.
        let per = CHUNKS_PER_THREAD * pool.threads();
        let chunks: Vec<(usize, std::ops::Range<usize>)> = jobs
            .iter()
            .enumerate()
            .flat_map(|(j, (m, ..))| {
                // Chunks start on even tiles: the 512-bit kernels take tiles in pairs.
                let tiles = m.rows.div_ceil(quant::TILE);
                (0..per)
                    .map(move |c| {
                        let r = split(tiles.div_ceil(2), c, per);
                        (j, 2 * r.start..(2 * r.end).min(tiles))
                    })
                    .filter(|(_, r)| !r.is_empty())
            })
            .collect();
        let next = AtomicUsize::new(0);
        pool.run(&|_part| {
            while let Some((j, tiles)) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
                let (m, a, pre, out) = &jobs[*j];
                m.matmul_tiles(n, dim, xs, a, *pre, out, tiles.clone());
            }
        });
    }

    /// Output features `tiles.start * TILE .. tiles.end * TILE` (clipped to
    /// `rows`) of a matmul into `out`, for every activation row.
    #[allow(clippy::too_many_arguments)] // One matmul job's operands.
    fn matmul_tiles(
        &self,
        n: usize,
        dim: usize,
        xs: &[f32],
        a: &[u8],
        pre: Option<&quant::ActScalars>,
        out: &SharedOut,
        tiles: std::ops::Range<usize>,
    ) {
        // Float weights dot the raw f32 rows; `a` is then empty.
        let a_bytes = if a.is_empty() { 0 } else { self.dtype.vec_dot_type().row_bytes(self.cols).unwrap_or(0) };
        let rows = self.rows;
        let out_ptr = |i: usize, o: usize| out.0.wrapping_add(i * rows + o);
        let put = |i: usize, o: usize, v: f32| {
            debug_assert!(i < n && o < rows);
            // SAFETY: `i * rows + o` is in bounds (out.len() == n * rows, o < rows)
            // and each tile is claimed by exactly one thread, so no two threads
            // write the same element, and `out` outlives `pool.run`.
            unsafe { *out_ptr(i, o) = v };
        };
        if let (true, Some(pre)) = (self.packed, pre) {
            let tile_bytes = quant::TILE * self.row_bytes;
            let nb = self.cols / self.dtype.block_len();
            // Whole tiles go straight into the output rows; a matrix whose
            // last tile is partial goes through a buffer, so nothing is
            // written past a row.
            let in_place = rows.is_multiple_of(quant::TILE) && nb > 0;
            // Made only when needed: it is 8 KiB to zero, and a decode step
            // makes about 200 of these calls per thread.
            let mut buf = if in_place { Vec::new() } else { vec![[0.0f32; quant::TILE]; TILE_RUN * quant::MAX_ACT] };
            // Runs of TILE_RUN tiles stay in L2 while every group of up to
            // MAX_ACT activation rows passes over them.
            for t0 in tiles.clone().step_by(TILE_RUN) {
                let t1 = (t0 + TILE_RUN).min(tiles.end);
                let run = &self.data.as_slice()[t0 * tile_bytes..t1 * tile_bytes];
                let mut i = 0;
                while i < n {
                    let m = (n - i).min(quant::MAX_ACT);
                    let ops = quant::PackedOperands {
                        dtype: self.dtype,
                        tiles: run,
                        nb,
                        a: &a[i * a_bytes..],
                        a_stride: a_bytes,
                        m,
                        pre,
                        first: i,
                    };
                    if in_place {
                        // SAFETY: rows `i..i + m` are below `n` and tiles `t0..t1`
                        // within `rows / TILE`, so every place `out_ptr(i + j, t * TILE)`
                        // lies in `out` (n × rows floats); this thread alone claimed
                        // these tiles, and `out` outlives `pool.run`.
                        unsafe {
                            let at = out_ptr(i, t0 * quant::TILE).cast::<[f32; quant::TILE]>();
                            quant::dot_packed_into(&ops, quant::TileOut::strided(at, 1, rows / quant::TILE));
                        }
                        i += m;
                        continue;
                    }
                    let out = &mut buf[..(t1 - t0) * m];
                    quant::dot_packed(&ops, out);
                    for t in t0..t1 {
                        let live = (rows - t * quant::TILE).min(quant::TILE);
                        for (j, lanes) in out[(t - t0) * m..(t - t0 + 1) * m].iter().enumerate() {
                            if live == quant::TILE {
                                // A whole tile is one fixed-size store (a
                                // variable-length copy went through memcpy).
                                debug_assert!(i + j < n && (t + 1) * quant::TILE <= rows);
                                // SAFETY: as in `put`: the tile's features lie in
                                // the row and only this thread writes them.
                                unsafe {
                                    out_ptr(i + j, t * quant::TILE)
                                        .cast::<[f32; quant::TILE]>()
                                        .write_unaligned(*lanes);
                                }
                                continue;
                            }
                            for (r, &v) in lanes[..live].iter().enumerate() {
                                put(i + j, t * quant::TILE + r, v);
                            }
                        }
                    }
                    i += m;
                }
            }
            return;
        }
        // Tiles of up to ROW_TILE weight rows share each activation row
        // (bit-identical to one `vec_dot` per row).
        let range = (tiles.start * quant::TILE).min(rows)..(tiles.end * quant::TILE).min(rows);
        let mut tile = [0.0f32; quant::ROW_TILE];
        for o in range.clone().step_by(quant::ROW_TILE) {
            let k = (range.end - o).min(quant::ROW_TILE);
            let w = &self.data.as_slice()[o * self.row_bytes..(o + k) * self.row_bytes];
            for i in 0..n {
                let (ai, xi) = (&a[i * a_bytes..(i + 1) * a_bytes], &xs[i * dim..(i + 1) * dim]);
                quant::vec_dot_rows(self.dtype, w, self.row_bytes, ai, xi, &mut tile[..k]);
                for (r, &v) in tile[..k].iter().enumerate() {
                    put(i, o + r, v);
                }
            }
        }
    }
}

/// An output buffer shared across compute threads, written at disjoint indices.
struct SharedOut(*mut f32);
// SAFETY: see `Matrix::matmul_tiles`: each thread writes only the output
// features of the tiles it claimed.
unsafe impl Sync for SharedOut {}

/// Quantized rows written by several threads, one row each.
struct SharedBytes(*mut u8);
// SAFETY: see `Activations::prepare_on`: each row is written by one thread.
unsafe impl Sync for SharedBytes {}

/// A batch of activation rows and, lazily, their quantized forms.
///
/// q, k and v (and gate and up) share one input; quantizing it once per
/// partner type rather than once per matmul saves work on the hot path.
#[derive(Debug)]
pub struct Activations<'a> {
    x: &'a [f32],
    n: usize,
    dim: usize,
    q8_0: OnceCell<Vec<u8>>,
    q8_1: OnceCell<Vec<u8>>,
    q8_k: OnceCell<Vec<u8>>,
    /// Packed-kernel scalars, per weight type: they differ even where the
    /// quantized rows are shared (`q8_0` for Q8_0, Q4_0 and Q5_0 weights, `q8_k`
    /// for the K-quants).
    pre_q8_0: OnceCell<quant::ActScalars>,
    pre_q4_0: OnceCell<quant::ActScalars>,
    pre_q5_0: OnceCell<quant::ActScalars>,
    pre_q4_1: OnceCell<quant::ActScalars>,
    pre_q4_k: OnceCell<quant::ActScalars>,
    pre_q5_k: OnceCell<quant::ActScalars>,
    pre_q6_k: OnceCell<quant::ActScalars>,
}

impl<'a> Activations<'a> {
    /// Wraps `n` rows of width `dim`.
    pub fn new(x: &'a [f32], n: usize, dim: usize) -> Self {
        debug_assert_eq!(x.len(), n * dim);
        Self {
            x,
            n,
            dim,
            q8_0: OnceCell::new(),
            q8_1: OnceCell::new(),
            q8_k: OnceCell::new(),
            pre_q8_0: OnceCell::new(),
            pre_q4_0: OnceCell::new(),
            pre_q5_0: OnceCell::new(),
            pre_q4_1: OnceCell::new(),
            pre_q4_k: OnceCell::new(),
            pre_q5_k: OnceCell::new(),
            pre_q6_k: OnceCell::new(),
        }
    }

    /// The packed kernels' scalars of these rows for `dtype` weights (the
    /// types that pack), once [`Activations::prepare_on`] has decoded them.
    fn scalars(&self, dtype: GgmlType) -> Option<&quant::ActScalars> {
        self.pre_cell(dtype)?.get()
    }

    fn pre_cell(&self, dtype: GgmlType) -> Option<&OnceCell<quant::ActScalars>> {
        match dtype {
            GgmlType::Q8_0 => Some(&self.pre_q8_0),
            GgmlType::Q4_0 => Some(&self.pre_q4_0),
            GgmlType::Q5_0 => Some(&self.pre_q5_0),
            GgmlType::Q4_1 => Some(&self.pre_q4_1),
            GgmlType::Q4_K => Some(&self.pre_q4_k),
            GgmlType::Q5_K => Some(&self.pre_q5_k),
            GgmlType::Q6_K => Some(&self.pre_q6_k),
            _ => None,
        }
    }

    fn q_cell(&self, ty: GgmlType) -> Option<&OnceCell<Vec<u8>>> {
        match ty {
            GgmlType::Q8_0 => Some(&self.q8_0),
            GgmlType::Q8_1 => Some(&self.q8_1),
            GgmlType::Q8_K => Some(&self.q8_k),
            _ => None,
        }
    }

    /// These rows quantized to `ty`, once [`Activations::prepare_on`] has
    /// made them; empty for types that are not quantized (float weights
    /// read the f32 rows).
    fn quantized(&self, ty: GgmlType) -> &[u8] {
        self.q_cell(ty).and_then(OnceCell::get).map_or(&[], Vec::as_slice)
    }

    /// Makes what a matmul with `dtype` weights reads, in one pool job with
    /// rows split across the threads: the rows quantized to the partner
    /// type, and for `packed` weights the kernels' scalars, decoded from
    /// each row as it is made. Either is skipped when an earlier matrix of
    /// the group made it.
    fn prepare_on(&self, dtype: GgmlType, packed: bool, pool: &ComputePool) {
        /// Fewer rows are quantized on the calling thread.
        const MIN_PARALLEL_ROWS: usize = 4;
        let ty = dtype.vec_dot_type();
        let Some(q_cell) = self.q_cell(ty) else { return };
        let pre_cell = self.pre_cell(dtype).filter(|_| packed);
        let quantize = q_cell.get().is_none();
        let decode = pre_cell.is_some_and(|c| c.get().is_none());
        if !quantize && !decode {
            return;
        }
        let (rb, nb, dim) = (ty.row_bytes(self.dim).unwrap_or(0), self.dim / ty.block_len(), self.dim);
        let mut fresh = if quantize { vec![0u8; rb * self.n] } else { Vec::new() };
        // The rows are read back (to decode scalars) where they are written,
        // or from the filled cache, which is never written here.
        let q_rows = SharedBytes(if quantize {
            fresh.as_mut_ptr()
        } else {
            q_cell.get().map_or(std::ptr::null_mut(), |q| q.as_ptr().cast_mut())
        });
        let xpb = quant::ActScalars::x_per_block(dtype);
        let (mut d, mut x) =
            if decode { (vec![0.0f32; nb * self.n], vec![0u32; nb * xpb * self.n]) } else { (Vec::new(), Vec::new()) };
        let (d_out, x_out) = (SharedOut(d.as_mut_ptr()), SharedBytes(x.as_mut_ptr().cast()));
        let xs = self.x;
        pool.rows(self.n, MIN_PARALLEL_ROWS, &|rows| {
            let (q_rows, d_out, x_out) = (&q_rows, &d_out, &x_out);
            for i in rows {
                // SAFETY: `i < n`: row `i`'s bytes lie in `fresh` (or the
                // filled cache) and its `nb` scalars in `d` and `x`, all of
                // which outlive `pool.rows`; each row goes to one call only,
                // so the written ranges are disjoint.
                unsafe {
                    if quantize {
                        let o = std::slice::from_raw_parts_mut(q_rows.0.add(i * rb), rb);
                        quant::quantize_row_into(ty, &xs[i * dim..(i + 1) * dim], o);
                    }
                    if decode {
                        let row = std::slice::from_raw_parts(q_rows.0.add(i * rb), rb);
                        let d = std::slice::from_raw_parts_mut(d_out.0.add(i * nb), nb);
                        let x = std::slice::from_raw_parts_mut(x_out.0.cast::<u32>().add(i * nb * xpb), nb * xpb);
                        quant::ActScalars::decode_row(dtype, row, d, x);
                    }
                }
            }
        });
        if let (true, Some(cell)) = (decode, pre_cell) {
            let _ = cell.set(quant::ActScalars::from_parts(dtype, nb, d, x));
        }
        if quantize {
            let _ = q_cell.set(fresh);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Every output element of `matmul` (packed or not, any batch size and
    /// thread count, alone or in a group) equals the single-row `vec_dot`
    /// of the GGUF-layout row, bit for bit.
    #[test]
    fn matmul_equals_vec_dot_for_any_batch_and_threads() {
        // A partial last tile (21 rows: through the buffer), whole tiles
        // (24: written in place), and 33 tiles (264: past one run of
        // TILE_RUN, with an odd tile for the paired kernels).
        for ((rows, cols), dtype) in [(21, 96), (24, 64), (264, 32)].into_iter().flat_map(|shape| {
            [
                GgmlType::Q4_1,
                GgmlType::Q8_0,
                GgmlType::Q4_0,
                GgmlType::Q5_0,
                GgmlType::Q4_K,
                GgmlType::Q5_K,
                GgmlType::Q6_K,
                GgmlType::F32,
            ]
            .map(|d| (shape, d))
        }) {
            // Two K-quant blocks (one for the widest shape, to keep it quick).
            let cols = match (dtype.block_len(), cols) {
                (256, 32) => 256,
                (256, _) => 512,
                _ => cols,
            };
            let w: Vec<Vec<u8>> = (0..rows).map(|r| quant::quantize_row(dtype, &noise(cols, r as u64 + 1))).collect();
            let m = Matrix::new(dtype, rows, cols, w.concat()).unwrap();
            for threads in [1, 2, 3] {
                let pool = ComputePool::new(threads);
                for n in [1, 2, 5, 33, 40] {
                    let x = noise(n * cols, 1000 + n as u64);
                    let acts = Activations::new(&x, n, cols);
                    let mut out = vec![f32::NAN; n * rows];
                    let mut twice = vec![f32::NAN; n * rows];
                    Matrix::matmul_group(&[&m, &m], &acts, &mut [&mut out, &mut twice], &pool);
                    for i in 0..n {
                        let xi = &x[i * cols..(i + 1) * cols];
                        let a = quant::quantize_row(dtype.vec_dot_type(), xi);
                        let a = if dtype == GgmlType::F32 { Vec::new() } else { a };
                        for (o, wr) in w.iter().enumerate() {
                            let want = quant::vec_dot(dtype, wr, &a, xi);
                            let got = out[i * rows + o];
                            assert_eq!(got.to_bits(), want.to_bits(), "{} n={n} t={threads}", dtype.name());
                            assert_eq!(twice[i * rows + o].to_bits(), want.to_bits());
                        }
                    }
                    let mut row = vec![0.0; cols];
                    let mut want = vec![0.0; cols];
                    m.dequantize_row_into(rows - 1, &mut row);
                    quant::dequantize_row(dtype, &w[rows - 1], &mut want);
                    assert_eq!(row, want);
                }
            }
        }
    }
}
