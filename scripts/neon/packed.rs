//! Tests of the NEON packed-tile kernels (`neon_packed.rs`,
//! `neon_packed_kquant.rs`) against the scalar reference, on rows packed by
//! the engine's own `pack.rs`: every (weight row, activation row) output of a
//! call with 1..=8 activation rows must equal `legacy::vec_dot_*` or
//! `kquant::vec_dot_*` of that pair bit for bit, and must not depend on how
//! many activation rows or tiles share the call.

use half::f16;

use super::pack::{pack, ActScalars, PackedOperands, PACKED, TILE};
use super::simd::neon::Neon;
use super::simd::neon_packed::DotProd;
use super::tests::{blocks, Fill, Rng, FILLS};
use super::{kquant, legacy, GgmlType};

/// Types that must not be packed: activation formats and unpacked weights.
const UNPACKED: [GgmlType; 3] = [GgmlType::Q8_1, GgmlType::Q8_K, GgmlType::F16];

/// Most activation rows per call (`engine::quant::MAX_ACT`).
const MAX_ACT: usize = 8;

/// The packed kernels, insisting on `dotprod`: a CPU without it would leave
/// the packed path untested, so that is a failure, not a skip.
fn neon() -> DotProd {
    assert!(
        std::arch::is_aarch64_feature_detected!("dotprod"),
        "this CPU lacks dotprod, so the packed kernels cannot run (use qemu-aarch64 -cpu max)"
    );
    Neon::detect().dotprod().expect("dotprod detected, so the packed kernels are on")
}

/// Whether `ty` is a K-quant (256-element blocks, Q8_K activations).
fn is_k(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K)
}

/// The activation type of `ty` weights.
fn act_type(ty: GgmlType) -> GgmlType {
    match ty {
        GgmlType::Q4_1 => GgmlType::Q8_1,
        _ if is_k(ty) => GgmlType::Q8_K,
        _ => GgmlType::Q8_0,
    }
}

/// Activation bytes per row of `nb` blocks for `ty` weights.
fn act_bytes(ty: GgmlType, nb: usize) -> usize {
    nb * act_type(ty).block_bytes()
}

/// `n` blocks of `ty` (weights or activations) with quants per `fill` and
/// edge-weighted finite scales. Q8_K gets an f32 scale and `bsums` that
/// match its quants, as the reference reads them.
fn typed_blocks(r: &mut Rng, ty: GgmlType, n: usize, fill: Fill) -> Vec<u8> {
    let bytes = ty.block_bytes();
    let head = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => 2,
        GgmlType::Q4_1 | GgmlType::Q8_1 | GgmlType::Q4_K | GgmlType::Q5_K => 4,
        _ => 0,
    };
    let mut v = blocks(r, n, (bytes, head), fill);
    for blk in v.chunks_exact_mut(bytes) {
        match ty {
            GgmlType::Q6_K => blk[208..].copy_from_slice(&r.scale().to_le_bytes()),
            GgmlType::Q8_K => {
                blk[..4].copy_from_slice(&r.scale().to_f32().to_le_bytes());
                for k in 0..16 {
                    let s: i16 = blk[4 + 16 * k..20 + 16 * k].iter().map(|&q| i16::from(q as i8)).sum();
                    blk[260 + 2 * k..262 + 2 * k].copy_from_slice(&s.to_le_bytes());
                }
            }
            _ => {}
        }
    }
    v
}

/// The scalar reference of `ty` weights against their activations.
fn reference(ty: GgmlType, w: &[u8], a: &[u8]) -> f32 {
    match ty {
        GgmlType::Q4_K => kquant::vec_dot_q4k_q8k(w, a),
        GgmlType::Q5_K => kquant::vec_dot_q5k_q8k(w, a),
        GgmlType::Q6_K => kquant::vec_dot_q6k_q8k(w, a),
        GgmlType::Q5_0 => legacy::vec_dot_q5_0_q8_0(w, a),
        _ => super::tests::reference(ty, w, a),
    }
}

