//! AnnData's HDF5 encoding (anndata ≥ 0.7): matrices by `encoding-type`, dataframes with
//! `_index` / `column-order`, categoricals as `codes` + `categories`. Files written before 0.7
//! (many public ones) are read too: sparse matrices by `h5sparse_format`/`h5sparse_shape`,
//! obs/var as compound datasets whose first member is the index, and a categorical column's
//! categories in `uns/<column>_categories`, as anndata itself reads them.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hdf5::{Dataset, File, Group};

use super::h5::{self, ValueKind};
use super::{CountsLocation, Layout, MatrixInfo};
use crate::error::{DataError, Result};
use crate::frame::{Column, Frame};

/// Describes `X`, `layers/<name>` or `raw/X`.
pub fn matrix_info(file: &File, path: &Path, loc: &CountsLocation) -> Result<MatrixInfo> {
    let name = super::matrix_group(super::Format::H5ad, loc);
    if !file.link_exists(&name) {
        return Err(DataError::field(path, &name, "missing"));
    }
    if let Ok(ds) = file.dataset(&name) {
        return MatrixInfo::dense(&ds, path, loc, false);
    }
    let g = file.group(&name).map_err(h5::h5err(path, &name))?;
    let enc = h5::attr_string(&g, "encoding-type").or_else(|| h5::attr_string(&g, "h5sparse_format").map(|f| format!("{f}_matrix")));
    let layout = match enc.as_deref() {
        Some("csr_matrix") => Layout::Csr,
        Some("csc_matrix") => Layout::Csc,
        other => {
            return Err(DataError::field(
                path,
                &name,
                format!("unsupported encoding-type {other:?}; expected csr_matrix, csc_matrix or a dense array"),
            ))
        }
    };
    let shape = h5::attr_u64_list(&g, "shape")
        .or_else(|| h5::attr_u64_list(&g, "h5sparse_shape"))
        .filter(|s| s.len() == 2)
        .ok_or_else(|| DataError::field(path, format!("{name}.attrs['shape']"), "missing or not 2 integers"))?;
    let data = h5::dataset(&g, "data", path, &format!("{name}/data"))?;
    Ok(MatrixInfo {
        location: loc.clone(),
        layout,
        n_cells: shape[0] as usize,
        n_genes: shape[1] as usize,
        dtype: h5::dtype_name(&data),
        stored: data.size() as u64,
        compression: h5::compression_name(&data),
    })
}

/// Reads a dataframe group (`obs`, `var`, `raw/var`), or an anndata < 0.7 compound dataset.
pub fn read_frame(file: &File, path: &Path, name: &str) -> Result<Frame> {
    if let Ok(ds) = file.dataset(name) {
        return read_legacy_frame(file, &ds, path, name);
    }
    let frame = H5Frame::open(file, path, name)?;
    frame.read(0..frame.len())
}

/// An anndata ≥ 0.7 dataframe group read a slice of rows at a time, so that conversion never
/// holds every cell's name: the datasets are opened once, categories read once and shared.
pub struct H5Frame {
    path: PathBuf,
    name: String,
    index_name: String,
    index: Dataset,
    columns: Vec<(String, H5Column)>,
}

/// Where one column's values are, and how they are encoded.
enum H5Column {
    Categorical { codes: Dataset, categories: Arc<Vec<String>>, ordered: bool },
    /// `nullable-integer` / `nullable-boolean`, read as floats with NaN where masked.
    Nullable { values: Dataset, mask: Dataset },
    Plain(Dataset, ValueKind),
}

