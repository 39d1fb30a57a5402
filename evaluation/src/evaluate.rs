//! One evaluation, top to bottom: load the run's model, open the data, choose cells and split,
//! embed (trained and untrained model), build the baselines, probe and cluster every
//! representation, lay the embedding out in 2-D, then write files, figures and the report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use dataloader::genes::Overlap;
use linfa::traits::Transformer;
use ndarray::{Array2, ArrayView2, Axis};
use serde::Serialize;
use tracing::info;
use trainer::device::{DeviceChoice, LocalRank};
use trainer::pooling::Pooling;

use crate::cluster::{louvain, silhouette};
use crate::dataset::EvalData;
use crate::depth::{depth_r2, DepthR2};
use crate::embed::TrainedModel;
use crate::error::{EvalError, Result};
use crate::knn::Neighbours;
use crate::labels::{ClassSpec, Labels, Split, SplitKind};
use crate::linalg::{log_normalized, qc_features, Pca};
use crate::metrics::{adjusted_rand_index, normalized_mutual_info};
use crate::probe::{few_shot, knn_accuracy, logistic_probe, FewShotPoint, ProbeResult, Scores};
use crate::report::{num, Block};
use crate::umap::{fuzzy_graph, umap, UmapConfig};
use crate::{outputs, plots};
use trainer::metrics::{self as run_metrics, Column};

/// `neurofm-eval`'s settings.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalConfig {
    /// Run directory written by neurofm-train (`--run` also works).
    #[arg(long = "run-dir", visible_alias = "run")]
    pub run: PathBuf,
    /// `best`, `last`, or a checkpoint directory.
    #[arg(long, default_value = "best")]
    pub checkpoint: String,
    /// Zarr store, or an .h5ad/.loom file (converted on the fly).
    #[arg(long)]
    pub data: PathBuf,
    /// The `var` column holding the gene names to match with the model's (default: the var
    /// names), e.g. `gene_symbol` for a model trained on symbols.
    #[arg(long, value_name = "COL")]
    pub gene_key: Option<String>,
    /// Refuse data sharing fewer genes with the model than this share of the smaller panel.
    #[arg(long, default_value_t = 0.5)]
    pub min_gene_overlap: f64,
    /// obs column holding the labels.
    #[arg(long)]
    pub label_col: String,
    /// Only these label values, each its own class (comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["positive", "negative"])]
    pub classes: Vec<String>,
    /// Values pooled into the positive class (class 1), for a binary probe.
    #[arg(long, value_delimiter = ',')]
    pub positive: Vec<String>,
    /// Values pooled into the negative class (default: every other value).
    #[arg(long, value_delimiter = ',', requires = "positive")]
    pub negative: Vec<String>,
    /// Drop classes with fewer cells than this (reported) instead of refusing them.
    #[arg(long, default_value_t = 0)]
    pub min_class_cells: usize,
    /// How token states become a cell embedding (default: the run's `embedding.pooling`).
    #[arg(long, value_enum)]
    pub embedding: Option<Pooling>,
    /// Which layer's states are pooled: -1 the last, -2 the one before (Geneformer's habit),
    /// k ≥ 1 layer k (default: the run's `embedding.layer`).
    #[arg(long, allow_hyphen_values = true)]
    pub layer: Option<i64>,
    /// Also write gene embeddings (`gene_embeddings.h5ad`): the static gene table and each
    /// gene's contextual state averaged over the cells of each class.
    #[arg(long)]
    pub gene_embeddings: bool,
    /// `stratified`, or `group:COLUMN` to test on groups (e.g. libraries) the probe never saw.
    #[arg(long, default_value = "stratified")]
    pub split: SplitKind,
    #[arg(long, default_value_t = 0.2)]
    pub test_frac: f64,
    /// Output directory (default: RUN/eval).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Cells per forward pass (default 8 on CPU, 64 on GPU).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Seed of the split, the probes' folds and draws, the untrained model and the layouts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also probe all log-normalized genes directly (slow for many genes × many classes).
    #[arg(long)]
    pub expression_baseline: bool,
    /// Evaluate at most this many labelled cells (a seeded sample with every class's share), so
    /// memory stays bounded on an atlas: the expression baseline holds cells × genes values.
    #[arg(long, default_value_t = 50_000)]
    pub max_cells: usize,
    /// Layouts (t-SNE, UMAP) use at most this many cells, a seeded random sample beyond.
    #[arg(long, default_value_t = 20_000)]
    pub max_layout_cells: usize,
    /// Accept non-integer counts in an .h5ad input (e.g. RPKM); they are binned like counts.
    #[arg(long)]
    pub allow_non_integer: bool,
}

