//! Choosing cells and genes at conversion: what the original `s4`, `s6`, `s7` and `s8` did, in
//! three parts: cell filters (`--keep`), the metadata join (`--cell-metadata`) and gene
//! selection (`--genes`).

mod cells;
mod genes;
mod metadata;

pub use cells::{apply_keep, KeepFilter};
pub use genes::{choose_genes, seurat_dispersion, GeneScan, GeneSelection};
pub use metadata::{join_cell_metadata, parse_csv_line};
