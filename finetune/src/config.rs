//! The fine-tuning config: one TOML file (optional), every key defaulted, unknown keys refused,
//! `--set a.b=v` overrides with the trainer's rules. The command-line flags of
//! `neurofm-finetune` (`--pretrained`, `--label-col`, ...) are overrides of `[task]` keys, so the
//! run directory's `finetune.toml` alone says what was trained, on what, and how.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use dataloader::mask::ViewConfig;
use evaluation::labels::SplitKind;
use serde::{Deserialize, Serialize};
use trainer::config::{apply_override, OptimConfig, Precision};
use trainer::pooling::Pooling;

use crate::error::{FinetuneError, Result};

/// Everything a fine-tuning run needs to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// One seed for the head's initialization, the validation carve, shuffling and dropout;
    /// the test split uses it as `neurofm-eval --seed` does.
    pub seed: u64,
    pub task: TaskConfig,
    pub head: HeadConfig,
    pub encoder: EncoderConfig,
    pub loss: LossConfig,
    pub optim: OptimConfig,
    pub train: LoopConfig,
    pub data: DataSection,
    pub augment: AugmentConfig,
    pub baselines: BaselineConfig,
}

/// What is learned from which cells: the pretrained run, the labelled data and the split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    /// The pretraining run directory (`--pretrained`): encoder, tokenizer and gene vocabulary.
    pub pretrained: PathBuf,
    /// `best`, `last`, or a checkpoint directory of the pretrained run.
    pub checkpoint: String,
    /// The labelled zarr store (`--data`).
    pub data: PathBuf,
    /// obs column holding the labels (`--label-col`).
    pub label_col: String,
    /// Only these label values, each its own class; empty: every value.
    pub classes: Vec<String>,
    /// Classes with fewer cells are dropped (and reported) instead of refused.
    pub min_class_cells: usize,
    /// `stratified`, or `group:COLUMN` to test on whole groups (libraries, conditions) never seen.
    pub split: String,
    /// Share of the labelled cells held out for the test (as `neurofm-eval --test-frac`).
    pub test_frac: f64,
    /// Share of the training cells (per class) held out for early stopping and model selection;
    /// 0 (the default): fit every training cell, as the baselines do, for the fixed
    /// `train.epochs` and keep the last model. On a reference of a few cells a class a
    /// validation part costs the classifier a fifth of its cells and selects on noise
    /// (MetaNeighbor +0.06 macro F1 with the layer below the top: benches/README.md, "Fine-tuning").
    pub val_frac: f64,
    /// At most this many labelled cells, a seeded sample with every class's share: the same
    /// sample `neurofm-eval --max-cells` takes, so the test cells are the same.
    pub max_cells: usize,
}

impl Default for FinetuneConfig {
    /// Pretraining's optimizer settings but a higher rate: at 5e-4 (with layer decay 0.8 and
    /// 10 epochs) the classifier under-fits its training cells (benches/README.md, "Fine-tuning").
    fn default() -> Self {
        FinetuneConfig {
            seed: 0,
            task: TaskConfig::default(),
            head: HeadConfig::default(),
            encoder: EncoderConfig::default(),
            loss: LossConfig::default(),
            optim: OptimConfig { lr: 2e-3, ..OptimConfig::default() },
            train: LoopConfig::default(),
            data: DataSection::default(),
            augment: AugmentConfig::default(),
            baselines: BaselineConfig::default(),
        }
    }
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            pretrained: PathBuf::new(),
            checkpoint: "best".into(),
            data: PathBuf::new(),
            label_col: String::new(),
            classes: Vec::new(),
            min_class_cells: 0,
            split: "stratified".into(),
            test_frac: 0.2,
            val_frac: 0.0,
            max_cells: 50_000,
        }
    }
}

impl TaskConfig {
    /// The split as evaluation understands it.
    pub fn split_kind(&self) -> Result<SplitKind> {
        SplitKind::from_str(&self.split).map_err(|e| FinetuneError::Usage(format!("task.split: {e}")))
    }
}

/// The classification head on the cell embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadConfig {
    /// How token states become the cell vector; unset: the pretrained run's `embedding.pooling`
    /// (the resolved value is written to `finetune.toml`).
    pub pooling: Option<Pooling>,
    /// Which layer is pooled (-1 last, -2 the one before, k ≥ 1 layer k); unset: the layer
    /// below the top (the top of a one-layer encoder), whose `[CLS]` is less shaped by the
    /// pretraining objectives and fine-tunes better than the top's (benches/README.md). The
    /// layers above it are not run.
    pub layer: Option<i64>,
    /// Width of the hidden layer of the MLP; 0: a linear head.
    pub hidden: usize,
    /// Dropout on the head's input and hidden layer.
    pub dropout: f64,
}

