//! CSC → row-major on disk, with bounded memory.
//!
//! Reading cells from a CSC matrix touches every column, so we transpose once: one pass over the
//! columns scatters `(row, gene, value)` records into row-range bucket files; then each bucket
//! (small enough for memory) is counting-sorted by row and appended to one CSR file. Columns
//! are visited in order, so each row's genes come out sorted without a comparison sort.

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

/// A CSR matrix in a scratch file: interleaved little-endian `(u32 gene, f32 value)` records.
pub struct SpilledCsr {
    file: File,
    path: PathBuf,
    indptr: Vec<u64>,
    n_cols: usize,
}

/// Transposes the CSC group `g` (shape `n_rows × n_cols`) into a scratch file under `scratch`.
pub fn transpose(g: &Group, path: &Path, field: &str, n_rows: usize, n_cols: usize, scratch: &Path) -> Result<SpilledCsr> {
    let data = h5::dataset(g, "data", path, &format!("{field}/data"))?;
    let indices = h5::dataset(g, "indices", path, &format!("{field}/indices"))?;
    let raw = h5::read_i64(&h5::dataset(g, "indptr", path, &format!("{field}/indptr"))?, path, &format!("{field}/indptr"))?;
    let colptr = check_indptr(&raw, n_cols, data.size(), indices.size(), path, field, "columns (CSC)")?;
    let nnz = colptr[n_cols];

    std::fs::create_dir_all(scratch).map_err(|e| DataError::io(scratch, e))?;
    let n_buckets = (nnz.div_ceil(BUDGET_ENTRIES) as usize).clamp(1, n_rows.max(1));
    let rows_per_bucket = n_rows.div_ceil(n_buckets).max(1);
    let bucket_paths: Vec<PathBuf> = (0..n_buckets).map(|b| scratch.join(format!("csc-bucket-{b}.bin"))).collect();
    let mut writers = bucket_paths
        .iter()
        .map(|p| File::create(p).map(|f| BufWriter::with_capacity(1 << 20, f)).map_err(|e| DataError::io(p, e)))
        .collect::<Result<Vec<_>>>()?;
    let mut row_nnz = vec![0u64; n_rows];

    // Pass 1: scatter records into row-range buckets, column block by column block.
    let mut col = 0;
    while col < n_cols {
        let mut end = col + 1;
        while end < n_cols && colptr[end + 1] - colptr[col] <= BUDGET_ENTRIES {
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
                    row_nnz[r] += 1;
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

    // Pass 2: each bucket → counting sort by row → append to the CSR file.
    let mut indptr = Vec::with_capacity(n_rows + 1);
    indptr.push(0u64);
    for &n in &row_nnz {
        indptr.push(indptr[indptr.len() - 1] + n);
    }
    let out_path = scratch.join("csc-transposed.bin");
    let out_file = File::options().read(true).write(true).create(true).truncate(true).open(&out_path).map_err(|e| DataError::io(&out_path, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, out_file);
    for (b, bp) in bucket_paths.iter().enumerate() {
        let first_row = b * rows_per_bucket;
        let last_row = ((b + 1) * rows_per_bucket).min(n_rows);
        if first_row >= last_row {
            continue;
        }
        let base = indptr[first_row];
        let len = (indptr[last_row] - base) as usize;
        let mut placed = vec![0u8; len * 8];
        let mut fill: Vec<u64> = indptr[first_row..last_row].iter().map(|&p| p - base).collect();
        let mut rd = BufReader::with_capacity(1 << 20, File::open(bp).map_err(|e| DataError::io(bp, e))?);
        let mut rec = [0u8; 12];
        for _ in 0..len {
            rd.read_exact(&mut rec).map_err(|e| DataError::io(bp, e))?;
            let r = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize - first_row;
            let at = fill[r] as usize * 8;
            placed[at..at + 8].copy_from_slice(&rec[4..12]);
            fill[r] += 1;
        }
        out.write_all(&placed).map_err(|e| DataError::io(&out_path, e))?;
        drop(rd);
        std::fs::remove_file(bp).map_err(|e| DataError::io(bp, e))?;
    }
    let file = out.into_inner().map_err(|e| DataError::io(&out_path, e.into_error()))?;
    Ok(SpilledCsr { file, path: out_path, indptr, n_cols })
}

impl RowSource for SpilledCsr {
    fn n_rows(&self) -> usize {
        self.indptr.len() - 1
    }
    fn n_cols(&self) -> usize {
        self.n_cols
    }
    fn read_rows(&mut self, rows: Range<usize>) -> Result<CsrRows> {
        let (lo, hi) = (self.indptr[rows.start], self.indptr[rows.end]);
        let mut buf = vec![0u8; ((hi - lo) * 8) as usize];
        self.file.read_exact_at(&mut buf, lo * 8).map_err(|e| DataError::io(&self.path, e))?;
        let mut out = CsrRows::with_capacity(rows.len(), (hi - lo) as usize);
        for rec in buf.chunks_exact(8) {
            out.indices.push(u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]));
            out.values.push(f32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]));
        }
        out.indptr = self.indptr[rows.start..=rows.end].iter().map(|&p| p - lo).collect();
        Ok(out)
    }
}

impl Drop for SpilledCsr {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
