//! Cell embeddings from a trained run: the run's tokenizer and gene order, no masking, batched
//! forward passes without gradients, one layer's token states pooled (bf16 matmuls on GPU);
//! and, from the same passes, each gene's contextual state averaged per label.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use dataloader::corpus::Panels;
use dataloader::mask::{Batcher, MaskedBatch, ViewConfig};
use dataloader::shard::CellBatch;
use dataloader::tokenize::Tokenizer;
use ndarray::{Array2, Array3};
use tch::{Device, Kind, Tensor};
use trainer::batch::DeviceBatch;
use trainer::checkpoint::{read_state, Checkpoints, TrainState, MODEL_FILE};
use trainer::config::{EmbeddingConfig, TrainConfig};
use trainer::model::{self, Encoder, Tokens};
use trainer::pooling::{pool, Pooling};

use crate::dataset::{EvalData, GeneMap};
use crate::error::{EvalError, Result};

/// A run's model, ready to embed cells.
pub struct TrainedModel {
    pub run: PathBuf,
    /// The checkpoint directory the weights came from.
    pub checkpoint: PathBuf,
    pub config: TrainConfig,
    pub state: TrainState,
    pub tokenizer: Arc<Tokenizer>,
    pub device: Device,
    encoder: Encoder,
    _vs: tch::nn::VarStore,
}

/// Cells per forward pass when embedding or predicting, unless set: on CPU small batches keep
/// activations in cache (WHB with seed-hello's model embeds at 11.6 cells/s with 8 cells per
/// pass and 8.7 with 64; 2 cores, release), on GPU 64.
pub fn default_batch_size(device: tch::Device) -> usize {
    if device == tch::Device::Cpu {
        8
    } else {
        64
    }
}

/// Which cell vector to extract: a pooling of one layer (1-based) of the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingChoice {
    pub pooling: Pooling,
    pub layer: usize,
}

impl TrainedModel {
    /// Loads `which` (`best`, `last` or a checkpoint path) of `run`, refusing a checkpoint whose
    /// tokenizer is not the run's.
    pub fn load(run: &Path, which: &str, device: Device) -> Result<TrainedModel> {
        let config_path = run.join("config.toml");
        if !config_path.is_file() {
            return Err(EvalError::input(run, "is not a neurofm run directory (no config.toml); --run takes the directory neurofm-train wrote"));
        }
        let ckpts = Checkpoints::new(run);
        if matches!(which, "best" | "last") && ckpts.steps()?.is_empty() {
            return Err(EvalError::input(run, "has no checkpoints yet; let neurofm-train save one (train.checkpoint_every) or pass --checkpoint PATH"));
        }
        let checkpoint = ckpts.resolve(which)?;
        let state = read_state(&checkpoint)?;
        let config = TrainConfig::load(&config_path, &[])?;
        let tok_path = run.join("tokenizer.json");
        let sha = dataloader::convert::sha256_file(&tok_path)?;
        if sha != state.tokenizer_sha256 {
            return Err(EvalError::input(
                &tok_path,
                format!("is not the tokenizer checkpoint {} was trained with (sha256 differs); evaluate the checkpoint with the run directory that wrote it", checkpoint.display()),
            ));
        }
        let tokenizer = Tokenizer::load(&tok_path)?;
        if tokenizer.genes.len() != state.vocab.n_genes || tokenizer.vocab.n_bins != state.vocab.n_bins {
            return Err(EvalError::input(&tok_path, format!("tokenizer ({} genes, {} bins) does not match checkpoint {} ({} genes, {} bins)", tokenizer.genes.len(), tokenizer.vocab.n_bins, checkpoint.display(), state.vocab.n_genes, state.vocab.n_bins)));
        }
        let (vs, mut encoder) = model::build(&state.model, state.vocab, device, config.seed)?;
        model::load_weights(&vs, &checkpoint.join(MODEL_FILE)).map_err(|e| EvalError::input(&checkpoint.join(MODEL_FILE), format!("weights do not load into the model of state.json: {e}")))?;
        encoder.compute = if device == Device::Cpu { Kind::Float } else { Kind::BFloat16 };
        Ok(TrainedModel { run: run.to_path_buf(), checkpoint, config, state, tokenizer: Arc::new(tokenizer), device, encoder, _vs: vs })
    }

    /// The same architecture, randomly initialized from `seed`: the "untrained" baseline.
    pub fn untrained(&self, seed: u64) -> Result<TrainedModel> {
        let (vs, mut encoder) = model::build(&self.state.model, self.state.vocab, self.device, seed)?;
        encoder.compute = self.encoder.compute;
        Ok(TrainedModel {
            run: self.run.clone(),
            checkpoint: self.checkpoint.clone(),
            config: self.config.clone(),
            state: self.state.clone(),
            tokenizer: self.tokenizer.clone(),
            device: self.device,
            encoder,
            _vs: vs,
        })
    }

    /// Number of model parameters.
    pub fn parameters(&self) -> usize {
        self.encoder.param_counts().0
    }

    /// The embedding `pooling`/`layer` ask for, the run's recommendation filling what is unset
    /// (`layer` as in `EmbeddingConfig`: -1 last, -2 second-to-last, k ≥ 1 layer k).
    pub fn choice(&self, pooling: Option<Pooling>, layer: Option<i64>) -> Result<EmbeddingChoice> {
        let e = &self.config.embedding;
        let layer = EmbeddingConfig::resolve_layer(layer.unwrap_or(e.layer), self.state.model.n_layers)?;
        Ok(EmbeddingChoice { pooling: pooling.unwrap_or(e.pooling), layer })
    }