/// `n` activation rows of `nb` blocks, `stride` bytes apart (the gap holds
/// junk), the even rows filled per `fill`, the odd ones at random.
fn act_rows(r: &mut Rng, ty: GgmlType, nb: usize, n: usize, stride: usize, fill: Fill) -> Vec<u8> {
    let mut a: Vec<u8> = (0..n * stride).map(|_| r.next() as u8).collect();
    for i in 0..n {
        let f = if i % 2 == 0 { fill } else { Fill::Random };
        let row = typed_blocks(r, act_type(ty), nb, f);
        a[i * stride..i * stride + row.len()].copy_from_slice(&row);
    }
    a
}

/// Runs the kernel on `rows` GGUF weight rows `w` (packed here) and the
/// activation rows in `a` for every activation count 1..=8, checks each live
/// output against the reference and against a one-tile, one-activation call;
/// returns how many outputs were non-zero and how many were checked.
fn check_rows(ty: GgmlType, w: &[u8], rows: usize, nb: usize, a: &[u8], stride: usize, ctx: &str) -> (usize, usize) {
    let k = neon();
    let rb = nb * ty.block_bytes();
    let ab = act_bytes(ty, nb);
    let packed = pack(ty, w, rows, rb).expect("packable type");
    let ntiles = rows.div_ceil(TILE);
    assert_eq!(packed.len(), ntiles * TILE * rb);
    let pre = ActScalars::new(ty, nb, MAX_ACT, a, stride);
    let want: Vec<Vec<f32>> = (0..rows)
        .map(|o| (0..MAX_ACT).map(|i| reference(ty, &w[o * rb..][..rb], &a[i * stride..][..ab])).collect())
        .collect();
    let all = PackedOperands { dtype: ty, tiles: &packed, nb, a, a_stride: stride, m: 1, pre: &pre, first: 0 };
    let (mut nonzero, mut total) = (0, 0);
    for m in 1..=MAX_ACT {
        let mut out = vec![[f32::NAN; 8]; ntiles * m];
        assert!(k.dot_packed(&PackedOperands { m, ..all }, &mut out), "{ctx} m={m}: refused");
        for t in 0..ntiles {
            for i in 0..m {
                let mut alone = [[f32::NAN; 8]; 1];
                let tile = &packed[t * TILE * rb..][..TILE * rb];
                assert!(k.dot_packed(&PackedOperands { tiles: tile, a: &a[i * stride..], first: i, ..all }, &mut alone));
                for lane in 0..TILE.min(rows - t * TILE) {
                    let (got, exp) = (out[t * m + i][lane], want[t * TILE + lane][i]);
                    let at = format!("{} {ctx} m={m} tile={t} act={i} lane={lane}", ty.name());
                    assert_eq!(got.to_bits(), exp.to_bits(), "{at}: neon {got:e} vs reference {exp:e}");
                    assert_eq!(alone[0][lane].to_bits(), exp.to_bits(), "{at}: alone {:e}", alone[0][lane]);
                    nonzero += usize::from(got != 0.0);
                    total += 1;
                }
            }
        }
    }
    (nonzero, total)
}

