//! Writing AnnData's HDF5 encodings (`.h5ad`): attributes, string arrays, dict groups and
//! dataframes with every column type `Frame` holds. Used by the synthetic-data generator and by
//! evaluation's `embeddings.h5ad`.

use std::path::Path;
use std::str::FromStr;

use hdf5::types::VarLenUnicode;
use hdf5::{Dataset, Group, Location};

use crate::error::{DataError, Result};
use crate::frame::{Column, Frame};
use crate::source::h5::h5err;

/// A string attribute (`encoding-type` and friends).
pub fn str_attr(loc: &Location, name: &str, value: &str, path: &Path) -> Result<()> {
    let v = VarLenUnicode::from_str(value).map_err(|e| DataError::Internal(e.to_string()))?;
    loc.new_attr::<VarLenUnicode>().create(name).and_then(|a| a.write_scalar(&v)).map_err(h5err(path, name))
}

/// Marks `loc` with an AnnData encoding type and version.
pub fn encoding(loc: &Location, kind: &str, version: &str, path: &Path) -> Result<()> {
    str_attr(loc, "encoding-type", kind, path)?;
    str_attr(loc, "encoding-version", version, path)
}

/// An empty `dict`-encoded group (`uns`, `obsm`, `layers`, ...).
pub fn dict_group(parent: &Group, name: &str, path: &Path) -> Result<Group> {
    let g = parent.create_group(name).map_err(h5err(path, name))?;
    encoding(&g, "dict", "0.1.0", path)?;
    Ok(g)
}

fn to_vlen(values: &[String]) -> Result<Vec<VarLenUnicode>> {
    values.iter().map(|s| VarLenUnicode::from_str(s).map_err(|e| DataError::Internal(e.to_string()))).collect()
}

/// A dataset of variable-length UTF-8 strings (no encoding attributes).
pub fn strings(g: &Group, name: &str, values: &[String], path: &Path) -> Result<Dataset> {
    let data = to_vlen(values)?;
    g.new_dataset_builder().with_data(&data).create(name).map_err(h5err(path, name))
}

/// An AnnData dataframe: the index plus every column in its AnnData encoding.
pub fn frame(parent: &Group, name: &str, f: &Frame, path: &Path) -> Result<()> {
    let g = parent.create_group(name).map_err(h5err(path, name))?;
    encoding(&g, "dataframe", "0.2.0", path)?;
    str_attr(&g, "_index", "_index", path)?;
    let order = to_vlen(&f.columns.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>())?;
    g.new_attr_builder().with_data(&order).create("column-order").map_err(h5err(path, "column-order"))?;
    let idx = strings(&g, "_index", &f.index, path)?;
    encoding(&idx, "string-array", "0.2.0", path)?;
    for (cname, col) in &f.columns {
        let err = h5err(path, cname);
        match col {
            Column::Categorical { codes, categories, ordered } => {
                let cg = g.create_group(cname).map_err(&err)?;
                encoding(&cg, "categorical", "0.2.0", path)?;
                cg.new_attr::<bool>().create("ordered").and_then(|a| a.write_scalar(ordered)).map_err(&err)?;
                cg.new_dataset_builder().with_data(codes).create("codes").map_err(&err)?;
                let cats = strings(&cg, "categories", categories, path)?;
                encoding(&cats, "string-array", "0.2.0", path)?;
            }
            Column::Strings(v) => {
                let ds = strings(&g, cname, v, path)?;
                encoding(&ds, "string-array", "0.2.0", path)?;
            }
            Column::Float(v) => numeric(&g, cname, v, path)?,
            Column::Int(v) => numeric(&g, cname, v, path)?,
            Column::Bool(v) => numeric(&g, cname, v, path)?,
        }
    }
    Ok(())
}

fn numeric<T: hdf5::H5Type>(g: &Group, name: &str, values: &[T], path: &Path) -> Result<()> {
    let ds = g.new_dataset_builder().with_data(values).create(name).map_err(h5err(path, name))?;
    encoding(&ds, "array", "0.2.0", path)
}