impl Default for HeadConfig {
    fn default() -> Self {
        HeadConfig { pooling: None, layer: None, hidden: 256, dropout: 0.1 }
    }
}

/// How the pretrained encoder takes part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderConfig {
    /// Train the head only (`--freeze-encoder`): a linear-probe-like control that is fast.
    pub freeze: bool,
    /// Layer-wise learning-rate decay: the top layer learns at `optim.lr`, each layer below at
    /// this factor times the one above, the embeddings at the lowest rate (1: no decay).
    pub layer_decay: f64,
    /// Dropout inside the encoder; unset: the pretrained run's `model.dropout`.
    pub dropout: Option<f64>,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig { freeze: false, layer_decay: 1.0, dropout: None }
    }
}

/// How classes of different sizes are weighed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Cross-entropy weighted by N / (K · n_k) (scikit-learn's `class_weight="balanced"`), so
    /// every class counts as much in the loss, whatever its size.
    ClassWeights,
    /// Plain cross-entropy: large classes dominate.
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    pub balance: Balance,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig { balance: Balance::ClassWeights }
    }
}

/// The loop: batches, length, validation, early stopping and checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopConfig {
    /// Cells per micro-batch on each rank.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (cells per step = batch_size × grad_accum × ranks).
    pub grad_accum: usize,
    /// Passes over the training cells; the default (60, about 1,200 steps on a reference of
    /// 1,000 cells) is what a small reference needs to fit. Larger references need fewer:
    /// set this or `max_steps`.
    pub epochs: u64,
    /// Stop after this many optimizer steps (0: after `epochs`).
    pub max_steps: u64,
    /// Classifiers trained and averaged (mean class log-probability). Each starts from the
    /// pretrained weights with its own head initialization, data order, augmentation draws and
    /// dropout (member 0 from `seed` itself, in the run directory; member m in `members/m/`).
    /// A fine-tune on a small reference varies a lot from seed to seed, and averaging removes
    /// much of that (benches/README.md, "Fine-tuning"); each member costs one more training.
    pub members: usize,
    /// Stop after this many validations without a better macro F1 (0: never stop early, the
    /// default: on a validation part of a few cells a class macro F1 is too noisy to stop on,
    /// and the `best` checkpoint is still chosen by it).
    pub patience: u64,
    /// Steps between training log rows.
    pub log_every: u64,
    /// Steps between validations (0: at the end of every epoch); each writes a checkpoint.
    pub val_every: u64,
    /// Step checkpoints kept besides `best`.
    pub keep_last: usize,
    pub precision: Precision,
    /// CPU threads for libtorch (0: libtorch's default).
    pub threads: usize,
    /// Size of the gradient slices all-reduced at once across ranks, in MiB.
    pub bucket_mb: f64,
    /// Cells per forward pass when predicting (validation, test); 0: 8 on CPU, 64 on GPU.
    pub predict_batch_size: usize,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            batch_size: 32,
            grad_accum: 1,
            epochs: 60,
            max_steps: 0,
            members: 1,
            patience: 0,
            log_every: 10,
            val_every: 0,
            keep_last: 2,
            precision: Precision::Auto,
            threads: 0,
            bucket_mb: 25.0,
            predict_batch_size: 0,
        }
    }
}

/// Perturbations of the training cells (never of validation or test cells), the pretraining
/// views' own (`[views]`): a classifier that must hold its label under them is robust to the
/// shifts they simulate, such as a new lab's per-gene effects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Standard deviation of the log of a random factor on each gene's counts (0: none). The
    /// default 1 carried labels across a generated condition shift (held-out macro F1 0.67 →
    /// 0.97) and changed neither WHB nor MetaNeighbor for the worse (`benches/README.md`).
    pub gene_scale: f64,
    /// Keep a fraction U(thin_min, 1) of each cell's counts (1: none).
    pub thin_min: f64,
    /// Test-time augmentation: predictions (the report's and `neurofm-annotate`'s) average the
    /// class log-probabilities of the measured cell and `test_views - 1` copies perturbed as
    /// the training cells are (1: the measured cell alone). A classifier that has only seen
    /// perturbed cells answers best on perturbed ones; each view costs one more forward pass.
    pub test_views: usize,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig { gene_scale: 1.0, thin_min: 1.0, test_views: 1 }
    }
}

impl AugmentConfig {
    /// The one training view these perturbations describe.
    pub fn view(&self) -> ViewConfig {
        ViewConfig { gene_scale: self.gene_scale, thin_min: self.thin_min, ..ViewConfig::SINGLE }
    }

