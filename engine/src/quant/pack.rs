//! Interleaved ("packed") weight layouts for the multi-row SIMD kernels.
//!
//! Why: the GGUF layout stores each row's blocks contiguously, so a kernel
//! that computes eight rows at once reads eight far-apart streams, gathers
//! eight scales with scalar loads and must sum each row's partial products
//! horizontally. Packing groups the rows in tiles of [`TILE`], and within
//! each block index puts four consecutive quant bytes of each of the eight
//! rows side by side: one 32-byte load then holds, in 32-bit lane `r`, four
//! elements of row `r`, so a 4-way byte dot product (`vpdpbusd`, or
//! `vpmaddubsw` + `vpmaddwd`) leaves every row's partial sum in its own lane
//! and no horizontal sum is needed. The eight scales sit side by side too.
//! The values, and so the reference dot products, are unchanged.
//!
//! Layout of one packed block of a tile (rows `0..8` of the tile):
//! - Q4_1 (160 bytes): `d[0..8]` (f16), `m[0..8]` (f16), then for `g` in
//!   `0..4` and each row `r` that row's quant bytes `4g..4g + 4` (low
//!   nibbles: elements `4g..4g + 4`; high nibbles: `16 + 4g..`);
//! - Q8_0 (272 bytes): `d[0..8]` (f16), then for `g` in `0..8` and each row
//!   that row's quants `4g..4g + 4`, stored offset by 128 (`q ^ 0x80`, the
//!   unsigned byte `q + 128`), so the unsigned operand of `vpdpbusd` can be
//!   the weight; the kernels subtract `128 * Σ activation` exactly;
//! - Q4_0 (144 bytes): `d[0..8]` (f16), then quant bytes as for Q4_1;
//! - Q5_0 (176 bytes): `d[0..8]` (f16), each row's four `qh` bytes, then
//!   quant bytes as for Q4_1;
//! - Q4_K (1152 bytes): `d[0..8]`, `dmin[0..8]` (f16), then the twelve
//!   scale bytes in three runs (`32..64`: GGUF bytes `0..4` of each row,
//!   `64..96`: bytes `4..8`, `96..128`: bytes `8..12`), so one load gives
//!   every row's low scales, another their low minimums, and the third the
//!   nibbles of the high ones; then for `c` in `0..32` and each row that
//!   row's quant bytes `4c..4c + 4`;
//! - Q5_K (1408 bytes): Q4_K's packed block (its `qs` from GGUF bytes
//!   `48..176`), then `qh` (for `c` in `0..8`, each row's `qh[4c..4c + 4]`),
//!   so the low nibbles sit where Q4_K's do and its kernels serve both;
//! - Q6_K (1680 bytes): `d[0..8]` (f16), the sixteen scales in four runs
//!   (for `v` in `0..4`, each row's `4v..4v + 4`), then `ql` (for `c` in
//!   `0..32`, each row's `ql[4c..4c + 4]`) and `qh` (for `c` in `0..16`,
//!   each row's `qh[4c..4c + 4]`).
//!
//! Every layout only moves bytes (Q8_0 also flips their top bit), so a
//! block's values are unchanged and `unpack_row` rebuilds the GGUF bytes.
//!
//! A tile holds every block of its rows in order (`blocks × packed block`),
//! so it is exactly `8 × row_bytes` long; a last partial tile is padded with
//! zero rows, whose results are discarded.

use super::kquant::Q8K_BYTES;
use super::legacy::{Q8_0_BYTES, Q8_1_BYTES};
use super::{f16_at, GgmlType};

/// Rows per packed tile (one per f32 lane of an AVX2 register).
pub(crate) const TILE: usize = 8;

/// Most activation rows one packed kernel call takes (`quant::MAX_ACT`).
pub(crate) const MAX_ACT: usize = 8;

/// The types with a packed layout, in one place for the layouts, the
/// kernels' dispatch and the tests.
pub(crate) const PACKED: [GgmlType; 7] =
    [GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K];

/// Bytes of one packed block of a tile for `dtype`, if `dtype` has a packed layout.
pub(crate) fn tile_block_bytes(dtype: GgmlType) -> Option<usize> {
    PACKED.contains(&dtype).then(|| TILE * dtype.block_bytes())
}