/// Everything one representation scored.
#[derive(Debug, Clone, Serialize)]
pub struct RepresentationScores {
    pub name: String,
    pub dim: usize,
    pub probe: Scores,
    pub probe_c: f64,
    pub cv_accuracy: Vec<(f64, f64)>,
    pub confusion: Vec<Vec<u64>>,
    pub few_shot: Vec<FewShotPoint>,
    pub knn_accuracy: f64,
    pub clusters: usize,
    pub cluster_ari: f64,
    pub cluster_nmi: f64,
    pub silhouette: Option<f64>,
    /// How much of the representation is sequencing depth (`depth`).
    pub depth_r2: DepthR2,
}

/// `metrics.json`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalMetrics {
    pub run: RunInfo,
    pub data: DataInfo,
    pub embedding: EmbeddingInfo,
    pub representations: Vec<RepresentationScores>,
    pub layouts: LayoutInfo,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub run_dir: PathBuf,
    pub checkpoint: PathBuf,
    pub step: u64,
    pub parameters: usize,
    pub final_val_perplexity: Option<f64>,
    pub final_val_masked_acc: Option<f64>,
    pub per_gene_baseline_perplexity: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataInfo {
    pub path: PathBuf,
    pub label_col: String,
    pub classes: Vec<String>,
    pub class_counts: Vec<usize>,
    pub dropped_classes: Vec<(String, usize)>,
    pub cells: usize,
    pub genes_in_data: usize,
    pub model_genes_missing: usize,
    /// The data's genes against the model's vocabulary (zero-shot use on another panel).
    pub gene_overlap: Overlap,
    pub split: String,
    pub n_train: usize,
    pub n_test: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingInfo {
    pub pooling: Pooling,
    /// 1-based layer whose states were pooled.
    pub layer: usize,
    pub dim: usize,
    pub device: String,
    pub seconds: f64,
    pub cells_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayoutInfo {
    pub cells: usize,
    pub pca_explained_variance_ratio: Vec<f64>,
    pub tsne_seconds: f64,
    pub umap_seconds: f64,
}

/// Neighbours of the clustering graph, the cell itself included (scanpy's default).
const GRAPH_NEIGHBOURS: usize = 15;
/// Principal components of the expression baseline.
const EXPRESSION_PCS: usize = 50;
/// Cells the silhouette is computed on (a seeded sample above).
const SILHOUETTE_CELLS: usize = 5000;

/// Runs the whole evaluation and returns what `metrics.json` holds. Running out of GPU memory
/// anywhere ends in the advice to embed smaller batches.
pub fn evaluate(cfg: &EvalConfig) -> Result<EvalMetrics> {
    evaluate_all(cfg).map_err(|e| {
        let text = e.to_string();
        if matches!(e, EvalError::Torch(_) | EvalError::Train(trainer::TrainError::Torch(_))) && trainer::device::is_oom(&text) {
            let now = cfg.batch_size.unwrap_or(64);
            return EvalError::Usage(format!("out of GPU memory embedding {now} cells at once: try --batch-size {} ({})", (now / 2).max(1), text.lines().next().unwrap_or("")));
        }
        e
    })
}

fn evaluate_all(cfg: &EvalConfig) -> Result<EvalMetrics> {
    let out = cfg.out.clone().unwrap_or_else(|| cfg.run.join("eval"));
    std::fs::create_dir_all(&out).map_err(|e| EvalError::io(&out, e))?;
    let env = launcher::env::DistEnv::from_env().map_err(|e| EvalError::Usage(e.to_string()))?;
    let device = cfg.device.resolve(LocalRank { rank: env.local_rank, world: env.local_world })?;
    let model = TrainedModel::load(&cfg.run, &cfg.checkpoint, device)?;
    let choice = model.choice(cfg.embedding, cfg.layer)?;
    info!("model: {} (step {}) on {:?}", model.checkpoint.display(), model.state.step, device);
    let data = EvalData::open(&cfg.data, &out, cfg.allow_non_integer)?;
    let spec = if !cfg.classes.is_empty() {
        ClassSpec::Only(cfg.classes.clone())
    } else if !cfg.positive.is_empty() {
        ClassSpec::Binary { positive: cfg.positive.clone(), negative: cfg.negative.clone() }
    } else {
        ClassSpec::All
    };
    let mut labels = Labels::from_obs(&data.obs, &cfg.label_col, &spec, cfg.min_class_cells, &data.path)?;
    let left_out = labels.subsample(cfg.max_cells, cfg.seed);
    if left_out > 0 {
        info!("evaluating a sample of {} cells ({left_out} left out; raise --max-cells to keep them)", labels.cells.len());
    }
    for (name, n) in &labels.dropped {
        info!("class `{name}` dropped: {n} cells < --min-class-cells {}", cfg.min_class_cells);
    }
    let split = Split::new(&labels, &cfg.split, cfg.test_frac, &data.obs, cfg.seed, &data.path)?;
    let genes = data.gene_map(&model.tokenizer.genes, model.config.data.gene_case, cfg.gene_key.as_deref(), cfg.min_gene_overlap)?;
    let batch_size = cfg.batch_size.unwrap_or_else(|| crate::embed::default_batch_size(device));
    info!("{} cells in {} classes; {} train / {} test", labels.cells.len(), labels.n_classes(), split.train.len(), split.test.len());

    // Representations: the model, then the baselines on the same cells and split.
    let groups = cfg.gene_embeddings.then_some((labels.y.as_slice(), labels.n_classes()));
    let trained = model.embed(&data, &genes, &labels.cells, choice, batch_size, groups)?;
    let cells_per_s = labels.cells.len() as f64 / trained.seconds.max(1e-9);
    info!("embedded {} cells in {:.1} s ({cells_per_s:.1} cells/s): {} pooling of layer {}", labels.cells.len(), trained.seconds, choice.pooling.name(), choice.layer);
    if let Some((states, counts)) = &trained.genes {
        outputs::gene_embeddings(&out.join("gene_embeddings.h5ad"), &model.tokenizer.genes, &model.gene_table()?, &labels.classes, states, counts)?;
    }
    let untrained = model.untrained(cfg.seed.wrapping_add(1))?.embed(&data, &genes, &labels.cells, choice, batch_size, None)?;
    let counts = data.counts(&labels.cells)?;
    let expression = log_normalized(&counts, data.genes.len());
    let pca = Pca::fit(&expression.select(Axis(0), &split.train).view(), EXPRESSION_PCS, cfg.seed);
    let qc = qc_features(&counts);
    let mut reps: Vec<(String, Array2<f64>)> = vec![
        (format!("neurofm ({}, layer {})", choice.pooling.name(), choice.layer), trained.x.mapv(f64::from)),
        ("untrained model".into(), untrained.x.mapv(f64::from)),
        (format!("expression PCA({})", pca.components.ncols()), pca.transform(&expression.view())),
        ("QC: log counts, log genes".into(), qc.clone()),
    ];
    if cfg.expression_baseline {
        reps.push((format!("expression ({} genes)", data.genes.len()), expression));
    }

    let mut scores = Vec::new();
    let mut model_probe = None;
    let mut clusters_of_model = Vec::new();
    let mut neighbours_of_model = None;
    let mut roc_curves = Vec::new();
    for (i, (name, x)) in reps.iter().enumerate() {
        let started = Instant::now();
        let (s, probe, clusters, nb) = score_representation(name, &x.view(), &labels, &split, &qc, cfg.seed)?;
        info!(
            "{name}: accuracy {:.3}, balanced {:.3}, macro F1 {:.3}, ROC-AUC {}, cluster ARI {:.3}, depth R² {:.2} ({:.1} s)",
            s.probe.accuracy,
            s.probe.balanced_accuracy,
            s.probe.macro_f1,
            num(s.probe.roc_auc),
            s.cluster_ari,
            s.depth_r2.log_total_counts,
            started.elapsed().as_secs_f64()
        );
        if labels.n_classes() == 2 {
            let truth: Vec<bool> = split.test.iter().map(|&t| labels.y[t] == 1).collect();
            let score: Vec<f64> = probe.proba.column(1).to_vec();
            roc_curves.push((format!("{name} (AUC {})", num(s.probe.roc_auc)), plots::roc_points(&truth, &score)));
        }
        if i == 0 {
            model_probe = Some(probe);
            clusters_of_model = clusters;
            neighbours_of_model = Some(nb);
        }
        scores.push(s);
    }
    let model_probe = model_probe.ok_or_else(|| EvalError::Internal("no representation was scored".into()))?;

    // Layouts of the model's embedding.
    let layout = layouts(&reps[0].1.view(), neighbours_of_model.as_ref(), cfg.max_layout_cells, cfg.seed);
    info!("layouts of {} cells: t-SNE {:.1} s, UMAP {:.1} s", layout.cells.len(), layout.tsne_seconds, layout.umap_seconds);

    let run = run_info(&model);
    let metrics = EvalMetrics {
        run,
        data: DataInfo {
            path: cfg.data.clone(),
            label_col: cfg.label_col.clone(),
            classes: labels.classes.clone(),
            class_counts: labels.counts(),
            dropped_classes: labels.dropped.clone(),
            cells: labels.cells.len(),
            genes_in_data: data.genes.len(),
            model_genes_missing: genes.overlap.missing,
            gene_overlap: genes.overlap.clone(),
            split: match &cfg.split {
                SplitKind::Stratified => format!("stratified, test fraction {}", cfg.test_frac),
                SplitKind::Group(c) => format!("by group `{c}`, test fraction {}", cfg.test_frac),
            },
            n_train: split.train.len(),
            n_test: split.test.len(),
        },
        embedding: EmbeddingInfo { pooling: choice.pooling, layer: choice.layer, dim: trained.x.ncols(), device: format!("{device:?}"), seconds: trained.seconds, cells_per_s },
        representations: scores,
        layouts: LayoutInfo {
            cells: layout.cells.len(),
            pca_explained_variance_ratio: layout.pca_ratio.clone(),
            tsne_seconds: layout.tsne_seconds,
            umap_seconds: layout.umap_seconds,
        },
    };
    write_outputs(&out, &data, &labels, &split, &trained.x, &layout, &clusters_of_model, &model_probe)?;
    let figures = write_figures(&out, &model, &labels, &split, &layout, &model_probe, &roc_curves)?;
    write_report(&out, &metrics, &figures)?;
    let json = serde_json::to_vec_pretty(&metrics).map_err(|e| EvalError::Internal(e.to_string()))?;
    outputs::write_atomic(&out.join("metrics.json"), &json)?;
    info!("wrote {}", out.display());
    Ok(metrics)
}

/// Probe, few-shot curve, kNN accuracy, Louvain agreement and silhouette of one representation;
/// also returns the probe (for plots), the clusters and the kNN graph (reused by UMAP).
fn score_representation(name: &str, x: &ArrayView2<f64>, labels: &Labels, split: &Split, qc: &Array2<f64>, seed: u64) -> Result<(RepresentationScores, ProbeResult, Vec<usize>, Neighbours)> {
    let probe = logistic_probe(x, labels, split, seed)?;
    let few = few_shot(x, labels, split, probe.c, seed)?;
    let knn_acc = knn_accuracy(x, labels, split);
    let nb = crate::umap::neighbours(x, GRAPH_NEIGHBOURS);
    let clusters = louvain(&fuzzy_graph(&nb, x.nrows()), 1.0, seed);
    let n_clusters = clusters.iter().max().map_or(0, |&m| m + 1);
    let s = RepresentationScores {
        name: name.to_string(),
        dim: x.ncols(),
        probe: probe.scores.clone(),
        probe_c: probe.c,
        cv_accuracy: probe.cv_accuracy.clone(),
        confusion: probe.confusion.rows(),
        few_shot: few,
        knn_accuracy: knn_acc,
        clusters: n_clusters,
        cluster_ari: adjusted_rand_index(&labels.y, &clusters),
        cluster_nmi: normalized_mutual_info(&labels.y, &clusters),
        silhouette: silhouette(x, &labels.y, SILHOUETTE_CELLS, seed),
        depth_r2: depth_r2(x, qc),
    };
    Ok((s, probe, clusters, nb))
}

/// 2-D views of the model's embedding: PCA on every cell, t-SNE and UMAP on a sample.
struct Layout {
    /// Positions (into the evaluated cells) of the cells t-SNE/UMAP place.
    cells: Vec<usize>,
    pca: Array2<f64>,
    pca_ratio: Vec<f64>,
    tsne: Array2<f64>,
    umap: Array2<f64>,
    tsne_seconds: f64,
    umap_seconds: f64,
}

/// `all_neighbours`: the 15-NN graph of every row of `x`, reused when no sampling is needed.
fn layouts(x: &ArrayView2<f64>, all_neighbours: Option<&Neighbours>, max_cells: usize, seed: u64) -> Layout {
    let n = x.nrows();
    let pca_fit = Pca::fit(x, 2, seed);
    let pca = pca_fit.transform(x);
    let mut cells: Vec<usize> = (0..n).collect();
    if n > max_cells {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        cells.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        cells.truncate(max_cells);
        cells.sort_unstable();
    }
    let sub = x.select(Axis(0), &cells);
    let t0 = Instant::now();
    let tsne = tsne(&sub.view(), seed);
    let tsne_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let cfg = UmapConfig { seed, ..UmapConfig::default() };
    let umap = match all_neighbours.filter(|nb| n <= max_cells && nb.k + 1 == cfg.n_neighbors) {
        Some(nb) => umap(&sub.view(), nb, &cfg),
        None => umap(&sub.view(), &crate::umap::neighbours(&sub.view(), cfg.n_neighbors), &cfg),
    };
    let umap_seconds = t1.elapsed().as_secs_f64();
    Layout { cells, pca, pca_ratio: pca_fit.explained_variance_ratio.to_vec(), tsne, umap, tsne_seconds, umap_seconds }
}

/// Barnes–Hut t-SNE (perplexity 30, 1000 iterations) on at most 50 principal components.
pub fn tsne(x: &ArrayView2<f64>, seed: u64) -> Array2<f64> {
    let n = x.nrows();
    if n < 5 {
        return Array2::zeros((n, 2));
    }
    let input = if x.ncols() > 50 { Pca::fit(x, 50, seed).transform(x) } else { x.to_owned() };
    let perplexity = 30f64.min((n as f64 - 1.0) / 3.0 - 1e-6);
    let params = linfa_tsne::TSneParams::embedding_size(2).perplexity(perplexity).approx_threshold(0.5).max_iter(1000);
    let spinner = common::progress::spinner(&format!("t-SNE of {n} cells"));
    let layout = params.transform(input).unwrap_or_else(|e| {
        tracing::warn!("t-SNE failed ({e}); its layout is left empty (NaN)");
        Array2::from_elem((n, 2), f64::NAN)
    });
    spinner.finish_and_clear();
    layout
}

/// `neurofm-eval layout` settings: a 2-D layout of any matrix.
#[derive(Debug, Clone, clap::Args)]
pub struct LayoutConfig {
    /// Rows to lay out: a 2-D float `.npy` (e.g. embeddings.npy).
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long, value_enum, default_value = "umap")]
    pub method: LayoutMethod,
    /// Output `.npy` (n × 2, float32).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Which layout `neurofm-eval layout` computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutMethod {
    /// UMAP, 15 cosine neighbours.
    Umap,
    /// Barnes–Hut t-SNE, perplexity 30.
    Tsne,
    Pca,
}

