//! Exact k-nearest neighbours by cosine similarity (brute force, blocked, parallel): the graph
//! under kNN classification, clustering and UMAP. At evaluation sizes (10⁴–10⁵ cells, ≤ 10³
//! dimensions) an exact search costs seconds and needs no approximation to explain.

use ndarray::{s, Array2, ArrayView2};
use rayon::prelude::*;

use crate::linalg::unit_rows;

/// Each query's `k` nearest references, most similar first.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbours {
    pub k: usize,
    /// `n_queries × k` reference indices.
    pub index: Vec<Vec<usize>>,
    /// Cosine similarity of each.
    pub similarity: Vec<Vec<f64>>,
}

/// Neighbour indices and similarities of one block of queries.
type Block = (Vec<Vec<usize>>, Vec<Vec<f64>>);

/// Rows per block of the similarity matrix (bounds memory to `BLOCK × n_refs` floats).
const BLOCK: usize = 256;

/// Nearest references of every query. With `exclude_self`, queries and references are the same
/// set and a point is not its own neighbour.
pub fn cosine_knn(queries: &ArrayView2<f64>, refs: &ArrayView2<f64>, k: usize, exclude_self: bool) -> Neighbours {
    let q = unit_rows(queries);
    let r = unit_rows(refs);
    let k = k.min(r.nrows().saturating_sub(exclude_self as usize));
    let starts: Vec<usize> = (0..q.nrows()).step_by(BLOCK).collect();
    let blocks: Vec<Block> = starts
        .par_iter()
        .map(|&a| {
            let b = (a + BLOCK).min(q.nrows());
            let sims = q.slice(s![a..b, ..]).dot(&r.t());
            let mut idx = Vec::with_capacity(b - a);
            let mut sim = Vec::with_capacity(b - a);
            for (i, row) in sims.rows().into_iter().enumerate() {
                let mut cand: Vec<(usize, f64)> = row.iter().copied().enumerate().filter(|&(j, _)| !(exclude_self && j == a + i)).collect();
                let by_sim = |x: &(usize, f64), y: &(usize, f64)| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0));
                if k < cand.len() && k > 0 {
                    cand.select_nth_unstable_by(k - 1, by_sim);
                }
                cand.truncate(k);
                cand.sort_by(by_sim);
                idx.push(cand.iter().map(|c| c.0).collect());
                sim.push(cand.iter().map(|c| c.1).collect());
            }
            (idx, sim)
        })
        .collect();
    let (mut index, mut similarity) = (Vec::new(), Vec::new());
    for (i, s) in blocks {
        index.extend(i);
        similarity.extend(s);
    }
    Neighbours { k, index, similarity }
}

/// Majority vote of each query's neighbours' classes, ties to the most similar total.
pub fn knn_classify(nb: &Neighbours, ref_labels: &[usize], n_classes: usize) -> Vec<usize> {
    nb.index
        .iter()
        .zip(&nb.similarity)
        .map(|(idx, sim)| {
            let mut votes = vec![(0usize, 0.0f64); n_classes];
            for (&j, &s) in idx.iter().zip(sim) {
                votes[ref_labels[j]].0 += 1;
                votes[ref_labels[j]].1 += s;
            }
            (0..n_classes).max_by(|&a, &b| votes[a].0.cmp(&votes[b].0).then(votes[a].1.total_cmp(&votes[b].1)).then(b.cmp(&a))).unwrap_or(0)
        })
        .collect()
}

/// Dense `n × n` squared Euclidean distances (for silhouette and trustworthiness on samples).
pub fn squared_distances(x: &ArrayView2<f64>) -> Array2<f64> {
    let norms: Vec<f64> = x.rows().into_iter().map(|r| r.dot(&r)).collect();
    let mut d = x.dot(&x.t());
    for ((i, j), v) in d.indexed_iter_mut() {
        *v = (norms[i] + norms[j] - 2.0 * *v).max(0.0);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn neighbours_are_the_most_similar_directions() {
        let x = array![[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]];
        let nb = cosine_knn(&x.view(), &x.view(), 2, true);
        assert_eq!(nb.index[0], vec![1, 3]);
        assert_eq!(nb.index[2], vec![3, 1]);
        assert!(nb.index.iter().enumerate().all(|(i, row)| !row.contains(&i)));
        let labels = vec![0, 0, 1, 1, 1];
        let nb1 = cosine_knn(&x.view(), &x.view(), 1, true);
        assert_eq!(knn_classify(&nb1, &labels, 2), vec![0, 0, 1, 1, 1]);
    }

    #[test]
    fn squared_distances_match_the_definition() {
        let x = array![[0.0, 0.0], [3.0, 4.0]];
        let d = squared_distances(&x.view());
        assert_eq!(d, array![[0.0, 25.0], [25.0, 0.0]]);
    }
}
