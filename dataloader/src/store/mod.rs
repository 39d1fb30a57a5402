//! The neurofm store: an AnnData Zarr v3 directory with raw counts in `X` (CSR) and
//! `uns/neurofm` written last. `Store::open` refuses a store without it, so an opened store is
//! always complete.

mod indptr;
pub mod write;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use zarrs::array::{Array, ArrayError, ElementOwned};
use zarrs::filesystem::FilesystemStore;

use crate::csr::CsrRows;
use crate::error::{DataError, Result};
use crate::frame::{Column, Frame};
use indptr::Indptr;

/// Version of the store layout this crate writes; readers refuse newer ones.
pub const STORE_FORMAT_VERSION: u32 = 1;

/// What a store records about how it was made (`uns/neurofm/provenance`, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub format_version: u32,
    pub created_by: String,
    pub source_path: String,
    pub source_sha256: String,
    pub source_format: String,
    pub counts_source: String,
    pub source_layout: String,
    pub keep: Vec<String>,
    pub cell_metadata: Option<String>,
    pub gene_selection: String,
    pub shuffle_seed: Option<u64>,
    pub allow_non_integer: bool,
    pub non_integer_values: u64,
    pub n_cells: usize,
    pub n_genes: usize,
    pub nnz: u64,
    pub renamed_duplicate_cells: usize,
    pub renamed_duplicate_genes: usize,
}

/// Per-gene and per-cell statistics recorded at conversion (over the stored genes).
#[derive(Debug, Clone, PartialEq)]
pub struct StoreStats {
    pub gene_nnz: Vec<i64>,
    pub gene_sum: Vec<f64>,
    pub gene_sum_sq: Vec<f64>,
    pub cell_total: Vec<f64>,
    pub cell_nnz: Vec<i64>,
    /// Row of each stored cell in the source file (the recorded permutation and selection).
    pub cell_source_row: Vec<i64>,
}

/// An opened, complete store.
pub struct Store {
    pub path: PathBuf,
    storage: Arc<FilesystemStore>,
    /// Row offsets, paged in as reads need them.
    indptr: Indptr,
    data: Array<FilesystemStore>,
    indices: Array<FilesystemStore>,
    n_genes: usize,
    /// Entries per inner chunk of `X/data`: the unit one read decodes.
    chunk_entries: u64,
    pub provenance: Provenance,
}

impl Store {
    /// Opens a store, refusing incomplete or foreign ones.
    pub fn open(path: &Path) -> Result<Store> {
        if !path.exists() {
            return Err(DataError::NotFound { path: path.to_path_buf() });
        }
        if !path.join("zarr.json").exists() {
            return Err(DataError::input(path, "not a Zarr v3 store (no zarr.json); convert the source with `neurofm-data convert`"));
        }
        if !path.join("uns/neurofm/provenance/zarr.json").exists() {
            return Err(DataError::IncompleteStore { path: path.to_path_buf() });
        }
        let storage = Arc::new(FilesystemStore::new(path).map_err(|e| DataError::zarr(path, "/", e))?);
        let json = string_scalar(&storage, path, "uns/neurofm/provenance")?;
        let provenance: Provenance = serde_json::from_str(&json)
            .map_err(|e| DataError::field(path, "uns/neurofm/provenance", format!("unreadable: {e}")))?;
        if provenance.format_version > STORE_FORMAT_VERSION {
            return Err(DataError::field(
                path,
                "uns/neurofm/provenance",
                format!("store format {} is newer than this neurofm ({STORE_FORMAT_VERSION}); upgrade neurofm", provenance.format_version),
            ));
        }
        let shape = attributes_of(path, "X")?.get("shape").cloned().unwrap_or(Value::Null);
        let shape: Vec<usize> = serde_json::from_value(shape).map_err(|_| DataError::field(path, "X.attrs['shape']", "missing"))?;
        let chunk_entries = inner_chunk_entries(path, "X/data")?;
        let indptr_array = Array::open(storage.clone(), "/X/indptr").map_err(|e| DataError::zarr(path, "X/indptr", e))?;
        let indptr = Indptr::open(indptr_array, dtype_of(path, "X/indptr")?, path, chunk_entries)?;
        if indptr.n_cells() != shape.first().copied().unwrap_or(0) {
            return Err(DataError::field(path, "X/indptr", "length disagrees with X's shape"));
        }
        Ok(Store {
            path: path.to_path_buf(),
            storage: storage.clone(),
            indptr,
            data: Array::open(storage.clone(), "/X/data").map_err(|e| DataError::zarr(path, "X/data", e))?,
            indices: Array::open(storage.clone(), "/X/indices").map_err(|e| DataError::zarr(path, "X/indices", e))?,
            n_genes: shape.get(1).copied().unwrap_or(0),
            chunk_entries,
            provenance,
        })
    }

