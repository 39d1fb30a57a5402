//! Cell embeddings from a trained run: the run's tokenizer and gene order, no masking, batched
//! forward passes without gradients, pooled token states (bf16 matmuls on GPU).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use dataloader::mask::Batcher;
use dataloader::shard::CellBatch;
use dataloader::tokenize::Tokenizer;
use ndarray::Array2;
use tch::{Device, Kind, Tensor};
use trainer::checkpoint::{read_state, Checkpoints, TrainState, MODEL_FILE};
use trainer::config::TrainConfig;
use trainer::model::{self, Encoder, Pooling};
use trainer::train::DeviceBatch;

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
        let (mut vs, mut encoder) = model::build(&state.model, state.vocab, device, config.seed);
        vs.load(checkpoint.join(MODEL_FILE)).map_err(|e| EvalError::input(&checkpoint.join(MODEL_FILE), format!("weights do not load into the model of state.json: {e}")))?;
        encoder.compute = if device == Device::Cpu { Kind::Float } else { Kind::BFloat16 };
        Ok(TrainedModel { run: run.to_path_buf(), checkpoint, config, state, tokenizer: Arc::new(tokenizer), device, encoder, _vs: vs })
    }

    /// The same architecture, randomly initialized from `seed`: the "untrained" baseline.
    pub fn untrained(&self, seed: u64) -> TrainedModel {
        let (vs, mut encoder) = model::build(&self.state.model, self.state.vocab, self.device, seed);
        encoder.compute = self.encoder.compute;
        TrainedModel {
            run: self.run.clone(),
            checkpoint: self.checkpoint.clone(),
            config: self.config.clone(),
            state: self.state.clone(),
            tokenizer: self.tokenizer.clone(),
            device: self.device,
            encoder,
            _vs: vs,
        }
    }

    /// Number of model parameters.
    pub fn parameters(&self) -> usize {
        self.encoder.param_counts().0
    }

    /// Width of one embedding for `pooling`.
    pub fn embedding_dim(&self, pooling: Pooling) -> usize {
        let d = self.state.model.d_model;
        if pooling == Pooling::Concat { 3 * d } else { d }
    }

    /// Embeddings of `cells` (ascending store rows), one row per cell, in `batch_size` batches.
    pub fn embed(&self, data: &EvalData, genes: &GeneMap, cells: &[usize], pooling: Pooling, batch_size: usize) -> Result<Embedded> {
        let _guard = tch::no_grad_guard();
        // Without masking, `nonzero-plus-zeros` draws its zero genes from the cell id alone, so
        // an embedding never depends on the batch or the run.
        let batcher = Batcher::new(self.tokenizer.clone(), self.config.sequence, None)?;
        let dim = self.embedding_dim(pooling);
        let mut out = Array2::<f32>::zeros((cells.len(), dim));
        let bar = dataloader::convert::progress_bar(true, cells.len() as u64);
        let start = Instant::now();
        for (b, chunk) in cells.chunks(batch_size.max(1)).enumerate() {
            let counts = genes.remap(&data.counts(chunk)?);
            let batch = CellBatch { cells: chunk.iter().map(|&c| c as u32).collect(), counts };
            let mut tokens = batcher.build(&batch, 0);
            pad_missing_genes(&mut tokens, genes, &self.tokenizer);
            let dev = DeviceBatch::new(&tokens, self.device)?;
            let states = self.encoder.forward(&dev.genes, &dev.bins, dev.padding.as_ref(), false)?;
            let padding = match &dev.padding {
                Some(p) => p.shallow_clone(),
                None => Tensor::f_zeros(dev.genes.size(), (Kind::Bool, self.device))?,
            };
            let pooled = self.encoder.pool(&states, &padding, pooling)?.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
            let flat: Vec<f32> = Vec::<f32>::try_from(pooled.f_view([-1])?)?;
            let row0 = b * batch_size.max(1);
            for (i, row) in flat.chunks(dim).enumerate() {
                out.row_mut(row0 + i).assign(&ndarray::ArrayView1::from(row));
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        let seconds = start.elapsed().as_secs_f64();
        Ok(Embedded { x: out, seconds })
    }
}

/// Embeddings and how long they took.
pub struct Embedded {
    pub x: Array2<f32>,
    pub seconds: f64,
}

/// Model genes the data lacks become padding: unknown is not the same as "not expressed".
fn pad_missing_genes(b: &mut dataloader::mask::MaskedBatch, genes: &GeneMap, tok: &Tokenizer) {
    if genes.missing.is_empty() {
        return;
    }
    let n_genes = tok.genes.len() as i64;
    for p in 0..b.gene_ids.len() {
        let g = b.gene_ids[p];
        if g < n_genes && !genes.present[g as usize] {
            b.gene_ids[p] = n_genes + 1;
            b.input_bins[p] = tok.vocab.pad();
            b.padding[p] = true;
        }
    }
}
