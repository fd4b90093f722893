//! Packed-tile kernels for aarch64 with the dot product extension (ARMv8.2
//! `dotprod`: Apple M1 on, Neoverse N1, Cortex-A55/A76 on): eight weight
//! rows against up to eight activation rows, over a run of tiles, so prefill
//! and batched decode load each weight tile once for several activations.
//!
//! The lane-interleaved layout (see `quant::pack`) puts four consecutive
//! quant bytes of weight row `r` in 32-bit lane `r % 4` of the `r / 4`-th
//! 16-byte half of each group. `sdot vD.4s, vN.16b, vM.4b[l]` adds to every
//! lane of `vD` the dot product of that lane's four bytes of `vN` with bytes
//! `4l..4l + 4` of `vM`: with `vM` holding 16 consecutive activation bytes,
//! one instruction computes four elements of four rows, and every row's exact
//! integer block sum stays in its own lane (no horizontal sums).
//!
//! `sdot` is signed × signed. Q4_1 nibbles (0..=15) are valid signed bytes.
//! Q8_0 quants are packed as `q ^ 0x80` for x86's unsigned × signed
//! `vpdpbusd`; here one `eor` per 16 bytes restores `q`, shared by every
//! activation row of the pass. (x86's `- 128 Σ y` correction does not apply:
//! read as signed, `q ^ 0x80` is not `q + 128`, and the unsigned × signed
//! `usdot` needs the later I8MM extension.) Q4_0 and Q5_0 multiply their
//! unsigned codes (nibbles, or nibbles with Q5_0's fifth bit ORed on) and
//! start each block's sums at `- 8 Σ y` (`- 16 Σ y`), the activation scalar
//! `pack::ActScalars` holds, so the codes' offset costs nothing per row.
//! The K-quants are in `neon_packed_kquant`, which shares this file's helpers.
//!
//! Integer sums are exact in any order (at most 32 · 128 · 128 per block).
//! The float part repeats the scalar reference's f32 operations one for one,
//! per lane, in block order, as separate `fmul`/`fadd` (Rust never contracts
//! them into FMA), so every output equals `legacy::vec_dot_*` bit for bit,
//! whatever the number of activation rows or tiles.
//!
//! Cost per block, tile and activation row (Q4_1): 16 `sdot` (256 products),
//! 2 activation loads, 2 `scvtf`, 2 `dup` and 10 float operations; shared by
//! the pass: 8 weight loads, 8 `and`, 8 `ushr`, 2 scale loads, 4 `fcvtl`.
//! Q8_0: 16 `sdot`, 2 loads, 2 `scvtf`, 1 `dup`, 6 float operations per row;
//! 16 loads, 16 `eor`, 1 scale load, 2 `fcvtl` shared. Q4_0 as Q8_0 per row
//! (and one `dup` of the offset); shared, Q4_1's unpacking and one scale
//! load. Q5_0 adds, shared, 16 `tbl`, `cmtst`, `and` and `orr` for the fifth
//! bits.
//!
//! This file was first tested with rustc 1.63 (`scripts/neon/harness.rs`),
//! which has neither `sdot` nor f16 vector intrinsics, so both come from
//! `asm!`, confined to [`sdot`] and [`widen_f16x8`].

// NEON intrinsics are safe inside `#[target_feature]` functions on current
// compilers but were unsafe on 1.63; some `unsafe` blocks date from then.
#![allow(unused_unsafe)]

use std::arch::aarch64::*;
use std::arch::asm;

use super::neon_packed_kquant as kq;
use crate::quant::legacy::{Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q8_0_BYTES, Q8_1_BYTES};
use crate::quant::pack::{Job, PackedOperands, TileOut};
use crate::quant::GgmlType;

/// Activation rows one kernel pass keeps in registers: four rows' integer
/// sums, float sums and activation bytes (24 of the 32 vector registers)
/// leave room for the weights being unpacked.
const PASS_ROWS: usize = 4;

