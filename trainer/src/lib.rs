//! Masked-bin pretraining of a transformer encoder on tokenized single-cell expression.
//!
//! Read top to bottom: `config` (every setting), `model` (the encoder), `pooling` (cell
//! vectors), `objectives` (masked, bottleneck and contrastive terms), `optim` (AdamW over flat
//! buffers, schedule, clipping), `baseline` (context-free predictors to beat), `data` and
//! `batch` (cells to device tensors), `checkpoint` and `run_dir` (exact resume), `events`,
//! `metrics` and `logging` (TensorBoard, CSV, throughput), `device` (GPU/CPU choice, MFU
//! peak), `comm` and `ddp` (data parallelism across ranks), `fault` (test-only fault
//! injection), `demo`, and `train` (the step and the loop).

pub mod baseline;
pub mod batch;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod data;
pub mod ddp;
pub mod demo;
pub mod device;
pub mod error;
pub mod events;
pub mod fault;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod objectives;
pub mod optim;
pub mod pooling;
pub mod run_dir;
pub mod train;

pub use error::{Result, TrainError};
