//! Every SIMD kernel against the scalar reference, bit for bit.

use crate::quant::pack::{ActScalars, PackedOperands};
use crate::quant::{kquant, legacy, GgmlType};
use half::f16;

/// Small deterministic generator (no `rand` dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn byte(&mut self) -> u8 {
        (self.next() & 0xFF) as u8
    }
    /// Uniform in `[-1, 1)`.
    fn unit(&mut self) -> f32 {
        (self.next() & 0xFF_FFFF) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// A finite scale: sometimes zero, sometimes tiny, mostly ordinary.
    fn scale(&mut self) -> f32 {
        match self.next() % 8 {
            0 => 0.0,
            1 => 1e-6 * self.unit(),
            2 => 1000.0 * self.unit(),
            _ => self.unit(),
        }
    }
}

/// Fill modes for quant bytes: random, or the edge values.
#[derive(Clone, Copy)]
enum Fill {
    Random,
    /// 0xFF everywhere: all-15 nibbles, -1 bytes.
    Ones,
    /// 0x80: -128 bytes, nibbles 0 and 8.
    Min,
    /// 0x7F: 127 bytes.
    Max,
}

const FILLS: [Fill; 4] = [Fill::Random, Fill::Ones, Fill::Min, Fill::Max];

fn fill(r: &mut Rng, f: Fill, out: &mut [u8]) {
    for b in out {
        *b = match f {
            Fill::Random => r.byte(),
            Fill::Ones => 0xFF,
            Fill::Min => 0x80,
            Fill::Max => 0x7F,
        };
    }
}

fn put16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// A row of `nb` blocks of `ty` with quants filled per `f` and finite scales.
fn row(r: &mut Rng, ty: GgmlType, nb: usize, f: Fill) -> Vec<u8> {
    let bb = ty.block_bytes();
    let mut v = vec![0u8; nb * bb];
    for blk in v.chunks_exact_mut(bb) {
        fill(r, f, blk);
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => put16(blk, 0, r.scale()),
            GgmlType::Q4_1 | GgmlType::Q8_1 => {
                put16(blk, 0, r.scale());
                put16(blk, 2, r.scale());
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                put16(blk, 0, r.scale());
                put16(blk, 2, r.scale());
            }
            GgmlType::Q6_K => put16(blk, 208, r.scale()),
            GgmlType::Q8_K => {
                blk[0..4].copy_from_slice(&r.scale().to_le_bytes());
                // bsums must be consistent with the quants for Q4_K's reference.
                for k in 0..16 {
                    let s: i16 = blk[4 + 16 * k..20 + 16 * k].iter().map(|&q| i16::from(q as i8)).sum();
                    blk[260 + 2 * k..262 + 2 * k].copy_from_slice(&s.to_le_bytes());
                }
            }
            _ => unreachable!(),
        }
    }
    v
}

fn reference(ty: GgmlType, w: &[u8], a: &[u8]) -> f32 {
    match ty {
        GgmlType::Q4_0 => legacy::vec_dot_q4_0_q8_0(w, a),
        GgmlType::Q5_0 => legacy::vec_dot_q5_0_q8_0(w, a),
        GgmlType::Q4_1 => legacy::vec_dot_q4_1_q8_1(w, a),
        GgmlType::Q8_0 => legacy::vec_dot_q8_0_q8_0(w, a),
        GgmlType::Q4_K => kquant::vec_dot_q4k_q8k(w, a),
        GgmlType::Q5_K => kquant::vec_dot_q5k_q8k(w, a),
        GgmlType::Q6_K => kquant::vec_dot_q6k_q8k(w, a),
        _ => unreachable!(),
    }
}

const TYPES: [GgmlType; 5] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K];

