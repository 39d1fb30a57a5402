//! Per-rank shards of a split, reshuffled every epoch, streamed by background workers.
//!
//! Epoch plan (from (seed, epoch, world size) alone, the same on every rank):
//! 1. the split's cells are grouped into blocks by a key, normally the stretch of store
//!    chunks holding them (`Corpus::block_of`), so reading a block decodes its chunks once;
//!    a weighted store contributes `weight ×` its cells (whole blocks in a per-epoch order,
//!    the last one cut), so every epoch has the same length; blocks are permuted;
//! 2. `ReadPlan::Local` (default): the order is cut into windows of `world × window_blocks`
//!    blocks, rank r takes the r-th contiguous share of each window (whole batches; the
//!    remainder, under one batch per rank, is dropped) and shuffles it. So each
//!    rank decodes about 1/world of the chunks and every rank runs the same number of steps.
//!    `ReadPlan::Global`: windows of `window_blocks` blocks are shuffled, cut into global
//!    batches of `world × batch_size` cells and rank r takes the r-th slice of each: W ranks
//!    with batch B see exactly the batches of one rank with batch W·B, at the price of every
//!    rank decoding every chunk.
//!
//! A plan holds the split as runs of cell ids and the epoch's block order, and a worker draws
//! a read window's cells when it reaches it: a rank's memory for plans costs per block, not
//! per cell of the corpus.
//!
//! A position (epoch, batch) is all that is needed to resume exactly with the same world size.
//! `ReaderPosition::rescale` carries it to another world or batch size: under `Global` the
//! order is unchanged; under `Local` the rest of that epoch follows the new world's order (so
//! a few cells of it may be seen twice or not at all), and later epochs are exact again.

use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::cells::{runs_by_key, CellSet};
use crate::corpus::Corpus;
use crate::csr::CsrRows;
use crate::error::{DataError, Result};
use crate::rng::{rng_for, Purpose};
use crate::store::Store;

/// This process's place in a data-parallel group; valid by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rank {
    rank: usize,
    world: usize,
}

impl Rank {
    pub fn new(rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(DataError::Config(format!("rank {rank} is not in a world of {world}")));
        }
        Ok(Rank { rank, world })
    }

    /// The only rank of a single-process run.
    pub fn single() -> Self {
        Rank { rank: 0, world: 1 }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }
}

/// How a rank draws its batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    pub batch_size: usize,
    pub seed: u64,
    /// Blocks whose cells are shuffled together within a rank.
    #[serde(default = "default_window_blocks")]
    pub window_blocks: usize,
    #[serde(default)]
    pub plan: ReadPlan,
}

/// How the epoch order is shared among ranks (`data.read_plan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ReadPlan {
    /// Each rank reads its own blocks: reads ∝ 1/world; order depends on the world size.
    #[default]
    Local,
    /// Every rank reads every block and keeps its slice: order independent of the world size.
    Global,
}

fn default_window_blocks() -> usize {
    4
}

/// Where a reader stands: the next batch to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReaderPosition {
    pub epoch: u64,
    pub batch: usize,
}

impl ReaderPosition {
    /// The same place in the epoch's cell order when a global batch holds `to` cells instead
    /// of `from` (a resume with another world size or batch size). Rounds down, so at most one
    /// partial batch of cells is seen twice.
    pub fn rescale(self, from: usize, to: usize) -> ReaderPosition {
        ReaderPosition { epoch: self.epoch, batch: self.batch * from / to.max(1) }
    }
}

/// Cells of one batch with their raw counts, in batch order.
#[derive(Debug, Clone)]
pub struct CellBatch {
    /// Store rows of the cells.
    pub cells: Vec<u32>,
    pub counts: CsrRows,
}

/// Batches of one epoch for one rank, grouped into read windows of `batches_per_window`
/// batches (window `g`: batches `g·per .. (g+1)·per`) whose cells are read together. A
/// training plan holds the epoch's block order and draws a window's cells when it is read, so
/// a rank's plan costs per block, not per cell.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    batches_per_window: usize,
    n_batches: usize,
    source: Batches,
}

