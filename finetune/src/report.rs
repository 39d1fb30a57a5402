//! The end of a fine-tune (rank 0): the best checkpoint of each trained model and the
//! expression baselines scored on the test cells, then `metrics.json`, `predictions.tsv`,
//! `cells.tsv`, confusion matrices, training curves and `report.md` / `report.html` (with
//! evaluation's report and plot modules, so both reports look and read alike).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dataloader::mask::Batcher;
use evaluation::outputs;
use evaluation::plots;
use evaluation::report::{num, Block};
use ndarray::Array2;
use serde::Serialize;
use tch::Device;
use tracing::info;
use trainer::metrics::{self as run_metrics, Column};

use crate::baselines::{self, Baseline, BaselineDetail};
use crate::error::{FinetuneError, Result};
use crate::predict::{predicted, test_views, ClassScores, PerClass, Predictions};
use crate::run_files;
use crate::train::{load_best, score, Phase, PhaseOutcome, Plan};

/// One classifier's test scores in `metrics.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub name: String,
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub macro_f1: f64,
    /// F1 of class 1 in a binary task.
    pub f1_positive: Option<f64>,
    /// One-vs-rest macro ROC-AUC (binary: class 1 positive).
    pub roc_auc: Option<f64>,
    pub per_class: BTreeMap<String, PerClass>,
    /// Rows: true class, columns: predicted class (class order of `task.classes`).
    pub confusion: Vec<Vec<u64>>,
    /// What the model was (checkpoint, step) or chose (`C`, trees).
    pub detail: serde_json::Value,
}

impl Entry {
    fn new(name: &str, s: &ClassScores, classes: &[String], detail: serde_json::Value) -> Entry {
        Entry {
            name: name.to_string(),
            accuracy: s.scores.accuracy,
            balanced_accuracy: s.scores.balanced_accuracy,
            macro_f1: s.scores.macro_f1,
            f1_positive: s.scores.f1_positive,
            roc_auc: s.scores.roc_auc,
            per_class: classes.iter().cloned().zip(s.per_class.iter().cloned()).collect(),
            confusion: s.confusion.rows(),
            detail,
        }
    }
}

/// `metrics.json`.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneMetrics {
    pub model: Entry,
    /// `logistic_expression`, `random_forest`, and `from_scratch` when it was trained.
    pub baselines: BTreeMap<String, Entry>,
    pub task: TaskInfo,
    pub throughput: Throughput,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskInfo {
    pub data: PathBuf,
    pub label_col: String,
    pub classes: Vec<String>,
    pub split: String,
    pub seed: u64,
    pub fit_cells: usize,
    pub val_cells: usize,
    pub test_cells: usize,
    pub genes_in_data: usize,
    pub model_genes: usize,
    pub model_genes_missing: usize,
    pub pretrained: PathBuf,
    pub pretrained_checkpoint: PathBuf,
    pub freeze_encoder: bool,
    pub layer_decay: f64,
    pub pooling: String,
    pub layer: usize,
    /// Classifiers averaged (`train.members`).
    pub members: usize,
    /// Views of each test cell averaged (`augment.test_views`).
    pub test_views: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub device: String,
    /// Training cells per second of the fine-tune (its `throughput.json`).
    pub finetune_cells_per_s: Option<f64>,
    /// The pretraining run's own `throughput.json`, for comparison.
    pub pretraining_cells_per_s: Option<f64>,
    pub from_scratch_cells_per_s: Option<f64>,
    /// Test-cell predictions per second of the fine-tuned model.
    pub predict_cells_per_s: f64,
}

/// A classifier scored on the test cells.
struct Scored {
    key: &'static str,
    title: String,
    scores: ClassScores,
    pred: Vec<usize>,
    proba: Array2<f64>,
    detail: serde_json::Value,
}

