//! Choosing cells and genes at conversion: what the original `s4`, `s6`, `s7` and `s8` did, in
//! three parts: cell filters (`--keep`), the metadata join (`--cell-metadata`) and gene
//! selection (`--genes`).

mod cells;
mod genes;
mod metadata;

pub use cells::{apply_keep, KeepFilter};
pub use genes::{choose_genes, seurat_dispersion, GeneScan, GeneSelection};
pub use metadata::{join_cell_metadata, parse_csv_line, CsvRows};

#[cfg(test)]
pub(crate) mod tests {
    use crate::frame::{Column, Frame};

    /// Three cells, `t` = a, b, a: the obs the filter and join tests start from.
    pub(crate) fn obs() -> Frame {
        Frame {
            index_name: "_index".into(),
            index: vec!["c0".into(), "c1".into(), "c2".into()],
            columns: vec![("t".into(), Column::categorical_from_text(vec!["a".into(), "b".into(), "a".into()]))],
        }
    }
}