/// Computes and writes the layout; returns the seconds it took (reading excluded).
pub fn layout_file(cfg: &LayoutConfig) -> Result<f64> {
    let x = outputs::read_npy(&cfg.input)?;
    let start = Instant::now();
    let y = match cfg.method {
        LayoutMethod::Umap => {
            let ucfg = UmapConfig { seed: cfg.seed, ..UmapConfig::default() };
            umap(&x.view(), &crate::umap::neighbours(&x.view(), ucfg.n_neighbors), &ucfg)
        }
        LayoutMethod::Tsne => tsne(&x.view(), cfg.seed),
        LayoutMethod::Pca => Pca::fit(&x.view(), 2, cfg.seed).transform(&x.view()),
    };
    let seconds = start.elapsed().as_secs_f64();
    outputs::write_atomic(&cfg.out, &outputs::npy_f32(&y.mapv(|v| v as f32)))?;
    Ok(seconds)
}

fn run_info(model: &TrainedModel) -> RunInfo {
    let rows = run_metrics::read(&model.run.join("metrics.csv")).unwrap_or_else(|e| {
        tracing::warn!("{e}: the report leaves out the training numbers");
        Vec::new()
    });
    let last_val = rows.iter().rev().find(|r| r.split == "val");
    RunInfo {
        run_dir: model.run.clone(),
        checkpoint: model.checkpoint.clone(),
        step: model.state.step,
        parameters: model.parameters(),
        final_val_perplexity: last_val.and_then(|r| r.get(Column::Perplexity)),
        final_val_masked_acc: last_val.and_then(|r| r.get(Column::MaskedAcc)),
        per_gene_baseline_perplexity: last_val.and_then(|r| r.get(Column::BaselinePerplexity)),
    }
}

