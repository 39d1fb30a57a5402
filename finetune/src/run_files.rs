//! A fine-tune run directory, self-contained so that annotation never needs the pretraining run:
//!
//! ```text
//! RUN/
//!   finetune.toml     the resolved fine-tuning config (every default written out)
//!   config.toml       the encoder's pretraining config, its [embedding] set to the fine-tune's
//!   tokenizer.json    the pretraining run's tokenizer (bins and gene order)
//!   classes.json      label column, classes, cells per class in each part
//!   checkpoints/step-NNNNNNN/{model,optimizer}.safetensors, state.json, finetune.json
//!   events.out.tfevents.*, metrics.csv, finetune.log, throughput.json
//!   metrics.json, predictions.tsv, cells.tsv, report.md, report.html, *.png
//!   members/M/        checkpoints and logs of ensemble member M ≥ 1 (train.members > 1)
//!   from-scratch/     the same for the control trained from random weights (--from-scratch)
//! ```
//!
//! `config.toml`, `tokenizer.json` and the checkpoints have the pretraining layout, so
//! `neurofm-eval --run RUN` evaluates the fine-tuned encoder's embeddings as it would a
//! pretraining run's (the head's tensors are ignored).

use std::path::{Path, PathBuf};

use dataloader::tokenize::Tokenizer;
use serde::{Deserialize, Serialize};
use trainer::checkpoint::{read_state, Checkpoints, TrainState, MODEL_FILE};
use trainer::config::TrainConfig;

use crate::config::FinetuneConfig;
use crate::error::{FinetuneError, Result};
use crate::pretrained::Architecture;

pub const FINETUNE_CONFIG: &str = "finetune.toml";
pub const ENCODER_CONFIG: &str = "config.toml";
pub const TOKENIZER: &str = "tokenizer.json";
pub const CLASSES: &str = "classes.json";
/// Fine-tuning's part of a checkpoint, beside the trainer's `state.json`.
pub const FINETUNE_STATE: &str = "finetune.json";
/// Where `--from-scratch` trains its control, inside the run directory.
pub const FROM_SCRATCH_DIR: &str = "from-scratch";

/// Where ensemble member `m` of a phase trains: member 0 in the phase's own directory (so a
/// one-member run looks as it always did), member m ≥ 1 in `members/m/` inside it.
pub fn member_dir(phase_dir: &Path, m: usize) -> PathBuf {
    if m == 0 { phase_dir.to_path_buf() } else { phase_dir.join("members").join(m.to_string()) }
}

/// `classes.json`: what the classes are and how many cells each part holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassesFile {
    pub label_col: String,
    /// Class `k` is `classes[k]`; the columns of the probabilities follow this order.
    pub classes: Vec<String>,
    pub fit: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

/// Fine-tuning's part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneState {
    pub classes: Vec<String>,
    /// Digest of the fit, validation and test cells (store rows): a resume must see the same.
    pub cells_digest: u64,
    /// Best validation macro F1 so far, and the validation loss it came with (ties go to the
    /// lower loss).
    pub best_macro_f1: Option<f64>,
    pub best_val_loss: Option<f64>,
    /// The step whose checkpoint is `best`.
    pub best_step: u64,
    /// Validations since the best one (early stopping counts them).
    pub stale_validations: u64,
    /// Training of this run is over (its last step, or stopped early).
    pub done: bool,
    pub stopped_early: bool,
    /// sha256 of the pretrained weights the encoder started from (empty when from scratch),
    /// and the settings that change what training does to them: a resume must keep both.
    #[serde(default)]
    pub pretrained_sha256: String,
    #[serde(default)]
    pub recipe: String,
}

/// A fine-tune run opened for prediction.
pub struct FinetuneRun {
    pub dir: PathBuf,
    pub config: FinetuneConfig,
    pub encoder_config: TrainConfig,
    pub tokenizer: Tokenizer,
    pub checkpoint: PathBuf,
    pub state: TrainState,
    pub finetune_state: FinetuneState,
    pub arch: Architecture,
    /// The weights of every ensemble member, member 0 (`checkpoint`'s) first; one file for a
    /// checkpoint named by path.
    pub weights: Vec<PathBuf>,
}

impl FinetuneRun {
    /// Opens `which` (`best`, `last`, a checkpoint path) of the fine-tune in `dir`; a
    /// pretraining run or any other directory is refused with what to do instead.
    pub fn open(dir: &Path, which: &str) -> Result<FinetuneRun> {
        if !dir.join(FINETUNE_CONFIG).is_file() {
            let why = if dir.join(ENCODER_CONFIG).is_file() {
                "is a pretraining run, not a fine-tune (no finetune.toml); fine-tune it first with `neurofm-finetune --pretrained DIR --data STORE --label-col COL` and annotate with that run"
            } else {
                "is not a fine-tune run directory (no finetune.toml); --model takes the directory neurofm-finetune wrote"
            };
            return Err(FinetuneError::input(dir, why));
        }
        let config = FinetuneConfig::load(Some(&dir.join(FINETUNE_CONFIG)), &[])?;
        let encoder_config = TrainConfig::load(&dir.join(ENCODER_CONFIG), &[])?;
        let ckpts = Checkpoints::new(dir);
        if matches!(which, "best" | "last") && ckpts.steps()?.is_empty() {
            return Err(FinetuneError::input(dir, "has no checkpoints: the fine-tune never validated; let neurofm-finetune finish (or resume it with --resume auto)"));
        }
        let checkpoint = ckpts.resolve(which)?;
        let state = read_state(&checkpoint)?;
        let finetune_state = read_finetune_state(&checkpoint)?;
        let tok_path = dir.join(TOKENIZER);
        if dataloader::convert::sha256_file(&tok_path)? != state.tokenizer_sha256 {
            return Err(FinetuneError::input(&tok_path, format!("is not the tokenizer checkpoint {} was trained with (sha256 differs)", checkpoint.display())));
        }
        let tokenizer = Tokenizer::load(&tok_path)?;
        let arch = Architecture::new(&config, &encoder_config, &state)?;
        let mut weights = vec![checkpoint.join(MODEL_FILE)];
        if matches!(which, "best" | "last") {
            for m in 1..config.train.members {
                let member = member_dir(dir, m);
                let ckpt = Checkpoints::new(&member).resolve(which).map_err(|_| {
                    FinetuneError::input(&member, format!("holds no `{which}` checkpoint of ensemble member {m} (train.members = {}); let neurofm-finetune finish (--resume auto)", config.train.members))
                })?;
                weights.push(ckpt.join(MODEL_FILE));
            }
        }
        Ok(FinetuneRun { dir: dir.to_path_buf(), config, encoder_config, tokenizer, checkpoint, state, finetune_state, arch, weights })
    }

    pub fn classes(&self) -> &[String] {
        &self.finetune_state.classes
    }
}

/// Reads `finetune.json` of a checkpoint; its absence means the checkpoint is not a fine-tune's.
pub fn read_finetune_state(ckpt: &Path) -> Result<FinetuneState> {
    let path = ckpt.join(FINETUNE_STATE);
    let bytes = std::fs::read(&path).map_err(|e| FinetuneError::input(ckpt, format!("is not a fine-tune checkpoint (no readable {FINETUNE_STATE}: {e})")))?;
    serde_json::from_slice(&bytes).map_err(|e| FinetuneError::input(&path, format!("not a fine-tune state: {e}")))
}

/// Writes `bytes` to `dir/name` atomically.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    Ok(dataloader::write_atomic(&dir.join(name), bytes)?)
}

/// JSON, pretty, for the run's files.
pub fn json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(|e| FinetuneError::Internal(e.to_string()))
}
