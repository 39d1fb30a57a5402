//! Sequences and masks: a `CellBatch` of counts becomes a `MaskedBatch` of plain arrays.
//!
//! Sequence per cell: `[CLS]` then genes, either the whole panel in gene order or the non-zero
//! genes plus sampled zero genes up to `max_len` (shorter sequences on sparse data).
//! Masking replaces `ratio` of the gene positions by `[MASK]`, `nonzero_fraction` of them
//! drawn among non-zero genes and the rest among zero genes (the original study's "half on
//! expressed genes"). Everything random is keyed by (seed, epoch, cell), so any batch can be
//! rebuilt on any rank.

use std::sync::Arc;

use rand::seq::index::sample;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::rng::rng_for;
use crate::shard::CellBatch;
use crate::tokenize::Tokenizer;

/// Target value of positions that carry no loss (PyTorch's `ignore_index` default).
pub const IGNORE: i64 = -100;
/// Epoch key for validation masks: fixed, so every validation pass sees the same masks.
pub const VALIDATION_EPOCH: u64 = u64::MAX;

/// Which genes make up a cell's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SequenceMode {
    #[default]
    FullPanel,
    NonzeroPlusZeros { max_len: usize },
}

/// How many and which positions to mask.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskConfig {
    pub ratio: f64,
    pub nonzero_fraction: f64,
    pub seed: u64,
}

/// A batch ready for the model: row-major `[batch, seq_len]` arrays.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedBatch {
    pub batch_size: usize,
    pub seq_len: usize,
    /// Gene token per position: gene index, or `n_genes` for `[CLS]`, `n_genes + 1` for padding.
    pub gene_ids: Vec<i64>,
    /// Bin token per position (with `[MASK]`, `[PAD]`, `[CLS]` ids from `Vocab`).
    pub input_bins: Vec<i64>,
    /// True bin at masked positions, `IGNORE` elsewhere.
    pub target_bins: Vec<i64>,
    /// True at padding positions.
    pub padding: Vec<bool>,
    /// Store rows of the cells.
    pub cells: Vec<u32>,
}

impl MaskedBatch {
    /// Number of positions that carry loss.
    pub fn n_masked(&self) -> usize {
        self.target_bins.iter().filter(|&&t| t != IGNORE).count()
    }
}

/// Builds `MaskedBatch`es from raw counts.
#[derive(Debug, Clone)]
pub struct Batcher {
    pub tokenizer: Arc<Tokenizer>,
    pub mode: SequenceMode,
    /// `None`: no masking (embedding extraction).
    pub mask: Option<MaskConfig>,
}

impl Batcher {
    pub fn new(tokenizer: Arc<Tokenizer>, mode: SequenceMode, mask: Option<MaskConfig>) -> Result<Self> {
        if let Some(m) = mask {
            if !(0.0..=1.0).contains(&m.ratio) || !(0.0..=1.0).contains(&m.nonzero_fraction) {
                return Err(DataError::Config(format!("mask ratio {} and nonzero_fraction {} must be in [0, 1]", m.ratio, m.nonzero_fraction)));
            }
        }
        if let SequenceMode::NonzeroPlusZeros { max_len } = mode {
            if max_len < 2 {
                return Err(DataError::Config("sequence max_len must be ≥ 2 ([CLS] + one gene)".into()));
            }
        }
        Ok(Batcher { tokenizer, mode, mask })
    }

    fn n_genes(&self) -> usize {
        self.tokenizer.genes.len()
    }

    /// Sequence length (including `[CLS]`) every cell is padded to.
    pub fn seq_len(&self) -> usize {
        match self.mode {
            SequenceMode::FullPanel => self.n_genes() + 1,
            SequenceMode::NonzeroPlusZeros { max_len } => max_len.min(self.n_genes() + 1),
        }
    }

    /// Tokenizes and masks a batch for `epoch` (use `VALIDATION_EPOCH` for fixed masks).
    pub fn build(&self, batch: &CellBatch, epoch: u64) -> MaskedBatch {
        let (b, l) = (batch.cells.len(), self.seq_len());
        let vocab = self.tokenizer.vocab;
        let g_cls = self.n_genes() as i64;
        let mut out = MaskedBatch {
            batch_size: b,
            seq_len: l,
            gene_ids: vec![g_cls + 1; b * l],
            input_bins: vec![vocab.pad(); b * l],
            target_bins: vec![IGNORE; b * l],
            padding: vec![true; b * l],
            cells: batch.cells.clone(),
        };
        let mut nz_bins = Vec::new();
        let mut genes: Vec<u32> = Vec::with_capacity(l);
        let mut bins: Vec<i64> = Vec::with_capacity(l);
        for (i, &cell) in batch.cells.iter().enumerate() {
            let (idx, counts) = batch.counts.row(i);
            self.tokenizer.bin_nonzero(idx, counts, &mut nz_bins);
            self.sequence(idx, &nz_bins, cell, epoch, &mut genes, &mut bins);
            let row = i * l;
            out.gene_ids[row] = g_cls;
            out.input_bins[row] = vocab.cls();
            out.padding[row] = false;
            for (k, (&g, &bin)) in genes.iter().zip(&bins).enumerate() {
                out.gene_ids[row + 1 + k] = g as i64;
                out.input_bins[row + 1 + k] = bin;
                out.padding[row + 1 + k] = false;
            }
            if let Some(m) = self.mask {
                for p in mask_positions(&bins, m, cell, epoch) {
                    out.target_bins[row + 1 + p] = bins[p];
                    out.input_bins[row + 1 + p] = vocab.mask();
                }
            }
        }
        out
    }

