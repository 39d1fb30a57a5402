//! Errors of the trainer, each with the exit code the binary returns for it.

use std::path::{Path, PathBuf};

use common::exit::{Exit, ExitStatus};

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
    pub(crate) fn input(path: &Path, problem: impl Into<String>) -> Self {
        TrainError::BadInput { path: path.to_path_buf(), problem: problem.into() }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io { path: path.to_path_buf(), source }
    }
}

impl ExitStatus for TrainError {
    fn exit(&self) -> Exit {
        match self {
            TrainError::Config(_) | TrainError::BadInput { .. } | TrainError::Device { .. } | TrainError::OutOfMemory { .. } => Exit::BadInput,
            TrainError::Data(e) => e.exit(),
            TrainError::NonFinite { .. } => Exit::Diverged,
            TrainError::Distributed(_) => Exit::GroupFailed,
            TrainError::Io { .. } | TrainError::Torch(_) | TrainError::Internal(_) => Exit::Failure,
        }
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
