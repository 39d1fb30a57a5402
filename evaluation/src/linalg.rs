//! The little linear algebra evaluation needs, without BLAS or LAPACK: standardization,
//! log-normalized expression, a symmetric eigensolver and PCA.

use dataloader::csr::CsrRows;
use ndarray::{s, Array1, Array2, ArrayView2, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Per-feature mean and standard deviation fitted on training rows, applied to any rows.
#[derive(Debug, Clone)]
pub struct Standardizer {
    mean: Array1<f64>,
    scale: Array1<f64>,
}

impl Standardizer {
    /// Fits on `x`; constant features get scale 1 (as scikit-learn's `StandardScaler`).
    pub fn fit(x: &ArrayView2<f64>) -> Standardizer {
        let mean = x.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(x.ncols()));
        let var = x.var_axis(Axis(0), 0.0);
        let scale = var.mapv(|v| if v > 1e-24 { v.sqrt() } else { 1.0 });
        Standardizer { mean, scale }
    }

    pub fn apply(&self, x: &ArrayView2<f64>) -> Array2<f64> {
        (x - &self.mean) / &self.scale
    }
}

/// `log1p(counts / total × 10⁴)` as a dense matrix (the usual scanpy normalization).
pub fn log_normalized(rows: &CsrRows, n_genes: usize) -> Array2<f64> {
    let mut x = Array2::<f64>::zeros((rows.n_rows(), n_genes));
    for i in 0..rows.n_rows() {
        let (idx, val) = rows.row(i);
        let total: f64 = val.iter().map(|&v| v as f64).sum();
        if total <= 0.0 {
            continue;
        }
        for (&g, &v) in idx.iter().zip(val) {
            x[[i, g as usize]] = common::norm::log1p_cp10k(v as f64, total);
        }
    }
    x
}

/// Two per-cell quality features: log1p of total counts and of genes detected.
pub fn qc_features(rows: &CsrRows) -> Array2<f64> {
    let mut x = Array2::<f64>::zeros((rows.n_rows(), 2));
    for i in 0..rows.n_rows() {
        let (_, val) = rows.row(i);
        x[[i, 0]] = val.iter().map(|&v| v as f64).sum::<f64>().ln_1p();
        x[[i, 1]] = (val.iter().filter(|&&v| v != 0.0).count() as f64).ln_1p();
    }
    x
}

/// Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix, by cyclic
/// Jacobi rotations (Golub & Van Loan §8.5): slow for large n, exact to rounding.
pub fn symmetric_eigen(a: &Array2<f64>) -> (Array1<f64>, Array2<f64>) {
    let n = a.nrows();
    let mut a = a.clone();
    let mut v = Array2::<f64>::eye(n);
    for _sweep in 0..100 {
        let off: f64 = (0..n).flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| a[[i, j]].powi(2)).sum();
        let diag: f64 = (0..n).map(|i| a[[i, i]].powi(2)).sum();
        if off <= 1e-30 * diag.max(1e-300) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[[p, q]];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[[q, q]] - a[[p, p]]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[[k, p]], a[[k, q]]);
                    a[[k, p]] = c * akp - s * akq;
                    a[[k, q]] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[[p, k]], a[[q, k]]);
                    a[[p, k]] = c * apk - s * aqk;
                    a[[q, k]] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[[k, p]], v[[k, q]]);
                    v[[k, p]] = c * vkp - s * vkq;
                    v[[k, q]] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[[j, j]].total_cmp(&a[[i, i]]));
    let values = Array1::from_iter(order.iter().map(|&i| a[[i, i]]));
    let mut vectors = Array2::<f64>::zeros((n, n));
    for (c, &i) in order.iter().enumerate() {
        vectors.column_mut(c).assign(&v.column(i));
    }
    (values, vectors)
}

/// A fitted PCA.
#[derive(Debug, Clone)]
pub struct Pca {
    pub mean: Array1<f64>,
    /// `d × k`, orthonormal columns, sign fixed so each column's largest entry is positive.
    pub components: Array2<f64>,
    /// Share of the total variance each component explains.
    pub explained_variance_ratio: Array1<f64>,
}

