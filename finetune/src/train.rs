//! The fine-tuning run: check every input, then train the classifier (and, with
//! `--from-scratch`, the same architecture from random weights), then score both and the
//! expression baselines on the test cells.
//!
//! The step is pretraining's in miniature and uses its parts: the flat-buffer `AdamW` (with a
//! per-parameter learning-rate scale for layer-wise decay), `Ddp` (the step's class weights are
//! summed over ranks first, so each rank's backward already divides by the global total, and W
//! ranks of batch B take the step of one rank of batch W·B), the warmup + cosine schedule,
//! atomic checkpoints with `best`/`last`, TensorBoard events and `metrics.csv`. Dropout is
//! reseeded from (seed, step, rank) and the epoch order comes from (seed, epoch), so a resumed
//! run continues bit for bit.

use std::path::{Path, PathBuf};
use std::time::Instant;

use dataloader::mask::{Batcher, VALIDATION_EPOCH};
use dataloader::rng::{hash_keys, Purpose};
use dataloader::shard::{BatchStream, Rank, ReaderPosition, ShardReader};
use tch::{Device, Kind, Tensor};
use tracing::info;
use trainer::batch::DeviceBatch;
use trainer::checkpoint::{read_state, Checkpoints, TrainState, MODEL_FILE, OPTIMIZER_FILE};
use trainer::comm::Communicator;
use trainer::config::{EmbeddingConfig, TrainConfig};
use trainer::ddp::Ddp;
use trainer::device::{classify_oom, describe, peak_flops, Peak};
use trainer::fault::TestKnobs;
use trainer::logging::{info_above, progress_bar, RunLog, StepStats, Window};
use trainer::metrics::{Column, Row};
use trainer::model::load_weights;
use trainer::optim::{learning_rate, AdamW};
use trainer::run_dir::RunDir;
use trainer::TrainError;

use crate::classifier::{weighted_ce_sum, Classifier, EncoderInit};
use crate::config::FinetuneConfig;
use crate::error::{FinetuneError, Result};
use crate::predict::{class_scores, combine, predict, predicted, Predictions};
use crate::pretrained::{resolve_defaults, Architecture, Pretrained};
use crate::report::FinetuneMetrics;
use crate::run_files::{self, read_finetune_state, ClassesFile, FinetuneState, FINETUNE_STATE};
use crate::task::{LabelledBatch, Task};

/// Options of one `neurofm-finetune` invocation besides the config.
pub struct RunOptions {
    pub device: Device,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
    /// Checkpoint and stop after this optimizer step of the phase being trained.
    pub stop_at_step: Option<u64>,
}

/// Everything checked before a run directory is touched: the pretrained run, the resolved
/// config and classifier shape, and the labelled cells. Every rank builds the same plan.
pub struct Plan {
    pub cfg: FinetuneConfig,
    pub pretrained: Pretrained,
    pub arch: Architecture,
    pub task: Task,
    /// The pretraining config with `[embedding]` set to the fine-tune's choice.
    pub encoder_config: TrainConfig,
}

impl Plan {
    pub fn new(mut cfg: FinetuneConfig) -> Result<Plan> {
        let pretrained = Pretrained::open(&cfg.task.pretrained, &cfg.task.checkpoint)?;
        resolve_defaults(&mut cfg, &pretrained.config);
        let arch = Architecture::new(&cfg, &pretrained.config, &pretrained.state)?;
        let task = Task::open(&cfg.task, cfg.seed, &pretrained.tokenizer.genes, pretrained.config.data.gene_case)?;
        let mut encoder_config = pretrained.config.clone();
        encoder_config.embedding = EmbeddingConfig { pooling: arch.choice.pooling, layer: arch.choice.layer as i64 };
        Ok(Plan { cfg, pretrained, arch, task, encoder_config })
    }

    /// Refuses a batch size or accumulation too large for the training cells of `world` ranks,
    /// before the run directory is created.
    pub fn check_batches(&self, world: usize) -> Result<()> {
        let reader = self.task.reader(Rank::new(0, world)?, self.cfg.train.batch_size, self.cfg.seed)?;
        self.steps_per_epoch(&reader).map(|_| ())
    }

    /// Optimizer steps per epoch of `reader` (one rank's shard of the training cells).
    fn steps_per_epoch(&self, reader: &ShardReader) -> Result<u64> {
        let t = &self.cfg.train;
        match (reader.batches_per_epoch() / t.grad_accum) as u64 {
            0 => Err(FinetuneError::Usage(format!(
                "train.grad_accum = {} exceeds the {} batches per epoch of {} training cells; lower train.grad_accum or train.batch_size",
                t.grad_accum,
                reader.batches_per_epoch(),
                self.task.fit.len()
            ))),
            n => Ok(n),
        }
    }

