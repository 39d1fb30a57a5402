//! Expression → tokens (DESIGN §3).
//!
//! Each cell is normalized to 10,000 counts and log1p-transformed; zero expression is bin 0
//! and non-zero values fall into bins `1..n_bins`. Two binnings:
//! - `gene-quantile` (the original neuron model): per-gene quantile edges of the non-zero
//!   values of training cells, saved with the run and reused by evaluation;
//! - `cell-quantile` (scGPT, Cui et al. 2024): equal-frequency bins of the cell's own non-zero
//!   values; equal values share the bin of their lowest rank, so ties are deterministic.
//!
//! And two rankings of the cell's expressed genes, highest first; the order carries the
//! information (the "bin" of a position is its rank), so a cell's depth changes little but
//! which genes make its top list:
//! - `rank-value` (Geneformer, Theodoris et al. 2023): CP10k over each gene's median among the
//!   training cells that express it, which lifts rarely high genes into the list;
//! - `rank-expression`: CP10k itself, so the list is the cell's most expressed genes. A linear
//!   read-out of its top-256 ranks separates the types of panels that are not variable-gene
//!   selections (MetaNeighbor's, Furlan's unselected) as well as all genes' log expression
//!   does, where the median-normalized ranks lose 0.09 and 0.21; on selected panels the two
//!   agree (benches/README.md, "Which genes make the list").

use std::path::Path;

use common::norm::cp10k_scale_f32;
use serde::{Deserialize, Serialize};

use crate::cells::CellSet;
use crate::corpus::{sample_blocks, Corpus};
use crate::error::{DataError, Result};
use crate::rng::Purpose;

/// Special tokens after the regular ones, in both token streams: bins are followed by `[MASK]`,
/// padding and `[CLS]` (`Vocab`), genes by `[CLS]`, padding and `[MASK]` (`Tokenizer::gene_*`).
/// Embedding tables have this many rows beyond the bins or genes.
pub const SPECIAL_TOKENS: usize = 3;

/// Token ids for an expression vocabulary of `n_bins` bins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vocab {
    pub n_bins: usize,
}

impl Vocab {
    /// Bin token replacing a masked position.
    pub fn mask(&self) -> i64 {
        self.n_bins as i64
    }
    /// Bin token of padding.
    pub fn pad(&self) -> i64 {
        self.n_bins as i64 + 1
    }
    /// Bin token of the `[CLS]` position.
    pub fn cls(&self) -> i64 {
        self.n_bins as i64 + 2
    }
    /// Size of the bin-token embedding table.
    pub fn size(&self) -> usize {
        self.n_bins + SPECIAL_TOKENS
    }
}

/// Which binning a tokenizer uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Binning {
    /// `edges[g]` has `n_bins - 2` ascending edges, or is empty for a gene never seen non-zero.
    GeneQuantile { edges: Vec<Vec<f32>>, fit_cells: usize },
    CellQuantile,
    /// `medians[g]`: the median CP10k value of gene g where it is expressed (0: never seen).
    RankValue { medians: Vec<f32>, fit_cells: usize },
    /// Ranked by CP10k alone: nothing to fit.
    RankExpression,
}

/// Turns counts into bins for a fixed gene order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tokenizer {
    pub vocab: Vocab,
    /// Gene names in token order (= the store's var order).
    pub genes: Vec<String>,
    pub binning: Binning,
}

/// Which binning to build, as written in configs (`tokenizer.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BinningKind {
    GeneQuantile,
    CellQuantile,
    RankValue,
    RankExpression,
}

impl BinningKind {
    /// Whether sequences are ranked expressed genes (a rank per position) rather than binned values.
    pub fn is_ranked(self) -> bool {
        matches!(self, BinningKind::RankValue | BinningKind::RankExpression)
    }
}

impl Binning {
    /// The config kind this binning was fitted as, so kind-level questions have one answer.
    pub fn kind(&self) -> BinningKind {
        match self {
            Binning::GeneQuantile { .. } => BinningKind::GeneQuantile,
            Binning::CellQuantile => BinningKind::CellQuantile,
            Binning::RankValue { .. } => BinningKind::RankValue,
            Binning::RankExpression => BinningKind::RankExpression,
        }
    }
}

