//! The training config: one TOML file, every key defaulted, unknown keys refused.
//!
//! A run is reproducible from its resolved `config.toml` alone (every default written out),
//! so the structs here are the single source of truth for settings; `--set a.b=v` edits the
//! TOML before it is typed, so overrides get the same checks as the file.

use std::path::{Path, PathBuf};

use dataloader::corpus::StoreSpec;
use dataloader::genes::{GeneCase, VocabularySpec};
use dataloader::mask::{SequenceMode, ViewConfig};
use dataloader::shard::ReadPlan;
use dataloader::split::SplitUnit;
use dataloader::tokenize::BinningKind;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::objectives::ObjectivesConfig;
use crate::pooling::Pooling;

/// Everything a training run needs to know.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// One seed for initialization, split, shuffling, masking and dropout.
    pub seed: u64,
    pub data: DataConfig,
    pub tokenizer: TokenizerConfig,
    pub sequence: SequenceMode,
    pub mask: MaskSection,
    /// How each training cell is perturbed (thinning, a second view for contrastive terms).
    pub views: ViewConfig,
    pub objectives: ObjectivesConfig,
    pub split: SplitSection,
    pub model: ModelConfig,
    /// Which cell vector the run recommends (evaluation and fine-tuning default to it).
    pub embedding: EmbeddingConfig,
    pub optim: OptimConfig,
    pub train: LoopConfig,
}

/// The cell embedding a run recommends: a pooling of one layer's token states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingConfig {
    pub pooling: Pooling,
    /// `-1`: the last layer (after the final norm), `-2` the one before, ...; `k ≥ 1`: layer k.
    pub layer: i64,
}

impl Default for EmbeddingConfig {
    fn default() -> Self {
        EmbeddingConfig { pooling: Pooling::Mean, layer: -1 }
    }
}

impl EmbeddingConfig {
    /// The 1-based layer `layer` names in a model of `n_layers`, or a message naming the range.
    pub fn resolve_layer(layer: i64, n_layers: usize) -> Result<usize> {
        let n = n_layers as i64;
        let k = if layer < 0 { n + 1 + layer } else { layer };
        if layer == 0 || k < 1 || k > n {
            return Err(TrainError::Config(format!("embedding layer {layer}: the model has {n} layers; use 1..{n}, or -1 (last) .. -{n}")));
        }
        Ok(k as usize)
    }
}

/// Where cells come from and how they are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// The zarr store made by `neurofm-data convert` (or `--data`); or list `stores`.
    pub store: PathBuf,
    /// A corpus: several stores in one run (`[[data.stores]]` with `path`, optional
    /// `gene_key` and `weight`; `--data` repeated).
    pub stores: Vec<StoreSpec>,
    /// The run's genes: `union` of the stores' genes, or `list:FILE`.
    pub vocabulary: VocabularySpec,
    /// `insensitive`: `Gad1` = `GAD1` (mouse and human symbols).
    pub gene_case: GeneCase,
    /// `local`: each rank reads its own ~1/world of the chunks (default); `global`: the
    /// epoch order is independent of the world size, every rank reading every chunk.
    pub read_plan: ReadPlan,
    /// Background threads that read, tokenize and mask batches.
    pub workers: usize,
    /// Batches each worker prepares ahead.
    pub prefetch: usize,
    /// Validation uses at most this many cells (0: all), chosen deterministically.
    pub val_max_cells: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            store: PathBuf::new(),
            stores: Vec::new(),
            vocabulary: VocabularySpec::Union,
            gene_case: GeneCase::Exact,
            read_plan: ReadPlan::Local,
            workers: 2,
            prefetch: 4,
            val_max_cells: 0,
        }
    }
}