    /// The cell's gene positions (ascending gene order) and their bins.
    fn sequence(&self, idx: &[u32], nz_bins: &[i64], cell: u32, epoch: u64, genes: &mut Vec<u32>, bins: &mut Vec<i64>) {
        genes.clear();
        bins.clear();
        let n = self.n_genes();
        match self.mode {
            SequenceMode::FullPanel => {
                genes.extend(0..n as u32);
                bins.resize(n, 0);
                for (&g, &b) in idx.iter().zip(nz_bins) {
                    bins[g as usize] = b;
                }
            }
            SequenceMode::NonzeroPlusZeros { max_len } => {
                let want = (max_len - 1).min(n);
                let nonzero: Vec<(u32, i64)> = idx.iter().copied().zip(nz_bins.iter().copied()).filter(|&(_, b)| b > 0).collect();
                let mut rng = rng_for(&[self.mask.map(|m| m.seed).unwrap_or(0), 30, epoch, cell as u64]);
                let mut chosen: Vec<(u32, i64)> = if nonzero.len() > want {
                    let mut pick = sample(&mut rng, nonzero.len(), want).into_vec();
                    pick.sort_unstable();
                    pick.into_iter().map(|k| nonzero[k]).collect()
                } else {
                    nonzero.clone()
                };
                let zeros_needed = want - chosen.len();
                if zeros_needed > 0 {
                    let mut is_nz = vec![false; n];
                    for &(g, _) in &nonzero {
                        is_nz[g as usize] = true;
                    }
                    let zero_genes: Vec<u32> = (0..n as u32).filter(|&g| !is_nz[g as usize]).collect();
                    let take = zeros_needed.min(zero_genes.len());
                    chosen.extend(sample(&mut rng, zero_genes.len(), take).into_iter().map(|k| (zero_genes[k], 0)));
                    chosen.sort_unstable_by_key(|&(g, _)| g);
                }
                for (g, b) in chosen {
                    genes.push(g);
                    bins.push(b);
                }
            }
        }
    }
}

/// Positions (into the gene positions, `[CLS]` excluded) to mask for one cell:
/// `nonzero_fraction` of them among expressed genes and the rest among unexpressed ones, as the
/// original study did (so always guessing bin 0 scores `1 - nonzero_fraction`). When a cell
/// lacks genes of one kind, the shortfall is drawn from the other.
pub fn mask_positions(bins: &[i64], m: MaskConfig, cell: u32, epoch: u64) -> Vec<usize> {
    let n = bins.len();
    let n_mask = ((m.ratio * n as f64).round() as usize).min(n);
    if n_mask == 0 {
        return Vec::new();
    }
    let mut rng = rng_for(&[m.seed, 31, epoch, cell as u64]);
    let (nonzero, zero): (Vec<usize>, Vec<usize>) = (0..n).partition(|&p| bins[p] > 0);
    let (n_nz, n_zero) = mask_counts(nonzero.len(), zero.len(), m);
    let mut out: Vec<usize> = sample(&mut rng, nonzero.len(), n_nz).into_iter().map(|k| nonzero[k]).collect();
    out.extend(sample(&mut rng, zero.len(), n_zero).into_iter().map(|k| zero[k]));
    out.sort_unstable();
    out
}

/// How many expressed and unexpressed positions `mask_positions` masks in a sequence with
/// `nonzero` expressed and `zero` unexpressed gene positions.
pub fn mask_counts(nonzero: usize, zero: usize, m: MaskConfig) -> (usize, usize) {
    let n = nonzero + zero;
    let n_mask = ((m.ratio * n as f64).round() as usize).min(n);
    let want_nz = (m.nonzero_fraction * n_mask as f64).round() as usize;
    let n_nz = want_nz.min(nonzero).max(n_mask.saturating_sub(zero));
    (n_nz, n_mask - n_nz)
}