#[derive(Debug, Clone)]
enum Batches {
    /// Every batch, listed (evaluation: cells in store order).
    Listed(Vec<Vec<u32>>),
    /// A training epoch, drawn a window at a time.
    Drawn(Drawn),
}

/// What a training epoch's windows are drawn from.
#[derive(Debug, Clone)]
struct Drawn {
    cells: Arc<CellSet>,
    /// The epoch's blocks in order, as positions in `cells` (a weighted store's last one cut).
    blocks: Vec<Range<usize>>,
    /// Position in the epoch order of each block's first cell, then the epoch's length.
    starts: Vec<usize>,
    window_cells: usize,
    epoch: u64,
    rank: Rank,
    cfg: ShardConfig,
}

impl Drawn {
    /// The epoch's cells at positions `at` of its block order (before any shuffle).
    fn order(&self, at: Range<usize>) -> Vec<u32> {
        let mut out = Vec::with_capacity(at.len());
        let mut b = self.starts.partition_point(|&s| s <= at.start).saturating_sub(1);
        while b < self.blocks.len() && self.starts[b] < at.end {
            let (first, block) = (self.starts[b], &self.blocks[b]);
            let (lo, hi) = (at.start.max(first) - first, at.end.min(self.starts[b + 1]) - first);
            out.extend(self.cells.slice(block.start + lo..block.start + hi));
            b += 1;
        }
        out
    }

    /// Shuffle window `w` of `ReadPlan::Global`: `window_cells` cells of the block order, shuffled.
    fn global_window(&self, w: usize) -> Vec<u32> {
        let len = self.starts[self.blocks.len()];
        let mut cells = self.order(w * self.window_cells..((w + 1) * self.window_cells).min(len));
        cells.shuffle(&mut rng_for(&[self.cfg.seed, Purpose::EpochWindow as u64, self.epoch, w as u64]));
        cells
    }

    /// This rank's batches `batches` (all in read window `g`).
    fn window(&self, g: usize, batches: Range<usize>) -> Vec<Vec<u32>> {
        let (b, world, rank) = (self.cfg.batch_size, self.rank.world(), self.rank.rank());
        match self.cfg.plan {
            ReadPlan::Global => {
                // Global batch k is positions k·W·B .. (k+1)·W·B of the window-shuffled order.
                let global = b * world;
                let at = batches.start * global..batches.end * global;
                let mut cells = Vec::with_capacity(at.len());
                for w in at.start / self.window_cells..at.end.div_ceil(self.window_cells) {
                    let first = w * self.window_cells;
                    let window = self.global_window(w);
                    cells.extend_from_slice(&window[at.start.max(first) - first..(at.end - first).min(window.len())]);
                }
                cells.chunks_exact(global).map(|g| g[rank * b..][..b].to_vec()).collect()
            }
            ReadPlan::Local => {
                // Window g is `world × window_cells` cells of the block order; this rank takes
                // its contiguous share (whole batches) and shuffles it.
                let window = self.window_cells * world;
                let first = g * window;
                let share = (((g + 1) * window).min(self.starts[self.blocks.len()]) - first) / world / b * b;
                let mut piece = self.order(first + rank * share..first + (rank + 1) * share);
                piece.shuffle(&mut rng_for(&[self.cfg.seed, Purpose::EpochWindow as u64, self.epoch, g as u64, rank as u64]));
                let per = (self.window_cells / b).max(1);
                piece.chunks_exact(b).skip(batches.start - g * per).take(batches.len()).map(<[u32]>::to_vec).collect()
            }
        }
    }
}

impl EpochPlan {
    /// Batches in the epoch.
    pub fn len(&self) -> usize {
        self.n_batches
    }

    pub fn is_empty(&self) -> bool {
        self.n_batches == 0
    }

    /// Batches read together.
    pub fn batches_per_window(&self) -> usize {
        self.batches_per_window.max(1)
    }

