//! Errors of the trainer, each with the exit code the binary returns for it.

use std::path::{Path, PathBuf};

use dataloader::DataError;

/// Everything that can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A setting is missing, ill-typed or inconsistent; the message names the key and the fix.
    #[error("invalid config: {0}")]
    Config(String),

    /// A file the user gave (run directory, checkpoint, store) cannot be used as is.
    #[error("{path}: {problem}")]
    BadInput { path: PathBuf, problem: String },

    #[error(transparent)]
    Data(#[from] DataError),

    /// The requested device does not exist on this machine.
    #[error("device {requested}: {problem}")]
    Device { requested: String, problem: String },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// The loss or the gradients stopped being finite; training stops without saving.
    #[error("the training loss became {value} at step {step}; stopped without saving. {last_good}. Lower optim.lr or raise optim.warmup_steps, then resume")]
    NonFinite { step: u64, value: f64, last_good: String },

    /// The GPU ran out of memory for this batch.
    #[error("out of GPU memory at batch size {batch_size}: try train.batch_size = {suggest} with train.grad_accum = {accum} (same cells per step), or a shorter sequence ({detail})")]
    OutOfMemory { batch_size: usize, suggest: usize, accum: usize, detail: String },

    /// The data-parallel group could not form or broke (a rank missing, NCCL failing).
    #[error("distributed: {0}")]
    Distributed(String),

    /// A libtorch failure that is not the user's input.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    #[error("internal error: {0}")]
    Internal(String),
}

/// Result with `TrainError`.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    /// 2 when the user must change the input or the command, 3 for a diverged run, 4 when
    /// the group of ranks failed, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            TrainError::Config(_) | TrainError::BadInput { .. } | TrainError::Device { .. } | TrainError::OutOfMemory { .. } => 2,
            TrainError::Data(e) => e.exit_code(),
            TrainError::NonFinite { .. } => 3,
            TrainError::Distributed(_) => 4,
            TrainError::Io { .. } | TrainError::Torch(_) | TrainError::Internal(_) => 1,
        }
    }

    pub(crate) fn input(path: &Path, problem: impl Into<String>) -> Self {
        TrainError::BadInput { path: path.to_path_buf(), problem: problem.into() }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io { path: path.to_path_buf(), source }
    }
}

impl From<launcher::LaunchError> for TrainError {
    fn from(e: launcher::LaunchError) -> Self {
        match e {
            launcher::LaunchError::Env { .. } | launcher::LaunchError::Config(_) => TrainError::Config(e.to_string()),
            other => TrainError::Distributed(other.to_string()),
        }
    }
}