/// Random and edge blocks (scales: ±0, the smallest subnormal, ±65504;
/// quants: nibbles 0 and 15, bytes -128 and 127), block counts from 1, one to
/// five tiles (odd counts, partial last tiles), 1..=8 activation rows.
#[test]
fn packed_tiles_equal_the_reference_bit_for_bit() {
    let mut r = Rng(0x5EED_0DD5_0F7E_11E5);
    let (mut nonzero, mut total) = (0, 0);
    for ty in PACKED {
        // Every block count with every tile count, on random quants.
        let counts: &[usize] = if is_k(ty) { &[1, 2, 3] } else { &[1, 2, 3, 7, 18] };
        for &nb in counts {
            for rows in [1, 8, 13, 24, 37] {
                let w = typed_blocks(&mut r, ty, rows * nb, Fill::Random);
                let stride = act_bytes(ty, nb) + 3;
                let a = act_rows(&mut r, ty, nb, MAX_ACT, stride, Fill::RandomMin);
                let (z, n) = check_rows(ty, &w, rows, nb, &a, stride, &format!("nb={nb} rows={rows}"));
                nonzero += z;
                total += n;
            }
        }
        // Every pair of weight and activation fills.
        for (wi, &wf) in FILLS.iter().enumerate() {
            for (ai, &af) in FILLS.iter().enumerate() {
                let nb = [1, 2, 5][(wi + ai) % 3];
                let rows = [8, 11, 17, 3][(wi + 2 * ai) % 4];
                let w = typed_blocks(&mut r, ty, rows * nb, wf);
                let stride = act_bytes(ty, nb);
                let a = act_rows(&mut r, ty, nb, MAX_ACT, stride, af);
                let (z, n) = check_rows(ty, &w, rows, nb, &a, stride, &format!("w={wf:?} a={af:?} nb={nb}"));
                nonzero += z;
                total += n;
            }
        }
    }
    // Guard against inputs that make every dot product trivially zero.
    assert!(nonzero * 2 > total, "only {nonzero} of {total} results are non-zero");
}

/// Rows and activations made by the engine's own encoders from floats, as
/// in inference.
#[test]
fn encoded_rows_are_bit_exact() {
    let mut r = Rng(23);
    for ty in PACKED {
        let len = if is_k(ty) { kquant::QK_K } else { 32 };
        for (nb, rows) in [(1, 9), (6, 16), (48 * 32 / len, 21)] {
            let mut unit = || (r.below(1 << 24) as f32 / (1 << 23) as f32 - 1.0) * 3.0;
            let xw: Vec<f32> = (0..rows * nb * len).map(|_| unit()).collect();
            let xa: Vec<f32> = (0..MAX_ACT * nb * len).map(|_| unit()).collect();
            let mut w = vec![0u8; rows * nb * ty.block_bytes()];
            let mut a = vec![0u8; MAX_ACT * act_bytes(ty, nb)];
            match ty {
                GgmlType::Q4_0 => legacy::quantize_q4_0(&xw, &mut w),
                GgmlType::Q4_1 => legacy::quantize_q4_1(&xw, &mut w),
                GgmlType::Q5_0 => legacy::quantize_q5_0(&xw, &mut w),
                GgmlType::Q8_0 => legacy::quantize_q8_0(&xw, &mut w),
                GgmlType::Q4_K => kquant::quantize_q4k(&xw, &mut w),
                GgmlType::Q5_K => kquant::quantize_q5k(&xw, &mut w),
                _ => kquant::quantize_q6k(&xw, &mut w),
            }
            match act_type(ty) {
                GgmlType::Q8_1 => legacy::quantize_q8_1(&xa, &mut a),
                GgmlType::Q8_K => kquant::quantize_q8k(&xa, &mut a),
                _ => legacy::quantize_q8_0(&xa, &mut a),
            }
            check_rows(ty, &w, rows, nb, &a, act_bytes(ty, nb), &format!("encoded nb={nb} rows={rows}"));
        }
    }
}

