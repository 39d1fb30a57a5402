//! Sequences, views and masks: a `CellBatch` of counts becomes a `MaskedBatch` of plain arrays.
//!
//! Sequence per cell: `[CLS]` then genes. Binned tokenizers use the whole panel in gene order,
//! or the non-zero genes plus sampled zero genes up to `max_len` (shorter sequences on sparse
//! data). The rank-value tokenizer uses the cell's expressed genes, highest ranked first, and
//! a position's "bin" is its rank.
//!
//! Each cell becomes one or two *views* (`ViewConfig`): a view may keep only a random fraction
//! of the counts (binomial thinning, the same cell sequenced less deeply), so a contrastive
//! objective can teach the encoder that both views are one cell whatever their depth.
//! Masking replaces `ratio` of a view's gene positions by `[MASK]`; for binned sequences
//! `nonzero_fraction` of them are drawn among non-zero genes and the rest among zero genes (the
//! original study's "half on expressed genes"). Everything random is keyed by (seed, epoch,
//! cell, view), so any batch can be rebuilt on any rank.

use std::sync::Arc;

use rand::seq::index::sample;
use rand::Rng;
use rand_distr::{Binomial, Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::corpus::Panels;
use crate::error::{DataError, Result};
use crate::rng::{rng_for, Purpose};
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

/// How a view's share of the counts is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Thinning {
    /// Keep a fraction U(thin_min, 1) of the cell's counts: a view's depth still follows its
    /// cell's.
    Rate,
    /// Thin to a depth drawn log-uniformly between thin_min × and 1 × the training cells'
    /// median depth (shallower cells keep theirs): a view's depth says little about its cell,
    /// so matching views cannot rely on depth.
    Depth,
}

/// How each training cell is perturbed into views (config section `[views]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ViewConfig {
    /// Views per cell: 1, or 2 for the contrastive objective.
    pub count: usize,
    pub thinning: Thinning,
    /// The low end of the thinning (see `Thinning`); 1 keeps the cell as measured.
    pub thin_min: f64,
    /// Score masked positions against the unperturbed cell rather than the thinned view
    /// (scFoundation's read-depth-aware target: predict the deeper cell).
    pub predict_full: bool,
    /// Thin only the second view: the first stays the cell as measured (masked only), the
    /// distribution validation and embeddings see.
    pub keep_first: bool,
    /// Standard deviation of the log of a random factor on each gene's counts, drawn anew
    /// for every view (0: none). Per-gene multiplicative effects are how batches, libraries
    /// and labs differ (ComBat's model): cells seen under them teach invariance to such shifts
    /// (fine-tuning's `[augment]` uses it; for pretraining views it did not help, see
    /// `benches/README.md`).
    pub gene_scale: f64,
}

impl Default for ViewConfig {
    fn default() -> Self {
        ViewConfig::SINGLE
    }
}

impl ViewConfig {
    /// One view, the cell as measured: evaluation, validation and the original recipe.
    pub const SINGLE: ViewConfig = ViewConfig { count: 1, thinning: Thinning::Rate, thin_min: 1.0, predict_full: false, keep_first: false, gene_scale: 0.0 };

    pub fn validate(&self) -> Result<()> {
        if !(1..=2).contains(&self.count) {
            return Err(DataError::Config(format!("views.count = {}: must be 1 or 2", self.count)));
        }
        if !(self.thin_min > 0.0 && self.thin_min <= 1.0) {
            return Err(DataError::Config(format!("views.thin_min = {}: must be in (0, 1]", self.thin_min)));
        }
        if !(0.0..=3.0).contains(&self.gene_scale) {
            return Err(DataError::Config(format!("views.gene_scale = {}: must be a standard deviation in [0, 3]", self.gene_scale)));
        }
        Ok(())
    }

    fn thins(&self) -> bool {
        self.thin_min < 1.0
    }

    /// Whether views differ from the cell as measured (beyond masking).
    pub fn perturbs(&self) -> bool {
        self.thins() || self.gene_scale > 0.0
    }
}

