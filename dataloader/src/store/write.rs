//! Writing AnnData's on-disk layout in Zarr v3, the way `anndata` ≥ 0.11 writes it, so
//! `anndata.read_zarr` opens our stores without conversion.
//!
//! Spec: <https://anndata.readthedocs.io/en/stable/fileformat-prose.html>.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use zarrs::array::{data_type, Array, ArrayBuilder, DataType, Element, FillValueMetadata};
use zarrs::filesystem::FilesystemStore;
use zarrs::group::GroupBuilder;

use crate::error::{DataError, Result};
use crate::frame::{Column, Frame};

/// Elements per inner chunk of `X/data` and `X/indices` (4 MB of f32): one decode per read.
pub const INNER_CHUNK: u64 = 1 << 20;
/// Inner chunks per shard file, so a 30 GB atlas is thousands of files, not millions.
pub const CHUNKS_PER_SHARD: u64 = 16;
/// Chunk length for per-cell / per-gene arrays.
const TABLE_CHUNK: u64 = 1 << 20;

/// zarrs addresses nodes by absolute path (`/X/data`); we name them relative (`X/data`).
fn node(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    }
}

fn attrs(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Compression of the expression matrix (`X/data`, `X/indices`): the reader's hot path.
/// All are standard Zarr v3 codecs that zarr-python reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MatrixCodec {
    /// zstd on the raw bytes.
    Zstd,
    /// Blosc byte-shuffle + LZ4: fastest to decode.
    BloscLz4,
    /// Blosc byte-shuffle + zstd: smaller, still fast to decode.
    BloscZstd,
}

impl MatrixCodec {
    fn codec(self, zstd_level: i32) -> Result<Arc<dyn zarrs::array::BytesToBytesCodecTraits>> {
        use zarrs::array::codec::bytes_to_bytes::blosc::{BloscCodec, BloscCompressionLevel, BloscCompressor, BloscShuffleMode};
        let blosc = |cname, level: u8| -> Result<Arc<dyn zarrs::array::BytesToBytesCodecTraits>> {
            let level = BloscCompressionLevel::try_from(level).map_err(|e| DataError::Internal(format!("blosc level: {e:?}")))?;
            let c = BloscCodec::new(cname, level, None, BloscShuffleMode::Shuffle, Some(4)).map_err(|e| DataError::Internal(e.to_string()))?;
            Ok(Arc::new(c))
        };
        match self {
            MatrixCodec::Zstd => Ok(Arc::new(zarrs::array::codec::ZstdCodec::new(zstd_level, false))),
            MatrixCodec::BloscLz4 => blosc(BloscCompressor::LZ4, 5),
            MatrixCodec::BloscZstd => blosc(BloscCompressor::Zstd, zstd_level.clamp(0, 9) as u8),
        }
    }
}

/// Writes one AnnData store under a directory.
pub struct StoreWriter {
    root: PathBuf,
    storage: Arc<FilesystemStore>,
    zstd_level: i32,
    matrix_codec: MatrixCodec,
    /// Entries per inner chunk of the matrix (the reader's decode unit).
    chunk_entries: u64,
}

