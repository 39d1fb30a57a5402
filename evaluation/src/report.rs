//! The report: one list of blocks rendered twice, as `report.md` (images linked) and as a
//! self-contained `report.html` (images embedded as base64), so both always say the same.

use std::path::Path;

use base64::Engine;

use crate::error::{EvalError, Result};
use crate::evaluate::EvalMetrics;
use crate::outputs;

/// A piece of the report.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Heading(String),
    Paragraph(String),
    /// Header row, then rows; cells are plain text.
    Table(Vec<String>, Vec<Vec<String>>),
    /// A PNG in the output directory, with a caption.
    Image { file: String, caption: String },
}

/// Renders Markdown.
pub fn markdown(title: &str, blocks: &[Block]) -> String {
    let mut out = format!("# {title}\n\n");
    for b in blocks {
        match b {
            Block::Heading(h) => out.push_str(&format!("## {h}\n\n")),
            Block::Paragraph(p) => out.push_str(&format!("{p}\n\n")),
            Block::Table(head, rows) => {
                let cell = |s: &String| s.replace('|', "\\|");
                out.push_str(&format!("| {} |\n", head.iter().map(cell).collect::<Vec<_>>().join(" | ")));
                out.push_str(&format!("|{}\n", " --- |".repeat(head.len())));
                for r in rows {
                    out.push_str(&format!("| {} |\n", r.iter().map(cell).collect::<Vec<_>>().join(" | ")));
                }
                out.push('\n');
            }
            Block::Image { file, caption } => out.push_str(&format!("![{caption}]({file})\n\n*{caption}*\n\n")),
        }
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Renders one HTML page; images are read from `dir` and embedded.
pub fn html(title: &str, blocks: &[Block], dir: &Path) -> Result<String> {
    let mut out = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}\
         th{{background:#f3f3f3}}td:first-child{{text-align:left}}img{{max-width:100%}}figcaption{{color:#555}}</style></head><body>\n<h1>{t}</h1>\n",
        t = escape(title)
    );
    for b in blocks {
        match b {
            Block::Heading(h) => out.push_str(&format!("<h2>{}</h2>\n", escape(h))),
            Block::Paragraph(p) => out.push_str(&format!("<p>{}</p>\n", escape(p))),
            Block::Table(head, rows) => {
                out.push_str("<table><tr>");
                for h in head {
                    out.push_str(&format!("<th>{}</th>", escape(h)));
                }
                out.push_str("</tr>\n");
                for r in rows {
                    out.push_str("<tr>");
                    for c in r {
                        out.push_str(&format!("<td>{}</td>", escape(c)));
                    }
                    out.push_str("</tr>\n");
                }
                out.push_str("</table>\n");
            }
            Block::Image { file, caption } => {
                let path = dir.join(file);
                let bytes = std::fs::read(&path).map_err(|e| EvalError::io(&path, e))?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
                out.push_str(&format!("<figure><img alt=\"{c}\" src=\"data:image/png;base64,{b64}\"><figcaption>{c}</figcaption></figure>\n", c = escape(caption)));
            }
        }
    }
    out.push_str("</body></html>\n");
    Ok(out)
}

/// A number with 3 decimals, or "–" when undefined.
pub fn num(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite()).map(|x| format!("{x:.3}")).unwrap_or_else(|| "–".into())
}

/// `report.md` and `report.html` of an evaluation: run, data, model vs baselines, few-shot
/// probes and figures.
pub(crate) fn write_eval_report(out: &Path, m: &EvalMetrics, figures: &[(String, String)]) -> Result<()> {
    let mut b = Vec::new();
    b.push(Block::Heading("Run".into()));
    b.push(Block::Table(
        vec!["item".into(), "value".into()],
        vec![
            vec!["run directory".into(), m.run.run_dir.display().to_string()],
            vec!["checkpoint".into(), format!("{} (step {})", m.run.checkpoint.display(), m.run.step)],
            vec!["parameters".into(), m.run.parameters.to_string()],
            vec!["final validation perplexity".into(), num(m.run.final_val_perplexity)],
            vec!["per-gene bin-frequency perplexity (to beat)".into(), num(m.run.per_gene_baseline_perplexity)],
            vec!["final validation masked accuracy".into(), num(m.run.final_val_masked_acc)],
        ],
    ));
    b.push(Block::Heading("Data".into()));
    let classes: Vec<String> = m.data.classes.iter().zip(&m.data.class_counts).map(|(c, n)| format!("{c} ({n})")).collect();
    b.push(Block::Paragraph(format!(
        "{}: {} cells, label column `{}`, {} classes: {}. Split {}: {} training / {} test cells. {} genes in the data; gene overlap with the model: {}. Embeddings: {} pooling of layer {}, {} dimensions, {:.1} cells/s on {}.",
        m.data.path.display(),
        m.data.cells,
        m.data.label_col,
        m.data.classes.len(),
        classes.join(", "),
        m.data.split,
        m.data.n_train,
        m.data.n_test,
        m.data.genes_in_data,
        m.data.gene_overlap,
        m.embedding.pooling.name(),
        m.embedding.layer,
        m.embedding.dim,
        m.embedding.cells_per_s,
        m.embedding.device
    )));
    if !m.data.dropped_classes.is_empty() {
        let d: Vec<String> = m.data.dropped_classes.iter().map(|(c, n)| format!("{c} ({n})")).collect();
        b.push(Block::Paragraph(format!("Classes dropped as too small: {}.", d.join(", "))));
    }
    b.push(Block::Heading("Model vs baselines".into()));
    b.push(Block::Paragraph("Logistic regression on standardized features (C by 5-fold CV on the training cells), scored on the test cells; kNN: 15 cosine neighbours among training cells; clusters: Louvain on the 15-NN fuzzy graph of all cells, compared with the labels. Eff. dims: the participation ratio of the representation's covariance spectrum, how many directions it really uses. Depth R²: how well a linear regression on the representation predicts each cell's log total counts and log genes detected (5-fold cross-validated); high values mean the representation encodes sequencing depth.".into()));
    let head = ["representation", "dim", "accuracy", "balanced acc.", "macro F1", "F1 (class 1)", "ROC-AUC", "kNN acc.", "clusters", "ARI", "NMI", "silhouette", "eff. dims", "depth R² (counts)", "depth R² (genes)"];
    let rows = m
        .representations
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.dim.to_string(),
                num(Some(r.probe.accuracy)),
                num(Some(r.probe.balanced_accuracy)),
                num(Some(r.probe.macro_f1)),
                num(r.probe.f1_positive),
                num(r.probe.roc_auc),
                num(Some(r.knn_accuracy)),
                r.clusters.to_string(),
                num(Some(r.cluster_ari)),
                num(Some(r.cluster_nmi)),
                num(r.silhouette),
                r.effective_dims.map_or_else(|| "–".into(), |d| format!("{d:.1}")),
                num(Some(r.depth_r2.log_total_counts)),
                num(Some(r.depth_r2.log_genes_detected)),
            ]
        })
        .collect();
    b.push(Block::Table(head.iter().map(|s| s.to_string()).collect(), rows));
    b.push(Block::Heading("Few-shot probes".into()));
    let sizes: Vec<usize> = m.representations.first().map(|r| r.few_shot.iter().map(|p| p.cells_per_class).collect()).unwrap_or_default();
    if sizes.is_empty() {
        b.push(Block::Paragraph("Too few training cells per class for the few-shot curve.".into()));
    } else {
        let mut head = vec!["representation".to_string()];
        head.extend(sizes.iter().map(|n| format!("{n}/class accuracy")));
        let rows = m.representations.iter().map(|r| {
            let mut v = vec![r.name.clone()];
            v.extend(r.few_shot.iter().map(|p| format!("{:.3} ± {:.3}", p.accuracy_mean, p.accuracy_std)));
            v
        });
        b.push(Block::Table(head, rows.collect()));
        b.push(Block::Paragraph(format!("Mean ± standard deviation over {} random draws of training cells; tested on all test cells.", crate::probe::FEW_SHOT_DRAWS)));
    }
    b.push(Block::Heading("Figures".into()));
    b.push(Block::Paragraph(format!("Layouts of {} cells: t-SNE {:.1} s, UMAP {:.1} s.", m.layouts.cells, m.layouts.tsne_seconds, m.layouts.umap_seconds)));
    for (file, caption) in figures {
        b.push(Block::Image { file: file.clone(), caption: caption.clone() });
    }
    let title = "neurofm evaluation";
    outputs::write_atomic(&out.join("report.md"), markdown(title, &b).as_bytes())?;
    outputs::write_atomic(&out.join("report.html"), html(title, &b, out)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_renderings_carry_the_same_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"\x89PNG").unwrap();
        let blocks = vec![
            Block::Heading("Scores".into()),
            Block::Table(vec!["repr".into(), "acc".into()], vec![vec!["model <1>".into(), num(Some(0.5))]]),
            Block::Image { file: "a.png".into(), caption: "fig".into() },
        ];
        let md = markdown("T", &blocks);
        assert!(md.contains("| model <1> | 0.500 |") && md.contains("![fig](a.png)"));
        let h = html("T", &blocks, dir.path()).unwrap();
        assert!(h.contains("<td>model &lt;1&gt;</td><td>0.500</td>"));
        assert!(h.contains("data:image/png;base64,iVBORw=="));
        assert_eq!(num(None), "–");
    }
}