/// A kernel instance for one row count (see [`DotProd::dot_packed_to`]).
type KernelFn = unsafe fn(&Job);

/// Proof that the CPU has the dot product extension: the packed kernels run
/// only through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DotProd(());

impl DotProd {
    /// `Some` when the CPU reports `dotprod` (callers cache the answer).
    pub(crate) fn detect() -> Option<Self> {
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            Some(Self(()))
        } else {
            None
        }
    }

    /// Runs the packed kernels on `ops` (the contract of `quant::dot_packed`);
    /// `false`, with nothing written, for other types or operands too short
    /// (checked by [`Job::passes`], as on x86). The tests' compact form of
    /// [`Self::dot_packed_to`].
    #[cfg(test)]
    pub(crate) fn dot_packed(self, ops: &PackedOperands<'_>, out: &mut [[f32; 8]]) -> bool {
        self.dot_packed_to(ops, TileOut::compact(out, ops.m))
    }

    /// [`Self::dot_packed`] into any [`TileOut`] layout.
    pub(crate) fn dot_packed_to(self, ops: &PackedOperands<'_>, out: TileOut) -> bool {
        // The instances for 1..=PASS_ROWS activation rows, so that three
        // rows are one pass over the weights, not two.
        let kernels: [KernelFn; PASS_ROWS] = match ops.dtype {
            GgmlType::Q4_1 => [q4_1::<1>, q4_1::<2>, q4_1::<3>, q4_1::<4>],
            GgmlType::Q8_0 => [q8_0::<1>, q8_0::<2>, q8_0::<3>, q8_0::<4>],
            GgmlType::Q4_0 => [q4_0::<1>, q4_0::<2>, q4_0::<3>, q4_0::<4>],
            GgmlType::Q5_0 => [q5_0::<1>, q5_0::<2>, q5_0::<3>, q5_0::<4>],
            GgmlType::Q4_K => [kq::q4_k::<1>, kq::q4_k::<2>, kq::q4_k::<3>, kq::q4_k::<4>],
            GgmlType::Q5_K => [kq::q5_k::<1>, kq::q5_k::<2>, kq::q5_k::<3>, kq::q5_k::<4>],
            GgmlType::Q6_K => [kq::q6_k::<1>, kq::q6_k::<2>, kq::q6_k::<3>, kq::q6_k::<4>],
            _ => return false,
        };
        Job::passes(ops, out, PASS_ROWS, |job, k| {
            // SAFETY: `Job::passes` checked the operands of `job` for `k`
            // (1..=PASS_ROWS) rows of this type; `self` proves the CPU has
            // `dotprod`.
            unsafe { kernels[k - 1](job) }
        })
    }
}

/// `acc + sdot(w, lane L of y)`: adds to each i32 lane of `acc` the dot
/// product of that lane's four signed bytes of `w` with signed bytes `4L..4L
/// + 4` of `y`. Exact: at most 4 · 128 · 128 per lane and step.
///
/// # Safety
/// The CPU must have `dotprod` (register operands only; no memory access).
#[inline]
#[target_feature(enable = "dotprod")]
pub(super) unsafe fn sdot<const L: usize>(acc: int32x4_t, w: int8x16_t, y: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // The lane index is an immediate: one `asm!` per lane, chosen at compile time.
    macro_rules! sdot_lane {
        ($lane:literal) => {
            asm!(
                concat!("sdot {a:v}.4s, {w:v}.16b, {y:v}.4b[", $lane, "]"),
                a = inout(vreg) acc,
                w = in(vreg) w,
                y = in(vreg) y,
                options(pure, nomem, nostack, preserves_flags),
            )
        };
    }
    // SAFETY: `sdot` reads and writes only these registers; the caller
    // guarantees the extension.
    unsafe {
        match L {
            0 => sdot_lane!("0"),
            1 => sdot_lane!("1"),
            2 => sdot_lane!("2"),
            _ => sdot_lane!("3"),
        }
    }
    acc
}