    /// Read windows in the epoch.
    pub fn windows(&self) -> usize {
        self.n_batches.div_ceil(self.batches_per_window())
    }

    /// The batches of read window `g` from batch `from` on (`from` inside the window or before it).
    pub fn window(&self, g: usize, from: usize) -> Vec<Vec<u32>> {
        let per = self.batches_per_window();
        let batches = (g * per).max(from)..((g + 1) * per).min(self.n_batches);
        if batches.is_empty() {
            return Vec::new();
        }
        match &self.source {
            Batches::Listed(all) => all[batches].to_vec(),
            Batches::Drawn(d) => d.window(g, batches),
        }
    }

    /// Every batch, in order (tests and small plans: a training epoch's cells all at once).
    pub fn batches(&self) -> Vec<Vec<u32>> {
        (0..self.windows()).flat_map(|g| self.window(g, 0)).collect()
    }

    /// The cells each read of a `BatchStream` over this plan asks for (sorted), in order:
    /// what a read plan costs can be computed from these without reading.
    pub fn reads(&self) -> impl Iterator<Item = Vec<u32>> + '_ {
        (0..self.windows()).map(|g| {
            let mut rows: Vec<u32> = self.window(g, 0).into_iter().flatten().collect();
            rows.sort_unstable();
            rows
        })
    }
}

impl PartialEq for EpochPlan {
    /// The same batches, read in the same windows.
    fn eq(&self, other: &EpochPlan) -> bool {
        self.batches_per_window() == other.batches_per_window() && self.batches() == other.batches()
    }
}

/// The training shard of one rank.
pub struct ShardReader {
    cells: Arc<CellSet>,
    /// `blocks[i]` is a range of positions in `cells`, and the weight group it belongs to.
    blocks: Vec<(Range<usize>, u64)>,
    /// Sampling weight of each group (absent: 1).
    weights: std::collections::BTreeMap<u64, f64>,
    rank: Rank,
    cfg: ShardConfig,
}

impl ShardReader {
    /// Blocks are runs of consecutive `cells` with the same `block_key` (e.g. `Corpus::block_of`).
    /// Refuses splits too small to give every rank one full batch.
    pub fn new(cells: CellSet, block_key: impl Fn(u32) -> u64, rank: Rank, cfg: ShardConfig) -> Result<Self> {
        if cfg.batch_size == 0 || cfg.window_blocks == 0 {
            return Err(DataError::Config("batch_size and window_blocks must be ≥ 1".into()));
        }
        let blocks = runs_by_key(cells.iter().map(block_key)).into_iter().map(|(_, at)| (at, 0)).collect();
        let reader = ShardReader { cells: Arc::new(cells), blocks, weights: Default::default(), rank, cfg };
        reader.check_size()?;
        Ok(reader)
    }

    /// The cells this reader serves.
    pub fn cells(&self) -> &CellSet {
        &self.cells
    }

    /// Weights blocks by group: `group_of(c)` names the group of cell c's block (its store) and
    /// `weight_of(group)` its sampling weight.
    pub fn weighted(mut self, group_of: impl Fn(u32) -> u64, weight_of: impl Fn(u64) -> f64) -> Result<Self> {
        for (range, group) in &mut self.blocks {
            let first = self.cells.slice(range.start..range.start + 1).next().unwrap_or_default();
            *group = group_of(first);
            self.weights.entry(*group).or_insert_with(|| weight_of(*group));
        }
        self.check_size()?;
        Ok(self)
    }
    fn check_size(&self) -> Result<()> {
        let need = self.cfg.batch_size * self.rank.world();
        if self.batches_per_epoch() == 0 {
            return Err(DataError::Config(format!(
                "the training split gives {} cells per epoch, too few for world size {} × batch size {} = {need}; lower the batch size",
                self.epoch_len(),
                self.rank.world(),
                self.cfg.batch_size
            )));
        }
        Ok(())
    }