    pub fn n_cells(&self) -> usize {
        self.indptr.n_cells()
    }

    pub fn n_genes(&self) -> usize {
        self.n_genes
    }

    pub fn nnz(&self) -> u64 {
        self.indptr.nnz()
    }

    /// Index of the inner chunk of `X/data` holding the cell's first entry: cells with the same
    /// index are read with one decode, so the shard reader shuffles them as one block.
    pub fn chunk_of(&self, cell: u32) -> u64 {
        self.indptr.chunk_of(cell)
    }

    /// Entries per decoded chunk of the matrix.
    pub fn chunk_entries(&self) -> u64 {
        self.chunk_entries
    }

    /// Reads a contiguous range of cells.
    pub fn read_rows(&self, rows: Range<usize>) -> Result<CsrRows> {
        let offsets = self.indptr.range(rows.start..rows.end + 1)?;
        let (lo, hi) = (offsets[0], offsets[offsets.len() - 1]);
        let mut out = CsrRows::new();
        out.indptr = offsets.iter().map(|&p| p - lo).collect();
        if hi > lo {
            out.values = self.data.retrieve_array_subset::<Vec<f32>>(&[lo..hi]).map_err(|e| DataError::zarr(&self.path, "X/data", e))?;
            let idx = self.indices.retrieve_array_subset::<Vec<i32>>(&[lo..hi]).map_err(|e| DataError::zarr(&self.path, "X/indices", e))?;
            out.indices = idx.into_iter().map(|g| g as u32).collect();
        }
        Ok(out)
    }

    /// Cells overlapping the chunks that hold entries `lo..hi`: what decoding them yields (a
    /// cell straddling two chunks counts in both).
    fn cells_decoded(&self, lo: u64, hi: u64) -> Result<u64> {
        if hi <= lo {
            return Ok(0);
        }
        let c = self.chunk_entries;
        let (start, end) = (lo / c * c, (hi - 1) / c * c + c);
        // Cells whose entries intersect [start, end): first cell ending after start, first starting at or after end.
        let first = self.indptr.partition_point(|p| p <= start)?.saturating_sub(1);
        let last = self.indptr.partition_point(|p| p < end)?.min(self.n_cells());
        Ok(last.saturating_sub(first) as u64)
    }

    /// Reads the given cells (sorted ascending), in that order. Cells sharing a chunk are read
    /// in one span, so every chunk is decoded once per call however sparse the sample.
    pub fn read_cells(&self, rows: &[usize]) -> Result<CsrRows> {
        Ok(self.read_cells_costed(rows)?.0)
    }

    /// `read_cells`, and the cells in the chunks it decoded (its cost, against `rows.len()`).
    pub fn read_cells_costed(&self, rows: &[usize]) -> Result<(CsrRows, u64)> {
        let spans = self.chunk_spans(rows)?;
        let mut out = CsrRows::with_capacity(rows.len(), spans.iter().map(|s| s.entries).sum::<u64>() as usize);
        let mut decoded = 0;
        for span in spans {
            decoded += self.cells_decoded(span.lo, span.hi)?;
            let span = span.rows;
            let (first, last) = (rows[span.start], rows[span.end - 1]);
            let block = self.read_rows(first..last + 1)?;
            for &r in &rows[span] {
                out.push_row_from(&block, r - first);
            }
        }
        Ok((out, decoded))
    }