impl Tokenizer {
    /// Builds a tokenizer over the corpus vocabulary; `gene-quantile` edges and `rank-value`
    /// medians are fitted per gene on (a whole-chunk sample of at most `max_fit_cells` of)
    /// `train_cells`, over the cells whose store measures the gene.
    pub fn fit(corpus: &Corpus, train_cells: &CellSet, kind: BinningKind, n_bins: usize, max_fit_cells: usize, seed: u64) -> Result<Self> {
        if n_bins < 3 {
            return Err(DataError::Config(format!("tokenizer.n_bins = {n_bins}: need at least 3 (zero + two expression bins)")));
        }
        let genes = corpus.vocabulary.clone();
        let binning = match kind {
            BinningKind::CellQuantile => Binning::CellQuantile,
            BinningKind::RankExpression => Binning::RankExpression,
            BinningKind::GeneQuantile => {
                let (values, fit_cells) = nonzero_values(corpus, train_cells, genes.len(), max_fit_cells, seed)?;
                let edges = values.into_iter().map(|mut v| quantile_edges(&mut v, n_bins)).collect();
                Binning::GeneQuantile { edges, fit_cells }
            }
            BinningKind::RankValue => {
                let (values, fit_cells) = nonzero_values(corpus, train_cells, genes.len(), max_fit_cells, seed)?;
                // Medians of CP10k (NumPy's interpolation): the ranking divides normalized
                // counts by them, as Geneformer does.
                let medians = values
                    .into_iter()
                    .map(|v| {
                        let mut cp10k: Vec<f32> = v.iter().map(|x| x.exp_m1()).collect();
                        quantile_edges(&mut cp10k, 3).first().copied().unwrap_or(0.0)
                    })
                    .collect();
                Binning::RankValue { medians, fit_cells }
            }
        };
        Ok(Tokenizer { vocab: Vocab { n_bins }, genes, binning })
    }

    /// Gene token of the `[CLS]` position (gene tokens are gene indices, then these specials).
    pub fn gene_cls(&self) -> i64 {
        self.genes.len() as i64
    }
    /// Gene token of padding (and of genes a dataset does not measure).
    pub fn gene_pad(&self) -> i64 {
        self.genes.len() as i64 + 1
    }
    /// Gene token hiding a masked gene in ranked sequences.
    pub fn gene_mask(&self) -> i64 {
        self.genes.len() as i64 + 2
    }
    /// Size of the gene-token embedding table.
    pub fn gene_table_size(&self) -> usize {
        self.genes.len() + SPECIAL_TOKENS
    }

    /// Whether sequences are ranked expressed genes (`rank-value`, `rank-expression`) rather
    /// than binned values.
    pub fn is_ranked(&self) -> bool {
        self.binning.kind().is_ranked()
    }

    /// Ranking scores of a cell's non-zero entries (CP10k, over the gene's median for
    /// `rank-value`; larger ranks first), into `out`. Genes never seen expressed in training
    /// score their CP10k value.
    pub fn rank_scores(&self, idx: &[u32], counts: &[f32], out: &mut Vec<f32>) {
        out.clear();
        let total: f32 = counts.iter().sum();
        let scale = cp10k_scale_f32(total);
        let medians = match &self.binning {
            Binning::RankValue { medians, .. } => Some(medians),
            _ => None,
        };
        out.extend(idx.iter().zip(counts).map(|(&g, &c)| {
            let m = medians.map_or(1.0, |m| m[g as usize]);
            c * scale / if m > 0.0 { m } else { 1.0 }
        }));
    }

    /// Bins of a cell's non-zero entries (`idx` genes, `counts` raw values), into `out`.
    pub fn bin_nonzero(&self, idx: &[u32], counts: &[f32], out: &mut Vec<i64>) {
        out.clear();
        match &self.binning {
            Binning::GeneQuantile { edges, .. } => {
                // Same arithmetic as `normalize`, fused to avoid a buffer on the hot path.
                let total: f32 = counts.iter().sum();
                let scale = cp10k_scale_f32(total);
                out.extend(idx.iter().zip(counts).map(|(&g, &c)| {
                    let x = (c * scale).ln_1p();
                    if x <= 0.0 {
                        0
                    } else {
                        1 + edges[g as usize].partition_point(|&e| e < x) as i64
                    }
                }));
            }
            // Ranked sequences carry no bins; an expressed gene is bin 1.
            Binning::RankValue { .. } | Binning::RankExpression => out.extend(counts.iter().map(|&c| i64::from(c > 0.0))),
            Binning::CellQuantile => {
                let mut norm = Vec::with_capacity(counts.len());
                normalize(counts, &mut norm);
                let mut order: Vec<usize> = (0..norm.len()).filter(|&i| norm[i] > 0.0).collect();
                order.sort_by(|&a, &b| norm[a].total_cmp(&norm[b]).then(idx[a].cmp(&idx[b])));
                out.resize(norm.len(), 0);
                let m = order.len();
                let mut rank_of_value = 0;
                for (r, &i) in order.iter().enumerate() {
                    if r == 0 || norm[i] != norm[order[r - 1]] {
                        rank_of_value = r;
                    }
                    out[i] = 1 + (rank_of_value * (self.vocab.n_bins - 1) / m) as i64;
                }
            }
        }
    }

    /// Writes the tokenizer as JSON atomically (temp file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec(self).map_err(|e| DataError::Internal(e.to_string()))?;
        crate::write_atomic(path, &json)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::NotFound { path: path.to_path_buf() },
            _ => DataError::io(path, e),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| DataError::input(path, format!("not a neurofm tokenizer: {e}")))
    }
}

