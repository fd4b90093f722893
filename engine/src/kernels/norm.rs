//! RMSNorm, row by row.

/// `x ← x / rms(x) * weight`, each row independently.
///
/// The sum of squares accumulates in f64, like ggml's reference, on eight
/// fixed lanes (element `i` in lane `i % 8`, then one fixed tree), so the
/// result is fixed per row. Each square is exact in f64, and the lanes'
/// rounding is some 10⁻¹⁶ of the sum, far below the f32 the mean is cut to;
/// one index-order chain was a 576-add dependency per row, the longest part
/// of the norm.
#[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (row, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let sum = crate::kernels::lanes::sum8_f64(row, |v| f64::from(v) * f64::from(v));
        let mean = (sum / dim as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = (v * scale) * w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rows() {
        let mut out = [0.0; 4];
        rms_norm(&[3.0, 4.0, 0.0, 0.0], &[1.0, 1.0, 2.0, 2.0], 0.0, &mut out);
        let r = (25.0f32 / 4.0).sqrt();
        assert_eq!(out, [3.0 / r, 4.0 / r, 0.0, 0.0]);
    }
}
