//! Multinomial logistic regression with an L2 penalty, fitted by L-BFGS.
//!
//! Written here because `linfa-logistic` 0.8's solver stops far from the optimum when features
//! outnumber cells: on the fine-tuning baseline's problem (MetaNeighbor, 3,157 standardized genes,
//! 839 training cells, `C` = 1) it ends at an objective of 179 where scikit-learn's lbfgs reaches
//! 10.6, whatever its iteration limit, and scores 0.575 test accuracy against 0.670. With 50
//! features the two agree to the digit, so the embedding probes were not affected.
//!
//! The objective is scikit-learn's: Σᵢ −log p(yᵢ | xᵢ) + ½ α ‖W‖² with α = 1/C, intercepts
//! unpenalized, and its default stopping rule (the largest gradient entry of the mean loss below
//! 10⁻⁴).

use std::collections::VecDeque;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};

/// L-BFGS memory (pairs of steps and gradient changes kept).
const MEMORY: usize = 10;
/// Stop when the largest gradient entry of the *mean* objective is below this (scikit-learn's `tol`).
const GRAD_TOL: f64 = 1e-4;
/// Armijo's sufficient-decrease constant and the most halvings of one line search.
const ARMIJO: f64 = 1e-4;
const MAX_HALVINGS: usize = 40;

/// A fitted model over the classes seen in training.
#[derive(Debug, Clone)]
pub struct Softmax {
    /// `d × k` weights and `k` intercepts; column `j` is class `classes[j]`.
    w: Array2<f64>,
    b: Array1<f64>,
    classes: Vec<usize>,
    n_classes: usize,
    /// Iterations the solver took and whether it met the gradient tolerance.
    pub iterations: usize,
    pub converged: bool,
}

impl Softmax {
    /// Fits on rows `x` with labels `y` (< `n_classes`); a class absent from `y` gets probability 0.
    pub fn fit(x: &ArrayView2<f64>, y: &[usize], n_classes: usize, alpha: f64, max_iter: usize) -> Softmax {
        let mut classes: Vec<usize> = y.to_vec();
        classes.sort_unstable();
        classes.dedup();
        let col: Vec<usize> = y.iter().map(|c| classes.partition_point(|&k| k < *c)).collect();
        let problem = Problem { x: x.view(), col: &col, k: classes.len(), alpha };
        let (theta, iterations, converged) = lbfgs(&problem, max_iter);
        let (d, k) = (x.ncols(), classes.len());
        let w = Array2::from_shape_vec((d, k), theta[..d * k].to_vec()).expect("theta holds d × k weights");
        let b = Array1::from(theta[d * k..].to_vec());
        Softmax { w, b, classes, n_classes, iterations, converged }
    }

    /// Class probabilities, `n × n_classes`.
    pub fn proba(&self, x: &ArrayView2<f64>) -> Array2<f64> {
        let mut h = x.dot(&self.w) + &self.b;
        softmax_rows(&mut h);
        let mut out = Array2::zeros((x.nrows(), self.n_classes));
        for (j, &c) in self.classes.iter().enumerate() {
            out.column_mut(c).assign(&h.column(j));
        }
        out
    }
}

/// The data of one fit: rows, each row's column among the seen classes, penalty.
struct Problem<'a> {
    x: ArrayView2<'a, f64>,
    col: &'a [usize],
    k: usize,
    alpha: f64,
}

impl Problem<'_> {
    fn n_params(&self) -> usize {
        (self.x.ncols() + 1) * self.k
    }

    /// The objective and its gradient at `theta` (weights row-major `d × k`, then intercepts).
    fn value_grad(&self, theta: &[f64]) -> (f64, Vec<f64>) {
        let (d, k) = (self.x.ncols(), self.k);
        let w = ArrayView2::from_shape((d, k), &theta[..d * k]).expect("theta holds d × k weights");
        let b = ArrayView1::from(&theta[d * k..]);
        let mut h = self.x.dot(&w) + b;
        let mut nll = 0.0;
        for (mut row, &c) in h.rows_mut().into_iter().zip(self.col) {
            let lse = log_sum_exp(row.view());
            nll += lse - row[c];
            row.mapv_inplace(|v| (v - lse).exp());
            row[c] -= 1.0;
        }
        let gw = self.x.t().dot(&h) + &(&w * self.alpha);
        let gb = h.sum_axis(Axis(0));
        let value = nll + 0.5 * self.alpha * w.iter().map(|v| v * v).sum::<f64>();
        let mut grad = Vec::with_capacity(self.n_params());
        grad.extend(gw.iter());
        grad.extend(gb.iter());
        (value, grad)
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// The last steps `s`, gradient changes `y` and 1 / (s·y), oldest first.
type Memory = VecDeque<(Vec<f64>, Vec<f64>, f64)>;

/// Minimizes the problem from zero; returns the parameters, iterations and convergence.
fn lbfgs(p: &Problem, max_iter: usize) -> (Vec<f64>, usize, bool) {
    let n = p.x.nrows().max(1) as f64;
    let converged = |g: &[f64]| max_abs(g) / n <= GRAD_TOL;
    let mut theta = vec![0.0; p.n_params()];
    let (mut f, mut g) = p.value_grad(&theta);
    let mut memory = Memory::new();
    for iter in 0..max_iter {
        if converged(&g) {
            return (theta, iter, true);
        }
        let mut dir = two_loop(&g, &memory);
        let mut slope = dot(&g, &dir);
        if slope >= 0.0 {
            // Not a descent direction (stale curvature): restart from steepest descent.
            memory.clear();
            dir = g.iter().map(|v| -v).collect();
            slope = -dot(&g, &g);
        }
        // The first step has no curvature to scale it; keep it to a unit move.
        let mut step = if memory.is_empty() { 1.0 / max_abs(&dir).max(1.0) } else { 1.0 };
        let mut accepted = None;
        for _ in 0..MAX_HALVINGS {
            let trial: Vec<f64> = theta.iter().zip(&dir).map(|(t, d)| t + step * d).collect();
            let (ft, gt) = p.value_grad(&trial);
            if ft.is_finite() && ft <= f + ARMIJO * step * slope {
                accepted = Some((trial, ft, gt));
                break;
            }
            step *= 0.5;
        }
        let Some((trial, ft, gt)) = accepted else {
            return (theta, iter, false);
        };
        let s: Vec<f64> = trial.iter().zip(&theta).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = gt.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-12 * dot(&y, &y).max(f64::MIN_POSITIVE) {
            if memory.len() == MEMORY {
                memory.pop_front();
            }
            memory.push_back((s, y, 1.0 / sy));
        }
        theta = trial;
        f = ft;
        g = gt;
    }
    let done = converged(&g);
    (theta, max_iter, done)
}

/// The L-BFGS direction −H·g from the stored pairs (Nocedal & Wright, algorithm 7.4).
fn two_loop(g: &[f64], memory: &Memory) -> Vec<f64> {
    let mut q = g.to_vec();
    let mut a = Vec::with_capacity(memory.len());
    for (s, y, rho) in memory.iter().rev() {
        let ai = rho * dot(s, &q);
        q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= ai * yi);
        a.push(ai);
    }
    if let Some((s, y, _)) = memory.back() {
        let gamma = dot(s, y) / dot(y, y);
        q.iter_mut().for_each(|v| *v *= gamma);
    }
    for ((s, y, rho), ai) in memory.iter().zip(a.iter().rev()) {
        let bi = rho * dot(y, &q);
        q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (ai - bi) * si);
    }
    q.iter_mut().for_each(|v| *v = -*v);
    q
}