/// Scores everything and writes the run's result files (in member 0's directory, the run's).
/// Returns `metrics.json`'s content.
pub fn finish(plan: &Plan, main: &[PhaseOutcome], control: Option<&[PhaseOutcome]>, device: Device) -> Result<FinetuneMetrics> {
    let task = &plan.task;
    let cfg = &plan.cfg;
    let classes = &task.labels.classes;
    let views = test_views(plan.pretrained.tokenizer.clone(), plan.arch.sequence, &cfg.augment, cfg.seed)?;
    let test: Vec<usize> = task.split.test.clone(); // ascending, as `predict_stream` reads
    let started = Instant::now();
    let mut scored = vec![phase_scored(plan, Phase::Finetune, main, &views, &test, device)?];
    let predict_cells_per_s = test.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
    if let Some(c) = control {
        scored.push(phase_scored(plan, Phase::FromScratch, c, &views, &test, device)?);
    }
    if cfg.baselines.logistic || cfg.baselines.random_forest {
        let x = baselines::expression(task, plan.pretrained.tokenizer.genes.len())?;
        let mut run = |b: Result<Baseline>, what: &str| -> Result<()> {
            let start = Instant::now();
            let b = b?;
            info!("{what}: macro F1 {:.3}, accuracy {:.3} ({:.1} s)", b.scores.scores.macro_f1, b.scores.scores.accuracy, start.elapsed().as_secs_f64());
            let detail = serde_json::to_value(&b.detail).map_err(|e| FinetuneError::Internal(e.to_string()))?;
            let title = match &b.detail {
                BaselineDetail::Logistic { c, .. } => format!("logistic regression on expression (C = {c})"),
                BaselineDetail::Forest { trees, max_features } => format!("random forest on expression ({trees} trees, {max_features} features per split)"),
            };
            scored.push(Scored { key: b.name, title, scores: b.scores, pred: b.pred, proba: b.proba, detail });
            Ok(())
        };
        if cfg.baselines.logistic {
            run(baselines::logistic(&x, task, cfg.seed), "logistic regression on expression")?;
        }
        if cfg.baselines.random_forest {
            run(baselines::random_forest(&x, task, cfg.baselines.forest_trees, cfg.seed), "random forest on expression")?;
        }
    }
    let out = &main[0].dir;
    let throughput = Throughput {
        device: format!("{device:?}"),
        finetune_cells_per_s: cells_per_s(out),
        pretraining_cells_per_s: plan.pretrained.cells_per_s(),
        from_scratch_cells_per_s: control.and_then(|c| cells_per_s(&c[0].dir)),
        predict_cells_per_s,
    };
    let m = FinetuneMetrics {
        model: Entry::new(&scored[0].title, &scored[0].scores, classes, scored[0].detail.clone()),
        baselines: scored[1..].iter().map(|s| (s.key.to_string(), Entry::new(&s.title, &s.scores, classes, s.detail.clone()))).collect(),
        task: task_info(plan),
        throughput,
    };
    write_tables(out, plan, &scored)?;
    let figures = write_figures(out, plan, &scored, control.map(|c| c[0].dir.as_path()))?;
    write_report(out, &m, &scored, &figures)?;
    run_files::write(out, "metrics.json", &run_files::json(&m)?)?;
    info!("wrote {}", out.join("report.html").display());
    Ok(m)
}

/// The members of a phase scored on the test cells, one by one and together (mean class
/// log-probability, `predict::combine`). The detail names member 0's checkpoint; with more
/// members it also lists each one's checkpoint and test scores.
fn phase_scored(plan: &Plan, phase: Phase, members: &[PhaseOutcome], views: &[(Batcher, u64)], test: &[usize], device: Device) -> Result<Scored> {
    let (key, mut title) = match phase {
        Phase::Finetune => ("model", "fine-tuned neurofm".to_string()),
        Phase::FromScratch => ("from_scratch", "same architecture from scratch".to_string()),
    };
    let (mut probas, mut details, mut truth) = (Vec::new(), Vec::new(), Vec::new());
    for member in members {
        let (model, ckpt, extra) = load_best(plan, &member.dir, device)?;
        let (p, s) = score(plan, &model, views, test, device)?;
        check_order(&p, &plan.task, test)?;
        details.push(serde_json::json!({
            "checkpoint": ckpt,
            "best_step": extra.best_step,
            "best_val_macro_f1": extra.best_macro_f1,
            "stopped_early": extra.stopped_early,
            "test_macro_f1": s.scores.macro_f1,
        }));
        probas.push(p.proba);
        truth = p.truth; // the same for every member: `check_order` holds their rows to the test cells'
    }
    let mut detail = details[0].clone();
    let mut averaged = Vec::new();
    if members.len() > 1 {
        averaged.push(format!("{} members", members.len()));
        detail["members"] = serde_json::Value::Array(details);
    }
    if views.len() > 1 {
        averaged.push(format!("{} test views", views.len()));
    }
    if !averaged.is_empty() {
        title = format!("{title} ({} averaged)", averaged.join(", "));
    }
    let proba = crate::predict::combine(&probas);
    let pred = predicted(&proba);
    let scores = ClassScores::of(&truth, &pred, &proba, plan.task.n_classes());
    Ok(Scored { key, title, scores, pred, proba, detail })
}