impl StoreWriter {
    /// Creates the directory and the root group (`encoding-type: anndata`).
    pub fn create(root: &Path, zstd_level: i32, matrix_codec: MatrixCodec) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|e| DataError::io(root, e))?;
        let storage = Arc::new(FilesystemStore::new(root).map_err(|e| DataError::zarr(root, "/", e))?);
        let w = StoreWriter { root: root.to_path_buf(), storage, zstd_level, matrix_codec, chunk_entries: INNER_CHUNK };
        w.group("/", json!({"encoding-type": "anndata", "encoding-version": "0.1.0"}))?;
        Ok(w)
    }

    /// Sets the matrix's inner chunk length (default `INNER_CHUNK`).
    pub fn with_chunk_entries(mut self, n: u64) -> Self {
        self.chunk_entries = n;
        self
    }

    /// Writes a group with the given attributes.
    pub fn group(&self, path: &str, attributes: Value) -> Result<()> {
        GroupBuilder::new()
            .attributes(attrs(attributes))
            .build(self.storage.clone(), &node(path))
            .and_then(|g| g.store_metadata().map_err(Into::into))
            .map_err(|e| DataError::zarr(&self.root, path, e))
    }

    /// An AnnData `dict` group (used for `uns`, `layers`, `obsm`, ...).
    pub fn dict(&self, path: &str) -> Result<()> {
        self.group(path, json!({"encoding-type": "dict", "encoding-version": "0.1.0"}))
    }

    fn builder(&self, len: u64, chunk: u64, dt: DataType, fill: impl Into<zarrs::array::builder::ArrayBuilderFillValue>) -> ArrayBuilder {
        let mut b = ArrayBuilder::new(vec![len], vec![chunk.max(1)], dt, fill);
        b.bytes_to_bytes_codecs(vec![Arc::new(zarrs::array::codec::ZstdCodec::new(self.zstd_level, false))]);
        b
    }

    /// Creates the array `b` describes at `path` with AnnData `attributes`, metadata written.
    fn new_array(&self, mut b: ArrayBuilder, path: &str, attributes: Value) -> Result<Array<FilesystemStore>> {
        b.attributes(attrs(attributes));
        let err = |e: &dyn std::fmt::Display| DataError::zarr(&self.root, path, e);
        let array = b.build(self.storage.clone(), &node(path)).map_err(|e| err(&e))?;
        array.store_metadata().map_err(|e| err(&e))?;
        Ok(array)
    }

    /// A 1-D numeric, bool or string array (`encoding-type: array` / `string-array`).
    pub fn array<T: Element + ArrayDtype + Clone>(&self, path: &str, values: &[T]) -> Result<()> {
        let mut column = self.column(path, values.len() as u64)?;
        column.extend(values)?;
        column.finish()
    }

    /// A 1-D array of `len` values written a chunk at a time as they are pushed, so per-cell
    /// tables of an atlas are never held whole (nor encoded whole: strings are vlen-utf8, as
    /// anndata writes them).
    pub fn column<T: Element + ArrayDtype>(&self, path: &str, len: u64) -> Result<ColumnWriter<T>> {
        let chunk = TABLE_CHUNK.min(len).max(1);
        let b = self.builder(len, chunk, T::data_type(), T::fill());
        let array = self.new_array(b, path, json!({"encoding-type": T::ENCODING, "encoding-version": "0.2.0"}))?;
        Ok(ColumnWriter { array, root: self.root.clone(), path: path.to_string(), buf: Vec::with_capacity(chunk as usize), chunk, written: 0, len })
    }

    /// A string scalar (`encoding-type: string`), e.g. provenance JSON in `uns`.
    pub fn string_scalar(&self, path: &str, value: &str) -> Result<()> {
        let b = ArrayBuilder::new(Vec::<u64>::new(), Vec::<u64>::new(), data_type::string(), "");
        let array = self.new_array(b, path, json!({"encoding-type": "string", "encoding-version": "0.2.0"}))?;
        array.store_chunk(&[], &[value.to_string()][..]).map_err(|e| DataError::zarr(&self.root, path, e))
    }

    /// A dataframe group with its index and columns (`encoding-type: dataframe`).
    pub fn frame(&self, path: &str, frame: &Frame) -> Result<()> {
        let mut w = self.frame_writer(path, frame, frame.len() as u64)?;
        w.push(frame)?;
        w.finish()
    }

    /// Starts a dataframe group of `len` rows with the columns of `schema` (its names, kinds
    /// and categories; its rows are not written), to be filled a slice of rows at a time.
    pub fn frame_writer(&self, path: &str, schema: &Frame, len: u64) -> Result<FrameWriter> {
        let index_key = if schema.column(&schema.index_name).is_some() || schema.index_name.is_empty() {
            "_index".to_string()
        } else {
            schema.index_name.clone()
        };
        let order: Vec<&str> = schema.column_names();
        self.group(
            path,
            json!({"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": index_key, "column-order": order}),
        )?;
        let index = self.column(&format!("{path}/{index_key}"), len)?;
        let mut columns = Vec::new();
        for (name, col) in &schema.columns {
            let p = format!("{path}/{name}");
            columns.push(match col {
                Column::Categorical { categories, ordered, .. } => {
                    self.group(&p, json!({"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": ordered}))?;
                    self.array(&format!("{p}/categories"), categories)?;
                    ColumnSink::Codes(self.column(&format!("{p}/codes"), len)?)
                }
                Column::Strings(_) => ColumnSink::Strings(self.column(&p, len)?),
                Column::Float(_) => ColumnSink::Float(self.column(&p, len)?),
                Column::Int(_) => ColumnSink::Int(self.column(&p, len)?),
                Column::Bool(_) => ColumnSink::Bool(self.column(&p, len)?),
            });
        }
        Ok(FrameWriter { path: path.to_string(), index, columns })
    }

    /// Starts a streamed CSR matrix group at `path` (e.g. `X`) of `n_cells` rows.
    pub fn csr(&self, path: &str, n_cells: usize) -> Result<CsrWriter> {
        let shard = self.chunk_entries * CHUNKS_PER_SHARD;
        let make = |name: &str, dt: DataType, fill: zarrs::array::builder::ArrayBuilderFillValue| -> Result<Array<FilesystemStore>> {
            let p = format!("{path}/{name}");
            let mut b = self.builder(u64::MAX / 2, shard, dt, fill);
            b.bytes_to_bytes_codecs(vec![self.matrix_codec.codec(self.zstd_level)?]);
            b.subchunk_shape(vec![self.chunk_entries]);
            b.build(self.storage.clone(), &node(&p)).map_err(|e| DataError::zarr(&self.root, &p, e))
        };
        let (data, indices) = (make("data", data_type::float32(), 0.0f32.into())?, make("indices", data_type::int32(), 0i32.into())?);
        // Shards are encoded and written on their own thread while the caller fills the next.
        let (jobs, job_rx) = std::sync::mpsc::sync_channel::<ShardJob>(1);
        let (spare_tx, spare) = std::sync::mpsc::channel();
        let (root, group) = (self.root.clone(), path.to_string());
        let worker = std::thread::spawn(move || -> Result<(Array<FilesystemStore>, Array<FilesystemStore>)> {
            let err = |name: &str, e: &dyn std::fmt::Display| DataError::zarr(&root, &format!("{group}/{name}"), e);
            for mut job in job_rx {
                data.store_chunk(&[job.index], &job.values).map_err(|e| err("data", &e))?;
                indices.store_chunk(&[job.index], &job.indices).map_err(|e| err("indices", &e))?;
                job.values.clear();
                job.indices.clear();
                let _ = spare_tx.send((job.values, job.indices));
            }
            Ok((data, indices))
        });
        Ok(CsrWriter {
            path: path.to_string(),
            values_buf: Vec::with_capacity(shard as usize),
            indices_buf: Vec::with_capacity(shard as usize),
            shard_len: shard,
            shards_written: 0,
            indptr: {
                let mut indptr = self.column(&format!("{path}/indptr"), n_cells as u64 + 1)?;
                indptr.push(0)?;
                indptr
            },
            nnz: 0,
            jobs: Some(jobs),
            spare,
            worker: Some(worker),
        })
    }

    /// Finishes a CSR matrix: `indptr`, final array shapes and the group's `shape` attribute.
    pub fn finish_csr(&self, mut w: CsrWriter, n_genes: usize) -> Result<u64> {
        w.flush_shard(true)?;
        let (mut data, mut indices) = w.join()?;
        let (nnz, n_cells) = (w.nnz as u64, w.n_cells());
        w.indptr.finish()?;
        for (name, a) in [("data", &mut data), ("indices", &mut indices)] {
            let p = format!("{}/{name}", w.path);
            a.set_shape(vec![nnz]).map_err(|e| DataError::zarr(&self.root, &p, e))?;
            let mut m = Map::new();
            m.insert("encoding-type".into(), json!("array"));
            m.insert("encoding-version".into(), json!("0.2.0"));
            *a.attributes_mut() = m;
            a.store_metadata().map_err(|e| DataError::zarr(&self.root, &p, e))?;
        }
        self.group(
            &w.path,
            json!({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, n_genes]}),
        )?;
        Ok(nnz)
    }
}

