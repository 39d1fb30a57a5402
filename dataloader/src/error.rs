//! One error type for the data layer.
//!
//! Every variant names the file (and where it applies, the field) so a user can fix the input
//! without reading our code. `is_bad_input` decides the exit code: 2 for input a user must fix,
//! 1 for runtime failures (disk full, a bug).

use std::path::{Path, PathBuf};

use common::exit::Exit;

/// Errors from reading, converting and serving single-cell data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: file not found")]
    NotFound { path: PathBuf },

    #[error("{path}: not a readable HDF5 file ({reason}); is it truncated or another format?")]
    NotHdf5 { path: PathBuf, reason: String },

    #[error("{path}: field `{field}`: {problem}")]
    BadField { path: PathBuf, field: String, problem: String },

    #[error("{path}: {problem}")]
    BadInput { path: PathBuf, problem: String },

    #[error("{path}: already exists; pass --force to replace it")]
    OutputExists { path: PathBuf },

    #[error("{path}: store is incomplete (no `uns/neurofm`): the conversion did not finish; convert again")]
    IncompleteStore { path: PathBuf },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: HDF5 error in `{field}`: {message}")]
    Hdf5 { path: PathBuf, field: String, message: String },

    #[error("{path}: zarr error in `{field}`: {message}")]
    Zarr { path: PathBuf, field: String, message: String },

    #[error("invalid setting: {0}")]
    Config(String),

    /// A failure of ours (a worker thread died, a broken invariant): not the user's input.
    #[error("internal error: {0}")]
    Internal(String),
}

impl DataError {
    /// True when the user must change the input or the command (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, DataError::Io { .. } | DataError::Zarr { .. } | DataError::Internal(_))
    }

    pub(crate) fn field(path: &Path, field: impl Into<String>, problem: impl Into<String>) -> Self {
        DataError::BadField { path: path.to_path_buf(), field: field.into(), problem: problem.into() }
    }

    pub(crate) fn input(path: &Path, problem: impl Into<String>) -> Self {
        DataError::BadInput { path: path.to_path_buf(), problem: problem.into() }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn zarr(path: &Path, field: &str, e: impl std::fmt::Display) -> Self {
        DataError::Zarr { path: path.to_path_buf(), field: field.to_string(), message: e.to_string() }
    }
}

impl common::exit::ExitStatus for DataError {
    fn exit(&self) -> Exit {
        if self.is_bad_input() {
            Exit::BadInput
        } else {
            Exit::Failure
        }
    }
}

/// Result alias used across the crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