/// The eight f16 scales at `p` (rows 0..4, rows 4..8) widened to f32 with
/// `fcvtl`/`fcvtl2` (base ARMv8), exactly as the reference's `f16_at`:
/// every f16, subnormals included, is an f32.
///
/// # Safety
/// `p` must point to 16 readable bytes.
#[inline]
pub(super) unsafe fn widen_f16x8(p: *const u8) -> [float32x4_t; 2] {
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: the caller guarantees the 16 bytes; `out` operands never share
    // a register with the input, so `fcvtl` cannot clobber it for `fcvtl2`.
    unsafe {
        let h = vld1q_u16(p.cast());
        asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    [lo, hi]
}

/// The `16 N` activation quants at byte `at` of each of the pass's `M`
/// activation rows, as `N` vectors per row (elements `16 n..16 n + 16`).
///
/// # Safety
/// Each `j.a[i]` must have `16 N` readable bytes at `at`.
#[inline]
pub(super) unsafe fn load_acts<const M: usize, const N: usize>(j: &Job, at: usize) -> [[int8x16_t; N]; M] {
    // SAFETY: the caller guarantees the bytes. (A loop, not
    // `array::from_fn`, which rustc 1.63 left as a call.)
    unsafe {
        let mut ys = [[vdupq_n_s8(0); N]; M];
        for (y, a) in ys.iter_mut().zip(&j.a) {
            for (n, v) in y.iter_mut().enumerate() {
                *v = vld1q_s8(a.add(at + 16 * n).cast());
            }
        }
        ys
    }
}

/// Adds to each activation row's two integer sums (weight rows 0..4, 4..8)
/// the `sdot` of the weights `w` (rows 0..4, 4..8; four bytes per row) with
/// lane `L` of that row's activation vector `ys[i][n]`.
///
/// # Safety
/// The CPU has `dotprod` (registers only).
#[inline]
#[target_feature(enable = "dotprod")]
pub(super) unsafe fn sdot_rows<const L: usize, const M: usize, const N: usize>(
    w: [int8x16_t; 2],
    ys: &[[int8x16_t; N]; M],
    n: usize,
    sum: &mut [[int32x4_t; 2]; M],
) {
    // SAFETY: registers only; the caller guarantees the extension.
    unsafe {
        for (s, y) in sum.iter_mut().zip(ys) {
            s[0] = sdot::<L>(s[0], w[0], y[n]);
            s[1] = sdot::<L>(s[1], w[1], y[n]);
        }
    }
}

/// Each activation row's two integer sums, starting at `- x` (the row's
/// scalar word `x[(i * nb + b) * xpb + k]`, read as i32, in every lane):
/// the offset of the weight codes, subtracted before any product is added.
///
/// # Safety
/// `j` came from [`Job::passes`] for `M` rows; `b < j.nb`, `k < xpb`.
#[inline]
pub(super) unsafe fn offset_sums<const M: usize>(j: &Job, b: usize, xpb: usize, k: usize) -> [[int32x4_t; 2]; M] {
    // SAFETY: the caller's bounds on `x`.
    unsafe {
        let mut sum = [[vdupq_n_s32(0); 2]; M];
        for (i, s) in sum.iter_mut().enumerate() {
            let c = vdupq_n_s32((*j.x.add((i * j.nb + b) * xpb + k) as i32).wrapping_neg());
            *s = [c, c];
        }
        sum
    }
}

/// 0x10 in byte `k` of each 32-bit lane where bit `e + k` of the lane's
/// word in `qh` is set (`e` a multiple of 4 below 32): the fifth bits of
/// Q5_0's elements `e..e + 4` of the four rows in `qh`, to OR onto their
/// nibbles.
#[inline]
unsafe fn fifth_bits(qh: uint8x16_t, e: usize) -> uint8x16_t {
    // Byte `e / 8` of each lane's word, copied to the lane's four bytes,
    // then bit `e % 8 + k` of byte `k` tested.
    const LANE_BASE: [u8; 16] = [0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12];
    let s = e % 8;
    let bits = (1u32 << s) | (1 << (s + 9)) | (1 << (s + 18)) | (1 << (s + 27));
    // SAFETY: `LANE_BASE` is 16 bytes; the rest are register operations.
    unsafe {
        let idx = vaddq_u8(vld1q_u8(LANE_BASE.as_ptr()), vdupq_n_u8((e / 8) as u8));
        let spread = vqtbl1q_u8(qh, idx);
        vandq_u8(vtstq_u8(spread, vreinterpretq_u8_u32(vdupq_n_u32(bits))), vdupq_n_u8(0x10))
    }
}

/// Group `L` of a 4-bit block whose quant bytes start at `q` (Q4_1, Q4_0,
/// or with `FIVE` Q5_0, whose fifth bits are the rows' `qh` words): elements
/// `4L..4L + 4` (low nibbles) and `16 + 4L..` (high nibbles) of all eight
/// rows, into each activation row's two integer sums.
///
/// # Safety
/// `q` has the block's 128 quant bytes; the CPU has `dotprod`.
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn nibble_group<const L: usize, const M: usize, const FIVE: bool>(
    q: *const u8,
    qh: [uint8x16_t; 2],
    ys: &[[int8x16_t; 2]; M],
    sum: &mut [[int32x4_t; 2]; M],
) {
    // SAFETY: the 32 bytes of group `L` lie inside the packed block.
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        let w = [vld1q_u8(q.add(32 * L)), vld1q_u8(q.add(32 * L + 16))];
        let mut lo = [vandq_u8(w[0], m4), vandq_u8(w[1], m4)];
        let mut hi = [vshrq_n_u8::<4>(w[0]), vshrq_n_u8::<4>(w[1])];
        if FIVE {
            for h in 0..2 {
                lo[h] = vorrq_u8(lo[h], fifth_bits(qh[h], 4 * L));
                hi[h] = vorrq_u8(hi[h], fifth_bits(qh[h], 16 + 4 * L));
            }
        }
        sdot_rows::<L, M, 2>([vreinterpretq_s8_u8(lo[0]), vreinterpretq_s8_u8(lo[1])], ys, 0, sum);
        sdot_rows::<L, M, 2>([vreinterpretq_s8_u8(hi[0]), vreinterpretq_s8_u8(hi[1])], ys, 1, sum);
    }
}

