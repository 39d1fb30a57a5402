//! The data side of a run: store, split, tokenizer, per-rank shard and batchers.

use std::sync::Arc;

use dataloader::mask::{batch_fn, sequence_len, Batcher, MaskConfig, MaskedBatch, ViewConfig, VALIDATION_EPOCH};
use dataloader::rng::{hash_keys, Purpose};
use dataloader::shard::{eval_plan, BatchStream, Rank, ReaderPosition, ShardConfig, ShardReader};
use dataloader::split::SplitSpec;
use dataloader::store::Store;
use dataloader::tokenize::{BinningKind, Tokenizer};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};

/// Store, split, tokenizer and the batchers of one rank.
pub struct RunData {
    pub store: Arc<Store>,
    pub tokenizer: Arc<Tokenizer>,
    pub train_cells: Vec<u32>,
    pub val_cells: Vec<u32>,
    reader: ShardReader,
    /// Training batches: the run's views and masks.
    batcher: Batcher,
    /// Validation batches: one unperturbed view with fixed masks, so validation numbers and
    /// the context-free baselines compare across recipes.
    val_batcher: Batcher,
    pub mask: MaskConfig,
    workers: usize,
    prefetch: usize,
    batch_size: usize,
}

impl RunData {
    /// Opens the store, splits it, and fits the tokenizer on training cells (or reuses `tokenizer`).
    pub fn open(cfg: &TrainConfig, rank: Rank, tokenizer: Option<Tokenizer>) -> Result<RunData> {
        if cfg.data.store.as_os_str().is_empty() {
            return Err(TrainError::Config("data.store is empty: pass --data STORE (a store made by `neurofm-data convert`)".into()));
        }
        let store = Arc::new(Store::open(&cfg.data.store)?);
        let by = (!cfg.split.by.is_empty()).then(|| cfg.split.by.clone());
        let split = SplitSpec { val_fraction: cfg.split.val_fraction, seed: cfg.seed, by }.apply(&store)?;
        let val_cells = match cfg.data.val_max_cells {
            0 => split.val,
            cap => sample_cells(&split.val, cap, cfg.seed, Purpose::ValidationSample),
        };
        let tokenizer = match tokenizer {
            Some(t) => t,
            None => {
                let t = &cfg.tokenizer;
                // Ranked sequences: a position's "bin" is its rank, so there are as many bins
                // as gene positions.
                let n_bins = if t.kind == BinningKind::RankValue { sequence_len(cfg.sequence, store.n_genes()) - 1 } else { t.n_bins };
                Tokenizer::fit(&store, &split.train, t.kind, n_bins, t.max_fit_cells, cfg.seed)?
            }
        };
        tokenizer.check_genes(&store.var_names()?, &store.path)?;
        let tokenizer = Arc::new(tokenizer);
        let shard = ShardConfig { batch_size: cfg.train.batch_size, seed: cfg.seed, window_blocks: 4 };
        let reader = ShardReader::new(split.train.clone(), |c| store.chunk_of(c), rank, shard)?;
        let mask = MaskConfig { ratio: cfg.mask.ratio, nonzero_fraction: cfg.mask.nonzero_fraction, seed: cfg.seed };
        let median_depth = median_total(&store, &split.train)?;
        let batcher = Batcher::new(tokenizer.clone(), cfg.sequence, Some(mask), cfg.views)?.with_median_depth(median_depth);
        let val_batcher = Batcher::new(tokenizer.clone(), cfg.sequence, Some(mask), ViewConfig::SINGLE)?;
        Ok(RunData {
            store,
            tokenizer,
            train_cells: split.train,
            val_cells,
            reader,
            batcher,
            val_batcher,
            mask,
            workers: cfg.data.workers,
            prefetch: cfg.data.prefetch,
            batch_size: cfg.train.batch_size,
        })
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.reader.batches_per_epoch()
    }

    /// Sequence length including `[CLS]`.
    pub fn seq_len(&self) -> usize {
        self.batcher.seq_len()
    }

    /// Training batches of `start.epoch` from `start.batch` on.
    pub fn train_stream(&self, start: ReaderPosition) -> BatchStream<MaskedBatch> {
        let plan = self.reader.plan(start.epoch);
        BatchStream::new(self.store.clone(), plan, start, self.workers, self.prefetch, batch_fn(self.batcher.clone(), start.epoch))
    }

    /// Validation batches of this rank with the fixed validation masks.
    pub fn val_stream(&self, rank: Rank) -> impl Iterator<Item = Result<MaskedBatch>> {
        let plan = eval_plan(&self.val_cells, rank, self.batch_size);
        let f = batch_fn(self.val_batcher.clone(), VALIDATION_EPOCH);
        BatchStream::new(self.store.clone(), plan, ReaderPosition::default(), self.workers, self.prefetch, f).map(|r| r.map(|(_, b)| b).map_err(TrainError::from))
    }

    /// The run's sequences without masks (the baselines count over them).
    pub fn unmasked(&self) -> Result<Batcher> {
        Ok(Batcher::new(self.tokenizer.clone(), self.batcher.mode, None, ViewConfig::SINGLE)?)
    }
}

/// The median total counts of `cells` (from the store's statistics, no matrix read).
fn median_total(store: &Store, cells: &[u32]) -> Result<f64> {
    let totals: Vec<f64> = store.read_vec("uns/neurofm/cell_total")?;
    let mut t: Vec<f64> = cells.iter().map(|&c| totals[c as usize]).collect();
    if t.is_empty() {
        return Ok(0.0);
    }
    let mid = t.len() / 2;
    t.select_nth_unstable_by(mid, f64::total_cmp);
    Ok(t[mid])
}

/// At most `max` cells, ascending: those with the smallest hash of (seed, purpose, cell).
pub fn sample_cells(cells: &[u32], max: usize, seed: u64, purpose: Purpose) -> Vec<u32> {
    if cells.len() <= max {
        return cells.to_vec();
    }
    let mut s = cells.to_vec();
    s.sort_by_key(|&c| hash_keys(&[seed, purpose as u64, c as u64]));
    s.truncate(max);
    s.sort_unstable();
    s
}
