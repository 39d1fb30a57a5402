//! Batched prediction without gradients, and the scores of predictions against labels
//! (evaluation's scikit-learn-exact definitions, plus per-class precision, recall and F1).

use std::sync::Arc;

use dataloader::mask::{Batcher, SequenceMode, ViewConfig, VALIDATION_EPOCH};
use dataloader::rng::{hash_keys, Purpose};
use dataloader::shard::ReaderPosition;
use dataloader::tokenize::Tokenizer;
use evaluation::metrics::Confusion;
use evaluation::probe::Scores;
use ndarray::Array2;
use serde::Serialize;
use tch::{Device, Kind};
use trainer::batch::DeviceBatch;

use crate::classifier::Classifier;
use crate::config::AugmentConfig;
use crate::error::{FinetuneError, Result};
use crate::task::LabelledBatch;

/// What a model says about some cells, in the order they were read.
pub struct Predictions {
    /// Store rows.
    pub rows: Vec<u32>,
    /// The labelled class of each cell (`usize::MAX` where unlabelled).
    pub truth: Vec<usize>,
    /// Most probable class.
    pub pred: Vec<usize>,
    /// `cells × classes` softmax probabilities.
    pub proba: Array2<f64>,
    /// `cells × dim` cell embeddings (the head's input), when asked for.
    pub embedding: Option<Array2<f32>>,
}

/// The views a prediction averages (`augment.test_views`), each a batcher and the epoch it
/// builds for: the measured cells first, then copies perturbed as the training cells are, each
/// its own draw. Keyed by the fine-tune's seed and the cell's row, so the report and
/// `neurofm-annotate` of the same store see the same copies of a cell.
pub fn test_views(tokenizer: Arc<Tokenizer>, sequence: SequenceMode, augment: &AugmentConfig, seed: u64) -> Result<Vec<(Batcher, u64)>> {
    let measured = Batcher::new(tokenizer.clone(), sequence, None, ViewConfig::SINGLE)?;
    let perturbed = Batcher::new(tokenizer, sequence, None, augment.view())?.with_view_seed(hash_keys(&[seed, Purpose::TestViews as u64]));
    let copies = (1..augment.test_views as u64).map(|epoch| (perturbed.clone(), epoch));
    Ok(std::iter::once((measured, VALIDATION_EPOCH)).chain(copies).collect())
}

