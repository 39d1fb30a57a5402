//! `neurofm-annotate`: a fine-tuned classifier labels new cells and writes them into an
//! `.h5ad` beside the input's own `obs`.
//!
//! Cells stream through in batches (raw counts of one batch, its tokens and its forward pass
//! at a time); only the outputs (cells × (classes + embedding width) floats) are kept. The
//! data's genes are mapped onto the model's: model genes the data lacks are absent from the
//! sequences (padding), never zeros, and the overlap is reported.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use dataloader::frame::{Column, Frame};
use dataloader::h5write::{dict_group, encoding, frame, strings};
use dataloader::shard::CellBatch;
use dataloader::source::h5::h5err;
use evaluation::dataset::EvalData;
use ndarray::Array2;
use serde::Serialize;
use tracing::info;
use trainer::batch::DeviceBatch;
use trainer::device::{DeviceChoice, LocalRank};
use trainer::model::load_weights;

use crate::classifier::{Classifier, EncoderInit};
use crate::error::{FinetuneError, Result};
use crate::config::AugmentConfig;
use crate::predict::{argmax, combine, forward_host, test_views};
use crate::run_files::FinetuneRun;
use crate::task::labelled_batches;
use crate::train::predict_batch_size;

/// The label of cells whose most probable class is below `--min-confidence`.
pub const UNASSIGNED: &str = "unassigned";

/// `neurofm-annotate`'s settings.
#[derive(Debug, Clone, clap::Args)]
pub struct AnnotateConfig {
    /// Fine-tune run directory written by neurofm-finetune (`--run-dir` also works).
    #[arg(long, visible_alias = "run-dir")]
    pub model: PathBuf,
    /// `best`, `last` (of every ensemble member), or one checkpoint directory of the fine-tune
    /// (that classifier alone).
    #[arg(long, default_value = "best")]
    pub checkpoint: String,
    /// The cells to label: an .h5ad/.loom file or a zarr store.
    #[arg(long)]
    pub data: PathBuf,
    /// Output .h5ad: the input's obs plus neurofm_label, neurofm_confidence; obsm
    /// neurofm_probabilities and X_neurofm; uns neurofm_classes.
    #[arg(long)]
    pub out: PathBuf,
    /// Cells whose top probability is below this are labelled `unassigned`.
    #[arg(long, default_value_t = 0.5)]
    pub min_confidence: f64,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Cells per forward pass (default 8 on CPU, 64 on GPU).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Accept non-integer counts in an .h5ad input (e.g. RPKM), as the fine-tune's data had.
    #[arg(long)]
    pub allow_non_integer: bool,
    /// Views of each cell averaged (default: the fine-tune's `augment.test_views`, as its
    /// report scored); 1 predicts from the measured cells alone, the fastest.
    #[arg(long)]
    pub test_views: Option<usize>,
}

/// What an annotation did.
#[derive(Debug, Clone, Serialize)]
pub struct AnnotateSummary {
    pub cells: usize,
    pub model_genes: usize,
    pub model_genes_found: usize,
    pub unassigned: usize,
    /// Cells per predicted label, in class order, then `unassigned`.
    pub label_counts: Vec<(String, usize)>,
    pub seconds: f64,
}

