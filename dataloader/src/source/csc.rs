//! CSC → row-major on disk, with bounded memory.
//!
//! Reading cells from a CSC matrix touches every column, so we transpose once: one pass over the
//! columns scatters `(row, gene, value)` records into row-range bucket files; then each bucket
//! (small enough for memory) is counting-sorted by row and appended to one CSR file, its row
//! offsets to a second file. Columns are visited in order, so each row's genes come out sorted
//! without a comparison sort. Nothing is held per cell: buckets span at most `BUCKET_ROWS`
//! rows, and blocks of rows read their offsets from the file.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use hdf5::Group;

use super::h5;
use super::rows::{check_indptr, RowSource};
use crate::csr::CsrRows;
use crate::error::{DataError, Result};

/// Entries held in memory at once (per column block and per bucket): 8 M × 12 bytes ≈ 100 MB.
const BUDGET_ENTRIES: u64 = 8 << 20;
/// Rows per bucket at most, so the per-row counts of a bucket are bounded too (8 MB).
const BUCKET_ROWS: usize = 1 << 20;
/// Write buffers of all bucket files together.
const BUFFERS_BYTES: usize = 64 << 20;

/// A CSR matrix in scratch files: interleaved little-endian `(u32 gene, f32 value)` records,
/// and the row offsets as little-endian `u64`.
pub struct SpilledCsr {
    file: File,
    path: PathBuf,
    indptr: File,
    indptr_path: PathBuf,
    n_rows: usize,
    n_cols: usize,
}

/// Transposes the CSC group `g` (shape `n_rows × n_cols`) into a scratch file under `scratch`.
pub fn transpose(g: &Group, path: &Path, field: &str, n_rows: usize, n_cols: usize, scratch: &Path) -> Result<SpilledCsr> {
    transpose_within(g, path, field, (n_rows, n_cols), scratch, (BUDGET_ENTRIES, BUCKET_ROWS))
}

/// `transpose` holding at most `budget.0` entries and `budget.1` rows per bucket.
fn transpose_within(g: &Group, path: &Path, field: &str, (n_rows, n_cols): (usize, usize), scratch: &Path, budget: (u64, usize)) -> Result<SpilledCsr> {
    let (budget_entries, bucket_rows) = budget;
    let data = h5::dataset(g, "data", path, &format!("{field}/data"))?;
    let indices = h5::dataset(g, "indices", path, &format!("{field}/indices"))?;
    let raw = h5::read_i64(&h5::dataset(g, "indptr", path, &format!("{field}/indptr"))?, path, &format!("{field}/indptr"))?;
    let colptr = check_indptr(&raw, n_cols, data.size(), indices.size(), path, field, "columns (CSC)")?;
    let nnz = colptr[n_cols];

    std::fs::create_dir_all(scratch).map_err(|e| DataError::io(scratch, e))?;
    let n_buckets = (nnz.div_ceil(budget_entries) as usize).max(n_rows.div_ceil(bucket_rows)).clamp(1, n_rows.max(1));
    let rows_per_bucket = n_rows.div_ceil(n_buckets).max(1);
    let buffer = (BUFFERS_BYTES / n_buckets).clamp(64 << 10, 1 << 20);
    let bucket_paths: Vec<PathBuf> = (0..n_buckets).map(|b| scratch.join(format!("csc-bucket-{b}.bin"))).collect();
    let mut writers = bucket_paths
        .iter()
        .map(|p| File::create(p).map(|f| BufWriter::with_capacity(buffer, f)).map_err(|e| DataError::io(p, e)))
        .collect::<Result<Vec<_>>>()?;

    // Pass 1: scatter records into row-range buckets, column block by column block.
    let mut col = 0;
    while col < n_cols {
        let mut end = col + 1;
        while end < n_cols && colptr[end + 1] - colptr[col] <= budget_entries {
            end += 1;
        }
        let (lo, hi) = (colptr[col] as usize, colptr[end] as usize);
        if hi > lo {
            let vals = data.read_slice_1d::<f32, _>(lo..hi).map_err(h5::h5err(path, &format!("{field}/data")))?;
            let rows = indices.read_slice_1d::<i64, _>(lo..hi).map_err(h5::h5err(path, &format!("{field}/indices")))?;
            for c in col..end {
                for k in (colptr[c] as usize - lo)..(colptr[c + 1] as usize - lo) {
                    let r = rows[k];
                    if r < 0 || r as usize >= n_rows {
                        return Err(DataError::field(
                            path,
                            format!("{field}/indices"),
                            format!("entry of column {c} is {r}, out of range for {n_rows} cells (the `shape` attribute)"),
                        ));
                    }
                    let r = r as usize;
                    let mut rec = [0u8; 12];
                    rec[0..4].copy_from_slice(&(r as u32).to_le_bytes());
                    rec[4..8].copy_from_slice(&(c as u32).to_le_bytes());
                    rec[8..12].copy_from_slice(&vals[k].to_le_bytes());
                    let b = r / rows_per_bucket;
                    writers[b].write_all(&rec).map_err(|e| DataError::io(&bucket_paths[b], e))?;
                }
            }
        }
        col = end;
    }
    for (w, p) in writers.into_iter().zip(&bucket_paths) {
        w.into_inner().map_err(|e| DataError::io(p, e.into_error()))?;
    }

    // Pass 2: each bucket → its rows' counts → counting sort by row → append to the CSR file,
    // and the rows' offsets to the offsets file.
    let out_path = scratch.join("csc-transposed.bin");
    let indptr_path = scratch.join("csc-transposed-indptr.bin");
    let create = |p: &Path| File::options().read(true).write(true).create(true).truncate(true).open(p).map_err(|e| DataError::io(p, e));
    let mut out = BufWriter::with_capacity(1 << 20, create(&out_path)?);
    let mut offsets = BufWriter::with_capacity(1 << 20, create(&indptr_path)?);
    let mut written = 0u64;
    offsets.write_all(&written.to_le_bytes()).map_err(|e| DataError::io(&indptr_path, e))?;
    for (b, bp) in bucket_paths.iter().enumerate() {
        let first_row = b * rows_per_bucket;
        let last_row = ((b + 1) * rows_per_bucket).min(n_rows);
        if first_row >= last_row {
            continue;
        }
        let row = |rec: &[u8; 12]| u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize - first_row;
        // Two reads of the bucket (from the page cache): count its rows, then place them.
        let mut fill = vec![0u64; last_row - first_row];
        let len = for_each_record(bp, |rec| fill[row(rec)] += 1)?;
        let mut at = 0u64;
        for n in fill.iter_mut() {
            at += std::mem::replace(n, at);
            offsets.write_all(&(written + at).to_le_bytes()).map_err(|e| DataError::io(&indptr_path, e))?;
        }
        let mut placed = vec![0u8; len as usize * 8];
        for_each_record(bp, |rec| {
            let r = row(rec);
            let p = fill[r] as usize * 8;
            placed[p..p + 8].copy_from_slice(&rec[4..12]);
            fill[r] += 1;
        })?;
        out.write_all(&placed).map_err(|e| DataError::io(&out_path, e))?;
        written += len;
        std::fs::remove_file(bp).map_err(|e| DataError::io(bp, e))?;
    }
    let file = out.into_inner().map_err(|e| DataError::io(&out_path, e.into_error()))?;
    let indptr = offsets.into_inner().map_err(|e| DataError::io(&indptr_path, e.into_error()))?;
    Ok(SpilledCsr { file, path: out_path, indptr, indptr_path, n_rows, n_cols })
}