impl DataConfig {
    /// The run's stores: `stores`, or the one `store`; naming neither or both is an error.
    pub fn store_specs(&self) -> Result<Vec<StoreSpec>> {
        match (self.store.as_os_str().is_empty(), self.stores.is_empty()) {
            (true, true) => Err(TrainError::Config("no data: pass --data STORE (repeatable; a store made by `neurofm-data convert`) or list [[data.stores]]".into())),
            (false, false) => Err(TrainError::Config("data.store and data.stores are both set; list every store in data.stores".into())),
            (false, true) => Ok(vec![StoreSpec::new(&self.store)]),
            (true, false) => Ok(self.stores.clone()),
        }
    }
}

/// How expression becomes bins (DESIGN §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerConfig {
    pub kind: BinningKind,
    /// Bins including bin 0 for zero expression.
    pub n_bins: usize,
    /// `gene-quantile` edges are fitted on at most this many training cells.
    pub max_fit_cells: usize,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        TokenizerConfig { kind: BinningKind::GeneQuantile, n_bins: 20, max_fit_cells: 200_000 }
    }
}

/// Which positions are masked; the seed is the run's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskSection {
    pub ratio: f64,
    /// Share of the masked positions drawn among non-zero genes.
    pub nonzero_fraction: f64,
}

impl Default for MaskSection {
    fn default() -> Self {
        MaskSection { ratio: 0.15, nonzero_fraction: 0.5 }
    }
}

/// Train/validation split; the seed is the run's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitSection {
    pub val_fraction: f64,
    /// Hold out whole groups of this obs column (e.g. `library_label`); empty: by `unit`.
    pub by: String,
    /// `cell` (hashed names) or `block` (whole read blocks: for atlas-sized stores).
    pub unit: SplitUnit,
}

impl Default for SplitSection {
    fn default() -> Self {
        SplitSection { val_fraction: 0.2, by: String::new(), unit: SplitUnit::Cell }
    }
}

/// Shape of the encoder (DESIGN §4). Changing any of it makes old checkpoints unusable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    pub d_ff: usize,
    /// Dropout on embeddings and residual branches.
    pub dropout: f64,
    /// Dropout on attention probabilities. On the CPU non-zero forces the unfused attention
    /// path, which materializes a sequence × sequence matrix per head (the original's memory
    /// problem); CUDA's fused kernels support it.
    pub attention_dropout: f64,
    /// scFoundation's read-depth-aware input: `[CLS]` is told the log depth of the input view
    /// and of the full cell (pair it with `views.predict_full`).
    #[serde(default)]
    pub depth_tokens: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { d_model: 64, n_heads: 4, n_layers: 3, d_ff: 2048, dropout: 0.1, attention_dropout: 0.0, depth_tokens: false }
    }
}

/// AdamW with linear warmup and cosine decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    /// Decoupled weight decay, applied to matrices and embeddings (not to biases and norms).
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub warmup_steps: u64,
    /// The learning rate decays to `lr × min_lr_ratio` at the last step.
    pub min_lr_ratio: f64,
    /// Global gradient norm is clipped to this (0: no clipping).
    pub clip_norm: f64,
}

impl OptimConfig {
    /// Refuses values AdamW cannot use (NaN included), naming the key; fine-tuning's config
    /// holds the same struct and calls this too.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err(TrainError::Config(format!("optim.{key}: {why}")));
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("{} must be a positive number", self.lr));
        }
        for (key, v) in [("weight_decay", self.weight_decay), ("clip_norm", self.clip_norm)] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(key, format!("{v} must be a number ≥ 0"));
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return bad("eps", format!("{} must be a number > 0", self.eps));
        }
        for (key, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(key, format!("{v} must be in [0, 1)"));
            }
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio", format!("{} must be in [0, 1]", self.min_lr_ratio));
        }
        Ok(())
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig { lr: 5e-4, weight_decay: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, warmup_steps: 0, min_lr_ratio: 0.1, clip_norm: 1.0 }
    }
}

/// Numeric precision of the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// bf16 mixed precision on CUDA, fp32 on CPU.
    Auto,
    /// bf16 matmuls and attention with fp32 weights, norms and loss (also on CPUs with bf16 units).
    Bf16,
    Fp32,
}