impl H5Frame {
    /// Opens the group `name` and checks that every column has as many rows as the index;
    /// columns in encodings we do not carry are reported and left out.
    pub fn open(file: &File, path: &Path, name: &str) -> Result<H5Frame> {
        let g = file.group(name).map_err(|_| DataError::field(path, name, "missing"))?;
        let index_name = h5::attr_string(&g, "_index").unwrap_or_else(|| "_index".to_string());
        let index = h5::dataset(&g, &index_name, path, &format!("{name}/{index_name}"))?;
        let mut order = h5::attr_string_list(&g, "column-order");
        if order.is_empty() {
            order = g.member_names().unwrap_or_default().into_iter().filter(|m| *m != index_name && !m.starts_with("__")).collect();
        }
        let mut columns = Vec::new();
        for col in order {
            let field = format!("{name}/{col}");
            let Some((column, rows)) = open_column(&g, &col, path, &field)? else {
                tracing::warn!("{}: skipping column `{field}`: unsupported encoding", path.display());
                continue;
            };
            if rows != index.size() {
                return Err(DataError::field(path, &field, format!("has {rows} rows, the index has {}", index.size())));
            }
            columns.push((col, column));
        }
        Ok(H5Frame { path: path.to_path_buf(), name: name.to_string(), index_name, index, columns })
    }