/// One full shard on its way to the writer thread.
struct ShardJob {
    index: u64,
    values: Vec<f32>,
    indices: Vec<i32>,
}

type ArrayPair = (Array<FilesystemStore>, Array<FilesystemStore>);

/// Appends cells to a CSR matrix; full shards go to a writer thread, whose emptied buffers come
/// back for reuse (two buffer pairs in all).
pub struct CsrWriter {
    path: String,
    values_buf: Vec<f32>,
    indices_buf: Vec<i32>,
    shard_len: u64,
    shards_written: u64,
    /// Row offsets, streamed; `nnz` is the last one.
    indptr: ColumnWriter<i64>,
    nnz: i64,
    jobs: Option<std::sync::mpsc::SyncSender<ShardJob>>,
    spare: std::sync::mpsc::Receiver<(Vec<f32>, Vec<i32>)>,
    worker: Option<std::thread::JoinHandle<Result<ArrayPair>>>,
}

impl CsrWriter {
    /// Appends one cell (genes ascending).
    pub fn push_row(&mut self, indices: &[u32], values: &[f32]) -> Result<()> {
        let mut taken = 0;
        while taken < indices.len() {
            let n = (self.shard_len as usize - self.values_buf.len()).min(indices.len() - taken);
            self.values_buf.extend_from_slice(&values[taken..taken + n]);
            self.indices_buf.extend(indices[taken..taken + n].iter().map(|&g| g as i32));
            taken += n;
            if self.values_buf.len() == self.shard_len as usize {
                self.flush_shard(false)?;
            }
        }
        self.nnz += indices.len() as i64;
        self.indptr.push(self.nnz)
    }

