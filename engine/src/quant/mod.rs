//! Weight storage formats and the dot products between them.
//!
//! Quantized weights stay in their GGUF block layout in memory. A matmul
//! quantizes each activation row once to the format's partner type (Q8_0,
//! Q8_1 or Q8_K, as llama.cpp does, so results stay faithful to it), then
//! takes block-wise integer dot products.
//!
//! Determinism rule: every dot product has one fixed summation order, the
//! scalar reference in this module. Any faster kernel must reproduce it bit
//! for bit, so a row's result never depends on batch size or threads.

mod float;
mod kquant;
mod legacy;
mod pack;
mod simd;

use half::f16;

/// A GGML tensor storage type.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 4-bit, 32-element blocks, one scale.
    Q4_0,
    /// 4-bit, 32-element blocks, scale and minimum.
    Q4_1,
    /// 8-bit, 32-element blocks, one scale.
    Q8_0,
    /// 8-bit, 32-element blocks, scale and scaled sum (activations for Q4_1).
    Q8_1,
    /// 4-bit K-quant, 256-element super-blocks.
    Q4_K,
    /// 6-bit K-quant, 256-element super-blocks.
    Q6_K,
    /// 8-bit K-quant (activations for the K-quants).
    Q8_K,
}

impl GgmlType {
    /// Every storage type the engine computes with: for lookups by name and
    /// for tests that must cover each one.
    pub const ALL: [Self; 8] =
        [Self::F32, Self::F16, Self::BF16, Self::Q4_0, Self::Q4_1, Self::Q8_0, Self::Q4_K, Self::Q6_K];

    /// Maps GGUF's numeric type id; `None` for types the engine cannot compute with.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            12 => Self::Q4_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// GGUF's numeric type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q4_K => 12,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::BF16 => 30,
        }
    }

    /// GGML's name for the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
            Self::Q8_1 => "Q8_1",
            Self::Q4_K => "Q4_K",
            Self::Q6_K => "Q6_K",
            Self::Q8_K => "Q8_K",
        }
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q4_K | Self::Q6_K | Self::Q8_K => kquant::QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => legacy::Q4_0_BYTES,
            Self::Q4_1 => legacy::Q4_1_BYTES,
            Self::Q8_0 => legacy::Q8_0_BYTES,
            Self::Q8_1 => legacy::Q8_1_BYTES,
            Self::Q4_K => kquant::Q4K_BYTES,
            Self::Q6_K => kquant::Q6K_BYTES,
            Self::Q8_K => kquant::Q8K_BYTES,
        }
    }

    /// Bytes in a row of `n` elements, or `None` if `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_len()).then(|| n / self.block_len() * self.block_bytes())
    }

    /// The type activations are quantized to before a dot product with weights of this type.
    pub fn vec_dot_type(self) -> Self {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => Self::F32,
            Self::Q4_0 | Self::Q8_0 => Self::Q8_0,
            Self::Q4_1 | Self::Q8_1 => Self::Q8_1,
            Self::Q4_K | Self::Q6_K | Self::Q8_K => Self::Q8_K,
        }
    }

    /// Whether a weight matrix may be stored in this type.
    pub fn is_weight_type(self) -> bool {
        !matches!(self, Self::Q8_1 | Self::Q8_K)
    }
}

/// Decodes one row of `dtype` blocks into `out` (whose length is the element count).
pub fn dequantize_row(dtype: GgmlType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(dtype.row_bytes(out.len()), Some(bytes.len()));
    match dtype {
        GgmlType::F32 => float::decode_f32(bytes, out),
        GgmlType::F16 => float::decode_f16(bytes, out),
        GgmlType::BF16 => float::decode_bf16(bytes, out),
        GgmlType::Q4_0 => legacy::dequantize_q4_0(bytes, out),
        GgmlType::Q4_1 => legacy::dequantize_q4_1(bytes, out),
        GgmlType::Q8_0 => legacy::dequantize_q8_0(bytes, out),
        GgmlType::Q8_1 => legacy::dequantize_q8_1(bytes, out),
        GgmlType::Q4_K => kquant::dequantize_q4k(bytes, out),
        GgmlType::Q6_K => kquant::dequantize_q6k(bytes, out),
        GgmlType::Q8_K => dequantize_q8k(bytes, out),
    }
}

/// Encodes one row into `dtype` blocks. `x.len()` must be a whole number of blocks.
///
/// For the 8-bit activation types this is llama.cpp's reference quantization;
/// for weight types it is a plain (not search-optimised) encoder for fixtures.
pub fn quantize_row(dtype: GgmlType, x: &[f32]) -> Vec<u8> {
    let Some(n) = dtype.row_bytes(x.len()) else {
        debug_assert!(false, "row of {} is not whole {} blocks", x.len(), dtype.name());
        return Vec::new();
    };
    let mut out = vec![0u8; n];
    quantize_row_into(dtype, x, &mut out);
    out
}