/// Q4_1×Q8_1 for `M` activation rows: lane `r` of activation `i` runs the
/// reference chain `sumf += (dx * dy) * sumi as f32 + mx * sy`, block by block.
///
/// # Safety
/// `j` came from [`Job::passes`] for `M` rows; the CPU has `dotprod`.
#[target_feature(enable = "dotprod")]
unsafe fn q4_1<const M: usize>(j: &Job) {
    // SAFETY: see `Job` (the operands' bounds); unaligned loads only.
    unsafe {
        let none = [vdupq_n_u8(0); 2];
        for t in 0..j.ntiles {
            let mut acc = [[vdupq_n_f32(0.0); 2]; M];
            for b in 0..j.nb {
                let p = j.tiles.add((t * j.nb + b) * 8 * Q4_1_BYTES);
                let ys = load_acts::<M, 2>(j, b * Q8_1_BYTES + 4);
                let mut sum = [[vdupq_n_s32(0); 2]; M];
                nibble_group::<0, M, false>(p.add(32), none, &ys, &mut sum);
                nibble_group::<1, M, false>(p.add(32), none, &ys, &mut sum);
                nibble_group::<2, M, false>(p.add(32), none, &ys, &mut sum);
                nibble_group::<3, M, false>(p.add(32), none, &ys, &mut sum);
                let dx = widen_f16x8(p);
                let mx = widen_f16x8(p.add(16));
                for (i, (a, s)) in acc.iter_mut().zip(&sum).enumerate() {
                    let k = i * j.nb + b;
                    let dy = vdupq_n_f32(*j.d.add(k));
                    let sy = vdupq_n_f32(f32::from_bits(*j.x.add(k)));
                    for h in 0..2 {
                        let scaled = vmulq_f32(vmulq_f32(dx[h], dy), vcvtq_f32_s32(s[h]));
                        a[h] = vaddq_f32(a[h], vaddq_f32(scaled, vmulq_f32(mx[h], sy)));
                    }
                }
            }
            store(j, t, &acc);
        }
    }
}