    /// Why `test_views` cannot be averaged, if it cannot: the config's check and
    /// `neurofm-annotate --test-views`'s, so both refuse the same values.
    pub fn test_views_problem(&self) -> Option<String> {
        if self.test_views == 0 {
            return Some("must be ≥ 1 (1: the measured cells alone)".into());
        }
        if self.test_views > 1 && !self.view().perturbs() {
            return Some(format!("{} copies of unperturbed cells are the same cell; set augment.gene_scale > 0 or augment.thin_min < 1, or test views 1", self.test_views));
        }
        None
    }
}

/// Background reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Threads that read and tokenize batches.
    pub workers: usize,
    /// Batches each worker prepares ahead.
    pub prefetch: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection { workers: 2, prefetch: 4 }
    }
}

/// What the fine-tuned model is compared with, all on the same training and test cells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BaselineConfig {
    /// Logistic regression on log-normalized expression of the model's genes, not standardized
    /// (C by CV).
    pub logistic: bool,
    /// A random forest on the same features.
    pub random_forest: bool,
    pub forest_trees: usize,
    /// Also train the same architecture from random weights with the same recipe
    /// (`--from-scratch`): what pretraining adds. It runs in `RUN/from-scratch/`.
    pub from_scratch: bool,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        BaselineConfig { logistic: true, random_forest: true, forest_trees: 200, from_scratch: false }
    }
}

impl FinetuneConfig {
    /// Reads `path` (or starts from the defaults), applies `key=value` overrides, checks every
    /// value.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let (file, name) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| FinetuneError::io(p, e))?;
                let table: toml::Table = text.parse().map_err(|e| FinetuneError::Usage(format!("{}: {e}", p.display())))?;
                (table, p.display().to_string())
            }
            None => (toml::Table::new(), "the fine-tuning config".to_string()),
        };
        // Keys the file leaves out take fine-tuning's defaults, inside a table too: serde alone
        // would fill a partial `[optim]` from pretraining's `OptimConfig::default()`.
        let mut table = toml::Table::try_from(FinetuneConfig::default()).map_err(|e| FinetuneError::Internal(format!("defaults do not serialize: {e}")))?;
        merge(&mut table, file);
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let cfg: FinetuneConfig = table.try_into().map_err(|e| FinetuneError::Usage(format!("{name}: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as TOML (every default written out once `head`/`encoder` are resolved).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| FinetuneError::Internal(format!("config does not serialize: {e}")))
    }

    /// Refuses values that would fail later or silently do something else.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err(FinetuneError::Usage(format!("{key}: {why}")));
        let t = &self.task;
        if t.pretrained.as_os_str().is_empty() {
            return bad("task.pretrained", "is empty: pass --pretrained RUN_DIR (a run written by neurofm-train)".into());
        }
        if t.data.as_os_str().is_empty() {
            return bad("task.data", "is empty: pass --data STORE (a store made by `neurofm-data convert`)".into());
        }
        if t.label_col.is_empty() {
            return bad("task.label_col", "is empty: pass --label-col COLUMN (an obs column holding the labels)".into());
        }
        t.split_kind()?;
        if !(t.test_frac > 0.0 && t.test_frac < 1.0) {
            return bad("task.test_frac (--test-frac)", format!("{} must be strictly between 0 and 1", t.test_frac));
        }
        if !(t.val_frac >= 0.0 && t.val_frac < 1.0) {
            return bad("task.val_frac", format!("{} must be in [0, 1); 0 fits every training cell without validation", t.val_frac));
        }
        if t.val_frac == 0.0 && self.train.patience > 0 {
            return bad("train.patience", format!("{}: early stopping needs validation cells; set task.val_frac > 0 or train.patience = 0", self.train.patience));
        }
        if t.max_cells < 2 {
            return bad("task.max_cells", format!("{}: need at least 2 cells", t.max_cells));
        }
        for (key, p) in [("head.dropout", Some(self.head.dropout)), ("encoder.dropout", self.encoder.dropout)] {
            if let Some(p) = p {
                if !(0.0..1.0).contains(&p) {
                    return bad(key, format!("{p} must be in [0, 1)"));
                }
            }
        }
        if !(self.encoder.layer_decay > 0.0 && self.encoder.layer_decay <= 1.0) {
            return bad("encoder.layer_decay", format!("{} must be in (0, 1]; 1 is no decay", self.encoder.layer_decay));
        }
        self.optim.validate()?;
        self.augment.view().validate().map_err(|e| FinetuneError::Usage(format!("augment: {e}")))?;
        if let Some(why) = self.augment.test_views_problem() {
            return bad("augment.test_views", why);
        }
        let l = &self.train;
        if l.batch_size == 0 || l.grad_accum == 0 {
            return bad("train.batch_size / train.grad_accum", "must be ≥ 1".into());
        }
        if l.members == 0 {
            return bad("train.members", "must be ≥ 1 (1: a single classifier)".into());
        }
        if l.epochs == 0 && l.max_steps == 0 {
            return bad("train.epochs", "0 with train.max_steps = 0 would train nothing".into());
        }
        if l.log_every == 0 {
            return bad("train.log_every", "must be ≥ 1".into());
        }
        if !(l.bucket_mb > 0.0 && l.bucket_mb.is_finite()) {
            return bad("train.bucket_mb", format!("{} must be > 0", l.bucket_mb));
        }
        if self.baselines.random_forest && self.baselines.forest_trees == 0 {
            return bad("baselines.forest_trees", "must be ≥ 1 (or baselines.random_forest = false)".into());
        }
        Ok(())
    }
}