/// [`quantize_row`] into a caller's buffer of exactly `dtype.row_bytes(x.len())`
/// bytes, so the hot path quantizes a whole batch without allocating per row.
pub fn quantize_row_into(dtype: GgmlType, x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(dtype.row_bytes(x.len()), Some(out.len()));
    match dtype {
        GgmlType::F32 => float::encode_f32(x, out),
        GgmlType::F16 => float::encode_f16(x, out),
        GgmlType::BF16 => float::encode_bf16(x, out),
        GgmlType::Q4_0 => legacy::quantize_q4_0(x, out),
        GgmlType::Q4_1 => legacy::quantize_q4_1(x, out),
        GgmlType::Q8_0 | GgmlType::Q8_1 if simd::quantize_row(dtype, x, out) => {}
        GgmlType::Q8_0 => legacy::quantize_q8_0(x, out),
        GgmlType::Q8_1 => legacy::quantize_q8_1(x, out),
        GgmlType::Q4_K => kquant::quantize_q4k(x, out),
        GgmlType::Q6_K => kquant::quantize_q6k(x, out),
        GgmlType::Q8_K => kquant::quantize_q8k(x, out),
    }
}

/// Dot product of one weight row (`w`, in `dtype` blocks) with one activation
/// row already quantized to `dtype.vec_dot_type()` (`a`). For float weights
/// `a` is the raw f32 row.
#[inline]
pub fn vec_dot(dtype: GgmlType, w: &[u8], a: &[u8], a_f32: &[f32]) -> f32 {
    // SIMD kernels are bit-identical to the scalar reference below.
    if let Some(v) = simd::vec_dot(dtype, w, a) {
        return v;
    }
    match dtype {
        GgmlType::F32 => float::dot_f32(w, a_f32),
        GgmlType::F16 => float::dot_f16(w, a_f32),
        GgmlType::BF16 => float::dot_bf16(w, a_f32),
        GgmlType::Q4_0 => legacy::vec_dot_q4_0_q8_0(w, a),
        GgmlType::Q4_1 => legacy::vec_dot_q4_1_q8_1(w, a),
        GgmlType::Q8_0 => legacy::vec_dot_q8_0_q8_0(w, a),
        GgmlType::Q4_K => kquant::vec_dot_q4k_q8k(w, a),
        GgmlType::Q6_K => kquant::vec_dot_q6k_q8k(w, a),
        GgmlType::Q8_1 | GgmlType::Q8_K => {
            debug_assert!(false, "{} is an activation type", dtype.name());
            0.0
        }
    }
}

/// Most weight rows one [`vec_dot_rows`] call computes.
pub const ROW_TILE: usize = simd::ROW_TILE;

/// [`vec_dot`] of `out.len()` (at most [`ROW_TILE`]) consecutive weight rows,
/// each `row_bytes` long, starting at `w`, with the same activation row.
///
/// Results equal per-row [`vec_dot`] bit for bit; batching rows lets SIMD
/// kernels share the activation loads and keep one row per vector lane.
pub fn vec_dot_rows(dtype: GgmlType, w: &[u8], row_bytes: usize, a: &[u8], a_f32: &[f32], out: &mut [f32]) {
    if !simd::vec_dot_rows(dtype, w, row_bytes, a, out) {
        for (r, o) in out.iter_mut().enumerate() {
            *o = vec_dot(dtype, &w[r * row_bytes..(r + 1) * row_bytes], a, a_f32);
        }
    }
}

pub use pack::{ActScalars, PackedOperands, TileOut};

/// Rows per packed weight tile (see [`pack_matrix`]).
pub const TILE: usize = pack::TILE;

/// Most activation rows one [`dot_packed`] call takes.
pub const MAX_ACT: usize = simd::MAX_ACT;

/// Repacks a `rows × row_bytes` matrix into interleaved tiles of [`TILE`]
/// rows when the kernel in use has a packed kernel for `dtype` (one
/// sequential stream per tile and vector-wide scale loads); `None` keeps the
/// GGUF layout. The packed form is `rows.div_ceil(TILE) * TILE * row_bytes` long.
pub fn pack_matrix(dtype: GgmlType, data: &[u8], rows: usize, row_bytes: usize) -> Option<Vec<u8>> {
    if simd::packs(dtype) {
        pack::pack(dtype, data, rows, row_bytes)
    } else {
        None
    }
}