/// Adds block `b`'s terms of the reference chain `sumf += sumi as f32 *
/// (dx * dy)` (Q8_0, Q4_0, Q5_0) to each activation row's accumulators,
/// lane by lane: `dx` the weight rows' scales at `p`, `dy` the row's.
///
/// # Safety
/// `p` is a packed block whose first 16 bytes are the eight f16 scales; `j`
/// came from [`Job::passes`] for `M` rows and `b < j.nb`.
#[inline]
unsafe fn add_scaled<const M: usize>(
    j: &Job,
    p: *const u8,
    b: usize,
    sum: &[[int32x4_t; 2]; M],
    acc: &mut [[float32x4_t; 2]; M],
) {
    // SAFETY: the caller's bounds.
    unsafe {
        let dx = widen_f16x8(p);
        for (i, (a, s)) in acc.iter_mut().zip(sum).enumerate() {
            let dy = vdupq_n_f32(*j.d.add(i * j.nb + b));
            for h in 0..2 {
                a[h] = vaddq_f32(a[h], vmulq_f32(vcvtq_f32_s32(s[h]), vmulq_f32(dx[h], dy)));
            }
        }
    }
}

/// Group `4H + L` of a Q8_0 packed block at `p`: elements `4(4H + L)..+4`
/// of all eight rows (XORed back to signed), into each activation row's two
/// integer sums.
///
/// # Safety
/// `p` is a packed Q8_0 block; the CPU has `dotprod`.
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn q8_0_group<const H: usize, const L: usize, const M: usize>(
    p: *const u8,
    ys: &[[int8x16_t; 2]; M],
    sum: &mut [[int32x4_t; 2]; M],
) {
    // SAFETY: the 32 bytes of group `4H + L` lie inside the packed block.
    unsafe {
        let at = 16 + 32 * (4 * H + L);
        let sign = vdupq_n_u8(0x80);
        let w = [
            vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p.add(at)), sign)),
            vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p.add(at + 16)), sign)),
        ];
        sdot_rows::<L, M, 2>(w, ys, H, sum);
    }
}

/// Q8_0×Q8_0 for `M` activation rows: lane `r` of activation `i` runs the
/// reference chain `sumf += sumi as f32 * (dx * dy)`, block by block.
///
/// # Safety
/// `j` came from [`Job::passes`] for `M` rows; the CPU has `dotprod`.
#[target_feature(enable = "dotprod")]
unsafe fn q8_0<const M: usize>(j: &Job) {
    // SAFETY: see `Job` (the operands' bounds); unaligned loads only.
    unsafe {
        for t in 0..j.ntiles {
            let mut acc = [[vdupq_n_f32(0.0); 2]; M];
            for b in 0..j.nb {
                let p = j.tiles.add((t * j.nb + b) * 8 * Q8_0_BYTES);
                let ys = load_acts::<M, 2>(j, b * Q8_0_BYTES + 2);
                let mut sum = [[vdupq_n_s32(0); 2]; M];
                q8_0_group::<0, 0, M>(p, &ys, &mut sum);
                q8_0_group::<0, 1, M>(p, &ys, &mut sum);
                q8_0_group::<0, 2, M>(p, &ys, &mut sum);
                q8_0_group::<0, 3, M>(p, &ys, &mut sum);
                q8_0_group::<1, 0, M>(p, &ys, &mut sum);
                q8_0_group::<1, 1, M>(p, &ys, &mut sum);
                q8_0_group::<1, 2, M>(p, &ys, &mut sum);
                q8_0_group::<1, 3, M>(p, &ys, &mut sum);
                add_scaled(j, p, b, &sum, &mut acc);
            }
            store(j, t, &acc);
        }
    }
}

