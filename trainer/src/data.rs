//! The data side of a run: corpus (one or more stores), split, tokenizer, per-rank shard and
//! batchers.

use std::sync::Arc;

use dataloader::cells::CellSet;
use dataloader::corpus::{sample_blocks, Corpus};
use dataloader::mask::{batch_fn, sequence_len, Batcher, MaskConfig, MaskedBatch, ViewConfig, VALIDATION_EPOCH};
use dataloader::rng::Purpose;
use dataloader::shard::{eval_plan, BatchStream, Rank, ReadStats, ReaderPosition, ShardConfig, ShardReader};
use dataloader::split::SplitSpec;
use dataloader::tokenize::Tokenizer;
use tracing::{info, warn};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};

/// Corpus, split, tokenizer and the batchers of one rank.
pub struct RunData {
    pub corpus: Arc<Corpus>,
    pub tokenizer: Arc<Tokenizer>,
    pub val_cells: Vec<u32>,
    reader: ShardReader,
    /// Training batches: the run's views and masks.
    batcher: Batcher,
    /// Validation batches: one unperturbed view with fixed masks, so validation numbers and
    /// the context-free baselines compare across recipes.
    val_batcher: Batcher,
    pub mask: MaskConfig,
    /// What this rank's training reads cost (`read_amplification` in `throughput.json`).
    pub train_reads: Arc<ReadStats>,
    workers: usize,
    prefetch: usize,
    batch_size: usize,
}

impl RunData {
    /// Opens the corpus, splits it, and fits the tokenizer on training cells (or reuses
    /// `tokenizer`, whose genes are then the vocabulary).
    pub fn open(cfg: &TrainConfig, rank: Rank, tokenizer: Option<Tokenizer>) -> Result<RunData> {
        let specs = cfg.data.store_specs()?;
        let corpus = match &tokenizer {
            Some(t) => Corpus::with_vocabulary(&specs, t.genes.clone(), cfg.data.gene_case)?,
            None => Corpus::open(&specs, &cfg.data.vocabulary, cfg.data.gene_case)?,
        };
        if rank.rank() == 0 {
            log_overlaps(&corpus);
        }
        let by = (!cfg.split.by.is_empty()).then(|| cfg.split.by.clone());
        let split = corpus.split(&SplitSpec { val_fraction: cfg.split.val_fraction, seed: cfg.seed, by, unit: cfg.split.unit })?;
        let val_cells = match cfg.data.val_max_cells {
            0 => split.val.to_vec(),
            cap => sample_blocks(&split.val, cap, |c| corpus.block_of(c), cfg.seed, Purpose::ValidationSample),
        };
        let tokenizer = match tokenizer {
            Some(t) => t,
            None => {
                let t = &cfg.tokenizer;
                // Ranked sequences: a position's "bin" is its rank, so there are as many bins
                // as gene positions.
                let n_genes = corpus.vocabulary.len();
                let n_bins = if t.kind.is_ranked() { sequence_len(cfg.sequence, n_genes) - 1 } else { t.n_bins };
                Tokenizer::fit(&corpus, &split.train, t.kind, n_bins, t.max_fit_cells, cfg.seed)?
            }
        };
        let tokenizer = Arc::new(tokenizer);
        let shard = ShardConfig { batch_size: cfg.train.batch_size, seed: cfg.seed, window_blocks: 2, plan: cfg.data.read_plan };
        let median_depth = median_total(&corpus, &split.train)?;
        let reader = ShardReader::new(split.train, |c| corpus.block_of(c), rank, shard)?.weighted(|c| corpus.member_of(c), |m| corpus.weight(m))?;
        let mask = MaskConfig { ratio: cfg.mask.ratio, nonzero_fraction: cfg.mask.nonzero_fraction, seed: cfg.seed };
        let panels = Arc::new(corpus.panels());
        let batcher = Batcher::new(tokenizer.clone(), cfg.sequence, Some(mask), cfg.views)?.with_median_depth(median_depth).with_panels(panels.clone());
        let val_batcher = Batcher::new(tokenizer.clone(), cfg.sequence, Some(mask), ViewConfig::SINGLE)?.with_panels(panels);
        Ok(RunData {
            corpus: Arc::new(corpus),
            tokenizer,
            val_cells,
            reader,
            batcher,
            val_batcher,
            mask,
            train_reads: Arc::default(),
            workers: cfg.data.workers,
            prefetch: cfg.data.prefetch,
            batch_size: cfg.train.batch_size,
        })
    }

    /// This rank's view of the training cells (all of them, in split order; held once, by
    /// the reader).
    pub fn train_cells(&self) -> &CellSet {
        self.reader.cells()
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
        let f = batch_fn(self.batcher.clone(), start.epoch);
        BatchStream::counted(self.corpus.clone(), plan, start, self.workers, self.prefetch, f, self.train_reads.clone())
    }

