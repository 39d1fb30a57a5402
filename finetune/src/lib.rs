//! Fine-tuning a pretrained neurofm encoder into a cell-type classifier, and annotating new
//! cells with it (DESIGN §9).
//!
//! Read top to bottom: `config` (every setting), `pretrained` (the run a fine-tune starts
//! from, and the classifier's shape), `task` (labelled cells, the test split shared with
//! `neurofm-eval`, the validation carve, batches), `classifier` (encoder + pooling + MLP head
//! in one `VarStore`), `train` (the loop, on the trainer's AdamW, DDP, checkpoints and logs),
//! `predict` (batched inference and scores), `baselines` and `forest` (what the model must
//! beat), `report` (metrics.json and the report), `run_files` (a fine-tune run's directory),
//! `annotate` (labels for new data).

pub mod annotate;
pub mod baselines;
pub mod classifier;
pub mod config;
pub mod error;
pub mod forest;
pub mod predict;
pub mod pretrained;
pub mod report;
pub mod run_files;
pub mod task;
pub mod train;

pub use error::{FinetuneError, Result};
