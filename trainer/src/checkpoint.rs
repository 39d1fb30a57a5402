//! Checkpoints (DESIGN §6): `checkpoints/step-NNNNNNN/{model,optimizer}.safetensors` and
//! `state.json`, with `best` and `last` symlinks to step directories.
//!
//! A checkpoint is built in a hidden temp directory and renamed into place, and the pointers
//! are replaced by renaming a fresh symlink over them, so a crash at any moment leaves the
//! previous checkpoint intact and `last` pointing at a complete one.

use std::path::{Path, PathBuf};

use dataloader::shard::ReaderPosition;
use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, TrainConfig};
use crate::error::{Result, TrainError};
use crate::model::Vocabulary;

/// Everything besides tensors that a resumed run needs to continue identically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// The next batch to read.
    pub position: ReaderPosition,
    pub best_val_loss: Option<f64>,
    /// Shape the weights belong to.
    pub model: ModelConfig,
    pub vocab: Vocabulary,
    /// SHA-256 of the run's `tokenizer.json`.
    pub tokenizer_sha256: String,
    /// Data-parallel ranks that wrote it (resume works with any).
    pub world_size: usize,
    /// Cells per global batch (world size × batch size) that `position` counts in; 0 in
    /// checkpoints older than this field (then assumed unchanged).
    #[serde(default)]
    pub global_batch: usize,
    /// Dropout randomness is reseeded every step from (seed, step), so the step is the RNG state.
    pub rng: String,
}

/// Refuses to resume a checkpoint whose model shape or tokenizer differs from the run's;
/// returns the run's tokenizer (`tokenizer` is the run directory's `tokenizer.json`).
pub fn check_resume_compatible(cfg: &TrainConfig, ckpt: &Path, state: &TrainState, tokenizer: &Path) -> Result<dataloader::tokenize::Tokenizer> {
    if state.model != cfg.model {
        let old = toml::to_string(&state.model).unwrap_or_default();
        return Err(TrainError::input(ckpt, format!("was trained with a different model shape; the [model] section must be unchanged to resume. Checkpoint's:\n{old}")));
    }
    let sha = dataloader::convert::sha256_file(tokenizer)?;
    if sha != state.tokenizer_sha256 {
        return Err(TrainError::input(tokenizer, format!("is not the tokenizer checkpoint {} was trained with (sha256 differs); resume in the original run directory", ckpt.display())));
    }
    let t = dataloader::tokenize::Tokenizer::load(tokenizer)?;
    if !t.is_ranked() && t.vocab.n_bins != cfg.tokenizer.n_bins {
        return Err(TrainError::Config(format!("tokenizer.n_bins = {} but the run being resumed used {}; resume with its config", cfg.tokenizer.n_bins, t.vocab.n_bins)));
    }
    Ok(t)
}

/// File names inside a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";

/// The `checkpoints/` directory of a run.
pub struct Checkpoints {
    pub dir: PathBuf,
}

impl Checkpoints {
    pub fn new(run_dir: &Path) -> Checkpoints {
        Checkpoints { dir: run_dir.join("checkpoints") }
    }

