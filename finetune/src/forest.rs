//! A random forest classifier (Breiman 2001) with scikit-learn's defaults: each tree grows on a
//! bootstrap sample until its leaves are pure, each split takes the best Gini decrease among
//! ⌊√p⌋ randomly drawn features (more are drawn while all drawn ones are constant, as
//! scikit-learn does), thresholds halfway between neighbouring values, and the forest's class
//! probabilities are the mean of the trees' leaf class shares (`predict_proba`).
//!
//! Written here because the crates on offer do not fit: `linfa-ensemble`'s forest draws its
//! features once per tree rather than per split and votes through a `HashMap` (ties broken
//! differently from run to run), and `smartcore`'s gives no probabilities.

use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// How the forest is grown.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForestConfig {
    pub trees: usize,
    /// Features tried per split (0: ⌊√p⌋, at least 1).
    pub max_features: usize,
    pub seed: u64,
}

enum Node {
    Leaf { shares: Vec<f32> },
    Split { feature: usize, threshold: f32, left: usize, right: usize },
}

struct Tree {
    nodes: Vec<Node>,
}

/// A fitted forest.
pub struct RandomForest {
    trees: Vec<Tree>,
    n_classes: usize,
}

/// Features stored feature-major (`x[f * n + i]`), so a node reads one feature's values at once.
struct Columns {
    values: Vec<f32>,
    n: usize,
    p: usize,
}

impl RandomForest {
    /// Fits `cfg.trees` trees on the rows of `x` with classes `y` (in `0..n_classes`).
    pub fn fit(x: &ArrayView2<f64>, y: &[usize], n_classes: usize, cfg: ForestConfig) -> RandomForest {
        let (n, p) = x.dim();
        let mut values = vec![0f32; n * p];
        for ((i, f), v) in x.indexed_iter() {
            values[f * n + i] = *v as f32;
        }
        let cols = Columns { values, n, p };
        let mtry = if cfg.max_features > 0 { cfg.max_features.min(p) } else { ((p as f64).sqrt().floor() as usize).max(1) };
        let trees = (0..cfg.trees)
            .into_par_iter()
            .map(|t| {
                let mut rng = ChaCha8Rng::seed_from_u64(dataloader::rng::hash_keys(&[cfg.seed, t as u64]));
                let sample: Vec<usize> = (0..n).map(|_| rng.random_range(0..n.max(1))).collect();
                grow(&cols, y, n_classes, sample, mtry, &mut rng)
            })
            .collect();
        RandomForest { trees, n_classes }
    }

    /// Mean of the trees' leaf class shares, `rows × classes`.
    pub fn predict_proba(&self, x: &ArrayView2<f64>) -> Array2<f64> {
        let mut out = Array2::<f64>::zeros((x.nrows(), self.n_classes));
        for (i, row) in x.rows().into_iter().enumerate() {
            for tree in &self.trees {
                let mut at = 0;
                loop {
                    match &tree.nodes[at] {
                        Node::Leaf { shares } => {
                            for (c, s) in shares.iter().enumerate() {
                                out[[i, c]] += *s as f64;
                            }
                            break;
                        }
                        Node::Split { feature, threshold, left, right } => at = if (row[*feature] as f32) <= *threshold { *left } else { *right },
                    }
                }
            }
        }
        out.mapv_inplace(|v| v / self.trees.len().max(1) as f64);
        out
    }
}

/// Grows one tree on `sample` (bootstrap indices, repeats allowed) depth-first.
fn grow(cols: &Columns, y: &[usize], k: usize, mut sample: Vec<usize>, mtry: usize, rng: &mut ChaCha8Rng) -> Tree {
    let mut nodes: Vec<Node> = Vec::new();
    // (node index to fill, range of `sample`)
    let mut stack = vec![(0usize, 0usize, sample.len())];
    nodes.push(Node::Leaf { shares: Vec::new() });
    let mut features: Vec<usize> = (0..cols.p).collect();
    let mut pairs: Vec<(f32, usize)> = Vec::new();
    while let Some((at, lo, hi)) = stack.pop() {
        let part = &mut sample[lo..hi];
        let mut counts = vec![0usize; k];
        for &i in part.iter() {
            counts[y[i]] += 1;
        }
        let pure = counts.iter().filter(|&&c| c > 0).count() <= 1;
        let split = if pure || part.len() < 2 { None } else { best_split(cols, y, k, part, &counts, mtry, &mut features, &mut pairs, rng) };
        let Some((feature, threshold)) = split else {
            let total = part.len().max(1) as f32;
            nodes[at] = Node::Leaf { shares: counts.iter().map(|&c| c as f32 / total).collect() };
            continue;
        };
        // Partition in place: rows with value ≤ threshold first.
        let base = feature * cols.n;
        let mut mid = 0;
        for j in 0..part.len() {
            if cols.values[base + part[j]] <= threshold {
                part.swap(mid, j);
                mid += 1;
            }
        }
        let (left, right) = (nodes.len(), nodes.len() + 1);
        nodes.push(Node::Leaf { shares: Vec::new() });
        nodes.push(Node::Leaf { shares: Vec::new() });
        nodes[at] = Node::Split { feature, threshold, left, right };
        stack.push((right, lo + mid, hi));
        stack.push((left, lo, lo + mid));
    }
    Tree { nodes }
}

