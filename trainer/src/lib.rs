//! Masked-bin pretraining of a transformer encoder on tokenized single-cell expression.
//!
//! Read top to bottom: `config` (every setting), `model` (the encoder), `optim` (AdamW with
//! owned state, schedule, clipping), `baseline` (context-free predictors to beat),
//! `checkpoint` and `run_dir` (exact resume), `events` and `metrics` (TensorBoard, CSV),
//! `device` (GPU/CPU choice, MFU peak), `comm` and `ddp` (data parallelism across ranks),
//! `fault` (test-only crash injection), and `train` (the loop).

pub mod baseline;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod ddp;
pub mod device;
pub mod error;
pub mod events;
pub mod fault;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod run_dir;
pub mod train;

pub use error::{Result, TrainError};