    /// Writes a checkpoint with `write_tensors(dir)` filling in the tensor files, then points
    /// `last` (and `best` when `is_best`) at it and removes step directories beyond `keep_last`.
    pub fn save(&self, state: &TrainState, is_best: bool, keep_last: usize, write_tensors: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir).map_err(|e| TrainError::io(&self.dir, e))?;
        let name = format!("step-{:07}", state.step);
        let dst = self.dir.join(&name);
        let tmp = common::atomic::temp_beside(&dst);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        let filled = write_tensors(&tmp).and_then(|()| {
            let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::Internal(e.to_string()))?;
            std::fs::write(tmp.join(STATE_FILE), json).map_err(|e| TrainError::io(&tmp, e))
        });
        if let Err(e) = filled {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if dst.exists() {
            std::fs::remove_dir_all(&dst).map_err(|e| TrainError::io(&dst, e))?;
        }
        std::fs::rename(&tmp, &dst).map_err(|e| TrainError::io(&dst, e))?;
        self.point("last", &name)?;
        if is_best {
            self.point("best", &name)?;
        }
        self.prune(keep_last)?;
        Ok(dst)
    }

    /// Atomically makes `checkpoints/<pointer>` a relative symlink to `target`.
    fn point(&self, pointer: &str, target: &str) -> Result<()> {
        let dst = self.dir.join(pointer);
        let link = |tmp: &Path| {
            let _ = std::fs::remove_file(tmp);
            std::os::unix::fs::symlink(target, tmp).map_err(|e| TrainError::io(tmp, e))
        };
        common::atomic::write_via_temp(&dst, link, TrainError::io)
    }

    /// Step directories, oldest first.
    pub fn steps(&self) -> Result<Vec<PathBuf>> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Ok(Vec::new()) };
        let mut out: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-")))
            .collect();
        out.sort();
        Ok(out)
    }

    fn prune(&self, keep_last: usize) -> Result<()> {
        let best = std::fs::canonicalize(self.dir.join("best")).ok();
        let steps = self.steps()?;
        let n_old = steps.len().saturating_sub(keep_last.max(1));
        for old in &steps[..n_old] {
            if std::fs::canonicalize(old).ok() != best {
                std::fs::remove_dir_all(old).map_err(|e| TrainError::io(old, e))?;
            }
        }
        Ok(())
    }

    /// The newest complete checkpoint: `last` if it is readable, else the newest step
    /// directory whose state loads.
    pub fn newest(&self) -> Option<PathBuf> {
        let last = self.dir.join("last");
        if read_state(&last).is_ok() {
            return std::fs::canonicalize(last).ok();
        }
        self.steps().ok()?.into_iter().rev().find(|p| read_state(p).is_ok())
    }

    /// `best`, `last`, or a path, as a checkpoint directory that exists.
    pub fn resolve(&self, which: &str) -> Result<PathBuf> {
        let p = match which {
            "best" | "last" => self.dir.join(which),
            other => PathBuf::from(other),
        };
        read_state(&p)?;
        std::fs::canonicalize(&p).map_err(|e| TrainError::io(&p, e))
    }
}

/// Reads `state.json` of a checkpoint directory, checking its tensor files exist.
pub fn read_state(ckpt: &Path) -> Result<TrainState> {
    let path = ckpt.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|e| TrainError::input(ckpt, format!("not a checkpoint directory (no readable {STATE_FILE}: {e})")))?;
    let state: TrainState = serde_json::from_slice(&bytes).map_err(|e| TrainError::input(&path, format!("not a neurofm checkpoint state: {e}")))?;
    for f in [MODEL_FILE, OPTIMIZER_FILE] {
        if !ckpt.join(f).is_file() {
            return Err(TrainError::input(ckpt, format!("checkpoint lacks {f}")));
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> TrainState {
        TrainState {
            step,
            position: ReaderPosition { epoch: 0, batch: step as usize },
            best_val_loss: None,
            model: ModelConfig::default(),
            vocab: Vocabulary { n_genes: 3, n_bins: 5, ranked: false },
            tokenizer_sha256: "x".into(),
            world_size: 1,
            global_batch: 4,
            rng: "per-step".into(),
        }
    }

    fn touch(dir: &Path) -> Result<()> {
        for f in [MODEL_FILE, OPTIMIZER_FILE] {
            std::fs::write(dir.join(f), b"t").map_err(|e| TrainError::io(dir, e))?;
        }
        Ok(())
    }

    #[test]
    fn keeps_last_k_and_best_and_points_at_complete_checkpoints() {
        let run = tempfile::tempdir().unwrap();
        let c = Checkpoints::new(run.path());
        assert!(c.newest().is_none());
        c.save(&state(1), true, 2, touch).unwrap();
        for s in 2..=5 {
            c.save(&state(s), false, 2, touch).unwrap();
        }
        let names: Vec<String> = c.steps().unwrap().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["step-0000001", "step-0000004", "step-0000005"]);
        assert_eq!(read_state(&c.resolve("best").unwrap()).unwrap().step, 1);
        assert_eq!(read_state(&c.newest().unwrap()).unwrap().step, 5);
        // A failed write leaves the previous checkpoint as the newest.
        let failed = c.save(&state(6), false, 2, |_| Err(TrainError::Internal("disk full".into())));
        assert!(failed.is_err());
        assert_eq!(read_state(&c.newest().unwrap()).unwrap().step, 5);
        assert_eq!(std::fs::read_dir(&c.dir).unwrap().count(), 5, "no temp directory left behind");
        assert!(c.resolve("nowhere").is_err());
    }
}