/// Results worked out by hand, so the reference is checked too.
#[test]
fn extreme_tiles_match_hand_arithmetic() {
    let k = neon();
    let f16b = |v: f32| f16::from_f32(v).to_le_bytes();
    // Q8_0, two blocks: -128 * -128 everywhere, scales 1: 2 * 524288.
    let mut w = vec![0x80u8; 8 * 2 * legacy::Q8_0_BYTES];
    let mut a = vec![0x80u8; 2 * legacy::Q8_0_BYTES];
    for blk in w.chunks_exact_mut(legacy::Q8_0_BYTES).chain(a.chunks_exact_mut(legacy::Q8_0_BYTES)) {
        blk[..2].copy_from_slice(&f16b(1.0));
    }
    // Row 5's second block has weight scale 0: it contributes nothing.
    w[5 * 2 * legacy::Q8_0_BYTES + legacy::Q8_0_BYTES..][..2].fill(0);
    let rb = 2 * legacy::Q8_0_BYTES;
    let packed = pack(GgmlType::Q8_0, &w, 8, rb).expect("packable");
    let pre = ActScalars::new(GgmlType::Q8_0, 2, 1, &a, rb);
    let mut out = [[f32::NAN; 8]; 1];
    let ops =
        PackedOperands { dtype: GgmlType::Q8_0, tiles: &packed, nb: 2, a: &a, a_stride: rb, m: 1, pre: &pre, first: 0 };
    assert!(k.dot_packed(&ops, &mut out));
    let mut want = [1_048_576.0f32; 8];
    want[5] = 524_288.0;
    assert_eq!(out[0], want);
    // Q4_1: row r has low nibbles 15 and high nibbles 0 (row 0) or the other
    // way round (row 1), d = m = 0.5; activations -128, d = 1, s = 3:
    // 16 * 15 * -128 * 0.5 + 0.5 * 3 in both.
    let mut w = vec![0u8; 8 * legacy::Q4_1_BYTES];
    for (r, blk) in w.chunks_exact_mut(legacy::Q4_1_BYTES).enumerate() {
        blk[..2].copy_from_slice(&f16b(0.5));
        blk[2..4].copy_from_slice(&f16b(0.5));
        blk[4..].fill([0x0F, 0xF0][r % 2]);
    }
    let mut a = vec![0x80u8; legacy::Q8_1_BYTES];
    a[..2].copy_from_slice(&f16b(1.0));
    a[2..4].copy_from_slice(&f16b(3.0));
    let packed = pack(GgmlType::Q4_1, &w, 8, legacy::Q4_1_BYTES).expect("packable");
    let pre = ActScalars::new(GgmlType::Q4_1, 1, 1, &a, a.len());
    let ops = PackedOperands {
        dtype: GgmlType::Q4_1,
        tiles: &packed,
        nb: 1,
        a: &a,
        a_stride: a.len(),
        m: 1,
        pre: &pre,
        first: 0,
    };
    assert!(k.dot_packed(&ops, &mut out));
    assert_eq!(out[0], [-15358.5; 8]);
    // Q4_0 and Q5_0 against Q8_0 activations -128, d = 1; weights d = 0.5.
    // Q4_0 nibbles 15 (even rows) or 0: 32 * (7 or -8) * -128 * 0.5. Q5_0
    // codes 31 (even rows: every `qh` bit set) or 15: 32 * (15 or -1) * -128 * 0.5.
    let mut a = vec![0x80u8; legacy::Q8_0_BYTES];
    a[..2].copy_from_slice(&f16b(1.0));
    for (ty, want) in [(GgmlType::Q4_0, [-14336.0, 16384.0]), (GgmlType::Q5_0, [-30720.0, 2048.0])] {
        let bb = ty.block_bytes();
        let mut w = vec![0u8; 8 * bb];
        for (r, blk) in w.chunks_exact_mut(bb).enumerate() {
            blk[..2].copy_from_slice(&f16b(0.5));
            match (ty, r % 2) {
                (GgmlType::Q4_0, 0) => blk[2..].fill(0xFF),
                (GgmlType::Q4_0, _) => {}
                (_, 0) => blk[2..].fill(0xFF),
                _ => blk[6..].fill(0xFF),
            }
        }
        let packed = pack(ty, &w, 8, bb).expect("packable");
        let pre = ActScalars::new(ty, 1, 1, &a, a.len());
        let ops =
            PackedOperands { dtype: ty, tiles: &packed, nb: 1, a: &a, a_stride: a.len(), m: 1, pre: &pre, first: 0 };
        assert!(k.dot_packed(&ops, &mut out));
        assert_eq!(out[0], [want[0], want[1], want[0], want[1], want[0], want[1], want[0], want[1]], "{ty:?}");
    }
    // The K-quants, one block of eight rows against Q8_K activations with
    // d = 1 and every quant 2 (so every bsum is 32).
    let mut a = vec![2u8; kquant::Q8K_BYTES];
    a[..4].copy_from_slice(&1.0f32.to_le_bytes());
    for k in 0..16 {
        a[260 + 2 * k..262 + 2 * k].copy_from_slice(&32i16.to_le_bytes());
    }
    let one_block = |ty: GgmlType, w: &[u8]| {
        let packed = pack(ty, w, 8, ty.block_bytes()).expect("packable");
        let pre = ActScalars::new(ty, 1, 1, &a, a.len());
        let ops =
            PackedOperands { dtype: ty, tiles: &packed, nb: 1, a: &a, a_stride: a.len(), m: 1, pre: &pre, first: 0 };
        let mut out = [[f32::NAN; 8]; 1];
        assert!(k.dot_packed(&ops, &mut out), "{ty:?}");
        for (r, got) in out[0].iter().enumerate() {
            let want = reference(ty, &w[r * ty.block_bytes()..][..ty.block_bytes()], &a);
            assert_eq!(got.to_bits(), want.to_bits(), "{ty:?} row {r}: {got} vs reference {want}");
        }
        out[0]
    };
    // Q4_K: d = 1, dmin = 0.5; scale bytes all 1, so sc = 1 for every
    // sub-block, m = 1 for sub-blocks 0..4 and 0 for 4..8; quants 15
    // (row 0..4) or 7 (rows 4..8): 8 * 32 * q * 2 - 0.5 * 4 * 64.
    let mut w = vec![0u8; 8 * kquant::Q4K_BYTES];
    for (r, blk) in w.chunks_exact_mut(kquant::Q4K_BYTES).enumerate() {
        blk[..2].copy_from_slice(&f16b(1.0));
        blk[2..4].copy_from_slice(&f16b(0.5));
        blk[4..16].fill(1);
        blk[16..].fill(if r < 4 { 0xFF } else { 0x77 });
    }
    assert_eq!(one_block(GgmlType::Q4_K, &w), [7552.0, 7552.0, 7552.0, 7552.0, 3456.0, 3456.0, 3456.0, 3456.0]);
    // Q5_K: the same with every high bit set in even rows: q = 31 (or 23).
    let mut w = vec![0u8; 8 * kquant::Q5K_BYTES];
    for (r, blk) in w.chunks_exact_mut(kquant::Q5K_BYTES).enumerate() {
        blk[..2].copy_from_slice(&f16b(1.0));
        blk[2..4].copy_from_slice(&f16b(0.5));
        blk[4..16].fill(1);
        blk[16..48].fill(if r % 2 == 0 { 0xFF } else { 0x00 });
        blk[48..].fill(if r < 4 { 0xFF } else { 0x77 });
    }
    assert_eq!(one_block(GgmlType::Q5_K, &w), [15744.0, 7552.0, 15744.0, 7552.0, 11648.0, 3456.0, 11648.0, 3456.0]);
    // Q6_K: codes 0 (q = -32) everywhere, d = 1, every scale of row r is
    // r - 4 (signed): 16 runs * 16 * -32 * 2 * (r - 4).
    let mut w = vec![0u8; 8 * kquant::Q6K_BYTES];
    for (r, blk) in w.chunks_exact_mut(kquant::Q6K_BYTES).enumerate() {
        blk[192..208].fill((r as i8 - 4) as u8);
        blk[208..].copy_from_slice(&f16b(1.0));
    }
    let want: Vec<f32> = (0..8).map(|r: i32| (-16384 * (r - 4)) as f32).collect();
    assert_eq!(one_block(GgmlType::Q6_K, &w).to_vec(), want);
}