#[allow(clippy::too_many_arguments)]
fn write_outputs(out: &Path, data: &EvalData, labels: &Labels, split: &Split, x: &Array2<f32>, layout: &Layout, clusters: &[usize], probe: &ProbeResult) -> Result<()> {
    outputs::write_atomic(&out.join("embeddings.npy"), &outputs::npy_f32(x))?;
    let names = &data.obs.index;
    let mut part = vec!["train"; labels.cells.len()];
    for &t in &split.test {
        part[t] = "test";
    }
    let rows = (0..labels.cells.len()).map(|i| {
        vec![names[labels.cells[i]].clone(), labels.cells[i].to_string(), labels.classes[labels.y[i]].clone(), part[i].to_string(), clusters[i].to_string()]
    });
    outputs::write_atomic(&out.join("cells.tsv"), &outputs::tsv(&["cell", "store_row", "label", "split", "cluster"], rows))?;

    // Test-set predictions, so anyone can recompute the scores (CI does, with scikit-learn).
    let mut head: Vec<String> = vec!["cell".into(), "truth".into(), "pred".into()];
    head.extend(labels.classes.iter().map(|c| format!("p_{c}")));
    let head_ref: Vec<&str> = head.iter().map(String::as_str).collect();
    let rows = split.test.iter().enumerate().map(|(r, &t)| {
        let mut v = vec![names[labels.cells[t]].clone(), labels.y[t].to_string(), probe.pred[r].to_string()];
        v.extend(probe.proba.row(r).iter().map(|p| format!("{p:.17e}")));
        v
    });
    outputs::write_atomic(&out.join("predictions.tsv"), &outputs::tsv(&head_ref, rows))?;

    let mut obs = data.obs.take(&labels.cells);
    obs.columns.push(("neurofm_class".into(), dataloader::frame::Column::categorical_from_text(labels.y.iter().map(|&k| labels.classes[k].clone()).collect())));
    obs.columns.push(("neurofm_split".into(), dataloader::frame::Column::categorical_from_text(part.iter().map(|s| s.to_string()).collect())));
    obs.columns.push(("neurofm_cluster".into(), dataloader::frame::Column::categorical_from_text(clusters.iter().map(|c| c.to_string()).collect())));
    let spread = |coords: &Array2<f64>| -> Array2<f32> {
        let mut full = Array2::<f32>::from_elem((labels.cells.len(), 2), f32::NAN);
        for (r, &c) in layout.cells.iter().enumerate() {
            full[[c, 0]] = coords[[r, 0]] as f32;
            full[[c, 1]] = coords[[r, 1]] as f32;
        }
        full
    };
    let (tsne, umap, pca) = (spread(&layout.tsne), spread(&layout.umap), layout.pca.mapv(|v| v as f32));
    outputs::h5ad(&out.join("embeddings.h5ad"), &obs, &[("X_neurofm", x), ("X_pca", &pca), ("X_tsne", &tsne), ("X_umap", &umap)])
}