/// log1p(CP10k) values of the non-zero entries of (a deterministic whole-chunk sample of at
/// most `max_cells` of) `cells`, per gene; and how many cells were read.
fn nonzero_values(corpus: &Corpus, cells: &CellSet, n_genes: usize, max_cells: usize, seed: u64) -> Result<(Vec<Vec<f32>>, usize)> {
    let sample = sample_blocks(cells, max_cells, |c| corpus.block_of(c), seed, Purpose::TokenizerSample);
    let mut values: Vec<Vec<f32>> = vec![Vec::new(); n_genes];
    for chunk in sample.chunks(4096) {
        let block = corpus.read_cells(chunk)?;
        let mut norm = Vec::new();
        for i in 0..block.n_rows() {
            let (idx, val) = block.row(i);
            normalize(val, &mut norm);
            for (&g, &x) in idx.iter().zip(&norm) {
                if x > 0.0 {
                    values[g as usize].push(x);
                }
            }
        }
    }
    Ok((values, sample.len()))
}

/// `log1p(x / total × 10⁴)` for one cell's values (total over the stored genes).
pub fn normalize(counts: &[f32], out: &mut Vec<f32>) {
    let total: f32 = counts.iter().sum();
    let scale = cp10k_scale_f32(total);
    out.clear();
    out.extend(counts.iter().map(|&c| (c * scale).ln_1p()));
}

/// `n_bins - 2` edges at quantiles k/(n_bins-1), k = 1..n_bins-2, with NumPy's default linear
/// interpolation; empty when the gene has no values.
pub fn quantile_edges(values: &mut [f32], n_bins: usize) -> Vec<f32> {
    if values.is_empty() {
        return Vec::new();
    }
    values.sort_by(f32::total_cmp);
    let n = values.len();
    (1..n_bins - 1)
        .map(|k| {
            let h = (n - 1) as f64 * k as f64 / (n_bins - 1) as f64;
            let lo = h.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            (values[lo] as f64 + (h - lo as f64) * (values[hi] as f64 - values[lo] as f64)) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gene_tok(edges: Vec<Vec<f32>>, n_bins: usize) -> Tokenizer {
        Tokenizer { vocab: Vocab { n_bins }, genes: vec![], binning: Binning::GeneQuantile { edges, fit_cells: 0 } }
    }

    #[test]
    fn quantile_edges_match_numpy() {
        // np.quantile([1,2,3,4,5], [0.25, 0.5, 0.75]) == [2, 3, 4]
        assert_eq!(quantile_edges(&mut [5.0, 1.0, 3.0, 2.0, 4.0], 5), vec![2.0, 3.0, 4.0]);
        // np.quantile([0, 10], [1/3, 2/3]) == [3.333.., 6.666..]
        let e = quantile_edges(&mut [0.0, 10.0], 4);
        assert!((e[0] - 10.0 / 3.0).abs() < 1e-5 && (e[1] - 20.0 / 3.0).abs() < 1e-5);
        assert!(quantile_edges(&mut [], 5).is_empty());
    }

    #[test]
    fn normalize_scales_to_ten_thousand_then_log1p() {
        let mut out = Vec::new();
        normalize(&[1.0, 3.0], &mut out);
        assert!((out[0] - 2500f32.ln_1p()).abs() < 1e-4 && (out[1] - 7500f32.ln_1p()).abs() < 1e-4);
        normalize(&[0.0, 0.0], &mut out);
        assert_eq!(out, vec![0.0, 0.0]);
    }

    #[test]
    fn gene_quantile_bins_are_right_closed_and_zero_is_bin_zero() {
        // One gene, counts [1, 1]: each normalizes to log1p(5000) ≈ 8.517.
        let x = 5000f32.ln_1p();
        let t = gene_tok(vec![vec![x - 1.0, x, x + 1.0], vec![]], 5);
        let mut out = Vec::new();
        t.bin_nonzero(&[0, 1], &[1.0, 1.0], &mut out);
        assert_eq!(out, vec![2, 1], "x equals the 2nd edge → bin 2; unseen gene → bin 1");
        t.bin_nonzero(&[0, 1], &[0.0, 5.0], &mut out);
        assert_eq!(out[0], 0);
    }

    #[test]
    fn cell_quantile_is_equal_frequency_with_shared_bins_for_ties() {
        let t = Tokenizer { vocab: Vocab { n_bins: 5 }, genes: vec![], binning: Binning::CellQuantile };
        let mut out = Vec::new();
        // Four distinct values → bins 1..4; ties share the lower bin.
        t.bin_nonzero(&[0, 1, 2, 3], &[4.0, 1.0, 3.0, 2.0], &mut out);
        assert_eq!(out, vec![4, 1, 3, 2]);
        t.bin_nonzero(&[0, 1, 2, 3], &[2.0, 2.0, 0.0, 5.0], &mut out);
        assert_eq!(out, vec![1, 1, 0, 3]);
    }

    #[test]
    fn vocab_special_ids_follow_the_bins() {
        let v = Vocab { n_bins: 20 };
        assert_eq!((v.mask(), v.pad(), v.cls(), v.size()), (20, 21, 22, 23));
    }
}