    /// Cells each epoch draws: every group's cells times its weight (rounded down).
    fn epoch_len(&self) -> usize {
        let mut per_group: std::collections::BTreeMap<u64, usize> = Default::default();
        for (r, g) in &self.blocks {
            *per_group.entry(*g).or_default() += r.len();
        }
        per_group.iter().map(|(g, &n)| (self.weight(*g) * n as f64).floor() as usize).sum()
    }

    fn weight(&self, group: u64) -> f64 {
        self.weights.get(&group).copied().unwrap_or(1.0)
    }

    /// Batches each rank runs per epoch (identical on all ranks and every epoch).
    pub fn batches_per_epoch(&self) -> usize {
        let (len, w, b) = (self.epoch_len(), self.rank.world(), self.cfg.batch_size);
        match self.cfg.plan {
            ReadPlan::Global => len / w / b,
            ReadPlan::Local => {
                // Each rank's share of a window is whole batches, so reads follow windows.
                let window = self.window_cells() * w;
                len / window * (window / w / b) + len % window / w / b
            }
        }
    }

    /// The epoch's blocks (weighted, permuted), as ranges of positions in `cells`.
    fn epoch_blocks(&self, epoch: u64) -> Vec<Range<usize>> {
        let seed = self.cfg.seed;
        let mut picked: Vec<Range<usize>> = Vec::new();
        let groups: std::collections::BTreeSet<u64> = self.blocks.iter().map(|b| b.1).collect();
        for g in groups {
            let mine: Vec<Range<usize>> = self.blocks.iter().filter(|b| b.1 == g).map(|b| b.0.clone()).collect();
            let n: usize = mine.iter().map(|b| b.len()).sum();
            let w = self.weight(g);
            for _ in 0..w.floor() as usize {
                picked.extend(mine.iter().cloned());
            }
            // The fraction: whole blocks in this epoch's order, the last cut, to the exact count.
            let mut need = ((w * n as f64).floor() as usize).saturating_sub(w.floor() as usize * n);
            if need > 0 {
                let mut order = mine.clone();
                order.shuffle(&mut rng_for(&[seed, Purpose::EpochWeights as u64, epoch, g]));
                for b in order {
                    let take = b.len().min(need);
                    picked.push(b.start..b.start + take);
                    need -= take;
                    if need == 0 {
                        break;
                    }
                }
            }
        }
        picked.shuffle(&mut rng_for(&[seed, Purpose::EpochBlocks as u64, epoch]));
        picked
    }

    /// This rank's batches for `epoch`.
    pub fn plan(&self, epoch: u64) -> EpochPlan {
        let (b, world) = (self.cfg.batch_size, self.rank.world());
        let blocks = self.epoch_blocks(epoch);
        let mut starts = Vec::with_capacity(blocks.len() + 1);
        starts.push(0);
        for block in &blocks {
            starts.push(starts[starts.len() - 1] + block.len());
        }
        let window_cells = self.window_cells();
        let batches_per_window = match self.cfg.plan {
            // Read about one shuffle window per group of batches: its chunks are decoded once.
            ReadPlan::Global => (window_cells / (b * world)).max(1),
            ReadPlan::Local => (window_cells / b).max(1),
        };
        let drawn = Drawn { cells: self.cells.clone(), blocks, starts, window_cells, epoch, rank: self.rank, cfg: self.cfg.clone() };
        EpochPlan { batches_per_window, n_batches: self.batches_per_epoch(), source: Batches::Drawn(drawn) }
    }

    /// Cells of `window_blocks` mean blocks: what one rank shuffles together.
    fn window_cells(&self) -> usize {
        let mean_block = self.cells.len().div_ceil(self.blocks.len().max(1));
        (mean_block * self.cfg.window_blocks).max(1)
    }
}

