//! `metrics.csv`: one row per training log step and per validation, readable by any tool.
//!
//! The columns are one enum, which also names the TensorBoard tags (`{split}/{column}`), so the
//! CSV and the events can never drift apart; `read` parses the file by header name for the
//! evaluation report and for tests.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

/// A value column of `metrics.csv` (after `step`, `epoch`, `split`), in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// The weighted total of the objectives (train) or the masked cross-entropy (val).
    Loss,
    Perplexity,
    MaskedAcc,
    Lr,
    GradNorm,
    CellsPerS,
    TokensPerS,
    Mfu,
    DataWaitFrac,
    /// Share of step time in gradient all-reduce (0 for one rank).
    AllreduceFrac,
    BaselinePerplexity,
    GlobalBaselinePerplexity,
    ElapsedS,
    /// Each objective's own mean (see `objectives`).
    MaskedLoss,
    BottleneckLoss,
    ContrastiveLoss,
    /// Classification scores of fine-tuning's validation (`val/macro_f1`, ...).
    Accuracy,
    BalancedAccuracy,
    MacroF1,
    DecorrelationLoss,
}

impl Column {
    /// Every column in file order (new columns go last, so positional readers keep working).
    pub const ALL: [Column; 20] = [
        Column::Loss,
        Column::Perplexity,
        Column::MaskedAcc,
        Column::Lr,
        Column::GradNorm,
        Column::CellsPerS,
        Column::TokensPerS,
        Column::Mfu,
        Column::DataWaitFrac,
        Column::AllreduceFrac,
        Column::BaselinePerplexity,
        Column::GlobalBaselinePerplexity,
        Column::ElapsedS,
        Column::MaskedLoss,
        Column::BottleneckLoss,
        Column::ContrastiveLoss,
        Column::Accuracy,
        Column::BalancedAccuracy,
        Column::MacroF1,
        Column::DecorrelationLoss,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Column::Loss => "loss",
            Column::Perplexity => "perplexity",
            Column::MaskedAcc => "masked_acc",
            Column::Lr => "lr",
            Column::GradNorm => "grad_norm",
            Column::CellsPerS => "cells_per_s",
            Column::TokensPerS => "tokens_per_s",
            Column::Mfu => "mfu",
            Column::DataWaitFrac => "data_wait_frac",
            Column::AllreduceFrac => "allreduce_frac",
            Column::BaselinePerplexity => "baseline_perplexity",
            Column::GlobalBaselinePerplexity => "global_baseline_perplexity",
            Column::ElapsedS => "elapsed_s",
            Column::MaskedLoss => "masked_loss",
            Column::BottleneckLoss => "bottleneck_loss",
            Column::ContrastiveLoss => "contrastive_loss",
            Column::Accuracy => "accuracy",
            Column::BalancedAccuracy => "balanced_accuracy",
            Column::MacroF1 => "macro_f1",
            Column::DecorrelationLoss => "decorrelation_loss",
        }
    }

    fn index(self) -> usize {
        Column::ALL.iter().position(|&c| c == self).unwrap_or(0)
    }
}

/// One row; unset cells stay empty.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub step: u64,
    pub epoch: u64,
    /// `train` or `val`.
    pub split: &'static str,
    values: [Option<f64>; Column::ALL.len()],
}

impl Row {
    pub fn new(step: u64, epoch: u64, split: &'static str) -> Row {
        Row { step, epoch, split, values: [None; Column::ALL.len()] }
    }

    /// Sets `col` (a non-finite value is kept: a NaN in the log is information).
    pub fn with(mut self, col: Column, v: f64) -> Row {
        self.values[col.index()] = Some(v);
        self
    }

    pub fn get(&self, col: Column) -> Option<f64> {
        self.values[col.index()]
    }

    /// The set cells with their TensorBoard tags.
    pub fn tagged(&self) -> impl Iterator<Item = (String, f64)> + '_ {
        Column::ALL.iter().filter_map(move |&c| self.get(c).map(|v| (format!("{}/{}", self.split, c.name()), v)))
    }

    fn line(&self) -> String {
        let cells: Vec<String> = self.values.iter().map(|v| v.map(|x| format!("{x}")).unwrap_or_default()).collect();
        format!("{},{},{},{}\n", self.step, self.epoch, self.split, cells.join(","))
    }
}

fn header() -> String {
    let names: Vec<&str> = Column::ALL.iter().map(|c| c.name()).collect();
    format!("step,epoch,split,{}\n", names.join(","))
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
        let mut kept = header();
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

/// A row read back: step, split and the values by column name (columns a file lacks, or
/// leaves empty, are absent).
#[derive(Debug, Clone, PartialEq)]
pub struct ReadRow {
    pub step: u64,
    pub split: String,
    pub values: std::collections::HashMap<String, f64>,
}

impl ReadRow {
    pub fn get(&self, col: Column) -> Option<f64> {
        self.values.get(col.name()).copied()
    }
}

/// Parses a `metrics.csv` by its header (files of older versions included).
pub fn read(path: &Path) -> Result<Vec<ReadRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let (Some(step), Some(split)) = (header.iter().position(|h| *h == "step"), header.iter().position(|h| *h == "split")) else {
        return Err(TrainError::input(path, "is not a neurofm metrics.csv (no step/split columns)"));
    };
    Ok(lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let values = header.iter().zip(&f).filter_map(|(h, v)| v.parse::<f64>().ok().map(|x| (h.to_string(), x))).collect();
            ReadRow { step: f.get(step).and_then(|s| s.parse().ok()).unwrap_or(0), split: f.get(split).unwrap_or(&"").to_string(), values }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_drops_rows_after_the_checkpoint_and_rows_read_back_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetricsCsv::open(dir.path(), None).unwrap();
        for step in 1..=4 {
            m.write(&Row::new(step, 0, "train").with(Column::Loss, 1.0 / step as f64)).unwrap();
        }
        drop(m);
        let mut m = MetricsCsv::open(dir.path(), Some(2)).unwrap();
        m.write(&Row::new(3, 0, "val").with(Column::Loss, 0.5).with(Column::BottleneckLoss, 2.0)).unwrap();
        let path = dir.path().join("metrics.csv");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().next().unwrap().split(',').count(), text.lines().nth(1).unwrap().split(',').count());
        let rows = read(&path).unwrap();
        assert_eq!(rows.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!((rows[2].split.as_str(), rows[2].get(Column::Loss), rows[2].get(Column::BottleneckLoss), rows[2].get(Column::Lr)), ("val", Some(0.5), Some(2.0), None));
        let tags: Vec<String> = Row::new(1, 0, "val").with(Column::Perplexity, 3.0).tagged().map(|(t, _)| t).collect();
        assert_eq!(tags, ["val/perplexity"]);
    }
}