/// Row `r` of a matrix packed by [`pack_matrix`], back in GGUF layout (`out`
/// is `row_bytes` long), for embedding lookups.
pub fn unpack_row(dtype: GgmlType, packed: &[u8], row_bytes: usize, r: usize, out: &mut [u8]) {
    pack::unpack_row(dtype, packed, row_bytes, r, out);
}

/// Dot products of every packed tile in `ops.tiles` (whole tiles of
/// [`TILE`] rows, as [`pack_matrix`] made them) with the `ops.m`
/// (1..=[`MAX_ACT`]) activation rows of `ops` (see [`PackedOperands`]; their
/// [`ActScalars`] are decoded once per matmul). `out[t * m + i][r]` equals
/// [`vec_dot`] of row `r` of tile `t` with activation `i`, bit for bit,
/// whatever `m` or the number of tiles.
pub fn dot_packed(ops: &PackedOperands<'_>, out: &mut [[f32; TILE]]) {
    let (m, tiles) = (ops.m, ops.tiles.len() / (TILE * ops.nb * ops.dtype.block_bytes()).max(1));
    assert!(out.len() >= tiles * m, "output holds {} tiles, the call needs {}", out.len(), tiles * m);
    // SAFETY: the slice holds every tile's rows (checked above) and is ours alone.
    unsafe { dot_packed_into(ops, TileOut::compact(out, m)) }
}

/// [`dot_packed`] into any layout: tile `t`'s sums for activation row `i`
/// go to `out.at(t, i)`. With a [`TileOut::strided`] layout a matmul writes
/// its output rows in place.
///
/// # Safety
/// As [`TileOut::strided`] requires, for every tile of `ops` and each of its
/// `m` rows.
pub unsafe fn dot_packed_into(ops: &PackedOperands<'_>, out: TileOut) {
    if simd::dot_packed(ops, out) {
        return;
    }
    let PackedOperands { dtype, tiles, nb, a, a_stride, m, .. } = *ops;
    // Reference path: rebuild each row and take the scalar dot product.
    let row_bytes = nb * dtype.block_bytes();
    let a_bytes = nb * dtype.vec_dot_type().block_bytes();
    let mut row = vec![0u8; row_bytes];
    let tile_bytes = (TILE * row_bytes).max(1);
    for (t, tile) in tiles.chunks_exact(tile_bytes).enumerate() {
        for r in 0..TILE {
            pack::unpack_row(dtype, tile, row_bytes, r, &mut row);
            for i in 0..m {
                let v = vec_dot(dtype, &row, &a[i * a_stride..][..a_bytes], &[]);
                // SAFETY: the caller guarantees tile `t` of row `i`.
                unsafe { (*out.at(t, i))[r] = v };
            }
        }
    }
}

/// Name of the SIMD kernel family chosen at run time (`scalar`, `avx2`,
/// `avx2+avxvnni`, `avx2+avx512vnni`, `neon`).
pub fn kernel_name() -> &'static str {
    simd::kernel_name()
}

/// Q8_K only appears as activations; decoding it serves tests and debugging.
fn dequantize_q8k(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in bytes.chunks_exact(kquant::Q8K_BYTES).zip(out.chunks_exact_mut(kquant::QK_K)) {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for (v, q) in o.iter_mut().zip(&b[4..4 + kquant::QK_K]) {
            *v = d * f32::from(*q as i8);
        }
    }
}

#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
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

    /// Every weight type's dot product with a quantized activation row stays
    /// close to the exact f64 dot product of the dequantized values.
    #[test]
    fn vec_dot_matches_dequantized_dot() {
        let n = 512;
        for dtype in GgmlType::ALL {
            let w = quantize_row(dtype, &noise(n, 1));
            let x = noise(n, 2);
            let a = quantize_row(dtype.vec_dot_type(), &x);
            let mut wd = vec![0.0; n];
            dequantize_row(dtype, &w, &mut wd);
            let mut ad = vec![0.0; n];
            dequantize_row(dtype.vec_dot_type(), &a, &mut ad);
            let exact: f64 = wd.iter().zip(&ad).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum();
            let got = f64::from(vec_dot(dtype, &w, &a, &x));
            // Q8_1's stored sum `s` is f16-rounded, which the exact dot lacks.
            assert!((got - exact).abs() < 2e-2 * (1.0 + exact.abs()), "{}: {got} vs {exact}", dtype.name());
            let err: f32 = noise(n, 1).iter().zip(&wd).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
            assert!(err < 0.2, "{} round trip error {err}", dtype.name());
        }
    }
}