    /// The classes file of this plan.
    pub fn classes_file(&self) -> ClassesFile {
        let t = &self.task;
        ClassesFile {
            label_col: t.labels.column.clone(),
            classes: t.labels.classes.clone(),
            fit: t.class_counts(&t.fit),
            val: t.class_counts(&t.val),
            test: t.class_counts(&t.split.test),
        }
    }

    /// A digest of which cells are fit, validated and tested on.
    pub fn cells_digest(&self) -> u64 {
        let t = &self.task;
        let mut keys = Vec::new();
        for (part, positions) in [(1u64, &t.fit), (2, &t.val), (3, &t.split.test)] {
            keys.push(part);
            keys.extend(t.rows(positions).iter().map(|&r| r as u64));
        }
        hash_keys(&keys)
    }
}

/// Which model a phase trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The pretrained encoder with a new head.
    Finetune,
    /// The same architecture from random weights (the control).
    FromScratch,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Finetune => "fine-tune",
            Phase::FromScratch => "from scratch",
        }
    }
}

/// Second key of an ensemble member's seed (no `dataloader::rng::Purpose` or other local key
/// uses it).
const MEMBER_SEED: u64 = 61;

/// The seed of ensemble member `m`: the run's own for member 0, so a one-member run draws what
/// it always drew; its own stream for every other member.
pub fn member_seed(seed: u64, m: usize) -> u64 {
    if m == 0 { seed } else { hash_keys(&[seed, MEMBER_SEED, m as u64]) }
}

/// How one member of a phase ended.
pub struct PhaseOutcome {
    pub dir: PathBuf,
    /// Stopped by `--stop-at-step` (continue with `--resume auto`).
    pub interrupted: bool,
    /// Cells per second over this invocation's steps (None when it ran none).
    pub cells_per_s: Option<f64>,
}

/// Fine-tunes according to `plan` in `run` as one rank of `comm`'s group (every ensemble
/// member in turn), then trains the from-scratch control if asked; rank 0 then scores
/// everything (`crate::report`) and returns `metrics.json`'s content. `None` on other ranks and
/// after `--stop-at-step`.
pub fn run(plan: &Plan, run: &RunDir, opts: &RunOptions, comm: &dyn Communicator) -> Result<Option<FinetuneMetrics>> {
    let Some(main) = train_members(plan, run, Phase::Finetune, opts, comm)? else { return Ok(None) };
    let mut control = None;
    if plan.cfg.baselines.from_scratch {
        let dir = sub_run_dir(&run.path.join(run_files::FROM_SCRATCH_DIR), comm)?;
        let Some(c) = train_members(plan, &dir, Phase::FromScratch, opts, comm)? else { return Ok(None) };
        control = Some(c);
    }
    if comm.rank() != 0 {
        return Ok(None);
    }
    Ok(Some(crate::report::finish(plan, &main, control.as_deref(), opts.device)?))
}

/// Trains the `train.members` classifiers of `phase`, member 0 in `dir` and member m in
/// `run_files::member_dir`; `None` after `--stop-at-step`.
fn train_members(plan: &Plan, dir: &RunDir, phase: Phase, opts: &RunOptions, comm: &dyn Communicator) -> Result<Option<Vec<PhaseOutcome>>> {
    let (batch, accum) = (plan.cfg.train.batch_size, plan.cfg.train.grad_accum);
    let oom = |e: FinetuneError| match e {
        FinetuneError::Torch(t) | FinetuneError::Train(TrainError::Torch(t)) => FinetuneError::Train(classify_oom(t, batch, accum)),
        other => other,
    };
    let mut done = Vec::new();
    for m in 0..plan.cfg.train.members {
        let member = if m == 0 { None } else { Some(sub_run_dir(&run_files::member_dir(&dir.path, m), comm)?) };
        let outcome = train_phase(plan, member.as_ref().unwrap_or(dir), phase, m, opts, comm).map_err(oom)?;
        if outcome.interrupted {
            return Ok(None);
        }
        done.push(outcome);
    }
    Ok(Some(done))
}

/// A directory inside the run (the control's, a member's) that continues where it stopped:
/// rank 0 creates it, the others join it after a barrier.
fn sub_run_dir(path: &Path, comm: &dyn Communicator) -> Result<RunDir> {
    let resume = trainer::run_dir::Resume::Auto;
    if comm.rank() == 0 {
        let d = RunDir::prepare(path, &resume, false);
        comm.barrier()?;
        Ok(d?)
    } else {
        comm.barrier()?;
        Ok(RunDir::join(path, &resume)?)
    }
}

