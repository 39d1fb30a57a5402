//! Per-rank shards of a split, reshuffled every epoch, streamed by background workers.
//!
//! Epoch plan (same on every rank, from (seed, epoch) alone):
//! 1. the split's cells are grouped into blocks by a key, normally the store chunk holding
//!    them (`Store::chunk_of`), so reading a block decodes its chunk once; blocks are permuted;
//! 2. cells are shuffled within windows of `window_blocks` blocks: this is the epoch's cell
//!    order, independent of batch size and world size;
//! 3. the order is cut into global batches of `world × batch_size` cells (the remainder is
//!    dropped) and rank r takes the r-th slice of each. So every rank runs the same number of
//!    steps, no rank waits on a collective another skipped, and W ranks with batch B see
//!    exactly the batches of one rank with batch W·B.
//!
//! A position (epoch, batch) is all that is needed to resume exactly; `ReaderPosition::rescale`
//! carries it over to another world or batch size.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

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

/// Batches of one epoch for one rank, grouped into windows that are read together.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochPlan {
    pub batches: Vec<Vec<u32>>,
    pub batches_per_window: usize,
}

/// The training shard of one rank.
pub struct ShardReader {
    cells: Vec<u32>,
    /// `blocks[i]` is a range of `cells`.
    blocks: Vec<std::ops::Range<usize>>,
    rank: Rank,
    cfg: ShardConfig,
}