/// One view of every cell of a batch: row-major `[batch, seq_len]` arrays.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// Gene token per position: a gene index, or `Tokenizer::gene_cls/gene_pad/gene_mask`.
    pub gene_ids: Vec<i64>,
    /// Bin token per position (with `[MASK]`, `[PAD]`, `[CLS]` ids from `Vocab`); the rank for
    /// ranked sequences.
    pub input_bins: Vec<i64>,
    /// At masked positions the true bin (binned) or gene (ranked); `IGNORE` elsewhere.
    pub targets: Vec<i64>,
    /// True at padding positions.
    pub padding: Vec<bool>,
    /// log10(1 + total counts) of each cell of this view.
    pub depth: Vec<f32>,
}

impl View {
    fn new(b: usize, l: usize, tok: &Tokenizer) -> View {
        View {
            gene_ids: vec![tok.gene_pad(); b * l],
            input_bins: vec![tok.vocab.pad(); b * l],
            targets: vec![IGNORE; b * l],
            padding: vec![true; b * l],
            depth: vec![0.0; b],
        }
    }

    /// Positions that carry a loss.
    pub fn n_masked(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }
}

/// A batch ready for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedBatch {
    pub batch_size: usize,
    pub seq_len: usize,
    /// One or two views of the same cells.
    pub views: Vec<View>,
    /// Bins of the unperturbed cell at the first view's positions (`[CLS]` and padding ids
    /// where it has them): the targets of the cell-bottleneck objective.
    pub full_bins: Vec<i64>,
    /// log10(1 + total counts) of each unperturbed cell.
    pub depth: Vec<f32>,
    /// Store rows of the cells.
    pub cells: Vec<u32>,
}

impl MaskedBatch {
    /// The first view (the only one outside contrastive training).
    pub fn first(&self) -> &View {
        &self.views[0]
    }

    /// Positions that carry loss in the first view.
    pub fn n_masked(&self) -> usize {
        self.first().n_masked()
    }
}

/// Builds `MaskedBatch`es from raw counts.
#[derive(Debug, Clone)]
pub struct Batcher {
    pub tokenizer: Arc<Tokenizer>,
    pub mode: SequenceMode,
    /// `None`: no masking (embedding extraction).
    pub mask: Option<MaskConfig>,
    pub views: ViewConfig,
    /// The depth `Thinning::Depth` thins towards (the training cells' median total counts).
    pub median_depth: f64,
    /// Which vocabulary genes each cell's dataset measures: the others are left out of its
    /// sequence, never filled in as zeros.
    pub panels: Arc<Panels>,
    /// Seeds the views' perturbations when nothing is masked (fine-tuning's augmentation, so
    /// each classifier of an ensemble sees its own draws); with a mask they follow its seed.
    pub view_seed: u64,
}

impl Batcher {
    pub fn new(tokenizer: Arc<Tokenizer>, mode: SequenceMode, mask: Option<MaskConfig>, views: ViewConfig) -> Result<Self> {
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
        views.validate()?;
        Ok(Batcher { tokenizer, mode, mask, views, median_depth: 0.0, panels: Arc::new(Panels::default()), view_seed: 0 })
    }

    /// Sets which genes each cell's dataset measures (default: every vocabulary gene).
    pub fn with_panels(mut self, panels: Arc<Panels>) -> Self {
        self.panels = panels;
        self
    }

    /// Sets the seed of unmasked views' perturbations (see `view_seed`).
    pub fn with_view_seed(mut self, seed: u64) -> Self {
        self.view_seed = seed;
        self
    }

    /// Sets the depth that `Thinning::Depth` thins towards.
    pub fn with_median_depth(mut self, depth: f64) -> Self {
        self.median_depth = depth;
        self
    }

    fn n_genes(&self) -> usize {
        self.tokenizer.genes.len()
    }

    /// Sequence length (including `[CLS]`) every cell is padded to.
    pub fn seq_len(&self) -> usize {
        sequence_len(self.mode, self.n_genes())
    }

