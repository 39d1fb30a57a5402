//! Parallel reads of 1-D chunked HDF5 datasets, bypassing libhdf5's filter pipeline.
//!
//! libhdf5 serializes every call behind one lock, so gzip inflate — most of the time spent
//! reading an atlas — runs on one core. For the common pipelines (none, deflate, shuffle +
//! deflate; little-endian numbers) we look up each chunk's file address once, `pread` its
//! compressed bytes and inflate chunks in parallel with libdeflate. Anything else (lzf,
//! checksums, big-endian) returns `None` and the caller reads through libhdf5.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use hdf5::filters::Filter;
use hdf5::types::{FloatSize, IntSize, TypeDescriptor};
use hdf5::Dataset;
use rayon::prelude::*;

use crate::error::{DataError, Result};

/// Element types we decode, all little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    F32,
    F64,
}

impl Elem {
    fn of(ds: &Dataset) -> Option<Elem> {
        let dtype = ds.dtype().ok()?;
        if dtype.byte_order() != hdf5::datatype::ByteOrder::LittleEndian && dtype.size() > 1 {
            return None;
        }
        Some(match dtype.to_descriptor().ok()? {
            TypeDescriptor::Integer(IntSize::U1) => Elem::I8,
            TypeDescriptor::Integer(IntSize::U2) => Elem::I16,
            TypeDescriptor::Integer(IntSize::U4) => Elem::I32,
            TypeDescriptor::Integer(IntSize::U8) => Elem::I64,
            TypeDescriptor::Unsigned(IntSize::U1) => Elem::U8,
            TypeDescriptor::Unsigned(IntSize::U2) => Elem::U16,
            TypeDescriptor::Unsigned(IntSize::U4) => Elem::U32,
            TypeDescriptor::Unsigned(IntSize::U8) => Elem::U64,
            TypeDescriptor::Float(FloatSize::U4) => Elem::F32,
            TypeDescriptor::Float(FloatSize::U8) => Elem::F64,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Elem::I8 | Elem::U8 => 1,
            Elem::I16 | Elem::U16 => 2,
            Elem::I32 | Elem::U32 | Elem::F32 => 4,
            Elem::I64 | Elem::U64 | Elem::F64 => 8,
        }
    }

    /// Element `i` of little-endian `raw` as f64 (exact for every integer a count can be).
    fn get(self, raw: &[u8], i: usize) -> f64 {
        let s = self.size();
        let b = &raw[i * s..(i + 1) * s];
        let mut w = [0u8; 8];
        w[..s].copy_from_slice(b);
        match self {
            Elem::I8 => b[0] as i8 as f64,
            Elem::I16 => i16::from_le_bytes([w[0], w[1]]) as f64,
            Elem::I32 => i32::from_le_bytes([w[0], w[1], w[2], w[3]]) as f64,
            Elem::I64 => i64::from_le_bytes(w) as f64,
            Elem::U8 => b[0] as f64,
            Elem::U16 => u16::from_le_bytes([w[0], w[1]]) as f64,
            Elem::U32 => u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as f64,
            Elem::U64 => u64::from_le_bytes(w) as f64,
            Elem::F32 => f32::from_le_bytes([w[0], w[1], w[2], w[3]]) as f64,
            Elem::F64 => f64::from_le_bytes(w),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct ChunkLoc {
    addr: u64,
    size: u64,
    filter_mask: u32,
}

/// A 1-D dataset whose chunks we read and decode ourselves.
pub struct DirectChunks {
    file: File,
    path: PathBuf,
    field: String,
    len: usize,
    chunk_len: usize,
    elem: Elem,
    /// Filters in pipeline order: shuffle (bit 0 if present), deflate.
    shuffle: Option<u32>,
    deflate: Option<u32>,
    chunks: Vec<Option<ChunkLoc>>,
}

/// Elements `range` of `raw`, through `f`; typed loops for the common dtypes.
fn decode<T>(raw: &[u8], elem: Elem, range: Range<usize>, f: &impl Fn(f64) -> T) -> Vec<T> {
    let s = elem.size();
    let bytes = &raw[range.start * s..range.end * s];
    match elem {
        Elem::F32 => bytes.chunks_exact(4).map(|c| f(f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)).collect(),
        Elem::I32 => bytes.chunks_exact(4).map(|c| f(i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)).collect(),
        Elem::I64 => bytes.chunks_exact(8).map(|c| f(i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64)).collect(),
        Elem::F64 => bytes.chunks_exact(8).map(|c| f(f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))).collect(),
        other => range.map(|i| f(other.get(raw, i))).collect(),
    }
}

impl DirectChunks {
    /// `None` when the dataset's layout or filters need libhdf5.
    pub fn open(ds: &Dataset, path: &Path, field: &str) -> Option<Self> {
        if ds.ndim() != 1 || !ds.is_chunked() {
            return None;
        }
        let elem = Elem::of(ds)?;
        let chunk_len = *ds.chunk()?.first()?;
        let (mut shuffle, mut deflate) = (None, None);
        for (bit, f) in ds.filters().iter().enumerate() {
            match f {
                Filter::Shuffle if deflate.is_none() => shuffle = Some(bit as u32),
                Filter::Deflate(_) => deflate = Some(bit as u32),
                _ => return None,
            }
        }
        let n_chunks = ds.num_chunks()?;
        let mut chunks = vec![None; ds.size().div_ceil(chunk_len.max(1))];
        for i in 0..n_chunks {
            let info = ds.chunk_info(i)?;
            let k = *info.offset.first()? as usize / chunk_len;
            *chunks.get_mut(k)? = Some(ChunkLoc { addr: info.addr, size: info.size, filter_mask: info.filter_mask });
        }
        let file = File::open(path).ok()?;
        Some(DirectChunks { file, path: path.to_path_buf(), field: field.to_string(), len: ds.size(), chunk_len, elem, shuffle, deflate, chunks })
    }

    /// Decoded bytes of chunk `k` (zeros for a chunk never written: HDF5's default fill).
    fn chunk_bytes(&self, k: usize) -> Result<Vec<u8>> {
        let size = self.chunk_len * self.elem.size();
        let Some(loc) = self.chunks[k] else { return Ok(vec![0; size]) };
        let mut raw = vec![0u8; loc.size as usize];
        self.file.read_exact_at(&mut raw, loc.addr).map_err(|e| DataError::io(&self.path, e))?;
        let applied = |bit: Option<u32>| bit.is_some_and(|b| loc.filter_mask & (1 << b) == 0);
        if applied(self.deflate) {
            let mut out = vec![0u8; size];
            let n = libdeflater::Decompressor::new().zlib_decompress(&raw, &mut out).map_err(|e| {
                DataError::field(&self.path, &self.field, format!("chunk {k} does not inflate ({e:?}); the file is corrupt"))
            })?;
            out.truncate(n);
            raw = out;
        }
        if raw.len() != size {
            return Err(DataError::field(&self.path, &self.field, format!("chunk {k} has {} bytes, expected {size}", raw.len())));
        }
        if applied(self.shuffle) {
            let s = self.elem.size();
            let mut out = vec![0u8; size];
            for (i, plane) in raw.chunks_exact(self.chunk_len).enumerate() {
                for (j, &byte) in plane.iter().enumerate() {
                    out[j * s + i] = byte;
                }
            }
            raw = out;
        }
        Ok(raw)
    }

    /// Elements `range`, converted by `f`, decoding the chunks in parallel.
    fn read<T: Send>(&self, range: Range<usize>, f: impl Fn(f64) -> T + Sync) -> Result<Vec<T>> {
        if range.end > self.len {
            return Err(DataError::field(&self.path, &self.field, format!("read past the end ({} > {})", range.end, self.len)));
        }
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let (first, last) = (range.start / self.chunk_len, (range.end - 1) / self.chunk_len);
        let parts: Vec<Result<Vec<T>>> = (first..=last)
            .into_par_iter()
            .map(|k| {
                let raw = self.chunk_bytes(k)?;
                let base = k * self.chunk_len;
                let (a, b) = (range.start.max(base) - base, range.end.min(base + self.chunk_len) - base);
                Ok(decode(&raw, self.elem, a..b, &f))
            })
            .collect();
        let mut out = Vec::with_capacity(range.len());
        for p in parts {
            out.extend(p?);
        }
        Ok(out)
    }

    pub fn read_f32(&self, range: Range<usize>) -> Result<Vec<f32>> {
        self.read(range, |x| x as f32)
    }

    pub fn read_i64(&self, range: Range<usize>) -> Result<Vec<i64>> {
        self.read(range, |x| x as i64)
    }
}
