//! 2-D layouts of an embedding: PCA of every cell, t-SNE and UMAP of a sample, for the report's
//! figures and `embeddings.h5ad`; and `neurofm-eval layout` for any matrix in a `.npy`.

use std::path::PathBuf;
use std::time::Instant;

use linfa::traits::Transformer;
use ndarray::{Array2, ArrayView2, Axis};

use crate::error::Result;
use crate::knn::Neighbours;
use crate::linalg::Pca;
use crate::outputs;
use crate::umap::{umap, UmapConfig};

/// 2-D views of the model's embedding: PCA on every cell, t-SNE and UMAP on a sample.
pub(crate) struct Layout {
    /// Positions (into the evaluated cells) of the cells t-SNE/UMAP place.
    pub cells: Vec<usize>,
    pub pca: Array2<f64>,
    pub pca_ratio: Vec<f64>,
    pub tsne: Array2<f64>,
    pub umap: Array2<f64>,
    pub tsne_seconds: f64,
    pub umap_seconds: f64,
}

/// `all_neighbours`: the 15-NN graph of every row of `x`, reused when no sampling is needed.
pub(crate) fn layouts(x: &ArrayView2<f64>, all_neighbours: Option<&Neighbours>, max_cells: usize, seed: u64) -> Layout {
    let n = x.nrows();
    let pca_fit = Pca::fit(x, 2, seed);
    let pca = pca_fit.transform(x);
    let mut cells: Vec<usize> = (0..n).collect();
    if n > max_cells {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        cells.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        cells.truncate(max_cells);
        cells.sort_unstable();
    }
    let sub = x.select(Axis(0), &cells);
    let t0 = Instant::now();
    let tsne = tsne(&sub.view(), seed);
    let tsne_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let cfg = UmapConfig { seed, ..UmapConfig::default() };
    let umap = match all_neighbours.filter(|nb| n <= max_cells && nb.k + 1 == cfg.n_neighbors) {
        Some(nb) => umap(&sub.view(), nb, &cfg),
        None => umap(&sub.view(), &crate::umap::neighbours(&sub.view(), cfg.n_neighbors), &cfg),
    };
    let umap_seconds = t1.elapsed().as_secs_f64();
    Layout { cells, pca, pca_ratio: pca_fit.explained_variance_ratio.to_vec(), tsne, umap, tsne_seconds, umap_seconds }
}

/// Barnes–Hut t-SNE (perplexity 30, 1000 iterations) on at most 50 principal components.
pub fn tsne(x: &ArrayView2<f64>, seed: u64) -> Array2<f64> {
    let n = x.nrows();
    if n < 5 {
        return Array2::zeros((n, 2));
    }
    let input = if x.ncols() > 50 { Pca::fit(x, 50, seed).transform(x) } else { x.to_owned() };
    let perplexity = 30f64.min((n as f64 - 1.0) / 3.0 - 1e-6);
    let params = linfa_tsne::TSneParams::embedding_size(2).perplexity(perplexity).approx_threshold(0.5).max_iter(1000);
    let spinner = common::progress::spinner(&format!("t-SNE of {n} cells"));
    let layout = params.transform(input).unwrap_or_else(|e| {
        tracing::warn!("t-SNE failed ({e}); its layout is left empty (NaN)");
        Array2::from_elem((n, 2), f64::NAN)
    });
    spinner.finish_and_clear();
    layout
}

/// `neurofm-eval layout` settings: a 2-D layout of any matrix.
#[derive(Debug, Clone, clap::Args)]
pub struct LayoutConfig {
    /// Rows to lay out: a 2-D float `.npy` (e.g. embeddings.npy).
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long, value_enum, default_value = "umap")]
    pub method: LayoutMethod,
    /// Output `.npy` (n × 2, float32).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Which layout `neurofm-eval layout` computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutMethod {
    /// UMAP, 15 cosine neighbours.
    Umap,
    /// Barnes–Hut t-SNE, perplexity 30.
    Tsne,
    Pca,
}

/// Computes and writes the layout; returns the seconds it took (reading excluded).
pub fn layout_file(cfg: &LayoutConfig) -> Result<f64> {
    let x = outputs::read_npy(&cfg.input)?;
    let start = Instant::now();
    let y = match cfg.method {
        LayoutMethod::Umap => {
            let ucfg = UmapConfig { seed: cfg.seed, ..UmapConfig::default() };
            umap(&x.view(), &crate::umap::neighbours(&x.view(), ucfg.n_neighbors), &ucfg)
        }
        LayoutMethod::Tsne => tsne(&x.view(), cfg.seed),
        LayoutMethod::Pca => Pca::fit(&x.view(), 2, cfg.seed).transform(&x.view()),
    };
    let seconds = start.elapsed().as_secs_f64();
    outputs::write_atomic(&cfg.out, &outputs::npy_f32(&y.mapv(|v| v as f32)))?;
    Ok(seconds)
}
