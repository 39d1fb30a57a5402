//! The pretraining run a fine-tune starts from, and the classifier's full shape.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dataloader::mask::SequenceMode;
use dataloader::tokenize::Tokenizer;
use evaluation::embed::{EmbeddingChoice, TrainedModel};
use tch::{Device, Kind};
use trainer::checkpoint::TrainState;
use trainer::config::{EmbeddingConfig, ModelConfig, Precision, TrainConfig};
use trainer::model::Vocabulary;

use crate::config::FinetuneConfig;
use crate::error::{FinetuneError, Result};

/// A pretraining run, checked: its config, the chosen checkpoint's state, and the tokenizer
/// that checkpoint was trained with.
pub struct Pretrained {
    pub run: PathBuf,
    pub checkpoint: PathBuf,
    pub config: TrainConfig,
    pub state: TrainState,
    pub tokenizer: Arc<Tokenizer>,
}

impl Pretrained {
    /// Opens `which` (`best`, `last`, a path) of `run` with evaluation's checks: a run
    /// directory with checkpoints whose tokenizer is the one they were trained with.
    pub fn open(run: &Path, which: &str) -> Result<Pretrained> {
        if run.join(crate::run_files::FINETUNE_CONFIG).is_file() {
            tracing::info!("{} is a fine-tune: its fine-tuned encoder is the starting point (its head is not)", run.display());
        }
        let m = TrainedModel::load(run, which, Device::Cpu).map_err(|e| match e {
            evaluation::EvalError::BadInput { path, problem } => {
                FinetuneError::BadInput { path, problem: format!("{problem} (--pretrained takes a run directory written by neurofm-train)") }
            }
            other => other.into(),
        })?;
        Ok(Pretrained { run: m.run.clone(), checkpoint: m.checkpoint.clone(), config: m.config.clone(), state: m.state.clone(), tokenizer: m.tokenizer.clone() })
    }

    /// The pretraining run's own throughput (`throughput.json`), to set beside fine-tuning's.
    pub fn cells_per_s(&self) -> Option<f64> {
        let text = std::fs::read(self.run.join("throughput.json")).ok()?;
        serde_json::from_slice::<serde_json::Value>(&text).ok()?["cells_per_s"].as_f64()
    }
}

/// Everything that fixes the classifier's parameters and forward pass: the encoder's shape,
/// the cell embedding, the sequences it reads, and the head.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    pub model: ModelConfig,
    pub vocab: Vocabulary,
    /// The pooling and the (1-based) layer whose token states are pooled.
    pub choice: EmbeddingChoice,
    pub sequence: SequenceMode,
    pub encoder_dropout: f64,
    pub head_hidden: usize,
    pub head_dropout: f64,
    pub precision: Precision,
}

/// Fills the fine-tune config's unset `head.pooling` and `encoder.dropout` with the pretraining
/// run's choices and `head.layer` with the layer below the top, so `finetune.toml` holds the
/// values used.
pub fn resolve_defaults(cfg: &mut FinetuneConfig, encoder: &TrainConfig) {
    cfg.head.pooling.get_or_insert(encoder.embedding.pooling);
    cfg.head.layer.get_or_insert(if encoder.model.n_layers >= 2 { -2 } else { -1 });
    cfg.encoder.dropout.get_or_insert(encoder.model.dropout);
}

impl Architecture {
    /// The shape of a classifier: the encoder of `state` (its checkpoint) read with the sequences
    /// of `encoder` (its config), and the head and embedding of `cfg` (resolved first).
    pub fn new(cfg: &FinetuneConfig, encoder: &TrainConfig, state: &TrainState) -> Result<Architecture> {
        let (Some(pooling), Some(layer), Some(encoder_dropout)) = (cfg.head.pooling, cfg.head.layer, cfg.encoder.dropout) else {
            return Err(FinetuneError::Internal("head.pooling, head.layer and encoder.dropout must be resolved first".into()));
        };
        let layer = EmbeddingConfig::resolve_layer(layer, state.model.n_layers).map_err(|e| FinetuneError::Usage(format!("head.layer: {e}")))?;
        Ok(Architecture {
            model: state.model.clone(),
            vocab: state.vocab,
            choice: EmbeddingChoice { pooling, layer },
            sequence: encoder.sequence,
            encoder_dropout,
            head_hidden: cfg.head.hidden,
            head_dropout: cfg.head.dropout,
            precision: cfg.train.precision,
        })
    }

    /// Matmul kind: fp32 on the CPU unless bf16 is asked for, bf16 on GPUs unless fp32 is.
    pub fn compute(&self, device: Device) -> Kind {
        self.precision.compute_kind(device)
    }

    /// Width of the cell embedding (the head's input).
    pub fn embedding_dim(&self) -> usize {
        self.choice.pooling.dim(self.model.d_model)
    }
}
