//! Rotary position embeddings.

use crate::config::RopeStyle;

/// Rotates every head of a query row and a key row in place for
/// `position`, sharing one table of angles (its sines and cosines cost more
/// than the rotations). Either row may be empty.
///
/// The angle for pair `i` is `position · base^(-2i/d)`, built by repeated
/// multiplication in f32 as ggml does, so angles match llama.cpp's.
#[allow(clippy::cast_precision_loss)]
pub fn rotate_pair(q: &mut [f32], k: &mut [f32], head_dim: usize, position: usize, theta_base: f32, style: RopeStyle) {
    let half = head_dim / 2;
    let scale = theta_base.powf(-2.0 / head_dim as f32);
    let mut theta = position as f32;
    let mut table = [(0.0f32, 0.0f32); 256];
    let table = &mut table[..half.min(256)];
    for t in table.iter_mut() {
        *t = (theta.cos(), theta.sin());
        theta *= scale;
    }
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
        let mut row = orig.clone();
        rotate_pair(&mut row, &mut [], 8, 0, 10_000.0, RopeStyle::Interleaved);
        assert_eq!(row, orig);
        for style in [RopeStyle::Interleaved, RopeStyle::HalfSplit] {
            let mut row = orig.clone();
            rotate_pair(&mut [], &mut row, 8, 17, 10_000.0, style);
            let n0: f32 = orig[..8].iter().map(|v| v * v).sum();
            let n1: f32 = row[..8].iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-4);
        }
    }
}