    /// Cells written so far.
    pub fn n_cells(&self) -> usize {
        self.indptr.written as usize - 1
    }

    fn flush_shard(&mut self, last: bool) -> Result<()> {
        if self.values_buf.is_empty() {
            return Ok(());
        }
        if last {
            // The final shard is padded with fill values; they lie beyond the array's shape.
            self.values_buf.resize(self.shard_len as usize, 0.0);
            self.indices_buf.resize(self.shard_len as usize, 0);
        }
        // Two buffer pairs in all: one filling while the other is written. Waiting here, not
        // allocating a third, is what bounds conversion memory when the disk or the encoder
        // is slower than the reader.
        let (values, indices) = match self.spare.try_recv() {
            Ok(pair) => pair,
            Err(_) if self.shards_written == 0 => (Vec::with_capacity(self.shard_len as usize), Vec::with_capacity(self.shard_len as usize)),
            Err(_) => match self.spare.recv() {
                Ok(pair) => pair,
                Err(_) => {
                    self.join()?;
                    return Err(DataError::Internal(format!("{}: shard writer stopped", self.path)));
                }
            },
        };
        let job = ShardJob {
            index: self.shards_written,
            values: std::mem::replace(&mut self.values_buf, values),
            indices: std::mem::replace(&mut self.indices_buf, indices),
        };
        self.shards_written += 1;
        let sent = self.jobs.as_ref().map(|tx| tx.send(job).is_ok()).unwrap_or(false);
        if !sent {
            // The writer thread stopped: its error says why.
            self.join()?;
            return Err(DataError::Internal(format!("{}: shard writer stopped", self.path)));
        }
        Ok(())
    }

    /// Waits for every queued shard to be written; returns the arrays.
    fn join(&mut self) -> Result<ArrayPair> {
        self.jobs = None;
        match self.worker.take().map(|h| h.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(DataError::Internal(format!("{}: shard writer panicked", self.path))),
            None => Err(DataError::Internal(format!("{}: shard writer already finished", self.path))),
        }
    }
}

/// A dataframe group being filled a slice of rows at a time (`StoreWriter::frame_writer`):
/// conversion writes obs so, in stored order, never holding every cell's row.
pub struct FrameWriter {
    path: String,
    index: ColumnWriter<String>,
    columns: Vec<ColumnSink>,
}

/// One column's array; a categorical's categories were written when the frame was started.
enum ColumnSink {
    Codes(ColumnWriter<i32>),
    Strings(ColumnWriter<String>),
    Float(ColumnWriter<f64>),
    Int(ColumnWriter<i64>),
    Bool(ColumnWriter<bool>),
}

