//! Linear and kNN probes: how much of the label a representation makes linearly (or locally)
//! readable. Logistic regression on standardized features (or, for log-normalized expression,
//! the features as they are), its L2 strength chosen by stratified cross-validation on the
//! training part only, scored on the held-out part.

use ndarray::{Array2, ArrayView2, Axis};
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::knn::{cosine_knn, knn_classify};
use crate::labels::{Labels, Split};
use crate::linalg::Standardizer;
use crate::logistic::Softmax;
use crate::metrics::{roc_auc_ovr_macro, Confusion};

/// Inverse regularization strengths tried (scikit-learn's `C`).
pub const C_GRID: [f64; 6] = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0];
/// Cross-validation folds (fewer when a class has fewer training cells).
pub const CV_FOLDS: usize = 5;
/// Neighbours for kNN classification.
pub const KNN_K: usize = 15;
/// Cells per class of the few-shot curve, and draws per point.
pub const FEW_SHOT: [usize; 3] = [5, 10, 50];
pub const FEW_SHOT_DRAWS: usize = 10;

/// Scores of one probe on the test part.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub macro_f1: f64,
    /// F1 of class 1 in a binary problem (what the original study reported), else `None`.
    pub f1_positive: Option<f64>,
    /// Binary ROC-AUC (class 1 positive), or one-vs-rest macro for several classes.
    pub roc_auc: Option<f64>,
}

impl Scores {
    pub fn of(truth: &[usize], pred: &[usize], proba: &Array2<f64>, n_classes: usize) -> (Scores, Confusion) {
        let cm = Confusion::new(truth, pred, n_classes);
        let rows: Vec<Vec<f64>> = proba.rows().into_iter().map(|r| r.to_vec()).collect();
        let scores = Scores { accuracy: cm.accuracy(), balanced_accuracy: cm.balanced_accuracy(), macro_f1: cm.macro_f1(), f1_positive: (n_classes == 2).then(|| cm.f1(1)), roc_auc: roc_auc_ovr_macro(truth, &rows, n_classes) };
        (scores, cm)
    }
}

/// The logistic-regression probe's outcome.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub scores: Scores,
    pub confusion: Confusion,
    /// Chosen `C` and the mean cross-validated accuracy of each `C` tried.
    pub c: f64,
    pub cv_accuracy: Vec<(f64, f64)>,
    /// Test predictions and class probabilities (rows follow `Split::test`).
    pub pred: Vec<usize>,
    pub proba: Array2<f64>,
}

/// What the logistic regression does to its features before fitting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scaling {
    /// Each feature to zero mean and unit variance on the fitted cells: for embeddings and
    /// principal components, whose axes carry no common unit.
    Standardize,
    /// The features as given: for log-normalized expression, whose common unit is meaningful;
    /// standardizing it lifts rare, noisy genes to the weight of markers (MetaNeighbor's 38
    /// subtypes, three splits: 0.57 macro F1 standardized, 0.77 as is; benches/README.md, "Fine-tuning").
    AsIs,
}

/// A fitted logistic regression (on standardized features when `scaler` is set).
struct Fitted {
    scaler: Option<Standardizer>,
    model: Softmax,
}

/// Solver iterations allowed per fit (scikit-learn's `max_iter` is 100; ours reports when it stops short).
const MAX_ITER: usize = 500;

impl Fitted {
    fn fit(x: &ArrayView2<f64>, y: &[usize], n_classes: usize, c: f64, scaling: Scaling) -> Fitted {
        let scaler = (scaling == Scaling::Standardize).then(|| Standardizer::fit(x));
        let model = match &scaler {
            Some(s) => Softmax::fit(&s.apply(x).view(), y, n_classes, 1.0 / c, MAX_ITER),
            None => Softmax::fit(x, y, n_classes, 1.0 / c, MAX_ITER),
        };
        if !model.converged {
            tracing::debug!("logistic regression (C = {c}) stopped after {} iterations short of the gradient tolerance", model.iterations);
        }
        Fitted { scaler, model }
    }

    /// Class probabilities (`n × n_classes`; classes absent from training get 0) and argmax.
    fn predict(&self, x: &ArrayView2<f64>) -> (Array2<f64>, Vec<usize>) {
        let proba = match &self.scaler {
            Some(s) => self.model.proba(&s.apply(x).view()),
            None => self.model.proba(x),
        };
        let pred = proba.rows().into_iter().map(|r| argmax(r.as_slice().unwrap_or(&[]))).collect();
        (proba, pred)
    }
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a))).unwrap_or(0)
}