/// The softmax probabilities and embeddings of one uploaded batch, on the host.
pub fn forward_host(model: &Classifier, b: &DeviceBatch) -> Result<(Vec<f32>, Vec<f32>)> {
    let _guard = tch::no_grad_guard();
    let out = model.forward(&b.views[0], false)?;
    let proba = out.logits.f_softmax(-1, Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
    let emb = out.embedding.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
    Ok((Vec::<f32>::try_from(proba.f_view([-1])?)?, Vec::<f32>::try_from(emb.f_view([-1])?)?))
}

/// Runs `model` over every batch of `stream`.
pub fn predict(
    model: &Classifier,
    stream: impl Iterator<Item = dataloader::Result<(ReaderPosition, LabelledBatch)>>,
    device: Device,
    gene_pad: i64,
    keep_embedding: bool,
) -> Result<Predictions> {
    let k = model.n_classes;
    let dim = model.arch.embedding_dim();
    let (mut rows, mut truth, mut proba, mut emb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for item in stream {
        let (_, b) = item?;
        let dev = DeviceBatch::new(&b.tokens, device, gene_pad, false)?;
        let (p, e) = forward_host(model, &dev)?;
        rows.extend_from_slice(&b.tokens.cells);
        truth.extend(b.y.iter().map(|&y| usize::try_from(y).unwrap_or(usize::MAX)));
        proba.extend(p.iter().map(|&x| x as f64));
        if keep_embedding {
            emb.extend_from_slice(&e);
        }
    }
    let n = rows.len();
    let proba = Array2::from_shape_vec((n, k), proba).map_err(|e| FinetuneError::Internal(e.to_string()))?;
    let pred = predicted(&proba);
    let embedding = if keep_embedding { Some(Array2::from_shape_vec((n, dim), emb).map_err(|e| FinetuneError::Internal(e.to_string()))?) } else { None };
    Ok(Predictions { rows, truth, pred, proba, embedding })
}

/// An ensemble's class probabilities from its members' (`cells × classes` each): the
/// normalized geometric mean, i.e. the softmax of the mean log-probability. One member alone
/// is returned as it is. On MetaNeighbor the mean log-probability of five fine-tunes beat the
/// mean probability on each of three splits (benches/README.md, "Fine-tuning").
pub fn combine(members: &[Array2<f64>]) -> Array2<f64> {
    match members {
        [] => Array2::zeros((0, 0)),
        [one] => one.clone(),
        _ => {
            let n = members.len() as f64;
            // Probabilities that underflowed to 0 count as f32's smallest normal number.
            let mut log = members.iter().fold(Array2::zeros(members[0].dim()), |acc, p| acc + p.mapv(|x| x.max(f32::MIN_POSITIVE as f64).ln() / n));
            for mut row in log.rows_mut() {
                let top = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                row.mapv_inplace(|x| (x - top).exp());
                let total = row.sum();
                row.mapv_inplace(|x| x / total);
            }
            log
        }
    }
}

/// The most probable class of each row of `proba`.
pub fn predicted(proba: &Array2<f64>) -> Vec<usize> {
    proba.rows().into_iter().map(|r| argmax(r.iter().copied())).collect()
}

/// Index of the largest value; ties go to the lower index (as NumPy's argmax).
pub fn argmax(v: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in v.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// One class's scores against the rest.
#[derive(Debug, Clone, Serialize)]
pub struct PerClass {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Test cells of the class.
    pub support: u64,
}

/// Everything a classifier scored on the test cells.
#[derive(Debug, Clone)]
pub struct ClassScores {
    pub scores: Scores,
    pub confusion: Confusion,
    pub per_class: Vec<PerClass>,
}

impl ClassScores {
    /// Scores of `pred` (probabilities `proba`) against `truth`, over `k` classes.
    pub fn of(truth: &[usize], pred: &[usize], proba: &Array2<f64>, k: usize) -> ClassScores {
        let (scores, confusion) = Scores::of(truth, pred, proba, k);
        let rows = confusion.rows();
        let per_class = (0..k)
            .map(|c| {
                let tp = rows[c][c] as f64;
                let support: u64 = rows[c].iter().sum();
                let predicted: u64 = rows.iter().map(|r| r[c]).sum();
                let ratio = |den: u64| if den == 0 { 0.0 } else { tp / den as f64 };
                PerClass { precision: ratio(predicted), recall: ratio(support), f1: confusion.f1(c), support }
            })
            .collect();
        ClassScores { scores, confusion, per_class }
    }
}

/// Scores of labelled predictions.
pub fn class_scores(p: &Predictions, k: usize) -> ClassScores {
    ClassScores::of(&p.truth, &p.pred, &p.proba, k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataloader::csr::CsrRows;
    use dataloader::shard::CellBatch;
    use dataloader::tokenize::{Binning, Vocab};

    /// View 0 is the cell as measured (a ranked list: genes by descending count); every further
    /// view is its own perturbed draw, the same on every call and keyed by the seed, so the
    /// report and `neurofm-annotate` average the same copies of a cell.
    #[test]
    fn test_views_are_the_measured_cell_then_reproducible_perturbed_copies() {
        let tok = Arc::new(Tokenizer { vocab: Vocab { n_bins: 16 }, genes: (0..12).map(|g| format!("g{g}")).collect(), binning: Binning::RankExpression });
        let mut counts = CsrRows::new();
        counts.push_row(&(0..12).collect::<Vec<u32>>(), &(1..=12).map(|c| c as f32 * 10.0).collect::<Vec<_>>());
        let cells = CellBatch { cells: vec![3], counts };
        let mode = SequenceMode::NonzeroPlusZeros { max_len: 13 };
        let augment = AugmentConfig { gene_scale: 1.0, thin_min: 1.0, test_views: 3 };
        let lists = |seed: u64, augment: &AugmentConfig| -> Vec<Vec<i64>> {
            test_views(tok.clone(), mode, augment, seed).unwrap().iter().map(|(b, epoch)| b.build(&cells, *epoch).first().gene_ids.clone()).collect()
        };
        let got = lists(5, &augment);
        let measured: Vec<i64> = std::iter::once(tok.gene_cls()).chain((0..12).rev()).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], measured, "view 0 is the measured cell");
        assert!(got[1] != measured && got[2] != measured && got[1] != got[2], "each copy is its own draw: {got:?}");
        assert_eq!(lists(5, &augment), got, "the same copies on every call");
        assert_ne!(lists(6, &augment)[1], got[1], "keyed by the fine-tune's seed");
        assert_eq!(lists(5, &AugmentConfig { test_views: 1, ..augment }), vec![measured], "1: the measured cell alone");
    }

    #[test]
    fn per_class_scores_follow_the_confusion_matrix() {
        // sklearn: precision_recall_fscore_support([0,1,2,0,1,2], [0,2,1,0,0,1]) gives
        // precision (0.667, 0, 0), recall (1, 0, 0), f1 (0.8, 0, 0), support (2, 2, 2).
        let (t, p) = ([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1]);
        let proba = Array2::from_shape_fn((6, 3), |(i, c)| if p[i] == c { 1.0 } else { 0.0 });
        let s = ClassScores::of(&t, &p, &proba, 3);
        assert!((s.per_class[0].precision - 2.0 / 3.0).abs() < 1e-12 && s.per_class[0].recall == 1.0);
        assert!((s.per_class[0].f1 - 0.8).abs() < 1e-12);
        assert_eq!(s.per_class.iter().map(|c| c.support).collect::<Vec<_>>(), vec![2, 2, 2]);
        assert_eq!((s.per_class[1].f1, s.per_class[2].precision), (0.0, 0.0));
        assert_eq!(argmax([0.2, 0.5, 0.5].into_iter()), 1, "ties go to the lower index");
    }

    /// Two members: sqrt(0.9 · 0.2) : sqrt(0.1 · 0.8) normalizes to 0.6 : 0.4 (the mean
    /// probability would say 0.55 : 0.45); a member's zero vetoes a class without NaNs.
    #[test]
    fn members_combine_by_their_mean_log_probability() {
        let a = Array2::from_shape_vec((2, 2), vec![0.9, 0.1, 1.0, 0.0]).unwrap();
        let b = Array2::from_shape_vec((2, 2), vec![0.2, 0.8, 0.5, 0.5]).unwrap();
        let c = combine(&[a.clone(), b]);
        assert!((c[[0, 0]] - 0.6).abs() < 1e-12 && (c[[0, 1]] - 0.4).abs() < 1e-12, "{c:?}");
        assert!(c[[1, 0]] > 0.999_999 && c[[1, 1]] >= 0.0 && c.iter().all(|x| x.is_finite()), "{c:?}");
        assert_eq!(combine(std::slice::from_ref(&a)), a);
    }
}
