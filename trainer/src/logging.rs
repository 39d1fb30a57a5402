//! What rank 0 writes while training: TensorBoard events, `metrics.csv` rows, the progress bar
//! and `throughput.json`; and the per-step timings they are computed from.

use std::path::Path;

use crate::ddp::CommCost;
use crate::device::Peak;
use crate::error::Result;
use crate::events::EventWriter;
use crate::metrics::{Column, MetricsCsv, Row};

/// Events and metrics.csv, written by rank 0 only (other ranks get no-ops).
pub struct RunLog {
    events: Option<EventWriter>,
    csv: Option<MetricsCsv>,
}

impl RunLog {
    pub fn open(lead: bool, run: &Path, resumed_at: Option<u64>) -> Result<RunLog> {
        if !lead {
            return Ok(RunLog { events: None, csv: None });
        }
        Ok(RunLog { events: Some(EventWriter::create(run)?), csv: Some(MetricsCsv::open(run, resumed_at)?) })
    }

    pub fn text(&mut self, tag: &str, step: u64, text: &str) -> Result<()> {
        self.events.as_mut().map_or(Ok(()), |e| e.text(tag, step, text))
    }

    /// Writes a metrics.csv row and its TensorBoard scalars, then flushes the events.
    pub fn row(&mut self, row: &Row) -> Result<()> {
        if let Some(e) = self.events.as_mut() {
            for (tag, v) in row.tagged() {
                e.scalar(&tag, row.step, v)?;
            }
        }
        if let Some(c) = self.csv.as_mut() {
            c.write(row)?;
        }
        self.flush()
    }

    pub fn flush(&mut self) -> Result<()> {
        self.events.as_mut().map_or(Ok(()), EventWriter::flush)
    }
}

/// The training bar (rank 0 only, when asked for), resumed at step `at`.
pub fn progress_bar(enabled: bool, total: u64, at: u64) -> Option<indicatif::ProgressBar> {
    enabled.then(|| {
        let bar = common::progress::bar(total, "steps");
        bar.set_position(at);
        bar
    })
}

/// Logs `msg` at info level above the progress bar, if one is drawn (so the bar is not torn).
pub fn info_above(bar: Option<&indicatif::ProgressBar>, msg: &str) {
    match bar {
        Some(bar) => common::progress::info_above(bar, msg),
        None => tracing::info!("{msg}"),
    }
}

/// Timings, sizes and losses of one optimizer step (cells, tokens and FLOPs of the group).
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub cells: usize,
    pub tokens: usize,
    pub flops: f64,
    pub data_wait: f64,
    pub compute: f64,
    /// Gradient all-reduce and step sums across ranks.
    pub comm: f64,
    pub optimizer: f64,
    pub loss: f64,
    pub masked_loss: f64,
    pub bottleneck_loss: f64,
    pub contrastive_loss: f64,
    pub decorrelation_loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

/// Steps since the last log row (or over the whole run). Rates use step time only, so
/// validation and checkpoints do not count against throughput.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    pub steps: u64,
    pub sum: StepStats,
}

impl Window {
    pub fn add(&mut self, s: &StepStats) {
        let t = &mut self.sum;
        self.steps += 1;
        t.cells += s.cells;
        t.tokens += s.tokens;
        t.flops += s.flops;
        t.data_wait += s.data_wait;
        t.compute += s.compute;
        t.comm += s.comm;
        t.optimizer += s.optimizer;
        t.loss += s.loss;
        t.masked_loss += s.masked_loss;
        t.bottleneck_loss += s.bottleneck_loss;
        t.contrastive_loss += s.contrastive_loss;
        t.decorrelation_loss += s.decorrelation_loss;
        (t.grad_norm, t.lr) = (s.grad_norm, s.lr);
    }

    pub fn seconds(&self) -> f64 {
        (self.sum.data_wait + self.sum.compute + self.sum.comm + self.sum.optimizer).max(1e-9)
    }

    pub fn cells_per_s(&self) -> f64 {
        self.sum.cells as f64 / self.seconds()
    }

    /// The training row; losses are means over the window's steps. `group_peak`: the peak of
    /// all ranks together.
    pub fn row(&self, step: u64, epoch: u64, group_peak: f64, elapsed: f64) -> Row {
        let (t, secs, n) = (&self.sum, self.seconds(), self.steps.max(1) as f64);
        Row::new(step, epoch, "train")
            .with(Column::Loss, t.loss / n)
            .with(Column::MaskedLoss, t.masked_loss / n)
            .with(Column::BottleneckLoss, t.bottleneck_loss / n)
            .with(Column::ContrastiveLoss, t.contrastive_loss / n)
            .with(Column::DecorrelationLoss, t.decorrelation_loss / n)
            .with(Column::Lr, t.lr)
            .with(Column::GradNorm, t.grad_norm)
            .with(Column::CellsPerS, t.cells as f64 / secs)
            .with(Column::TokensPerS, t.tokens as f64 / secs)
            .with(Column::Mfu, t.flops / secs / group_peak)
            .with(Column::DataWaitFrac, t.data_wait / secs)
            .with(Column::AllreduceFrac, t.comm / secs)
            .with(Column::ElapsedS, elapsed)
    }

    /// Throughput summary written to `throughput.json` (what `make bench-train` prints).
    /// Cells, tokens and FLOPs are summed over ranks; times are rank 0's.
    pub fn summary(&self, peak: &Peak, comm: &CommCost, world: usize, gpu: bool) -> serde_json::Value {
        let (t, secs) = (&self.sum, self.seconds());
        let per_step_ms = |x: f64| 1e3 * x / self.steps.max(1) as f64;
        let group_peak = peak.flops * world as f64;
        serde_json::json!({
            "steps_timed": self.steps,
            "cells_per_s": t.cells as f64 / secs,
            "tokens_per_s": t.tokens as f64 / secs,
            "step_ms": {
                "data_wait": per_step_ms(t.data_wait),
                "forward_backward": per_step_ms(t.compute),
                "allreduce": per_step_ms(t.comm),
                "optimizer": per_step_ms(t.optimizer),
            },
            "step_ms_note": if gpu {
                "kernels run asynchronously: forward_backward is the time to enqueue them, and the wait for them lands in allreduce (several ranks) or optimizer (one rank, which reads the step's numbers once); the step total is exact"
            } else {
                "CPU: each phase is timed exactly"
            },
            "world_size": world,
            "allreduce": {
                "bytes_per_step": comm.bytes_per_step,
                "buckets": comm.buckets,
                "share_of_step": t.comm / secs,
            },
            "tflops_achieved": t.flops / secs / 1e12,
            "mfu": t.flops / secs / group_peak,
            "peak_tflops": peak.flops / 1e12,
            "peak_kind": peak.kind,
            "peak_source": peak.source,
            "max_rss_mb": max_rss_mb(),
        })
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), in MB.
pub fn max_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
