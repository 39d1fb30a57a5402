//! Errors of evaluation, each with the exit code `neurofm-eval` returns for it.

use std::path::{Path, PathBuf};

use common::exit::{Exit, ExitStatus};

/// Everything that can stop an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file or flag the user gave cannot be used as is; the message names it and the fix.
    #[error("{path}: {problem}")]
    BadInput { path: PathBuf, problem: String },

    /// A flag's value is wrong, whatever the files.
    #[error("{0}")]
    Usage(String),

    #[error(transparent)]
    Data(#[from] dataloader::DataError),

    #[error(transparent)]
    Train(#[from] trainer::TrainError),

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("internal error: {0}")]
    Internal(String),
}

/// Result with `EvalError`.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

impl EvalError {
    pub fn input(path: &Path, problem: impl Into<String>) -> Self {
        EvalError::BadInput { path: path.to_path_buf(), problem: problem.into() }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        EvalError::Io { path: path.to_path_buf(), source }
    }
}

impl ExitStatus for EvalError {
    fn exit(&self) -> Exit {
        match self {
            EvalError::BadInput { .. } | EvalError::Usage(_) => Exit::BadInput,
            EvalError::Data(e) => e.exit(),
            EvalError::Train(e) => e.exit(),
            EvalError::Torch(_) | EvalError::Io { .. } | EvalError::Internal(_) => Exit::Failure,
        }
    }
}
