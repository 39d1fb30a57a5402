//! Sets of cell ids held as runs of consecutive ids.
//!
//! A split of an atlas by read blocks is a few hundred runs however many cells it holds, and a
//! split by cell names is one run per validation cell: a rank's cell lists then cost per block
//! (or per held-out cell), not 4 bytes for each of millions of cells.

use std::ops::Range;

/// Ascending, distinct cell ids as maximal runs, with the position of each run's first cell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CellSet {
    runs: Vec<Range<u32>>,
    /// Cells before each run (its first cell's position in the set).
    offsets: Vec<usize>,
    len: usize,
}

impl CellSet {
    pub fn new() -> CellSet {
        CellSet::default()
    }

    /// Adds `cell`, which must be above every cell already in the set (`debug_assert`ed:
    /// callers push in store order).
    pub fn push(&mut self, cell: u32) {
        self.push_run(cell..cell + 1);
    }

    /// Adds the cells of `run`, all above every cell already in the set.
    pub fn push_run(&mut self, run: Range<u32>) {
        if run.is_empty() {
            return;
        }
        let n = run.len();
        match self.runs.last_mut() {
            Some(last) if last.end == run.start => last.end = run.end,
            last => {
                debug_assert!(last.is_none_or(|l| l.end < run.start), "CellSet::push_run: {run:?} is not above the set");
                self.offsets.push(self.len);
                self.runs.push(run);
            }
        }
        self.len += n;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The runs, ascending.
    pub fn runs(&self) -> &[Range<u32>] {
        &self.runs
    }

    /// The cells in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.runs.iter().flat_map(Clone::clone)
    }

    /// The cells at positions `at` (a range of `0..len`), ascending.
    pub fn slice(&self, at: Range<usize>) -> impl Iterator<Item = u32> + '_ {
        let first = self.offsets.partition_point(|&o| o <= at.start).saturating_sub(1);
        let skip = at.start - self.offsets.get(first).copied().unwrap_or(0).min(at.start);
        let mut runs = self.runs.get(first..).unwrap_or_default().iter().cloned();
        let head = runs.next().map(|r| (r.start as usize + skip).min(r.end as usize) as u32..r.end);
        head.into_iter().chain(runs).flatten().take(at.len())
    }

    /// The cells of the set within `ids`, ascending (a sweep of a file's rows a slice at a
    /// time visits the set's cells so).
    pub fn within(&self, ids: Range<u32>) -> impl Iterator<Item = u32> + '_ {
        let first = self.runs.partition_point(|r| r.end <= ids.start);
        self.runs[first..].iter().take_while(move |r| r.start < ids.end).flat_map(move |r| r.start.max(ids.start)..r.end.min(ids.end))
    }

    /// The cells as a vector (for sets known to be small: samples, validation caps).
    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }

    /// The set with every cell shifted by `by` (a store's rows as corpus ids).
    pub fn shifted(&self, by: u32) -> CellSet {
        let runs = self.runs.iter().map(|r| r.start + by..r.end + by).collect();
        CellSet { runs, offsets: self.offsets.clone(), len: self.len }
    }

    /// Appends `other`, whose cells are all above this set's.
    pub fn extend_set(&mut self, other: &CellSet) {
        other.runs.iter().for_each(|r| self.push_run(r.clone()));
    }
}

/// Runs of equal consecutive keys, as (key, positions): how read blocks are found along cells
/// in store order, where a block's key never recurs after it ends.
pub fn runs_by_key<K: PartialEq>(keys: impl IntoIterator<Item = K>) -> Vec<(K, Range<usize>)> {
    let mut runs: Vec<(K, Range<usize>)> = Vec::new();
    for (i, key) in keys.into_iter().enumerate() {
        match runs.last_mut() {
            Some((k, at)) if *k == key => at.end = i + 1,
            _ => runs.push((key, i..i + 1)),
        }
    }
    runs
}

impl FromIterator<u32> for CellSet {
    /// Collects ascending, distinct ids.
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> CellSet {
        let mut set = CellSet::new();
        iter.into_iter().for_each(|c| set.push(c));
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_slices_match_the_vector() {
        let cells: Vec<u32> = [0u32, 1, 2, 5, 6, 9, 20, 21, 22, 23].to_vec();
        let set: CellSet = cells.iter().copied().collect();
        assert_eq!(set.runs(), [0..3, 5..7, 9..10, 20..24]);
        assert_eq!((set.len(), set.to_vec()), (10, cells.clone()));
        for a in 0..=cells.len() {
            for b in a..=cells.len() {
                assert_eq!(set.slice(a..b).collect::<Vec<_>>(), cells[a..b], "slice {a}..{b}");
            }
        }
        for a in 0..26u32 {
            for b in a..26 {
                let want: Vec<u32> = cells.iter().copied().filter(|c| (a..b).contains(c)).collect();
                assert_eq!(set.within(a..b).collect::<Vec<_>>(), want, "within {a}..{b}");
            }
        }
        assert_eq!(set.shifted(100).to_vec(), cells.iter().map(|c| c + 100).collect::<Vec<_>>());
        let mut joined = set.clone();
        joined.extend_set(&(24..30).collect());
        assert_eq!(joined.runs().last(), Some(&(20..30)));
        assert_eq!(joined.len(), 16);
        assert!(CellSet::new().slice(0..0).next().is_none());
        assert_eq!(runs_by_key([3, 3, 5, 5, 5, 3]), [(3, 0..2), (5, 2..5), (3, 5..6)]);
    }
}
