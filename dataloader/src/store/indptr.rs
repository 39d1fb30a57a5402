//! `X/indptr` read a page at a time, so an opened store costs per chunk, not 8 bytes a cell.
//!
//! Opening sweeps the array once, a slice at a time, keeping what whole-store questions need:
//! the first row of every matrix chunk (which read block a cell is in) and the first value of
//! every page (where to look for an entry). Reads fetch the pages they touch into a small
//! most-recently-used cache; they are local (sorted rows of a read window or a sample), so a
//! page is fetched about once per pass.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use zarrs::array::Array;
use zarrs::filesystem::FilesystemStore;

use super::StoredElement;
use crate::error::{DataError, Result};

/// Entries per cached page (512 KiB).
const PAGE: u64 = 1 << 16;
/// Pages kept: a read window touches one or two, a split or sample pass one at a time.
const CACHED_PAGES: usize = 8;
/// Entries decoded at a time while sweeping at open.
const SWEEP: u64 = 1 << 20;

/// A store's row offsets.
pub(crate) struct Indptr {
    /// The store, for errors.
    root: PathBuf,
    array: Array<FilesystemStore>,
    dtype: String,
    /// Entries: cells + 1.
    len: u64,
    /// Entries per page (`PAGE`; smaller in tests, so they cross pages).
    page: u64,
    nnz: u64,
    /// `chunk_first_row[c]`: the first row whose first entry is at or after chunk `c`'s start,
    /// for every chunk up to the one holding entry `nnz`.
    chunk_first_row: Vec<u32>,
    /// The first value of each page.
    page_firsts: Vec<u64>,
    /// Recently read pages, most recent first.
    cache: Mutex<Vec<(u64, Arc<[u64]>)>>,
}

impl Indptr {
    /// Sweeps `array` (`X/indptr` of the store at `root`), checking it never decreases.
    pub fn open(array: Array<FilesystemStore>, dtype: String, root: &Path, chunk_entries: u64) -> Result<Indptr> {
        Indptr::open_paged(array, dtype, root, chunk_entries, PAGE)
    }

    fn open_paged(array: Array<FilesystemStore>, dtype: String, root: &Path, chunk_entries: u64, page: u64) -> Result<Indptr> {
        let len = array.shape().first().copied().unwrap_or(0);
        if len == 0 {
            return Err(DataError::field(root, "X/indptr", "empty; a CSR matrix has cells + 1 offsets"));
        }
        let mut me = Indptr { root: root.to_path_buf(), array, dtype, len, page, nnz: 0, chunk_first_row: Vec::new(), page_firsts: Vec::new(), cache: Mutex::default() };
        let mut prev = 0u64;
        for start in (0..len).step_by(SWEEP as usize) {
            let values = me.read(start..(start + SWEEP).min(len))?;
            for (i, &v) in (start..).zip(&values) {
                if v < prev || (i == 0 && v != 0) {
                    return Err(DataError::field(root, "X/indptr", format!("offset {i} is {v} after {prev}; offsets start at 0 and never decrease")));
                }
                if i % page == 0 {
                    me.page_firsts.push(v);
                }
                while (me.chunk_first_row.len() as u64) * chunk_entries <= v {
                    me.chunk_first_row.push(u32::try_from(i).map_err(|_| DataError::field(root, "X/indptr", "more than 2³² cells"))?);
                }
                prev = v;
            }
        }
        me.nnz = prev;
        Ok(me)
    }

    /// Cells of the store.
    pub fn n_cells(&self) -> usize {
        (self.len - 1) as usize
    }

    pub fn nnz(&self) -> u64 {
        self.nnz
    }

    /// The chunk of `X/data` holding the row's first entry (`nnz / chunk` for trailing empty rows).
    pub fn chunk_of(&self, row: u32) -> u64 {
        self.chunk_first_row.partition_point(|&f| f <= row).saturating_sub(1) as u64
    }

    /// Entry `i`.
    pub fn get(&self, i: usize) -> Result<u64> {
        let page = self.page(i as u64 / self.page)?;
        Ok(page[i % self.page as usize])
    }

