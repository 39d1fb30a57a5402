//! The labelled cells of a fine-tune: classes from an obs column, the test split (exactly
//! `neurofm-eval`'s for the same seed), the validation cells carved from the training part,
//! the data's genes mapped onto the model's, and the batches of tokenized cells with their
//! classes.

use std::path::Path;
use std::sync::Arc;

use dataloader::frame::Frame;
use dataloader::mask::{Batcher, MaskedBatch};
use dataloader::rng::hash_keys;
use dataloader::shard::{eval_plan, BatchFn, BatchStream, CellBatch, EpochPlan, Rank, ReadPlan, ReaderPosition, ShardConfig, ShardReader};
use dataloader::store::Store;
use dataloader::corpus::Panels;
use dataloader::genes::{GeneCase, GeneMap};
use evaluation::labels::{ClassSpec, Labels, Split, SplitKind};
use tracing::{info, warn};

use crate::config::{Balance, TaskConfig};
use crate::error::{FinetuneError, Result};

/// Second key of the validation carve's seed (no `dataloader::rng::Purpose` uses it).
const VALIDATION_CARVE: u64 = 60;

/// The cells of a fine-tune and what class each one is.
pub struct Task {
    pub store: Arc<Store>,
    pub obs: Frame,
    /// Labelled cells (store rows, ascending) and their classes.
    pub labels: Labels,
    /// Training and test positions into `labels`: `neurofm-eval`'s split for the same seed.
    pub split: Split,
    /// Positions (into `labels`) whose gradients the model sees: `split.train` minus `val`.
    pub fit: Vec<usize>,
    /// Positions held out of the training part for early stopping and model selection.
    pub val: Vec<usize>,
    /// The data's genes on the model's gene order.
    pub genes: GeneMap,
    /// Labelled cells left out by `task.max_cells`.
    pub left_out: usize,
    /// Class of each store row (`-1`: not labelled), for the batch workers.
    class_of_row: Arc<Vec<i64>>,
}

/// Tokenized cells and their classes.
pub struct LabelledBatch {
    pub tokens: MaskedBatch,
    pub y: Vec<i64>,
}

impl Task {
    /// Opens the store and decides every cell's part; `model_genes` is the pretrained
    /// tokenizer's gene order. Every input problem (column, classes, split, genes) is found here,
    /// before anything is written.
    pub fn open(cfg: &TaskConfig, seed: u64, model_genes: &[String], case: GeneCase) -> Result<Task> {
        let path = cfg.data.as_path();
        if path.is_file() {
            return Err(FinetuneError::input(path, "is a file; --data takes a zarr store: convert it first with `neurofm-data convert FILE STORE.zarr`"));
        }
        let store = Arc::new(Store::open(path)?);
        let obs = store.frame("obs")?;
        let spec = if cfg.classes.is_empty() { ClassSpec::All } else { ClassSpec::Only(cfg.classes.clone()) };
        let mut labels = Labels::from_obs(&obs, &cfg.label_col, &spec, cfg.min_class_cells, path)?;
        for (name, n) in &labels.dropped {
            info!("class `{name}` dropped: {n} cells < task.min_class_cells {}", cfg.min_class_cells);
        }
        let left_out = labels.subsample(cfg.max_cells, seed);
        if left_out > 0 {
            info!("fine-tuning on a sample of {} labelled cells ({left_out} left out by task.max_cells, as neurofm-eval --max-cells does)", labels.cells.len());
        }
        let split = Split::new(&labels, &cfg.split_kind()?, cfg.test_frac, &obs, seed, path)?;
        let (fit, val) = carve_validation(&labels, &split.train, cfg.val_frac, seed, &obs, path)?;
        let genes = GeneMap::new(&store.var_names()?, model_genes, case, path)?;
        if genes.overlap.missing > 0 {
            warn!("{}: gene overlap with the model: {}; absent genes are left out of every cell, not read as zero", path.display(), genes.overlap);
        }
        let mut class_of_row = vec![-1i64; store.n_cells()];
        for (&cell, &k) in labels.cells.iter().zip(&labels.y) {
            class_of_row[cell] = k as i64;
        }
        Ok(Task { store, obs, labels, split, fit, val, genes, left_out, class_of_row: Arc::new(class_of_row) })
    }