/// Trains member `member` of one phase to its end (or to `--stop-at-step`), resuming from
/// `dir.resume_from`.
fn train_phase(plan: &Plan, dir: &RunDir, phase: Phase, member: usize, opts: &RunOptions, comm: &dyn Communicator) -> Result<PhaseOutcome> {
    let mut s = Session::start(plan, dir, phase, member, opts, comm)?;
    let outcome = |interrupted, cells_per_s| PhaseOutcome { dir: dir.path.clone(), interrupted, cells_per_s };
    if s.extra.done {
        info!("{}: already trained (step {}, best macro F1 {:.3} at step {})", phase.name(), s.step, s.extra.best_macro_f1.unwrap_or(f64::NAN), s.extra.best_step);
        return Ok(outcome(false, None));
    }
    let started = Instant::now();
    let (mut window, mut overall) = (Window::default(), Window::default());
    let mut accuracy = 0.0; // summed over the window's steps
    let t = plan.cfg.train.clone();
    while s.step < s.total_steps {
        let (stats, step_accuracy) = s.train_step()?;
        window.add(&stats);
        accuracy += step_accuracy;
        if s.step > s.first_step + 1 {
            overall.add(&stats); // the first step warms up allocators and kernels
        }
        let step = s.step;
        let epoch_done = s.cursor.epoch_done();
        let epoch = s.cursor.resume_position().epoch;
        if let Some(bar) = &s.bar {
            bar.set_position(step);
            bar.set_message(format!("loss {:.3}  {:.1} cells/s", stats.loss, window.cells_per_s()));
        }
        if step % t.log_every == 0 || step == s.total_steps {
            s.log.row(&train_row(&window, accuracy, step, epoch, started.elapsed().as_secs_f64()))?;
            (window, accuracy) = (Window::default(), 0.0);
        }
        let (stop_here, last) = (opts.stop_at_step == Some(step), step == s.total_steps);
        let validate = last || if t.val_every > 0 { step % t.val_every == 0 } else { epoch_done };
        let mut is_best = false;
        if validate {
            is_best = s.validate(epoch, started.elapsed().as_secs_f64())?;
        }
        let early = t.patience > 0 && s.extra.stale_validations >= t.patience;
        if early {
            info!("{}: stopping early at step {step}: validation macro F1 has not improved for {} validations (best {:.4} at step {})", phase.name(), t.patience, s.extra.best_macro_f1.unwrap_or(0.0), s.extra.best_step);
            s.extra.stopped_early = true;
        }
        s.extra.done = last || early;
        if validate || stop_here || s.extra.done {
            s.checkpoint(is_best)?;
        }
        if s.extra.done {
            if window.steps > 0 {
                // Stopped early between log steps: the last window still gets its row.
                s.log.row(&train_row(&window, accuracy, step, epoch, started.elapsed().as_secs_f64()))?;
            }
            break;
        }
        if stop_here {
            info!("stopping at step {step} as asked (--stop-at-step); continue with --resume auto");
            return Ok(outcome(true, None));
        }
    }
    s.finish(&overall)?;
    Ok(outcome(false, (overall.steps > 0).then(|| overall.cells_per_s())))
}

/// A `metrics.csv` row (and `finetune/*` scalars) of the steps in `w`; `accuracy` is the sum
/// of their training-batch accuracies.
fn train_row(w: &Window, accuracy: f64, step: u64, epoch: u64, elapsed: f64) -> Row {
    let (t, n, secs) = (&w.sum, w.steps.max(1) as f64, w.seconds());
    Row::new(step, epoch, "finetune")
        .with(Column::Loss, t.loss / n)
        .with(Column::Accuracy, accuracy / n)
        .with(Column::Lr, t.lr)
        .with(Column::GradNorm, t.grad_norm)
        .with(Column::CellsPerS, t.cells as f64 / secs)
        .with(Column::TokensPerS, t.tokens as f64 / secs)
        .with(Column::DataWaitFrac, t.data_wait / secs)
        .with(Column::AllreduceFrac, t.comm / secs)
        .with(Column::ElapsedS, elapsed)
}

/// Where in the epochs the phase stands, and the stream of the current epoch; an epoch ends
/// when fewer than `accum` batches remain.
struct Cursor {
    position: ReaderPosition,
    stream: Option<BatchStream<LabelledBatch>>,
    accum: usize,
    per_epoch: usize,
}

impl Cursor {
    fn epoch_done(&self) -> bool {
        self.position.batch + self.accum > self.per_epoch
    }

    fn resume_position(&self) -> ReaderPosition {
        if self.epoch_done() { ReaderPosition { epoch: self.position.epoch + 1, batch: 0 } } else { self.position }
    }
}

