//! One evaluation, top to bottom: load the run's model, open the data, choose cells and split,
//! embed (trained and untrained model), build the baselines, probe and cluster every
//! representation, lay the embedding out in 2-D (`layout`), then write files (`outputs`),
//! figures (`figures`) and the report (`report`).

use std::path::PathBuf;
use std::time::Instant;

use dataloader::genes::Overlap;
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
use crate::probe::{few_shot, knn_accuracy, logistic_probe, FewShotPoint, ProbeResult, Scaling, Scores};
use crate::report::num;
use crate::umap::fuzzy_graph;
use crate::{outputs, plots};
use trainer::metrics::{self as run_metrics, Column};

/// `neurofm-eval`'s settings.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalConfig {
    /// Run directory written by neurofm-train (`--run` also works).
    #[arg(long = "run-dir", visible_alias = "run", value_name = "RUN_DIR")]
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
    /// Directions the representation uses (`linalg::participation_ratio`); not measured for
    /// representations wider than `EFFECTIVE_DIMS_MAX`.
    pub effective_dims: Option<f64>,
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
/// Cells and widest representation the effective dimensions are measured on.
const EFFECTIVE_DIMS_CELLS: usize = 20_000;
const EFFECTIVE_DIMS_MAX: usize = 512;

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
    let layout = crate::layout::layouts(&reps[0].1.view(), neighbours_of_model.as_ref(), cfg.max_layout_cells, cfg.seed);
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
    outputs::write_eval_files(&out, &data, &labels, &split, &trained.x, &layout, &clusters_of_model, &model_probe)?;
    let figures = crate::figures::write_figures(&out, &model, &labels, &split, &layout, &model_probe, &roc_curves)?;
    crate::report::write_eval_report(&out, &metrics, &figures)?;
    let json = serde_json::to_vec_pretty(&metrics).map_err(|e| EvalError::Internal(e.to_string()))?;
    outputs::write_atomic(&out.join("metrics.json"), &json)?;
    info!("wrote {}", out.display());
    Ok(metrics)
}

/// Probe, few-shot curve, kNN accuracy, Louvain agreement and silhouette of one representation;
/// also returns the probe (for plots), the clusters and the kNN graph (reused by UMAP).
fn score_representation(name: &str, x: &ArrayView2<f64>, labels: &Labels, split: &Split, qc: &Array2<f64>, seed: u64) -> Result<(RepresentationScores, ProbeResult, Vec<usize>, Neighbours)> {
    let probe = logistic_probe(x, labels, split, seed, Scaling::Standardize);
    let few = few_shot(x, labels, split, probe.c, seed);
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
        effective_dims: crate::linalg::participation_ratio(x, EFFECTIVE_DIMS_CELLS, EFFECTIVE_DIMS_MAX),
        depth_r2: depth_r2(x, qc),
    };
    Ok((s, probe, clusters, nb))
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