/// One field move: bytes `packed` of a tile block hold bytes `gguf` of row
/// `r`'s GGUF block, XORed with `xor`.
struct Field {
    packed: std::ops::Range<usize>,
    gguf: std::ops::Range<usize>,
    xor: u8,
}

/// The fields of row `r`'s block within one packed tile block.
fn fields(dtype: GgmlType, r: usize) -> Vec<Field> {
    let f = |p: usize, g: usize, n: usize, xor: u8| Field { packed: p..p + n, gguf: g..g + n, xor };
    match dtype {
        GgmlType::Q4_1 => {
            let mut v = vec![f(2 * r, 0, 2, 0), f(16 + 2 * r, 2, 2, 0)];
            v.extend((0..4).map(|g| f(32 + 32 * g + 4 * r, 4 + 4 * g, 4, 0)));
            v
        }
        GgmlType::Q8_0 => {
            let mut v = vec![f(2 * r, 0, 2, 0)];
            v.extend((0..8).map(|g| f(16 + 32 * g + 4 * r, 2 + 4 * g, 4, 0x80)));
            v
        }
        GgmlType::Q4_0 => {
            let mut v = vec![f(2 * r, 0, 2, 0)];
            v.extend((0..4).map(|g| f(16 + 32 * g + 4 * r, 2 + 4 * g, 4, 0)));
            v
        }
        GgmlType::Q5_0 => {
            let mut v = vec![f(2 * r, 0, 2, 0), f(16 + 4 * r, 2, 4, 0)];
            v.extend((0..4).map(|g| f(48 + 32 * g + 4 * r, 6 + 4 * g, 4, 0)));
            v
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            // Q5_K's 32 bytes of `qh` come before its low nibbles in GGUF.
            let qh = if dtype == GgmlType::Q5_K { 32 } else { 0 };
            let mut v = vec![f(2 * r, 0, 2, 0), f(16 + 2 * r, 2, 2, 0)];
            v.extend((0..3).map(|k| f(32 + 32 * k + 4 * r, 4 + 4 * k, 4, 0)));
            v.extend((0..32).map(|c| f(128 + 32 * c + 4 * r, 16 + qh + 4 * c, 4, 0)));
            v.extend((0..qh / 4).map(|c| f(1152 + 32 * c + 4 * r, 16 + 4 * c, 4, 0)));
            v
        }
        GgmlType::Q6_K => {
            let mut v = vec![f(2 * r, 208, 2, 0)];
            v.extend((0..4).map(|k| f(16 + 32 * k + 4 * r, 192 + 4 * k, 4, 0)));
            v.extend((0..32).map(|c| f(144 + 32 * c + 4 * r, 4 * c, 4, 0)));
            v.extend((0..16).map(|c| f(1168 + 32 * c + 4 * r, 128 + 4 * c, 4, 0)));
            v
        }
        _ => Vec::new(),
    }
}

/// Packs a `rows × row_bytes` GGUF matrix into tiles; `None` if `dtype` has no packed layout.
pub(crate) fn pack(dtype: GgmlType, data: &[u8], rows: usize, row_bytes: usize) -> Option<Vec<u8>> {
    tile_block_bytes(dtype)?;
    let mut out = vec![0u8; rows.div_ceil(TILE) * TILE * row_bytes];
    pack_into(dtype, data.get(..rows * row_bytes)?, row_bytes, &mut out).then_some(out)
}