    /// Tokenizes, perturbs and masks a batch for `epoch` (use `VALIDATION_EPOCH` for fixed masks).
    pub fn build(&self, batch: &CellBatch, epoch: u64) -> MaskedBatch {
        let (b, l) = (batch.cells.len(), self.seq_len());
        let tok = &self.tokenizer;
        let mut out = MaskedBatch {
            batch_size: b,
            seq_len: l,
            views: (0..self.views.count).map(|_| View::new(b, l, tok)).collect(),
            full_bins: vec![tok.vocab.pad(); b * l],
            depth: vec![0.0; b],
            cells: batch.cells.clone(),
        };
        let mut scratch = CellScratch::new(self.n_genes());
        let mut thinned = Vec::new();
        for (i, &cell) in batch.cells.iter().enumerate() {
            let (idx, counts) = batch.counts.row(i);
            out.depth[i] = depth_of(counts);
            if tok.is_ranked() {
                for v in 0..self.views.count {
                    let c = self.view_counts(counts, cell, epoch, v, &mut thinned);
                    self.ranked_row(&mut out.views[v], i, idx, c, cell, epoch, v);
                }
                out.full_bins[i * l..(i + 1) * l].copy_from_slice(&out.views[0].input_bins[i * l..(i + 1) * l]);
                continue;
            }
            let mut nz_bins = std::mem::take(&mut scratch.nz_bins);
            tok.bin_nonzero(idx, counts, &mut nz_bins);
            let (genes, full) = self.sequence(idx, &nz_bins, cell, epoch, &mut scratch);
            scratch.nz_bins = nz_bins;
            let row = i * l;
            out.full_bins[row] = tok.vocab.cls();
            for (k, &bin) in full.iter().enumerate() {
                out.full_bins[row + 1 + k] = bin;
            }
            for v in 0..self.views.count {
                let c = self.view_counts(counts, cell, epoch, v, &mut thinned);
                let bins = if std::ptr::eq(c, counts) { full.clone() } else { scratch.bins_at(tok, idx, c, &genes) };
                let view = &mut out.views[v];
                view.depth[i] = depth_of(c);
                view.gene_ids[row] = tok.gene_cls();
                view.input_bins[row] = tok.vocab.cls();
                view.padding[row] = false;
                for (k, (&g, &bin)) in genes.iter().zip(&bins).enumerate() {
                    view.gene_ids[row + 1 + k] = g as i64;
                    view.input_bins[row + 1 + k] = bin;
                    view.padding[row + 1 + k] = false;
                }
                if let Some(m) = self.mask {
                    let truth = if self.views.predict_full { &full } else { &bins };
                    for p in mask_positions(&bins, m, cell, epoch, v) {
                        view.targets[row + 1 + p] = truth[p];
                        view.input_bins[row + 1 + p] = tok.vocab.mask();
                    }
                }
            }
        }
        out
    }