impl Precision {
    /// Matmul kind on `device`: fp32 on the CPU unless bf16 is asked for, bf16 on GPUs unless
    /// fp32 is.
    pub fn compute_kind(self, device: tch::Device) -> tch::Kind {
        match (self, device) {
            (Precision::Fp32, _) | (Precision::Auto, tch::Device::Cpu) => tch::Kind::Float,
            (Precision::Bf16 | Precision::Auto, _) => tch::Kind::BFloat16,
        }
    }
}

/// The training loop: batches, length, logging and checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopConfig {
    /// Cells per micro-batch on each rank.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (cells per step = batch_size × grad_accum × ranks).
    pub grad_accum: usize,
    pub epochs: u64,
    /// Stop after this many optimizer steps (0: after `epochs`).
    pub max_steps: u64,
    /// Steps between training log rows.
    pub log_every: u64,
    /// Steps between validations (0: at the end of every epoch).
    pub val_every: u64,
    /// Steps between checkpoints (0: at every validation).
    pub checkpoint_every: u64,
    /// Step checkpoints kept besides `best`.
    pub keep_last: usize,
    pub precision: Precision,
    /// CPU threads for libtorch (0: libtorch's default, one per core).
    pub threads: usize,
    /// Peak device rate for MFU in TFLOP/s (0: known GPU table, or measured on CPU).
    pub peak_tflops: f64,
    /// Size of the gradient slices all-reduced at once across ranks, in MiB.
    pub bucket_mb: f64,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            batch_size: 64,
            grad_accum: 1,
            epochs: 30,
            max_steps: 0,
            log_every: 10,
            val_every: 0,
            checkpoint_every: 0,
            keep_last: 3,
            precision: Precision::Auto,
            threads: 0,
            peak_tflops: 0.0,
            bucket_mb: 25.0,
        }
    }
}

impl TrainConfig {
    /// Reads `path`, applies `key=value` overrides, and checks every value.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let mut table: toml::Table = text.parse().map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let cfg: TrainConfig = table.try_into().map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The resolved config as TOML, every default written out.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| TrainError::Internal(format!("config does not serialize: {e}")))
    }

    /// Refuses values that would fail later or silently do something else.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        let bad = |key: &str, why: String| Err(TrainError::Config(format!("{key}: {why}")));
        if m.d_model == 0 || m.n_heads == 0 || m.n_layers == 0 || m.d_ff == 0 {
            return bad("model", "d_model, n_heads, n_layers and d_ff must be ≥ 1".into());
        }
        if !m.d_model.is_multiple_of(m.n_heads) {
            return bad("model.n_heads", format!("{} does not divide model.d_model = {}; pick n_heads among its divisors", m.n_heads, m.d_model));
        }
        for (key, p) in [("model.dropout", m.dropout), ("model.attention_dropout", m.attention_dropout)] {
            if !(0.0..1.0).contains(&p) {
                return bad(key, format!("{p} must be in [0, 1)"));
            }
        }
        self.optim.validate()?;
        let t = &self.train;
        if t.batch_size == 0 || t.grad_accum == 0 {
            return bad("train.batch_size / train.grad_accum", "must be ≥ 1".into());
        }
        if t.epochs == 0 && t.max_steps == 0 {
            return bad("train.epochs", "0 with train.max_steps = 0 would train nothing".into());
        }
        if t.log_every == 0 {
            return bad("train.log_every", "must be ≥ 1".into());
        }
        if !(0.0..1.0).contains(&self.split.val_fraction) || self.split.val_fraction == 0.0 {
            return bad("split.val_fraction", format!("{} must be in (0, 1): validation needs cells", self.split.val_fraction));
        }
        if !(0.0..=1.0).contains(&self.mask.ratio) || !(0.0..=1.0).contains(&self.mask.nonzero_fraction) || self.mask.ratio == 0.0 {
            return bad("mask", "ratio must be in (0, 1] and nonzero_fraction in [0, 1]".into());
        }
        if !(t.bucket_mb > 0.0 && t.bucket_mb.is_finite()) {
            return bad("train.bucket_mb", format!("{} must be > 0", t.bucket_mb));
        }
        self.views.validate()?;
        let ranked = self.tokenizer.kind.is_ranked();
        self.objectives.validate(self.views.count)?;
        if self.model.depth_tokens && ranked {
            return bad("model.depth_tokens", "is for binned sequences; ranked (rank-*) sequences are depth-robust by construction".into());
        }
        if self.tokenizer.n_bins < 3 {
            return bad("tokenizer.n_bins", format!("{}: need at least 3 (zero + two expression bins)", self.tokenizer.n_bins));
        }
        if let SequenceMode::NonzeroPlusZeros { max_len } = self.sequence {
            if max_len < 2 {
                return bad("sequence.max_len", format!("{max_len}: must be ≥ 2 ([CLS] + one gene)"));
            }
        }
        Ok(())
    }
}