    /// Entries `at` (a range of `0..cells + 1`).
    pub fn range(&self, at: Range<usize>) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(at.len());
        let mut i = at.start;
        while i < at.end {
            let (p, off) = (i as u64 / self.page, i % self.page as usize);
            let page = self.page(p)?;
            let take = (page.len() - off).min(at.end - i);
            out.extend_from_slice(&page[off..off + take]);
            i += take;
        }
        Ok(out)
    }

    /// The number of leading entries satisfying `pred`, which holds for a prefix (`slice::partition_point`).
    pub fn partition_point(&self, pred: impl Fn(u64) -> bool) -> Result<usize> {
        let p = self.page_firsts.partition_point(|&v| pred(v));
        if p == 0 {
            return Ok(0);
        }
        let page = self.page(p as u64 - 1)?;
        Ok((p - 1) * self.page as usize + page.partition_point(|&v| pred(v)))
    }

    fn page(&self, p: u64) -> Result<Arc<[u64]>> {
        let mut cache = self.cache.lock().map_err(|_| DataError::Internal("a reader thread panicked holding the indptr cache".into()))?;
        if let Some(at) = cache.iter().position(|(q, _)| *q == p) {
            let hit = cache.remove(at);
            cache.insert(0, hit.clone());
            return Ok(hit.1);
        }
        let start = p * self.page;
        if start >= self.len {
            return Err(DataError::Internal(format!("indptr page {p} is past the store's {} offsets", self.len)));
        }
        let page: Arc<[u64]> = self.read(start..(start + self.page).min(self.len))?.into();
        cache.insert(0, (p, page.clone()));
        cache.truncate(CACHED_PAGES);
        Ok(page)
    }

    fn read(&self, at: Range<u64>) -> Result<Vec<u64>> {
        let values = i64::read_any(&self.array, at, &self.dtype).map_err(|e| DataError::zarr(&self.root, "X/indptr", e))?;
        Ok(values.into_iter().map(|v| v.max(0) as u64).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::{convert, ConvertOptions};
    use crate::synth::{self, SynthOptions};

    #[test]
    fn paged_offsets_answer_like_the_whole_array() {
        let dir = tempfile::tempdir().unwrap();
        let (src, out) = (dir.path().join("a.h5ad"), dir.path().join("a.zarr"));
        synth::write(&SynthOptions::new(src.clone(), 700, 300, 3, 2)).unwrap();
        convert(&src, &out, &ConvertOptions { chunk_entries: 4096, ..ConvertOptions::default() }).unwrap();
        let whole: Vec<u64> = crate::store::Store::open(&out).unwrap().read_vec::<i64>("X/indptr").unwrap().into_iter().map(|v| v as u64).collect();
        let storage = Arc::new(FilesystemStore::new(&out).unwrap());
        let array = Array::open(storage, "/X/indptr").unwrap();
        // Pages of 64 offsets, 8 cached: every question crosses pages and evicts.
        let ip = Indptr::open_paged(array, "int64".into(), &out, 4096, 64).unwrap();
        assert_eq!((ip.n_cells(), ip.nnz()), (700, whole[700]));
        for i in (0..=700).step_by(13) {
            assert_eq!(ip.get(i).unwrap(), whole[i]);
        }
        assert_eq!(ip.range(50..400).unwrap(), whole[50..400]);
        assert_eq!(ip.range(0..701).unwrap(), whole);
        for v in [0, 1, 4095, 4096, 4097, whole[333], whole[700], whole[700] + 1] {
            assert_eq!(ip.partition_point(|p| p <= v).unwrap(), whole.partition_point(|&p| p <= v), "≤ {v}");
            assert_eq!(ip.partition_point(|p| p < v).unwrap(), whole.partition_point(|&p| p < v), "< {v}");
        }
        for row in 0..700u32 {
            assert_eq!(ip.chunk_of(row), whole[row as usize] / 4096, "row {row}");
        }
    }
}
