//! Identical counts stored every way a reader supports give identical stores.

mod common;

use dataloader::convert::{ConvertOptions, CountsChoice};
use dataloader::frame::{Column, Frame};
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

#[test]
fn obs_written_a_window_at_a_time_equals_the_source_in_stored_order() {
    // A source whose names repeat (and one that a renaming would take), with a categorical and
    // a string column, converted in many small windows (two groups of windows read together)
    // with a filter: the store's obs must be the source's kept rows in stored order, renamed as
    // AnnData does over the whole obs.
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("dups.h5ad");
    // Uncompressed: blocks of 8 cells would each inflate a whole gzip chunk of the matrix.
    dataloader::synth::write(&SynthOptions { compression: C::None, ..SynthOptions::new(src.clone(), 3000, 20, 3, 4) }).expect("synth");
    let names: Vec<String> = (0..3000).map(|i| if i == 7 { "c3-1".to_string() } else { format!("c{}", i % 1200) }).collect();
    let kinds: Vec<String> = (0..3000).map(|i| ["x", "y", "z"][i % 3].to_string()).collect();
    let source = Frame {
        index_name: "_index".into(),
        index: names,
        columns: vec![
            ("kind".into(), Column::categorical_from_text(kinds)),
            ("tag".into(), Column::Strings((0..3000).map(|i| format!("t{i}")).collect())),
        ],
    };
    {
        let file = hdf5::File::open_rw(&src).expect("open");
        file.unlink("obs").expect("unlink obs");
        dataloader::h5write::frame(&file, "obs", &source, &src).expect("write obs");
    }
    let out = dir.path().join("dups.zarr");
    let opts = ConvertOptions { keep: vec!["kind=x,z".parse().unwrap()], block_cells: 8, window_blocks: 2, ..ConvertOptions::default() };
    dataloader::convert::convert(&src, &out, &opts).expect("convert");

    let store = Store::open(&out).unwrap();
    let rows: Vec<usize> = store.stats().unwrap().cell_source_row.iter().map(|&r| r as usize).collect();
    let mut want = source.take(&rows);
    let renamed = want.make_index_unique();
    assert!(renamed > 0 && rows.iter().all(|r| r % 3 != 1), "the filter kept x and z; names repeat");
    assert_eq!(store.provenance.renamed_duplicate_cells, renamed);
    let got = store.frame("obs").unwrap();
    assert_eq!(got.index, want.index, "names, renamed in stored order");
    for col in ["kind", "tag"] {
        let (g, w) = (got.column(col).unwrap(), want.column(col).unwrap());
        assert_eq!((0..g.len()).map(|i| g.text(i)).collect::<Vec<_>>(), (0..w.len()).map(|i| w.text(i)).collect::<Vec<_>>(), "{col}");
    }
}