/// Other types and short operands are refused with nothing written; no
/// blocks give zeros.
#[test]
fn bad_operands_are_refused_untouched() {
    let k = neon();
    let mut r = Rng(5);
    for ty in PACKED {
        let (nb, rows) = (3, 16);
        let rb = nb * ty.block_bytes();
        let w = typed_blocks(&mut r, ty, rows * nb, Fill::Random);
        let packed = pack(ty, &w, rows, rb).expect("packable");
        let ab = act_bytes(ty, nb);
        let a = act_rows(&mut r, ty, nb, 4, ab, Fill::Random);
        let pre = ActScalars::new(ty, nb, 4, &a, ab);
        let other = if ty == GgmlType::Q4_1 { GgmlType::Q8_0 } else { GgmlType::Q4_1 };
        let refused =
            |dtype: GgmlType, tiles: &[u8], a: &[u8], m: usize, pre: &ActScalars, first: usize, n_out: usize| {
                let mut out = vec![[f32::NAN; 8]; n_out];
                let ran = k.dot_packed(&PackedOperands { dtype, tiles, nb, a, a_stride: ab, m, pre, first }, &mut out);
                !ran && out.iter().flatten().all(|v| v.is_nan())
            };
        let ctx = ty.name();
        assert!(!refused(ty, &packed, &a, 2, &pre, 0, 4), "{ctx}: valid call refused");
        for dtype in UNPACKED {
            assert!(!Neon::detect().packs(dtype));
            assert!(refused(dtype, &packed, &a, 2, &pre, 0, 4), "{ctx}: {dtype:?} accepted");
        }
        assert!(refused(ty, &packed[..8 * rb - 1], &a, 1, &pre, 0, 2), "{ctx}: short tiles");
        assert!(refused(ty, &packed, &a[..ab - 1], 1, &pre, 0, 2), "{ctx}: short activations");
        assert!(refused(ty, &packed, &a[..3 * ab], 4, &pre, 0, 8), "{ctx}: short fourth row");
        assert!(refused(ty, &packed, &a, 0, &pre, 0, 4), "{ctx}: no rows");
        assert!(refused(ty, &packed, &a, 9, &pre, 0, 18), "{ctx}: nine rows");
        assert!(refused(ty, &packed, &a, 2, &pre, 3, 4), "{ctx}: scalars end at row 4");
        assert!(refused(ty, &packed, &a, 2, &ActScalars::new(other, nb, 4, &a, ab), 0, 4), "{ctx}: other scalars");
        assert!(refused(ty, &packed, &a, 2, &ActScalars::new(ty, nb - 1, 4, &a, ab), 0, 4), "{ctx}: other nb");
        assert!(refused(ty, &packed, &a, 2, &pre, 0, 3), "{ctx}: short output");
        // No blocks: every output is zero, as the reference's empty sum.
        let mut out = vec![[f32::NAN; 8]; 2];
        let empty = ActScalars::new(ty, 0, 2, &a, ab);
        let ops = PackedOperands { dtype: ty, tiles: &[], nb: 0, a: &a, a_stride: ab, m: 2, pre: &empty, first: 0 };
        assert!(k.dot_packed(&ops, &mut out));
        assert!(out.iter().flatten().all(|v| v.to_bits() == 0), "{ctx}: empty rows");
    }
}

/// With `dotprod` (the default) exactly the types of `pack::PACKED` are packed. With
/// `NEON_EXPECT_NO_DOTPROD` set, on a CPU without the extension
/// (`qemu-aarch64 -cpu cortex-a53`), nothing is packed and there are no
/// packed kernels, so the engine keeps the GGUF layout and row kernels.
#[test]
fn dotprod_decides_the_packed_path() {
    let n = Neon::detect();
    if std::env::var_os("NEON_EXPECT_NO_DOTPROD").is_some() {
        assert!(!std::arch::is_aarch64_feature_detected!("dotprod"), "this CPU has dotprod");
        for ty in PACKED {
            assert!(!n.packs(ty), "{ty:?} packed without dotprod");
        }
        assert_eq!(n.dotprod(), None);
        return;
    }
    assert_eq!(n.dotprod(), Some(neon()));
    for ty in PACKED {
        assert!(n.packs(ty), "{ty:?}");
    }
    for ty in UNPACKED {
        assert!(!n.packs(ty), "{ty:?}");
    }
}
