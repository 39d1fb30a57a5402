//! `inspect` reports what a file holds; checked against independently computed answers.

mod common;

use dataloader::convert::ConvertOptions;
use dataloader::inspect::{inspect, median};
use dataloader::store::Store;
use dataloader::synth::{self, SynthLayout, SynthLocation, SynthOptions};

#[test]
fn csr_and_csc_variants_report_the_same_cells_and_the_counts_layer() {
    common::no_hdf5_locking();
    let dir = tempfile::tempdir().unwrap();
    let mut medians = Vec::new();
    for layout in [SynthLayout::Csr, SynthLayout::Csc] {
        let path = dir.path().join(format!("{layout:?}.h5ad"));
        let o = SynthOptions { layout, counts_in: SynthLocation::Layer, ..SynthOptions::new(path.clone(), 400, 90, 3, 8) };
        synth::write(&o).unwrap();
        let r = inspect(&path).unwrap();
        assert_eq!((r.n_cells, r.n_genes), (400, 90));
        assert_eq!(r.raw_counts.as_deref(), Some("layers/counts"), "X holds log-normalized values");
        assert_eq!(r.matrices.len(), 2);
        assert!(r.matrices[0].non_integer_fraction > 0.5, "X is log1p(CP10k)");
        assert_eq!(r.obs.iter().find(|c| c.name == "cell_type").map(|c| c.distinct), Some(3));
        medians.push((r.median_cell_total, r.median_cell_nonzero));
        // Independent answer: the converter's own per-cell totals.
        let out = dir.path().join(format!("{layout:?}.zarr"));
        dataloader::convert::convert(&path, &out, &ConvertOptions::default()).unwrap();
        let mut totals = Store::open(&out).unwrap().stats().unwrap().cell_total;
        assert_eq!(r.median_cell_total, median(&mut totals));
        assert!(serde_json::to_string(&r).unwrap().contains(r#""raw_counts":"layers/counts""#));
    }
    assert_eq!(medians[0], medians[1]);
}

#[test]
fn real_files_report_their_counts_source() {
    let Some(data) = common::shared_data() else { return };
    let whb = inspect(&data.join("whb_cortex_L5exc_MGEinh.h5ad")).unwrap();
    assert_eq!((whb.n_cells, whb.n_genes, whb.raw_counts.as_deref()), (1152, 2000, Some("X")));
    assert!((whb.matrices[0].density - 0.706).abs() < 0.001, "README: 70.6 % non-zero");
    let subtype = whb.obs.iter().find(|c| c.name == "subtype").unwrap();
    assert_eq!(subtype.top, vec![("cluster_2523".to_string(), 620), ("cluster_210".to_string(), 532)]);
    let kang = inspect(&data.join("kang2018_pbmc_muscat_subset_ensembl_countslayer.h5ad")).unwrap();
    assert_eq!(kang.raw_counts.as_deref(), Some("layers/counts"));
    assert_eq!(kang.sampled_cells, 1556, "CSC totals cover every cell");
    let mn = inspect(&data.join("mouse_cortex_interneurons_metaneighbor_mixed_umi_rpkm.h5ad")).unwrap();
    assert_eq!(mn.raw_counts, None, "mixed UMI/RPKM is not counts");
    let loom = inspect(&data.join("furlan2016_sympathetic_neurons.loom")).unwrap();
    assert_eq!((loom.n_cells, loom.n_genes, loom.format.as_str()), (298, 16892, "loom"));
}
