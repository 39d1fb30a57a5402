//! How much of a representation is sequencing depth: the cross-validated R² of log total
//! counts and of log genes detected, regressed linearly on it.
//!
//! Depth is the largest unwanted source of variance in single-cell data, and the zero pattern
//! that log-normalization leaves grows with it, so an embedding can score well on a probe while
//! mostly encoding depth. None of the usual reports says so; this diagnostic does.

use ndarray::{Array1, Array2, ArrayView2, Axis};
use serde::Serialize;

use crate::linalg::{symmetric_eigen, Standardizer};

/// Folds of the cross-validation.
const FOLDS: usize = 5;
/// Ridge penalties tried on standardized features, per training cell. Each outer fold keeps
/// the one with the least leave-one-out error on its own training cells, so the diagnostic
/// is a regression tuned to predict depth, never a fixed shrinkage that would hide it, and
/// with as many dimensions as cells (PCA(50) of a few hundred cells) it does not report the
/// large negative R² of an interpolating fit.
const PENALTIES: [f64; 6] = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0];

/// R² of the two depth measures on one representation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DepthR2 {
    pub log_total_counts: f64,
    pub log_genes_detected: f64,
}

/// `qc` holds log total counts and log genes detected per cell (`linalg::qc_features`).
pub fn depth_r2(x: &ArrayView2<f64>, qc: &Array2<f64>) -> DepthR2 {
    let r2 = cv_r2(x, qc);
    DepthR2 { log_total_counts: r2[0], log_genes_detected: r2[1] }
}

/// Out-of-fold R² of a ridge regression of each column of `ys` on `x` (folds by row index
/// modulo `FOLDS`; standardization, eigenbasis and each column's penalty fitted on each
/// training part).
pub fn cv_r2(x: &ArrayView2<f64>, ys: &Array2<f64>) -> Vec<f64> {
    let n = x.nrows();
    if n < 2 * FOLDS {
        return vec![f64::NAN; ys.ncols()];
    }
    let mut pred = Array2::<f64>::zeros(ys.raw_dim());
    for f in 0..FOLDS {
        let train: Vec<usize> = (0..n).filter(|i| i % FOLDS != f).collect();
        let test: Vec<usize> = (0..n).filter(|i| i % FOLDS == f).collect();
        let xt = x.select(Axis(0), &train);
        let s = Standardizer::fit(&xt.view());
        let ridge = Ridge::fit(&s.apply(&xt.view()));
        let x_test = s.apply(&x.select(Axis(0), &test).view());
        for (c, y) in ys.columns().into_iter().enumerate() {
            let y_mean = train.iter().map(|&i| y[i]).sum::<f64>() / train.len() as f64;
            let yt: Array1<f64> = train.iter().map(|&i| y[i] - y_mean).collect();
            let p = x_test.dot(&ridge.best_by_leave_one_out(&yt)) + y_mean;
            for (k, &i) in test.iter().enumerate() {
                pred[[i, c]] = p[k];
            }
        }
    }
    ys.columns().into_iter().zip(pred.columns()).map(|(y, p)| {
        let mean = y.mean().unwrap_or(0.0);
        let ss_tot: f64 = y.iter().map(|v| (v - mean).powi(2)).sum();
        let ss_res: f64 = y.iter().zip(p).map(|(v, p)| (v - p).powi(2)).sum();
        if ss_tot <= 0.0 { f64::NAN } else { 1.0 - ss_res / ss_tot }
    }).collect()
}

/// A ridge regression in the eigenbasis of AᵀA = V Λ Vᵀ: every target's and penalty's
/// coefficients and exact leave-one-out residuals cost one projection, not one solve each.
struct Ridge {
    values: Array1<f64>,
    vectors: Array2<f64>,
    /// A V: the training rows in the eigenbasis.
    projected: Array2<f64>,
    /// (A V)²: each row's leverage terms, shared by every target and penalty.
    squared: Array2<f64>,
}

impl Ridge {
    fn fit(a: &Array2<f64>) -> Ridge {
        let (values, vectors) = symmetric_eigen(&a.t().dot(a));
        let projected = a.dot(&vectors);
        let squared = projected.mapv(|p| p * p);
        Ridge { values: values.mapv(|v| v.max(0.0)), vectors, projected, squared }
    }

    /// The coefficients for the centred target `y`, at the penalty (from `PENALTIES`) with
    /// the least leave-one-out squared error e_i / (1 − h_ii), h_ii = 1/n + Σ_k (A V)²_ik /
    /// (λ_k + penalty): the hat matrix of the centred design plus its unpenalized intercept,
    /// as scikit-learn's `RidgeCV` computes it.
    fn best_by_leave_one_out(&self, y: &Array1<f64>) -> Array1<f64> {
        let n = y.len() as f64;
        let target = self.projected.t().dot(y);
        let press = |penalty: f64| -> f64 {
            let inv = self.values.mapv(|v| 1.0 / (v + penalty));
            let fitted = self.projected.dot(&(&target * &inv));
            let leverage = self.squared.dot(&inv) + 1.0 / n;
            (0..y.len()).map(|i| ((y[i] - fitted[i]) / (1.0 - leverage[i]).max(1e-12)).powi(2)).sum()
        };
        let (_, penalty) = PENALTIES.iter().map(|&p| (p * n).max(1e-9)).map(|p| (press(p), p)).fold((f64::INFINITY, 1e-9), |best, c| if c.0 < best.0 { c } else { best });
        self.vectors.dot(&(&target / &self.values.mapv(|v| v + penalty)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn column(y: Array1<f64>) -> Array2<f64> {
        y.insert_axis(Axis(1))
    }

    #[test]
    fn r2_is_one_for_a_linear_target_and_near_zero_for_noise() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let n = 400;
        let x = Array2::from_shape_fn((n, 5), |_| rng.random::<f64>());
        let linear: Array1<f64> = x.rows().into_iter().map(|r| 2.0 * r[0] - r[3] + 0.5).collect();
        assert!(cv_r2(&x.view(), &column(linear))[0] > 0.999);
        let noise: Array1<f64> = (0..n).map(|_| rng.random::<f64>()).collect();
        let r = cv_r2(&x.view(), &column(noise))[0];
        assert!(r < 0.05, "{r}");
    }

    /// With about as many dimensions as training cells a barely penalized fit interpolates the
    /// noise and predicts held-out cells worse than their mean (R² far below 0); the penalty
    /// chosen by leave-one-out recovers the one informative dimension.
    #[test]
    fn a_penalty_chosen_by_leave_one_out_survives_as_many_dimensions_as_cells() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let (n, d) = (60, 44);
        let x = Array2::from_shape_fn((n, d), |_| rng.random::<f64>() - 0.5);
        let y: Array1<f64> = x.rows().into_iter().map(|r| 4.0 * r[0] + 2.0 * (rng.random::<f64>() - 0.5)).collect();
        let r = cv_r2(&x.view(), &column(y))[0];
        assert!(r > 0.1, "R² {r}: the regression fitted the noise of {d} dimensions");
    }
}