/// Calls `f` on each 12-byte record of a bucket file; returns how many there were.
fn for_each_record(path: &Path, mut f: impl FnMut(&[u8; 12])) -> Result<u64> {
    let mut rd = BufReader::with_capacity(1 << 20, File::open(path).map_err(|e| DataError::io(path, e))?);
    let (mut rec, mut n) = ([0u8; 12], 0);
    loop {
        match rd.read_exact(&mut rec) {
            Ok(()) => f(&rec),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(n),
            Err(e) => return Err(DataError::io(path, e)),
        }
        n += 1;
    }
}

impl RowSource for SpilledCsr {
    fn n_rows(&self) -> usize {
        self.n_rows
    }
    fn n_cols(&self) -> usize {
        self.n_cols
    }
    fn read_rows(&mut self, rows: Range<usize>) -> Result<CsrRows> {
        let mut raw = vec![0u8; (rows.len() + 1) * 8];
        self.indptr.read_exact_at(&mut raw, rows.start as u64 * 8).map_err(|e| DataError::io(&self.indptr_path, e))?;
        let ptr: Vec<u64> = raw.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default())).collect();
        let (lo, hi) = (ptr[0], ptr[rows.len()]);
        let mut buf = vec![0u8; ((hi - lo) * 8) as usize];
        self.file.read_exact_at(&mut buf, lo * 8).map_err(|e| DataError::io(&self.path, e))?;
        let mut out = CsrRows::with_capacity(rows.len(), (hi - lo) as usize);
        for rec in buf.chunks_exact(8) {
            out.indices.push(u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]));
            out.values.push(f32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]));
        }
        out.indptr = ptr.iter().map(|&p| p - lo).collect();
        Ok(out)
    }
}

impl Drop for SpilledCsr {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.indptr_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{CountsLocation, SourceFile};
    use crate::synth::{write, SynthLayout, SynthOptions};

    #[test]
    fn transposes_in_many_buckets_like_the_csr_file() {
        let dir = tempfile::tempdir().unwrap();
        let (csr, csc) = (dir.path().join("csr.h5ad"), dir.path().join("csc.h5ad"));
        let base = SynthOptions::new(csr.clone(), 230, 40, 3, 6);
        write(&base).unwrap();
        write(&SynthOptions { output: csc.clone(), layout: SynthLayout::Csc, ..base }).unwrap();
        let mut want = SourceFile::open(&csr).unwrap().open_rows(&CountsLocation::X, None).unwrap();
        let file = hdf5::File::open(&csc).unwrap();
        let g = file.group("X").unwrap();
        // 7 rows a bucket, 300 entries a column block: dozens of buckets and blocks.
        let mut got = transpose_within(&g, &csc, "X", (230, 40), &dir.path().join("scratch"), (300, 7)).unwrap();
        assert_eq!(got.n_rows(), 230);
        for rows in [0..230, 0..1, 5..19, 100..230, 229..230, 40..40] {
            assert_eq!(got.read_rows(rows.clone()).unwrap(), want.read_rows(rows.clone()).unwrap(), "rows {rows:?}");
        }
    }
}
