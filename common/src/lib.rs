//! What every neurofm crate does the same way, owned once: exit codes, the shared command-line
//! flags and logging set-up, writes that never leave a half-written file, and the CP10k + log1p
//! normalization. Crates keep their own error types (thiserror) and map them onto [`exit::Exit`].

pub mod atomic;
pub mod cli;
pub mod exit;
pub mod logging;
pub mod norm;
pub mod progress;
