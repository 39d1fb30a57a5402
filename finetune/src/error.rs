//! Errors of fine-tuning and annotation, each with the exit code the binaries return for it.

use std::path::{Path, PathBuf};

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
    /// 2 when the user must change the input or the command; 3 for a diverged run and 4 for a
    /// failed group of ranks (as `neurofm-train`); else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            FinetuneError::BadInput { .. } | FinetuneError::Usage(_) => 2,
            FinetuneError::Train(e) => e.exit_code(),
            FinetuneError::Eval(e) => e.exit_code(),
            FinetuneError::Data(e) => e.exit_code(),
            FinetuneError::Torch(_) | FinetuneError::Io { .. } | FinetuneError::Internal(_) => 1,
        }
    }

    pub fn input(path: &Path, problem: impl Into<String>) -> Self {
        FinetuneError::BadInput { path: path.to_path_buf(), problem: problem.into() }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        FinetuneError::Io { path: path.to_path_buf(), source }
    }
}