/// Sets `a.b.c = value` in `table`; the value is read as TOML (`3`, `1e-4`, `true`, `"x"`)
/// and as a plain string when it is not valid TOML (`--set data.store=/path`). Public so that
/// other configs (fine-tuning's) take `--set` overrides with the same rules.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| TrainError::Config(format!("--set {assignment}: expected key=value, e.g. --set optim.lr=1e-4")))?;
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, parents) = parts.split_last().ok_or_else(|| TrainError::Config(format!("--set {assignment}: empty key")))?;
    let mut at = table;
    for p in parents {
        let entry = at.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = entry
            .as_table_mut()
            .ok_or_else(|| TrainError::Config(format!("--set {assignment}: `{p}` is a value, not a section")))?;
    }
    at.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, overrides: &[&str]) -> Result<TrainConfig> {
        let dir = tempfile::tempdir().map_err(|e| TrainError::Internal(e.to_string()))?;
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).map_err(|e| TrainError::io(&path, e))?;
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        TrainConfig::load(&path, &o)
    }

    #[test]
    fn defaults_fill_missing_keys_and_round_trip() {
        let cfg = load_str("seed = 7\n[model]\nd_model = 32\n", &[]).unwrap();
        assert_eq!(cfg.seed, 7);
        assert_eq!(cfg.model.d_model, 32);
        assert_eq!(cfg.model.n_layers, ModelConfig::default().n_layers);
        let again: TrainConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn unknown_and_ill_typed_keys_are_named() {
        let e = load_str("[model]\nd_modle = 32\n", &[]).unwrap_err().to_string();
        assert!(e.contains("d_modle"), "{e}");
        let e = load_str("[optim]\nlr = \"fast\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("lr"), "the message names the key: {e}");
    }

    /// Every preset in configs/ loads with the current keys (a renamed key fails here, not on
    /// a user's cluster).
    #[test]
    fn every_shipped_config_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                TrainConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 6, "found {n} configs in {}", dir.display());
    }

    #[test]
    fn heads_must_divide_width() {
        let e = load_str("[model]\nd_model = 64\nn_heads = 3\n", &[]).unwrap_err().to_string();
        assert!(e.contains("model.n_heads") && e.contains("64"), "{e}");
    }

    #[test]
    fn overrides_are_typed_and_checked() {
        let cfg = load_str("", &["optim.lr=1e-3", "data.store=/tmp/x.zarr", "sequence.mode=\"nonzero-plus-zeros\"", "sequence.max_len=128"]).unwrap();
        assert_eq!(cfg.optim.lr, 1e-3);
        assert_eq!(cfg.data.store, PathBuf::from("/tmp/x.zarr"));
        assert_eq!(cfg.sequence, SequenceMode::NonzeroPlusZeros { max_len: 128 });
        assert!(load_str("", &["model.n_heads=5"]).is_err());
        assert!(load_str("", &["train.batchsize=3"]).unwrap_err().to_string().contains("batchsize"));
        assert!(load_str("", &["noequals"]).is_err());
    }
}