/// Evaluation batches: every cell once, in store order, split contiguously across ranks
/// (ranks may get one batch more or less; evaluation reduces sums once at the end).
pub fn eval_plan(cells: &[u32], rank: Rank, batch_size: usize) -> EpochPlan {
    let per = cells.len().div_ceil(rank.world());
    let mine = cells.chunks(per.max(1)).nth(rank.rank()).unwrap_or(&[]);
    let batches: Vec<Vec<u32>> = mine.chunks(batch_size.max(1)).map(<[u32]>::to_vec).collect();
    EpochPlan { batches_per_window: (4096 / batch_size.max(1)).max(1), n_batches: batches.len(), source: Batches::Listed(batches) }
}

/// Where batches read cells from: a store (rows) or a corpus (corpus ids, vocabulary genes).
pub trait CellSource: Send + Sync {
    /// Counts of `cells` (ascending), and the cells in the chunks decoded to read them.
    fn read_sorted(&self, cells: &[u32]) -> Result<(CsrRows, u64)>;
}

impl CellSource for Store {
    fn read_sorted(&self, cells: &[u32]) -> Result<(CsrRows, u64)> {
        let rows: Vec<usize> = cells.iter().map(|&c| c as usize).collect();
        self.read_cells_costed(&rows)
    }
}

impl CellSource for Corpus {
    fn read_sorted(&self, cells: &[u32]) -> Result<(CsrRows, u64)> {
        self.read_cells_costed(cells)
    }
}

/// What a stream's reads cost: `read_amplification` = decoded / wanted.
#[derive(Debug, Default)]
pub struct ReadStats {
    /// Cells in the chunks decoded.
    pub decoded: std::sync::atomic::AtomicU64,
    /// Cells the reads were for.
    pub wanted: std::sync::atomic::AtomicU64,
}

impl ReadStats {
    /// Decoded over wanted cells (0 before any read).
    pub fn amplification(&self) -> f64 {
        use std::sync::atomic::Ordering::Relaxed;
        self.decoded.load(Relaxed) as f64 / self.wanted.load(Relaxed).max(1) as f64
    }
}

/// A transform applied to each batch inside the worker threads (tokenize, mask, ...).
pub type BatchFn<T> = Arc<dyn Fn(CellBatch) -> Result<T> + Send + Sync>;

/// Batches of a plan produced in order by `workers` threads, `depth` batches ahead each.
pub struct BatchStream<T> {
    receivers: Vec<Receiver<Result<T>>>,
    handles: Vec<JoinHandle<()>>,
    window_sizes: Vec<usize>,
    next_window: usize,
    left_in_window: usize,
    position: ReaderPosition,
}