    pub fn n_classes(&self) -> usize {
        self.labels.n_classes()
    }

    /// Store rows of `positions` (into `labels`), ascending.
    pub fn rows(&self, positions: &[usize]) -> Vec<u32> {
        let mut r: Vec<u32> = positions.iter().map(|&i| self.labels.cells[i] as u32).collect();
        r.sort_unstable();
        r
    }

    /// Cells per class among `positions`.
    pub fn class_counts(&self, positions: &[usize]) -> Vec<usize> {
        let mut c = vec![0; self.n_classes()];
        for &i in positions {
            c[self.labels.y[i]] += 1;
        }
        c
    }

    /// The loss weight of each class over the cells the model fits (see `class_weights`).
    pub fn class_weights(&self, balance: Balance) -> Vec<f64> {
        class_weights(&self.class_counts(&self.fit), balance)
    }

    /// The training shard of `rank`: the fit cells, reshuffled every epoch from the seed, cut
    /// into global batches as pretraining's global read plan does (W ranks of batch B see one
    /// rank's batches of W·B; labelled sets are small, so reading them on every rank is cheap).
    pub fn reader(&self, rank: Rank, batch_size: usize, seed: u64) -> Result<ShardReader> {
        let store = self.store.clone();
        Ok(ShardReader::new(self.rows(&self.fit).into_iter().collect(), move |c| store.chunk_of(c), rank, ShardConfig { batch_size, seed, window_blocks: 4, plan: ReadPlan::Global })?)
    }

    /// Batches of `plan` from `start`, read, tokenized and labelled by background workers;
    /// `epoch` keys the genes a `nonzero-plus-zeros` sequence samples and the perturbations
    /// (`VALIDATION_EPOCH` for the cells as measured, which predictions and annotation use).
    pub fn stream(&self, batcher: &Batcher, plan: EpochPlan, start: ReaderPosition, epoch: u64, workers: usize, prefetch: usize) -> BatchStream<LabelledBatch> {
        BatchStream::new(self.store.clone(), plan, start, workers, prefetch, labelled_batches(batcher.clone(), self.genes.clone(), self.class_of_row.clone(), epoch))
    }

    /// Batches of every cell of `positions`, in store order, this rank's contiguous part, built
    /// for `epoch` (`VALIDATION_EPOCH`: the cells as measured; a test view's own otherwise).
    pub fn predict_stream(&self, batcher: &Batcher, positions: &[usize], rank: Rank, batch_size: usize, workers: usize, epoch: u64) -> BatchStream<LabelledBatch> {
        let plan = eval_plan(&self.rows(positions), rank, batch_size);
        self.stream(batcher, plan, ReaderPosition::default(), epoch, workers, 4)
    }
}

/// The loss weight of classes with `counts` cells: N / (K · n_k) (scikit-learn's
/// `class_weight="balanced"`), so each class weighs as much in the loss as any other; or 1.
pub fn class_weights(counts: &[usize], balance: Balance) -> Vec<f64> {
    let (n, k) = (counts.iter().sum::<usize>() as f64, counts.len() as f64);
    counts.iter().map(|&c| if balance == Balance::ClassWeights && c > 0 { n / (k * c as f64) } else { 1.0 }).collect()
}

/// The worker-side transform: counts onto the model's genes, tokens without masks (genes the
/// data lacks become padding), and each cell's class.
pub fn labelled_batches(batcher: Batcher, genes: GeneMap, class_of_row: Arc<Vec<i64>>, epoch: u64) -> BatchFn<LabelledBatch> {
    let batcher = batcher.with_panels(Arc::new(Panels::one(genes.present.clone())));
    Arc::new(move |b: CellBatch| {
        let batch = CellBatch { counts: genes.remap(&b.counts), cells: b.cells };
        let tokens = batcher.build(&batch, epoch);
        let y = tokens.cells.iter().map(|&c| class_of_row.get(c as usize).copied().unwrap_or(-1)).collect();
        Ok(LabelledBatch { tokens, y })
    })
}