/// Packs the GGUF rows in `data` (whole rows of `row_bytes`) into the whole
/// tiles of `out`, so a loader can pack a run of tiles straight into a
/// matrix's place with no buffer the size of the matrix between. Rows of
/// `out`'s tiles past `data`'s are padding, packed from zero blocks. Returns
/// `false`, with nothing written, if `dtype` has no packed layout or the
/// lengths do not fit (`out` whole tiles, holding at least `data`'s rows).
pub(crate) fn pack_into(dtype: GgmlType, data: &[u8], row_bytes: usize, out: &mut [u8]) -> bool {
    let Some(tbb) = tile_block_bytes(dtype) else { return false };
    let (bb, tile_bytes) = (dtype.block_bytes(), TILE * row_bytes);
    if row_bytes == 0 {
        return data.is_empty() && out.is_empty();
    }
    let fits = row_bytes.is_multiple_of(bb) && out.len().is_multiple_of(tile_bytes);
    if !fits || !data.len().is_multiple_of(row_bytes) || data.len() > out.len() {
        return false;
    }
    // Padding rows are packed from zero blocks, so they unpack to zeros.
    let zero = vec![0u8; bb];
    let lanes: [Vec<Field>; TILE] = std::array::from_fn(|lane| fields(dtype, lane));
    for (t, tile) in out.chunks_exact_mut(tile_bytes).enumerate() {
        for (lane, f) in lanes.iter().enumerate() {
            let r = t * TILE + lane;
            let row = data.get(r * row_bytes..(r + 1) * row_bytes);
            for (b, dst) in tile.chunks_exact_mut(tbb).enumerate() {
                let src = row.map_or(&zero[..], |row| &row[b * bb..(b + 1) * bb]);
                for fl in f {
                    fl.apply(src, dst);
                }
            }
        }
    }
    true
}

impl Field {
    /// Moves this field from a GGUF block `src` into a packed tile block
    /// `dst`. Most fields are four quant bytes: those move as one word, a
    /// large part of a load's CPU otherwise.
    fn apply(&self, src: &[u8], dst: &mut [u8]) {
        let (p, g) = (self.packed.start, self.gguf.start);
        match (src.get(g..g + 4), dst.get_mut(p..p + 4)) {
            (Some(s), Some(d)) if self.packed.len() == 4 => {
                let word = u32::from_ne_bytes([s[0], s[1], s[2], s[3]]) ^ u32::from_ne_bytes([self.xor; 4]);
                d.copy_from_slice(&word.to_ne_bytes());
            }
            _ => {
                for (d, s) in dst[self.packed.clone()].iter_mut().zip(&src[self.gguf.clone()]) {
                    *d = s ^ self.xor;
                }
            }
        }
    }
}

/// Rebuilds row `r` in GGUF layout from a packed matrix (embedding lookups, tests).
pub(crate) fn unpack_row(dtype: GgmlType, packed: &[u8], row_bytes: usize, r: usize, out: &mut [u8]) {
    let tbb = match tile_block_bytes(dtype) {
        Some(tbb) => tbb,
        None => return,
    };
    let bb = dtype.block_bytes();
    let (t, lane) = (r / TILE, r % TILE);
    let f = fields(dtype, lane);
    for b in 0..row_bytes / bb {
        let src = &packed[t * TILE * row_bytes + b * tbb..][..tbb];
        let dst = &mut out[b * bb..][..bb];
        for fl in &f {
            for (d, s) in dst[fl.gguf.clone()].iter_mut().zip(&src[fl.packed.clone()]) {
                *d = s ^ fl.xor;
            }
        }
    }
}

/// Per-(activation row, block) scalars the packed kernels broadcast, decoded
/// once per matmul rather than once per tile: `d` is the activation scale
/// (Q8_0's or Q8_1's `d`, widened from f16, or Q8_K's); `x` holds
/// [`ActScalars::x_per_block`] words per block: Q8_1's `s` (f32 bits) for
/// Q4_1 weights; `128 * Σ q` (i32 bits) for Q8_0 weights, whose packed
/// quants are offset by 128; `8 * Σ q` for Q4_0 (the `- 8` of its quants)
/// and `16 * Σ q` for Q5_0 (its `- 16`);
/// for Q6_K, `32 * Σ q` of each run of 16 (the `- 32`), computed from the
/// quants as the reference does, not read from `bsums`; nothing for Q4_K
/// and Q5_K, whose kernels read `bsums` from the activation row as the
/// reference does.
#[derive(Debug, Clone)]
pub struct ActScalars {
    dtype: GgmlType,
    nb: usize,
    d: Vec<f32>,
    x: Vec<u32>,
}

impl ActScalars {
    /// Scalars of `n` activation rows of `nb` blocks, `a_stride` bytes apart,
    /// quantized for `dtype` weights (`dtype.vec_dot_type()`), decoded at
    /// once: the tests' way. The engine decodes row by row as it quantizes
    /// (`Activations::prepare_on`, with [`ActScalars::decode_row`]).
    #[cfg(test)]
    pub(crate) fn new(dtype: GgmlType, nb: usize, n: usize, a: &[u8], a_stride: usize) -> Self {
        let xpb = Self::x_per_block(dtype);
        let (mut d, mut x) = (vec![0.0; n * nb], vec![0; n * nb * xpb]);
        for i in 0..n {
            let xs = &mut x[i * nb * xpb..(i + 1) * nb * xpb];
            Self::decode_row(dtype, &a[i * a_stride..], &mut d[i * nb..(i + 1) * nb], xs);
        }
        Self { dtype, nb, d, x }
    }

