//! A training corpus: several stores read as one, through one gene vocabulary.
//!
//! Cells are addressed by a corpus id: the stores' cells back to back, in the order the
//! stores are listed (`starts[s] + row`). Every read returns counts in vocabulary gene order;
//! genes of a store outside the vocabulary are left out, and vocabulary genes a store does not
//! measure are absent from its cells' sequences (`Panels`), never read as zero.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cells::{runs_by_key, CellSet};
use crate::csr::CsrRows;
use crate::error::{DataError, Result};
use crate::genes::{build_vocabulary, store_genes, GeneCase, GeneMap, Overlap, VocabularySpec};
use crate::rng::{hash_keys, Purpose};
use crate::split::{Split, SplitSpec};
use crate::store::Store;

/// One store of a corpus, as a config lists it (`[[data.stores]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSpec {
    pub path: PathBuf,
    /// The `var` column whose values are the gene names to match (default: the var names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gene_key: Option<String>,
    /// Sampling weight: each epoch takes each chunk of this store `weight` times on average
    /// (0.5: half of its cells, a different half each epoch; 2: every cell twice).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

impl StoreSpec {
    pub fn new(path: impl Into<PathBuf>) -> StoreSpec {
        StoreSpec { path: path.into(), gene_key: None, weight: 1.0 }
    }
}

/// An opened store of the corpus and how its genes map onto the vocabulary.
pub struct Member {
    pub spec: StoreSpec,
    pub store: Arc<Store>,
    pub genes: GeneMap,
}

/// Several stores behind one cell numbering and one vocabulary.
pub struct Corpus {
    pub members: Vec<Member>,
    /// Corpus id of each member's first cell, then the total.
    starts: Vec<u32>,
    pub vocabulary: Vec<String>,
    pub case: GeneCase,
    /// Cells in the chunks `read_cells` decoded (the sampled reads: tokenizer fit, baselines,
    /// validation), so start-up can say how much of the store it read.
    sampled_decoded: std::sync::atomic::AtomicU64,
}

/// Cell totals read at a time by `Corpus::cell_totals`.
const TOTALS_SLICE: u64 = 1 << 20;

/// Bits of a block key below the member index: block indices stay far below 2⁴⁰.
const MEMBER_SHIFT: u32 = 40;

/// Consecutive store chunks per read block. A block's last cell usually runs into the next
/// chunk, so reading a block decodes `CHUNKS_PER_BLOCK + 1` chunks: 16 keeps that overhead
/// near 1/16 while a block stays small enough to shuffle well (~16 M stored values, ~15,000
/// cells of a 2,000-gene atlas; a rank holds two decoded blocks per read window).
pub const CHUNKS_PER_BLOCK: u64 = 16;

impl Corpus {
    /// Opens `specs` and builds their vocabulary.
    pub fn open(specs: &[StoreSpec], vocabulary: &VocabularySpec, case: GeneCase) -> Result<Corpus> {
        let (stores, panels) = open_stores(specs)?;
        let vocab = build_vocabulary(vocabulary, &panels, case)?;
        Corpus::assemble(specs, stores, panels, vocab, case)
    }

    /// Opens `specs` against a fixed vocabulary (a resumed run's, or a model's).
    pub fn with_vocabulary(specs: &[StoreSpec], vocab: Vec<String>, case: GeneCase) -> Result<Corpus> {
        let (stores, panels) = open_stores(specs)?;
        Corpus::assemble(specs, stores, panels, vocab, case)
    }

    fn assemble(specs: &[StoreSpec], stores: Vec<Store>, panels: Vec<Vec<String>>, vocab: Vec<String>, case: GeneCase) -> Result<Corpus> {
        let mut members = Vec::new();
        let mut starts = vec![0u32];
        for ((spec, store), genes) in specs.iter().zip(stores).zip(panels) {
            if !(spec.weight >= 0.0 && spec.weight.is_finite()) {
                return Err(DataError::Config(format!("data.stores: `{}` has weight {}; use a finite weight ≥ 0", spec.path.display(), spec.weight)));
            }
            let map = GeneMap::new(&genes, &vocab, case, &store.path)?;
            let total = *starts.last().unwrap_or(&0) as u64 + store.n_cells() as u64;
            let total = u32::try_from(total).map_err(|_| DataError::Config("the corpus holds more than 2³² cells; train on fewer stores".into()))?;
            starts.push(total);
            members.push(Member { spec: spec.clone(), store: Arc::new(store), genes: map });
        }
        Ok(Corpus { members, starts, vocabulary: vocab, case, sampled_decoded: Default::default() })
    }

    /// One store as a corpus whose vocabulary is its var names.
    pub fn single(path: &Path) -> Result<Corpus> {
        Corpus::open(&[StoreSpec::new(path)], &VocabularySpec::Union, GeneCase::Exact)
    }

    pub fn n_cells(&self) -> usize {
        *self.starts.last().unwrap_or(&0) as usize
    }

