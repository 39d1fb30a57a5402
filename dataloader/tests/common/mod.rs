//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

use dataloader::convert::{convert, ConvertOptions};
use dataloader::synth::{self, SynthOptions};

/// Writes a synthetic file and converts it (no shuffle unless the options say otherwise).
pub fn synth_store(dir: &Path, name: &str, o: SynthOptions, opts: &ConvertOptions) -> PathBuf {
    let src = dir.join(format!("{name}.{}", if o.layout == synth::SynthLayout::Loom { "loom" } else { "h5ad" }));
    synth::write(&SynthOptions { output: src.clone(), ..o }).expect("synth");
    let out = dir.join(format!("{name}.zarr"));
    convert(&src, &out, opts).expect("convert");
    out
}

/// Runs the `neurofm-data` binary.
pub fn neurofm_data(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_neurofm-data")).args(args).output().expect("run neurofm-data")
}

/// The shared real-data directory, or `None` (with a note) outside CI when it is absent.
pub fn shared_data() -> Option<PathBuf> {
    let dir = std::env::var_os("NEUROFM_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    if dir.join("whb_cortex_L5exc_MGEinh.h5ad").exists() {
        return Some(dir);
    }
    assert!(std::env::var_os("CI").is_none(), "shared data missing in CI: {}", dir.display());
    eprintln!("note: {} not found; skipping real-data checks", dir.display());
    None
}

/// Tests fork `neurofm-data` while other test threads hold HDF5 files open; the child inherits
/// those descriptors (HDF5 opens without CLOEXEC) and with them HDF5's flock. No test writes a
/// file another reads concurrently, so HDF5's locking is turned off in test processes.
pub fn no_hdf5_locking() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("HDF5_USE_FILE_LOCKING", "FALSE"));
}