/// Features up to which PCA diagonalizes the covariance exactly; above, it uses randomized
/// subspace iteration (Halko, Martinsson & Tropp 2011) with oversampling and power steps.
const EXACT_MAX_DIM: usize = 200;

impl Pca {
    /// Fits `k` components (fewer if the data has fewer dimensions).
    pub fn fit(x: &ArrayView2<f64>, k: usize, seed: u64) -> Pca {
        let (n, d) = x.dim();
        let k = k.min(d).min(n.max(1));
        let mean = x.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(d));
        let xc = x - &mean;
        let total_var: f64 = xc.iter().map(|v| v * v).sum::<f64>();
        let (values, mut components) = if d <= EXACT_MAX_DIM {
            let (vals, vecs) = symmetric_eigen(&xc.t().dot(&xc));
            (vals.slice(s![..k]).to_owned(), vecs.slice(s![.., ..k]).to_owned())
        } else {
            randomized_top(&xc, k, seed)
        };
        for mut c in components.columns_mut() {
            let big = c.iter().copied().fold(0.0f64, |m, v| if v.abs() > m.abs() { v } else { m });
            if big < 0.0 {
                c.mapv_inplace(|v| -v);
            }
        }
        let explained_variance_ratio = values.mapv(|v| if total_var > 0.0 { v.max(0.0) / total_var } else { 0.0 });
        Pca { mean, components, explained_variance_ratio }
    }

    /// Coordinates of `x` on the components.
    pub fn transform(&self, x: &ArrayView2<f64>) -> Array2<f64> {
        (x - &self.mean).dot(&self.components)
    }
}

/// Top-`k` eigenpairs of `xcᵀ xc` through a rank-(k+10) range finder with 7 power steps.
fn randomized_top(xc: &Array2<f64>, k: usize, seed: u64) -> (Array1<f64>, Array2<f64>) {
    let d = xc.ncols();
    let l = (k + 10).min(d);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let omega = Array2::from_shape_fn((d, l), |_| StandardNormal.sample(&mut rng));
    let mut q = orthonormalize(xc.dot(&omega));
    for _ in 0..7 {
        let z = orthonormalize(xc.t().dot(&q));
        q = orthonormalize(xc.dot(&z));
    }
    let b = q.t().dot(xc); // l × d
    let (vals, u) = symmetric_eigen(&b.dot(&b.t()));
    let mut comps = Array2::<f64>::zeros((d, k));
    for j in 0..k {
        let sigma = vals[j].max(0.0).sqrt();
        if sigma > 0.0 {
            let v = b.t().dot(&u.column(j)) / sigma;
            comps.column_mut(j).assign(&v);
        }
    }
    (vals.slice(s![..k]).to_owned(), comps)
}

/// Orthonormal columns spanning `a`'s columns (modified Gram–Schmidt, twice for stability).
fn orthonormalize(mut a: Array2<f64>) -> Array2<f64> {
    for _ in 0..2 {
        for j in 0..a.ncols() {
            for i in 0..j {
                let proj = a.column(i).dot(&a.column(j));
                let ci = a.column(i).to_owned();
                a.column_mut(j).scaled_add(-proj, &ci);
            }
            let norm = a.column(j).dot(&a.column(j)).sqrt();
            if norm > 1e-300 {
                a.column_mut(j).mapv_inplace(|v| v / norm);
            }
        }
    }
    a
}

/// Rows scaled to unit length (zero rows stay zero), for cosine similarity by dot product.
pub fn unit_rows(x: &ArrayView2<f64>) -> Array2<f64> {
    let mut out = x.to_owned();
    for mut r in out.rows_mut() {
        let n = r.dot(&r).sqrt();
        if n > 0.0 {
            r.mapv_inplace(|v| v / n);
        }
    }
    out
}