    /// Corpus ids of member `m`'s cells.
    pub fn cells_of(&self, m: usize) -> Range<u32> {
        self.starts[m]..self.starts[m + 1]
    }

    /// The member holding corpus cell `cell`, and its row there.
    pub fn locate(&self, cell: u32) -> (usize, usize) {
        let m = self.starts.partition_point(|&s| s <= cell) - 1;
        (m, (cell - self.starts[m]) as usize)
    }

    /// The read block holding the cell (`CHUNKS_PER_BLOCK` consecutive chunks of its store),
    /// unique across members: the unit the shard reader and samples take whole.
    pub fn block_of(&self, cell: u32) -> u64 {
        let (m, row) = self.locate(cell);
        ((m as u64) << MEMBER_SHIFT) | (self.members[m].store.chunk_of(row as u32) / CHUNKS_PER_BLOCK)
    }

    /// The member (store index) of a cell, as a weight group for the shard reader.
    pub fn member_of(&self, cell: u32) -> u64 {
        self.locate(cell).0 as u64
    }

    /// The sampling weight of member `m`.
    pub fn weight(&self, m: u64) -> f64 {
        self.members.get(m as usize).map_or(1.0, |x| x.spec.weight)
    }

    /// Counts of `cells` (corpus ids, ascending) in vocabulary gene order.
    pub fn read_cells(&self, cells: &[u32]) -> Result<CsrRows> {
        let (counts, decoded) = self.read_cells_costed(cells)?;
        self.sampled_decoded.fetch_add(decoded, std::sync::atomic::Ordering::Relaxed);
        Ok(counts)
    }

    /// Cells decoded by `read_cells` so far.
    pub fn sampled_decoded(&self) -> u64 {
        self.sampled_decoded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cells in the chunks `read_cells(cells)` decodes, without reading.
    pub fn read_cost(&self, cells: &[u32]) -> Result<u64> {
        self.by_member(cells).map(|(m, rows)| self.members[m].store.read_cost(&rows)).sum()
    }

    /// `read_cells`, and the cells in the chunks it decoded.
    pub fn read_cells_costed(&self, cells: &[u32]) -> Result<(CsrRows, u64)> {
        let mut out: Option<CsrRows> = None;
        let mut decoded = 0;
        for (m, rows) in self.by_member(cells) {
            let member = &self.members[m];
            let (mut block, cost) = member.store.read_cells_costed(&rows)?;
            decoded += cost;
            if !member.genes.is_identity() {
                block = member.genes.remap(&block);
            }
            match out.as_mut() {
                None => out = Some(block),
                Some(o) => (0..block.n_rows()).for_each(|i| o.push_row_from(&block, i)),
            }
        }
        Ok((out.unwrap_or_default(), decoded))
    }

    /// Ascending corpus ids split into (member, its store rows) runs.
    fn by_member<'a>(&'a self, cells: &'a [u32]) -> impl Iterator<Item = (usize, Vec<usize>)> + 'a {
        let mut at = 0;
        std::iter::from_fn(move || {
            let first = *cells.get(at)?;
            let (m, _) = self.locate(first);
            let end = at + cells[at..].partition_point(|&c| c < self.starts[m + 1]);
            let rows = cells[at..end].iter().map(|&c| (c - self.starts[m]) as usize).collect();
            at = end;
            Some((m, rows))
        })
    }

    /// Splits every member with `spec` (cells hashed by name within their store).
    pub fn split(&self, spec: &SplitSpec) -> Result<Split> {
        let mut split = Split { train: CellSet::new(), val: CellSet::new() };
        for (m, member) in self.members.iter().enumerate() {
            let s = spec.apply(&member.store)?;
            split.train.extend_set(&s.train.shifted(self.starts[m]));
            split.val.extend_set(&s.val.shifted(self.starts[m]));
        }
        Ok(split)
    }

    /// Total counts of `cells` (corpus ids, ascending) from the stores' statistics, read a
    /// slice at a time (no matrix read, no table of every cell).
    pub fn cell_totals(&self, cells: &[u32]) -> Result<Vec<f64>> {
        let mut totals = Vec::with_capacity(cells.len());
        for (m, rows) in self.by_member(cells) {
            let store = &self.members[m].store;
            let mut slice: Option<(u64, Vec<f64>)> = None;
            for r in rows {
                let start = r as u64 / TOTALS_SLICE * TOTALS_SLICE;
                if slice.as_ref().is_none_or(|(s, _)| *s != start) {
                    slice = Some((start, store.read_slice::<f64>("uns/neurofm/cell_total", start..start + TOTALS_SLICE)?));
                }
                let t = slice.as_ref().and_then(|(_, v)| v.get(r - start as usize).copied());
                totals.push(t.ok_or_else(|| DataError::field(&store.path, "uns/neurofm/cell_total", "shorter than the store's cells; re-convert the store"))?);
            }
        }
        Ok(totals)
    }

    /// Which vocabulary genes each cell's store measures.
    pub fn panels(&self) -> Panels {
        let measured = self.members.iter().map(|m| (m.genes.overlap.missing > 0).then(|| Arc::new(m.genes.present.clone()))).collect();
        Panels { starts: self.starts.clone(), measured }
    }

    /// Each member's path and gene overlap with the vocabulary, for logs and the run directory.
    pub fn overlaps(&self) -> Vec<(PathBuf, Overlap)> {
        self.members.iter().map(|m| (m.spec.path.clone(), m.genes.overlap.clone())).collect()
    }
}

/// The stores of `specs` and each one's gene names (under its `gene_key`).
fn open_stores(specs: &[StoreSpec]) -> Result<(Vec<Store>, Vec<Vec<String>>)> {
    if specs.is_empty() {
        return Err(DataError::Config("no data: pass --data STORE (repeatable) or list [[data.stores]] in the config".into()));
    }
    let stores = specs.iter().map(|s| Store::open(&s.path)).collect::<Result<Vec<_>>>()?;
    let panels = stores.iter().zip(specs).map(|(s, spec)| store_genes(s, spec.gene_key.as_deref())).collect::<Result<Vec<_>>>()?;
    Ok((stores, panels))
}

/// Which vocabulary genes the store of each cell measures (`None`: all of them).
#[derive(Debug, Clone, Default)]
pub struct Panels {
    starts: Vec<u32>,
    measured: Vec<Option<Arc<Vec<bool>>>>,
}

impl Panels {
    /// One dataset measuring the vocabulary genes marked in `present`.
    pub fn one(present: Vec<bool>) -> Panels {
        let all = present.iter().all(|&p| p);
        Panels { starts: vec![0, u32::MAX], measured: vec![(!all).then(|| Arc::new(present))] }
    }