/// The figures written, with captions, in report order.
fn write_figures(out: &Path, model: &TrainedModel, labels: &Labels, split: &Split, layout: &Layout, probe: &ProbeResult, roc_curves: &[(String, Vec<(f64, f64)>)]) -> Result<Vec<(String, String)>> {
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

fn write_report(out: &Path, m: &EvalMetrics, figures: &[(String, String)]) -> Result<()> {
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
    b.push(Block::Paragraph("Logistic regression on standardized features (C by 5-fold CV on the training cells), scored on the test cells; kNN: 15 cosine neighbours among training cells; clusters: Louvain on the 15-NN fuzzy graph of all cells, compared with the labels. Depth R²: how well a linear regression on the representation predicts each cell's log total counts and log genes detected (5-fold cross-validated); high values mean the representation encodes sequencing depth.".into()));
    let head = ["representation", "dim", "accuracy", "balanced acc.", "macro F1", "F1 (class 1)", "ROC-AUC", "kNN acc.", "clusters", "ARI", "NMI", "silhouette", "depth R² (counts)", "depth R² (genes)"];
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
    outputs::write_atomic(&out.join("report.md"), crate::report::markdown(title, &b).as_bytes())?;
    outputs::write_atomic(&out.join("report.html"), crate::report::html(title, &b, out)?.as_bytes())
}
