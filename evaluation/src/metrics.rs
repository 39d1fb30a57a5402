//! Classification and clustering scores, defined exactly as scikit-learn defines them, so the
//! numbers in a report compare with what Python users compute.

use std::collections::HashMap;

/// Counts of (true class, predicted class); rows are true classes.
#[derive(Debug, Clone, PartialEq)]
pub struct Confusion {
    pub n_classes: usize,
    counts: Vec<u64>,
}

impl Confusion {
    /// Tallies `truth` against `pred` (equal lengths; classes `0..n_classes`).
    pub fn new(truth: &[usize], pred: &[usize], n_classes: usize) -> Confusion {
        let mut counts = vec![0u64; n_classes * n_classes];
        for (&t, &p) in truth.iter().zip(pred) {
            counts[t * n_classes + p] += 1;
        }
        Confusion { n_classes, counts }
    }

    pub fn get(&self, truth: usize, pred: usize) -> u64 {
        self.counts[truth * self.n_classes + pred]
    }

    fn row(&self, c: usize) -> u64 {
        (0..self.n_classes).map(|p| self.get(c, p)).sum()
    }

    fn col(&self, c: usize) -> u64 {
        (0..self.n_classes).map(|t| self.get(t, c)).sum()
    }

    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn accuracy(&self) -> f64 {
        (0..self.n_classes).map(|c| self.get(c, c)).sum::<u64>() as f64 / self.total().max(1) as f64
    }

    /// Mean recall over the classes present in the truth (sklearn's `balanced_accuracy_score`).
    pub fn balanced_accuracy(&self) -> f64 {
        let recalls: Vec<f64> = (0..self.n_classes).filter(|&c| self.row(c) > 0).map(|c| self.get(c, c) as f64 / self.row(c) as f64).collect();
        recalls.iter().sum::<f64>() / recalls.len().max(1) as f64
    }

    /// Unweighted mean F1 over the classes seen in truth or predictions; a class with no true
    /// positive scores 0 (sklearn's `f1_score(average="macro", zero_division=0)`).
    pub fn macro_f1(&self) -> f64 {
        let seen: Vec<usize> = (0..self.n_classes).filter(|&c| self.row(c) + self.col(c) > 0).collect();
        seen.iter().map(|&c| self.f1(c)).sum::<f64>() / seen.len().max(1) as f64
    }

    /// F1 of class `c` against the rest (sklearn's binary `f1_score` with `pos_label = c`).
    pub fn f1(&self, c: usize) -> f64 {
        let tp = self.get(c, c) as f64;
        let denom = (self.row(c) + self.col(c)) as f64; // 2·tp + fp + fn
        if tp == 0.0 { 0.0 } else { 2.0 * tp / denom }
    }

    /// Rows of counts, for CSV and plots.
    pub fn rows(&self) -> Vec<Vec<u64>> {
        self.counts.chunks(self.n_classes.max(1)).map(<[u64]>::to_vec).collect()
    }
}