/// A `BatchFn` that tokenizes and masks in the reader's worker threads.
pub fn batch_fn(batcher: Batcher, epoch: u64) -> crate::shard::BatchFn<MaskedBatch> {
    Arc::new(move |b: CellBatch| Ok(batcher.build(&b, epoch)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::CsrRows;
    use crate::tokenize::{Binning, Vocab};

    fn batcher(n_genes: usize, mode: SequenceMode, mask: Option<MaskConfig>) -> Batcher {
        let tok = Tokenizer {
            vocab: Vocab { n_bins: 5 },
            genes: (0..n_genes).map(|g| format!("g{g}")).collect(),
            binning: Binning::CellQuantile,
        };
        Batcher::new(Arc::new(tok), mode, mask).unwrap()
    }

    fn cells(dense: &[f32], n_genes: usize) -> CellBatch {
        let n = dense.len() / n_genes;
        CellBatch { cells: (0..n as u32).collect(), counts: CsrRows::from_dense(n, n_genes, dense) }
    }

    const M: MaskConfig = MaskConfig { ratio: 0.25, nonzero_fraction: 0.5, seed: 3 };

    #[test]
    fn full_panel_layout_cls_then_genes_in_order() {
        let b = batcher(4, SequenceMode::FullPanel, None).build(&cells(&[0.0, 1.0, 0.0, 3.0], 4), 0);
        assert_eq!(b.seq_len, 5);
        assert_eq!(b.gene_ids, vec![4, 0, 1, 2, 3]);
        assert_eq!(b.input_bins, vec![7, 0, 1, 0, 3]);
        assert!(b.padding.iter().all(|p| !p));
        assert_eq!(b.n_masked(), 0);
    }

    #[test]
    fn mask_count_and_nonzero_share_are_exact() {
        let n = 40;
        let mut dense = vec![0.0; n];
        for (g, v) in dense.iter_mut().enumerate().take(10) {
            *v = (g + 1) as f32;
        }
        let b = batcher(n, SequenceMode::FullPanel, Some(M)).build(&cells(&dense, n), 1);
        assert_eq!(b.n_masked(), 10, "round(0.25 × 40)");
        let masked_nonzero = (1..=n).filter(|&p| b.target_bins[p] > 0).count();
        assert_eq!(masked_nonzero, 5, "half of the masked positions on expressed genes, half on the others");
        // A cell with only 3 expressed genes: the shortfall comes from unexpressed ones.
        let few: Vec<i64> = (0..40).map(|g| i64::from(g < 3)).collect();
        let pos = mask_positions(&few, M, 0, 0);
        assert_eq!((pos.len(), pos.iter().filter(|&&p| few[p] > 0).count()), (10, 3));
        for p in 0..=n {
            if b.target_bins[p] != IGNORE {
                assert_eq!(b.input_bins[p], 5, "masked input is [MASK]");
            }
        }
        assert_eq!(b.target_bins[0], IGNORE, "[CLS] is never masked");
    }

    #[test]
    fn masks_reproduce_per_epoch_and_change_between_epochs() {
        let dense: Vec<f32> = (0..64).map(|g| (g % 3) as f32).collect();
        let bt = batcher(64, SequenceMode::FullPanel, Some(M));
        let c = cells(&dense, 64);
        assert_eq!(bt.build(&c, 2), bt.build(&c, 2));
        assert_ne!(bt.build(&c, 2).target_bins, bt.build(&c, 3).target_bins);
        assert_eq!(bt.build(&c, VALIDATION_EPOCH), bt.build(&c, VALIDATION_EPOCH));
    }

    #[test]
    fn nonzero_mode_keeps_all_expressed_genes_and_fills_with_zeros() {
        let mut dense = vec![0.0; 20];
        dense[3] = 2.0;
        dense[17] = 1.0;
        let b = batcher(20, SequenceMode::NonzeroPlusZeros { max_len: 6 }, None).build(&cells(&dense, 20), 0);
        assert_eq!(b.seq_len, 6);
        let genes = &b.gene_ids[1..];
        assert!(genes.contains(&3) && genes.contains(&17));
        assert!(genes.windows(2).all(|w| w[0] < w[1]), "genes ascending: {genes:?}");
        assert_eq!(b.input_bins[1..].iter().filter(|&&x| x > 0).count(), 2);
    }

    #[test]
    fn nonzero_mode_subsamples_when_too_many_are_expressed() {
        let dense: Vec<f32> = (1..=30).map(|v| v as f32).collect();
        let b = batcher(30, SequenceMode::NonzeroPlusZeros { max_len: 11 }, None).build(&cells(&dense, 30), 0);
        assert_eq!(b.input_bins[1..].iter().filter(|&&x| x > 0).count(), 10);
    }
}