    /// Embeddings of `cells` (ascending store rows), one row per cell, in `batch_size` batches;
    /// with `gene_groups` (a group per cell, `n_groups` of them), also each gene's state
    /// averaged per group.
    pub fn embed(&self, data: &EvalData, genes: &GeneMap, cells: &[usize], choice: EmbeddingChoice, batch_size: usize, gene_groups: Option<(&[usize], usize)>) -> Result<Embedded> {
        let _guard = tch::no_grad_guard();
        // Without masking, `nonzero-plus-zeros` draws its zero genes from the cell id alone, so
        // an embedding never depends on the batch or the run.
        // Genes the data lacks are left out of its sequences: unknown is not "not expressed".
        let batcher = Batcher::new(self.tokenizer.clone(), self.config.sequence, None, ViewConfig::SINGLE)?.with_panels(Arc::new(Panels::one(genes.present.clone())));
        let d = self.state.model.d_model;
        let dim = choice.pooling.dim(d);
        let mut out = Array2::<f32>::zeros((cells.len(), dim));
        let mut per_gene = gene_groups.map(|(_, n)| GeneStates::new(n, self.tokenizer.genes.len(), d));
        let bar = common::progress::bar(cells.len() as u64, "cells");
        let start = Instant::now();
        let vocab = self.state.vocab;
        for (b, chunk) in cells.chunks(batch_size.max(1)).enumerate() {
            let counts = genes.remap(&data.counts(chunk)?);
            let batch = CellBatch { cells: chunk.iter().map(|&c| c as u32).collect(), counts };
            let tokens = batcher.build(&batch, 0);
            let dev = DeviceBatch::new(&tokens, self.device, self.tokenizer.gene_pad(), false)?;
            let v = &dev.views[0];
            let depth = self.state.model.depth_tokens.then_some(&v.depth);
            let states = self.encoder.forward_layers(&Tokens { genes: &v.genes, bins: &v.bins, padding: v.padding.as_ref(), depth }, false, choice.layer)?;
            let states = states.last().ok_or_else(|| EvalError::Internal("no layer states".into()))?;
            let padding = match &v.padding {
                Some(p) => p.shallow_clone(),
                None => Tensor::f_zeros(v.genes.size(), (Kind::Bool, self.device))?,
            };
            let pooled = pool(states, &v.bins, &padding, vocab.n_bins, vocab.ranked, choice.pooling)?.f_to_device(Device::Cpu)?.f_contiguous()?;
            let flat: Vec<f32> = Vec::<f32>::try_from(pooled.f_view([-1])?)?;
            let row0 = b * batch_size.max(1);
            for (i, row) in flat.chunks(dim).enumerate() {
                out.row_mut(row0 + i).assign(&ndarray::ArrayView1::from(row));
            }
            if let (Some(acc), Some((groups, _))) = (per_gene.as_mut(), gene_groups) {
                acc.add(states, &tokens, &groups[row0..row0 + chunk.len()], self.tokenizer.genes.len())?;
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        let seconds = start.elapsed().as_secs_f64();
        Ok(Embedded { x: out, seconds, genes: per_gene.map(GeneStates::means) })
    }

    /// The static gene embedding table `[n_genes, d_model]`.
    pub fn gene_table(&self) -> Result<Array2<f32>> {
        let t = self.encoder.gene_table()?.f_detach()?.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let (g, d) = (t.size()[0] as usize, t.size()[1] as usize);
        let v = Vec::<f32>::try_from(t.f_view([-1])?)?;
        Array2::from_shape_vec((g, d), v).map_err(|e| EvalError::Internal(e.to_string()))
    }
}

/// Embeddings and how long they took.
pub struct Embedded {
    pub x: Array2<f32>,
    pub seconds: f64,
    /// `[group, gene, d]` mean contextual state of each gene per group (NaN where a group's
    /// cells never had the gene in their sequences), and how many cells each mean holds.
    pub genes: Option<(Array3<f32>, Array2<u32>)>,
}

/// Running sums of gene token states per group.
struct GeneStates {
    sum: Array3<f64>,
    count: Array2<u32>,
}

impl GeneStates {
    fn new(groups: usize, genes: usize, d: usize) -> Self {
        GeneStates { sum: Array3::zeros((groups, genes, d)), count: Array2::zeros((groups, genes)) }
    }

    fn add(&mut self, states: &Tensor, tokens: &MaskedBatch, groups: &[usize], n_genes: usize) -> Result<()> {
        let (b, l, d) = states.size3()?;
        let host = Vec::<f32>::try_from(states.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?.f_view([-1])?)?;
        let v = tokens.first();
        for i in 0..b as usize {
            for p in 1..l as usize {
                let g = v.gene_ids[i * l as usize + p];
                if g < 0 || g as usize >= n_genes {
                    continue;
                }
                let at = (i * l as usize + p) * d as usize;
                let mut row = self.sum.slice_mut(ndarray::s![groups[i], g as usize, ..]);
                for (s, &x) in row.iter_mut().zip(&host[at..at + d as usize]) {
                    *s += x as f64;
                }
                self.count[[groups[i], g as usize]] += 1;
            }
        }
        Ok(())
    }

    fn means(self) -> (Array3<f32>, Array2<u32>) {
        let mut m = self.sum.mapv(|v| v as f32);
        for ((k, g), &n) in self.count.indexed_iter() {
            m.slice_mut(ndarray::s![k, g, ..]).mapv_inplace(|v| if n > 0 { v / n as f32 } else { f32::NAN });
        }
        (m, self.count)
    }
}
