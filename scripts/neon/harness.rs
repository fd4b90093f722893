//! Cross-test of the engine's NEON kernels against the scalar reference, on
//! a machine that is not aarch64 (run by `scripts/test-neon`).
//!
//! Why this exists: the NEON kernels in `engine/src/kernels/simd/neon.rs` are
//! compiled only under `cfg(target_arch = "aarch64")`, and the project's
//! toolchain has no aarch64 target (nor any way to download one). It was
//! written when only Debian's rustc 1.63, too old for the engine, had an
//! aarch64 std; `scripts/test-neon` now runs the engine's own tests on
//! aarch64 with rustc-web first, and keeps this harness for the checks
//! those lack (hand-computed results, encoder-made and ragged rows, refused
//! calls leaving their output untouched). It compiles just the real files
//! involved, unchanged, by `#[path]`:
//! - `engine/src/quant/legacy.rs`, the scalar reference (and its own tests);
//! - `engine/src/quant/kquant/`, the K-quant reference (and its own tests);
//! - `engine/src/quant/pack.rs`, the packed tile layout (and its own tests);
//! - `engine/src/kernels/simd/neon.rs`, the NEON row kernels;
//! - `engine/src/kernels/simd/neon_packed.rs` and `neon_packed_kquant.rs`, the
//!   packed-tile kernels (`sdot`).
//!
//! The crate root stands in for `engine::quant`, and module `quant` below
//! re-exports it under that name (the kernels reach the formats through
//! `crate::quant`). `quant/mod.rs` itself cannot be included
//! (it pulls in every kernel family and newer std APIs), so two items of it
//! are shimmed below: `GgmlType`, reduced to the variants these files name
//! and the two methods `pack.rs` calls, and `f16_at`, the same one-line
//! decode. The `half` crate is Debian's.
//!
//! The tests assert that `Neon::vec_dot` and the packed kernels equal the
//! reference bit for bit on random and edge-value blocks, and check a few
//! results by hand, so that both sides agreeing on a wrong answer would not
//! pass either. The packed tests need `dotprod` and fail without it (run
//! under `qemu-aarch64 -cpu max`); `NEON_EXPECT_NO_DOTPROD=1` on a CPU without
//! it instead checks that the packed path is switched off.

use half::f16;

#[path = "../../engine/src/quant/legacy.rs"]
#[allow(dead_code)] // Only the dot products and the encoders are used here.
mod legacy;

#[path = "../../engine/src/quant/kquant/mod.rs"]
#[allow(dead_code, unused_imports)] // Q2_K, Q3_K and the dequantizers are not used here.
mod kquant;

#[path = "../../engine/src/quant/pack.rs"]
#[allow(dead_code)] // `unpack_row` serves the engine's embedding lookups.
mod pack;

#[path = "../../engine/src/kernels/simd"]
mod simd {
    pub(crate) mod neon;
    pub(crate) mod neon_packed;
    pub(crate) mod neon_packed_kquant;
}

#[cfg(test)]
mod packed;

/// The path the kernels name the formats by (`crate::quant::…`).
mod quant {
    pub(crate) use super::{f16_at, kquant, legacy, pack, GgmlType};
}

/// Shim of `engine::quant::GgmlType`: the variants `neon.rs` dispatches on,
/// the packed layouts `pack.rs` names, and one type it must refuse.
#[allow(non_camel_case_types, dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q8_1,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
}

impl GgmlType {
    /// Bytes per block, as `engine::quant::GgmlType::block_bytes`.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::Q4_0 => legacy::Q4_0_BYTES,
            GgmlType::Q4_1 => legacy::Q4_1_BYTES,
            GgmlType::Q8_0 => legacy::Q8_0_BYTES,
            GgmlType::Q8_1 => legacy::Q8_1_BYTES,
            GgmlType::Q4_K => kquant::Q4K_BYTES,
            GgmlType::F16 => 2,
            GgmlType::Q5_0 => legacy::Q5_0_BYTES,
            GgmlType::Q5_K => kquant::Q5K_BYTES,
            GgmlType::Q6_K => kquant::Q6K_BYTES,
            GgmlType::Q8_K => kquant::Q8K_BYTES,
        }
    }

    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q8_1 => "q8_1",
            GgmlType::Q4_K => "q4_k",
            GgmlType::F16 => "f16",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_K => "q5_k",
            GgmlType::Q6_K => "q6_k",
            GgmlType::Q8_K => "q8_k",
        }
    }
}

