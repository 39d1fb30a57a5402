//! What the fine-tuned model must beat, trained on the same training cells and scored on the
//! same test cells: logistic regression (evaluation's probe, `C` by stratified 5-fold CV) and a
//! random forest, both on log1p(CP10k) expression of the model's genes (genes the data lacks
//! are zero columns, which carry nothing). The regression reads the expression as it is, not
//! standardized: that is the stronger baseline (MetaNeighbor 0.77 against 0.57 macro F1).

use evaluation::linalg::log_normalized;
use evaluation::probe::{logistic_probe, Scaling};
use ndarray::{Array2, Axis};
use serde::Serialize;

use crate::error::Result;
use crate::forest::{ForestConfig, RandomForest};
use crate::predict::{predicted, ClassScores};
use crate::task::Task;

/// A baseline's test predictions and scores.
pub struct Baseline {
    pub name: &'static str,
    pub scores: ClassScores,
    pub pred: Vec<usize>,
    pub proba: Array2<f64>,
    /// Settings it chose or was given (logistic: `C`; forest: trees).
    pub detail: BaselineDetail,
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum BaselineDetail {
    Logistic { c: f64, cv_accuracy: Vec<(f64, f64)> },
    Forest { trees: usize, max_features: usize },
}

/// Log-normalized expression of every labelled cell (rows in `labels.cells` order) over the
/// model's genes.
pub fn expression(task: &Task, n_model_genes: usize) -> Result<Array2<f64>> {
    let counts = task.store.read_cells(&task.labels.cells)?;
    Ok(log_normalized(&task.genes.remap(&counts), n_model_genes))
}

fn test_truth(task: &Task) -> Vec<usize> {
    task.split.test.iter().map(|&i| task.labels.y[i]).collect()
}

/// Logistic regression on `x` (one row per labelled cell).
pub fn logistic(x: &Array2<f64>, task: &Task, seed: u64) -> Result<Baseline> {
    let r = logistic_probe(&x.view(), &task.labels, &task.split, seed, Scaling::AsIs);
    let scores = ClassScores::of(&test_truth(task), &r.pred, &r.proba, task.n_classes());
    Ok(Baseline { name: "logistic_expression", scores, pred: r.pred, proba: r.proba, detail: BaselineDetail::Logistic { c: r.c, cv_accuracy: r.cv_accuracy } })
}

/// A random forest of `trees` trees on `x`, fitted on all training cells (fit and validation:
/// it needs no early stopping).
pub fn random_forest(x: &Array2<f64>, task: &Task, trees: usize, seed: u64) -> Result<Baseline> {
    let train = x.select(Axis(0), &task.split.train);
    let y: Vec<usize> = task.split.train.iter().map(|&i| task.labels.y[i]).collect();
    let cfg = ForestConfig { trees, max_features: 0, seed };
    let forest = RandomForest::fit(&train.view(), &y, task.n_classes(), cfg);
    let proba = forest.predict_proba(&x.select(Axis(0), &task.split.test).view());
    let pred = predicted(&proba);
    let scores = ClassScores::of(&test_truth(task), &pred, &proba, task.n_classes());
    let max_features = ((x.ncols() as f64).sqrt().floor() as usize).max(1);
    Ok(Baseline { name: "random_forest", scores, pred, proba, detail: BaselineDetail::Forest { trees, max_features } })
}