    /// Words of `x` per block for `dtype` weights.
    pub(crate) fn x_per_block(dtype: GgmlType) -> usize {
        match dtype {
            GgmlType::Q4_K | GgmlType::Q5_K => 0,
            GgmlType::Q6_K => 16,
            _ => 1,
        }
    }

    /// Scalars already decoded row by row with [`ActScalars::decode_row`]
    /// (`d` holds `nb` entries per row, `x` `nb * x_per_block(dtype)`).
    pub(crate) fn from_parts(dtype: GgmlType, nb: usize, d: Vec<f32>, x: Vec<u32>) -> Self {
        Self { dtype, nb, d, x }
    }

    /// One activation row's scalars into `d` (one entry per block) and `x`
    /// ([`ActScalars::x_per_block`] per block): the quantizing threads
    /// decode each row as they make it, rather than one thread decoding the
    /// batch afterwards.
    pub(crate) fn decode_row(dtype: GgmlType, row: &[u8], d: &mut [f32], x: &mut [u32]) {
        let sum = |q: &[u8]| -> i32 { q.iter().map(|&q| i32::from(q as i8)).sum() };
        let xpb = Self::x_per_block(dtype);
        for (b, d) in d.iter_mut().enumerate() {
            let x = &mut x[b * xpb..(b + 1) * xpb];
            match dtype {
                GgmlType::Q4_1 => {
                    let y = &row[b * Q8_1_BYTES..];
                    *d = f16_at(y, 0);
                    x[0] = f16_at(y, 2).to_bits();
                }
                GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
                    let y = &row[b * Q8K_BYTES..];
                    *d = f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
                    for (g, x) in x.iter_mut().enumerate() {
                        *x = (32 * sum(&y[4 + 16 * g..20 + 16 * g])) as u32;
                    }
                }
                _ => {
                    let y = &row[b * Q8_0_BYTES..];
                    *d = f16_at(y, 0);
                    let offset = match dtype {
                        GgmlType::Q4_0 => 8,
                        GgmlType::Q5_0 => 16,
                        _ => 128,
                    };
                    // Two's complement bits, read back as i32.
                    x[0] = (offset * sum(&y[2..Q8_0_BYTES])) as u32;
                }
            }
        }
    }

    /// Whether these are scalars of at least `rows` rows of `nb` blocks for `dtype` weights.
    pub(crate) fn covers(&self, dtype: GgmlType, nb: usize, rows: usize) -> bool {
        let xpb = Self::x_per_block(dtype);
        self.dtype == dtype && self.nb == nb && self.d.len() >= rows * nb && self.x.len() >= rows * nb * xpb
    }

    /// `d` and `x` from activation row `i` on.
    pub(crate) fn rows_from(&self, i: usize) -> (&[f32], &[u32]) {
        let xpb = Self::x_per_block(self.dtype);
        (&self.d[i * self.nb..], &self.x[i * self.nb * xpb..])
    }
}

/// What one packed-kernel call multiplies: the whole tiles of `dtype` in
/// `tiles` (`nb` packed blocks each, as `pack` made them) by `m`
/// (1..=[`MAX_ACT`]) activation rows, quantized to `dtype.vec_dot_type()`
/// and starting `a_stride` bytes apart in `a`, whose scalars `pre` are read
/// from row `first` on (the row `a` starts at). Every layer from
/// `quant::dot_packed` down to [`Job::passes`] hands it on whole.
#[derive(Clone, Copy)]
pub struct PackedOperands<'a> {
    /// Weight type (Q4_0, Q5_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K have packed layouts).
    pub dtype: GgmlType,
    /// Whole packed tiles.
    pub tiles: &'a [u8],
    /// Blocks per row.
    pub nb: usize,
    /// Quantized activation rows.
    pub a: &'a [u8],
    /// Bytes from one activation row to the next.
    pub a_stride: usize,
    /// Activation rows.
    pub m: usize,
    /// The activations' decoded scalars.
    pub pre: &'a ActScalars,
    /// The row of `pre` that `a` starts at.
    pub first: usize,
}

