//! neurofm's data layer: single-cell files in, AnnData-compatible Zarr v3 stores out, and the
//! shard reader, tokenizers and masking that feed training. No libtorch here.
//!
//! Flow: `source` (h5ad/loom) → `convert` → `store` → `split` → `shard` → `tokenize` → `mask`.

// zarrs takes array subsets as one range per dimension: `&[a..b]` is a 1-D subset, not a mistake.
#![allow(clippy::single_range_in_vec_init)]

pub mod cells;
pub mod convert;
pub mod corpus;
pub mod csr;
pub mod error;
pub mod frame;
pub mod genes;
pub mod h5write;
pub mod inspect;
pub mod mask;
pub mod rng;
pub mod select;
pub mod shard;
pub mod source;
pub mod split;
pub mod store;
pub mod synth;
pub mod tokenize;

pub use error::{DataError, Result};

use std::path::Path;

/// Writes `bytes` to `path` via a temp file in the same directory and a rename, so readers
/// never see a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    common::atomic::write_bytes(path, bytes).map_err(|e| DataError::io(path, e))
}
