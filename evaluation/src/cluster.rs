//! Unsupervised agreement: Louvain communities of the kNN graph compared with the labels, and
//! the silhouette of the labels in embedding space.

use ndarray::ArrayView2;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::knn::squared_distances;

/// An undirected weighted graph as adjacency lists (each edge stored in both directions).
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    pub adj: Vec<Vec<(usize, f64)>>,
}

impl Graph {
    pub fn n(&self) -> usize {
        self.adj.len()
    }

    fn degree(&self, i: usize) -> f64 {
        self.adj[i].iter().map(|e| e.1).sum()
    }
}

/// Louvain community detection (Blondel et al. 2008) maximizing modularity at `resolution`:
/// local moves in random node order until none helps, then the communities become nodes, until
/// a level changes nothing. Returns a community per node, numbered by first appearance.
pub fn louvain(g: &Graph, resolution: f64, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut membership: Vec<usize> = (0..g.n()).collect();
    let mut level = g.clone();
    loop {
        let local = local_moves(&level, resolution, &mut rng);
        let n_comm = local.iter().max().map_or(0, |&m| m + 1);
        for m in membership.iter_mut() {
            *m = local[*m];
        }
        if n_comm == level.n() {
            break;
        }
        level = aggregate(&level, &local, n_comm);
    }
    renumber(&membership)
}

/// One Louvain level: returns compact community ids of `g`'s nodes.
fn local_moves(g: &Graph, resolution: f64, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let n = g.n();
    let k: Vec<f64> = (0..n).map(|i| g.degree(i)).collect();
    let two_m: f64 = k.iter().sum();
    if two_m <= 0.0 {
        return (0..n).collect();
    }
    let mut comm: Vec<usize> = (0..n).collect();
    let mut tot = k.clone();
    let mut order: Vec<usize> = (0..n).collect();
    let mut weight_to = vec![0.0f64; n];
    let mut touched: Vec<usize> = Vec::new();
    loop {
        order.shuffle(rng);
        let mut moved = false;
        for &i in &order {
            let own = comm[i];
            for &(j, w) in &g.adj[i] {
                if j != i {
                    if weight_to[comm[j]] == 0.0 {
                        touched.push(comm[j]);
                    }
                    weight_to[comm[j]] += w;
                }
            }
            tot[own] -= k[i];
            let gain = |c: usize, w_in: f64| w_in - resolution * tot[c] * k[i] / two_m;
            let mut best = (own, gain(own, weight_to[own]));
            for &c in &touched {
                let gc = gain(c, weight_to[c]);
                if gc > best.1 + 1e-12 {
                    best = (c, gc);
                }
            }
            tot[best.0] += k[i];
            if best.0 != own {
                comm[i] = best.0;
                moved = true;
            }
            for &c in &touched {
                weight_to[c] = 0.0;
            }
            weight_to[own] = 0.0;
            touched.clear();
        }
        if !moved {
            break;
        }
    }
    renumber(&comm)
}

/// The graph of communities: edge weights summed, internal weight kept as self-loops.
fn aggregate(g: &Graph, comm: &[usize], n_comm: usize) -> Graph {
    let mut maps: Vec<std::collections::HashMap<usize, f64>> = vec![Default::default(); n_comm];
    for (i, edges) in g.adj.iter().enumerate() {
        for &(j, w) in edges {
            *maps[comm[i]].entry(comm[j]).or_default() += w;
        }
    }
    let adj = maps
        .into_iter()
        .map(|m| {
            let mut v: Vec<(usize, f64)> = m.into_iter().collect();
            v.sort_by_key(|e| e.0);
            v
        })
        .collect();
    Graph { adj }
}

fn renumber(ids: &[usize]) -> Vec<usize> {
    let mut map = std::collections::HashMap::new();
    ids.iter()
        .map(|&c| {
            let next = map.len();
            *map.entry(c).or_insert(next)
        })
        .collect()
}

/// Mean silhouette coefficient (Rousseeuw 1987) with Euclidean distances, as scikit-learn's
/// `silhouette_score`; above `max_cells` it is computed on a seeded random sample.
pub fn silhouette(x: &ArrayView2<f64>, labels: &[usize], max_cells: usize, seed: u64) -> Option<f64> {
    let mut idx: Vec<usize> = (0..labels.len()).collect();
    if idx.len() > max_cells {
        idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        idx.truncate(max_cells);
        idx.sort_unstable();
    }
    let sub = x.select(ndarray::Axis(0), &idx);
    let lab: Vec<usize> = idx.iter().map(|&i| labels[i]).collect();
    let n_classes = lab.iter().max()? + 1;
    let sizes = {
        let mut s = vec![0usize; n_classes];
        lab.iter().for_each(|&c| s[c] += 1);
        s
    };
    if sizes.iter().filter(|&&s| s > 0).count() < 2 {
        return None;
    }
    let d = squared_distances(&sub.view()).mapv(f64::sqrt);
    let mut total = 0.0;
    for i in 0..lab.len() {
        let mut sums = vec![0.0; n_classes];
        for j in 0..lab.len() {
            sums[lab[j]] += d[[i, j]];
        }
        let own = lab[i];
        if sizes[own] <= 1 {
            continue; // scikit-learn scores singletons 0
        }
        let a = sums[own] / (sizes[own] - 1) as f64;
        let b = (0..n_classes).filter(|&c| c != own && sizes[c] > 0).map(|c| sums[c] / sizes[c] as f64).fold(f64::INFINITY, f64::min);
        total += (b - a) / a.max(b);
    }
    Some(total / lab.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::adjusted_rand_index;
    use ndarray::array;

    /// `blocks` cliques of `size` nodes joined in a ring by single weak edges.
    fn ring_of_cliques(blocks: usize, size: usize) -> (Graph, Vec<usize>) {
        let n = blocks * size;
        let mut adj = vec![Vec::new(); n];
        let mut add = |a: usize, b: usize, w: f64| {
            adj[a].push((b, w));
            adj[b].push((a, w));
        };
        for b in 0..blocks {
            for i in 0..size {
                for j in i + 1..size {
                    add(b * size + i, b * size + j, 1.0);
                }
            }
            add(b * size, ((b + 1) % blocks) * size + 1, 0.1);
        }
        (Graph { adj }, (0..n).map(|i| i / size).collect())
    }

    #[test]
    fn louvain_recovers_planted_cliques() {
        let (g, truth) = ring_of_cliques(6, 8);
        let found = louvain(&g, 1.0, 3);
        assert_eq!(adjusted_rand_index(&found, &truth), 1.0);
    }

    #[test]
    fn silhouette_matches_scikit_learn_on_a_small_case() {
        // sklearn.metrics.silhouette_score([[0],[1],[4],[5]], [0,0,1,1]) = (7/9 + 5/7) / 2
        let x = array![[0.0], [1.0], [4.0], [5.0]];
        let s = silhouette(&x.view(), &[0, 0, 1, 1], 100, 0).unwrap();
        assert!((s - (7.0 / 9.0 + 5.0 / 7.0) / 2.0).abs() < 1e-12, "{s}");
    }
}