/// Splits the training positions into fit and validation parts, stratified by class with
/// evaluation's own splitter (so a class too small for it is named the same way); with
/// `val_frac` 0 every training cell is fit.
fn carve_validation(labels: &Labels, train: &[usize], val_frac: f64, seed: u64, obs: &Frame, path: &Path) -> Result<(Vec<usize>, Vec<usize>)> {
    if val_frac == 0.0 {
        return Ok((train.to_vec(), Vec::new()));
    }
    let sub = Labels {
        column: labels.column.clone(),
        classes: labels.classes.clone(),
        cells: train.iter().map(|&i| labels.cells[i]).collect(),
        y: train.iter().map(|&i| labels.y[i]).collect(),
        dropped: Vec::new(),
    };
    let s = Split::new(&sub, &SplitKind::Stratified, val_frac, obs, hash_keys(&[seed, VALIDATION_CARVE]), path)
        .map_err(|e| FinetuneError::Usage(format!("validation cells (task.val_frac = {val_frac} of each class's training cells): {e}")))?;
    Ok((s.train.iter().map(|&j| train[j]).collect(), s.test.iter().map(|&j| train[j]).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataloader::csr::CsrRows;
    use dataloader::mask::{SequenceMode, ViewConfig};
    use dataloader::tokenize::{Binning, Tokenizer, Vocab};

    #[test]
    fn balanced_weights_make_every_class_weigh_the_same() {
        let w = class_weights(&[30, 10], Balance::ClassWeights);
        // scikit-learn: compute_class_weight("balanced") = 40 / (2 · [30, 10]).
        assert_eq!(w, vec![40.0 / 60.0, 40.0 / 20.0]);
        assert!((w[0] * 30.0 - w[1] * 10.0).abs() < 1e-12, "each class's total weight is equal");
        assert_eq!(class_weights(&[30, 10], Balance::None), vec![1.0, 1.0]);
    }

    /// A model gene the data lacks is padding in every sequence (never bin 0, "not expressed"),
    /// and each cell carries its class (or -1).
    #[test]
    fn labelled_batches_pad_missing_genes_and_carry_classes() {
        let tok = Arc::new(Tokenizer { vocab: Vocab { n_bins: 5 }, genes: vec!["a".into(), "b".into(), "c".into()], binning: Binning::CellQuantile });
        let genes = GeneMap::new(&["c".to_string(), "a".to_string()], &tok.genes, GeneCase::Exact, Path::new("d.zarr")).unwrap();
        let batcher = Batcher::new(tok.clone(), SequenceMode::FullPanel, None, ViewConfig::SINGLE).unwrap();
        let f = labelled_batches(batcher, genes, Arc::new(vec![2, -1]), 0);
        let mut counts = CsrRows::new();
        counts.push_row(&[0, 1], &[4.0, 1.0]); // data genes c, a
        counts.push_row(&[1], &[3.0]);
        let b = f(CellBatch { cells: vec![0, 1], counts }).unwrap();
        assert_eq!(b.y, vec![2, -1]);
        let v = b.tokens.first();
        // [CLS] a c, then padding, per cell: b (model gene 1) is missing from the data.
        assert_eq!(v.gene_ids, vec![tok.gene_cls(), 0, 2, tok.gene_pad(), tok.gene_cls(), 0, 2, tok.gene_pad()]);
        assert_eq!(v.padding, vec![false, false, false, true, false, false, false, true]);
        assert!(v.input_bins[1] > 0 && v.input_bins[2] > 0, "a and c of cell 0 are expressed: {:?}", v.input_bins);
        assert_eq!(v.input_bins[6], 0, "c of cell 1 is measured and zero");
    }
}
