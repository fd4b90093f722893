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
pub(crate) mod kquant;
pub(crate) mod legacy;
pub(crate) mod pack;

use half::f16;

use crate::kernels::simd;

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
    /// 5-bit, 32-element blocks, one scale.
    Q5_0,
    /// 5-bit, 32-element blocks, scale and minimum.
    Q5_1,
    /// 8-bit, 32-element blocks, one scale.
    Q8_0,
    /// 8-bit, 32-element blocks, scale and scaled sum (activations for Q4_1).
    Q8_1,
    /// 2-bit K-quant, 256-element super-blocks.
    Q2_K,
    /// 3-bit K-quant, 256-element super-blocks.
    Q3_K,
    /// 4-bit K-quant, 256-element super-blocks.
    Q4_K,
    /// 5-bit K-quant, 256-element super-blocks.
    Q5_K,
    /// 6-bit K-quant, 256-element super-blocks.
    Q6_K,
    /// 8-bit K-quant (activations for the K-quants).
    Q8_K,
}

impl GgmlType {
    /// Every storage type the engine computes with: for lookups by name and
    /// for tests that must cover each one.
    pub const ALL: [Self; 13] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
    ];

    /// Maps GGUF's numeric type id; `None` for types the engine cannot compute with
    /// ([`ggml_type_name`] names those for error messages).
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
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
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
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
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q8_1 => "Q8_1",
            Self::Q2_K => "Q2_K",
            Self::Q3_K => "Q3_K",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
            Self::Q8_K => "Q8_K",
        }
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::Q8_K => kquant::QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => legacy::Q4_0_BYTES,
            Self::Q4_1 => legacy::Q4_1_BYTES,
            Self::Q5_0 => legacy::Q5_0_BYTES,
            Self::Q5_1 => legacy::Q5_1_BYTES,
            Self::Q8_0 => legacy::Q8_0_BYTES,
            Self::Q8_1 => legacy::Q8_1_BYTES,
            Self::Q2_K => kquant::Q2K_BYTES,
            Self::Q3_K => kquant::Q3K_BYTES,
            Self::Q4_K => kquant::Q4K_BYTES,
            Self::Q5_K => kquant::Q5K_BYTES,
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
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => Self::Q8_0,
            Self::Q4_1 | Self::Q5_1 | Self::Q8_1 => Self::Q8_1,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::Q8_K => Self::Q8_K,
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
        GgmlType::Q5_0 => legacy::dequantize_q5_0(bytes, out),
        GgmlType::Q5_1 => legacy::dequantize_q5_1(bytes, out),
        GgmlType::Q8_0 => legacy::dequantize_q8_0(bytes, out),
        GgmlType::Q8_1 => legacy::dequantize_q8_1(bytes, out),
        GgmlType::Q2_K => kquant::dequantize_q2k(bytes, out),
        GgmlType::Q3_K => kquant::dequantize_q3k(bytes, out),
        GgmlType::Q4_K => kquant::dequantize_q4k(bytes, out),
        GgmlType::Q5_K => kquant::dequantize_q5k(bytes, out),
        GgmlType::Q6_K => kquant::dequantize_q6k(bytes, out),
        GgmlType::Q8_K => kquant::dequantize_q8k(bytes, out),
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
        GgmlType::Q5_0 => legacy::quantize_q5_0(x, out),
        GgmlType::Q5_1 => legacy::quantize_q5_1(x, out),
        GgmlType::Q8_0 | GgmlType::Q8_1 if simd::quantize_row(dtype, x, out) => {}
        GgmlType::Q8_0 => legacy::quantize_q8_0(x, out),
        GgmlType::Q8_1 => legacy::quantize_q8_1(x, out),
        GgmlType::Q2_K => kquant::quantize_q2k(x, out),
        GgmlType::Q3_K => kquant::quantize_q3k(x, out),
        GgmlType::Q4_K => kquant::quantize_q4k(x, out),
        GgmlType::Q5_K => kquant::quantize_q5k(x, out),
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
        GgmlType::Q5_0 => legacy::vec_dot_q5_0_q8_0(w, a),
        GgmlType::Q5_1 => legacy::vec_dot_q5_1_q8_1(w, a),
        GgmlType::Q8_0 => legacy::vec_dot_q8_0_q8_0(w, a),
        GgmlType::Q2_K => kquant::vec_dot_q2k_q8k(w, a),
        GgmlType::Q3_K => kquant::vec_dot_q3k_q8k(w, a),
        GgmlType::Q4_K => kquant::vec_dot_q4k_q8k(w, a),
        GgmlType::Q5_K => kquant::vec_dot_q5k_q8k(w, a),
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

/// Whether [`pack_matrix`] packs `dtype` with the kernel in use: a loader
/// asks before reading, to pack while it reads.
pub(crate) fn packs(dtype: GgmlType) -> bool {
    simd::packs(dtype)
}

/// [`pack_matrix`] of a run of whole tiles (GGUF rows `data`, `row_bytes`
/// each) straight into its place `out` (see `pack::pack_into`), with no
/// matrix-sized buffer between; `false`, with nothing written, where
/// [`packs`] is false or the lengths do not fit.
pub(crate) fn pack_matrix_into(dtype: GgmlType, data: &[u8], row_bytes: usize, out: &mut [u8]) -> bool {
    packs(dtype) && pack::pack_into(dtype, data, row_bytes, out)
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

/// GGML's name for a GGUF type id, including the types the engine cannot compute with
/// (the i-quants, ternary and integer types, and ids since removed from GGUF), so an error
/// about a file can say which type it holds; `None` for ids ggml never defined.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    if let Some(t) = GgmlType::from_id(id) {
        return Some(t.name());
    }
    Some(match id {
        4 => "Q4_2",
        5 => "Q4_3",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        31 => "Q4_0_4_4",
        32 => "Q4_0_4_8",
        33 => "Q4_0_8_8",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36 => "IQ4_NL_4_4",
        37 => "IQ4_NL_4_8",
        38 => "IQ4_NL_8_8",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        _ => return None,
    })
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

    /// Ids, names and block sizes are ggml's, and every id maps back to its type.
    #[test]
    fn type_table_matches_ggml() {
        let table = [
            (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
            (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
            (GgmlType::Q2_K, 10, "Q2_K", 256, 84),
            (GgmlType::Q3_K, 11, "Q3_K", 256, 110),
            (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
            (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
            (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
            (GgmlType::Q8_K, 15, "Q8_K", 256, 292),
        ];
        for (t, id, name, len, bytes) in table {
            assert_eq!((t.id(), t.name(), t.block_len(), t.block_bytes()), (id, name, len, bytes));
        }
        for t in GgmlType::ALL.into_iter().chain([GgmlType::Q8_1, GgmlType::Q8_K]) {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(ggml_type_name(t.id()), Some(t.name()));
            assert!(t.vec_dot_type().block_len() == t.block_len() || t.vec_dot_type() == GgmlType::F32);
        }
        assert_eq!(GgmlType::from_id(16), None);
        assert_eq!(ggml_type_name(16), Some("IQ2_XXS"));
        assert_eq!(ggml_type_name(35), Some("TQ2_0"));
        assert_eq!(ggml_type_name(4), Some("Q4_2"));
        assert_eq!(ggml_type_name(1000), None);
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
            // Two bits leave a step of a third of a run's range.
            let bound = if dtype == GgmlType::Q2_K { 0.45 } else { 0.2 };
            assert!(err < bound, "{} round trip error {err}", dtype.name());
        }
    }
}
