//! Identical counts stored every way a reader supports give identical stores.

mod common;

use dataloader::convert::{ConvertOptions, CountsChoice};
use dataloader::store::Store;
use dataloader::synth::{SynthCompression as C, SynthDtype as D, SynthLayout as L, SynthLocation as W, SynthOptions};

/// Everything that must agree between stores of the same counts.
type Contents = (Vec<f32>, Vec<u32>, Vec<String>, Vec<String>, Vec<String>, Vec<f64>, Vec<i64>);

fn contents(path: &std::path::Path) -> Contents {
    let s = Store::open(path).expect("open store");
    let all = s.read_rows(0..s.n_cells()).expect("read");
    let obs = s.frame("obs").expect("obs");
    let types = obs.column("cell_type").expect("cell_type column");
    let stats = s.stats().expect("stats");
    (
        all.values,
        all.indices,
        s.obs_names().expect("obs names"),
        (0..s.n_cells()).map(|i| types.text(i)).collect(),
        s.var_names().expect("var names"),
        stats.cell_total,
        stats.gene_nnz,
    )
}

#[test]
fn every_storage_variant_gives_the_same_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = SynthOptions::new("unused".into(), 300, 120, 3, 11);
    let variants = [
        ("csr-x-f32-gzip", L::Csr, W::X, D::F32, C::Gzip),
        ("csr-x-i32-none", L::Csr, W::X, D::I32, C::None),
        ("csr-x-i64-gzip-shuffle", L::Csr, W::X, D::I64, C::GzipShuffle),
        ("csr-layer-i64-lzf", L::Csr, W::Layer, D::I64, C::Lzf),
        ("csr-raw-f64-gzip", L::Csr, W::Raw, D::F64, C::Gzip),
        ("csc-layer-i32-gzip", L::Csc, W::Layer, D::I32, C::Gzip),
        ("csc-x-f32-lzf", L::Csc, W::X, D::F32, C::Lzf),
        ("dense-x-i32-gzip", L::Dense, W::X, D::I32, C::Gzip),
        ("dense-raw-f32-none", L::Dense, W::Raw, D::F32, C::None),
        ("loom-i64-gzip", L::Loom, W::X, D::I64, C::Gzip),
    ];
    let opts = ConvertOptions { shuffle_seed: Some(5), block_cells: 40, ..ConvertOptions::default() };
    let mut reference = None;
    for (name, layout, counts_in, dtype, compression) in variants {
        let o = SynthOptions { layout, counts_in, dtype, compression, ..base.clone() };
        let store = common::synth_store(dir.path(), name, o, &opts);
        let got = contents(&store);
        let expected_source = match counts_in {
            W::X => "X",
            W::Layer => "layers/counts",
            W::Raw => "raw/X",
        };
        assert_eq!(Store::open(&store).unwrap().provenance.counts_source, expected_source, "{name}: auto picks the counts");
        match &reference {
            None => reference = Some(got),
            Some(r) => assert!(r == &got, "{name} differs from the CSR/X/f32/gzip store"),
        }
    }
}

#[test]
fn explicit_counts_source_is_honoured_and_shuffle_is_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = SynthOptions { counts_in: W::Layer, ..SynthOptions::new("unused".into(), 200, 50, 2, 3) };
    let opts = ConvertOptions {
        counts: CountsChoice::At(dataloader::source::CountsLocation::Layer("counts".into())),
        shuffle_seed: None,
        ..ConvertOptions::default()
    };
    let store = Store::open(&common::synth_store(dir.path(), "layer", o, &opts)).unwrap();
    assert_eq!(store.provenance.shuffle_seed, None);
    let rows = store.stats().unwrap().cell_source_row;
    assert_eq!(rows, (0..200).collect::<Vec<i64>>(), "--no-shuffle keeps source order");
}
