//! The cells to evaluate: a zarr store, or an h5ad/loom file converted on the fly into a
//! temporary store, with the data's genes mapped onto the model's gene order.

use std::path::{Path, PathBuf};

use dataloader::convert::{convert, ConvertOptions};
use dataloader::csr::CsrRows;
use dataloader::genes::GeneCase;
use dataloader::frame::Frame;
use dataloader::store::Store;
use tracing::{info, warn};

use crate::error::{EvalError, Result};

pub use dataloader::genes::GeneMap;

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

    /// The data's genes (its var names, or the values of `var[gene_key]`) mapped onto the
    /// model's vocabulary, the overlap logged; refused when the genes in common are under
    /// `min_share` of the smaller panel (zero-shot use on a foreign panel says little then).
    pub fn gene_map(&self, model_genes: &[String], case: GeneCase, gene_key: Option<&str>, min_share: f64) -> Result<GeneMap> {
        let genes = match gene_key {
            None => self.genes.clone(),
            Some(key) => dataloader::genes::store_genes(&self.store, Some(key))?,
        };
        let map = GeneMap::new(&genes, model_genes, case, &self.path)?;
        let o = &map.overlap;
        info!("gene overlap of {} with the model's {} genes ({case:?} matching): {o}", self.path.display(), model_genes.len());
        if o.share < min_share {
            return Err(EvalError::input(
                &self.path,
                format!(
                    "shares only {} genes with the model ({:.0} % of the smaller panel, under --min-gene-overlap {min_share}; {} of its genes are unknown to the model, e.g. {}). Match gene identifiers (--gene-key COL, or a run trained with data.gene_case = \"insensitive\"), or lower --min-gene-overlap",
                    o.shared,
                    100.0 * o.share,
                    o.unknown,
                    o.examples_unknown.join(", ")
                ),
            ));
        }
        if o.missing > 0 {
            warn!("{} of the model's genes are absent from {} and left out of every cell, not read as zero", o.missing, self.path.display());
        }
        Ok(map)
    }

    /// Raw counts of `cells` (store rows, any order) in the data's own gene order.
    pub fn counts(&self, cells: &[usize]) -> Result<CsrRows> {
        Ok(self.store.read_cells(cells)?)
    }
}