/// Participation ratio of the covariance spectrum, (Σλ)² / Σλ²: how many directions the
/// representation really uses (d for isotropic data, 1 for data on a line). A cell vector that
/// uses 3 of its 32 dimensions puts the noise within a type on a thin sheet, which a kNN graph
/// cuts into several communities even where a linear probe separates the types. Over at most
/// `max_rows` evenly spaced rows; `None` above `max_dims` columns (the d × d covariance of an
/// all-genes baseline would cost more than the rest of the evaluation).
pub fn participation_ratio(x: &ArrayView2<f64>, max_rows: usize, max_dims: usize) -> Option<f64> {
    if x.ncols() > max_dims {
        return None;
    }
    let step = x.nrows().div_ceil(max_rows.max(1)).max(1);
    let rows = x.slice(s![..;step, ..]);
    let n = rows.nrows();
    if n < 2 {
        return None;
    }
    let xc = &rows - &rows.mean_axis(Axis(0))?;
    let cov = xc.t().dot(&xc) / (n - 1) as f64;
    let trace: f64 = cov.diag().sum();
    let frobenius: f64 = cov.iter().map(|v| v * v).sum();
    (frobenius > 0.0).then(|| trace * trace / frobenius)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn participation_ratio_counts_the_directions_in_use() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let white = Array2::from_shape_fn((20_000, 6), |_| StandardNormal.sample(&mut rng));
        let pr = |x: &Array2<f64>| participation_ratio(&x.view(), 100_000, 64).unwrap();
        assert!((pr(&white) - 6.0).abs() < 0.1);
        let line = Array2::from_shape_fn((100, 6), |(i, j)| i as f64 * (j + 1) as f64);
        assert!((pr(&line) - 1.0).abs() < 1e-9);
        // Every 4th row of white noise is still white; too many columns are not measured.
        assert!((participation_ratio(&white.view(), 5_000, 64).unwrap() - 6.0).abs() < 0.3);
        assert_eq!(participation_ratio(&white.view(), 5_000, 5), None);
    }

    fn random(n: usize, d: usize, seed: u64) -> Array2<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Decaying column scales give a spectrum with clear gaps.
        Array2::from_shape_fn((n, d), |(_, j)| {
            let z: f64 = StandardNormal.sample(&mut rng);
            z * (1.0 + 10.0 / (1.0 + j as f64))
        })
    }

    #[test]
    fn jacobi_diagonalizes_a_known_matrix() {
        let a = ndarray::array![[2.0, 1.0], [1.0, 2.0]];
        let (vals, vecs) = symmetric_eigen(&a);
        assert!((vals[0] - 3.0).abs() < 1e-12 && (vals[1] - 1.0).abs() < 1e-12);
        let back = vecs.dot(&Array2::from_diag(&vals)).dot(&vecs.t());
        assert!((back - a).iter().all(|v| v.abs() < 1e-12));
    }

    #[test]
    fn randomized_and_exact_pca_agree_up_to_sign() {
        let x = random(300, 250, 1);
        let k = 5;
        let randomized = Pca::fit(&x.view(), k, 0);
        let xc = &x - &x.mean_axis(Axis(0)).unwrap();
        let (_, exact) = symmetric_eigen(&xc.t().dot(&xc));
        for j in 0..k {
            let cos = randomized.components.column(j).dot(&exact.column(j)).abs();
            assert!(cos > 0.999, "component {j}: |cos| = {cos}");
        }
        let ratios = &randomized.explained_variance_ratio;
        assert!(ratios.windows(2).into_iter().all(|w| w[0] >= w[1]));
    }

    #[test]
    fn standardized_training_columns_have_zero_mean_unit_variance() {
        let x = random(50, 3, 2);
        let z = Standardizer::fit(&x.view()).apply(&x.view());
        for c in z.columns() {
            assert!(c.mean().unwrap().abs() < 1e-12);
            assert!((c.var(0.0) - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn log_normalization_matches_the_formula() {
        let mut rows = CsrRows::new();
        rows.push_row(&[0, 2], &[1.0, 3.0]);
        let x = log_normalized(&rows, 3);
        assert!((x[[0, 0]] - (2500.0f64).ln_1p()).abs() < 1e-9);
        assert_eq!(x[[0, 1]], 0.0);
        let qc = qc_features(&rows);
        assert!((qc[[0, 0]] - 4f64.ln_1p()).abs() < 1e-12 && (qc[[0, 1]] - 2f64.ln_1p()).abs() < 1e-12);
    }
}