/// Validation numbers of one pass, reduced over ranks.
#[derive(Debug, Clone, Copy)]
pub struct ValScores {
    pub loss: f64,
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub macro_f1: f64,
}

/// Everything one rank's loop of one phase works with.
struct Session<'a> {
    plan: &'a Plan,
    phase: Phase,
    /// This member's seed (`member_seed`): head initialization, data order, augmentation, dropout.
    seed: u64,
    rank: Rank,
    device: Device,
    model: Classifier,
    opt: AdamW,
    ddp: Ddp<'a>,
    reader: ShardReader,
    batcher: Batcher,
    cursor: Cursor,
    /// Class weights of the loss (host and device).
    weights: Vec<f64>,
    weights_t: Tensor,
    state: TrainState,
    extra: FinetuneState,
    checkpoints: Checkpoints,
    log: RunLog,
    peak: Peak,
    bar: Option<indicatif::ProgressBar>,
    step: u64,
    first_step: u64,
    total_steps: u64,
    gene_pad: i64,
    dir: PathBuf,
}

impl<'a> Session<'a> {
    fn start(plan: &'a Plan, dir: &RunDir, phase: Phase, member: usize, opts: &RunOptions, comm: &'a dyn Communicator) -> Result<Session<'a>> {
        let cfg = &plan.cfg;
        let seed = member_seed(cfg.seed, member);
        let device = opts.device;
        if cfg.train.threads > 0 {
            tch::set_num_threads(cfg.train.threads as i32);
        }
        let rank = Rank::new(comm.rank(), comm.world())?;
        let lead = rank.rank() == 0;
        let resumed = match &dir.resume_from {
            Some(ckpt) => Some((ckpt.clone(), read_state(ckpt)?, read_finetune_state(ckpt)?)),
            None => None,
        };
        let tokenizer_src = plan.pretrained.run.join(run_files::TOKENIZER);
        let pretrained_sha256 = match phase {
            Phase::Finetune => dataloader::convert::sha256_file(&plan.pretrained.checkpoint.join(MODEL_FILE))?,
            Phase::FromScratch => String::new(),
        };
        let recipe = format!("encoder.freeze = {}, encoder.layer_decay = {}, loss.balance = {:?}", cfg.encoder.freeze, cfg.encoder.layer_decay, cfg.loss.balance);
        if let Some((ckpt, state, extra)) = &resumed {
            check_resume(plan, ckpt, state, extra, &dir.path, &tokenizer_src)?;
            if extra.pretrained_sha256 != pretrained_sha256 {
                return Err(FinetuneError::input(ckpt, format!("started from other pretrained weights than {}; resume with the same --pretrained run and task.checkpoint", plan.pretrained.checkpoint.display())));
            }
            if extra.recipe != recipe {
                return Err(FinetuneError::input(ckpt, format!("was trained with {}, not {recipe}; resume with the same settings", extra.recipe)));
            }
        }
        if lead {
            write_run_files(plan, &dir.path, &tokenizer_src, resumed.is_none())?;
        }
        comm.barrier()?;