/// The best (feature, threshold) by Gini decrease among `mtry` non-constant features drawn
/// without replacement (a partial Fisher–Yates shuffle of `features`), or `None` when every
/// feature is constant on `part`.
#[allow(clippy::too_many_arguments)]
fn best_split(cols: &Columns, y: &[usize], k: usize, part: &[usize], counts: &[usize], mtry: usize, features: &mut [usize], pairs: &mut Vec<(f32, usize)>, rng: &mut ChaCha8Rng) -> Option<(usize, f32)> {
    let n = part.len() as f64;
    let total_sq: f64 = counts.iter().map(|&c| (c * c) as f64).sum();
    // Maximizing Σ_L c²/n_L + Σ_R c²/n_R minimizes the children's weighted Gini impurity.
    let parent = total_sq / n;
    let mut best: Option<(f64, usize, f32)> = None;
    let (mut tried, mut drawn) = (0, 0);
    let mut left = vec![0usize; k];
    let mut right = vec![0usize; k];
    while tried < mtry && drawn < features.len() {
        let j = rng.random_range(drawn..features.len());
        features.swap(drawn, j);
        let f = features[drawn];
        drawn += 1;
        let base = f * cols.n;
        pairs.clear();
        pairs.extend(part.iter().map(|&i| (cols.values[base + i], y[i])));
        pairs.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        if pairs[0].0 == pairs[pairs.len() - 1].0 {
            continue; // constant here: does not count towards mtry
        }
        tried += 1;
        left.iter_mut().for_each(|c| *c = 0);
        right.copy_from_slice(counts);
        let (mut sq_l, mut sq_r) = (0f64, total_sq);
        for s in 0..pairs.len() - 1 {
            let c = pairs[s].1;
            sq_l += (2 * left[c] + 1) as f64;
            sq_r -= (2 * right[c] - 1) as f64;
            left[c] += 1;
            right[c] -= 1;
            if pairs[s].0 == pairs[s + 1].0 {
                continue;
            }
            let n_l = (s + 1) as f64;
            let score = sq_l / n_l + sq_r / (n - n_l);
            if score > parent + 1e-12 && best.is_none_or(|b| score > b.0) {
                let threshold = pairs[s].0 + (pairs[s + 1].0 - pairs[s].0) / 2.0;
                // Halfway can round onto the upper value in f32; keep the split strict.
                let threshold = if threshold >= pairs[s + 1].0 { pairs[s].0 } else { threshold };
                best = Some((score, f, threshold));
            }
        }
    }
    best.map(|(_, f, t)| (f, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand_distr::{Distribution, StandardNormal};

    /// Three classes each defined by one of 20 features being high (the rest noise), as
    /// marker genes define cell types; one third of the rows held out.
    fn markers(n: usize, seed: u64) -> (Array2<f64>, Vec<usize>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let y: Vec<usize> = (0..n).map(|i| i % 3).collect();
        let x = Array2::from_shape_fn((n, 20), |(i, f)| {
            let z: f64 = StandardNormal.sample(&mut rng);
            z + if f == y[i] { 3.0 } else { 0.0 }
        });
        (x, y)
    }

    fn accuracy(p: &Array2<f64>, y: &[usize]) -> f64 {
        let pred = crate::predict::predicted(p);
        pred.iter().zip(y).filter(|(a, b)| a == b).count() as f64 / y.len() as f64
    }

    #[test]
    fn the_forest_finds_marker_features_and_probabilities_sum_to_one() {
        let (x, y) = markers(600, 1);
        let (train, test) = (x.slice(ndarray::s![..400, ..]), x.slice(ndarray::s![400.., ..]));
        let f = RandomForest::fit(&train, &y[..400], 3, ForestConfig { trees: 50, max_features: 0, seed: 3 });
        let p = f.predict_proba(&test);
        assert!(accuracy(&p, &y[400..]) > 0.9, "{}", accuracy(&p, &y[400..]));
        assert!(p.rows().into_iter().all(|r| (r.sum() - 1.0).abs() < 1e-5));
        // Fully grown trees fit their training rows.
        assert!(accuracy(&f.predict_proba(&train), &y[..400]) > 0.99);
        // Same seed, same forest, whatever the threads did.
        let again = RandomForest::fit(&train, &y[..400], 3, ForestConfig { trees: 50, max_features: 0, seed: 3 });
        assert_eq!(again.predict_proba(&test), p);
    }

    #[test]
    fn labels_unrelated_to_the_features_stay_near_chance() {
        let (x, mut y) = markers(600, 2);
        y.shuffle(&mut ChaCha8Rng::seed_from_u64(5));
        let f = RandomForest::fit(&x.slice(ndarray::s![..400, ..]), &y[..400], 3, ForestConfig { trees: 50, max_features: 0, seed: 3 });
        let acc = accuracy(&f.predict_proba(&x.slice(ndarray::s![400.., ..])), &y[400..]);
        assert!(acc < 0.45, "{acc}");
    }

    #[test]
    fn constant_features_are_skipped_and_a_constant_node_is_a_leaf() {
        // Feature 0 is constant, feature 1 separates the classes: with one feature per split
        // the forest must still find feature 1.
        let x = Array2::from_shape_fn((40, 2), |(i, f)| if f == 0 { 1.0 } else { (i % 2) as f64 });
        let y: Vec<usize> = (0..40).map(|i| i % 2).collect();
        let f = RandomForest::fit(&x.view(), &y, 2, ForestConfig { trees: 5, max_features: 1, seed: 0 });
        assert_eq!(accuracy(&f.predict_proba(&x.view()), &y), 1.0);
        let same = Array2::from_elem((6, 1), 2.0);
        let f = RandomForest::fit(&same.view(), &[0, 1, 0, 1, 0, 0], 2, ForestConfig { trees: 1, max_features: 0, seed: 0 });
        assert!(f.predict_proba(&same.view()).row(0)[0] > 0.5);
    }
}