/// Where a packed call writes: tile `t`'s eight sums for activation row
/// `i` go to `ptr[t * tile_stride + i * row_stride]`.
///
/// Why: a matmul's output rows are `rows` floats apart, and a kernel that
/// writes them in place saves the copy from a compact buffer (about 3% of
/// batched decode). [`TileOut::compact`] is the checked layout of a slice;
/// [`TileOut::strided`] is the caller's promise.
#[derive(Clone, Copy)]
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
pub struct TileOut {
    ptr: *mut [f32; TILE],
    tile_stride: usize,
    row_stride: usize,
    /// Tiles the slice holds, when there is one to check against.
    len: Option<usize>,
}

#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
impl TileOut {
    /// `out[t * m + i]`, for `m` activation rows: the layout of
    /// `quant::dot_packed`'s slice.
    pub fn compact(out: &mut [[f32; TILE]], m: usize) -> Self {
        Self { ptr: out.as_mut_ptr(), tile_stride: m, row_stride: 1, len: Some(out.len()) }
    }

    /// `ptr[t * tile_stride + i * row_stride]`.
    ///
    /// # Safety
    /// For every tile and activation row of the call it is given to, that
    /// place must be valid for writes, and nothing else may read or write
    /// it during the call.
    pub unsafe fn strided(ptr: *mut [f32; TILE], tile_stride: usize, row_stride: usize) -> Self {
        Self { ptr, tile_stride, row_stride, len: None }
    }

    /// Where tile `t`'s sums for activation row `i` go.
    pub(crate) fn at(self, t: usize, i: usize) -> *mut [f32; TILE] {
        self.ptr.wrapping_add(t * self.tile_stride + i * self.row_stride)
    }

    /// Whether `ntiles` tiles of `m` rows fit the slice (always, for a
    /// strided layout: the caller promised).
    fn holds(self, ntiles: usize, m: usize) -> bool {
        self.len.is_none_or(|len| {
            ntiles == 0 || m == 0 || (ntiles - 1) * self.tile_stride + (m - 1) * self.row_stride < len
        })
    }
}

/// Operands of one pass of a packed kernel (x86 or NEON) over a run of
/// tiles, as raw pointers for the `unsafe` kernels. Only [`Job::passes`]
/// makes them, from operands it has checked, so a kernel given a `Job` and
/// its row count `k` may read `ntiles` whole tiles of `nb` packed blocks at
/// `tiles`, `nb` activation blocks after each of `a[..k]`, `k * nb` scalars
/// after `d` and `x`, and write `out[t * out_stride + i * row_stride]` for
/// `t < ntiles`, `i < k`.
#[derive(Clone, Copy)]
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
pub(crate) struct Job {
    pub(crate) tiles: *const u8,
    pub(crate) ntiles: usize,
    pub(crate) nb: usize,
    /// Activation rows (unused trailing entries repeat the last one).
    pub(crate) a: [*const u8; MAX_ACT],
    /// `d[i * nb + b]`, `x[(i * nb + b) * xpb + k]` (`xpb` words per
    /// block, `ActScalars::x_per_block`): see [`ActScalars`].
    pub(crate) d: *const f32,
    pub(crate) x: *const u32,
    /// `out[t * out_stride + i * row_stride]`.
    pub(crate) out: *mut [f32; TILE],
    pub(crate) out_stride: usize,
    pub(crate) row_stride: usize,
}

