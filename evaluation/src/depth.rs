//! How much of a representation is sequencing depth: the cross-validated R² of log total
//! counts and of log genes detected, regressed linearly on it.
//!
//! Depth is the largest unwanted source of variance in single-cell data, and the zero pattern
//! that log-normalization leaves grows with it, so an embedding can score well on a probe while
//! mostly encoding depth. None of the usual reports says so; this diagnostic does.

use ndarray::{Array1, Array2, ArrayView2, Axis};
use serde::Serialize;

use crate::linalg::Standardizer;

/// Folds of the cross-validation.
const FOLDS: usize = 5;
/// Ridge penalty on standardized features, per training cell (tiny: a guard against
/// collinear columns, not a shrinkage that would hide depth).
const RIDGE: f64 = 1e-3;

/// R² of the two depth measures on one representation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DepthR2 {
    pub log_total_counts: f64,
    pub log_genes_detected: f64,
}

/// `qc` holds log total counts and log genes detected per cell (`linalg::qc_features`).
pub fn depth_r2(x: &ArrayView2<f64>, qc: &Array2<f64>) -> DepthR2 {
    DepthR2 { log_total_counts: cv_r2(x, &qc.column(0).to_owned()), log_genes_detected: cv_r2(x, &qc.column(1).to_owned()) }
}

/// Out-of-fold R² of a ridge regression of `y` on `x` (folds by row index modulo `FOLDS`,
/// standardization fitted on each training part).
pub fn cv_r2(x: &ArrayView2<f64>, y: &Array1<f64>) -> f64 {
    let n = x.nrows();
    if n < 2 * FOLDS {
        return f64::NAN;
    }
    let mut pred = Array1::<f64>::zeros(n);
    for f in 0..FOLDS {
        let train: Vec<usize> = (0..n).filter(|i| i % FOLDS != f).collect();
        let test: Vec<usize> = (0..n).filter(|i| i % FOLDS == f).collect();
        let xt = x.select(Axis(0), &train);
        let s = Standardizer::fit(&xt.view());
        let (a, y_mean) = (s.apply(&xt.view()), train.iter().map(|&i| y[i]).sum::<f64>() / train.len() as f64);
        let yt: Array1<f64> = train.iter().map(|&i| y[i] - y_mean).collect();
        let beta = ridge(&a, &yt, RIDGE * train.len() as f64);
        let p = s.apply(&x.select(Axis(0), &test).view()).dot(&beta) + y_mean;
        for (k, &i) in test.iter().enumerate() {
            pred[i] = p[k];
        }
    }
    let mean = y.mean().unwrap_or(0.0);
    let ss_tot: f64 = y.iter().map(|v| (v - mean).powi(2)).sum();
    let ss_res: f64 = y.iter().zip(&pred).map(|(v, p)| (v - p).powi(2)).sum();
    if ss_tot <= 0.0 { f64::NAN } else { 1.0 - ss_res / ss_tot }
}

/// Solves (AᵀA + λI) β = Aᵀy by Cholesky.
fn ridge(a: &Array2<f64>, y: &Array1<f64>, lambda: f64) -> Array1<f64> {
    let mut g = a.t().dot(a);
    let d = g.nrows();
    for i in 0..d {
        g[[i, i]] += lambda.max(1e-9);
    }
    let b = a.t().dot(y);
    // Cholesky G = L Lᵀ, then two triangular solves.
    let mut l = Array2::<f64>::zeros((d, d));
    for i in 0..d {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[[i, k]] * l[[j, k]]).sum();
            if i == j {
                l[[i, i]] = (g[[i, i]] - s).max(1e-12).sqrt();
            } else {
                l[[i, j]] = (g[[i, j]] - s) / l[[j, j]];
            }
        }
    }
    let mut z = Array1::<f64>::zeros(d);
    for i in 0..d {
        z[i] = (b[i] - (0..i).map(|k| l[[i, k]] * z[k]).sum::<f64>()) / l[[i, i]];
    }
    let mut beta = Array1::<f64>::zeros(d);
    for i in (0..d).rev() {
        beta[i] = (z[i] - (i + 1..d).map(|k| l[[k, i]] * beta[k]).sum::<f64>()) / l[[i, i]];
    }
    beta
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn r2_is_one_for_a_linear_target_and_near_zero_for_noise() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let n = 400;
        let x = Array2::from_shape_fn((n, 5), |_| rng.random::<f64>());
        let linear: Array1<f64> = x.rows().into_iter().map(|r| 2.0 * r[0] - r[3] + 0.5).collect();
        assert!(cv_r2(&x.view(), &linear) > 0.999);
        let noise: Array1<f64> = (0..n).map(|_| rng.random::<f64>()).collect();
        let r = cv_r2(&x.view(), &noise);
        assert!(r < 0.05, "{r}");
    }
}