impl<T: Send + 'static> BatchStream<T> {
    /// Streams `plan` starting at batch `start.batch` (earlier batches are skipped unread).
    pub fn new(store: Arc<dyn CellSource>, plan: EpochPlan, start: ReaderPosition, workers: usize, depth: usize, f: BatchFn<T>) -> Self {
        Self::counted(store, plan, start, workers, depth, f, Arc::default())
    }

    /// `new`, adding what the reads cost to `stats`.
    pub fn counted(store: Arc<dyn CellSource>, plan: EpochPlan, start: ReaderPosition, workers: usize, depth: usize, f: BatchFn<T>, stats: Arc<ReadStats>) -> Self {
        let workers = workers.max(1);
        // Windows from the one holding `start.batch` (entered part-way) to the end, dealt to
        // the workers in turn; each worker draws its windows' batches when it reaches them.
        let (per, n) = (plan.batches_per_window(), plan.len());
        let windows: Vec<usize> = (start.batch / per..plan.windows()).collect();
        let window_sizes: Vec<usize> = windows.iter().map(|&g| ((g + 1) * per).min(n) - (g * per).max(start.batch)).collect();
        let plan = Arc::new(plan);
        let mut receivers = Vec::new();
        let mut handles = Vec::new();
        for k in 0..workers {
            let work: Vec<usize> = windows.iter().copied().skip(k).step_by(workers).collect();
            let (tx, rx) = sync_channel(depth.max(1));
            let (store, f, stats, plan) = (store.clone(), f.clone(), stats.clone(), plan.clone());
            handles.push(std::thread::spawn(move || {
                for g in work {
                    let window = plan.window(g, start.batch);
                    let mut rows: Vec<u32> = window.iter().flatten().copied().collect();
                    rows.sort_unstable();
                    let block = match store.read_sorted(&rows) {
                        Ok((b, decoded)) => {
                            stats.decoded.fetch_add(decoded, std::sync::atomic::Ordering::Relaxed);
                            stats.wanted.fetch_add(rows.len() as u64, std::sync::atomic::Ordering::Relaxed);
                            b
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    for cells in window {
                        let mut counts = CsrRows::with_capacity(cells.len(), 0);
                        for c in &cells {
                            let at = rows.binary_search(c).unwrap_or_else(|_| unreachable!("cell comes from this window"));
                            counts.push_row_from(&block, at);
                        }
                        let out = f(CellBatch { cells, counts });
                        let failed = out.is_err();
                        if tx.send(out).is_err() || failed {
                            return;
                        }
                    }
                }
            }));
            receivers.push(rx);
        }
        let left = window_sizes.first().copied().unwrap_or(0);
        BatchStream { receivers, handles, window_sizes, next_window: 0, left_in_window: left, position: start }
    }
}

impl<T> Iterator for BatchStream<T> {
    /// The batch and the position to resume from after it.
    type Item = Result<(ReaderPosition, T)>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.left_in_window == 0 {
            self.next_window += 1;
            self.left_in_window = *self.window_sizes.get(self.next_window)?;
        }
        let rx = &self.receivers[self.next_window % self.receivers.len()];
        let item = match rx.recv() {
            Ok(item) => item,
            Err(_) => return Some(Err(DataError::Internal("a data worker stopped unexpectedly".into()))),
        };
        self.left_in_window -= 1;
        self.position.batch += 1;
        Some(item.map(|t| (self.position, t)))
    }
}

