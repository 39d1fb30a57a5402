//! Reading single-cell files: AnnData `.h5ad` and `.loom`, both HDF5.
//!
//! `SourceFile` finds the candidate count matrices and the obs/var tables; `open_rows` turns
//! any matrix layout into a `RowSource` that yields blocks of cells as `CsrRows`.

mod anndata;
mod csc;
mod direct;
pub mod h5;
mod loom;
mod obs;
mod rows;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::csr::CsrRows;
use crate::error::{DataError, Result};
use crate::frame::Frame;

pub use obs::{slices, ObsReader};
pub use rows::RowSource;

/// Which file format a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    H5ad,
    Loom,
}

/// Where in the file a count matrix lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CountsLocation {
    /// `X` (h5ad) or `/matrix` (loom).
    X,
    /// `layers/<name>`.
    Layer(String),
    /// `raw/X` (h5ad only); its genes are `raw/var`.
    Raw,
}

impl CountsLocation {
    /// Parses the `--counts` spelling: `X`, `raw`, `raw/X`, `layers/NAME`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "X" | "matrix" => Ok(CountsLocation::X),
            "raw" | "raw/X" => Ok(CountsLocation::Raw),
            _ => match s.strip_prefix("layers/") {
                Some(name) if !name.is_empty() => Ok(CountsLocation::Layer(name.to_string())),
                _ => Err(DataError::Config(format!(
                    "--counts `{s}`: expected auto, X, raw or layers/NAME"
                ))),
            },
        }
    }
}

impl fmt::Display for CountsLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CountsLocation::X => write!(f, "X"),
            CountsLocation::Layer(n) => write!(f, "layers/{n}"),
            CountsLocation::Raw => write!(f, "raw/X"),
        }
    }
}

/// How a matrix is stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Csr,
    Csc,
    Dense,
    /// Dense genes × cells (loom's `/matrix`).
    DenseTransposed,
}

/// What the file says about one count matrix, without reading its values.
#[derive(Debug, Clone, Serialize)]
pub struct MatrixInfo {
    pub location: CountsLocation,
    pub layout: Layout,
    pub n_cells: usize,
    pub n_genes: usize,
    pub dtype: String,
    /// Stored entries: non-zeros for sparse, cells × genes for dense.
    pub stored: u64,
    pub compression: String,
}

impl MatrixInfo {
    /// A dense 2-D dataset: cells × genes, or genes × cells when `transposed` (loom).
    fn dense(ds: &hdf5::Dataset, path: &Path, loc: &CountsLocation, transposed: bool) -> Result<Self> {
        let shape = ds.shape();
        if shape.len() != 2 {
            return Err(DataError::field(path, loc.to_string(), format!("dense matrix must be 2-D, has shape {shape:?}")));
        }
        let (n_cells, n_genes) = if transposed { (shape[1], shape[0]) } else { (shape[0], shape[1]) };
        Ok(MatrixInfo {
            location: loc.clone(),
            layout: if transposed { Layout::DenseTransposed } else { Layout::Dense },
            n_cells,
            n_genes,
            dtype: h5::dtype_name(ds),
            stored: (n_cells * n_genes) as u64,
            compression: h5::compression_name(ds),
        })
    }
}

/// An opened `.h5ad` or `.loom` file.
pub struct SourceFile {
    pub path: PathBuf,
    pub format: Format,
    file: hdf5::File,
}

impl SourceFile {
    /// Opens a file and decides its format from its structure (not its extension).
    pub fn open(path: &Path) -> Result<Self> {
        let file = h5::open_file(path)?;
        let format = if h5::has(&file, "matrix") && h5::has(&file, "row_attrs") {
            Format::Loom
        } else if h5::has(&file, "X") {
            Format::H5ad
        } else {
            return Err(DataError::field(
                path,
                "X",
                "missing: not an AnnData file (no `X`) and not a loom file (no `/matrix`)",
            ));
        };
        Ok(SourceFile { path: path.to_path_buf(), format, file })
    }

    /// Every count-matrix candidate in the file, in `--counts auto` preference order.
    pub fn matrices(&self) -> Result<Vec<MatrixInfo>> {
        let mut out = vec![self.matrix_info(&CountsLocation::X)?];
        for name in self.layer_names() {
            out.push(self.matrix_info(&CountsLocation::Layer(name))?);
        }
        if self.format == Format::H5ad && h5::has(&self.file, "raw") {
            if let Ok(raw) = self.file.group("raw") {
                if h5::has(&raw, "X") {
                    out.push(self.matrix_info(&CountsLocation::Raw)?);
                }
            }
        }
        // `layers/counts` before other layers: it is where AnnData users keep raw counts.
        out[1..].sort_by_key(|m| match &m.location {
            CountsLocation::Layer(n) if n == "counts" => 0,
            CountsLocation::Layer(_) => 1,
            _ => 2,
        });
        Ok(out)
    }