fn rows(x: &ArrayView2<f64>, idx: &[usize]) -> Array2<f64> {
    x.select(Axis(0), idx)
}

fn classes(labels: &Labels, idx: &[usize]) -> Vec<usize> {
    idx.iter().map(|&i| labels.y[i]).collect()
}

/// Logistic-regression probe: `C` by stratified CV on `split.train`, refit, scored on `split.test`.
/// `x` has one row per evaluated cell (`labels.cells` order).
pub fn logistic_probe(x: &ArrayView2<f64>, labels: &Labels, split: &Split, seed: u64, scaling: Scaling) -> ProbeResult {
    let k = labels.n_classes();
    let min_train = (0..k).map(|c| split.train.iter().filter(|&&i| labels.y[i] == c).count()).min().unwrap_or(0);
    let folds = Split::folds(labels, &split.train, CV_FOLDS.min(min_train).max(2), seed);
    let mut cv_accuracy = Vec::new();
    for &c in &C_GRID {
        let mut correct = 0usize;
        for (f, held) in folds.iter().enumerate() {
            let fit_on: Vec<usize> = folds.iter().enumerate().filter(|&(g, _)| g != f).flat_map(|(_, v)| v.iter().copied()).collect();
            let m = Fitted::fit(&rows(x, &fit_on).view(), &classes(labels, &fit_on), k, c, scaling);
            let (_, pred) = m.predict(&rows(x, held).view());
            correct += pred.iter().zip(classes(labels, held)).filter(|(p, t)| **p == *t).count();
        }
        cv_accuracy.push((c, correct as f64 / split.train.len() as f64));
    }
    // Best CV accuracy; ties go to the stronger regularization (smaller C).
    let c = cv_accuracy.iter().fold((f64::NAN, -1.0), |best, &(c, a)| if a > best.1 + 1e-12 { (c, a) } else { best }).0;
    let m = Fitted::fit(&rows(x, &split.train).view(), &classes(labels, &split.train), k, c, scaling);
    let (proba, pred) = m.predict(&rows(x, &split.test).view());
    let (scores, confusion) = Scores::of(&classes(labels, &split.test), &pred, &proba, k);
    ProbeResult { scores, confusion, c, cv_accuracy, pred, proba }
}

/// One point of the few-shot curve: mean and standard deviation over draws.
#[derive(Debug, Clone, Serialize)]
pub struct FewShotPoint {
    pub cells_per_class: usize,
    pub draws: usize,
    pub accuracy_mean: f64,
    pub accuracy_std: f64,
    pub macro_f1_mean: f64,
    pub macro_f1_std: f64,
}

/// Probes trained on `n` random training cells per class (with the full probe's `C`), tested
/// on the whole test part; sizes some class cannot supply are skipped.
pub fn few_shot(x: &ArrayView2<f64>, labels: &Labels, split: &Split, c: f64, seed: u64) -> Vec<FewShotPoint> {
    let k = labels.n_classes();
    let by_class: Vec<Vec<usize>> = (0..k).map(|cl| split.train.iter().copied().filter(|&i| labels.y[i] == cl).collect()).collect();
    let truth = classes(labels, &split.test);
    let x_test = rows(x, &split.test);
    let mut out = Vec::new();
    for &n in &FEW_SHOT {
        if by_class.iter().any(|v| v.len() < n) {
            continue;
        }
        let (mut acc, mut f1) = (Vec::new(), Vec::new());
        for draw in 0..FEW_SHOT_DRAWS {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((n as u64) << 32) ^ draw as u64);
            let pick: Vec<usize> = by_class.iter().flat_map(|v| v.choose_multiple(&mut rng, n).copied().collect::<Vec<_>>()).collect();
            let m = Fitted::fit(&rows(x, &pick).view(), &classes(labels, &pick), k, c, Scaling::Standardize);
            let (proba, pred) = m.predict(&x_test.view());
            let (s, _) = Scores::of(&truth, &pred, &proba, k);
            acc.push(s.accuracy);
            f1.push(s.macro_f1);
        }
        let (am, asd) = mean_std(&acc);
        let (fm, fsd) = mean_std(&f1);
        out.push(FewShotPoint { cells_per_class: n, draws: FEW_SHOT_DRAWS, accuracy_mean: am, accuracy_std: asd, macro_f1_mean: fm, macro_f1_std: fsd });
    }
    out
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    (m, (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt())
}