impl<T> Drop for BatchStream<T> {
    fn drop(&mut self) {
        self.receivers.clear(); // unblocks workers waiting to send
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn by10(c: u32) -> u64 {
        c as u64 / 10
    }

    fn cfg(batch: usize) -> ShardConfig {
        ShardConfig { batch_size: batch, seed: 7, window_blocks: 3, plan: ReadPlan::Global }
    }

    #[test]
    fn shards_are_disjoint_equal_and_inside_the_split() {
        let cells: CellSet = (0..1003).map(|i| i * 2).collect();
        let world = 3;
        let plans: Vec<EpochPlan> =
            (0..world).map(|r| ShardReader::new(cells.clone(), by10, Rank::new(r, world).unwrap(), cfg(16)).unwrap().plan(4)).collect();
        let n = plans[0].batches().len();
        assert_eq!(n, 1003 / 3 / 16);
        let mut seen = HashSet::new();
        for p in &plans {
            assert_eq!(p.batches().len(), n, "every rank runs the same number of steps");
            for b in &p.batches() {
                assert_eq!(b.len(), 16);
                for c in b {
                    assert!(c % 2 == 0 && *c < 2006);
                    assert!(seen.insert(*c), "cell {c} on two ranks");
                }
            }
        }
        // Together the shards cover the split but for the dropped remainder (< world × batch).
        assert_eq!(seen.len(), world * n * 16);
        assert!(cells.len() - seen.len() < world * 16);
    }

    #[test]
    fn epochs_reshuffle_and_seeds_reproduce() {
        let cells: CellSet = (0..500).collect();
        let r = ShardReader::new(cells.clone(), by10, Rank::single(), cfg(8)).unwrap();
        assert_eq!(r.plan(1), r.plan(1));
        assert_ne!(r.plan(1), r.plan(2));
        let other = ShardReader::new(cells, by10, Rank::single(), ShardConfig { seed: 8, ..cfg(8) }).unwrap();
        assert_ne!(r.plan(1), other.plan(1));
        // Within an epoch a single rank sees each cell at most once.
        let all: Vec<u32> = r.plan(3).batches().concat();
        assert_eq!(all.iter().collect::<HashSet<_>>().len(), all.len());
    }

    #[test]
    fn ranks_slice_the_batches_of_one_rank_with_the_global_batch() {
        let cells: CellSet = (0..700).collect();
        let one = ShardReader::new(cells.clone(), by10, Rank::single(), cfg(12)).unwrap().plan(2);
        let two: Vec<EpochPlan> = (0..2).map(|r| ShardReader::new(cells.clone(), by10, Rank::new(r, 2).unwrap(), cfg(6)).unwrap().plan(2)).collect();
        assert_eq!(one.batches().len(), two[0].batches().len());
        let (two0, two1) = (two[0].batches(), two[1].batches());
        for (k, global) in one.batches().iter().enumerate() {
            assert_eq!(&[two0[k].clone(), two1[k].clone()].concat(), global);
        }
        // A position moves to the same cell offset under another global batch.
        let p = ReaderPosition { epoch: 3, batch: 10 };
        assert_eq!(p.rescale(12, 24), ReaderPosition { epoch: 3, batch: 5 });
        assert_eq!(p.rescale(12, 5), ReaderPosition { epoch: 3, batch: 24 });
    }

    fn local(batch: usize) -> ShardConfig {
        ShardConfig { plan: ReadPlan::Local, ..cfg(batch) }
    }

    #[test]
    fn local_plans_are_disjoint_equal_and_read_their_own_blocks() {
        let cells: CellSet = (0..2000).collect();
        for world in [1, 2, 4] {
            let readers: Vec<ShardReader> = (0..world).map(|r| ShardReader::new(cells.clone(), by10, Rank::new(r, world).unwrap(), local(8)).unwrap()).collect();
            let plans: Vec<EpochPlan> = readers.iter().map(|r| r.plan(5)).collect();
            let n = readers[0].batches_per_epoch();
            let mut seen = HashSet::new();
            let mut blocks_read = 0;
            for p in &plans {
                assert_eq!(p.batches().len(), n, "world {world}: every rank runs the same number of steps");
                let mine: HashSet<u64> = p.batches().iter().flatten().map(|&c| by10(c)).collect();
                blocks_read += mine.len();
                for c in p.batches().iter().flatten() {
                    assert!(seen.insert(*c), "cell {c} twice");
                }
            }
            // 200 blocks in all: each rank reads its own ~1/world of them (shares split at most
            // one block per window between two ranks).
            let windows = 2000usize.div_ceil(30 * world);
            assert!(blocks_read <= 200 + windows * world, "world {world}: {blocks_read} block reads");
            assert!(seen.len() >= 2000 - windows * world * 8, "world {world}: only {} cells", seen.len());
            assert_eq!(readers[0].plan(5), plans[0], "deterministic for (seed, world)");
            assert_ne!(readers[0].plan(6), plans[0], "reshuffled per epoch");
        }
    }

    #[test]
    fn weights_scale_each_store_exactly_and_vary_the_cells_between_epochs() {
        // Cells 0..500 are store 0 (weight 0.5), 500..800 store 1 (weight 2).
        let cells: CellSet = (0..800).collect();
        let group = |c: u32| u64::from(c >= 500);
        let r = ShardReader::new(cells, by10, Rank::single(), local(10)).unwrap().weighted(group, |g| if g == 0 { 0.5 } else { 2.0 }).unwrap();
        assert_eq!(r.epoch_len(), 250 + 600);
        let count = |epoch: u64| {
            let all: Vec<u32> = r.epoch_blocks(epoch).into_iter().flat_map(|b| r.cells.slice(b).collect::<Vec<_>>()).collect();
            let from0: HashSet<u32> = all.iter().copied().filter(|&c| c < 500).collect();
            (all.iter().filter(|&&c| c < 500).count(), all.iter().filter(|&&c| c >= 500).count(), from0)
        };
        let (a0, a1, first) = count(1);
        let (b0, b1, second) = count(2);
        assert_eq!((a0, a1, b0, b1), (250, 600, 250, 600));
        assert_eq!(first.len(), 250, "a weight below 1 takes distinct cells");
        assert_ne!(first, second, "a different half each epoch");
        assert!(r.plan(1).batches().len() == r.batches_per_epoch());
    }

    /// The whole-epoch construction a plan draws a window at a time: the block order, then
    /// `Global`'s shuffled windows cut into global batches, or `Local`'s per-rank shares.
    fn whole_epoch(r: &ShardReader, epoch: u64) -> Vec<Vec<u32>> {
        let (b, world, rank, seed) = (r.cfg.batch_size, r.rank.world(), r.rank.rank(), r.cfg.seed);
        let order: Vec<u32> = r.epoch_blocks(epoch).into_iter().flat_map(|at| r.cells.slice(at).collect::<Vec<_>>()).collect();
        let n = r.batches_per_epoch();
        match r.cfg.plan {
            ReadPlan::Global => {
                let mut order = order;
                for (w, window) in order.chunks_mut(r.window_cells()).enumerate() {
                    window.shuffle(&mut rng_for(&[seed, Purpose::EpochWindow as u64, epoch, w as u64]));
                }
                order.chunks_exact(b * world).map(|g| g[rank * b..][..b].to_vec()).take(n).collect()
            }
            ReadPlan::Local => {
                let mut mine = Vec::new();
                for (w, cells) in order.chunks(r.window_cells() * world).enumerate() {
                    let share = cells.len() / world / b * b;
                    let mut piece = cells[rank * share..(rank + 1) * share].to_vec();
                    piece.shuffle(&mut rng_for(&[seed, Purpose::EpochWindow as u64, epoch, w as u64, rank as u64]));
                    mine.extend(piece);
                }
                mine.chunks_exact(b).map(<[u32]>::to_vec).collect()
            }
        }
    }

    #[test]
    fn plans_drawn_a_window_at_a_time_equal_the_whole_epoch() {
        // Cells with holes (a split), uneven blocks, a weighted group: every plan, rank and
        // resume point draws the batches the whole-epoch construction gives.
        let cells: CellSet = (0..3000u32).filter(|c| c % 11 != 3).collect();
        for plan in [ReadPlan::Global, ReadPlan::Local] {
            for world in [1, 2, 3] {
                for r in 0..world {
                    let cfg = ShardConfig { batch_size: 7, seed: 5, window_blocks: 3, plan };
                    let reader = ShardReader::new(cells.clone(), |c| (c / 37) as u64, Rank::new(r, world).unwrap(), cfg)
                        .unwrap()
                        .weighted(|c| u64::from(c >= 2000), |g| if g == 1 { 0.6 } else { 1.0 })
                        .unwrap();
                    let p = reader.plan(2);
                    let want = whole_epoch(&reader, 2);
                    assert_eq!(p.batches(), want, "{plan:?}, rank {r} of {world}");
                    assert_eq!(p.len(), want.len());
                    let from = want.len() / 2 + 1;
                    let resumed: Vec<Vec<u32>> = (from / p.batches_per_window()..p.windows()).flat_map(|g| p.window(g, from)).collect();
                    assert_eq!(resumed, want[from..], "resumed at batch {from}");
                }
            }
        }
    }

    #[test]
    fn too_few_cells_for_the_world_is_refused() {
        let e = ShardReader::new((0..10).collect(), by10, Rank::new(0, 2).unwrap(), cfg(8)).err().unwrap();
        assert!(e.to_string().contains("lower the batch size"));
        assert!(Rank::new(2, 2).is_err());
    }

    #[test]
    fn eval_plan_covers_every_cell_once() {
        let cells: Vec<u32> = (0..101).collect();
        let all: Vec<u32> = (0..3).flat_map(|r| eval_plan(&cells, Rank::new(r, 3).unwrap(), 8).batches().concat()).collect();
        assert_eq!(all, cells);
    }
}
