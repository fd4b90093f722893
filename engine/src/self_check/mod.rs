//! How closely a device's kernels agree with the native CPU ones: the
//! measurements behind `potluck selftest`, which an operator runs once on a
//! new GPU (or build) before trusting it with a stage.
//!
//! Native is the reference because it is the engine's bit-exact,
//! batch-invariant path and matches llama.cpp's perplexity; a device is
//! judged by how far it strays from it, per quantized matmul type and batch
//! size ([`matmul`]), and over a real model's layers ([`stage`]).

pub mod matmul;
pub mod stage;

use serde::Serialize;

/// How close two equally shaped outputs are.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Agreement {
    /// The lowest cosine similarity of any row pair (1 = same direction).
    pub min_cosine: f64,
    /// The largest absolute difference of any element.
    pub max_abs: f32,
    /// `max_abs` over the largest reference magnitude: a relative error that
    /// an output near zero cannot inflate.
    pub max_rel: f32,
}

impl Agreement {
    /// Compares `got` with `reference`, both `rows × width` row-major.
    pub fn of(reference: &[f32], got: &[f32], width: usize) -> Self {
        let width = width.max(1);
        let min_cosine =
            reference.chunks(width).zip(got.chunks(width)).map(|(a, b)| cosine(a, b)).fold(1.0f64, f64::min);
        let max_abs = reference.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let scale = reference.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let max_rel = if scale > 0.0 { max_abs / scale } else { max_abs };
        let len_differs = reference.len() != got.len();
        Self {
            min_cosine: if len_differs { f64::NAN } else { min_cosine },
            max_abs: if len_differs { f32::INFINITY } else { max_abs },
            max_rel: if len_differs { f32::INFINITY } else { max_rel },
        }
    }
}

/// Cosine similarity of two rows (1 for two zero rows, NaN if one holds a NaN).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let (na, nb) = (norm(a), norm(b));
    if na == 0.0 && nb == 0.0 {
        1.0
    } else {
        dot / (na * nb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_measures_direction_and_distance() {
        let a = [1.0, 2.0, 3.0, -4.0];
        let same = Agreement::of(&a, &a, 2);
        assert!((same.min_cosine - 1.0).abs() < 1e-12, "{same:?}");
        assert_eq!((same.max_abs, same.max_rel), (0.0, 0.0));
        let b = [1.0, 2.0, 3.0, -3.0];
        let g = Agreement::of(&a, &b, 2);
        assert!(g.min_cosine < 1.0 && g.min_cosine > 0.9, "{g:?}");
        assert_eq!((g.max_abs, g.max_rel), (1.0, 0.25));
        let short = Agreement::of(&a, &b[..3], 2);
        assert!(short.min_cosine.is_nan() && short.max_abs.is_infinite(), "{short:?}");
        assert_eq!(cosine(&[0.0, 0.0], &[0.0, 0.0]), 1.0);
    }
}