/// kNN classification accuracy (cosine, `KNN_K` neighbours) of test cells among training cells.
pub fn knn_accuracy(x: &ArrayView2<f64>, labels: &Labels, split: &Split) -> f64 {
    let nb = cosine_knn(&rows(x, &split.test).view(), &rows(x, &split.train).view(), KNN_K, false);
    let pred = knn_classify(&nb, &classes(labels, &split.train), labels.n_classes());
    let truth = classes(labels, &split.test);
    pred.iter().zip(&truth).filter(|(p, t)| p == t).count() as f64 / truth.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand_distr::{Distribution, StandardNormal};

    /// Three Gaussian classes whose means point in different directions of the first two features.
    fn blobs(n_per: usize, sep: f64, seed: u64) -> (Array2<f64>, Labels) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let means = [[sep, 0.0], [0.0, sep], [-sep, -sep]];
        let n = 3 * n_per;
        let mut x = Array2::<f64>::zeros((n, 6));
        let mut y = Vec::new();
        for i in 0..n {
            let c = i % 3;
            y.push(c);
            for j in 0..6 {
                let z: f64 = StandardNormal.sample(&mut rng);
                x[[i, j]] = z + if j < 2 { means[c][j] } else { 0.0 };
            }
        }
        let labels = Labels { column: "t".into(), classes: vec!["a".into(), "b".into(), "c".into()], cells: (0..n).collect(), y, dropped: vec![] };
        (x, labels)
    }

    fn split(labels: &Labels) -> Split {
        let test: Vec<usize> = (0..labels.y.len()).filter(|i| i % 5 == 0).collect();
        let train = (0..labels.y.len()).filter(|i| i % 5 != 0).collect();
        Split { train, test }
    }

    #[test]
    fn the_probe_separates_well_separated_classes() {
        let (x, labels) = blobs(60, 8.0, 1);
        let s = split(&labels);
        let r = logistic_probe(&x.view(), &labels, &s, 0, Scaling::Standardize);
        assert!(r.scores.accuracy > 0.97, "{:?}", r.scores);
        assert!(r.scores.roc_auc.unwrap() > 0.99);
        assert!(knn_accuracy(&x.view(), &labels, &s) > 0.97);
        let curve = few_shot(&x.view(), &labels, &s, r.c, 0);
        assert_eq!(curve.iter().map(|p| p.cells_per_class).collect::<Vec<_>>(), vec![5, 10]);
        assert!(curve[1].accuracy_mean > 0.9, "{curve:?}");
    }

    #[test]
    fn the_probe_is_at_chance_on_labels_unrelated_to_the_features() {
        let (x, mut labels) = blobs(60, 8.0, 2);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        labels.y.shuffle(&mut rng);
        let r = logistic_probe(&x.view(), &labels, &split(&labels), 0, Scaling::Standardize);
        assert!(r.scores.accuracy < 0.6, "{:?}", r.scores);
    }

    /// One informative feature beside 200 of tiny spread (rare genes): as they are, the L2
    /// penalty keeps the noise features out; standardized, they weigh as much as the marker.
    #[test]
    fn features_as_they_are_keep_low_variance_noise_out() {
        let (n, noise) = (120, 200);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let y: Vec<usize> = (0..n).map(|i| i % 2).collect();
        let mut x = Array2::<f64>::zeros((n, 1 + noise));
        for i in 0..n {
            let z: f64 = StandardNormal.sample(&mut rng);
            x[[i, 0]] = if y[i] == 1 { 1.0 } else { -1.0 } + 0.5 * z;
            for j in 1..=noise {
                let z: f64 = StandardNormal.sample(&mut rng);
                x[[i, j]] = 0.01 * z;
            }
        }
        let labels = Labels { column: "t".into(), classes: vec!["a".into(), "b".into()], cells: (0..n).collect(), y, dropped: vec![] };
        let s = split(&labels);
        let as_is = logistic_probe(&x.view(), &labels, &s, 0, Scaling::AsIs).scores.accuracy;
        let standardized = logistic_probe(&x.view(), &labels, &s, 0, Scaling::Standardize).scores.accuracy;
        assert!(as_is > 0.9 && standardized < as_is - 0.1, "as is {as_is}, standardized {standardized}");
    }
}