    fn layer_names(&self) -> Vec<String> {
        match self.file.group("layers") {
            Ok(g) => g.member_names().unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// Describes the matrix at `loc`.
    pub fn matrix_info(&self, loc: &CountsLocation) -> Result<MatrixInfo> {
        match self.format {
            Format::H5ad => anndata::matrix_info(&self.file, &self.path, loc),
            Format::Loom => loom::matrix_info(&self.file, &self.path, loc),
        }
    }

    /// Per-cell metadata, whole.
    pub fn obs(&self) -> Result<Frame> {
        self.obs_reader()?.into_frame()
    }

    /// Per-cell metadata, to be read a window of cells at a time.
    pub fn obs_reader(&self) -> Result<ObsReader> {
        Ok(match self.format {
            Format::H5ad if self.file.group("obs").is_ok() => ObsReader::Columns(anndata::H5Frame::open(&self.file, &self.path, "obs")?),
            Format::H5ad => ObsReader::Held(anndata::read_frame(&self.file, &self.path, "obs")?),
            Format::Loom => ObsReader::Held(loom::read_attrs(&self.file, &self.path, "col_attrs")?),
        })
    }

    /// Per-gene metadata for the genes of the matrix at `loc` (`raw/var` for `raw/X`).
    pub fn var(&self, loc: &CountsLocation) -> Result<Frame> {
        match (self.format, loc) {
            (Format::H5ad, CountsLocation::Raw) => anndata::read_frame(&self.file, &self.path, "raw/var"),
            (Format::H5ad, _) => anndata::read_frame(&self.file, &self.path, "var"),
            (Format::Loom, _) => loom::read_attrs(&self.file, &self.path, "row_attrs"),
        }
    }

    /// Names of the entries of `uns` (h5ad) or the file attributes (loom).
    pub fn uns_keys(&self) -> Vec<String> {
        match self.format {
            Format::H5ad => self.file.group("uns").and_then(|g| g.member_names()).unwrap_or_default(),
            Format::Loom => self.file.attr_names().unwrap_or_default(),
        }
    }

    /// The first stored values of the matrix (at most `limit`), for cheap integer checks.
    pub fn sample_values(&self, loc: &CountsLocation, limit: usize) -> Result<Vec<f64>> {
        let info = self.matrix_info(loc)?;
        match info.layout {
            Layout::Csr | Layout::Csc => {
                let g = self.file.group(&matrix_group(self.format, loc)).map_err(h5::h5err(&self.path, &loc.to_string()))?;
                let ds = h5::dataset(&g, "data", &self.path, &format!("{loc}/data"))?;
                let n = (ds.size()).min(limit);
                ds.read_slice_1d::<f64, _>(0..n).map(|a| a.to_vec()).map_err(h5::h5err(&self.path, &format!("{loc}/data")))
            }
            Layout::Dense | Layout::DenseTransposed => {
                let rows = (limit / info.n_genes.max(1)).clamp(1, info.n_cells.max(1));
                let mut src = self.open_rows(loc, None)?;
                let block = src.read_rows(0..rows.min(info.n_cells))?;
                Ok(block.values.iter().map(|&v| v as f64).collect())
            }
        }
    }

    /// Per-cell totals and non-zero counts of a CSC matrix, by one streaming pass over its
    /// entries (memory O(cells)), so inspecting CSC needs no transpose.
    pub fn csc_cell_totals(&self, loc: &CountsLocation) -> Result<(Vec<f64>, Vec<f64>)> {
        let info = self.matrix_info(loc)?;
        let field = loc.to_string();
        let g = self.file.group(&matrix_group(self.format, loc)).map_err(h5::h5err(&self.path, &field))?;
        let data = h5::dataset(&g, "data", &self.path, &format!("{field}/data"))?;
        let indices = h5::dataset(&g, "indices", &self.path, &format!("{field}/indices"))?;
        let (mut totals, mut nonzero) = (vec![0.0; info.n_cells], vec![0.0; info.n_cells]);
        let step = 1 << 22;
        for lo in (0..data.size()).step_by(step) {
            let hi = (lo + step).min(data.size());
            let v = data.read_slice_1d::<f64, _>(lo..hi).map_err(h5::h5err(&self.path, &format!("{field}/data")))?;
            let r = indices.read_slice_1d::<i64, _>(lo..hi).map_err(h5::h5err(&self.path, &format!("{field}/indices")))?;
            for (&row, &x) in r.iter().zip(v.iter()) {
                let row = usize::try_from(row).ok().filter(|&row| row < info.n_cells).ok_or_else(|| {
                    DataError::field(&self.path, format!("{field}/indices"), format!("row {row} out of range for {} cells", info.n_cells))
                })?;
                totals[row] += x;
                nonzero[row] += (x != 0.0) as u8 as f64;
            }
        }
        Ok((totals, nonzero))
    }

    /// Opens the matrix at `loc` for reading blocks of cells. CSC needs `scratch`, a directory
    /// for its on-disk transpose.
    pub fn open_rows(&self, loc: &CountsLocation, scratch: Option<&Path>) -> Result<Box<dyn RowSource>> {
        let info = self.matrix_info(loc)?;
        let field = loc.to_string();
        match info.layout {
            Layout::Csr => {
                let g = self.file.group(&matrix_group(self.format, loc)).map_err(h5::h5err(&self.path, &field))?;
                Ok(Box::new(rows::H5Csr::open(&g, &self.path, &field, info.n_cells, info.n_genes)?))
            }
            Layout::Csc => {
                let g = self.file.group(&matrix_group(self.format, loc)).map_err(h5::h5err(&self.path, &field))?;
                let scratch = scratch.ok_or_else(|| {
                    DataError::Config(format!("{field} is CSC: reading it by cells needs a scratch directory"))
                })?;
                Ok(Box::new(csc::transpose(&g, &self.path, &field, info.n_cells, info.n_genes, scratch)?))
            }
            Layout::Dense | Layout::DenseTransposed => {
                let ds = self.file.dataset(&matrix_group(self.format, loc)).map_err(h5::h5err(&self.path, &field))?;
                Ok(Box::new(rows::H5Dense::new(ds, &self.path, &field, info.layout == Layout::DenseTransposed)))
            }
        }
    }
}

/// HDF5 path of the matrix at `loc`.
fn matrix_group(format: Format, loc: &CountsLocation) -> String {
    match (format, loc) {
        (Format::Loom, CountsLocation::X) => "matrix".into(),
        (_, CountsLocation::X) => "X".into(),
        (_, CountsLocation::Layer(n)) => format!("layers/{n}"),
        (_, CountsLocation::Raw) => "raw/X".into(),
    }
}

/// The obs dataframe of an `.h5ad` (anndata's or one neurofm wrote), whatever matrices it
/// holds: outputs such as `embeddings.h5ad` carry embeddings in `obsm` and no `X`.
pub fn read_h5ad_obs(path: &Path) -> Result<Frame> {
    let file = hdf5::File::open(path).map_err(h5::h5err(path, "/"))?;
    anndata::read_frame(&file, path, "obs")
}

/// Splits sorted row numbers into maximal runs of consecutive rows, so a sparse selection is
/// read with as few range reads as possible.
pub fn contiguous_runs(rows: &[usize]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for &r in rows {
        match runs.last_mut() {
            Some(run) if run.end == r => run.end = r + 1,
            _ => runs.push(r..r + 1),
        }
    }
    runs
}

/// Reads the given source rows (sorted ascending) into one block, in that order.
pub fn read_selected(src: &mut dyn RowSource, rows: &[usize]) -> Result<CsrRows> {
    let runs = contiguous_runs(rows);
    if let [run] = runs.as_slice() {
        return src.read_rows(run.clone()); // the common case: no copy
    }
    let mut out = CsrRows::new();
    for run in runs {
        let block = src.read_rows(run)?;
        for i in 0..block.n_rows() {
            out.push_row_from(&block, i);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_consecutive_rows() {
        assert_eq!(contiguous_runs(&[0, 1, 2, 5, 7, 8]), vec![0..3, 5..6, 7..9]);
        assert!(contiguous_runs(&[]).is_empty());
    }

    #[test]
    fn counts_location_parses_cli_spellings() {
        assert_eq!(CountsLocation::parse("layers/counts").ok(), Some(CountsLocation::Layer("counts".into())));
        assert_eq!(CountsLocation::parse("raw").ok(), Some(CountsLocation::Raw));
        assert!(CountsLocation::parse("layers/").is_err());
        assert_eq!(CountsLocation::Raw.to_string(), "raw/X");
    }
}