/// Predictions come back in store-row order; the test positions are ascending and so are
/// their rows, so row i of the predictions is test position i. Checked, not assumed.
fn check_order(p: &Predictions, task: &crate::task::Task, test: &[usize]) -> Result<()> {
    let expected: Vec<u32> = test.iter().map(|&i| task.labels.cells[i] as u32).collect();
    if p.rows != expected {
        return Err(FinetuneError::Internal("test predictions came back in another order than the test cells".into()));
    }
    Ok(())
}

fn cells_per_s(dir: &Path) -> Option<f64> {
    let text = std::fs::read(dir.join("throughput.json")).ok()?;
    serde_json::from_slice::<serde_json::Value>(&text).ok()?["cells_per_s"].as_f64()
}

fn task_info(plan: &Plan) -> TaskInfo {
    let (t, c) = (&plan.task, &plan.cfg);
    TaskInfo {
        data: c.task.data.clone(),
        label_col: t.labels.column.clone(),
        classes: t.labels.classes.clone(),
        split: if !t.val.is_empty() {
            format!("{}, test fraction {}; validation: {} of each class's training cells", c.task.split, c.task.test_frac, c.task.val_frac)
        } else {
            format!("{}, test fraction {}; no validation cells: every training cell fit for the fixed epochs, the last checkpoint kept", c.task.split, c.task.test_frac)
        },
        seed: c.seed,
        fit_cells: t.fit.len(),
        val_cells: t.val.len(),
        test_cells: t.split.test.len(),
        genes_in_data: t.genes.to_vocab.len(),
        model_genes: t.genes.present.len(),
        model_genes_missing: t.genes.overlap.missing,
        pretrained: plan.pretrained.run.clone(),
        pretrained_checkpoint: plan.pretrained.checkpoint.clone(),
        freeze_encoder: c.encoder.freeze,
        layer_decay: c.encoder.layer_decay,
        pooling: plan.arch.choice.pooling.name().to_string(),
        layer: plan.arch.choice.layer,
        members: c.train.members,
        test_views: c.augment.test_views,
    }
}

/// `predictions.tsv` (test cells: truth, each classifier's prediction, the model's
/// probabilities) and `cells.tsv` (every labelled cell's part).
fn write_tables(out: &Path, plan: &Plan, scored: &[Scored]) -> Result<()> {
    let t = &plan.task;
    let names = &t.obs.index;
    let classes = &t.labels.classes;
    let mut head: Vec<String> = vec!["cell".into(), "store_row".into(), "truth".into()];
    head.extend(scored.iter().map(|s| format!("pred_{}", s.key)));
    head.extend(classes.iter().map(|c| format!("p_{c}")));
    let head_ref: Vec<&str> = head.iter().map(String::as_str).collect();
    let rows = t.split.test.iter().enumerate().map(|(r, &i)| {
        let cell = t.labels.cells[i];
        let mut v = vec![names[cell].clone(), cell.to_string(), t.labels.y[i].to_string()];
        v.extend(scored.iter().map(|s| s.pred[r].to_string()));
        v.extend(scored[0].proba.row(r).iter().map(|p| format!("{p:.17e}")));
        v
    });
    outputs::write_atomic(&out.join("predictions.tsv"), &outputs::tsv(&head_ref, rows))?;
    let mut part = vec!["fit"; t.labels.cells.len()];
    for &i in &t.val {
        part[i] = "val";
    }
    for &i in &t.split.test {
        part[i] = "test";
    }
    let rows = (0..t.labels.cells.len()).map(|i| vec![names[t.labels.cells[i]].clone(), t.labels.cells[i].to_string(), classes[t.labels.y[i]].clone(), part[i].to_string()]);
    Ok(outputs::write_atomic(&out.join("cells.tsv"), &outputs::tsv(&["cell", "store_row", "label", "part"], rows))?)
}

/// Confusion matrices and training curves, with captions, in report order.
fn write_figures(out: &Path, plan: &Plan, scored: &[Scored], control: Option<&Path>) -> Result<Vec<(String, String)>> {
    let classes = &plan.task.labels.classes;
    let mut figs = Vec::new();
    for s in scored {
        let file = format!("confusion_{}.png", s.key);
        plots::confusion(&out.join(&file), &format!("Confusion matrix: {} (test cells)", s.title), &s.scores.confusion, classes)?;
        figs.push((file, format!("{} on the test cells (rows: true class, shade: row share)", s.title)));
    }
    let mut runs = vec![("fine-tune", out.to_path_buf())];
    if let Some(c) = control {
        runs.push(("from scratch", c.to_path_buf()));
    }
    let mut loss = Vec::new();
    let mut f1 = Vec::new();
    for (name, dir) in &runs {
        let Ok(rows) = run_metrics::read(&dir.join("metrics.csv")) else { continue };
        let series = |split: &str, c: Column| -> Vec<(f64, f64)> { rows.iter().filter(|r| r.split == split).filter_map(|r| r.get(c).map(|v| (r.step as f64, v))).collect() };
        loss.push((format!("{name}: train"), series("finetune", Column::Loss)));
        loss.push((format!("{name}: validation"), series("val", Column::Loss)));
        f1.push((format!("{name}: validation"), series("val", Column::MacroF1)));
    }
    if f1.iter().any(|(_, s)| !s.is_empty()) {
        let panels = [
            plots::Panel { title: "loss".into(), y_desc: "class-weighted cross-entropy".into(), series: loss },
            plots::Panel { title: "validation macro F1".into(), y_desc: "macro F1".into(), series: f1 },
        ];
        plots::panels(&out.join("training.png"), "Fine-tuning curves", "step", &panels)?;
        figs.push(("training.png".into(), "Training and validation curves from metrics.csv".into()));
    }
    Ok(figs)
}

