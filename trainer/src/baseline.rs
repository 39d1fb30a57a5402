//! Context-free predictors the model must beat, scored on the same validation masks.
//!
//! The original study's perplexity after one epoch (8.45) was exactly that of predicting the
//! global bin frequencies, and a per-gene table of bin frequencies already reached 6.85: a
//! model is only learning expression context when it beats the per-gene table.
//!
//! Both tables hold the bins of *masked* positions, the distribution a context-free model
//! trained on the same objective would learn (masking favours expressed genes, so it differs
//! from a gene's marginal bin frequencies). They are exact expectations over the masking: each
//! gene position of a training sequence counts with its probability of being masked.
//!
//! For ranked sequences the masked target is a gene, and the context-free table is each rank's
//! gene frequencies (a gene's typical place in the ranking), over 64 rank buckets.

use dataloader::mask::{mask_counts, Batcher, MaskConfig, MaskedBatch, IGNORE, VALIDATION_EPOCH};
use dataloader::shard::CellBatch;
use dataloader::corpus::Corpus;

use crate::error::Result;

/// Add-½ smoothing: no bin seen in validation gets probability zero.
const PSEUDOCOUNT: f64 = 0.5;

/// Rank buckets of the ranked table.
const RANK_BUCKETS: usize = 64;

/// Expected target counts at masked positions, per key (a gene, or a rank bucket for ranked
/// sequences) and overall, over training cells.
pub struct BinFrequencies {
    n_bins: usize,
    /// `per_gene[key * n_bins + target]`.
    per_gene: Vec<f64>,
    global: Vec<f64>,
    /// Ranked sequences: keys are rank buckets of this many positions.
    ranked: Option<usize>,
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
    /// Counts over `cells` (use training cells) with the run's sequences (`unmasked` builds them
    /// without masks) and masking settings.
    pub fn fit(corpus: &Corpus, unmasked: &Batcher, mask: MaskConfig, cells: &[u32]) -> Result<BinFrequencies> {
        let tok = &unmasked.tokenizer;
        let ranked = tok.is_ranked().then_some(tok.vocab.n_bins);
        let (n_keys, n_bins) = if ranked.is_some() { (RANK_BUCKETS, tok.genes.len()) } else { (tok.genes.len(), tok.vocab.n_bins) };
        let mut per_gene = vec![0f64; n_keys * n_bins];
        for chunk in cells.chunks(1024) {
            let b = unmasked.build(&CellBatch { cells: chunk.to_vec(), counts: corpus.read_cells(chunk)? }, VALIDATION_EPOCH);
            let v = b.first();
            for i in 0..b.batch_size {
                // Gene positions of this sequence: not [CLS] (position 0), not padding.
                let row = i * b.seq_len + 1..(i + 1) * b.seq_len;
                if let Some(positions) = ranked {
                    // Every position is equally likely to be masked.
                    for p in row.filter(|&p| !v.padding[p]) {
                        per_gene[rank_bucket(v.input_bins[p], positions) * n_bins + v.gene_ids[p] as usize] += mask.ratio;
                    }
                    continue;
                }
                let genes: Vec<(usize, usize)> =
                    row.filter(|&p| !v.padding[p]).map(|p| (v.gene_ids[p] as usize, v.input_bins[p] as usize)).collect();
                let nonzero = genes.iter().filter(|g| g.1 > 0).count();
                let zero = genes.len() - nonzero;
                let (m_nz, m_zero) = mask_counts(nonzero, zero, mask);
                let p_nz = if nonzero > 0 { m_nz as f64 / nonzero as f64 } else { 0.0 };
                let p_zero = if zero > 0 { m_zero as f64 / zero as f64 } else { 0.0 };
                for (g, bin) in genes {
                    per_gene[g * n_bins + bin] += if bin > 0 { p_nz } else { p_zero };
                }
            }
        }
        let mut global = vec![0f64; n_bins];
        for (i, c) in per_gene.iter().enumerate() {
            global[i % n_bins] += c;
        }
        Ok(BinFrequencies { n_bins, per_gene, global, ranked })
    }

    /// Scores the masked positions of a batch's first view (gene ids ≥ n_genes are special
    /// tokens, never masked).
    pub fn score(&self, batch: &MaskedBatch) -> BaselineScore {
        let nb = self.n_bins as f64;
        let total_global: f64 = self.global.iter().sum();
        let mut s = BaselineScore::default();
        let v = batch.first();
        for (p, &t) in v.targets.iter().enumerate() {
            if t == IGNORE {
                continue;
            }
            let g = match self.ranked {
                Some(positions) => rank_bucket(v.input_bins[p], positions),
                None => v.gene_ids[p] as usize,
            };
            let t = t as usize;
            let row = &self.per_gene[g * self.n_bins..(g + 1) * self.n_bins];
            let p_gene = (row[t] + PSEUDOCOUNT) / (row.iter().sum::<f64>() + PSEUDOCOUNT * nb);
            let p_global = (self.global[t] + PSEUDOCOUNT) / (total_global + PSEUDOCOUNT * nb);
            s.per_gene_nll -= p_gene.ln();
            s.global_nll -= p_global.ln();
            s.n_masked += 1;
        }
        s
    }
}

/// The bucket of rank `rank` among `positions`.
fn rank_bucket(rank: i64, positions: usize) -> usize {
    (rank.max(0) as usize * RANK_BUCKETS / positions.max(1)).min(RANK_BUCKETS - 1)
}