impl ShardReader {
    /// Blocks are runs of consecutive `cells` with the same `block_key` (e.g. `Store::chunk_of`).
    /// Refuses splits too small to give every rank one full batch.
    pub fn new(cells: Vec<u32>, block_key: impl Fn(u32) -> u64, rank: Rank, cfg: ShardConfig) -> Result<Self> {
        if cfg.batch_size == 0 || cfg.window_blocks == 0 {
            return Err(DataError::Config("batch_size and window_blocks must be ≥ 1".into()));
        }
        let need = cfg.batch_size * rank.world();
        if cells.len() < need {
            return Err(DataError::Config(format!(
                "the training split has {} cells, fewer than world size {} × batch size {} = {need}; lower the batch size",
                cells.len(),
                rank.world(),
                cfg.batch_size
            )));
        }
        let mut blocks: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, &c) in cells.iter().enumerate() {
            match blocks.last_mut() {
                Some(b) if block_key(cells[b.start]) == block_key(c) => b.end = i + 1,
                _ => blocks.push(i..i + 1),
            }
        }
        Ok(ShardReader { cells, blocks, rank, cfg })
    }

    /// Batches each rank runs per epoch (identical on all ranks).
    pub fn batches_per_epoch(&self) -> usize {
        self.cells.len() / self.rank.world() / self.cfg.batch_size
    }

    /// Every cell of the split in this epoch's order (the same for any world or batch size).
    pub fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        let mut blocks: Vec<&[u32]> = self.blocks.iter().map(|r| &self.cells[r.clone()]).collect();
        blocks.shuffle(&mut rng_for(&[self.cfg.seed, Purpose::EpochBlocks as u64, epoch]));
        let mut order: Vec<u32> = blocks.into_iter().flatten().copied().collect();
        for (w, window) in order.chunks_mut(self.window_cells()).enumerate() {
            window.shuffle(&mut rng_for(&[self.cfg.seed, Purpose::EpochWindow as u64, epoch, w as u64]));
        }
        order
    }

    /// This rank's batches for `epoch`: its slice of each global batch.
    pub fn plan(&self, epoch: u64) -> EpochPlan {
        let b = self.cfg.batch_size;
        let global = b * self.rank.world();
        let order = self.epoch_order(epoch);
        let batches = order.chunks_exact(global).map(|g| g[self.rank.rank() * b..][..b].to_vec()).collect();
        // Read about one shuffle window per group of batches: its chunks are decoded once.
        EpochPlan { batches, batches_per_window: (self.window_cells() / global).max(1) }
    }

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
    EpochPlan { batches, batches_per_window: (4096 / batch_size.max(1)).max(1) }
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
    pub fn new(store: Arc<Store>, plan: EpochPlan, start: ReaderPosition, workers: usize, depth: usize, f: BatchFn<T>) -> Self {
        let workers = workers.max(1);
        let per = plan.batches_per_window.max(1);
        let mut windows: Vec<Vec<Vec<u32>>> = Vec::new();
        for (i, batch) in plan.batches.into_iter().enumerate().skip(start.batch) {
            if windows.is_empty() || (i % per == 0 && i != start.batch) {
                windows.push(Vec::new());
            }
            if let Some(last) = windows.last_mut() {
                last.push(batch);
            }
        }
        let window_sizes: Vec<usize> = windows.iter().map(Vec::len).collect();
        let mut assigned: Vec<Vec<Vec<Vec<u32>>>> = (0..workers).map(|_| Vec::new()).collect();
        for (w, window) in windows.into_iter().enumerate() {
            assigned[w % workers].push(window);
        }
        let mut receivers = Vec::new();
        let mut handles = Vec::new();
        for work in assigned {
            let (tx, rx) = sync_channel(depth.max(1));
            let (store, f) = (store.clone(), f.clone());
            handles.push(std::thread::spawn(move || {
                for window in work {
                    let mut rows: Vec<u32> = window.iter().flatten().copied().collect();
                    rows.sort_unstable();
                    let wanted: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
                    let block = match store.read_cells(&wanted) {
                        Ok(b) => b,
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
        ShardConfig { batch_size: batch, seed: 7, window_blocks: 3 }
    }

    #[test]
    fn shards_are_disjoint_equal_and_inside_the_split() {
        let cells: Vec<u32> = (0..1003).map(|i| i * 2).collect();
        let world = 3;
        let plans: Vec<EpochPlan> =
            (0..world).map(|r| ShardReader::new(cells.clone(), by10, Rank::new(r, world).unwrap(), cfg(16)).unwrap().plan(4)).collect();
        let n = plans[0].batches.len();
        assert_eq!(n, 1003 / 3 / 16);
        let mut seen = HashSet::new();
        for p in &plans {
            assert_eq!(p.batches.len(), n, "every rank runs the same number of steps");
            for b in &p.batches {
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
        let cells: Vec<u32> = (0..500).collect();
        let r = ShardReader::new(cells.clone(), by10, Rank::single(), cfg(8)).unwrap();
        assert_eq!(r.plan(1), r.plan(1));
        assert_ne!(r.plan(1), r.plan(2));
        let other = ShardReader::new(cells, by10, Rank::single(), ShardConfig { seed: 8, ..cfg(8) }).unwrap();
        assert_ne!(r.plan(1), other.plan(1));
        // Within an epoch a single rank sees each cell at most once.
        let all: Vec<u32> = r.plan(3).batches.concat();
        assert_eq!(all.iter().collect::<HashSet<_>>().len(), all.len());
    }

    #[test]
    fn ranks_slice_the_batches_of_one_rank_with_the_global_batch() {
        let cells: Vec<u32> = (0..700).collect();
        let one = ShardReader::new(cells.clone(), by10, Rank::single(), cfg(12)).unwrap().plan(2);
        let two: Vec<EpochPlan> = (0..2).map(|r| ShardReader::new(cells.clone(), by10, Rank::new(r, 2).unwrap(), cfg(6)).unwrap().plan(2)).collect();
        assert_eq!(one.batches.len(), two[0].batches.len());
        for (k, global) in one.batches.iter().enumerate() {
            assert_eq!(&[two[0].batches[k].clone(), two[1].batches[k].clone()].concat(), global);
        }
        // A position moves to the same cell offset under another global batch.
        let p = ReaderPosition { epoch: 3, batch: 10 };
        assert_eq!(p.rescale(12, 24), ReaderPosition { epoch: 3, batch: 5 });
        assert_eq!(p.rescale(12, 5), ReaderPosition { epoch: 3, batch: 24 });
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
        let all: Vec<u32> = (0..3).flat_map(|r| eval_plan(&cells, Rank::new(r, 3).unwrap(), 8).batches.concat()).collect();
        assert_eq!(all, cells);
    }
}
