//! Fixed-lane sums: element `i` goes to lane `i % 8`, and the eight lanes
//! are folded by one fixed tree.
//!
//! Every reduction the engine vectorises (dot products, the softmax's sum,
//! RMSNorm's sum of squares, the sampler's total) keeps this order, so a
//! scalar reference and its SIMD forms give the same bits, whatever the
//! batch, the thread or the instruction set.

/// The lanes folded as `((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))`.
#[inline(always)]
pub(crate) fn tree8<T: Copy + std::ops::Add<Output = T>>(l: [T; 8]) -> T {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

/// `Σ term(x)` over `xs` in f64 on eight fixed lanes, then [`tree8`]. The
/// loop vectorises, where one index-order chain would be a dependency per
/// element. Each chunk's eight terms are made as one array before they are
/// added: adding them one by one through a zipped iterator compiled, in
/// the sampler's AVX-512 build, to scalar adds with the lanes spilled.
#[inline(always)]
pub(crate) fn sum8_f64(xs: &[f32], term: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        let terms: [f64; 8] = std::array::from_fn(|j| term(c[j]));
        for (l, t) in lanes.iter_mut().zip(terms) {
            *l += t;
        }
    }
    for (l, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *l += term(v);
    }
    tree8(lanes)
}