    /// The measured genes of `cell`'s store; `None` when it measures every vocabulary gene.
    pub fn measured(&self, cell: u32) -> Option<&[bool]> {
        let m = self.starts.partition_point(|&s| s <= cell).saturating_sub(1);
        self.measured.get(m)?.as_deref().map(Vec::as_slice)
    }
}

/// About `max` of `cells`, taken as whole blocks in the order of a hash of (seed, purpose,
/// block), so a sample decodes ~max / cells-per-block chunks instead of one chunk per cell.
/// The last block is cut by a hash of the cell. A cluster sample: as random as the stores'
/// cell order (stores are shuffled at conversion unless `--no-shuffle`). `block_of` must not
/// decrease along the cells (`Corpus::block_of` does not), so a block is a run of them.
pub fn sample_blocks(cells: &CellSet, max: usize, block_of: impl Fn(u32) -> u64, seed: u64, purpose: Purpose) -> Vec<u32> {
    if cells.len() <= max {
        return cells.to_vec();
    }
    // Each block as its key and its positions in `cells`.
    let mut blocks = runs_by_key(cells.iter().map(&block_of));
    blocks.sort_by_key(|(b, _)| hash_keys(&[seed, purpose as u64, *b]));
    let mut out = Vec::with_capacity(max);
    for (_, at) in blocks {
        let mut block: Vec<u32> = cells.slice(at).collect();
        let room = max - out.len();
        if block.len() > room {
            block.sort_by_key(|&c| hash_keys(&[seed, purpose as u64, u64::MAX, c as u64]));
            block.truncate(room);
        }
        out.extend(block);
        if out.len() == max {
            break;
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_samples_take_whole_blocks_and_reproduce() {
        let cells: CellSet = (0..1000).collect();
        let s = sample_blocks(&cells, 250, |c| c as u64 / 100, 3, Purpose::TokenizerSample);
        assert_eq!(s.len(), 250);
        let blocks: std::collections::BTreeSet<u32> = s.iter().map(|c| c / 100).collect();
        assert_eq!(blocks.len(), 3, "two whole blocks and part of a third");
        assert_eq!(s, sample_blocks(&cells, 250, |c| c as u64 / 100, 3, Purpose::TokenizerSample));
        assert_ne!(s, sample_blocks(&cells, 250, |c| c as u64 / 100, 4, Purpose::TokenizerSample));
        let few: CellSet = (0..10).collect();
        assert_eq!(sample_blocks(&few, 250, |c| c as u64, 3, Purpose::TokenizerSample), few.to_vec());
        // Blocks with holes (a split's training cells) are sampled from the cells they hold.
        let holed: CellSet = (0..1000).filter(|c| c % 7 != 0).collect();
        let s = sample_blocks(&holed, 250, |c| c as u64 / 100, 3, Purpose::TokenizerSample);
        assert!(s.len() == 250 && s.iter().all(|c| c % 7 != 0));
    }

    #[test]
    fn panels_answer_per_cell() {
        let p = Panels { starts: vec![0, 10, 20], measured: vec![None, Some(Arc::new(vec![true, false]))] };
        assert_eq!(p.measured(3), None);
        assert_eq!(p.measured(12), Some(&[true, false][..]));
        assert_eq!(Panels::one(vec![true, true]).measured(5), None);
        assert_eq!(Panels::one(vec![false, true]).measured(5), Some(&[false, true][..]));
    }
}