    /// Validation batches of this rank with the fixed validation masks.
    pub fn val_stream(&self, rank: Rank) -> impl Iterator<Item = Result<MaskedBatch>> {
        let plan = eval_plan(&self.val_cells, rank, self.batch_size);
        let f = batch_fn(self.val_batcher.clone(), VALIDATION_EPOCH);
        BatchStream::new(self.corpus.clone(), plan, ReaderPosition::default(), self.workers, self.prefetch, f).map(|r| r.map(|(_, b)| b).map_err(TrainError::from))
    }

    /// The run's sequences without masks (the baselines count over them).
    pub fn unmasked(&self) -> Result<Batcher> {
        Ok(Batcher::new(self.tokenizer.clone(), self.batcher.mode, None, ViewConfig::SINGLE)?.with_panels(self.batcher.panels.clone()))
    }
}

/// What a run's corpus was: `corpus.json` in the run directory, checked again on resume.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CorpusRecord {
    pub vocabulary_genes: usize,
    pub gene_case: dataloader::genes::GeneCase,
    pub stores: Vec<StoreRecord>,
}

/// One store of `CorpusRecord`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoreRecord {
    pub path: std::path::PathBuf,
    pub cells: usize,
    pub weight: f64,
    pub gene_key: Option<String>,
    pub overlap: dataloader::genes::Overlap,
}

impl CorpusRecord {
    pub fn of(corpus: &Corpus) -> CorpusRecord {
        let stores = corpus
            .members
            .iter()
            .enumerate()
            .map(|(m, x)| StoreRecord { path: x.spec.path.clone(), cells: corpus.cells_of(m).len(), weight: x.spec.weight, gene_key: x.spec.gene_key.clone(), overlap: x.genes.overlap.clone() })
            .collect();
        CorpusRecord { vocabulary_genes: corpus.vocabulary.len(), gene_case: corpus.case, stores }
    }

    /// Refuses to resume on other data than the run's (store paths may move).
    pub fn check_same(&self, saved: &CorpusRecord, file: &std::path::Path) -> Result<()> {
        if self.stores.len() != saved.stores.len() {
            return Err(TrainError::input(file, format!("the run was trained on {} store(s), this resume passes {}; resume with the run's data", saved.stores.len(), self.stores.len())));
        }
        for (i, (now, then)) in self.stores.iter().zip(&saved.stores).enumerate() {
            if now.cells != then.cells || now.overlap.shared != then.overlap.shared || now.overlap.unknown != then.overlap.unknown {
                return Err(TrainError::input(
                    &now.path,
                    format!(
                        "store {i}: cells or gene panel differs from the run's ({} cells, {} vocabulary genes and {} others, against {} cells, {} and {} in {}); resume with the run's data",
                        now.cells,
                        now.overlap.shared,
                        now.overlap.unknown,
                        then.cells,
                        then.overlap.shared,
                        then.overlap.unknown,
                        file.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Logs each store's gene overlap with the vocabulary (and warns about left-out genes).
fn log_overlaps(corpus: &Corpus) {
    info!("vocabulary: {} genes ({:?} matching) over {} store(s)", corpus.vocabulary.len(), corpus.case, corpus.members.len());
    for (m, (path, o)) in corpus.overlaps().into_iter().enumerate() {
        info!(
            "store {m} {}: {} cells, {} vocabulary genes measured, {} absent (left out of its sequences), weight {}",
            path.display(),
            corpus.cells_of(m).len(),
            o.shared,
            o.missing,
            corpus.weight(m as u64)
        );
        if o.unknown > 0 {
            warn!("store {m} {}: {} of its genes are not in the vocabulary and are left out (e.g. {})", path.display(), o.unknown, o.examples_unknown.join(", "));
        }
    }
}

/// Cells whose totals give the median depth: all of them up to this, evenly spaced above it
/// (a median of a million is within 0.1 percentile of the whole), so start-up memory does not
/// grow with an atlas.
const MEDIAN_SAMPLE: usize = 1 << 20;

/// The median total counts of `cells` (from the stores' statistics, no matrix read).
fn median_total(corpus: &Corpus, cells: &CellSet) -> Result<f64> {
    let step = cells.len().div_ceil(MEDIAN_SAMPLE).max(1);
    let sample: Vec<u32> = cells.iter().step_by(step).collect();
    let mut t = corpus.cell_totals(&sample)?;
    if t.is_empty() {
        return Ok(0.0);
    }
    let mid = t.len() / 2;
    t.select_nth_unstable_by(mid, f64::total_cmp);
    Ok(t[mid])
}