    /// The cells in the chunks `read_cells(rows)` decodes, without reading (for read plans).
    pub fn read_cost(&self, rows: &[usize]) -> Result<u64> {
        self.chunk_spans(rows)?.iter().map(|s| self.cells_decoded(s.lo, s.hi)).sum()
    }

    /// Groups sorted `rows` into spans in which each cell starts in a chunk the span already
    /// needs, so reading a span's whole row range decodes only chunks some wanted cell needs.
    /// A span stops at `MAX_SPAN_CHUNKS` chunks to bound memory (its last chunk may then be
    /// decoded again by the next span); a training read block (`corpus::CHUNKS_PER_BLOCK`
    /// chunks and the one its last cell runs into) fits in one span.
    fn chunk_spans(&self, rows: &[usize]) -> Result<Vec<Span>> {
        const MAX_SPAN_CHUNKS: u64 = 24;
        let c = self.chunk_entries;
        let mut spans: Vec<Span> = Vec::new();
        let (mut span_first, mut span_last) = (0u64, 0u64);
        for (i, &r) in rows.iter().enumerate() {
            if r >= self.n_cells() {
                return Err(DataError::Internal(format!("row {r} of a store with {} cells", self.n_cells())));
            }
            let (lo, hi) = (self.indptr.get(r)?, self.indptr.get(r + 1)?);
            let (first, last) = (lo / c, hi.saturating_sub(1).max(lo) / c);
            match spans.last_mut() {
                Some(s) if first <= span_last && last < span_first + MAX_SPAN_CHUNKS => {
                    s.rows.end = i + 1;
                    s.hi = hi;
                    s.entries += hi - lo;
                    span_last = span_last.max(last);
                }
                _ => {
                    spans.push(Span { rows: i..i + 1, lo, hi, entries: hi - lo });
                    (span_first, span_last) = (first, last);
                }
            }
        }
        Ok(spans)
    }

    /// Cell names in store order.
    pub fn obs_names(&self) -> Result<Vec<String>> {
        self.index_of("obs")
    }

    /// Calls `f(row, name)` for every cell in store order, reading the names a chunk at a time
    /// (an atlas's names are never all in memory).
    pub fn for_each_obs_name(&self, mut f: impl FnMut(usize, &str)) -> Result<()> {
        const SLICE: u64 = 1 << 20;
        let p = self.index_path("obs")?;
        let array = Array::open(self.storage.clone(), &format!("/{p}")).map_err(|e| DataError::zarr(&self.path, &p, e))?;
        let len = array.shape().first().copied().unwrap_or(0);
        for start in (0..len).step_by(SLICE as usize) {
            let names = array.retrieve_array_subset::<Vec<String>>(&[start..(start + SLICE).min(len)]).map_err(|e| DataError::zarr(&self.path, &p, e))?;
            names.iter().enumerate().for_each(|(i, n)| f(start as usize + i, n));
        }
        Ok(())
    }

    /// Gene names in store order (the tokenizer's gene order).
    pub fn var_names(&self) -> Result<Vec<String>> {
        self.index_of("var")
    }

    fn index_of(&self, frame: &str) -> Result<Vec<String>> {
        self.read_vec::<String>(&self.index_path(frame)?)
    }

    /// Where a dataframe keeps its index (`_index` unless its attributes name another array).
    fn index_path(&self, frame: &str) -> Result<String> {
        let key = self.attributes(frame)?.get("_index").and_then(|v| v.as_str()).unwrap_or("_index").to_string();
        Ok(format!("{frame}/{key}"))
    }

    /// The whole `obs` (or `var`) dataframe.
    pub fn frame(&self, name: &str) -> Result<Frame> {
        let attrs = self.attributes(name)?;
        let index_name = attrs.get("_index").and_then(|v| v.as_str()).unwrap_or("_index").to_string();
        let order: Vec<String> = attrs.get("column-order").and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default();
        let mut columns = Vec::new();
        for c in order {
            columns.push((c.clone(), self.column(name, &c)?));
        }
        Ok(Frame { index: self.index_of(name)?, index_name, columns })
    }