        let knobs = TestKnobs::from_env();
        let per_rank = if knobs.init_per_rank { rank.rank() as u64 } else { 0 };
        let head_seed = hash_keys(&[seed, Purpose::Init as u64, 1, per_rank]);
        let init = match phase {
            Phase::Finetune => EncoderInit::Pretrained(&plan.pretrained.checkpoint.join(MODEL_FILE)),
            Phase::FromScratch => EncoderInit::Random(hash_keys(&[seed, Purpose::Init as u64, 2, per_rank])),
        };
        let mut model = Classifier::new(&plan.arch, plan.task.n_classes(), device, init, head_seed)?;
        model.freeze(cfg.encoder.freeze);
        let mut opt = AdamW::new(&model.vs, &cfg.optim)?;
        if cfg.encoder.layer_decay < 1.0 && !cfg.encoder.freeze {
            opt.set_lr_scale(|name| model.lr_scale(name, cfg.encoder.layer_decay))?;
        }
        let tokenizer_sha256 = dataloader::convert::sha256_file(&dir.path.join(run_files::TOKENIZER))?;
        let mut state = TrainState {
            step: 0,
            position: ReaderPosition::default(),
            best_val_loss: None,
            model: plan.arch.model.clone(),
            vocab: plan.arch.vocab,
            tokenizer_sha256,
            world_size: rank.world(),
            global_batch: rank.world() * cfg.train.batch_size,
            rng: "dropout reseeded from (seed, step, rank) each step; data from (seed, epoch, cell)".into(),
        };
        let mut extra = FinetuneState {
            classes: plan.task.labels.classes.clone(),
            cells_digest: plan.cells_digest(),
            best_macro_f1: None,
            best_val_loss: None,
            best_step: 0,
            stale_validations: 0,
            done: false,
            stopped_early: false,
            pretrained_sha256,
            recipe,
        };
        if let Some((ckpt, saved, saved_extra)) = &resumed {
            load_weights(&model.vs, &ckpt.join(MODEL_FILE))?;
            opt.load(&ckpt.join(OPTIMIZER_FILE), saved.step)?;
            (state.step, state.position, state.best_val_loss) = (saved.step, saved.position, saved.best_val_loss);
            if saved.global_batch > 0 && saved.global_batch != state.global_batch {
                state.position = saved.position.rescale(saved.global_batch, state.global_batch);
            }
            extra = saved_extra.clone();
            info!("{}: resuming from {} at step {} (epoch {}, batch {})", phase.name(), ckpt.display(), saved.step, saved.position.epoch, saved.position.batch);
        }
        let bucket_bytes = (cfg.train.bucket_mb * (1 << 20) as f64) as usize;
        let mut ddp = Ddp::new(comm, opt.flat_params(), opt.flat_grads(), bucket_bytes, device)?;
        if !knobs.skip_broadcast {
            ddp.broadcast_parameters()?;
        }
        let reader = plan.task.reader(rank, cfg.train.batch_size, seed)?;
        let per_epoch = plan.steps_per_epoch(&reader)?;
        let total_steps = if cfg.train.max_steps > 0 { cfg.train.max_steps } else { cfg.train.epochs * per_epoch };
        // Training batches are perturbed as `[augment]` says; predictions (VALIDATION_EPOCH) never are.
        let batcher = Batcher::new(plan.pretrained.tokenizer.clone(), plan.arch.sequence, None, cfg.augment.view())?.with_view_seed(seed);
        let weights = plan.task.class_weights(cfg.loss.balance);
        let weights_t = Tensor::f_from_slice(&weights.iter().map(|&w| w as f32).collect::<Vec<_>>())?.f_to_device(device)?;
        let (all, trained) = model.param_counts();
        let t = &plan.task;
        info!(
            "{}: {all} parameters, {trained} trained ({}; layer-wise lr decay {}); {} pooling of layer {} → MLP ({} hidden) → {} classes; training cells augmented (gene scale {}, thinning to ≥ {}); on {}",
            phase.name(),
            if cfg.encoder.freeze { "encoder frozen" } else { "encoder and head" },
            cfg.encoder.layer_decay,
            plan.arch.choice.pooling.name(),
            plan.arch.choice.layer,
            plan.arch.head_hidden,
            t.n_classes(),
            cfg.augment.gene_scale,
            cfg.augment.thin_min,
            describe(device)
        );
        info!(
            "{}: {} fit / {} validation / {} test cells; {per_epoch} steps per epoch of {} cells, {total_steps} steps in all",
            phase.name(),
            t.fit.len(),
            t.val.len(),
            t.split.test.len(),
            rank.world() * cfg.train.batch_size * cfg.train.grad_accum
        );
        if cfg.train.members > 1 {
            info!("{}: ensemble member {member} of {} (numbered from 0; seed {seed}) in {}", phase.name(), cfg.train.members, dir.path.display());
        }
        if rank.world() > 1 {
            let c = ddp.take_cost();
            info!("data parallel over {} ranks ({}): {:.2} MB of gradients all-reduced per step in {} buckets", rank.world(), comm.name(), c.bytes_per_step as f64 / 1e6, c.buckets);
        }
        let mut log = RunLog::open(lead, &dir.path, resumed.as_ref().map(|r| r.1.step))?;
        log.text("config", state.step, &format!("```toml\n{}\n```", cfg.to_toml()?))?;
        let peak = peak_flops(device, model.encoder.compute, 0.0);
        let cursor = Cursor { position: state.position, stream: None, accum: cfg.train.grad_accum, per_epoch: reader.batches_per_epoch() };
        let bar = progress_bar(opts.progress && lead, total_steps, state.step);
        Ok(Session {
            plan,
            phase,
            seed,
            rank,
            device,
            gene_pad: plan.pretrained.tokenizer.gene_pad(),
            model,
            opt,
            ddp,
            reader,
            batcher,
            cursor,
            weights,
            weights_t,
            step: state.step,
            first_step: state.step,
            total_steps,
            state,
            extra,
            checkpoints: Checkpoints::new(&dir.path),
            log,
            peak,
            bar,
            dir: dir.path.clone(),
        })
    }

    /// The next step's micro-batches (host memory) and how long reading waited.
    fn next_batches(&mut self) -> Result<(Vec<LabelledBatch>, f64)> {
        let c = &mut self.cursor;
        if c.epoch_done() {
            c.position = ReaderPosition { epoch: c.position.epoch + 1, batch: 0 };
            c.stream = None;
        }
        let (task, d) = (&self.plan.task, &self.plan.cfg.data);
        let (batcher, reader, position) = (&self.batcher, &self.reader, c.position);
        let stream = c.stream.get_or_insert_with(|| task.stream(batcher, reader.plan(position.epoch), position, position.epoch, d.workers, d.prefetch));
        let wait = Instant::now();
        let mut out = Vec::with_capacity(c.accum);
        for _ in 0..c.accum {
            let (pos, b) = stream.next().ok_or_else(|| FinetuneError::Internal("the epoch ended before its planned batches".into()))??;
            c.position = pos;
            out.push(b);
        }
        Ok((out, wait.elapsed().as_secs_f64()))
    }

    /// One optimizer step: class-weighted cross-entropy divided by the step's global weight.
    /// Returns the step's numbers and the accuracy on its cells.
    fn train_step(&mut self) -> Result<(StepStats, f64)> {
        let mut stats = StepStats::default();
        let (batches, wait) = self.next_batches()?;
        stats.data_wait = wait;
        let compute_start = Instant::now();
        let mut uploaded = Vec::with_capacity(batches.len());
        let mut group = [0.0; 4]; // class weight, cells, tokens, FLOPs
        let frozen = self.plan.cfg.encoder.freeze;
        for b in &batches {
            let dev = DeviceBatch::new(&b.tokens, self.device, self.gene_pad, false)?;
            let y = Tensor::f_from_slice(&b.y)?.f_to_device(self.device)?;
            let v = &dev.views[0];
            let flops = self.model.encoder.train_flops(&v.seq_lens, 0) / if frozen { 3.0 } else { 1.0 };
            let w: f64 = b.y.iter().map(|&k| self.weights[k as usize]).sum();
            group.iter_mut().zip([w, b.y.len() as f64, dev.tokens() as f64, flops]).for_each(|(s, x)| *s += x);
            uploaded.push((dev, y));
        }
        self.ddp.sum(&mut group)?;
        (stats.cells, stats.tokens, stats.flops) = (group[1] as usize, group[2] as usize, group[3]);
        let weight_total = group[0].max(f64::MIN_POSITIVE);

        self.opt.zero_grad()?;
        tch::manual_seed(hash_keys(&[self.seed, Purpose::Dropout as u64, self.step, self.rank.rank() as u64]) as i64 >> 1);
        let mut sums = Tensor::f_zeros([2], (Kind::Float, self.device))?;
        for (dev, y) in &uploaded {
            let out = self.model.forward(&dev.views[0], true)?;
            let ce = weighted_ce_sum(&out.logits, y, &self.weights_t)?;
            ce.f_div_scalar(weight_total)?.f_backward()?;
            let correct = tch::no_grad(|| out.logits.f_argmax(-1, false)?.f_eq_tensor(y)?.f_sum(Kind::Float))?;
            sums = sums.f_add(&Tensor::f_stack(&[ce.f_detach()?, correct], 0)?)?;
        }
        self.ddp.all_reduce_gradients()?;
        self.ddp.sum_tensor(&mut sums)?;
        let opt_start = Instant::now();
        let norm = self.opt.clip_grad_norm(self.plan.cfg.optim.clip_norm)?;
        let host = Vec::<f64>::try_from(Tensor::f_cat(&[sums, norm.f_view([1])?], 0)?.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?)?;
        let (loss, grad_norm) = (host[0] / weight_total, host[2]);
        if !loss.is_finite() || !grad_norm.is_finite() {
            let last_good = match self.checkpoints.newest() {
                Some(p) => format!("The last good checkpoint is {}", p.display()),
                None => "No checkpoint was written yet".into(),
            };
            return Err(TrainError::NonFinite { step: self.step + 1, value: if loss.is_finite() { grad_norm } else { loss }, last_good }.into());
        }
        let lr = learning_rate(&self.plan.cfg.optim, self.step, self.total_steps);
        self.opt.apply(lr)?;
        self.step += 1;
        let optimizer_s = opt_start.elapsed().as_secs_f64();
        let total = compute_start.elapsed().as_secs_f64();
        let comm = self.ddp.take_cost().seconds;
        (stats.compute, stats.comm, stats.optimizer) = ((total - comm - optimizer_s).max(0.0), comm, optimizer_s);
        stats.loss = loss;
        (stats.grad_norm, stats.lr) = (grad_norm, lr);
        self.state.step = self.step;
        self.state.position = self.cursor.resume_position();
        Ok((stats, host[1] / group[1].max(1.0)))
    }

    /// Scores the validation cells (each rank its part, the counts summed), logs them, and says
    /// whether this is the best model so far (macro F1, ties to the lower loss); without
    /// validation cells (`task.val_frac = 0`) the latest model is the best.
    fn validate(&mut self, epoch: u64, elapsed: f64) -> Result<bool> {
        if self.plan.task.val.is_empty() {
            self.extra.best_step = self.step;
            return Ok(true);
        }
        let cfg = &self.plan.cfg;
        let task = &self.plan.task;
        let k = task.n_classes();
        let batch = predict_batch_size(cfg.train.predict_batch_size, self.device);
        let stream = task.predict_stream(&self.batcher, &task.val, self.rank, batch, cfg.data.workers, VALIDATION_EPOCH);
        let p = predict(&self.model, stream, self.device, self.gene_pad, false)?;
        // Confusion counts, weighted loss and weight, summed over ranks.
        let mut sums = vec![0.0; k * k + 2];
        for (i, &t) in p.truth.iter().enumerate() {
            sums[t * k + p.pred[i]] += 1.0;
            let prob = p.proba[[i, t]].max(1e-12);
            sums[k * k] += -self.weights[t] * prob.ln();
            sums[k * k + 1] += self.weights[t];
        }
        self.ddp.sum(&mut sums)?;
        let (mut truth, mut pred) = (Vec::new(), Vec::new());
        for (cell, &n) in sums[..k * k].iter().enumerate() {
            for _ in 0..n as usize {
                truth.push(cell / k);
                pred.push(cell % k);
            }
        }
        let cm = evaluation::metrics::Confusion::new(&truth, &pred, k);
        let v = ValScores { loss: sums[k * k] / sums[k * k + 1].max(f64::MIN_POSITIVE), accuracy: cm.accuracy(), balanced_accuracy: cm.balanced_accuracy(), macro_f1: cm.macro_f1() };
        let x = &mut self.extra;
        let is_best = match (x.best_macro_f1, x.best_val_loss) {
            // Ties in F1 go to a loss lower by more than rounding.
            (Some(f1), Some(loss)) => v.macro_f1 > f1 + 1e-12 || ((v.macro_f1 - f1).abs() <= 1e-12 && v.loss < loss - 1e-6),
            _ => true,
        };
        if is_best {
            (x.best_macro_f1, x.best_val_loss, x.best_step, x.stale_validations) = (Some(v.macro_f1), Some(v.loss), self.step, 0);
            self.state.best_val_loss = Some(v.loss);
        } else {
            x.stale_validations += 1;
        }
        let row = Row::new(self.step, epoch, "val")
            .with(Column::Loss, v.loss)
            .with(Column::Accuracy, v.accuracy)
            .with(Column::BalancedAccuracy, v.balanced_accuracy)
            .with(Column::MacroF1, v.macro_f1)
            .with(Column::ElapsedS, elapsed);
        self.log.row(&row)?;
        let msg = format!(
            "{} step {} epoch {epoch}: val loss {:.4}, accuracy {:.3}, balanced {:.3}, macro F1 {:.3}{}",
            self.phase.name(),
            self.step,
            v.loss,
            v.accuracy,
            v.balanced_accuracy,
            v.macro_f1,
            if is_best { " (best so far)" } else { "" }
        );
        info_above(self.bar.as_ref(), &msg);
        Ok(is_best)
    }

    /// Checks the ranks agree, then rank 0 writes a checkpoint.
    fn checkpoint(&mut self, is_best: bool) -> Result<()> {
        if self.rank.world() > 1 {
            let crc = self.ddp.check_in_sync()?;
            info!("step {}: parameters identical on all {} ranks (crc32c {crc:08x})", self.step, self.rank.world());
        }
        if self.rank.rank() == 0 {
            let (model, opt, extra) = (&self.model, &self.opt, &self.extra);
            let json = run_files::json(extra)?;
            self.checkpoints.save(&self.state, is_best, self.plan.cfg.train.keep_last, |dir| {
                model.vs.save(dir.join(MODEL_FILE))?;
                opt.save(&dir.join(OPTIMIZER_FILE))?;
                std::fs::write(dir.join(FINETUNE_STATE), &json).map_err(|e| TrainError::Io { path: dir.join(FINETUNE_STATE), source: e })
            })?;
        }
        Ok(())
    }

    /// Throughput and the final flush.
    fn finish(mut self, overall: &Window) -> Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if overall.steps > 0 && self.rank.rank() == 0 {
            let summary = overall.summary(&self.peak, &self.ddp.take_cost(), self.rank.world(), self.device.is_cuda());
            info!("{} throughput: {summary}", self.phase.name());
            run_files::write(&self.dir, "throughput.json", &run_files::json(&summary)?)?;
        }
        self.log.flush()?;
        Ok(())
    }
}