/// Runs `check(ty, w_rows, row_bytes, a)` over many random and edge inputs
/// of several lengths, with up to [`super::ROW_TILE`] + 1 weight rows.
fn cases(mut check: impl FnMut(GgmlType, &[u8], usize, usize, &[u8])) {
    let mut r = Rng(42);
    for ty in TYPES {
        let lens: &[usize] = if ty.block_len() == 32 { &[1, 2, 3, 7, 18, 49, 96] } else { &[1, 2, 3, 6] };
        for &nb in lens {
            for (i, &wf) in FILLS.iter().enumerate() {
                for &af in &FILLS[i % 2..] {
                    for _ in 0..3 {
                        let k = 1 + (r.next() as usize) % (super::ROW_TILE + 1);
                        let w: Vec<u8> = (0..k).flat_map(|_| row(&mut r, ty, nb, wf)).collect();
                        let a = row(&mut r, ty.vec_dot_type(), nb, af);
                        check(ty, &w, w.len() / k, k, &a);
                    }
                }
            }
        }
    }
}

/// `vec_dot` against the scalar reference on every row of [`cases`];
/// `covers(ty)` says which types must have a kernel (the others must not).
fn single_rows_match(covers: impl Fn(GgmlType) -> bool, vec_dot: impl Fn(GgmlType, &[u8], &[u8]) -> Option<f32>) {
    cases(|ty, w, rb, k, a| {
        for row in w.chunks_exact(rb).take(k) {
            let got = vec_dot(ty, row, a);
            assert_eq!(got.is_some(), covers(ty), "{}: kernel or not", ty.name());
            if let Some(got) = got {
                let want = reference(ty, row, a);
                assert_eq!(got.to_bits(), want.to_bits(), "{}: {got} vs {want}", ty.name());
            }
        }
    });
}

