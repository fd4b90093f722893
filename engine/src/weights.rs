//! Weight matrices kept in their file format, and the matmul over a batch.

use std::cell::OnceCell;

use crate::pool::{split, ComputePool};
use crate::quant::{self, GgmlType};

/// A `rows × cols` weight matrix (`rows` outputs, `cols` inputs), row-major,
/// each row a run of `dtype` blocks exactly as GGUF stores it.
#[derive(Debug, Clone)]
pub struct Matrix {
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// Shared, so a tied lm_head and the embedding hold one copy.
    data: std::sync::Arc<Vec<u8>>,
}

impl Matrix {
    /// Wraps raw bytes; `None` if the length does not match the shape and type.
    pub fn new(dtype: GgmlType, rows: usize, cols: usize, data: Vec<u8>) -> Option<Self> {
        let row_bytes = dtype.row_bytes(cols)?;
        (dtype.is_weight_type() && data.len() == row_bytes.checked_mul(rows)?).then(|| Self {
            dtype,
            rows,
            cols,
            row_bytes,
            // `Arc<Vec>` rather than `Arc<[u8]>`: no copy of a 30 MB embedding.
            data: std::sync::Arc::new(data),
        })
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
        std::sync::Arc::ptr_eq(&self.data, &other.data)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Decodes row `r` (an embedding lookup) into `out`.
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        quant::dequantize_row(self.dtype, self.row(r), out);
    }

    /// `out[i][o] = dot(self[o], x[i])` for every row `i` of `x`.
    ///
    /// Each output element is one `vec_dot` in the reference order, so a
    /// row's result is the same whatever else is in the batch and however
    /// many threads run. Threads split the output features; each weight row
    /// is read once for the whole batch.
    pub fn matmul(&self, x: &Activations<'_>, out: &mut [f32], pool: &ComputePool) {
        debug_assert_eq!(x.dim, self.cols);
        debug_assert_eq!(out.len(), x.n * self.rows);
        let a = x.quantized(self.dtype.vec_dot_type());
        // Float weights dot the raw f32 rows; `a` is then empty.
        let a_bytes = if a.is_empty() { 0 } else { self.dtype.vec_dot_type().row_bytes(self.cols).unwrap_or(0) };
        let out_ptr = SharedOut(out.as_mut_ptr());
        let (n, rows, dim, xs) = (x.n, self.rows, x.dim, x.x);
        pool.run(&|part| {
            let out_ptr = &out_ptr;
            // Tiles of up to ROW_TILE weight rows share each activation row
            // (bit-identical to one `vec_dot` per row).
            let range = split(rows, part, pool.threads());
            let mut tile = [0.0f32; quant::ROW_TILE];
            for o in range.clone().step_by(quant::ROW_TILE) {
                let k = (range.end - o).min(quant::ROW_TILE);
                let w = &self.data[o * self.row_bytes..(o + k) * self.row_bytes];
                for i in 0..n {
                    let (ai, xi) = (&a[i * a_bytes..(i + 1) * a_bytes], &xs[i * dim..(i + 1) * dim]);
                    quant::vec_dot_rows(self.dtype, w, self.row_bytes, ai, xi, &mut tile[..k]);
                    for (r, &v) in tile[..k].iter().enumerate() {
                        // SAFETY: `i * rows + o + r` is in bounds (out.len() == n * rows,
                        // o + r < rows) and each output row belongs to exactly one part,
                        // so no two threads write the same element, and `out` outlives
                        // `pool.run`.
                        unsafe { *out_ptr.0.add(i * rows + o + r) = v };
                    }
                }
            }
        });
    }
}

/// The output buffer shared across compute threads, written at disjoint indices.
struct SharedOut(*mut f32);
// SAFETY: see the write in `Matrix::matmul`: indices are disjoint per thread.
unsafe impl Sync for SharedOut {}

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
}

impl<'a> Activations<'a> {
    /// Wraps `n` rows of width `dim`.
    pub fn new(x: &'a [f32], n: usize, dim: usize) -> Self {
        debug_assert_eq!(x.len(), n * dim);
        Self { x, n, dim, q8_0: OnceCell::new(), q8_1: OnceCell::new(), q8_k: OnceCell::new() }
    }

    fn quantized(&self, ty: GgmlType) -> &[u8] {
        let cell = match ty {
            GgmlType::Q8_0 => &self.q8_0,
            GgmlType::Q8_1 => &self.q8_1,
            GgmlType::Q8_K => &self.q8_k,
            _ => return &[],
        };
        cell.get_or_init(|| self.x.chunks_exact(self.dim).flat_map(|r| quant::quantize_row(ty, r)).collect())
    }
}
