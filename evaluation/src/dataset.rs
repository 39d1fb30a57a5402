//! The cells to evaluate: a zarr store, or an h5ad/loom file converted on the fly into a
//! temporary store, with the data's genes mapped onto the model's gene order.

use std::path::{Path, PathBuf};

use dataloader::convert::{convert, ConvertOptions};
use dataloader::csr::CsrRows;
use dataloader::frame::Frame;
use dataloader::store::Store;
use tracing::{info, warn};

use crate::error::{EvalError, Result};

/// How the data's genes line up with the model's.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneMap {
    /// For each data gene, its position in the model's gene order.
    pub to_model: Vec<Option<u32>>,
    /// Model genes the data lacks (their tokens become padding, so they take no part).
    pub missing: Vec<String>,
    /// For each model gene, whether the data has it.
    pub present: Vec<bool>,
}

impl GeneMap {
    /// Matches data var names against the model's genes; no gene in common is an error.
    pub fn new(data_genes: &[String], model_genes: &[String], data: &Path) -> Result<GeneMap> {
        let pos: std::collections::HashMap<&str, u32> = model_genes.iter().enumerate().map(|(i, g)| (g.as_str(), i as u32)).collect();
        let to_model: Vec<Option<u32>> = data_genes.iter().map(|g| pos.get(g.as_str()).copied()).collect();
        let mut present = vec![false; model_genes.len()];
        for j in to_model.iter().flatten() {
            present[*j as usize] = true;
        }
        if !present.iter().any(|&p| p) {
            return Err(EvalError::input(
                data,
                format!(
                    "none of its {} genes (e.g. {}) is among the model's {} genes (e.g. {}); evaluate data with the same gene identifiers the run was trained on",
                    data_genes.len(),
                    data_genes.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
                    model_genes.len(),
                    model_genes.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let missing = model_genes.iter().zip(&present).filter(|(_, &p)| !p).map(|(g, _)| g.clone()).collect();
        Ok(GeneMap { to_model, missing, present })
    }

    /// Rows re-indexed to model genes (ascending), dropping genes the model does not know.
    pub fn remap(&self, rows: &CsrRows) -> CsrRows {
        let mut out = CsrRows::with_capacity(rows.n_rows(), rows.nnz());
        let mut pairs: Vec<(u32, f32)> = Vec::new();
        for i in 0..rows.n_rows() {
            let (idx, val) = rows.row(i);
            pairs.clear();
            pairs.extend(idx.iter().zip(val).filter_map(|(&g, &v)| self.to_model[g as usize].map(|j| (j, v))));
            pairs.sort_unstable_by_key(|p| p.0);
            let (i2, v2): (Vec<u32>, Vec<f32>) = pairs.iter().copied().unzip();
            out.push_row(&i2, &v2);
        }
        out
    }
}

/// An opened evaluation dataset.
pub struct EvalData {
    /// What the user passed.
    pub path: PathBuf,
    pub store: Store,
    pub obs: Frame,
    pub genes: Vec<String>,
    /// Keeps a converted temporary store alive while it is read.
    _converted: Option<tempfile::TempDir>,
}

impl EvalData {
    /// Opens a store directory, or converts an `.h5ad`/`.loom` file (counts as the converter
    /// finds them, cell order kept) into a temporary store next to `scratch`.
    pub fn open(path: &Path, scratch: &Path, allow_non_integer: bool) -> Result<EvalData> {
        let (store_path, converted) = if path.is_dir() {
            (path.to_path_buf(), None)
        } else if path.is_file() {
            std::fs::create_dir_all(scratch).map_err(|e| EvalError::io(scratch, e))?;
            let tmp = tempfile::Builder::new().prefix(".neurofm-eval-").tempdir_in(scratch).map_err(|e| EvalError::io(scratch, e))?;
            let out = tmp.path().join("data.zarr");
            let opts = ConvertOptions { shuffle_seed: None, allow_non_integer, ..ConvertOptions::default() };
            info!("converting {} for evaluation", path.display());
            let s = convert(path, &out, &opts)?;
            info!("converted {} cells × {} genes from {} in {:.1} s", s.n_cells, s.n_genes, s.counts_source, s.seconds);
            (out, Some(tmp))
        } else {
            return Err(EvalError::input(path, "does not exist; --data takes a zarr store from `neurofm-data convert` or an .h5ad/.loom file"));
        };
        let store = Store::open(&store_path)?;
        let obs = store.frame("obs")?;
        let genes = store.var_names()?;
        Ok(EvalData { path: path.to_path_buf(), store, obs, genes, _converted: converted })
    }

    /// Gene mapping onto `model_genes`, with missing genes reported.
    pub fn gene_map(&self, model_genes: &[String]) -> Result<GeneMap> {
        let map = GeneMap::new(&self.genes, model_genes, &self.path)?;
        if !map.missing.is_empty() {
            warn!(
                "{} of the model's {} genes are missing from {} and are left out of every cell (e.g. {})",
                map.missing.len(),
                model_genes.len(),
                self.path.display(),
                map.missing.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            );
        }
        Ok(map)
    }

    /// Raw counts of `cells` (store rows, any order) in the data's own gene order.
    pub fn counts(&self, cells: &[usize]) -> Result<CsrRows> {
        Ok(self.store.read_cells(cells)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn remap_reorders_to_model_genes_and_reports_missing_ones() {
        let map = GeneMap::new(&s(&["c", "a", "z"]), &s(&["a", "b", "c"]), Path::new("d")).unwrap();
        assert_eq!(map.missing, vec!["b"]);
        assert_eq!(map.present, vec![true, false, true]);
        let mut rows = CsrRows::new();
        rows.push_row(&[0, 1, 2], &[3.0, 1.0, 9.0]);
        let out = map.remap(&rows);
        assert_eq!(out.row(0), (&[0u32, 2][..], &[1.0f32, 3.0][..]));
    }

    #[test]
    fn no_gene_in_common_is_an_input_error() {
        let e = GeneMap::new(&s(&["x", "y"]), &s(&["a", "b"]), Path::new("d.h5ad")).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("none of its 2 genes"), "{e}");
    }
}
