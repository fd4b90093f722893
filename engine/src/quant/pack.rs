//! Interleaved ("packed") weight layouts for the multi-row SIMD kernels.
//!
//! Why: the GGUF layout stores each row's blocks contiguously, so a kernel
//! that computes eight rows at once reads eight far-apart streams and gathers
//! eight scales with scalar loads. Packing groups the rows in tiles of
//! [`TILE`]: for each block index, the tile's eight scales sit side by side,
//! followed by the eight rows' quants, so a kernel reads one sequential
//! stream with whole-vector loads. Only bytes move; the values, and so the
//! reference dot products, are unchanged.
//!
//! Layout of one packed block of a tile (rows `0..8` of the tile):
//! - Q4_1 (160 bytes): `d[0..8]` (f16), `m[0..8]` (f16), then for `p` in
//!   `0..4` the 16 quant bytes of row `p` followed by those of row `p + 4`;
//! - Q8_0 (272 bytes): `d[0..8]` (f16), then the 32 quant bytes of each row.
//!
//! A tile holds every block of its rows in order (`blocks × packed block`),
//! so it is exactly `8 × row_bytes` long; a last partial tile is padded with
//! zero rows, whose results are discarded.

use super::GgmlType;

/// Rows per packed tile (one per f32 lane of an AVX2 register).
pub(crate) const TILE: usize = 8;

/// Bytes of one packed block of a tile for `dtype`, if `dtype` has a packed layout.
pub(crate) fn tile_block_bytes(dtype: GgmlType) -> Option<usize> {
    match dtype {
        GgmlType::Q4_1 | GgmlType::Q8_0 => Some(TILE * dtype.block_bytes()),
        _ => None,
    }
}

/// Byte ranges, within one packed tile block, of each field of row `r`'s
/// block, paired with the same field's range within the GGUF block.
fn fields(dtype: GgmlType, r: usize) -> Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    match dtype {
        GgmlType::Q4_1 => {
            let q = 32 + 32 * (r % 4) + 16 * (r / 4);
            vec![(2 * r..2 * r + 2, 0..2), (16 + 2 * r..18 + 2 * r, 2..4), (q..q + 16, 4..20)]
        }
        GgmlType::Q8_0 => vec![(2 * r..2 * r + 2, 0..2), (16 + 32 * r..48 + 32 * r, 2..34)],
        _ => Vec::new(),
    }
}

/// Packs a `rows × row_bytes` GGUF matrix into tiles; `None` if `dtype` has no packed layout.
pub(crate) fn pack(dtype: GgmlType, data: &[u8], rows: usize, row_bytes: usize) -> Option<Vec<u8>> {
    let tbb = tile_block_bytes(dtype)?;
    let bb = dtype.block_bytes();
    let nb = row_bytes / bb;
    let tiles = rows.div_ceil(TILE);
    let mut out = vec![0u8; tiles * TILE * row_bytes];
    for r in 0..rows {
        let (t, lane) = (r / TILE, r % TILE);
        let f = fields(dtype, lane);
        for b in 0..nb {
            let src = &data[r * row_bytes + b * bb..][..bb];
            let dst = &mut out[t * TILE * row_bytes + b * tbb..][..tbb];
            for (d, s) in &f {
                dst[d.clone()].copy_from_slice(&src[s.clone()]);
            }
        }
    }
    Some(out)
}

/// Rebuilds row `r` in GGUF layout from a packed matrix (embedding lookups, tests).
pub(crate) fn unpack_row(dtype: GgmlType, packed: &[u8], row_bytes: usize, r: usize, out: &mut [u8]) {
    let Some(tbb) = tile_block_bytes(dtype) else { return };
    let bb = dtype.block_bytes();
    let (t, lane) = (r / TILE, r % TILE);
    let f = fields(dtype, lane);
    for b in 0..row_bytes / bb {
        let src = &packed[t * TILE * row_bytes + b * tbb..][..tbb];
        let dst = &mut out[b * bb..][..bb];
        for (d, s) in &f {
            dst[s.clone()].copy_from_slice(&src[d.clone()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_and_pads() {
        for dtype in [GgmlType::Q4_1, GgmlType::Q8_0] {
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
        assert!(pack(GgmlType::Q4_K, &[], 0, 0).is_none());
    }
}