/// Labels every cell of `cfg.data` with the fine-tune `cfg.model`.
pub fn annotate(cfg: &AnnotateConfig) -> Result<AnnotateSummary> {
    if !(0.0..=1.0).contains(&cfg.min_confidence) {
        return Err(FinetuneError::Usage(format!("--min-confidence {}: must be between 0 and 1", cfg.min_confidence)));
    }
    if cfg.out.extension().is_none_or(|e| e != "h5ad") {
        return Err(FinetuneError::input(&cfg.out, "--out must end in .h5ad"));
    }
    if cfg.out.exists() && !cfg.force {
        return Err(FinetuneError::input(&cfg.out, "exists; pass --force to replace it"));
    }
    if same_file(&cfg.out, &cfg.data) {
        return Err(FinetuneError::input(&cfg.out, "is the input; write the annotation to another file"));
    }
    let run = FinetuneRun::open(&cfg.model, &cfg.checkpoint)?;
    let env = launcher::env::DistEnv::from_env().map_err(|e| FinetuneError::Usage(e.to_string()))?;
    let device = cfg.device.resolve(LocalRank { rank: env.local_rank, world: env.local_world })?;
    let classes = run.classes().to_vec();
    let mut models = Vec::with_capacity(run.weights.len());
    for w in &run.weights {
        let model = Classifier::new(&run.arch, classes.len(), device, EncoderInit::Random(0), 0)?;
        load_weights(&model.vs, w)?;
        models.push(model);
    }
    let ensemble = if models.len() > 1 { format!(", an ensemble of {} members", models.len()) } else { String::new() };
    info!("model: {}{ensemble} ({} classes: {}) on {device:?}", run.checkpoint.display(), classes.len(), classes.join(", "));

    let scratch = cfg.out.parent().filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let data = EvalData::open(&cfg.data, &scratch, cfg.allow_non_integer)?;
    // Annotation transfers labels to new data: any overlap is used, and reported.
    let genes = data.gene_map(&run.tokenizer.genes, run.encoder_config.data.gene_case, None, 0.0)?;
    let (n_model, found) = (run.tokenizer.genes.len(), genes.overlap.shared);

    let tokenizer = std::sync::Arc::new(run.tokenizer.clone());
    let augment = AugmentConfig { test_views: cfg.test_views.unwrap_or(run.config.augment.test_views), ..run.config.augment.clone() };
    if let Some(why) = augment.test_views_problem() {
        return Err(FinetuneError::Usage(format!("--test-views {}: {why} (the fine-tune's [augment] in {})", augment.test_views, cfg.model.display())));
    }
    // Fine-tuning's own transform for each view the report averaged: the same genes,
    // sequences, padding of missing genes and perturbations.
    let views: Vec<_> = test_views(tokenizer.clone(), run.arch.sequence, &augment, run.config.seed)?
        .into_iter()
        .map(|(batcher, epoch)| labelled_batches(batcher, genes.clone(), Arc::new(Vec::new()), epoch))
        .collect();
    if views.len() > 1 {
        info!("each cell's probabilities average {} views: the measured cell and {} perturbed copies (augment.test_views)", views.len(), views.len() - 1);
    }
    let n = data.store.n_cells();
    let (k, dim) = (classes.len(), run.arch.embedding_dim());
    let mut proba = Array2::<f32>::zeros((n, k));
    let mut emb = Array2::<f32>::zeros((n, dim));
    let batch = cfg.batch_size.unwrap_or_else(|| predict_batch_size(0, device)).max(1);
    let bar = common::progress::bar(n as u64, "cells");
    let start = Instant::now();
    for lo in (0..n).step_by(batch) {
        let hi = (lo + batch).min(n);
        let cells = CellBatch { cells: (lo as u32..hi as u32).collect(), counts: data.store.read_rows(lo..hi)? };
        // Every member's probabilities on every view, combined as the fine-tune's report
        // combined them; the embedding is member 0's of the measured cells.
        let (mut members, mut e) = (Vec::with_capacity(models.len() * views.len()), Vec::new());
        for (v, tokens_of) in views.iter().enumerate() {
            let b = tokens_of(cells.clone())?;
            let dev = DeviceBatch::new(&b.tokens, device, tokenizer.gene_pad(), false)?;
            for (m, model) in models.iter().enumerate() {
                let (p, emb) = forward_host(model, &dev)?;
                members.push(Array2::from_shape_vec((hi - lo, k), p.iter().map(|&x| x as f64).collect()).map_err(|e| FinetuneError::Internal(e.to_string()))?);
                if v == 0 && m == 0 {
                    e = emb;
                }
            }
        }
        proba.slice_mut(ndarray::s![lo..hi, ..]).assign(&combine(&members).mapv(|x| x as f32));
        for (i, row) in e.chunks(dim).enumerate() {
            emb.row_mut(lo + i).assign(&ndarray::ArrayView1::from(row));
        }
        bar.inc((hi - lo) as u64);
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();

    let mut labels = Vec::with_capacity(n);
    let mut confidence = Vec::with_capacity(n);
    for r in proba.rows() {
        let best = argmax(r.iter().map(|&p| p as f64));
        let conf = r[best] as f64;
        labels.push(if conf >= cfg.min_confidence { classes[best].clone() } else { UNASSIGNED.to_string() });
        confidence.push(conf);
    }
    let unassigned = labels.iter().filter(|l| *l == UNASSIGNED).count();
    let mut obs = data.obs.clone();
    obs.columns.retain(|(name, _)| name != "neurofm_label" && name != "neurofm_confidence");
    let mut categories = classes.clone();
    categories.push(UNASSIGNED.into());
    obs.columns.push(("neurofm_label".into(), categorical(&labels, &categories)));
    obs.columns.push(("neurofm_confidence".into(), Column::Float(confidence)));
    let provenance = Provenance {
        model: run.dir.display().to_string(),
        checkpoint: run.checkpoint.display().to_string(),
        min_confidence: cfg.min_confidence,
        model_genes: n_model,
        model_genes_found: found,
    };
    write_h5ad(&cfg.out, &obs, &proba, &emb, &classes, &provenance)?;
    let mut label_counts: Vec<(String, usize)> = categories.iter().map(|c| (c.clone(), labels.iter().filter(|l| *l == c).count())).collect();
    label_counts.retain(|(c, n)| *n > 0 || c != UNASSIGNED);
    info!("annotated {n} cells in {seconds:.1} s ({:.1} cells/s); {unassigned} below confidence {}", n as f64 / seconds.max(1e-9), cfg.min_confidence);
    Ok(AnnotateSummary { cells: n, model_genes: n_model, model_genes_found: found, unassigned, label_counts, seconds })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// A categorical column with a fixed category order (every class, even one never predicted).
fn categorical(values: &[String], categories: &[String]) -> Column {
    let index: std::collections::HashMap<&str, i32> = categories.iter().enumerate().map(|(i, c)| (c.as_str(), i as i32)).collect();
    Column::Categorical { codes: values.iter().map(|v| index.get(v.as_str()).copied().unwrap_or(-1)).collect(), categories: categories.to_vec().into(), ordered: false }
}

/// `uns['neurofm_annotation']`: which model labelled the cells, and how.
struct Provenance {
    model: String,
    checkpoint: String,
    min_confidence: f64,
    model_genes: usize,
    model_genes_found: usize,
}

/// Writes the AnnData file to a temp name beside `path`, then renames it: `X` absent, `var`
/// empty, `obs` as given, `obsm` the probabilities and embeddings, `uns` the class order and
/// the provenance.
fn write_h5ad(path: &Path, obs: &Frame, proba: &Array2<f32>, emb: &Array2<f32>, classes: &[String], p: &Provenance) -> Result<()> {
    common::atomic::write_via_temp(path, |tmp| write_contents(tmp, obs, proba, emb, classes, p), FinetuneError::io)
}

fn write_contents(path: &Path, obs: &Frame, proba: &Array2<f32>, emb: &Array2<f32>, classes: &[String], p: &Provenance) -> Result<()> {
    let file = hdf5::File::create(path).map_err(h5err(path, "/"))?;
    encoding(&file, "anndata", "0.1.0", path)?;
    frame(&file, "obs", obs, path)?;
    frame(&file, "var", &Frame { index_name: "_index".into(), index: Vec::new(), columns: Vec::new() }, path)?;
    let obsm = dict_group(&file, "obsm", path)?;
    for (key, x) in [("neurofm_probabilities", proba), ("X_neurofm", emb)] {
        let (n, d) = x.dim();
        let flat: Vec<f32> = x.iter().copied().collect();
        let ds = obsm.new_dataset::<f32>().shape([n, d]).create(key).map_err(h5err(path, key))?;
        ds.write_raw(&flat).map_err(h5err(path, key))?;
        encoding(&ds, "array", "0.2.0", path)?;
    }
    let uns = dict_group(&file, "uns", path)?;
    let ds = strings(&uns, "neurofm_classes", classes, path)?;
    encoding(&ds, "string-array", "0.2.0", path)?;
    let a = dict_group(&uns, "neurofm_annotation", path)?;
    for (key, value) in [("model", &p.model), ("checkpoint", &p.checkpoint)] {
        let ds = a.new_dataset::<hdf5::types::VarLenUnicode>().create(key).map_err(h5err(path, key))?;
        let v: hdf5::types::VarLenUnicode = value.parse().map_err(|e| FinetuneError::Internal(format!("{e:?}")))?;
        ds.write_scalar(&v).map_err(h5err(path, key))?;
        encoding(&ds, "string", "0.2.0", path)?;
    }
    let ds = a.new_dataset::<f64>().create("min_confidence").map_err(h5err(path, "min_confidence"))?;
    ds.write_scalar(&p.min_confidence).map_err(h5err(path, "min_confidence"))?;
    encoding(&ds, "numeric-scalar", "0.2.0", path)?;
    for (key, value) in [("model_genes", p.model_genes as i64), ("model_genes_found", p.model_genes_found as i64)] {
        let ds = a.new_dataset::<i64>().create(key).map_err(h5err(path, key))?;
        ds.write_scalar(&value).map_err(h5err(path, key))?;
        encoding(&ds, "numeric-scalar", "0.2.0", path)?;
    }
    for g in ["layers", "obsp", "varm", "varp"] {
        dict_group(&file, g, path)?;
    }
    file.close().map_err(h5err(path, "/"))?;
    Ok(())
}
