//! Helpers shared by the end-to-end tests: generated stores and checkpoint weights.

use std::path::{Path, PathBuf};

use dataloader::convert::{convert, ConvertOptions};
use dataloader::synth::{self, SynthOptions};

/// `root/NAME.zarr`: a synthetic h5ad of `cells` × `genes` with 3 cell types, converted.
pub fn synth_store(root: &Path, name: &str, cells: usize, genes: usize) -> PathBuf {
    std::env::set_var("HDF5_USE_FILE_LOCKING", "FALSE");
    let src = root.join(format!("{name}.h5ad"));
    synth::write(&SynthOptions::new(src.clone(), cells, genes, 3, 11)).expect("synth");
    let out = root.join(format!("{name}.zarr"));
    convert(&src, &out, &ConvertOptions::default()).expect("convert");
    out
}

/// `root/NAME.zarr` keeping genes `keep` of a synthetic h5ad of `cells` × `genes` (seed
/// `seed`), its matrix in chunks of `chunk_entries` values.
pub fn panel_store(root: &Path, name: &str, cells: usize, genes: usize, keep: std::ops::Range<usize>, seed: u64, chunk_entries: u64) -> PathBuf {
    std::env::set_var("HDF5_USE_FILE_LOCKING", "FALSE");
    let src = root.join(format!("{name}.h5ad"));
    synth::write(&SynthOptions::new(src.clone(), cells, genes, 3, seed)).expect("synth");
    let list = root.join(format!("{name}.genes.txt"));
    std::fs::write(&list, keep.map(|g| format!("gene_{g}\n")).collect::<String>()).expect("gene list");
    let out = root.join(format!("{name}.zarr"));
    let opts = ConvertOptions { genes: dataloader::select::GeneSelection::List(list), chunk_entries, ..ConvertOptions::default() };
    convert(&src, &out, &opts).expect("convert");
    out
}

/// The model weights of a checkpoint directory, sorted by name.
pub fn weights(ckpt: &Path) -> Vec<(String, tch::Tensor)> {
    let mut w = tch::Tensor::read_safetensors(ckpt.join("model.safetensors")).expect("weights");
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}
