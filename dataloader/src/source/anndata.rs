//! AnnData's HDF5 encoding (anndata ≥ 0.7): matrices by `encoding-type`, dataframes with
//! `_index` / `column-order`, categoricals as `codes` + `categories`. Files written before 0.7
//! (many public ones) are read too: sparse matrices by `h5sparse_format`/`h5sparse_shape`,
//! obs/var as compound datasets whose first member is the index, and a categorical column's
//! categories in `uns/<column>_categories`, as anndata itself reads them.

use std::path::Path;

use hdf5::{File, Group};

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

/// Reads a dataframe group (`obs`, `var`, `raw/var`).
pub fn read_frame(file: &File, path: &Path, name: &str) -> Result<Frame> {
    if let Ok(ds) = file.dataset(name) {
        return read_legacy_frame(file, &ds, path, name);
    }
    let g = file.group(name).map_err(|_| DataError::field(path, name, "missing"))?;
    let index_name = h5::attr_string(&g, "_index").unwrap_or_else(|| "_index".to_string());
    let index_field = format!("{name}/{index_name}");
    let index = h5::read_strings(&h5::dataset(&g, &index_name, path, &index_field)?, path, &index_field)?;
    let mut order = h5::attr_string_list(&g, "column-order");
    if order.is_empty() {
        order = g.member_names().unwrap_or_default().into_iter().filter(|m| *m != index_name && !m.starts_with("__")).collect();
    }
    let mut columns = Vec::new();
    for col in order {
        let field = format!("{name}/{col}");
        match read_column(&g, &col, path, &field)? {
            Some(c) if c.len() == index.len() => columns.push((col, c)),
            Some(c) => {
                return Err(DataError::field(path, &field, format!("has {} rows, the index has {}", c.len(), index.len())))
            }
            None => tracing::warn!("{}: skipping column `{field}`: unsupported encoding", path.display()),
        }
    }
    Ok(Frame { index_name, index, columns })
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
                Column::Categorical { codes, categories, ordered: false }
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

/// Reads one column; `None` for encodings we do not carry (they are reported, not fatal).
fn read_column(g: &Group, col: &str, path: &Path, field: &str) -> Result<Option<Column>> {
    if let Ok(cg) = g.group(col) {
        return match h5::attr_string(&cg, "encoding-type").as_deref() {
            Some("categorical") => {
                let codes_ds = h5::dataset(&cg, "codes", path, &format!("{field}/codes"))?;
                let codes: Vec<i32> = h5::read_i64(&codes_ds, path, field)?.into_iter().map(|c| c as i32).collect();
                let cats_ds = h5::dataset(&cg, "categories", path, &format!("{field}/categories"))?;
                let categories = match h5::value_kind(&cats_ds) {
                    ValueKind::String => h5::read_strings(&cats_ds, path, field)?,
                    _ => h5::read_f64(&cats_ds, path, field)?.into_iter().map(|x| x.to_string()).collect(),
                };
                if let Some(bad) = codes.iter().find(|&&c| c < -1 || c >= categories.len() as i32) {
                    return Err(DataError::field(path, format!("{field}/codes"), format!("code {bad} out of range for {} categories", categories.len())));
                }
                let ordered = cg.attr("ordered").and_then(|a| a.read_scalar::<bool>()).unwrap_or(false);
                Ok(Some(Column::Categorical { codes, categories, ordered }))
            }
            Some("nullable-integer") | Some("nullable-boolean") => {
                let values = h5::read_f64(&h5::dataset(&cg, "values", path, field)?, path, field)?;
                let mask: Vec<bool> = h5::dataset(&cg, "mask", path, field)?.read_raw::<bool>().map_err(h5::h5err(path, field))?;
                Ok(Some(Column::Float(values.into_iter().zip(mask).map(|(v, m)| if m { f64::NAN } else { v }).collect())))
            }
            _ => Ok(None),
        };
    }
    let ds = h5::dataset(g, col, path, field)?;
    Ok(match h5::value_kind(&ds) {
        ValueKind::String => Some(Column::Strings(h5::read_strings(&ds, path, field)?)),
        ValueKind::Int => Some(Column::Int(h5::read_i64(&ds, path, field)?)),
        ValueKind::Float => Some(Column::Float(h5::read_f64(&ds, path, field)?)),
        ValueKind::Bool => Some(Column::Bool(ds.read_raw::<bool>().map_err(h5::h5err(path, field))?)),
        ValueKind::Other => None,
    })
}