/// Writes `over` into `base`, key by key inside tables, so a partial table keeps the rest.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::exit::ExitStatus;

    fn required() -> Vec<String> {
        ["task.pretrained=runs/p", "task.data=/tmp/x.zarr", "task.label_col=cell_type"].iter().map(|s| s.to_string()).collect()
    }

    /// A partial `[optim]` (from `--set` or a file) keeps fine-tuning's rate, not pretraining's.
    #[test]
    fn a_partial_table_keeps_the_fine_tuning_defaults() {
        let mut o = required();
        o.push("optim.weight_decay=0.0".into());
        let cfg = FinetuneConfig::load(None, &o).unwrap();
        assert_eq!((cfg.optim.lr, cfg.optim.weight_decay), (FinetuneConfig::default().optim.lr, 0.0));
        assert_ne!(cfg.optim.lr, OptimConfig::default().lr, "the test needs the two defaults to differ");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ft.toml");
        std::fs::write(&file, "[optim]\nwarmup_steps = 3\n[train]\nbatch_size = 8\n").unwrap();
        let cfg = FinetuneConfig::load(Some(&file), &required()).unwrap();
        assert_eq!((cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.batch_size, cfg.train.epochs), (2e-3, 3, 8, LoopConfig::default().epochs));
    }

    /// Every fine-tuning preset in configs/finetune/ loads with the current keys.
    #[test]
    fn every_shipped_preset_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/finetune");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                FinetuneConfig::load(Some(&path), &required()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 1, "found no presets in {}", dir.display());
    }

    #[test]
    fn defaults_round_trip_and_every_key_is_written() {
        let mut cfg = FinetuneConfig::load(None, &required()).unwrap();
        assert_eq!(cfg.task.pretrained, PathBuf::from("runs/p"));
        cfg.head.pooling = Some(Pooling::Mean);
        cfg.head.layer = Some(-1);
        cfg.encoder.dropout = Some(0.0);
        let text = cfg.to_toml().unwrap();
        for key in ["seed", "label_col", "pooling", "layer", "hidden", "layer_decay", "balance", "patience", "forest_trees", "warmup_steps"] {
            assert!(text.contains(&format!("{key} = ")), "{key} missing from\n{text}");
        }
        let again: FinetuneConfig = toml::from_str(&text).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn missing_task_keys_and_bad_values_name_the_key_and_the_flag() {
        let e = FinetuneConfig::load(None, &[]).unwrap_err().to_string();
        assert!(e.contains("task.pretrained") && e.contains("--pretrained"), "{e}");
        let mut o = required();
        o.push("task.split=groups".into());
        let e = FinetuneConfig::load(None, &o).unwrap_err().to_string();
        assert!(e.contains("task.split") && e.contains("group:COLUMN"), "{e}");
        let mut o = required();
        o.push("head.hiden=3".into());
        let e = FinetuneConfig::load(None, &o).unwrap_err();
        assert!(e.to_string().contains("hiden") && e.exit_code() == 2, "{e}");
        let mut o = required();
        o.push("encoder.layer_decay=0".into());
        assert!(FinetuneConfig::load(None, &o).unwrap_err().to_string().contains("encoder.layer_decay"));
        for views in [&["augment.test_views=0"][..], &["augment.test_views=3", "augment.gene_scale=0"]] {
            let mut o = required();
            o.extend(views.iter().map(|v| v.to_string()));
            let e = FinetuneConfig::load(None, &o).unwrap_err().to_string();
            assert!(e.contains("augment.test_views"), "{views:?}: {e}");
        }
        let mut o = required();
        o.push("augment.test_views=3".into());
        assert_eq!(FinetuneConfig::load(None, &o).expect("perturbed copies").augment.test_views, 3);
    }
}