/// Q4_0×Q8_0 for `M` activation rows.
///
/// # Safety
/// As for [`q8_0`], for Q4_0 tiles.
#[target_feature(enable = "dotprod")]
unsafe fn q4_0<const M: usize>(j: &Job) {
    // SAFETY: the caller's contract, for Q4_0 tiles.
    unsafe { offset_nibbles::<M, false>(j) }
}

/// Q5_0×Q8_0 for `M` activation rows.
///
/// # Safety
/// As for [`q8_0`], for Q5_0 tiles.
#[target_feature(enable = "dotprod")]
unsafe fn q5_0<const M: usize>(j: &Job) {
    // SAFETY: the caller's contract, for Q5_0 tiles.
    unsafe { offset_nibbles::<M, true>(j) }
}

/// Q4_0×Q8_0, or Q5_0×Q8_0 with `FIVE`: the block sum `Σ (q - 8) y` is
/// computed as `- 8 Σ y + Σ q y` (Q5_0: `- 16 Σ y`, with 5-bit `q`), exact
/// in i32 (at most 32 · 31 · 128 plus 16 · 4096); then lane `r` runs
/// `sumf += sumi as f32 * (dx * dy)`, block by block.
///
/// # Safety
/// `j` came from [`Job::passes`] for `M` rows of the type `FIVE` names; the
/// CPU has `dotprod`.
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn offset_nibbles<const M: usize, const FIVE: bool>(j: &Job) {
    // SAFETY: see `Job` (the operands' bounds); unaligned loads only.
    unsafe {
        let (tbb, qs) = if FIVE { (8 * Q5_0_BYTES, 48) } else { (8 * Q4_0_BYTES, 16) };
        for t in 0..j.ntiles {
            let mut acc = [[vdupq_n_f32(0.0); 2]; M];
            for b in 0..j.nb {
                let p = j.tiles.add((t * j.nb + b) * tbb);
                let ys = load_acts::<M, 2>(j, b * Q8_0_BYTES + 2);
                let mut sum = offset_sums::<M>(j, b, 1, 0);
                // Rows 0..4 and 4..8: each row's `qh` word (Q5_0).
                let qh = if FIVE { [vld1q_u8(p.add(16)), vld1q_u8(p.add(32))] } else { [vdupq_n_u8(0); 2] };
                nibble_group::<0, M, FIVE>(p.add(qs), qh, &ys, &mut sum);
                nibble_group::<1, M, FIVE>(p.add(qs), qh, &ys, &mut sum);
                nibble_group::<2, M, FIVE>(p.add(qs), qh, &ys, &mut sum);
                nibble_group::<3, M, FIVE>(p.add(qs), qh, &ys, &mut sum);
                add_scaled(j, p, b, &sum, &mut acc);
            }
            store(j, t, &acc);
        }
    }
}

/// Writes tile `t`'s sums for the pass's `M` activation rows.
///
/// # Safety
/// `out[t * out_stride + i * row_stride]` is in bounds for `i < M` (see [`Job`]).
#[inline]
pub(super) unsafe fn store<const M: usize>(j: &Job, t: usize, acc: &[[float32x4_t; 2]; M]) {
    // SAFETY: the caller guarantees the output rows.
    unsafe {
        for (i, a) in acc.iter().enumerate() {
            let o = (*j.out.add(t * j.out_stride + i * j.row_stride)).as_mut_ptr();
            vst1q_f32(o, a[0]);
            vst1q_f32(o.add(4), a[1]);
        }
    }
}