/// Area under the ROC curve of `score` for `positive` (Mann-Whitney U with average ranks for
/// ties, equal to sklearn's trapezoidal `roc_auc_score`). `None` when one class is absent.
pub fn roc_auc(positive: &[bool], score: &[f64]) -> Option<f64> {
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| score[a].total_cmp(&score[b]));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && score[order[j + 1]] == score[order[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0; // ranks are 1-based
        rank_sum_pos += avg_rank * order[i..=j].iter().filter(|&&k| positive[k]).count() as f64;
        i = j + 1;
    }
    let u = rank_sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// One-vs-rest ROC-AUC averaged over classes (sklearn's `multi_class="ovr", average="macro"`);
/// `probs[i][c]` is cell i's probability of class c. `None` if a class has no cells.
pub fn roc_auc_ovr_macro(truth: &[usize], probs: &[Vec<f64>], n_classes: usize) -> Option<f64> {
    let mut total = 0.0;
    for c in 0..n_classes {
        let positive: Vec<bool> = truth.iter().map(|&t| t == c).collect();
        let score: Vec<f64> = probs.iter().map(|p| p[c]).collect();
        total += roc_auc(&positive, &score)?;
    }
    Some(total / n_classes as f64)
}

/// Contingency table of two labelings: cells per (a, b) pair, per a label, per b label.
struct Contingency {
    pairs: HashMap<(usize, usize), f64>,
    a: HashMap<usize, f64>,
    b: HashMap<usize, f64>,
}

fn contingency(a: &[usize], b: &[usize]) -> Contingency {
    let mut c = Contingency { pairs: HashMap::new(), a: HashMap::new(), b: HashMap::new() };
    for (&x, &y) in a.iter().zip(b) {
        *c.pairs.entry((x, y)).or_insert(0.0) += 1.0;
        *c.a.entry(x).or_insert(0.0) += 1.0;
        *c.b.entry(y).or_insert(0.0) += 1.0;
    }
    c
}

/// Adjusted Rand index (sklearn's `adjusted_rand_score`): 1 for identical partitions, about 0
/// for independent ones.
pub fn adjusted_rand_index(a: &[usize], b: &[usize]) -> f64 {
    let n = a.len() as f64;
    let Contingency { pairs, a: ca, b: cb } = contingency(a, b);
    // Pair confusion: pairs together in both (tp), in a only (fn), in b only (fp), in neither (tn).
    let sum_sq = pairs.values().map(|v| v * v).sum::<f64>();
    let tp = sum_sq - n;
    let fn_ = ca.values().map(|v| v * v).sum::<f64>() - sum_sq;
    let fp = cb.values().map(|v| v * v).sum::<f64>() - sum_sq;
    let tn = n * n - fp - fn_ - sum_sq;
    if fn_ == 0.0 && fp == 0.0 {
        return 1.0;
    }
    2.0 * (tp * tn - fn_ * fp) / ((tp + fn_) * (fn_ + tn) + (tp + fp) * (fp + tn))
}

/// Normalized mutual information with the arithmetic mean of the entropies (sklearn's
/// default `normalized_mutual_info_score`, equal to the V-measure).
pub fn normalized_mutual_info(a: &[usize], b: &[usize]) -> f64 {
    let n = a.len() as f64;
    let Contingency { pairs, a: ca, b: cb } = contingency(a, b);
    if (ca.len() == 1 && cb.len() == 1) || n == 0.0 {
        return 1.0;
    }
    let entropy = |c: &HashMap<usize, f64>| -c.values().map(|v| v / n * (v / n).ln()).sum::<f64>();
    let mi: f64 = pairs.iter().map(|((x, y), v)| v / n * (v * n / (ca[x] * cb[y])).ln()).sum();
    let norm = (entropy(&ca) + entropy(&cb)) / 2.0;
    if mi <= 0.0 { 0.0 } else { mi / norm.max(f64::EPSILON) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn classification_scores_match_sklearn_examples() {
        // sklearn's f1_score docstring example: macro F1 = 0.2666…
        let (t, p) = ([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1]);
        let c = Confusion::new(&t, &p, 3);
        assert!(close(c.macro_f1(), 0.26666666666666666), "{}", c.macro_f1());
        assert!(close(c.accuracy(), 2.0 / 6.0));
        assert!(close(c.balanced_accuracy(), 1.0 / 3.0));
        assert_eq!(c.rows(), vec![vec![2, 0, 0], vec![1, 0, 1], vec![0, 2, 0]]);
        // A class never predicted and never true does not count (sklearn's label union).
        let c = Confusion::new(&[0, 0, 1, 1], &[0, 0, 1, 0], 3);
        assert!(close(c.macro_f1(), (0.8 + 2.0 / 3.0) / 2.0));
    }

    #[test]
    fn roc_auc_matches_sklearn_including_ties() {
        // sklearn's roc_auc_score docstring: 0.75.
        assert!(close(roc_auc(&[false, false, true, true], &[0.1, 0.4, 0.35, 0.8]).unwrap(), 0.75));
        // Ties count half, as the trapezoid does.
        assert!(close(roc_auc(&[false, true], &[0.5, 0.5]).unwrap(), 0.5));
        assert!(close(roc_auc(&[false, false, true], &[0.2, 0.7, 0.7]).unwrap(), 0.75));
        assert_eq!(roc_auc(&[true, true], &[0.1, 0.2]), None);
        let probs = vec![vec![0.8, 0.1, 0.1], vec![0.2, 0.7, 0.1], vec![0.1, 0.2, 0.7], vec![0.3, 0.4, 0.3]];
        assert!(close(roc_auc_ovr_macro(&[0, 1, 2, 1], &probs, 3).unwrap(), 1.0));
    }

    #[test]
    fn clustering_agreement_matches_sklearn_examples() {
        // sklearn's adjusted_rand_score docstring.
        assert!(close(adjusted_rand_index(&[0, 0, 1, 1], &[1, 1, 0, 0]), 1.0));
        assert!(close(adjusted_rand_index(&[0, 0, 1, 2], &[0, 0, 1, 1]), 0.5714285714285714));
        assert!(close(adjusted_rand_index(&[0, 0, 1, 1], &[0, 1, 0, 1]), -0.5));
        // NMI: identical up to renaming, independent, and the V-measure example (0.5158…).
        assert!(close(normalized_mutual_info(&[0, 0, 1, 1], &[1, 1, 0, 0]), 1.0));
        assert!(close(normalized_mutual_info(&[0, 0, 1, 1], &[0, 1, 0, 1]), 0.0));
        assert!(close(normalized_mutual_info(&[0, 0, 0, 1, 1, 1], &[0, 0, 1, 1, 2, 2]), 0.5158037429793889));
    }
}