    /// One column of `obs` or `var`; a clear error names the columns that exist.
    pub fn column(&self, frame: &str, name: &str) -> Result<Column> {
        self.column_slice(frame, name, 0..u64::MAX)
    }

    /// Rows `at` of a column (clipped to its length), for sweeping an atlas's column.
    pub fn column_slice(&self, frame: &str, name: &str, at: Range<u64>) -> Result<Column> {
        let p = format!("{frame}/{name}");
        if !self.path.join(&p).join("zarr.json").exists() {
            let attrs = self.attributes(frame)?;
            let have: Vec<String> = attrs.get("column-order").and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default();
            return Err(DataError::field(&self.path, &p, format!("no such column; {frame} has: {}", have.join(", "))));
        }
        let attrs = self.attributes(&p)?;
        if attrs.get("encoding-type").and_then(|v| v.as_str()) == Some("categorical") {
            let codes = self.read_slice::<i64>(&format!("{p}/codes"), at)?.into_iter().map(|c| c as i32).collect();
            let categories = self.read_vec::<String>(&format!("{p}/categories"))?;
            let ordered = attrs.get("ordered").and_then(|v| v.as_bool()).unwrap_or(false);
            return Ok(Column::Categorical { codes, categories: categories.into(), ordered });
        }
        Ok(match self.dtype(&p)?.as_str() {
            "string" => Column::Strings(self.read_slice(&p, at)?),
            "bool" => Column::Bool(self.read_slice(&p, at)?),
            "float32" | "float64" => Column::Float(self.read_slice(&p, at)?),
            _ => Column::Int(self.read_slice(&p, at)?),
        })
    }

    /// Conversion-time statistics from `uns/neurofm`.
    pub fn stats(&self) -> Result<StoreStats> {
        let u = |n: &str| format!("uns/neurofm/{n}");
        Ok(StoreStats {
            gene_nnz: self.read_vec(&u("gene_nnz"))?,
            gene_sum: self.read_vec(&u("gene_sum"))?,
            gene_sum_sq: self.read_vec(&u("gene_sum_sq"))?,
            cell_total: self.read_vec(&u("cell_total"))?,
            cell_nnz: self.read_vec(&u("cell_nnz"))?,
            cell_source_row: self.read_vec(&u("cell_source_row"))?,
        })
    }

    fn attributes(&self, p: &str) -> Result<serde_json::Map<String, Value>> {
        attributes_of(&self.path, p)
    }

    fn dtype(&self, p: &str) -> Result<String> {
        dtype_of(&self.path, p)
    }

    /// Elements `at` of a 1-D array, converting widths like `read_vec`.
    pub fn read_slice<T: StoredElement>(&self, p: &str, at: Range<u64>) -> Result<Vec<T>> {
        let array = Array::open(self.storage.clone(), &format!("/{p}")).map_err(|e| DataError::zarr(&self.path, p, e))?;
        let len = array.shape().first().copied().unwrap_or(0);
        T::read_any(&array, at.start.min(len)..at.end.min(len), &self.dtype(p)?).map_err(|e| DataError::zarr(&self.path, p, e))
    }

    /// A whole 1-D array, converting integer and float widths to `T` where needed.
    pub fn read_vec<T: StoredElement>(&self, p: &str) -> Result<Vec<T>> {
        self.read_slice(p, 0..u64::MAX)
    }
}

/// Sorted wanted rows `rows` (positions in the caller's list) read as one row range: entries
/// `lo..hi` of the matrix, `entries` of them wanted.
struct Span {
    rows: Range<usize>,
    lo: u64,
    hi: u64,
    entries: u64,
}

/// Array elements readable from whatever width the store holds (anndata writes int8 codes,
/// we read them as i64).
pub trait StoredElement: ElementOwned {
    /// Elements `at` of a 1-D array stored as `dtype`.
    fn read_any(a: &Array<FilesystemStore>, at: Range<u64>, dtype: &str) -> std::result::Result<Vec<Self>, ArrayError>;
}

