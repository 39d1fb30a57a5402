//! neurofm's data layer: single-cell files in, AnnData-compatible Zarr v3 stores out, and the
//! shard reader, tokenizers and masking that feed training. No libtorch here.

pub mod convert;
pub mod csr;
pub mod error;
pub mod frame;
pub mod inspect;
pub mod rng;
pub mod select;
pub mod source;
pub mod store;
pub mod synth;

pub use error::{DataError, Result};