/// Cells per forward pass when predicting: the setting, else `neurofm-eval`'s default.
pub fn predict_batch_size(setting: usize, device: Device) -> usize {
    match setting {
        0 => evaluation::embed::default_batch_size(device),
        n => n,
    }
}

/// Refuses to resume a checkpoint of another task, classifier or tokenizer.
fn check_resume(plan: &Plan, ckpt: &Path, state: &TrainState, extra: &FinetuneState, run: &Path, tokenizer_src: &Path) -> Result<()> {
    if state.model != plan.arch.model || state.vocab != plan.arch.vocab {
        return Err(FinetuneError::input(ckpt, "was fine-tuned from an encoder of another shape; resume with the same --pretrained run"));
    }
    let here = dataloader::convert::sha256_file(&run.join(run_files::TOKENIZER))?;
    if here != state.tokenizer_sha256 || dataloader::convert::sha256_file(tokenizer_src)? != here {
        return Err(FinetuneError::input(tokenizer_src, format!("is not the tokenizer {} was fine-tuned with; resume with the same --pretrained run", ckpt.display())));
    }
    if extra.classes != plan.task.labels.classes || extra.cells_digest != plan.cells_digest() {
        return Err(FinetuneError::input(
            ckpt,
            "was fine-tuned on other classes or other cells (label column, classes, split, seed or data differ); resume with the same task flags, or start a new --run-dir",
        ));
    }
    let saved = FinetuneConfig::load(Some(&run.join(run_files::FINETUNE_CONFIG)), &[])?;
    let encoder = TrainConfig::load(&run.join(run_files::ENCODER_CONFIG), &[])?;
    if Architecture::new(&saved, &encoder, state)? != plan.arch {
        return Err(FinetuneError::input(&run.join(run_files::FINETUNE_CONFIG), "the head, pooling, layer or dropout differ from the run being resumed; resume with its [head] and [encoder] settings"));
    }
    Ok(())
}

