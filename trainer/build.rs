//! Links libtorch into the binaries so they run without `LD_LIBRARY_PATH` and find CUDA.
//!
//! `tch`'s own link flags do not reach downstream binaries: without these lines a binary has no
//! rpath to libtorch and does not load `libtorch_cuda`, so a GPU would look absent. The rpath
//! points at the libtorch it was built against; `LD_LIBRARY_PATH` still overrides it, so the
//! same binary runs against another PyTorch 2.11 installation.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        // The real directory, not the `.libtorch` link inside the clone: binaries keep working
        // when the clone moves.
        let lib = std::fs::canonicalize(&lib).map(|p| p.display().to_string()).unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
