//! Row readers over HDF5 matrices: CSR by hyperslab, dense (either orientation) by slab.

use std::ops::Range;
use std::path::{Path, PathBuf};

use hdf5::{Dataset, Group};

use super::direct::DirectChunks;
use super::h5;
use crate::csr::CsrRows;
use crate::error::{DataError, Result};

/// Random access to blocks of cells of one count matrix.
pub trait RowSource: Send {
    fn n_rows(&self) -> usize;
    fn n_cols(&self) -> usize;
    /// Reads `rows` as CSR with sorted, in-range gene indices.
    fn read_rows(&mut self, rows: Range<usize>) -> Result<CsrRows>;
}

/// CSR matrix in an AnnData group (`data`, `indices`, `indptr`). The row offsets are read a
/// block at a time, not held: an atlas's are 8 bytes a cell.
pub struct H5Csr {
    path: PathBuf,
    field: String,
    data: Dataset,
    indices: Dataset,
    indptr: Dataset,
    /// Parallel chunk decoders for `data` and `indices`, when their filters allow.
    direct: Option<(DirectChunks, DirectChunks)>,
    n_rows: usize,
    n_cols: usize,
}

/// Offsets swept at a time when `H5Csr::open` checks them.
const INDPTR_SLICE: usize = 1 << 20;

impl H5Csr {
    /// Opens the group and checks `indptr` against `shape` and the array lengths, a slice at a
    /// time.
    pub fn open(g: &Group, path: &Path, field: &str, n_rows: usize, n_cols: usize) -> Result<Self> {
        let data = h5::dataset(g, "data", path, &format!("{field}/data"))?;
        let indices = h5::dataset(g, "indices", path, &format!("{field}/indices"))?;
        let f = format!("{field}/indptr");
        let indptr = h5::dataset(g, "indptr", path, &f)?;
        let mut check = IndptrCheck::new(indptr.size(), n_rows, path, field, "rows")?;
        for at in super::slices(indptr.size(), INDPTR_SLICE) {
            check.feed(&h5::read_at::<i64>(&indptr, at.clone(), path, &f)?, at.start)?;
        }
        check.finish(data.size(), indices.size())?;
        let direct = DirectChunks::open(&data, path, &format!("{field}/data")).zip(DirectChunks::open(&indices, path, &format!("{field}/indices")));
        Ok(H5Csr { path: path.to_path_buf(), field: field.to_string(), data, indices, indptr, direct, n_rows, n_cols })
    }
}

/// Validates a compressed-sparse pointer array and returns it as `u64`.
pub(super) fn check_indptr(
    raw: &[i64],
    n_major: usize,
    n_data: usize,
    n_indices: usize,
    path: &Path,
    field: &str,
    major: &str,
) -> Result<Vec<u64>> {
    let mut check = IndptrCheck::new(raw.len(), n_major, path, field, major)?;
    check.feed(raw, 0)?;
    check.finish(n_data, n_indices)?;
    Ok(raw.iter().map(|&x| x as u64).collect())
}

/// The checks of a pointer array fed in consecutive slices: as many entries as the shape
/// says plus one, starting at 0, never decreasing, ending at the arrays' length.
struct IndptrCheck<'a> {
    path: &'a Path,
    field: String,
    /// The last entry seen, and its position.
    last: Option<(usize, i64)>,
}

impl<'a> IndptrCheck<'a> {
    fn new(len: usize, n_major: usize, path: &'a Path, field: &str, major: &str) -> Result<Self> {
        let field = format!("{field}/indptr");
        if len != n_major + 1 {
            return Err(DataError::field(
                path,
                &field,
                format!(
                    "has {len} entries but the `shape` attribute says {n_major} {major} (expected {}); the shape attribute and the arrays disagree",
                    n_major + 1
                ),
            ));
        }
        Ok(IndptrCheck { path, field, last: None })
    }

    /// Checks `part`, the entries from position `first` on.
    fn feed(&mut self, part: &[i64], first: usize) -> Result<()> {
        if let (None, Some(&p0)) = (self.last, part.first()) {
            if p0 != 0 {
                return Err(DataError::field(self.path, &self.field, format!("must start at 0, starts at {p0}")));
            }
        }
        for (i, &p) in part.iter().enumerate() {
            if let Some((j, prev)) = self.last.filter(|&(_, prev)| p < prev) {
                return Err(DataError::field(
                    self.path,
                    &self.field,
                    format!("is not monotonic: entry {j} is {prev} but entry {} is {p}", first + i),
                ));
            }
            self.last = Some((first + i, p));
        }
        Ok(())
    }

    fn finish(self, n_data: usize, n_indices: usize) -> Result<()> {
        let last = self.last.map_or(0, |(_, p)| p) as usize;
        if last != n_data || last != n_indices {
            return Err(DataError::field(
                self.path,
                &self.field,
                format!("ends at {last} but `data` has {n_data} and `indices` has {n_indices} entries"),
            ));
        }
        Ok(())
    }
}