/// Shim of `engine::quant::f16_at`, identical to it.
#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::legacy::{Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES, Q8_1_BYTES};
    use super::simd::neon::Neon;
    use super::{legacy, GgmlType};
    use half::f16;

    const FORMATS: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];

    /// xorshift64*: deterministic inputs without a `rand` dependency.
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            (self.next() >> 11) % n
        }
        /// A finite f16 scale, weighted towards the edges: zeros of both
        /// signs, the smallest subnormal, the largest finite values.
        pub(crate) fn scale(&mut self) -> f16 {
            match self.below(10) {
                0 => f16::from_bits(0x0000),
                1 => f16::from_bits(0x8000),
                2 => f16::from_bits(0x0001),
                3 => f16::MAX,
                4 => f16::MIN,
                // Any finite bit pattern (exponent field not all ones).
                5 | 6 => loop {
                    let b = self.next() as u16;
                    if b & 0x7C00 != 0x7C00 {
                        break f16::from_bits(b);
                    }
                },
                _ => f16::from_f32((self.below(2001) as f32 - 1000.0) / 256.0),
            }
        }
    }

    /// How the quant bytes of a block are filled.
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum Fill {
        Random,
        /// Random, with about a quarter of the bytes 0x80 (-128; nibbles 0 and 8).
        RandomMin,
        /// One byte everywhere: 0x00, 0xFF (nibbles 15, -1), 0x80 (-128),
        /// 0x7F (127), 0x0F/0xF0 (nibbles 15 and 0), 0x88 (Q4_0's zero).
        Const(u8),
    }

    pub(crate) const FILLS: [Fill; 9] = [
        Fill::Random,
        Fill::RandomMin,
        Fill::Const(0x00),
        Fill::Const(0xFF),
        Fill::Const(0x80),
        Fill::Const(0x7F),
        Fill::Const(0x0F),
        Fill::Const(0xF0),
        Fill::Const(0x88),
    ];

    /// Bytes per block and offset of the quants, for weights of `ty` and the
    /// activations that pair with them.
    pub(crate) fn layout(ty: GgmlType) -> ((usize, usize), (usize, usize)) {
        match ty {
            GgmlType::Q4_0 => ((Q4_0_BYTES, 2), (Q8_0_BYTES, 2)),
            GgmlType::Q4_1 => ((Q4_1_BYTES, 4), (Q8_1_BYTES, 4)),
            GgmlType::Q8_0 => ((Q8_0_BYTES, 2), (Q8_0_BYTES, 2)),
            _ => unreachable!("no 32-element weight format"),
        }
    }

    /// `nb` blocks of `bytes` each: f16 scalars in the first `head` bytes
    /// (one or two), quants per `fill` after them.
    pub(crate) fn blocks(r: &mut Rng, nb: usize, (bytes, head): (usize, usize), fill: Fill) -> Vec<u8> {
        let mut v = vec![0u8; nb * bytes];
        for blk in v.chunks_exact_mut(bytes) {
            for at in (0..head).step_by(2) {
                blk[at..at + 2].copy_from_slice(&r.scale().to_le_bytes());
            }
            for q in &mut blk[head..] {
                *q = match fill {
                    Fill::Random => r.next() as u8,
                    Fill::RandomMin if r.below(4) == 0 => 0x80,
                    Fill::RandomMin => r.next() as u8,
                    Fill::Const(c) => c,
                };
            }
        }
        v
    }

    pub(crate) fn reference(ty: GgmlType, w: &[u8], a: &[u8]) -> f32 {
        match ty {
            GgmlType::Q4_0 => legacy::vec_dot_q4_0_q8_0(w, a),
            GgmlType::Q4_1 => legacy::vec_dot_q4_1_q8_1(w, a),
            GgmlType::Q8_0 => legacy::vec_dot_q8_0_q8_0(w, a),
            _ => unreachable!("no reference"),
        }
    }

    /// Asserts the kernel equals the reference bit for bit; returns the value.
    fn check(ty: GgmlType, w: &[u8], a: &[u8], ctx: &str) -> f32 {
        let want = reference(ty, w, a);
        let got = Neon::detect().vec_dot(ty, w, a).unwrap_or_else(|| panic!("{ty:?}: no NEON kernel"));
        assert_eq!(got.to_bits(), want.to_bits(), "{ty:?} {ctx}: neon {got:e} vs reference {want:e}");
        got
    }

    #[test]
    fn kernel_covers_exactly_the_32_element_weight_formats() {
        for ty in FORMATS {
            assert!(Neon::detect().vec_dot(ty, &[], &[]).is_some(), "{ty:?}");
        }
        for ty in [GgmlType::Q8_1, GgmlType::Q4_K] {
            assert_eq!(Neon::detect().vec_dot(ty, &[0; 64], &[0; 64]), None, "{ty:?}");
        }
    }

    /// Results worked out by hand, so the reference is checked too.
    #[test]
    fn extreme_blocks_match_hand_arithmetic() {
        let one = f16::ONE.to_le_bytes();
        let half_ = f16::from_f32(0.5).to_le_bytes();
        let three = f16::from_f32(3.0).to_le_bytes();
        let mut q80 = [0x80u8; Q8_0_BYTES]; // all -128
        q80[..2].copy_from_slice(&one);
        let mut q81 = [0x80u8; Q8_1_BYTES];
        q81[..2].copy_from_slice(&one);
        q81[2..4].copy_from_slice(&three);

        // Q4_0: nibbles 15 -> 7; 32 * 7 * -128 * 0.5.
        let mut w = [0xFFu8; Q4_0_BYTES];
        w[..2].copy_from_slice(&half_);
        assert_eq!(check(GgmlType::Q4_0, &w, &q80, "hand"), -14336.0);
        // Q4_0: nibbles 0 -> -8; 32 * -8 * -128 * 0.5.
        w[2..].fill(0x00);
        assert_eq!(check(GgmlType::Q4_0, &w, &q80, "hand"), 16384.0);
        // Q4_1: low nibbles 15, high 0; 16 * 15 * -128 * 0.5 + 0.5 * 3.
        let mut w = [0x0Fu8; Q4_1_BYTES];
        w[..2].copy_from_slice(&half_);
        w[2..4].copy_from_slice(&half_);
        assert_eq!(check(GgmlType::Q4_1, &w, &q81, "hand"), -15358.5);
        // Q8_0: -128 * -128 everywhere, twice; the largest block sum, 2 * 524288.
        let mut w = [0x80u8; 2 * Q8_0_BYTES];
        w[..2].copy_from_slice(&one);
        w[Q8_0_BYTES..Q8_0_BYTES + 2].copy_from_slice(&one);
        let a: Vec<u8> = q80.iter().chain(&q80).copied().collect();
        assert_eq!(check(GgmlType::Q8_0, &w, &a, "hand"), 1_048_576.0);
        // A zero weight scale zeroes the block whatever the quants.
        w[..2].fill(0);
        assert_eq!(check(GgmlType::Q8_0, &w, &a, "hand"), 524_288.0);
    }

    /// Every pair of fills, many scales, block counts from 0 to 96.
    #[test]
    fn random_and_edge_blocks_are_bit_exact() {
        let mut r = Rng(0x9E37_79B9_7F4A_7C15);
        let mut nonzero = 0;
        let mut total = 0;
        for ty in FORMATS {
            let (wl, al) = layout(ty);
            for nb in [0, 1, 2, 3, 7, 18, 49, 96] {
                for wf in FILLS {
                    for af in FILLS {
                        for rep in 0..2 {
                            let w = blocks(&mut r, nb, wl, wf);
                            let a = blocks(&mut r, nb, al, af);
                            let v = check(ty, &w, &a, &format!("nb={nb} w={wf:?} a={af:?} rep={rep}"));
                            nonzero += usize::from(v != 0.0);
                            total += 1;
                        }
                    }
                }
            }
        }
        // Guard against inputs that make every dot product trivially zero.
        assert!(nonzero * 2 > total, "only {nonzero} of {total} results are non-zero");
    }

    /// Rows of unequal block counts and trailing partial blocks: the kernel
    /// takes the reference's whole blocks of the shorter row.
    #[test]
    fn ragged_rows_follow_the_reference() {
        let mut r = Rng(7);
        for ty in FORMATS {
            let (wl, al) = layout(ty);
            for (wn, an) in [(3, 5), (5, 3), (4, 4), (0, 2)] {
                for extra in [0, 1, wl.0 - 1] {
                    let mut w = blocks(&mut r, wn, wl, Fill::Random);
                    let mut a = blocks(&mut r, an, al, Fill::RandomMin);
                    w.extend((0..extra).map(|_| r.next() as u8));
                    a.extend((0..extra).map(|_| r.next() as u8));
                    check(ty, &w, &a, &format!("blocks {wn}/{an} +{extra} bytes"));
                }
            }
        }
    }

    /// Rows made by the engine's own encoders from floats, as in inference.
    #[test]
    fn encoded_rows_are_bit_exact() {
        let mut r = Rng(11);
        for ty in FORMATS {
            let (wl, al) = layout(ty);
            for nb in [1, 5, 48] {
                for mag in [1e-4f32, 1.0, 300.0] {
                    let mut x: Vec<f32> =
                        (0..2 * nb * 32).map(|_| (r.below(1 << 24) as f32 / (1 << 23) as f32 - 1.0) * mag).collect();
                    x[..32].fill(0.0); // an all-zero block: zero scales
                    let (xw, xa) = x.split_at(nb * 32);
                    let mut w = vec![0u8; nb * wl.0];
                    let mut a = vec![0u8; nb * al.0];
                    match ty {
                        GgmlType::Q4_0 => legacy::quantize_q4_0(xw, &mut w),
                        GgmlType::Q4_1 => legacy::quantize_q4_1(xw, &mut w),
                        _ => legacy::quantize_q8_0(xw, &mut w),
                    }
                    match ty {
                        GgmlType::Q4_1 => legacy::quantize_q8_1(xa, &mut a),
                        _ => legacy::quantize_q8_0(xa, &mut a),
                    }
                    check(ty, &w, &a, &format!("encoded nb={nb} mag={mag}"));
                }
            }
        }
    }
}
