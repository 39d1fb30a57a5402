//! `ObsReader`: a source's obs read a window of cells at a time, so that converting an atlas
//! never holds every cell's name and label (~50 bytes a cell).

use std::ops::Range;

use super::anndata::H5Frame;
use crate::error::Result;
use crate::frame::{Column, Frame};

/// AnnData ≥ 0.7 obs is read from the file a slice at a time; the older layouts (loom's
/// `col_attrs`, whose labels become categoricals only after a look at every value, and
/// anndata < 0.7 compound datasets) are read whole once and sliced in memory.
pub enum ObsReader {
    Columns(H5Frame),
    Held(Frame),
}

impl ObsReader {
    pub fn len(&self) -> usize {
        match self {
            ObsReader::Columns(f) => f.len(),
            ObsReader::Held(f) => f.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn column_names(&self) -> Vec<&str> {
        match self {
            ObsReader::Columns(f) => f.column_names(),
            ObsReader::Held(f) => f.column_names(),
        }
    }

    /// The cell names of `rows`.
    pub fn names(&self, rows: Range<usize>) -> Result<Vec<String>> {
        match self {
            ObsReader::Columns(f) => f.names(rows),
            ObsReader::Held(f) => Ok(f.index[rows].to_vec()),
        }
    }

    /// Rows `rows` of column `name`; `None` if obs has no such column.
    pub fn column(&self, name: &str, rows: Range<usize>) -> Result<Option<Column>> {
        match self {
            ObsReader::Columns(f) => f.column(name, rows),
            ObsReader::Held(f) => Ok(f.column(name).map(|c| c.take(&rows.collect::<Vec<_>>()))),
        }
    }

    /// Rows `rows` of every column.
    pub fn read(&self, rows: Range<usize>) -> Result<Frame> {
        match self {
            ObsReader::Columns(f) => f.read(rows),
            ObsReader::Held(f) => Ok(f.take(&rows.collect::<Vec<_>>())),
        }
    }

    /// obs whole, for what needs every row at once (`--cell-metadata` joins on every name).
    pub fn into_frame(self) -> Result<Frame> {
        match self {
            ObsReader::Columns(f) => f.read(0..f.len()),
            ObsReader::Held(f) => Ok(f),
        }
    }
}

/// Consecutive slices of `0..len` of at most `size` rows: how obs columns are swept.
pub fn slices(len: usize, size: usize) -> impl Iterator<Item = Range<usize>> {
    (0..len).step_by(size.max(1)).map(move |start| start..(start + size.max(1)).min(len))
}