/// Turns raw (index, value) entries of one block into sorted CSR, checking index range.
/// Unsorted rows are sorted and duplicate entries summed, as SciPy does.
pub(super) fn build_rows(
    indptr: &[u64],
    indices: &[i64],
    values: Vec<f32>,
    n_cols: usize,
    path: &Path,
    field: &str,
    first_row: usize,
) -> Result<CsrRows> {
    let base = indptr[0];
    if let Some(&bad) = indices.iter().find(|&&g| g < 0 || g as usize >= n_cols) {
        let k = indices.iter().position(|&g| g == bad).unwrap_or(0) as u64 + base;
        let row = indptr.partition_point(|&p| p <= k).saturating_sub(1);
        return Err(DataError::field(
            path,
            format!("{field}/indices"),
            format!("entry of row {} is {bad}, out of range for {n_cols} genes (the `shape` attribute)", first_row + row),
        ));
    }
    let sorted = (0..indptr.len() - 1).all(|r| {
        let (a, b) = ((indptr[r] - base) as usize, (indptr[r + 1] - base) as usize);
        indices[a..b].windows(2).all(|w| w[0] < w[1])
    });
    if sorted {
        // The common case: move the values, convert the indices once.
        return Ok(CsrRows {
            indptr: indptr.iter().map(|&p| p - base).collect(),
            indices: indices.iter().map(|&g| g as u32).collect(),
            values,
        });
    }
    let mut out = CsrRows::with_capacity(indptr.len() - 1, values.len());
    for r in 0..indptr.len() - 1 {
        let (a, b) = ((indptr[r] - base) as usize, (indptr[r + 1] - base) as usize);
        let idx = &indices[a..b];
        if idx.windows(2).all(|w| w[0] < w[1]) {
            out.indices.extend(idx.iter().map(|&g| g as u32));
            out.values.extend_from_slice(&values[a..b]);
        } else {
            let mut pairs: Vec<(u32, f32)> = idx.iter().map(|&g| g as u32).zip(values[a..b].iter().copied()).collect();
            pairs.sort_by_key(|p| p.0);
            for (g, v) in pairs {
                if out.indices.len() > out.indptr[r] as usize && out.indices.last() == Some(&g) {
                    *out.values.last_mut().unwrap_or(&mut 0.0) += v;
                } else {
                    out.indices.push(g);
                    out.values.push(v);
                }
            }
        }
        out.indptr.push(out.indices.len() as u64);
    }
    Ok(out)
}

impl RowSource for H5Csr {
    fn n_rows(&self) -> usize {
        self.n_rows
    }
    fn n_cols(&self) -> usize {
        self.n_cols
    }
    fn read_rows(&mut self, rows: Range<usize>) -> Result<CsrRows> {
        let field = format!("{}/indptr", self.field);
        let ptr: Vec<u64> = h5::read_at::<i64>(&self.indptr, rows.start..rows.end + 1, &self.path, &field)?.into_iter().map(|p| p as u64).collect();
        let ptr = ptr.as_slice();
        let (lo, hi) = (ptr[0] as usize, ptr[ptr.len() - 1] as usize);
        let (values, indices) = if hi <= lo {
            (Vec::new(), Vec::new())
        } else if let Some((data, indices)) = &self.direct {
            (data.read_f32(lo..hi)?, indices.read_i64(lo..hi)?)
        } else {
            let v = self.data.read_slice_1d::<f32, _>(lo..hi).map_err(h5::h5err(&self.path, &format!("{}/data", self.field)))?;
            let i = self.indices.read_slice_1d::<i64, _>(lo..hi).map_err(h5::h5err(&self.path, &format!("{}/indices", self.field)))?;
            (v.to_vec(), i.to_vec())
        };
        build_rows(ptr, &indices, values, self.n_cols, &self.path, &self.field, rows.start)
    }
}

/// Dense matrix: cells × genes (AnnData) or genes × cells (loom).
pub struct H5Dense {
    path: PathBuf,
    field: String,
    ds: Dataset,
    n_rows: usize,
    n_cols: usize,
    transposed: bool,
}

impl H5Dense {
    pub fn new(ds: Dataset, path: &Path, field: &str, transposed: bool) -> Self {
        let shape = ds.shape();
        let (n_rows, n_cols) = if transposed { (shape[1], shape[0]) } else { (shape[0], shape[1]) };
        H5Dense { path: path.to_path_buf(), field: field.to_string(), ds, n_rows, n_cols, transposed }
    }
}

impl RowSource for H5Dense {
    fn n_rows(&self) -> usize {
        self.n_rows
    }
    fn n_cols(&self) -> usize {
        self.n_cols
    }
    fn read_rows(&mut self, rows: Range<usize>) -> Result<CsrRows> {
        let err = h5::h5err(&self.path, &self.field);
        let n = rows.len();
        if self.transposed {
            let slab = self.ds.read_slice_2d::<f32, _>((.., rows)).map_err(err)?;
            let cells_major = slab.t().as_standard_layout().into_owned();
            Ok(CsrRows::from_dense(n, self.n_cols, cells_major.as_slice().unwrap_or_default()))
        } else {
            let slab = self.ds.read_slice_2d::<f32, _>((rows, ..)).map_err(err)?;
            let slab = slab.as_standard_layout();
            Ok(CsrRows::from_dense(n, self.n_cols, slab.as_slice().unwrap_or_default()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsorted_rows_are_sorted_and_duplicates_summed_like_scipy() {
        let p = Path::new("x.h5ad");
        let rows = build_rows(&[10, 13, 15], &[2, 0, 2, 1, 1], vec![1.0, 2.0, 3.0, 4.0, 5.0], 3, p, "X", 0).unwrap();
        assert_eq!(rows.indptr, vec![0, 2, 3]);
        assert_eq!(rows.indices, vec![0, 2, 1]);
        assert_eq!(rows.values, vec![2.0, 4.0, 9.0]);
    }

    #[test]
    fn out_of_range_index_names_its_row() {
        let e = build_rows(&[0, 1, 2], &[0, 7], vec![1.0, 1.0], 3, Path::new("x.h5ad"), "X", 100).unwrap_err();
        assert!(e.to_string().contains("row 101 is 7"), "{e}");
    }
}