/// `finetune.toml` (always: a resume may change e.g. the epochs), and on a fresh start the
/// encoder's config, the tokenizer and the classes.
fn write_run_files(plan: &Plan, dir: &Path, tokenizer_src: &Path, fresh: bool) -> Result<()> {
    run_files::write(dir, run_files::FINETUNE_CONFIG, plan.cfg.to_toml()?.as_bytes())?;
    if fresh {
        run_files::write(dir, run_files::ENCODER_CONFIG, plan.encoder_config.to_toml()?.as_bytes())?;
        let tok = std::fs::read(tokenizer_src).map_err(|e| FinetuneError::io(tokenizer_src, e))?;
        run_files::write(dir, run_files::TOKENIZER, &tok)?;
        run_files::write(dir, run_files::CLASSES, &run_files::json(&plan.classes_file())?)?;
    }
    Ok(())
}

/// The classifier of a finished phase with its `best` weights, for scoring, and the phase's
/// final state (its `last` checkpoint's: how it ended, which step was best).
pub fn load_best(plan: &Plan, dir: &Path, device: Device) -> Result<(Classifier, PathBuf, FinetuneState)> {
    let ckpts = Checkpoints::new(dir);
    let ckpt = ckpts.resolve("best")?;
    let extra = read_finetune_state(&ckpts.resolve("last")?)?;
    let model = Classifier::new(&plan.arch, plan.task.n_classes(), device, EncoderInit::Random(0), 0)?;
    load_weights(&model.vs, &ckpt.join(MODEL_FILE))?;
    Ok((model, ckpt, extra))
}

/// Predictions of `model` for `positions` of the task (rank 0 alone), in ascending position
/// order, averaged over the test `views` (`predict::test_views`), with their per-class scores.
pub fn score(plan: &Plan, model: &Classifier, views: &[(Batcher, u64)], positions: &[usize], device: Device) -> Result<(Predictions, crate::predict::ClassScores)> {
    let batch = predict_batch_size(plan.cfg.train.predict_batch_size, device);
    let mut each = Vec::with_capacity(views.len());
    for (batcher, epoch) in views {
        let stream = plan.task.predict_stream(batcher, positions, Rank::single(), batch, plan.cfg.data.workers, *epoch);
        each.push(predict(model, stream, device, plan.pretrained.tokenizer.gene_pad(), false)?);
    }
    let proba = combine(&each.iter_mut().map(|p| std::mem::take(&mut p.proba)).collect::<Vec<_>>());
    let mut p = each.into_iter().next().ok_or_else(|| FinetuneError::Internal("no test views".into()))?;
    p.pred = predicted(&proba);
    p.proba = proba;
    let s = class_scores(&p, plan.task.n_classes());
    Ok((p, s))
}
