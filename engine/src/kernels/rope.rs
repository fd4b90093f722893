//! Rotary position embeddings.

use crate::config::RopeStyle;

/// Fills `table` with `(cos, sin)` of each rotation angle at `position`,
/// one per pair of a head's `head_dim` elements (`table.len()` pairs). A
/// stage fills one table per row and call and every layer reuses it: its
/// sines and cosines cost more than the rotations.
///
/// The angle for pair `i` is `position · base^(-2i/d)`, built by repeated
/// multiplication in f32 as ggml does, so angles match llama.cpp's.
#[allow(clippy::cast_precision_loss)]
pub fn angles(table: &mut [(f32, f32)], head_dim: usize, position: usize, theta_base: f32) {
    let scale = theta_base.powf(-2.0 / head_dim as f32);
    let mut theta = position as f32;
    for t in table.iter_mut() {
        *t = (theta.cos(), theta.sin());
        theta *= scale;
    }
}

/// Rotates every head of a query row and a key row in place by the angles
/// of `table` (from [`angles`], `head_dim / 2` pairs). Either row may be
/// empty.
pub fn rotate(q: &mut [f32], k: &mut [f32], head_dim: usize, table: &[(f32, f32)], style: RopeStyle) {
    let half = head_dim / 2;
    debug_assert_eq!(table.len(), half);
    for head in q.chunks_exact_mut(head_dim).chain(k.chunks_exact_mut(head_dim)) {
        for (i, &(cos, sin)) in table.iter().enumerate() {
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::HalfSplit => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos - x1 * sin;
            head[b] = x0 * sin + x1 * cos;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        let orig: Vec<f32> = (0..16).map(|i| i as f32 * 0.1).collect();
        let at = |position| {
            let mut table = [(0.0, 0.0); 4];
            angles(&mut table, 8, position, 10_000.0);
            table
        };
        let mut row = orig.clone();
        rotate(&mut row, &mut [], 8, &at(0), RopeStyle::Interleaved);
        assert_eq!(row, orig);
        for style in [RopeStyle::Interleaved, RopeStyle::HalfSplit] {
            let mut row = orig.clone();
            rotate(&mut [], &mut row, 8, &at(17), style);
            let n0: f32 = orig[..8].iter().map(|v| v * v).sum();
            let n1: f32 = row[..8].iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-4);
        }
    }
}