    /// The counts of view `v` of a cell: thinned and gene-scaled into `buf`, or the measured ones.
    fn view_counts<'a>(&self, counts: &'a [f32], cell: u32, epoch: u64, v: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        if !self.views.perturbs() || epoch == VALIDATION_EPOCH || (v == 0 && self.views.keep_first) {
            return counts;
        }
        let seed = self.mask.map(|m| m.seed).unwrap_or(self.view_seed);
        buf.clear();
        if self.views.thins() {
            let mut rng = rng_for(&[seed, Purpose::ViewThinning as u64, epoch, cell as u64, v as u64]);
            let rate: f64 = match self.views.thinning {
                Thinning::Rate => rng.random_range(self.views.thin_min..=1.0),
                Thinning::Depth => {
                    let target = self.median_depth * rng.random_range(self.views.thin_min.ln()..=0.0).exp();
                    let total: f64 = counts.iter().map(|&c| c as f64).sum();
                    if total > 0.0 { (target / total).min(1.0) } else { 1.0 }
                }
            };
            buf.extend(counts.iter().map(|&c| {
                let n = c.max(0.0).round() as u64;
                Binomial::new(n, rate).map(|d| d.sample(&mut rng) as f32).unwrap_or(c)
            }));
        } else {
            buf.extend_from_slice(counts);
        }
        if self.views.gene_scale > 0.0 {
            let mut rng = rng_for(&[seed, Purpose::ViewGeneScale as u64, epoch, cell as u64, v as u64]);
            let log_factor = Normal::new(0.0, self.views.gene_scale).unwrap_or_else(|_| unreachable!("validated: a finite sigma ≥ 0"));
            for c in buf.iter_mut() {
                *c *= log_factor.sample(&mut rng).exp() as f32;
            }
        }
        buf
    }

    /// The cell's gene positions (ascending gene order) and their bins.
    fn sequence(&self, idx: &[u32], nz_bins: &[i64], cell: u32, epoch: u64, scratch: &mut CellScratch) -> (Vec<u32>, Vec<i64>) {
        let n = self.n_genes();
        let measured = self.panels.measured(cell);
        let is_measured = |g: u32| measured.is_none_or(|m| m[g as usize]);
        let (mut genes, mut bins) = (Vec::new(), Vec::new());
        match self.mode {
            SequenceMode::FullPanel => {
                for (&g, &b) in idx.iter().zip(nz_bins) {
                    scratch.dense[g as usize] = b;
                }
                for g in (0..n as u32).filter(|&g| is_measured(g)) {
                    genes.push(g);
                    bins.push(scratch.dense[g as usize]);
                }
                for &g in idx {
                    scratch.dense[g as usize] = 0;
                }
            }
            SequenceMode::NonzeroPlusZeros { max_len } => {
                let want = (max_len - 1).min(n);
                let nonzero: Vec<(u32, i64)> = idx.iter().copied().zip(nz_bins.iter().copied()).filter(|&(_, b)| b > 0).collect();
                let mut rng = rng_for(&[self.mask.map(|m| m.seed).unwrap_or(0), Purpose::SequenceZeros as u64, epoch, cell as u64]);
                let mut chosen: Vec<(u32, i64)> = if nonzero.len() > want {
                    let mut pick = sample(&mut rng, nonzero.len(), want).into_vec();
                    pick.sort_unstable();
                    pick.into_iter().map(|k| nonzero[k]).collect()
                } else {
                    nonzero.clone()
                };
                let zeros_needed = want - chosen.len();
                if zeros_needed > 0 {
                    for &(g, _) in &nonzero {
                        scratch.mark[g as usize] = true;
                    }
                    let zero_genes: Vec<u32> = (0..n as u32).filter(|&g| !scratch.mark[g as usize] && is_measured(g)).collect();
                    for &(g, _) in &nonzero {
                        scratch.mark[g as usize] = false;
                    }
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
        (genes, bins)
    }

    /// Row `i` of a ranked view: `[CLS]`, then the expressed genes by descending rank score
    /// (ties by gene index), each position's bin its rank; masked positions hide the gene.
    #[allow(clippy::too_many_arguments)]
    fn ranked_row(&self, view: &mut View, i: usize, idx: &[u32], counts: &[f32], cell: u32, epoch: u64, v: usize) {
        let (l, tok) = (self.seq_len(), &self.tokenizer);
        let mut scores = Vec::new();
        tok.rank_scores(idx, counts, &mut scores);
        let mut order: Vec<usize> = (0..idx.len()).filter(|&k| scores[k] > 0.0).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(idx[a].cmp(&idx[b])));
        order.truncate(l - 1);
        let row = i * l;
        view.depth[i] = depth_of(counts);
        view.gene_ids[row] = tok.gene_cls();
        view.input_bins[row] = tok.vocab.cls();
        view.padding[row] = false;
        for (r, &k) in order.iter().enumerate() {
            view.gene_ids[row + 1 + r] = idx[k] as i64;
            view.input_bins[row + 1 + r] = (r as i64).min(tok.vocab.n_bins as i64 - 1);
            view.padding[row + 1 + r] = false;
        }
        if let Some(m) = self.mask {
            let n = order.len();
            let n_mask = ((m.ratio * n as f64).round() as usize).min(n);
            let mut rng = rng_for(&[m.seed, Purpose::Mask as u64, epoch, cell as u64, v as u64]);
            for p in sample(&mut rng, n, n_mask) {
                view.targets[row + 1 + p] = view.gene_ids[row + 1 + p];
                view.gene_ids[row + 1 + p] = tok.gene_mask();
            }
        }
    }
}

/// Sequence length (including `[CLS]`) for `mode` over `n_genes` genes.
pub fn sequence_len(mode: SequenceMode, n_genes: usize) -> usize {
    match mode {
        SequenceMode::FullPanel => n_genes + 1,
        SequenceMode::NonzeroPlusZeros { max_len } => max_len.min(n_genes + 1),
    }
}

/// log10(1 + total counts): the depth a cell-level objective may be told.
fn depth_of(counts: &[f32]) -> f32 {
    (1.0 + counts.iter().sum::<f32>()).log10()
}

/// Per-cell buffers, reused across the cells of a batch.
struct CellScratch {
    nz_bins: Vec<i64>,
    /// Bin of each gene in the current view (only entries of the cell are ever non-zero).
    dense: Vec<i64>,
    mark: Vec<bool>,
    view_bins: Vec<i64>,
}

impl CellScratch {
    fn new(n_genes: usize) -> Self {
        CellScratch { nz_bins: Vec::new(), dense: vec![0; n_genes], mark: vec![false; n_genes], view_bins: Vec::new() }
    }

    /// Bins of a view's counts at the sequence's `genes`.
    fn bins_at(&mut self, tok: &Tokenizer, idx: &[u32], counts: &[f32], genes: &[u32]) -> Vec<i64> {
        tok.bin_nonzero(idx, counts, &mut self.view_bins);
        for (&g, &b) in idx.iter().zip(&self.view_bins) {
            self.dense[g as usize] = b;
        }
        let out = genes.iter().map(|&g| self.dense[g as usize]).collect();
        for &g in idx {
            self.dense[g as usize] = 0;
        }
        out
    }
}

/// Positions (into the gene positions, `[CLS]` excluded) to mask for view `view` of one cell:
/// `nonzero_fraction` of them among expressed genes and the rest among unexpressed ones, as the
/// original study did (so always guessing bin 0 scores `1 - nonzero_fraction`). When a cell
/// lacks genes of one kind, the shortfall is drawn from the other.
pub fn mask_positions(bins: &[i64], m: MaskConfig, cell: u32, epoch: u64, view: usize) -> Vec<usize> {
    let n = bins.len();
    let n_mask = ((m.ratio * n as f64).round() as usize).min(n);
    if n_mask == 0 {
        return Vec::new();
    }
    // The first view keeps the key of single-view runs, so their masks are unchanged.
    let mut rng = match view {
        0 => rng_for(&[m.seed, Purpose::Mask as u64, epoch, cell as u64]),
        v => rng_for(&[m.seed, Purpose::Mask as u64, epoch, cell as u64, v as u64]),
    };
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

    fn tokenizer(n_genes: usize, binning: Binning, n_bins: usize) -> Arc<Tokenizer> {
        Arc::new(Tokenizer { vocab: Vocab { n_bins }, genes: (0..n_genes).map(|g| format!("g{g}")).collect(), binning })
    }

    fn batcher(n_genes: usize, mode: SequenceMode, mask: Option<MaskConfig>) -> Batcher {
        Batcher::new(tokenizer(n_genes, Binning::CellQuantile, 5), mode, mask, ViewConfig::SINGLE).unwrap()
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
        assert_eq!(b.first().gene_ids, vec![4, 0, 1, 2, 3]);
        assert_eq!(b.first().input_bins, vec![7, 0, 1, 0, 3]);
        assert_eq!(b.full_bins, b.first().input_bins, "unmasked, unthinned: the view is the cell");
        assert!(b.first().padding.iter().all(|p| !p));
        assert_eq!(b.n_masked(), 0);
        assert!((b.depth[0] - 5f32.log10()).abs() < 1e-6);
    }

    #[test]
    fn mask_count_and_nonzero_share_are_exact() {
        let n = 40;
        let mut dense = vec![0.0; n];
        for (g, v) in dense.iter_mut().enumerate().take(10) {
            *v = (g + 1) as f32;
        }
        let b = batcher(n, SequenceMode::FullPanel, Some(M)).build(&cells(&dense, n), 1);
        let v = b.first();
        assert_eq!(b.n_masked(), 10, "round(0.25 × 40)");
        let masked_nonzero = (1..=n).filter(|&p| v.targets[p] > 0).count();
        assert_eq!(masked_nonzero, 5, "half of the masked positions on expressed genes, half on the others");
        // A cell with only 3 expressed genes: the shortfall comes from unexpressed ones.
        let few: Vec<i64> = (0..40).map(|g| i64::from(g < 3)).collect();
        let pos = mask_positions(&few, M, 0, 0, 0);
        assert_eq!((pos.len(), pos.iter().filter(|&&p| few[p] > 0).count()), (10, 3));
        for p in 0..=n {
            if v.targets[p] != IGNORE {
                assert_eq!(v.input_bins[p], 5, "masked input is [MASK]");
            }
        }
        assert_eq!(v.targets[0], IGNORE, "[CLS] is never masked");
    }

    #[test]
    fn masks_reproduce_per_epoch_and_change_between_epochs() {
        let dense: Vec<f32> = (0..64).map(|g| (g % 3) as f32).collect();
        let bt = batcher(64, SequenceMode::FullPanel, Some(M));
        let c = cells(&dense, 64);
        assert_eq!(bt.build(&c, 2), bt.build(&c, 2));
        assert_ne!(bt.build(&c, 2).first().targets, bt.build(&c, 3).first().targets);
        assert_eq!(bt.build(&c, VALIDATION_EPOCH), bt.build(&c, VALIDATION_EPOCH));
    }

    #[test]
    fn nonzero_mode_keeps_all_expressed_genes_and_fills_with_zeros() {
        let mut dense = vec![0.0; 20];
        dense[3] = 2.0;
        dense[17] = 1.0;
        let b = batcher(20, SequenceMode::NonzeroPlusZeros { max_len: 6 }, None).build(&cells(&dense, 20), 0);
        assert_eq!(b.seq_len, 6);
        let genes = &b.first().gene_ids[1..];
        assert!(genes.contains(&3) && genes.contains(&17));
        assert!(genes.windows(2).all(|w| w[0] < w[1]), "genes ascending: {genes:?}");
        assert_eq!(b.first().input_bins[1..].iter().filter(|&&x| x > 0).count(), 2);
    }

    #[test]
    fn nonzero_mode_subsamples_when_too_many_are_expressed() {
        let dense: Vec<f32> = (1..=30).map(|v| v as f32).collect();
        let b = batcher(30, SequenceMode::NonzeroPlusZeros { max_len: 11 }, None).build(&cells(&dense, 30), 0);
        assert_eq!(b.first().input_bins[1..].iter().filter(|&&x| x > 0).count(), 10);
    }

    /// Two thinned views of one deep cell: same genes, fewer counts each, different masks;
    /// the full cell's bins stay the bottleneck's targets.
    #[test]
    fn thinned_views_share_positions_and_lose_depth() {
        let n = 50;
        let dense: Vec<f32> = (0..n).map(|g| 20.0 + g as f32).collect();
        let views = ViewConfig { count: 2, thinning: Thinning::Rate, thin_min: 0.2, predict_full: false, keep_first: false, gene_scale: 0.0 };
        let bt = Batcher::new(tokenizer(n, Binning::CellQuantile, 8), SequenceMode::FullPanel, Some(M), views).unwrap();
        let b = bt.build(&cells(&dense, n), 0);
        let full_depth = (1.0 + dense.iter().sum::<f32>()).log10();
        assert_eq!(b.views.len(), 2);
        assert!((b.depth[0] - full_depth).abs() < 1e-5);
        for v in &b.views {
            assert_eq!(v.gene_ids, b.views[0].gene_ids, "same gene positions in both views");
            assert!(v.depth[0] < full_depth, "thinning removes counts: {} vs {full_depth}", v.depth[0]);
            assert_eq!(v.n_masked(), 13);
        }
        assert_ne!(b.views[0].targets, b.views[1].targets, "views are masked independently");
        assert_ne!(b.views[0].depth, b.views[1].depth, "and thinned independently");
        let unmasked_full: Vec<i64> = (1..=n).map(|p| b.full_bins[p]).collect();
        let mut expect = Vec::new();
        bt.tokenizer.bin_nonzero(&(0..n as u32).collect::<Vec<_>>(), &dense, &mut expect);
        assert_eq!(unmasked_full, expect);
        // Validation never thins: a fixed view of the cell as measured.
        let val = bt.build(&cells(&dense, n), VALIDATION_EPOCH);
        assert!((val.views[0].depth[0] - full_depth).abs() < 1e-5);
        // Predicting the full cell scores masked positions against the unthinned bins.
        let rda = Batcher::new(bt.tokenizer.clone(), SequenceMode::FullPanel, Some(M), ViewConfig { predict_full: true, ..views }).unwrap().build(&cells(&dense, n), 0);
        for p in 1..=n {
            if rda.views[0].targets[p] != IGNORE {
                assert_eq!(rda.views[0].targets[p], rda.full_bins[p]);
            }
        }
        // Keeping the first view: it is the cell as measured, the second is thinned.
        let kept = Batcher::new(bt.tokenizer.clone(), SequenceMode::FullPanel, Some(M), ViewConfig { keep_first: true, ..views }).unwrap().build(&cells(&dense, n), 0);
        assert!((kept.views[0].depth[0] - full_depth).abs() < 1e-5 && kept.views[1].depth[0] < full_depth);
    }

    /// Gene-scaled views: every gene's counts carry their own log-normal factor of the
    /// configured spread, drawn anew per view and epoch; validation sees the cell as measured.
    #[test]
    fn gene_scaled_views_multiply_each_gene_by_its_own_factor() {
        let n = 4000;
        let dense = vec![100.0f32; n];
        let views = ViewConfig { count: 2, gene_scale: 0.5, ..ViewConfig::SINGLE };
        let bt = Batcher::new(tokenizer(n, Binning::CellQuantile, 8), SequenceMode::FullPanel, Some(M), views).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let log_ratio = |v: &[f32]| v.iter().map(|&c| (c as f64 / 100.0).ln()).collect::<Vec<_>>();
        let first = log_ratio(bt.view_counts(&dense, 9, 0, 0, &mut a));
        let mean = first.iter().sum::<f64>() / n as f64;
        let sd = (first.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!(mean.abs() < 0.05 && (sd - 0.5).abs() < 0.05, "log factors: mean {mean}, sd {sd}");
        assert_ne!(bt.view_counts(&dense, 9, 0, 1, &mut b), a.as_slice(), "each view draws its own factors");
        assert_ne!(bt.view_counts(&dense, 9, 1, 0, &mut b), a.as_slice(), "and each epoch");
        let unmasked = Batcher::new(bt.tokenizer.clone(), SequenceMode::FullPanel, None, views).unwrap();
        let seeded = unmasked.clone().with_view_seed(5);
        let (mut c, mut d) = (Vec::new(), Vec::new());
        assert_ne!(unmasked.view_counts(&dense, 9, 0, 0, &mut c), seeded.view_counts(&dense, 9, 0, 0, &mut d), "without a mask the view seed draws them");
        assert_eq!(bt.view_counts(&dense, 9, VALIDATION_EPOCH, 0, &mut b), dense.as_slice(), "validation is not perturbed");
        let plain = Batcher::new(bt.tokenizer.clone(), SequenceMode::FullPanel, Some(M), ViewConfig::SINGLE).unwrap();
        assert_eq!(plain.view_counts(&dense, 9, 0, 0, &mut b), dense.as_slice());
        assert!(ViewConfig { gene_scale: -0.1, ..ViewConfig::SINGLE }.validate().unwrap_err().to_string().contains("views.gene_scale"));
    }

    /// Thinning to a depth: a deep and a deeper cell end up in the same range of depths, a cell
    /// shallower than the range keeps its own.
    #[test]
    fn depth_thinning_makes_view_depth_independent_of_the_cell() {
        let n = 20;
        let views = ViewConfig { count: 2, thinning: Thinning::Depth, thin_min: 0.5, predict_full: false, keep_first: false, gene_scale: 0.0 };
        let bt = Batcher::new(tokenizer(n, Binning::CellQuantile, 8), SequenceMode::FullPanel, Some(M), views).unwrap().with_median_depth(1000.0);
        let mut dense = vec![2500.0f32; n]; // 50,000 counts
        dense.extend(vec![100.0f32; n]); // 2,000
        dense.extend(vec![10.0f32; n]); // 200
        let b = bt.build(&cells(&dense, n), 3);
        for v in &b.views {
            let depth = |i: usize| 10f64.powf(v.depth[i] as f64) - 1.0;
            for i in 0..2 {
                assert!((450.0..=1050.0).contains(&depth(i)), "cell {i} thinned into [0.5, 1] × the median: {}", depth(i));
            }
            assert!((depth(2) - 200.0).abs() < 1e-3, "a shallow cell keeps its depth: {}", depth(2));
        }
    }

    #[test]
    fn ranked_sequences_order_expressed_genes_by_median_normalized_value() {
        // Gene 2 has the most counts, but gene 0's training median is tiny: it ranks first.
        let tok = tokenizer(4, Binning::RankValue { medians: vec![1.0, 5000.0, 4000.0, 1000.0], fit_cells: 1 }, 4);
        let bt = Batcher::new(tok.clone(), SequenceMode::FullPanel, None, ViewConfig::SINGLE).unwrap();
        let b = bt.build(&cells(&[1.0, 0.0, 6.0, 3.0], 4), 0);
        let v = b.first();
        assert_eq!(v.gene_ids, vec![tok.gene_cls(), 0, 3, 2, tok.gene_pad()], "by CP10k / median: 1000, 3000, 6000/4000 → 0, 3, 2");
        assert_eq!(&v.input_bins[..4], &[tok.vocab.cls(), 0, 1, 2], "a position's bin is its rank");
        assert_eq!(v.padding, vec![false, false, false, false, true], "the unexpressed gene is absent, not a zero");
        let masked = Batcher::new(tok.clone(), SequenceMode::FullPanel, Some(MaskConfig { ratio: 0.34, ..M }), ViewConfig::SINGLE).unwrap().build(&cells(&[1.0, 0.0, 6.0, 3.0], 4), 0);
        let mv = masked.first();
        let hidden: Vec<usize> = (0..5).filter(|&p| mv.targets[p] != IGNORE).collect();
        assert_eq!(hidden.len(), 1);
        assert_eq!(mv.gene_ids[hidden[0]], tok.gene_mask());
        assert_eq!(mv.targets[hidden[0]], v.gene_ids[hidden[0]], "the target is the hidden gene");
    }

    #[test]
    fn expression_ranked_sequences_order_expressed_genes_by_their_counts() {
        // The same cell as above, without medians: the most expressed gene leads.
        let tok = tokenizer(4, Binning::RankExpression, 4);
        let b = Batcher::new(tok.clone(), SequenceMode::FullPanel, None, ViewConfig::SINGLE).unwrap().build(&cells(&[1.0, 0.0, 6.0, 3.0], 4), 0);
        let v = b.first();
        assert_eq!(v.gene_ids, vec![tok.gene_cls(), 2, 3, 0, tok.gene_pad()], "by CP10k: 6, 3, 1 → 2, 3, 0");
        assert_eq!(&v.input_bins[..4], &[tok.vocab.cls(), 0, 1, 2], "a position's bin is its rank");
    }
}
