//! Bad input: exit code 2, a message naming the file and the field, and nothing left behind.

mod common;

use std::path::{Path, PathBuf};

use dataloader::synth::{self, SynthCompression, SynthOptions};

const CELLS: usize = 60;
const GENES: usize = 30;

/// A valid uncompressed CSR h5ad to corrupt.
fn valid(dir: &Path, name: &str) -> PathBuf {
    common::no_hdf5_locking();
    let p = dir.join(name);
    let o = SynthOptions { compression: SynthCompression::None, ..SynthOptions::new(p.clone(), CELLS, GENES, 2, 1) };
    synth::write(&o).expect("synth");
    p
}

/// Runs `convert`, expects exit 2 with every `needles` in stderr and no output or temp files.
fn refused(input: &Path, extra: &[&str], needles: &[&str]) {
    let dir = input.parent().expect("parent");
    let out = dir.join("out.zarr");
    let mut args = vec!["convert", "-q", input.to_str().expect("utf8"), out.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    let o = common::neurofm_data(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "exit code for {needles:?}; stderr: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks `{n}`: {stderr}");
    }
    assert!(!out.exists(), "output left behind");
    let leftovers: Vec<_> = std::fs::read_dir(dir).expect("list").flatten().filter(|e| e.file_name().to_string_lossy().contains(".tmp-")).collect();
    assert!(leftovers.is_empty(), "temp files left behind: {leftovers:?}");
}

fn edit(path: &Path, f: impl FnOnce(&hdf5::File)) {
    common::no_hdf5_locking();
    let file = hdf5::File::open_rw(path).expect("open_rw");
    f(&file);
}

#[test]
fn missing_file_not_hdf5_and_truncated() {
    let dir = tempfile::tempdir().unwrap();
    refused(&dir.path().join("absent.h5ad"), &[], &["absent.h5ad", "not found"]);
    let text = dir.path().join("text.h5ad");
    std::fs::write(&text, "cell,gene\n1,2\n").unwrap();
    refused(&text, &[], &["text.h5ad", "not a readable HDF5 file"]);
    let p = valid(dir.path(), "trunc.h5ad");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    refused(&p, &[], &["trunc.h5ad"]);
}

#[test]
fn no_x() {
    let dir = tempfile::tempdir().unwrap();
    common::no_hdf5_locking();
    let p = dir.path().join("nox.h5ad");
    hdf5::File::create(&p).unwrap().create_group("obs").unwrap();
    refused(&p, &[], &["nox.h5ad", "`X`", "missing"]);
}

#[test]
fn broken_indptr() {
    let dir = tempfile::tempdir().unwrap();
    let p = valid(dir.path(), "mono.h5ad");
    edit(&p, |f| {
        let ds = f.dataset("X/indptr").unwrap();
        let v: Vec<i64> = ds.read_raw().unwrap();
        ds.write_slice(&[v[4] - 1], 5..6).unwrap();
    });
    refused(&p, &[], &["X/indptr", "not monotonic"]);

    let p = valid(dir.path(), "len.h5ad");
    edit(&p, |f| {
        let v: Vec<i64> = f.dataset("X/indptr").unwrap().read_raw().unwrap();
        f.unlink("X/indptr").unwrap();
        f.group("X").unwrap().new_dataset_builder().with_data(&v[..CELLS]).create("indptr").unwrap();
    });
    refused(&p, &[], &["X/indptr", "entries", "shape"]);
}

#[test]
fn shape_attribute_disagrees_with_arrays() {
    let dir = tempfile::tempdir().unwrap();
    let p = valid(dir.path(), "shape.h5ad");
    edit(&p, |f| {
        let g = f.group("X").unwrap();
        g.delete_attr("shape").unwrap();
        g.new_attr_builder().with_data(&[(CELLS + 10) as i64, GENES as i64]).create("shape").unwrap();
    });
    refused(&p, &[], &["shape.h5ad", "shape"]);
}

#[test]
fn indices_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let p = valid(dir.path(), "idx.h5ad");
    edit(&p, |f| f.dataset("X/indices").unwrap().write_slice(&[(GENES + 5) as i32], 0..1).unwrap());
    refused(&p, &[], &["X/indices", "out of range", "35"]);
}

#[test]
fn negative_nan_infinite_values_name_the_cell() {
    for (name, value, needle) in [("neg.h5ad", -1.0f32, "negative value"), ("nan.h5ad", f32::NAN, "NaN"), ("inf.h5ad", f32::INFINITY, "inf")] {
        let dir = tempfile::tempdir().unwrap();
        let p = valid(dir.path(), name);
        edit(&p, |f| f.dataset("X/data").unwrap().write_slice(&[value], 0..1).unwrap());
        refused(&p, &[], &[name, "field `X`", needle, "cell `cell_0`"]);
    }
}

#[test]
fn non_integer_values_need_the_flag_and_say_how_many() {
    let dir = tempfile::tempdir().unwrap();
    let p = valid(dir.path(), "frac.h5ad");
    edit(&p, |f| {
        let ds = f.dataset("X/data").unwrap();
        let mut v: Vec<f32> = ds.read_raw().unwrap();
        let n = v.len();
        for x in v.iter_mut().take(n / 4) {
            *x += 0.5;
        }
        ds.write_slice(&v, 0..n).unwrap();
    });
    refused(&p, &[], &["frac.h5ad", "field `X`", "25.0% non-integer", "--allow-non-integer"]);
    let out = dir.path().join("ok.zarr");
    let o = common::neurofm_data(&["convert", "-q", p.to_str().unwrap(), out.to_str().unwrap(), "--allow-non-integer"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn keep_filters_that_match_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = valid(dir.path(), "keep.h5ad");
    refused(&p, &["--keep", "tissue=cortex"], &["obs/tissue", "no such column", "cell_type"]);
    refused(&p, &["--keep", "cell_type=neuron"], &["obs/cell_type", "`neuron`", "type_0"]);
    refused(&p, &["--keep", "cell_type=type_0", "--keep", "cell_type=type_1"], &["zero cells left"]);
}

#[test]
fn existing_output_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let p = valid(dir.path(), "force.h5ad");
    let out = dir.path().join("out.zarr");
    let run = |extra: &[&str]| {
        let mut args = vec!["convert", "-q", p.to_str().unwrap(), out.to_str().unwrap()];
        args.extend_from_slice(extra);
        common::neurofm_data(&args)
    };
    assert!(run(&[]).status.success());
    let again = run(&[]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(dataloader::store::Store::open(&out).is_ok(), "the existing store is untouched");
    assert!(run(&["--force", "--no-shuffle"]).status.success());
    assert_eq!(dataloader::store::Store::open(&out).unwrap().provenance.shuffle_seed, None, "replaced");
}

#[test]
fn incomplete_store_is_refused_by_the_reader() {
    let dir = tempfile::tempdir().unwrap();
    let p = valid(dir.path(), "inc.h5ad");
    let out = dir.path().join("inc.zarr");
    assert!(common::neurofm_data(&["convert", "-q", p.to_str().unwrap(), out.to_str().unwrap()]).status.success());
    std::fs::remove_dir_all(out.join("uns/neurofm/provenance")).unwrap();
    let e = dataloader::store::Store::open(&out).err().expect("refused");
    assert!(e.is_bad_input() && e.to_string().contains("incomplete"), "{e}");
}
