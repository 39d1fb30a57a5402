//! The evaluation's figures (PCA, t-SNE, UMAP, ROC, confusion, training curves) and their
//! captions, in report order.

use std::path::Path;

use ndarray::Array2;
use trainer::metrics::{self as run_metrics, Column};

use crate::embed::TrainedModel;
use crate::error::Result;
use crate::labels::{Labels, Split};
use crate::layout::Layout;
use crate::probe::ProbeResult;
use crate::{outputs, plots};

/// The figures written, with captions, in report order.
pub(crate) fn write_figures(out: &Path, model: &TrainedModel, labels: &Labels, split: &Split, layout: &Layout, probe: &ProbeResult, roc_curves: &[(String, Vec<(f64, f64)>)]) -> Result<Vec<(String, String)>> {
    let mut figs = Vec::new();
    let class_all: Vec<Option<usize>> = labels.y.iter().map(|&k| Some(k)).collect();
    let xy = |m: &Array2<f64>| -> Vec<(f64, f64)> { m.rows().into_iter().map(|r| (r[0], r[1])).collect() };
    let pct = |i: usize| layout.pca_ratio.get(i).map(|r| format!("PC{} ({:.1} %)", i + 1, 100.0 * r)).unwrap_or_default();
    let (p1, p2) = (pct(0), pct(1));
    plots::scatter(&out.join("pca.png"), "PCA of the embeddings", &xy(&layout.pca), &class_all, &labels.classes, (&p1, &p2))?;
    figs.push(("pca.png".into(), "PCA of the model's cell embeddings, colored by label".into()));
    let sampled: Vec<Option<usize>> = layout.cells.iter().map(|&c| Some(labels.y[c])).collect();
    plots::scatter(&out.join("tsne.png"), "t-SNE of the embeddings", &xy(&layout.tsne), &sampled, &labels.classes, ("t-SNE 1", "t-SNE 2"))?;
    figs.push(("tsne.png".into(), "t-SNE (perplexity 30) of the embeddings".into()));
    plots::scatter(&out.join("umap.png"), "UMAP of the embeddings", &xy(&layout.umap), &sampled, &labels.classes, ("UMAP 1", "UMAP 2"))?;
    figs.push(("umap.png".into(), "UMAP (15 neighbours, cosine) of the embeddings".into()));

    if labels.n_classes() == 2 {
        plots::roc(&out.join("roc.png"), "ROC of the logistic probes (test cells)", roc_curves)?;
        figs.push(("roc.png".into(), "ROC curves on the test cells: model and baselines".into()));
    } else {
        let curves: Vec<(String, Vec<(f64, f64)>)> = (0..labels.n_classes())
            .take(20)
            .map(|k| {
                let truth: Vec<bool> = split.test.iter().map(|&t| labels.y[t] == k).collect();
                (labels.classes[k].clone(), plots::roc_points(&truth, &probe.proba.column(k).to_vec()))
            })
            .collect();
        plots::roc(&out.join("roc.png"), "ROC of the model's probe, one class vs rest", &curves)?;
        figs.push(("roc.png".into(), "One-vs-rest ROC curves of the model's probe".into()));
    }
    plots::confusion(&out.join("confusion.png"), "Confusion matrix of the model's probe (test cells)", &probe.confusion, &labels.classes)?;
    let mut head = vec!["true \\ predicted".to_string()];
    head.extend(labels.classes.iter().cloned());
    let rows = probe.confusion.rows().into_iter().enumerate().map(|(t, r)| {
        let mut v = vec![labels.classes[t].clone()];
        v.extend(r.iter().map(|n| n.to_string()));
        v
    });
    let head_ref: Vec<&str> = head.iter().map(String::as_str).collect();
    outputs::write_atomic(&out.join("confusion.csv"), &outputs::csv(&head_ref, rows))?;
    figs.push(("confusion.png".into(), "Confusion matrix (rows: true class, shade: row share)".into()));

    if let Ok(rows) = run_metrics::read(&model.run.join("metrics.csv")) {
        let series = |split: &str, c: Column| -> Vec<(f64, f64)> { rows.iter().filter(|r| r.split == split).filter_map(|r| r.get(c).map(|v| (r.step as f64, v))).collect() };
        let mut ppl = vec![("validation".to_string(), series("val", Column::Perplexity))];
        let base = series("val", Column::BaselinePerplexity);
        if !base.is_empty() {
            ppl.push(("per-gene bin frequencies".to_string(), base));
        }
        let panels = [
            plots::Panel {
                title: "loss".into(),
                y_desc: "cross-entropy".into(),
                series: vec![
                    ("train (masked)".into(), series("train", Column::MaskedLoss)),
                    ("validation (masked)".into(), series("val", Column::Loss)),
                    ("train (bottleneck)".into(), series("train", Column::BottleneckLoss)),
                    ("train (contrastive)".into(), series("train", Column::ContrastiveLoss)),
                    ("train (decorrelation)".into(), series("train", Column::DecorrelationLoss)),
                ]
                .into_iter()
                .filter(|(_, s)| s.iter().any(|&(_, v)| v > 0.0))
                .collect(),
            },
            plots::Panel { title: "validation perplexity".into(), y_desc: "perplexity".into(), series: ppl },
            plots::Panel { title: "masked accuracy".into(), y_desc: "accuracy".into(), series: vec![("validation".into(), series("val", Column::MaskedAcc))] },
        ];
        if rows.iter().any(|r| r.split == "val") {
            plots::panels(&out.join("training.png"), "Training curves", "step", &panels)?;
            figs.push(("training.png".into(), "Training curves from the run's metrics.csv".into()));
        }
    }
    Ok(figs)
}
