//! Errors of fine-tuning and annotation, each with the exit code the binaries return for it.

use std::path::{Path, PathBuf};

use common::exit::{Exit, ExitStatus};

/// Everything that can stop a fine-tune or an annotation.
#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    /// A file the user gave (run directory, data, checkpoint) cannot be used as is; the message
    /// names it and the fix.
    #[error("{path}: {problem}")]
    BadInput { path: PathBuf, problem: String },

    /// A setting or flag is wrong, whatever the files; the message names the key and the fix.
    #[error("{0}")]
    Usage(String),

    #[error(transparent)]
    Train(#[from] trainer::TrainError),

    #[error(transparent)]
    Eval(#[from] evaluation::EvalError),

    #[error(transparent)]
    Data(#[from] dataloader::DataError),

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("internal error: {0}")]
    Internal(String),
}

/// Result with `FinetuneError`.
pub type Result<T, E = FinetuneError> = std::result::Result<T, E>;

impl FinetuneError {
    pub fn input(path: &Path, problem: impl Into<String>) -> Self {
        FinetuneError::BadInput { path: path.to_path_buf(), problem: problem.into() }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        FinetuneError::Io { path: path.to_path_buf(), source }
    }
}

impl ExitStatus for FinetuneError {
    fn exit(&self) -> Exit {
        match self {
            FinetuneError::BadInput { .. } | FinetuneError::Usage(_) => Exit::BadInput,
            FinetuneError::Train(e) => e.exit(),
            FinetuneError::Eval(e) => e.exit(),
            FinetuneError::Data(e) => e.exit(),
            FinetuneError::Torch(_) | FinetuneError::Io { .. } | FinetuneError::Internal(_) => Exit::Failure,
        }
    }
}
