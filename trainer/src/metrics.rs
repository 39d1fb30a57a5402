//! `metrics.csv`: one row per training log step and per validation, readable by any tool
//! (evaluation plots its training curves from it).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

const COLUMNS: [&str; 16] = [
    "step",
    "epoch",
    "split",
    "loss",
    "perplexity",
    "masked_acc",
    "lr",
    "grad_norm",
    "cells_per_s",
    "tokens_per_s",
    "mfu",
    "data_wait_frac",
    "allreduce_frac",
    "baseline_perplexity",
    "global_baseline_perplexity",
    "elapsed_s",
];

/// One row; `None` cells stay empty.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub step: u64,
    pub epoch: u64,
    pub split: &'static str,
    pub loss: Option<f64>,
    pub perplexity: Option<f64>,
    pub masked_acc: Option<f64>,
    pub lr: Option<f64>,
    pub grad_norm: Option<f64>,
    pub cells_per_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub mfu: Option<f64>,
    pub data_wait_frac: Option<f64>,
    /// Share of step time in gradient all-reduce (0 for one rank).
    pub allreduce_frac: Option<f64>,
    pub baseline_perplexity: Option<f64>,
    pub global_baseline_perplexity: Option<f64>,
    pub elapsed_s: Option<f64>,
}

impl Row {
    fn line(&self) -> String {
        let opt = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_default();
        let cells = [
            self.loss,
            self.perplexity,
            self.masked_acc,
            self.lr,
            self.grad_norm,
            self.cells_per_s,
            self.tokens_per_s,
            self.mfu,
            self.data_wait_frac,
            self.allreduce_frac,
            self.baseline_perplexity,
            self.global_baseline_perplexity,
            self.elapsed_s,
        ]
        .map(opt);
        format!("{},{},{},{}\n", self.step, self.epoch, self.split, cells.join(","))
    }
}

/// Appends rows to a run's `metrics.csv`.
pub struct MetricsCsv {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsCsv {
    /// Opens `metrics.csv` in `run_dir`. Rows after `keep_through_step` (written by a run that
    /// died after its last checkpoint) are dropped, so a resumed run's file has each step once.
    pub fn open(run_dir: &Path, keep_through_step: Option<u64>) -> Result<MetricsCsv> {
        let path = run_dir.join("metrics.csv");
        let mut kept = format!("{}\n", COLUMNS.join(","));
        if let (Some(last), Ok(old)) = (keep_through_step, std::fs::read_to_string(&path)) {
            for line in old.lines().skip(1) {
                if line.split(',').next().and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s <= last) {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        dataloader::write_atomic(&path, kept.as_bytes())?;
        let file = OpenOptions::new().append(true).open(&path).map_err(|e| TrainError::io(&path, e))?;
        Ok(MetricsCsv { path, out: BufWriter::new(file) })
    }

    pub fn write(&mut self, row: &Row) -> Result<()> {
        self.out.write_all(row.line().as_bytes()).map_err(|e| TrainError::io(&self.path, e))?;
        self.out.flush().map_err(|e| TrainError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_drops_rows_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetricsCsv::open(dir.path(), None).unwrap();
        for step in 1..=4 {
            m.write(&Row { step, split: "train", loss: Some(1.0 / step as f64), ..Row::default() }).unwrap();
        }
        drop(m);
        let mut m = MetricsCsv::open(dir.path(), Some(2)).unwrap();
        m.write(&Row { step: 3, split: "val", loss: Some(0.5), ..Row::default() }).unwrap();
        let text = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        let steps: Vec<&str> = text.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
        assert_eq!(steps, ["1", "2", "3"]);
        assert_eq!(text.lines().next().unwrap().split(',').count(), text.lines().nth(1).unwrap().split(',').count());
    }
}