/// Packed tiles against the scalar reference, for kernel `isa` (`dot`):
/// every (row, activation) output, for 1..=MAX_ACT activation rows per
/// call, one to four tiles per call (pairs and a lone tile) with a
/// partial last tile, random and edge-value quants and scales; a row's
/// result must not depend on how many activation rows or tiles share the
/// call. Short tiles and other rows' scalars must be refused. `types`
/// are the packed types the kernel set computes.
fn packed_tiles_match(
    r: &mut Rng,
    isa: &str,
    types: &[GgmlType],
    dot: impl Fn(&PackedOperands<'_>, &mut [[f32; 8]]) -> bool,
) {
    for &ty in types {
        let tbb = 8 * ty.block_bytes();
        let lens: &[usize] = if ty.block_len() == 32 { &[1, 2, 3, 7, 18, 48] } else { &[1, 2, 3, 5] };
        for &nb in lens {
            for (fi, &wf) in FILLS.iter().enumerate() {
                for &af in &FILLS[fi % 2..] {
                    let ntiles = 1 + (r.next() as usize) % 4;
                    let rows = (ntiles - 1) * 8 + 1 + (r.next() as usize) % 8;
                    let rb = nb * ty.block_bytes();
                    let w: Vec<u8> = (0..rows).flat_map(|_| row(r, ty, nb, wf)).collect();
                    let packed = crate::quant::pack::pack(ty, &w, rows, rb).expect("packable");
                    assert_eq!(packed.len(), ntiles * 8 * rb);
                    // Activation rows with a gap between them (stride > row).
                    let ab = nb * ty.vec_dot_type().block_bytes();
                    let stride = ab + 5;
                    let acts: Vec<Vec<u8>> = (0..super::MAX_ACT)
                        .map(|i| row(r, ty.vec_dot_type(), nb, if i % 2 == 0 { af } else { Fill::Random }))
                        .collect();
                    let mut a = vec![0u8; stride * acts.len()];
                    for (i, act) in acts.iter().enumerate() {
                        a[i * stride..i * stride + ab].copy_from_slice(act);
                    }
                    let pre = ActScalars::new(ty, nb, acts.len(), &a, stride);
                    let all = PackedOperands {
                        dtype: ty,
                        tiles: &packed,
                        nb,
                        a: &a,
                        a_stride: stride,
                        m: 1,
                        pre: &pre,
                        first: 0,
                    };
                    let mut alone = vec![[f32::NAN; 8]; 1];
                    for m in 1..=super::MAX_ACT {
                        let mut out = vec![[f32::NAN; 8]; ntiles * m];
                        assert!(dot(&PackedOperands { m, ..all }, &mut out));
                        for (ti, tile) in packed.chunks_exact(8 * rb).enumerate() {
                            for i in 0..m {
                                let lanes = out[ti * m + i];
                                let ai = &a[i * stride..];
                                assert!(dot(&PackedOperands { tiles: tile, a: ai, first: i, ..all }, &mut alone));
                                for (rr, got) in lanes.iter().enumerate().filter(|(rr, _)| ti * 8 + rr < rows) {
                                    let wr = &w[(ti * 8 + rr) * rb..][..rb];
                                    let want = reference(ty, wr, &acts[i]);
                                    let ctx = format!("{} {} m={m} t={ti} i={i} r={rr}", isa, ty.name());
                                    assert_eq!(got.to_bits(), want.to_bits(), "{ctx}: {got} vs {want}");
                                    assert_eq!(got.to_bits(), alone[0][rr].to_bits(), "{ctx} alone");
                                }
                            }
                        }
                    }
                    let mut short = [[0.0f32; 8]; 1];
                    let cut = &packed[..nb * tbb - 1];
                    assert!(!dot(&PackedOperands { tiles: cut, ..all }, &mut short));
                    // Scalars of other rows, block counts or types are refused.
                    let few = ActScalars::new(ty, nb, 1, &a, stride);
                    assert!(!dot(&PackedOperands { m: 2, pre: &few, ..all }, &mut vec![[0.0; 8]; 2 * ntiles]));
                }
            }
        }
    }
}

/// The NEON kernels, run by `scripts/test-neon` under qemu-aarch64 (with
/// and without `dotprod`), since no aarch64 machine is at hand.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::neon::Neon;
    use super::*;
    use crate::quant::pack::PACKED;

    /// Whether the CPU running the tests must (`1`) or must not (`0`)
    /// have `dotprod`: set by `scripts/test-neon`, so that a qemu CPU
    /// model without it cannot silently skip the packed kernels.
    fn expected_dotprod() -> Option<bool> {
        std::env::var("POTLUCK_EXPECT_DOTPROD").ok().map(|v| v == "1")
    }

    #[test]
    fn neon_is_the_kernel_in_use() {
        if std::env::var_os("POTLUCK_KERNEL").is_none() {
            assert_eq!(super::super::kernel_name(), "neon");
        }
    }

    #[test]
    fn single_row_is_bit_exact() {
        let n = Neon::detect();
        let covers = |ty| matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0);
        single_rows_match(covers, |ty, w, a| n.vec_dot(ty, w, a));
    }

    /// With `dotprod` exactly the types of `pack::PACKED` are packed;
    /// without it nothing is, and the engine keeps the GGUF layout and row
    /// kernels.
    #[test]
    fn dotprod_decides_the_packed_path() {
        let has = std::arch::is_aarch64_feature_detected!("dotprod");
        if let Some(want) = expected_dotprod() {
            assert_eq!(has, want, "dotprod on this CPU");
        }
        let n = Neon::detect();
        assert_eq!(n.dotprod().is_some(), has);
        for ty in PACKED.into_iter().chain([GgmlType::Q8_1, GgmlType::Q8_K, GgmlType::Q2_K, GgmlType::F16]) {
            assert_eq!(n.packs(ty), has && PACKED.contains(&ty), "{}", ty.name());
        }
    }

    /// Every packed layout has a NEON kernel, bit-exact at any activation
    /// count and tile count.
    #[test]
    fn packed_tiles_are_bit_exact_for_any_activation_count() {
        let Some(d) = Neon::detect().dotprod() else {
            assert_ne!(expected_dotprod(), Some(true), "no dotprod");
            eprintln!("skipping: CPU lacks dotprod");
            return;
        };
        packed_tiles_match(&mut Rng(99), "neon", &PACKED, |ops, out| d.dot_packed(ops, out));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::x86::Avx2;
    use super::*;

    fn noise(r: &mut Rng, n: usize) -> Vec<f32> {
        let mag = [1e-3, 1.0, 7.5, 300.0][(r.next() % 4) as usize];
        (0..n).map(|_| r.unit() * mag).collect()
    }

    fn token() -> Option<Avx2> {
        let t = Avx2::detect(false);
        if t.is_none() {
            eprintln!("skipping: CPU lacks AVX2/F16C");
        }
        t
    }

    #[test]
    fn single_row_is_bit_exact() {
        let Some(t) = token() else { return };
        single_rows_match(|_| true, |ty, w, a| t.vec_dot(ty, w, a));
    }

    #[test]
    fn multi_row_is_bit_exact() {
        let Some(t) = token() else { return };
        cases(|ty, w, rb, k, a| {
            let k = k.min(super::super::ROW_TILE);
            let mut out = vec![f32::NAN; k];
            if !t.vec_dot_rows(ty, w, rb, a, &mut out) {
                return;
            }
            for (row, got) in w.chunks_exact(rb).zip(&out) {
                let want = reference(ty, row, a);
                assert_eq!(got.to_bits(), want.to_bits(), "{} rows: {got} vs {want}", ty.name());
            }
        });
    }

    /// Packed tiles against the scalar reference, for every packed
    /// instruction set this CPU has (AVX2, AVX-VNNI, AVX-512 VNNI).
    #[test]
    fn packed_tiles_are_bit_exact_for_any_activation_count() {
        let mut r = Rng(99);
        for t in Avx2::all() {
            eprintln!("packed kernels: {}", t.isa().name());
            packed_tiles_match(&mut r, t.isa().name(), &crate::quant::pack::PACKED, |ops, out| t.dot_packed(ops, out));
        }
    }

    /// Every instruction set's quantization (256- and 512-bit) equals
    /// the scalar reference byte for byte.
    #[test]
    fn quantize_is_byte_exact() {
        if token().is_none() {
            return;
        }
        let mut r = Rng(7);
        for t in Avx2::all() {
            for ty in [GgmlType::Q8_0, GgmlType::Q8_1] {
                for nb in [1, 2, 5, 18, 64] {
                    for case in 0..40 {
                        let mut x = noise(&mut r, nb * 32);
                        match case % 8 {
                            // Exact halves: ties must round away from zero.
                            0 => x.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 64) as f32 * 0.5 - 16.0),
                            1 => x.fill(0.0),
                            2 => x[3] = f32::NAN,
                            3 => x[5] = f32::INFINITY,
                            4 => x.iter_mut().step_by(3).for_each(|v| *v = -*v * 1e30),
                            5 => x[0] = -0.0,
                            _ => {}
                        }
                        let n = ty.row_bytes(x.len()).expect("whole blocks");
                        let mut want = vec![0u8; n];
                        match ty {
                            GgmlType::Q8_0 => legacy::quantize_q8_0(&x, &mut want),
                            _ => legacy::quantize_q8_1(&x, &mut want),
                        }
                        let mut got = vec![0xAAu8; n];
                        assert!(t.quantize_row(ty, &x, &mut got));
                        assert_eq!(got, want, "{} {} case {case} nb {nb}", t.isa().name(), ty.name());
                    }
                }
            }
        }
    }

    /// Speed of activation quantization per instruction set (`cargo
    /// test --release -p potluck-engine -- --ignored --nocapture
    /// quantize_speed`): ns per float over a SmolLM2 FFN row.
    #[test]
    #[ignore]
    #[allow(clippy::cast_precision_loss)]
    fn quantize_speed() {
        let mut r = Rng(9);
        let x = noise(&mut r, 1536);
        let mut out = vec![0u8; GgmlType::Q8_1.row_bytes(x.len()).expect("whole blocks")];
        for t in Avx2::all() {
            let reps = 200_000;
            let start = std::time::Instant::now();
            for _ in 0..reps {
                assert!(t.quantize_row(GgmlType::Q8_1, std::hint::black_box(&x), &mut out));
            }
            let ns = start.elapsed().as_secs_f64() * 1e9 / (reps * x.len()) as f64;
            eprintln!("{}: {ns:.3} ns per float", t.isa().name());
        }
    }

    /// Throughput of the packed kernels (`cargo test --release -- --ignored
    /// --nocapture packed_speed`): GMAC/s per instruction set for 1, 4
    /// and 8 activation rows, 16 tiles per call.
    #[test]
    #[ignore]
    fn packed_speed() {
        let mut r = Rng(3);
        // `PACKED_SPEED_ROWS=98304` gives a matrix far larger than the
        // caches, so the weights stream from memory as in the model.
        let rows: usize = std::env::var("PACKED_SPEED_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(1536);
        for t in Avx2::all() {
            for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q5_K] {
                // SmolLM2's width, 576, in whole blocks.
                let nb = (576 / ty.block_len()).max(1);
                let w = row(&mut r, ty, rows * nb, Fill::Random);
                let packed = crate::quant::pack::pack(ty, &w, rows, nb * ty.block_bytes()).expect("packable");
                let ab = nb * ty.vec_dot_type().block_bytes();
                let a: Vec<u8> = (0..8).flat_map(|_| row(&mut r, ty.vec_dot_type(), nb, Fill::Random)).collect();
                let tb = 16 * 8 * nb * ty.block_bytes();
                let pre = ActScalars::new(ty, nb, 8, &a, ab);
                for m in [1, 4, 8] {
                    let mut out = vec![[0.0f32; 8]; 16 * m];
                    let iters = (300 * 1536 / rows.max(1)).max(1);
                    let start = std::time::Instant::now();
                    for _ in 0..iters {
                        for tiles in packed.chunks_exact(tb) {
                            let ops =
                                PackedOperands { dtype: ty, tiles, nb, a: &a, a_stride: ab, m, pre: &pre, first: 0 };
                            t.dot_packed(&ops, &mut out);
                        }
                    }
                    let s = start.elapsed().as_secs_f64();
                    let macs = (iters * rows * nb * ty.block_len() * m) as f64;
                    eprintln!("{} {} m={m}: {:.1} GMAC/s", t.isa().name(), ty.name(), macs / s / 1e9);
                }
            }
        }
    }

    /// Throughput of the kernels on SmolLM2-sized rows (`cargo test --release
    /// -- --ignored --nocapture kernel_speed`).
    #[test]
    #[ignore]
    fn kernel_speed() {
        let Some(t) = token() else { return };
        let mut r = Rng(1);
        let (rows, nb) = (1536, 18);
        for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_0] {
            let w = row(&mut r, ty, rows * nb, Fill::Random);
            let a = row(&mut r, ty.vec_dot_type(), nb, Fill::Random);
            let rb = w.len() / rows;
            let time = |f: &mut dyn FnMut(&mut [f32])| {
                let start = std::time::Instant::now();
                let mut out = vec![0.0f32; rows];
                for _ in 0..200 {
                    f(&mut out);
                }
                start.elapsed().as_secs_f64() / 200.0 * 1e6
            };
            let s =
                time(&mut |o| o.iter_mut().enumerate().for_each(|(i, v)| *v = reference(ty, &w[i * rb..][..rb], &a)));
            let one = time(&mut |o| {
                o.iter_mut().enumerate().for_each(|(i, v)| *v = t.vec_dot(ty, &w[i * rb..][..rb], &a).unwrap_or(0.0))
            });
            let multi = time(&mut |o| {
                for (c, chunk) in o.chunks_mut(super::super::ROW_TILE).enumerate() {
                    let base = c * super::super::ROW_TILE * rb;
                    t.vec_dot_rows(ty, &w[base..], rb, &a, chunk);
                }
            });
            eprintln!("{}: scalar {s:.1} us, avx2 1-row {one:.1} us, avx2 8-row {multi:.1} us", ty.name());
        }
    }
}
