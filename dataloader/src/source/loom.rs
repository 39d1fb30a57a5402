//! Loom files (loompy 2/3): `/matrix` is genes × cells, metadata in `row_attrs` (genes) and
//! `col_attrs` (cells), extra matrices in `/layers`.

use std::path::Path;

use hdf5::File;

use super::h5::{self, ValueKind};
use super::{CountsLocation, MatrixInfo};
use crate::error::{DataError, Result};
use crate::frame::{Column, Frame};

/// Index attribute names, in the order loompy and anndata's `read_loom` look for them.
const CELL_INDEX: &[&str] = &["obs_names", "CellID", "cell_id", "Cell_id", "CellId"];
const GENE_INDEX: &[&str] = &["var_names", "Gene", "gene", "Gene_name", "gene_ids", "Accession"];

/// Describes `/matrix` or `/layers/<name>`.
pub fn matrix_info(file: &File, path: &Path, loc: &CountsLocation) -> Result<MatrixInfo> {
    let name = super::matrix_group(super::Format::Loom, loc);
    if matches!(loc, CountsLocation::Raw) {
        return Err(DataError::field(path, "raw/X", "loom files have no raw matrix; use X or layers/NAME"));
    }
    let ds = file.dataset(&name).map_err(|_| DataError::field(path, &name, "missing"))?;
    MatrixInfo::dense(&ds, path, loc, true)
}

/// Reads `col_attrs` (cells) or `row_attrs` (genes) as a dataframe.
pub fn read_attrs(file: &File, path: &Path, group: &str) -> Result<Frame> {
    let g = file.group(group).map_err(|_| DataError::field(path, group, "missing"))?;
    let n = {
        let m = file.dataset("matrix").map_err(h5::h5err(path, "matrix"))?.shape();
        if group == "col_attrs" { m[1] } else { m[0] }
    };
    let mut names = g.member_names().map_err(h5::h5err(path, group))?;
    names.sort();
    let mut columns = Vec::new();
    for name in names {
        let field = format!("{group}/{name}");
        let Ok(ds) = g.dataset(&name) else { continue };
        if ds.ndim() != 1 || ds.size() != n {
            continue; // multi-dimensional attributes (embeddings) are not dataframe columns
        }
        let col = match h5::value_kind(&ds) {
            ValueKind::String => Column::Strings(h5::read_strings(&ds, path, &field)?),
            ValueKind::Int => Column::Int(h5::read_i64(&ds, path, &field)?),
            ValueKind::Float => Column::Float(h5::read_f64(&ds, path, &field)?),
            ValueKind::Bool => Column::Bool(ds.read_raw::<bool>().map_err(h5::h5err(path, &field))?),
            ValueKind::Other => continue,
        };
        columns.push((name, col));
    }
    let wanted = if group == "col_attrs" { CELL_INDEX } else { GENE_INDEX };
    let pos = wanted.iter().find_map(|w| columns.iter().position(|(n, c)| n == w && matches!(c, Column::Strings(_))));
    let (index_name, index) = match pos {
        Some(p) => {
            let (name, col) = columns.remove(p);
            let Column::Strings(v) = col else { unreachable!("position() matched a string column") };
            (name, v)
        }
        None => ("_index".to_string(), (0..n).map(|i| i.to_string()).collect()),
    };
    // Short string attributes with few distinct values are labels: store them as categoricals.
    let columns = columns
        .into_iter()
        .map(|(name, col)| match col {
            Column::Strings(v) if distinct_at_most(&v, v.len() / 2) => (name, Column::categorical_from_text(v)),
            other => (name, other),
        })
        .collect();
    Ok(Frame { index_name, index, columns })
}

fn distinct_at_most(v: &[String], limit: usize) -> bool {
    let mut set = std::collections::HashSet::new();
    for s in v {
        set.insert(s.as_str());
        if set.len() > limit {
            return false;
        }
    }
    true
}