/// log Σ exp(v), shifted by the maximum so that no term overflows.
fn log_sum_exp(row: ArrayView1<f64>) -> f64 {
    let m = row.fold(f64::NEG_INFINITY, |a, &v| a.max(v));
    m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
}

/// Row-wise softmax in place.
fn softmax_rows(h: &mut Array2<f64>) {
    for mut row in h.rows_mut() {
        let lse = log_sum_exp(row.view());
        row.mapv_inplace(|v| (v - lse).exp());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// More features than rows, four classes: the solver must reach the optimum (a zero
    /// gradient of the mean objective), where linfa-logistic stopped at a far higher objective.
    #[test]
    fn reaches_the_optimum_with_more_features_than_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (n, d, k) = (60, 300, 4);
        let y: Vec<usize> = (0..n).map(|i| i % k).collect();
        let x = Array2::from_shape_fn((n, d), |(i, j)| rng.random::<f64>() - 0.5 + if j % k == y[i] && j < 20 { 0.3 } else { 0.0 });
        let m = Softmax::fit(&x.view(), &y, k, 1.0, 1000);
        assert!(m.converged, "stopped after {} iterations without converging", m.iterations);
        let p = Problem { x: x.view(), col: &y, k, alpha: 1.0 };
        let mut theta: Vec<f64> = m.w.iter().copied().collect();
        theta.extend(m.b.iter());
        let (_, g) = p.value_grad(&theta);
        assert!(max_abs(&g) / n as f64 <= GRAD_TOL);
        let correct = m.proba(&x.view()).rows().into_iter().zip(&y).filter(|(r, &c)| r.iter().enumerate().all(|(j, &v)| j == c || v < r[c])).count();
        assert_eq!(correct, n, "a weakly penalized model with d > n fits its training rows");
    }

    /// The gradient is that of the objective (central differences).
    #[test]
    fn gradient_matches_finite_differences() {
        let x = Array2::from_shape_vec((3, 2), vec![1.0, -0.5, 0.2, 0.3, -1.0, 2.0]).unwrap();
        let col = [0, 2, 1];
        let p = Problem { x: x.view(), col: &col, k: 3, alpha: 0.7 };
        let theta: Vec<f64> = (0..p.n_params()).map(|i| 0.1 * i as f64 - 0.3).collect();
        let (_, g) = p.value_grad(&theta);
        for i in 0..theta.len() {
            let (mut up, mut down) = (theta.clone(), theta.clone());
            up[i] += 1e-6;
            down[i] -= 1e-6;
            let fd = (p.value_grad(&up).0 - p.value_grad(&down).0) / 2e-6;
            assert!((fd - g[i]).abs() < 1e-6, "parameter {i}: {fd} vs {}", g[i]);
        }
    }

    /// Classes absent from training get probability 0; rows sum to 1.
    #[test]
    fn unseen_classes_get_no_probability() {
        let x = Array2::from_shape_vec((4, 1), vec![-2.0, -1.0, 1.0, 2.0]).unwrap();
        let m = Softmax::fit(&x.view(), &[0, 0, 2, 2], 3, 1.0, 100);
        let p = m.proba(&x.view());
        assert!(p.column(1).iter().all(|&v| v == 0.0));
        assert!(p.rows().into_iter().all(|r| (r.sum() - 1.0).abs() < 1e-12));
        assert!(p[[0, 0]] > 0.5 && p[[3, 2]] > 0.5);
    }
}