#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
impl Job {
    /// Checks a packed kernel call against the contract of
    /// `quant::dot_packed` (operands `ops`, outputs `out`) and calls
    /// `run(job, k)` once per pass of `k`
    /// (at most `max_rows`) activation rows. Returns `false`, with nothing
    /// written, for types without a packed layout, `m` outside
    /// 1..=[`MAX_ACT`] or operands too short; with no blocks every output is
    /// zero (the reference's empty sum; a strided `out` is refused there,
    /// having no tile count to clear). One check serves every architecture.
    pub(crate) fn passes(
        ops: &PackedOperands<'_>,
        out: TileOut,
        max_rows: usize,
        mut run: impl FnMut(&Job, usize),
    ) -> bool {
        let PackedOperands { dtype, tiles, nb, a, a_stride, m, pre, first } = *ops;
        let abb = match dtype {
            GgmlType::Q4_1 => Q8_1_BYTES,
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => Q8_0_BYTES,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => Q8K_BYTES,
            _ => return false,
        };
        let xpb = ActScalars::x_per_block(dtype);
        let tbb = TILE * dtype.block_bytes();
        if m == 0 || m > MAX_ACT || a.len() < (m - 1) * a_stride + nb * abb || !pre.covers(dtype, nb, first + m) {
            return false;
        }
        if nb == 0 {
            let Some(len) = out.len else { return false };
            for t in 0..len {
                // SAFETY: `out` is a slice of `len` tiles (`TileOut::compact`).
                unsafe { *out.ptr.add(t) = [0.0; TILE] };
            }
            return true;
        }
        let ntiles = tiles.len() / (nb * tbb);
        if ntiles == 0 || !out.holds(ntiles, m) {
            return false;
        }
        let (d, x) = pre.rows_from(first);
        let mut i0 = 0;
        while i0 < m {
            // Every row count up to the kernel's most has its own instance, so
            // 7 rows are one pass over the weights, not 4 + 2 + 1.
            let k = (m - i0).min(max_rows.clamp(1, MAX_ACT));
            let job = Job {
                tiles: tiles.as_ptr(),
                ntiles,
                nb,
                a: std::array::from_fn(|i| a[(i0 + i.min(k - 1)) * a_stride..].as_ptr()),
                d: d[i0 * nb..].as_ptr(),
                x: x[i0 * nb * xpb..].as_ptr(),
                out: out.at(0, i0),
                out_stride: out.tile_stride,
                row_stride: out.row_stride,
            };
            run(&job, k);
            i0 += k;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_and_pads() {
        for dtype in PACKED {
            let row_bytes = 3 * dtype.block_bytes();
            let rows = 11;
            let data: Vec<u8> = (0..rows * row_bytes).map(|i| (i * 31 % 251) as u8).collect();
            let packed = pack(dtype, &data, rows, row_bytes).unwrap();
            assert_eq!(packed.len(), 16 * row_bytes);
            for r in 0..rows {
                let mut row = vec![0u8; row_bytes];
                unpack_row(dtype, &packed, row_bytes, r, &mut row);
                assert_eq!(row, &data[r * row_bytes..(r + 1) * row_bytes], "{} row {r}", dtype.name());
            }
            let mut pad = vec![1u8; row_bytes];
            unpack_row(dtype, &packed, row_bytes, 15, &mut pad);
            assert!(pad.iter().all(|&b| b == 0));
        }
        assert!(pack(GgmlType::F16, &[], 0, 0).is_none());
    }

    #[test]
    fn packing_a_run_of_tiles_at_a_time_gives_the_same_bytes() {
        for dtype in PACKED {
            let row_bytes = 2 * dtype.block_bytes();
            let rows = 3 * TILE + 5;
            let data: Vec<u8> = (0..rows * row_bytes).map(|i| (i * 17 % 253) as u8).collect();
            let whole = pack(dtype, &data, rows, row_bytes).expect("packed");
            // Two tiles, then the last two (one padded), as a loader reads them.
            let mut runs = vec![0xaa; whole.len()];
            let (head, tail) = runs.split_at_mut(2 * TILE * row_bytes);
            let cut = 2 * TILE * row_bytes;
            assert!(pack_into(dtype, &data[..cut], row_bytes, head));
            assert!(pack_into(dtype, &data[cut..], row_bytes, tail));
            assert_eq!(runs, whole, "{}", dtype.name());
        }
        let mut out = vec![7u8; 2 * TILE * 18];
        // A partial tile, or more rows than the tiles hold, writes nothing.
        assert!(!pack_into(GgmlType::Q4_0, &[0; 18], 18, &mut out[..18]));
        assert!(!pack_into(GgmlType::Q4_0, &[0; 17 * 18], 18, &mut out));
        assert!(!pack_into(GgmlType::F16, &[0; 16], 16, &mut out[..8 * 16]));
        assert!(out.iter().all(|&b| b == 7));
    }
}
