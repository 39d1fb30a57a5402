//! The run directory (DESIGN §6) and the decision to start fresh or resume.

use std::path::{Path, PathBuf};

use crate::checkpoint::{read_state, Checkpoints};
use crate::error::{Result, TrainError};

/// `--resume`: never, from the newest valid checkpoint of the run, or from a checkpoint path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    No,
    Auto,
    Path(PathBuf),
}

impl std::str::FromStr for Resume {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "auto" => Resume::Auto,
            "no" | "never" => Resume::No,
            path => Resume::Path(PathBuf::from(path)),
        })
    }
}

/// A run directory ready to be written, and the checkpoint to continue from, if any.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
    pub resume_from: Option<PathBuf>,
}

impl RunDir {
    /// Creates or reopens `path`. An existing run is only continued with `--resume` and only
    /// replaced with `force` (and then only if it looks like a run directory).
    pub fn prepare(path: &Path, resume: &Resume, force: bool) -> Result<RunDir> {
        let non_empty = std::fs::read_dir(path).map(|mut d| d.next().is_some()).unwrap_or(false);
        let resume_from = match resume {
            Resume::Path(p) => {
                read_state(p)?;
                Some(std::fs::canonicalize(p).map_err(|e| TrainError::io(p, e))?)
            }
            Resume::Auto => Checkpoints::new(path).newest(),
            Resume::No if non_empty && force => {
                if !path.join("config.toml").is_file() {
                    return Err(TrainError::input(path, "does not look like a neurofm run directory (no config.toml); refusing to delete it with --force"));
                }
                std::fs::remove_dir_all(path).map_err(|e| TrainError::io(path, e))?;
                None
            }
            Resume::No if non_empty => {
                return Err(TrainError::input(path, "run directory already exists; pass --resume auto to continue it, or --force to delete it and start over"));
            }
            Resume::No => None,
        };
        std::fs::create_dir_all(path).map_err(|e| TrainError::io(path, e))?;
        Ok(RunDir { path: path.to_path_buf(), resume_from })
    }

    /// Opens the directory rank 0 prepared, for the other ranks of a group (after a barrier,
    /// so they see the same checkpoints).
    pub fn join(path: &Path, resume: &Resume) -> Result<RunDir> {
        if !path.is_dir() {
            return Err(TrainError::input(path, "rank 0 did not create this run directory; every rank must see the same file system"));
        }
        let resume_from = match resume {
            Resume::Path(p) => Some(std::fs::canonicalize(p).map_err(|e| TrainError::io(p, e))?),
            Resume::Auto => Checkpoints::new(path).newest(),
            Resume::No => None,
        };
        Ok(RunDir { path: path.to_path_buf(), resume_from })
    }

    /// The tokenizer of the run being resumed: this run's, else the checkpoint's own run's.
    pub fn tokenizer_path(&self) -> PathBuf {
        let here = self.path.join("tokenizer.json");
        match &self.resume_from {
            Some(ckpt) if !here.exists() => ckpt.parent().and_then(Path::parent).map(|run| run.join("tokenizer.json")).unwrap_or(here),
            _ => here,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::exit::ExitStatus;

    #[test]
    fn existing_runs_need_resume_or_force() {
        let root = tempfile::tempdir().unwrap();
        let run = root.path().join("r");
        RunDir::prepare(&run, &Resume::No, false).unwrap();
        std::fs::write(run.join("config.toml"), "").unwrap();
        let e = RunDir::prepare(&run, &Resume::No, false).unwrap_err();
        assert!(e.to_string().contains("--resume auto") && e.exit_code() == 2, "{e}");
        assert!(RunDir::prepare(&run, &Resume::Auto, false).unwrap().resume_from.is_none());
        RunDir::prepare(&run, &Resume::No, true).unwrap();
        assert!(!run.join("config.toml").exists());
        // --force never deletes a directory that is not a run.
        std::fs::write(run.join("thesis.tex"), "").unwrap();
        assert!(RunDir::prepare(&run, &Resume::No, true).unwrap_err().to_string().contains("refusing"));
        assert!(run.join("thesis.tex").exists());
    }
}