fn write_report(out: &Path, m: &FinetuneMetrics, scored: &[Scored], figures: &[(String, String)]) -> Result<()> {
    let t = &m.task;
    let mut b = vec![Block::Heading("Task".into())];
    b.push(Block::Paragraph(format!(
        "{}: label column `{}`, {} classes. Split {}: {} fit / {} validation / {} test cells (seed {}). {} genes in the data; {} of the model's {} genes missing (left out of the sequences, not read as zero). Pretrained run {} ({}); {} pooling of layer {}; {}{}.",
        t.data.display(),
        t.label_col,
        t.classes.len(),
        t.split,
        t.fit_cells,
        t.val_cells,
        t.test_cells,
        t.seed,
        t.genes_in_data,
        t.model_genes_missing,
        t.model_genes,
        t.pretrained.display(),
        t.pretrained_checkpoint.display(),
        t.pooling,
        t.layer,
        if t.freeze_encoder { "encoder frozen, head trained".to_string() } else { format!("encoder and head trained, layer-wise learning-rate decay {}", t.layer_decay) },
        if t.members > 1 { format!("; an ensemble of {} such classifiers, each with its own seed, their class log-probabilities averaged (each member's test scores are in metrics.json)", t.members) } else { String::new() }
    )));
    b.push(Block::Heading("Fine-tuned model vs baselines (test cells)".into()));
    b.push(Block::Paragraph("Every classifier is scored on the same test cells and never sees them in training. The neural models fit on the fit cells, their checkpoint chosen as the split above says; the baselines fit on all training cells (logistic regression chooses C by cross-validation on them) and see log1p(CP10k) expression of the model's genes, not standardized.".into()));
    let head = ["classifier", "accuracy", "balanced acc.", "macro F1", "ROC-AUC"];
    let rows = scored
        .iter()
        .map(|s| vec![s.title.clone(), num(Some(s.scores.scores.accuracy)), num(Some(s.scores.scores.balanced_accuracy)), num(Some(s.scores.scores.macro_f1)), num(s.scores.scores.roc_auc)])
        .collect();
    b.push(Block::Table(head.iter().map(|s| s.to_string()).collect(), rows));
    b.push(Block::Heading("Per-class F1".into()));
    let mut head = vec!["class".to_string(), "test cells".to_string()];
    head.extend(scored.iter().map(|s| s.key.replace('_', " ")));
    let rows = t
        .classes
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let mut r = vec![c.clone(), scored[0].scores.per_class[k].support.to_string()];
            r.extend(scored.iter().map(|s| num(Some(s.scores.per_class[k].f1))));
            r
        })
        .collect();
    b.push(Block::Table(head, rows));
    b.push(Block::Heading("Throughput".into()));
    let tp = &m.throughput;
    b.push(Block::Table(
        vec!["what".into(), "cells/s".into()],
        vec![
            vec!["fine-tuning (training steps)".into(), num(tp.finetune_cells_per_s)],
            vec!["pretraining (the pretrained run's throughput.json)".into(), num(tp.pretraining_cells_per_s)],
            vec!["from scratch (training steps)".into(), num(tp.from_scratch_cells_per_s)],
            vec!["prediction (test cells)".into(), num(Some(tp.predict_cells_per_s))],
        ],
    ));
    b.push(Block::Heading("Figures".into()));
    for (file, caption) in figures {
        b.push(Block::Image { file: file.clone(), caption: caption.clone() });
    }
    let title = "neurofm fine-tuning";
    outputs::write_atomic(&out.join("report.md"), evaluation::report::markdown(title, &b).as_bytes())?;
    Ok(outputs::write_atomic(&out.join("report.html"), evaluation::report::html(title, &b, out)?.as_bytes())?)
}
