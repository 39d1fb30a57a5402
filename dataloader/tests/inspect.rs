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

/// One obs row as anndata 0.6 stored it: a record, the index first, categorical codes as ints.
#[derive(hdf5::H5Type, Clone)]
#[repr(C)]
struct LegacyObs {
    index: hdf5::types::FixedAscii<8>,
    subtype: i8,
    depth: f32,
    odd: bool,
    barcode: hdf5::types::FixedAscii<8>,
}

#[derive(hdf5::H5Type, Clone)]
#[repr(C)]
struct LegacyVar {
    index: hdf5::types::FixedAscii<8>,
}

#[test]
fn files_from_anndata_before_0_7_are_read_and_converted() {
    common::no_hdf5_locking();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("legacy.h5ad");
    let text = |s: &str| hdf5::types::FixedAscii::from_ascii(s.as_bytes()).unwrap();
    {
        let f = hdf5::File::create(&path).unwrap();
        // 3 cells × 2 genes, CSR with h5sparse attributes, no `encoding-type` anywhere.
        let x = f.create_group("X").unwrap();
        x.new_attr::<hdf5::types::VarLenUnicode>().create("h5sparse_format").unwrap().write_scalar(&"csr".parse::<hdf5::types::VarLenUnicode>().unwrap()).unwrap();
        x.new_attr_builder().with_data(&[3i64, 2]).create("h5sparse_shape").unwrap();
        x.new_dataset_builder().with_data(&[1.0f32, 2.0, 5.0]).create("data").unwrap();
        x.new_dataset_builder().with_data(&[0i32, 1, 1]).create("indices").unwrap();
        x.new_dataset_builder().with_data(&[0i64, 1, 2, 3]).create("indptr").unwrap();
        let obs: Vec<LegacyObs> = (0..3)
            .map(|i| LegacyObs { index: text(&format!("cell{i}")), subtype: [1, 0, 1][i], depth: i as f32 * 1.5, odd: i % 2 == 1, barcode: text(["AC", "GT", "TT"][i]) })
            .collect();
        f.new_dataset_builder().with_data(&obs).create("obs").unwrap();
        let var: Vec<LegacyVar> = ["GAD1", "SLC17A7"].iter().map(|g| LegacyVar { index: text(g) }).collect();
        f.new_dataset_builder().with_data(&var).create("var").unwrap();
        let cats = [text("exc"), text("inh")];
        f.create_group("uns").unwrap().new_dataset_builder().with_data(&cats).create("subtype_categories").unwrap();
    }
    let r = inspect(&path).unwrap();
    assert_eq!((r.n_cells, r.n_genes, r.raw_counts.as_deref()), (3, 2, Some("X")));
    let subtype = r.obs.iter().find(|c| c.name == "subtype").expect("subtype column");
    assert_eq!(subtype.top, vec![("inh".to_string(), 2), ("exc".to_string(), 1)], "codes resolved through uns");
    let out = dir.path().join("legacy.zarr");
    let opts = ConvertOptions { shuffle_seed: None, ..ConvertOptions::default() };
    dataloader::convert::convert(&path, &out, &opts).unwrap();
    let s = Store::open(&out).unwrap();
    assert_eq!(s.obs_names().unwrap(), ["cell0", "cell1", "cell2"]);
    assert_eq!(s.var_names().unwrap(), ["GAD1", "SLC17A7"]);
    let obs = s.frame("obs").unwrap();
    let col = |n: &str| (0..3).map(|i| obs.column(n).expect(n).text(i)).collect::<Vec<_>>();
    assert_eq!(col("subtype"), ["inh", "exc", "inh"]);
    assert_eq!(col("depth"), ["0.0", "1.5", "3.0"]);
    assert_eq!(col("odd"), ["False", "True", "False"]);
    assert_eq!(col("barcode"), ["AC", "GT", "TT"]);
    assert_eq!(s.read_rows(0..3).unwrap().values, [1.0, 2.0, 5.0]);
}