    pub fn len(&self) -> usize {
        self.index.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn column_names(&self) -> Vec<&str> {
        self.columns.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The index names of `rows`.
    pub fn names(&self, rows: Range<usize>) -> Result<Vec<String>> {
        h5::read_strings_at(&self.index, rows, &self.path, &format!("{}/{}", self.name, self.index_name))
    }

    /// Rows `rows` of column `name`; `None` if the frame has no such column.
    pub fn column(&self, name: &str, rows: Range<usize>) -> Result<Option<Column>> {
        self.columns.iter().find(|(n, _)| n == name).map(|(n, c)| self.read_column(n, c, rows)).transpose()
    }

    /// Rows `rows` of the whole frame.
    pub fn read(&self, rows: Range<usize>) -> Result<Frame> {
        let columns = self.columns.iter().map(|(n, c)| Ok((n.clone(), self.read_column(n, c, rows.clone())?))).collect::<Result<_>>()?;
        Ok(Frame { index_name: self.index_name.clone(), index: self.names(rows)?, columns })
    }

    fn read_column(&self, name: &str, column: &H5Column, rows: Range<usize>) -> Result<Column> {
        let (path, field) = (self.path.as_path(), format!("{}/{name}", self.name));
        Ok(match column {
            H5Column::Categorical { codes, categories, ordered } => {
                let codes: Vec<i32> = h5::read_at::<i64>(codes, rows.clone(), path, &field)?.into_iter().map(|c| c as i32).collect();
                if let Some(i) = codes.iter().position(|&c| c < -1 || c >= categories.len() as i32) {
                    let row = rows.start + i;
                    return Err(DataError::field(path, format!("{field}/codes"), format!("code {} of row {row} is out of range for {} categories", codes[i], categories.len())));
                }
                Column::Categorical { codes, categories: categories.clone(), ordered: *ordered }
            }
            H5Column::Nullable { values, mask } => {
                let values = h5::read_at::<f64>(values, rows.clone(), path, &field)?;
                let mask = h5::read_at::<bool>(mask, rows, path, &field)?;
                Column::Float(values.into_iter().zip(mask).map(|(v, m)| if m { f64::NAN } else { v }).collect())
            }
            H5Column::Plain(ds, ValueKind::String) => Column::Strings(h5::read_strings_at(ds, rows, path, &field)?),
            H5Column::Plain(ds, ValueKind::Int) => Column::Int(h5::read_at(ds, rows, path, &field)?),
            H5Column::Plain(ds, ValueKind::Bool) => Column::Bool(h5::read_at(ds, rows, path, &field)?),
            H5Column::Plain(ds, _) => Column::Float(h5::read_at(ds, rows, path, &field)?),
        })
    }
}

/// Opens one column and says how many rows it has; `None` for encodings we do not carry.
fn open_column(g: &Group, col: &str, path: &Path, field: &str) -> Result<Option<(H5Column, usize)>> {
    if let Ok(cg) = g.group(col) {
        return match h5::attr_string(&cg, "encoding-type").as_deref() {
            Some("categorical") => {
                let codes = h5::dataset(&cg, "codes", path, &format!("{field}/codes"))?;
                let cats_ds = h5::dataset(&cg, "categories", path, &format!("{field}/categories"))?;
                let categories = match h5::value_kind(&cats_ds) {
                    ValueKind::String => h5::read_strings(&cats_ds, path, field)?,
                    _ => h5::read_f64(&cats_ds, path, field)?.into_iter().map(|x| x.to_string()).collect(),
                };
                let ordered = cg.attr("ordered").and_then(|a| a.read_scalar::<bool>()).unwrap_or(false);
                let rows = codes.size();
                Ok(Some((H5Column::Categorical { codes, categories: Arc::new(categories), ordered }, rows)))
            }
            Some("nullable-integer") | Some("nullable-boolean") => {
                let values = h5::dataset(&cg, "values", path, field)?;
                let mask = h5::dataset(&cg, "mask", path, field)?;
                let rows = values.size();
                if mask.size() != rows {
                    return Err(DataError::field(path, format!("{field}/mask"), format!("has {} rows, the values have {rows}", mask.size())));
                }
                Ok(Some((H5Column::Nullable { values, mask }, rows)))
            }
            _ => Ok(None),
        };
    }
    let ds = h5::dataset(g, col, path, field)?;
    Ok(match h5::value_kind(&ds) {
        ValueKind::Other => None,
        kind => {
            let rows = ds.size();
            Some((H5Column::Plain(ds, kind), rows))
        }
    })
}

/// Reads an anndata < 0.7 dataframe: a compound dataset, the first member the index, integer
/// members with `uns/<member>_categories` categorical codes.
fn read_legacy_frame(file: &File, ds: &hdf5::Dataset, path: &Path, name: &str) -> Result<Frame> {
    let fields = h5::compound_fields(ds).ok_or_else(|| {
        DataError::field(path, name, "is a dataset but not a table of records; expected a group (anndata ≥ 0.7) or a compound dataset (older anndata)")
    })?;
    let (index_field, rest) = fields.split_first().ok_or_else(|| DataError::field(path, name, "compound dataset without members"))?;
    let field = |m: &str| format!("{name}['{m}']");
    let index = h5::read_compound_strings(ds, &index_field.name, &index_field.ty, path, &field(&index_field.name))?;
    let uns = file.group("uns").ok();
    let mut columns = Vec::new();
    for m in rest {
        let f = field(&m.name);
        let categories = uns.as_ref().and_then(|u| u.dataset(&format!("{}_categories", m.name)).ok());
        let col = match (h5::kind_of(&m.ty), categories) {
            (ValueKind::Int, Some(cats)) => {
                let cats_field = format!("uns/{}_categories", m.name);
                let categories = match h5::value_kind(&cats) {
                    ValueKind::String => h5::read_strings(&cats, path, &cats_field)?,
                    _ => h5::read_f64(&cats, path, &cats_field)?.into_iter().map(|x| x.to_string()).collect(),
                };
                let codes: Vec<i32> = h5::read_compound_field::<i64>(ds, &m.name, path, &f)?.into_iter().map(|c| c as i32).collect();
                if let Some(bad) = codes.iter().find(|&&c| c < -1 || c >= categories.len() as i32) {
                    return Err(DataError::field(path, f, format!("code {bad} out of range for the {} categories in {cats_field}", categories.len())));
                }
                Column::Categorical { codes, categories: Arc::new(categories), ordered: false }
            }
            (ValueKind::Int, None) => Column::Int(h5::read_compound_field::<i64>(ds, &m.name, path, &f)?),
            (ValueKind::Float, _) => Column::Float(h5::read_compound_field::<f64>(ds, &m.name, path, &f)?),
            (ValueKind::Bool, _) => Column::Bool(h5::read_compound_field::<bool>(ds, &m.name, path, &f)?),
            (ValueKind::String, _) => Column::Strings(h5::read_compound_strings(ds, &m.name, &m.ty, path, &f)?),
            (ValueKind::Other, _) => {
                tracing::warn!("{}: skipping column `{f}`: unsupported type", path.display());
                continue;
            }
        };
        columns.push((m.name.clone(), col));
    }
    Ok(Frame { index_name: index_field.name.clone(), index, columns })
}
