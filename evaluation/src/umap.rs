//! UMAP (McInnes, Healy & Melville 2018), following `umap-learn`'s defaults: the fuzzy
//! simplicial set of the kNN graph, a PCA initialization scaled to [0, 10], and SGD with
//! negative sampling on the (a, b) low-dimensional similarity curve. Single-threaded and
//! seeded, so a layout reproduces exactly.

use ndarray::{Array2, ArrayView2, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cluster::Graph;
use crate::knn::{cosine_knn, Neighbours};
use crate::linalg::Pca;

/// Settings (umap-learn's names and defaults).
#[derive(Debug, Clone, Copy)]
pub struct UmapConfig {
    pub n_neighbors: usize,
    /// `None`: 500 epochs up to 10,000 cells, 200 above (umap-learn's rule).
    pub n_epochs: Option<usize>,
    pub negative_sample_rate: usize,
    pub learning_rate: f64,
    pub seed: u64,
}

impl Default for UmapConfig {
    fn default() -> Self {
        UmapConfig { n_neighbors: 15, n_epochs: None, negative_sample_rate: 5, learning_rate: 1.0, seed: 0 }
    }
}

/// The kNN graph UMAP expects: `n_neighbors` counts the cell itself (as umap-learn and scanpy
/// count it), so each cell gets `n_neighbors - 1` others, by cosine similarity.
pub fn neighbours(x: &ArrayView2<f64>, n_neighbors: usize) -> Neighbours {
    cosine_knn(x, x, n_neighbors.saturating_sub(1).max(1), true)
}

/// Curve parameters fitted by umap-learn's `find_ab_params(spread=1, min_dist=0.1)`.
const A: f64 = 1.576_943_460_311_307_7;
const B: f64 = 0.895_060_877_910_973_3;

/// The fuzzy simplicial set: per point, memberships `exp(-(d - ρ) / σ)` with ρ the nearest
/// distance and σ such that they sum to log2(k); then the fuzzy union `a + b - ab`. Distances
/// are cosine distances (`1 - similarity`) of `nb`, which excludes each point itself.
pub fn fuzzy_graph(nb: &Neighbours, n: usize) -> Graph {
    let k_total = nb.k + 1; // umap-learn counts the point itself among its neighbours
    let target = (k_total as f64).log2();
    let mut directed: Vec<std::collections::HashMap<usize, f64>> = vec![Default::default(); n];
    for (row, (idx, sim)) in directed.iter_mut().zip(nb.index.iter().zip(&nb.similarity)) {
        let d: Vec<f64> = sim.iter().map(|s| (1.0 - s).max(0.0)).collect();
        let rho = d.iter().copied().find(|&v| v > 0.0).unwrap_or(0.0);
        let sigma = smooth_sigma(&d, rho, target);
        for (&j, &dij) in idx.iter().zip(&d) {
            let w = if dij - rho <= 0.0 { 1.0 } else { (-(dij - rho) / sigma).exp() };
            row.insert(j, w);
        }
    }
    let mut adj: Vec<Vec<(usize, f64)>> = vec![Vec::new(); n];
    for i in 0..n {
        for (&j, &w) in &directed[i] {
            let back = directed[j].get(&i).copied().unwrap_or(0.0);
            if back > 0.0 && j < i {
                continue; // added from j's side
            }
            let u = w + back - w * back;
            adj[i].push((j, u));
            adj[j].push((i, u));
        }
    }
    for a in adj.iter_mut() {
        a.sort_by_key(|e| e.0);
    }
    Graph { adj }
}

/// Binary search for σ with Σ exp(-(d - ρ)/σ) = target (umap-learn's `smooth_knn_dist`).
fn smooth_sigma(d: &[f64], rho: f64, target: f64) -> f64 {
    let (mut lo, mut hi, mut mid) = (0.0, f64::INFINITY, 1.0);
    for _ in 0..64 {
        let psum: f64 = d.iter().map(|&x| if x - rho > 0.0 { (-(x - rho) / mid).exp() } else { 1.0 }).sum();
        if (psum - target).abs() < 1e-5 {
            break;
        }
        if psum > target {
            hi = mid;
            mid = (lo + hi) / 2.0;
        } else {
            lo = mid;
            mid = if hi.is_infinite() { mid * 2.0 } else { (lo + hi) / 2.0 };
        }
    }
    let mean_d = d.iter().sum::<f64>() / d.len().max(1) as f64;
    // umap-learn's floor keeps σ from collapsing on duplicate points.
    mid.max(1e-3 * mean_d).max(1e-12)
}

/// A 2-D layout of the rows of `x` whose kNN graph is `nb`.
pub fn umap(x: &ArrayView2<f64>, nb: &Neighbours, cfg: &UmapConfig) -> Array2<f64> {
    let n = x.nrows();
    let graph = fuzzy_graph(nb, n);
    let n_epochs = cfg.n_epochs.unwrap_or(if n <= 10_000 { 500 } else { 200 });
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut emb = initial_layout(x, &mut rng, cfg.seed);

    // Edges (both directions, like umap-learn's COO graph) and their sampling schedule.
    let w_max = graph.adj.iter().flatten().map(|e| e.1).fold(0.0f64, f64::max);
    let mut edges: Vec<(usize, usize, f64)> = Vec::new();
    for (i, a) in graph.adj.iter().enumerate() {
        for &(j, w) in a {
            if w >= w_max / n_epochs as f64 {
                edges.push((i, j, n_epochs as f64 / (n_epochs as f64 * w / w_max)));
            }
        }
    }
    let neg_rate = cfg.negative_sample_rate as f64;
    let mut next_sample: Vec<f64> = edges.iter().map(|e| e.2).collect();
    let mut next_negative: Vec<f64> = edges.iter().map(|e| e.2 / neg_rate).collect();
    let clip = |v: f64| v.clamp(-4.0, 4.0);
    let bar = common::progress::bar(n_epochs as u64, "UMAP epochs");
    for epoch in 0..n_epochs {
        bar.inc(1);
        let alpha = cfg.learning_rate * (1.0 - epoch as f64 / n_epochs as f64);
        let e = epoch as f64;
        for (ei, &(j, k, per_sample)) in edges.iter().enumerate() {
            if next_sample[ei] > e {
                continue;
            }
            let d2 = dist2(&emb, j, k);
            let coeff = if d2 > 0.0 { -2.0 * A * B * d2.powf(B - 1.0) / (A * d2.powf(B) + 1.0) } else { 0.0 };
            for c in 0..2 {
                let g = clip(coeff * (emb[[j, c]] - emb[[k, c]]));
                emb[[j, c]] += g * alpha;
                emb[[k, c]] -= g * alpha;
            }
            next_sample[ei] += per_sample;
            let per_negative = per_sample / neg_rate;
            let n_neg = ((e - next_negative[ei]) / per_negative).max(0.0) as usize;
            for _ in 0..n_neg {
                let other = rng.random_range(0..n);
                if other == j {
                    continue;
                }
                let d2 = dist2(&emb, j, other);
                if d2 <= 0.0 {
                    continue;
                }
                let coeff = 2.0 * B / ((0.001 + d2) * (A * d2.powf(B) + 1.0));
                for c in 0..2 {
                    emb[[j, c]] += clip(coeff * (emb[[j, c]] - emb[[other, c]])) * alpha;
                }
            }
            next_negative[ei] += n_neg as f64 * per_negative;
        }
    }
    bar.finish_and_clear();
    emb
}

fn dist2(emb: &Array2<f64>, i: usize, j: usize) -> f64 {
    let dx = emb[[i, 0]] - emb[[j, 0]];
    let dy = emb[[i, 1]] - emb[[j, 1]];
    dx * dx + dy * dy
}

/// PCA to 2-D, scaled to [0, 10] per axis with a little noise (umap-learn's `init="pca"`).
fn initial_layout(x: &ArrayView2<f64>, rng: &mut ChaCha8Rng, seed: u64) -> Array2<f64> {
    let n = x.nrows();
    let mut emb = if x.ncols() >= 2 && n >= 2 {
        let pca = Pca::fit(x, 2, seed);
        pca.transform(x)
    } else {
        Array2::from_shape_fn((n, 2), |_| rng.random::<f64>())
    };
    for mut col in emb.axis_iter_mut(Axis(1)) {
        let (lo, hi) = col.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let span = if hi > lo { hi - lo } else { 1.0 };
        col.mapv_inplace(|v| 10.0 * (v - lo) / span);
    }
    emb.mapv_inplace(|v| v + rng.random_range(-1e-4..1e-4));
    emb
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, StandardNormal};

    #[test]
    fn memberships_sum_to_log2_k_before_the_union() {
        let d = [0.1, 0.2, 0.4, 0.8];
        let sigma = smooth_sigma(&d, 0.1, (5f64).log2());
        let s: f64 = d.iter().map(|&x| (-(x - 0.1f64).max(0.0) / sigma).exp()).sum();
        assert!((s - 5f64.log2()).abs() < 1e-4, "{s}");
    }

    #[test]
    fn umap_keeps_separated_classes_apart() {
        // Four classes, each a direction in 10-D plus noise: neighbours in the layout should
        // share their class as they do in the data.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let n = 400;
        let x = Array2::from_shape_fn((n, 10), |(i, j)| {
            let z: f64 = StandardNormal.sample(&mut rng);
            z * 0.3 + if j == i % 4 { 3.0 } else { 0.0 }
        });
        let labels: Vec<usize> = (0..n).map(|i| i % 4).collect();
        let nb = neighbours(&x.view(), 15);
        let emb = umap(&x.view(), &nb, &UmapConfig { n_epochs: Some(200), ..Default::default() });
        assert!(emb.iter().all(|v| v.is_finite()));
        // Majority of each point's 5 nearest layout neighbours (Euclidean) share its class.
        let d = crate::knn::squared_distances(&emb.view());
        let mut correct = 0;
        for i in 0..n {
            let mut order: Vec<usize> = (0..n).filter(|&j| j != i).collect();
            order.sort_by(|&a, &b| d[[i, a]].total_cmp(&d[[i, b]]));
            let votes: Vec<usize> = order[..5].iter().map(|&j| labels[j]).collect();
            correct += (votes.iter().filter(|&&l| l == labels[i]).count() >= 3) as usize;
        }
        assert!(correct as f64 / n as f64 > 0.95, "5-NN label agreement {}", correct as f64 / n as f64);
    }
}