impl FrameWriter {
    /// Appends `rows`, a frame with the schema's columns in its order and kinds.
    pub fn push(&mut self, rows: &Frame) -> Result<()> {
        if rows.columns.len() != self.columns.len() {
            return Err(DataError::Internal(format!("{}: {} columns pushed into a frame of {}", self.path, rows.columns.len(), self.columns.len())));
        }
        self.index.extend(&rows.index)?;
        for (sink, (name, col)) in self.columns.iter_mut().zip(&rows.columns) {
            match (sink, col) {
                (ColumnSink::Codes(w), Column::Categorical { codes, .. }) => w.extend(codes)?,
                (ColumnSink::Strings(w), Column::Strings(v)) => w.extend(v)?,
                (ColumnSink::Float(w), Column::Float(v)) => w.extend(v)?,
                (ColumnSink::Int(w), Column::Int(v)) => w.extend(v)?,
                (ColumnSink::Bool(w), Column::Bool(v)) => w.extend(v)?,
                (_, col) => return Err(DataError::Internal(format!("{}/{name}: a {} slice does not match the column", self.path, col.type_name()))),
            }
        }
        Ok(())
    }

    /// Writes the last partial chunks; refuses a frame shorter than declared.
    pub fn finish(self) -> Result<()> {
        self.index.finish()?;
        self.columns.into_iter().try_for_each(|c| match c {
            ColumnSink::Codes(w) => w.finish(),
            ColumnSink::Strings(w) => w.finish(),
            ColumnSink::Float(w) => w.finish(),
            ColumnSink::Int(w) => w.finish(),
            ColumnSink::Bool(w) => w.finish(),
        })
    }
}

/// A 1-D array of known length being filled in order (`StoreWriter::column`).
pub struct ColumnWriter<T> {
    array: Array<FilesystemStore>,
    root: PathBuf,
    path: String,
    buf: Vec<T>,
    chunk: u64,
    written: u64,
    len: u64,
}

impl<T: Element> ColumnWriter<T> {
    /// Appends one value; a full chunk is written at once.
    pub fn push(&mut self, v: T) -> Result<()> {
        if self.written == self.len {
            return Err(DataError::Internal(format!("{}: more than the {} values declared", self.path, self.len)));
        }
        self.buf.push(v);
        self.written += 1;
        if self.buf.len() as u64 == self.chunk {
            self.flush()?;
        }
        Ok(())
    }

    /// Appends values in order.
    pub fn extend(&mut self, values: &[T]) -> Result<()>
    where
        T: Clone,
    {
        values.iter().try_for_each(|v| self.push(v.clone()))
    }

    fn flush(&mut self) -> Result<()> {
        let start = self.written - self.buf.len() as u64;
        if !self.buf.is_empty() {
            self.array
                .store_array_subset(&[start..self.written], &self.buf[..])
                .map_err(|e| DataError::zarr(&self.root, &self.path, e))?;
        }
        self.buf.clear();
        Ok(())
    }

    /// Writes the last partial chunk; refuses a column shorter than declared.
    pub fn finish(mut self) -> Result<()> {
        if self.written != self.len {
            return Err(DataError::Internal(format!("{}: {} of {} values written", self.path, self.written, self.len)));
        }
        self.flush()
    }
}

/// Maps Rust element types to Zarr data types and AnnData-style fill values.
pub trait ArrayDtype {
    /// AnnData's `encoding-type` of a 1-D array of this type.
    const ENCODING: &'static str = "array";
    fn data_type() -> DataType;
    fn fill() -> zarrs::array::builder::ArrayBuilderFillValue;
}

macro_rules! dtype {
    ($t:ty, $f:ident, $fill:expr) => {
        impl ArrayDtype for $t {
            fn data_type() -> DataType {
                data_type::$f()
            }
            fn fill() -> zarrs::array::builder::ArrayBuilderFillValue {
                $fill.into()
            }
        }
    };
}
dtype!(f32, float32, 0.0f32);
dtype!(f64, float64, 0.0f64);
dtype!(i32, int32, 0i32);
dtype!(i64, int64, 0i64);
dtype!(bool, bool, FillValueMetadata::Bool(false));

impl ArrayDtype for String {
    const ENCODING: &'static str = "string-array";
    fn data_type() -> DataType {
        data_type::string()
    }
    fn fill() -> zarrs::array::builder::ArrayBuilderFillValue {
        "".into()
    }
}
