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

/// Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix: Householder
/// reduction to tridiagonal form, then the implicit QL algorithm (EISPACK's tred2 and tql2,
/// as in JAMA), O(n³) with a small constant: the depth diagnostic's five eigenbases of a
/// 512-dimensional embedding take 7 s here, where cyclic Jacobi rotations took 90.
pub fn symmetric_eigen(a: &Array2<f64>) -> (Array1<f64>, Array2<f64>) {
    let n = a.nrows();
    if n == 0 {
        return (Array1::zeros(0), Array2::zeros((0, 0)));
    }
    // Row-major working copy: v[i * n + j].
    let mut v: Vec<f64> = a.iter().copied().collect();
    let (mut d, mut e) = (vec![0.0; n], vec![0.0; n]);
    tridiagonalize(n, &mut v, &mut d, &mut e);
    // The QL rotations combine two columns at a time: transposed, they are two contiguous rows.
    let mut w: Vec<f64> = (0..n * n).map(|k| v[(k % n) * n + k / n]).collect();
    tridiagonal_ql(n, &mut w, &mut d, &mut e);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| d[j].total_cmp(&d[i]));
    let values = Array1::from_iter(order.iter().map(|&i| d[i]));
    let vectors = Array2::from_shape_fn((n, n), |(r, c)| w[order[c] * n + r]);
    (values, vectors)
}

/// Householder reduction of the symmetric `v` (n × n, row-major) to tridiagonal form: on
/// return `d` is the diagonal, `e[1..]` the sub-diagonal and `v` the accumulated transform.
fn tridiagonalize(n: usize, v: &mut [f64], d: &mut [f64], e: &mut [f64]) {
    let at = |i: usize, j: usize| i * n + j;
    for j in 0..n {
        d[j] = v[at(n - 1, j)];
    }
    for i in (1..n).rev() {
        let scale: f64 = d[..i].iter().map(|x| x.abs()).sum();
        let mut h = 0.0;
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[at(i - 1, j)];
                v[at(i, j)] = 0.0;
                v[at(j, i)] = 0.0;
            }
        } else {
            for k in 0..i {
                d[k] /= scale;
                h += d[k] * d[k];
            }
            let f = d[i - 1];
            let g = if f > 0.0 { -h.sqrt() } else { h.sqrt() };
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            e[..i].iter_mut().for_each(|x| *x = 0.0);
            for j in 0..i {
                let f = d[j];
                v[at(j, i)] = f;
                let mut g = e[j] + v[at(j, j)] * f;
                for k in j + 1..i {
                    g += v[at(k, j)] * d[k];
                    e[k] += v[at(k, j)] * f;
                }
                e[j] = g;
            }
            let mut f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                let (f, g) = (d[j], e[j]);
                for k in j..i {
                    v[at(k, j)] -= f * e[k] + g * d[k];
                }
                d[j] = v[at(i - 1, j)];
                v[at(i, j)] = 0.0;
            }
        }
        d[i] = h;
    }
    // Accumulate the transformations.
    for i in 0..n - 1 {
        v[at(n - 1, i)] = v[at(i, i)];
        v[at(i, i)] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = v[at(k, i + 1)] / h;
            }
            for j in 0..=i {
                let g: f64 = (0..=i).map(|k| v[at(k, i + 1)] * v[at(k, j)]).sum();
                for k in 0..=i {
                    v[at(k, j)] -= g * d[k];
                }
            }
        }
        for k in 0..=i {
            v[at(k, i + 1)] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[at(n - 1, j)];
        v[at(n - 1, j)] = 0.0;
    }
    v[at(n - 1, n - 1)] = 1.0;
    e[0] = 0.0;
}

/// Implicit QL iterations on the tridiagonal (`d`, `e`) from `tridiagonalize`, rotating `w`
/// (the transform, transposed): on return `d` holds the eigenvalues and `w`'s rows the
/// eigenvectors.
fn tridiagonal_ql(n: usize, w: &mut [f64], d: &mut [f64], e: &mut [f64]) {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let (mut f, mut tst1) = (0.0_f64, 0.0_f64);
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            for _iteration in 0..64 {
                let g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for x in &mut d[l + 2..n] {
                    *x -= h;
                }
                f += h;
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0, 1.0, 1.0);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0, 0.0);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    let g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    let (row, next) = w[i * n..(i + 2) * n].split_at_mut(n);
                    for (x, y) in row.iter_mut().zip(next.iter_mut()) {
                        let h = *y;
                        *y = s * *x + c * h;
                        *x = c * *x - s * h;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
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
    fn symmetric_eigen_diagonalizes_known_and_degenerate_matrices() {
        let a = ndarray::array![[2.0, 1.0], [1.0, 2.0]];
        let (vals, vecs) = symmetric_eigen(&a);
        assert!((vals[0] - 3.0).abs() < 1e-12 && (vals[1] - 1.0).abs() < 1e-12);
        let back = vecs.dot(&Array2::from_diag(&vals)).dot(&vecs.t());
        assert!((back - a).iter().all(|v| v.abs() < 1e-12));
        // A rank-10 Gram matrix of 40 dimensions (30 zero eigenvalues), padded with a zero
        // row and column: orthonormal vectors, descending values, exact reconstruction.
        let x = random(10, 40, 3);
        let mut g = Array2::<f64>::zeros((41, 41));
        g.slice_mut(s![..40, ..40]).assign(&x.t().dot(&x));
        let (vals, vecs) = symmetric_eigen(&g);
        assert!(vals.windows(2).into_iter().all(|w| w[0] >= w[1]), "{vals}");
        assert!(vals.iter().skip(10).all(|v| v.abs() < 1e-9 * vals[0]), "{vals}");
        assert!((vecs.t().dot(&vecs) - Array2::<f64>::eye(41)).iter().all(|v| v.abs() < 1e-10));
        let back = vecs.dot(&Array2::from_diag(&vals)).dot(&vecs.t());
        assert!((back - &g).iter().all(|v| v.abs() < 1e-9 * vals[0]));
        assert_eq!(symmetric_eigen(&Array2::zeros((3, 3))).0, Array1::<f64>::zeros(3));
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