fn widen<W: ElementOwned, T>(a: &Array<FilesystemStore>, at: Range<u64>, f: impl Fn(W) -> T) -> std::result::Result<Vec<T>, ArrayError> {
    Ok(a.retrieve_array_subset::<Vec<W>>(&[at])?.into_iter().map(f).collect())
}

macro_rules! numeric_element {
    ($t:ty) => {
        impl StoredElement for $t {
            fn read_any(a: &Array<FilesystemStore>, at: Range<u64>, dtype: &str) -> std::result::Result<Vec<Self>, ArrayError> {
                match dtype {
                    "int8" => widen(a, at.clone(), |x: i8| x as $t),
                    "int16" => widen(a, at.clone(), |x: i16| x as $t),
                    "int32" => widen(a, at.clone(), |x: i32| x as $t),
                    "int64" => widen(a, at.clone(), |x: i64| x as $t),
                    "uint8" => widen(a, at.clone(), |x: u8| x as $t),
                    "uint16" => widen(a, at.clone(), |x: u16| x as $t),
                    "uint32" => widen(a, at.clone(), |x: u32| x as $t),
                    "uint64" => widen(a, at.clone(), |x: u64| x as $t),
                    "float32" => widen(a, at.clone(), |x: f32| x as $t),
                    "float64" => widen(a, at.clone(), |x: f64| x as $t),
                    _ => a.retrieve_array_subset::<Vec<$t>>(&[at]),
                }
            }
        }
    };
}
numeric_element!(i64);
numeric_element!(i32);
numeric_element!(f64);
numeric_element!(f32);

impl StoredElement for String {
    fn read_any(a: &Array<FilesystemStore>, at: Range<u64>, _: &str) -> std::result::Result<Vec<Self>, ArrayError> {
        a.retrieve_array_subset::<Vec<String>>(&[at])
    }
}

impl StoredElement for bool {
    fn read_any(a: &Array<FilesystemStore>, at: Range<u64>, _: &str) -> std::result::Result<Vec<Self>, ArrayError> {
        a.retrieve_array_subset::<Vec<bool>>(&[at])
    }
}

/// A store node's `zarr.json`.
fn node_json(root: &Path, p: &str) -> Result<Value> {
    let file = root.join(p).join("zarr.json");
    let text = std::fs::read_to_string(&file).map_err(|_| DataError::field(root, p, "missing"))?;
    serde_json::from_str(&text).map_err(|e| DataError::field(root, p, format!("bad zarr.json: {e}")))
}

fn attributes_of(root: &Path, p: &str) -> Result<serde_json::Map<String, Value>> {
    Ok(node_json(root, p)?.get("attributes").and_then(|a| a.as_object()).cloned().unwrap_or_default())
}

fn dtype_of(root: &Path, p: &str) -> Result<String> {
    Ok(node_json(root, p)?.get("data_type").and_then(|d| d.as_str()).unwrap_or("").to_string())
}

/// Inner chunk length of a sharded 1-D array (its chunk length when unsharded).
fn inner_chunk_entries(root: &Path, p: &str) -> Result<u64> {
    let meta = node_json(root, p)?;
        let outer = meta.pointer("/chunk_grid/configuration/chunk_shape/0").and_then(Value::as_u64);
        let inner = meta
            .get("codecs")
            .and_then(Value::as_array)
            .and_then(|codecs| codecs.iter().find(|c| c.get("name").and_then(Value::as_str) == Some("sharding_indexed")))
            .and_then(|c| c.pointer("/configuration/chunk_shape/0"))
            .and_then(Value::as_u64);

    inner.or(outer).filter(|&n| n > 0).ok_or_else(|| DataError::field(root, p, "zarr.json has no chunk shape"))
}

/// Reads a zero-dimensional string array (AnnData's `string` encoding).
fn string_scalar(storage: &Arc<FilesystemStore>, root: &Path, p: &str) -> Result<String> {
    let array = Array::open(storage.clone(), &format!("/{p}")).map_err(|e| DataError::zarr(root, p, e))?;
    let v: Vec<String> = array.retrieve_chunk(&[]).map_err(|e| DataError::zarr(root, p, e))?;
    v.into_iter().next().ok_or_else(|| DataError::field(root, p, "empty"))
}
