//! Context-free predictors the model must beat, scored on the same validation masks.
//!
//! The original study's perplexity after one epoch (8.45) was exactly that of predicting the
//! global bin frequencies, and a per-gene table of bin frequencies already reached 6.85: a
//! model is only learning expression context when it beats the per-gene table.

use dataloader::mask::{MaskedBatch, IGNORE};
use dataloader::store::Store;
use dataloader::tokenize::Tokenizer;

use crate::error::Result;

/// Add-½ smoothing: no bin seen in validation gets probability zero.
const PSEUDOCOUNT: f64 = 0.5;

/// Bin frequencies per gene and overall, counted on training cells.
pub struct BinFrequencies {
    n_bins: usize,
    /// `per_gene[g * n_bins + b]`.
    per_gene: Vec<u64>,
    global: Vec<u64>,
    n_cells: u64,
}

/// Negative log-likelihood sums of both predictors over masked positions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BaselineScore {
    pub per_gene_nll: f64,
    pub global_nll: f64,
    pub n_masked: u64,
}

impl BaselineScore {
    pub fn add(&mut self, other: BaselineScore) {
        self.per_gene_nll += other.per_gene_nll;
        self.global_nll += other.global_nll;
        self.n_masked += other.n_masked;
    }

    /// (per-gene, global) perplexities.
    pub fn perplexities(&self) -> (f64, f64) {
        let n = self.n_masked.max(1) as f64;
        ((self.per_gene_nll / n).exp(), (self.global_nll / n).exp())
    }
}

impl BinFrequencies {
    /// Counts bins of `cells` (use the training cells) with the run's tokenizer.
    pub fn fit(store: &Store, tokenizer: &Tokenizer, cells: &[u32]) -> Result<BinFrequencies> {
        let (n_genes, n_bins) = (tokenizer.genes.len(), tokenizer.vocab.n_bins);
        let mut per_gene = vec![0u64; n_genes * n_bins];
        let mut bins = Vec::new();
        for chunk in cells.chunks(4096) {
            let rows: Vec<usize> = chunk.iter().map(|&c| c as usize).collect();
            let block = store.read_cells(&rows)?;
            for i in 0..block.n_rows() {
                let (idx, val) = block.row(i);
                tokenizer.bin_nonzero(idx, val, &mut bins);
                for (&g, &b) in idx.iter().zip(&bins) {
                    per_gene[g as usize * n_bins + b as usize] += 1;
                }
            }
        }
        // Bin 0 of a gene: the cells where it was not stored (or binned to zero).
        let n_cells = cells.len() as u64;
        for g in 0..n_genes {
            let row = &mut per_gene[g * n_bins..(g + 1) * n_bins];
            let nonzero: u64 = row[1..].iter().sum();
            row[0] = n_cells - nonzero;
        }
        let mut global = vec![0u64; n_bins];
        for (i, c) in per_gene.iter().enumerate() {
            global[i % n_bins] += c;
        }
        Ok(BinFrequencies { n_bins, per_gene, global, n_cells })
    }

    /// Scores the masked positions of a batch (gene ids ≥ n_genes are special tokens, never masked).
    pub fn score(&self, batch: &MaskedBatch) -> BaselineScore {
        let nb = self.n_bins as f64;
        let total_global: u64 = self.global.iter().sum();
        let mut s = BaselineScore::default();
        for (&g, &t) in batch.gene_ids.iter().zip(&batch.target_bins) {
            if t == IGNORE {
                continue;
            }
            let (g, t) = (g as usize, t as usize);
            let p_gene = (self.per_gene[g * self.n_bins + t] as f64 + PSEUDOCOUNT) / (self.n_cells as f64 + PSEUDOCOUNT * nb);
            let p_global = (self.global[t] as f64 + PSEUDOCOUNT) / (total_global as f64 + PSEUDOCOUNT * nb);
            s.per_gene_nll -= p_gene.ln();
            s.global_nll -= p_global.ln();
            s.n_masked += 1;
        }
        s
    }
}
