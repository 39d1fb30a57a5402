//! The training run: data → micro-batches → steps → validation, logs and checkpoints.
//!
//! One optimizer step (`Trainer::train_step`): the step's units (masked positions, gene
//! positions, cells) are counted and summed over ranks first, so each micro-batch's backward
//! already divides by the global counts; then gradients are all-reduced in place, clipped on
//! the device, and the step's numbers are read from the device once, checked, and applied.
//! Everything random is keyed by (seed, step) or (seed, epoch, cell), so a resumed run
//! continues exactly where an uninterrupted one would be (bit for bit on the CPU).
//!
//! With several ranks every rank runs this same loop on its slice of each global batch; only
//! rank 0 writes logs, events and checkpoints.

use std::path::PathBuf;
use std::time::Instant;

use dataloader::corpus::sample_blocks;
use dataloader::mask::MaskedBatch;
use dataloader::rng::{hash_keys, Purpose};
use dataloader::shard::{BatchStream, Rank, ReaderPosition};
use dataloader::tokenize::Tokenizer;
use tch::{Device, Kind, Tensor};
use tracing::info;

use crate::baseline::{BaselineScore, BinFrequencies};
use crate::batch::DeviceBatch;
use crate::checkpoint::{check_resume_compatible, read_state, Checkpoints, TrainState, MODEL_FILE, OPTIMIZER_FILE};
use crate::comm::Communicator;
use crate::config::TrainConfig;
use crate::data::{CorpusRecord, RunData};
use crate::ddp::Ddp;
use crate::device::{classify_oom, describe, peak_flops, Peak};
use crate::error::{Result, TrainError};
use crate::fault::{Fault, TestKnobs};
use crate::logging::{info_above, progress_bar, RunLog, StepStats, Window};
use crate::metrics::{Column, Row};
use crate::model::{self, Encoder, Tokens, Vocabulary};
use crate::objectives::{Heads, TermCounts, TermSums, ViewStates};
use crate::optim::{learning_rate, AdamW};
use crate::run_dir::RunDir;

/// Validation numbers on the fixed validation masks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValMetrics {
    pub loss: f64,
    pub perplexity: f64,
    pub masked_acc: f64,
    /// The cell bottleneck's cross-entropy, when the run trains it.
    pub bottleneck_loss: Option<f64>,
    /// Per-gene bin-frequency table (context-free) on the same masks.
    pub baseline_perplexity: f64,
    /// Global bin frequencies on the same masks.
    pub global_baseline_perplexity: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: u64,
    pub val: Option<ValMetrics>,
    pub run_dir: PathBuf,
}

/// What one optimizer step did (means over the step's global units).
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// The weighted total of the objectives.
    pub loss: f64,
    pub masked_loss: f64,
    pub masked_acc: f64,
    pub bottleneck_loss: f64,
    pub contrastive_loss: f64,
    pub decorrelation_loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    /// Seconds in clipping, the step's read and the update.
    pub optimizer_s: f64,
}

/// Model, objective heads, optimizer and schedule: the part of a run that checkpoints hold.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub device: Device,
    pub vs: tch::nn::VarStore,
    pub model: Encoder,
    pub heads: Heads,
    pub opt: AdamW,
    /// Optimizer steps done.
    pub step: u64,
    pub total_steps: u64,
    /// This process's rank: dropout differs between ranks (they see different cells).
    pub rank: usize,
    /// The padding gene id of the run's tokenizer.
    gene_pad: i64,
}

impl Trainer {
    /// A freshly initialized model, objective heads and optimizer, seeded from `init_seed`.
    pub fn new(cfg: &TrainConfig, tokenizer: &Tokenizer, device: Device, total_steps: u64, rank: usize, init_seed: u64) -> Result<Trainer> {
        let vocab = Vocabulary { n_genes: tokenizer.genes.len(), n_bins: tokenizer.vocab.n_bins, ranked: tokenizer.is_ranked() };
        let (vs, mut model) = model::build(&cfg.model, vocab, device, init_seed)?;
        model.compute = cfg.train.precision.compute_kind(device);
        let keys = if vocab.ranked { 1 } else { vocab.n_bins };
        let heads = Heads::new(&(vs.root() / "objectives"), &cfg.objectives, cfg.model.d_model, keys)?;
        let opt = AdamW::new(&vs, &cfg.optim)?;
        Ok(Trainer { cfg: cfg.clone(), device, vs, model, heads, opt, step: 0, total_steps, rank, gene_pad: tokenizer.gene_pad() })
    }

    /// Uploads a micro-batch (with the full cell's bins when the bottleneck needs them).
    pub fn upload(&self, b: &MaskedBatch) -> Result<DeviceBatch> {
        DeviceBatch::new(b, self.device, self.gene_pad, self.cfg.objectives.bottleneck > 0.0 && !self.model.vocab.ranked)
    }

    /// The objectives' sums of one micro-batch (every view through the encoder).
    fn terms(&self, b: &DeviceBatch, train: bool) -> Result<TermSums> {
        let depth_tokens = self.cfg.model.depth_tokens;
        let states = b
            .views
            .iter()
            .map(|v| self.model.forward(&Tokens { genes: &v.genes, bins: &v.bins, padding: v.padding.as_ref(), depth: depth_tokens.then_some(&v.depth) }, train))
            .collect::<Result<Vec<_>>>()?;
        let views: Vec<ViewStates> = b.views.iter().zip(&states).map(|(v, s)| ViewStates { states: s, genes: &v.genes, masked: &v.masked, targets: &v.targets }).collect();
        self.heads.sums(&self.model, &self.cfg.objectives, &views, b.full_bins.as_ref(), &b.depth)
    }

    /// One optimizer step over the micro-batches of this rank; `n` are the step's units summed
    /// over every rank. Refuses a non-finite loss or gradient before touching the weights;
    /// `last_good` names the checkpoint to go back to.
    pub fn train_step(&mut self, batches: &[DeviceBatch], n: TermCounts, ddp: &mut Ddp, last_good: impl FnOnce() -> String) -> Result<StepOutcome> {
        self.opt.zero_grad()?;
        tch::manual_seed(hash_keys(&[self.cfg.seed, Purpose::Dropout as u64, self.step, self.rank as u64]) as i64 >> 1);
        let mut sums = Tensor::f_zeros([5], (Kind::Float, self.device))?;
        for b in batches {
            let t = self.terms(b, true)?;
            Heads::loss(&self.cfg.objectives, &t, &n)?.f_backward()?;
            sums = sums.f_add(&Tensor::f_stack(&[t.masked.f_detach()?, t.correct, t.bottleneck.f_detach()?, t.contrastive.f_detach()?, t.decorrelation.f_detach()?], 0)?)?;
        }
        ddp.all_reduce_gradients()?;
        ddp.sum_tensor(&mut sums)?;
        let opt_start = Instant::now();
        let norm = self.opt.clip_grad_norm(self.cfg.optim.clip_norm)?;
        // The step's only read from the device.
        let host = Vec::<f64>::try_from(Tensor::f_cat(&[sums, norm.f_view([1])?], 0)?.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?)?;
        let o = &self.cfg.objectives;
        let mean = |sum: f64, units: f64| sum / units.max(1.0);
        let (masked, bottleneck, contrastive, decorrelation) = (mean(host[0], n.masked), mean(host[2], n.bottleneck), mean(host[3], n.cells), mean(host[4], n.cells));
        let loss = o.masked * masked + o.bottleneck * bottleneck + o.contrastive * contrastive + o.decorrelation * decorrelation;
        let grad_norm = host[5];
        if !loss.is_finite() || !grad_norm.is_finite() {
            let value = if loss.is_finite() { grad_norm } else { loss };
            return Err(TrainError::NonFinite { step: self.step + 1, value, last_good: last_good() });
        }
        let lr = learning_rate(&self.cfg.optim, self.step, self.total_steps);
        self.opt.apply(lr)?;
        self.step += 1;
        let optimizer_s = opt_start.elapsed().as_secs_f64();
        Ok(StepOutcome { loss, masked_loss: masked, masked_acc: mean(host[1], n.masked), bottleneck_loss: bottleneck, contrastive_loss: contrastive, decorrelation_loss: decorrelation, grad_norm, lr, optimizer_s })
    }

    /// Sums over validation batches without dropout or gradients: masked loss, correct,
    /// bottleneck loss, masked positions, gene positions (read once at the end).
    pub fn evaluate(&self, batches: impl Iterator<Item = Result<MaskedBatch>>) -> Result<[f64; 5]> {
        let _guard = tch::no_grad_guard();
        let mut sums = Tensor::f_zeros([3], (Kind::Float, self.device))?;
        let mut counts = TermCounts::default();
        for b in batches {
            let b = self.upload(&b?)?;
            let t = self.terms(&b, false)?;
            sums = sums.f_add(&Tensor::f_stack(&[t.masked, t.correct, t.bottleneck], 0)?)?;
            counts.add(b.counts);
        }
        let s = Vec::<f64>::try_from(sums.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?)?;
        Ok([s[0], s[1], s[2], counts.masked, counts.bottleneck])
    }

    /// FLOPs of forward + backward over a micro-batch's views.
    pub fn train_flops(&self, b: &DeviceBatch) -> f64 {
        b.views.iter().map(|v| self.model.train_flops(&v.seq_lens, v.n_masked)).sum()
    }
}

/// Options of one `neurofm-train` invocation besides the config.
pub struct RunOptions {
    /// This rank's device (resolved from `--device` and the local rank).
    pub device: Device,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
    /// Checkpoint and stop after this step (to split a run across job time limits).
    pub stop_at_step: Option<u64>,
}

/// Trains according to `cfg` in `run`, resuming if `run.resume_from` is set, as one rank of
/// `comm`'s group (every rank calls this with the same config and run directory). Running out
/// of GPU memory anywhere (upload, forward, optimizer, buckets, validation) ends in the same
/// advice to use a smaller batch.
pub fn run(cfg: TrainConfig, run: &RunDir, opts: &RunOptions, comm: &dyn Communicator) -> Result<RunSummary> {
    let (batch, accum) = (cfg.train.batch_size, cfg.train.grad_accum);
    train_loop(cfg, run, opts, comm).map_err(|e| match e {
        TrainError::Torch(t) => classify_oom(t, batch, accum),
        other => other,
    })
}

fn train_loop(cfg: TrainConfig, run: &RunDir, opts: &RunOptions, comm: &dyn Communicator) -> Result<RunSummary> {
    let begun = Instant::now();
    let mut s = Session::start(cfg, run, opts, comm)?;
    s.startup_s = begun.elapsed().as_secs_f64();
    let (decoded, cells) = (s.data.corpus.sampled_decoded(), s.data.corpus.n_cells());
    s.startup_read_share = decoded as f64 / cells.max(1) as f64;
    info!(
        "start-up took {:.1} s (corpus, split, tokenizer, baselines, model); its reads decoded chunks holding {decoded} cells, \
         {:.2} % of the corpus's {cells} (a chunk read twice counts twice)",
        s.startup_s,
        100.0 * s.startup_read_share
    );
    let started = Instant::now();
    let (mut window, mut overall) = (Window::default(), Window::default());
    let mut last_val = None;
    while s.trainer.step < s.total_steps {
        let (stats, outcome) = s.step()?;
        window.add(&stats);
        if s.trainer.step > s.first_step + 1 {
            overall.add(&stats); // the first step warms up allocators and kernels
        }
        let step = s.trainer.step;
        if let Some(f) = &s.fault {
            f.maybe_crash(s.rank.rank(), step);
        }
        if let Some(bar) = &s.bar {
            bar.set_position(step);
            bar.set_message(format!("loss {:.3}  {:.1} cells/s", outcome.loss, window.cells_per_s()));
        }
        let epoch_done = s.cursor.epoch_done();
        let epoch = s.cursor.resume_position().epoch;
        let t = s.cfg.train.clone();
        if step % t.log_every == 0 || step == s.total_steps {
            s.log.row(&window.row(step, epoch, s.group_peak(), started.elapsed().as_secs_f64()))?;
            window = Window::default();
        }
        let (stop_here, last) = (opts.stop_at_step == Some(step), step == s.total_steps);
        let validate = last || if t.val_every > 0 { step % t.val_every == 0 } else { epoch_done };
        let is_best = if validate { s.validate(epoch, started.elapsed().as_secs_f64(), &mut last_val)? } else { false };
        if last || stop_here || if t.checkpoint_every > 0 { step % t.checkpoint_every == 0 } else { validate } {
            s.checkpoint(is_best)?;
        }
        if stop_here {
            info!("stopping at step {step} as asked (--stop-at-step); continue with --resume auto");
            return Ok(RunSummary { steps: step, val: last_val, run_dir: run.path.clone() });
        }
    }
    let steps = s.trainer.step;
    s.finish(&overall)?;
    Ok(RunSummary { steps, val: last_val, run_dir: run.path.clone() })
}

/// Where in the epochs the run stands, and the stream of the current epoch. Rolling over to
/// the next epoch happens here only: an epoch ends when fewer than `accum` batches remain.
struct EpochCursor {
    position: ReaderPosition,
    stream: Option<BatchStream<MaskedBatch>>,
    accum: usize,
    per_epoch: usize,
}

impl EpochCursor {
    /// The next step's micro-batches (host memory), and how long reading waited.
    fn next_step(&mut self, data: &RunData) -> Result<(Vec<MaskedBatch>, f64)> {
        if self.epoch_done() {
            self.position = ReaderPosition { epoch: self.position.epoch + 1, batch: 0 };
            self.stream = None;
        }
        let stream = self.stream.get_or_insert_with(|| data.train_stream(self.position));
        let wait = Instant::now();
        let mut out = Vec::with_capacity(self.accum);
        for _ in 0..self.accum {
            let (pos, b) = stream.next().ok_or_else(|| TrainError::Internal("the epoch ended before its planned batches".into()))??;
            self.position = pos;
            out.push(b);
        }
        Ok((out, wait.elapsed().as_secs_f64()))
    }

    fn epoch_done(&self) -> bool {
        self.position.batch + self.accum > self.per_epoch
    }

    /// Where the next step starts (what a checkpoint records).
    fn resume_position(&self) -> ReaderPosition {
        if self.epoch_done() { ReaderPosition { epoch: self.position.epoch + 1, batch: 0 } } else { self.position }
    }
}

/// Everything one rank's training loop works with.
struct Session<'c> {
    cfg: TrainConfig,
    rank: Rank,
    trainer: Trainer,
    data: RunData,
    ddp: Ddp<'c>,
    cursor: EpochCursor,
    state: TrainState,
    checkpoints: Checkpoints,
    log: RunLog,
    peak: Peak,
    baseline: (f64, f64),
    bar: Option<indicatif::ProgressBar>,
    fault: Option<Fault>,
    total_steps: u64,
    first_step: u64,
    run_path: PathBuf,
    /// Seconds from the start to the first step (`throughput.json`).
    startup_s: f64,
    /// Cells this rank decoded during start-up, over the corpus's cells.
    startup_read_share: f64,
}

impl<'c> Session<'c> {
    /// Resume or start: tokenizer, data, model, optimizer, data parallelism, logs, baselines.
    fn start(cfg: TrainConfig, run: &RunDir, opts: &RunOptions, comm: &'c dyn Communicator) -> Result<Session<'c>> {
        let device = opts.device;
        if cfg.train.threads > 0 {
            tch::set_num_threads(cfg.train.threads as i32);
        }
        let rank = Rank::new(comm.rank(), comm.world())?;
        let lead = rank.rank() == 0;
        let resumed = match &run.resume_from {
            Some(ckpt) => Some((ckpt.clone(), read_state(ckpt)?)),
            None => None,
        };
        let tokenizer = match &resumed {
            Some((ckpt, state)) => Some(check_resume_compatible(&cfg, ckpt, state, &run.tokenizer_path())?),
            None => None,
        };
        // Rank 0 fits the tokenizer; the others wait and load the same file.
        let own_tokenizer = run.path.join("tokenizer.json");
        let data = if lead {
            let data = RunData::open(&cfg, rank, tokenizer)?;
            if resumed.is_none() || !own_tokenizer.exists() {
                data.tokenizer.save(&own_tokenizer)?;
            }
            let record = CorpusRecord::of(&data.corpus);
            let record_file = run.path.join("corpus.json");
            match std::fs::read(&record_file) {
                Ok(bytes) if resumed.is_some() => {
                    let saved: CorpusRecord = serde_json::from_slice(&bytes).map_err(|e| TrainError::input(&record_file, format!("unreadable: {e}")))?;
                    record.check_same(&saved, &record_file)?;
                }
                _ => {
                    let json = serde_json::to_vec_pretty(&record).map_err(|e| TrainError::Internal(e.to_string()))?;
                    dataloader::write_atomic(&record_file, &json)?;
                }
            }
            dataloader::write_atomic(&run.path.join("config.toml"), cfg.to_toml()?.as_bytes())?;
            comm.barrier()?;
            data
        } else {
            comm.barrier()?;
            RunData::open(&cfg, rank, Some(Tokenizer::load(&own_tokenizer)?))?
        };
        let per_epoch = (data.batches_per_epoch() / cfg.train.grad_accum) as u64;
        if per_epoch == 0 {
            return Err(TrainError::Config(format!(
                "train.grad_accum = {} exceeds the {} batches per epoch of {} training cells; lower train.grad_accum or train.batch_size",
                cfg.train.grad_accum,
                data.batches_per_epoch(),
                data.train_cells().len()
            )));
        }
        let total_steps = if cfg.train.max_steps > 0 { cfg.train.max_steps } else { cfg.train.epochs * per_epoch };
        let knobs = TestKnobs::from_env();
        let init_seed = if knobs.init_per_rank { cfg.seed + rank.rank() as u64 } else { cfg.seed };
        let mut trainer = Trainer::new(&cfg, &data.tokenizer, device, total_steps, rank.rank(), init_seed)?;
        let mut state = TrainState {
            step: 0,
            position: ReaderPosition::default(),
            best_val_loss: None,
            model: cfg.model.clone(),
            vocab: trainer.model.vocab,
            tokenizer_sha256: dataloader::convert::sha256_file(&own_tokenizer)?,
            world_size: rank.world(),
            global_batch: rank.world() * cfg.train.batch_size,
            rng: "dropout reseeded from (seed, step, rank) each step; data from (seed, epoch, cell)".into(),
        };
        if let Some((ckpt, saved)) = &resumed {
            model::load_weights(&trainer.vs, &ckpt.join(MODEL_FILE))?;
            trainer.opt.load(&ckpt.join(OPTIMIZER_FILE), saved.step)?;
            trainer.step = saved.step;
            (state.step, state.position, state.best_val_loss) = (saved.step, saved.position, saved.best_val_loss);
            info!("resuming from {} at step {} (epoch {}, batch {})", ckpt.display(), saved.step, saved.position.epoch, saved.position.batch);
            if saved.global_batch > 0 && saved.global_batch != state.global_batch {
                state.position = saved.position.rescale(saved.global_batch, state.global_batch);
                info!(
                    "global batch changed from {} to {} cells (world size {} → {}): continuing at batch {} of the same epoch order",
                    saved.global_batch, state.global_batch, saved.world_size, rank.world(), state.position.batch
                );
            }
        }
        let bucket_bytes = (cfg.train.bucket_mb * (1 << 20) as f64) as usize;
        let mut ddp = Ddp::new(comm, trainer.opt.flat_params(), trainer.opt.flat_grads(), bucket_bytes, device)?;
        if !knobs.skip_broadcast {
            ddp.broadcast_parameters()?;
        }
        if rank.world() > 1 {
            let c = ddp.take_cost();
            info!("data parallel over {} ranks ({}): {:.2} MB of gradients all-reduced per step in {} buckets", rank.world(), comm.name(), c.bytes_per_step as f64 / 1e6, c.buckets);
        }
        let (all, body, head) = trainer.model.param_counts();
        info!(
            "model: {all} parameters ({body} in {} layers of width {}, {} in the embeddings, {head} in the head); {} on {}",
            cfg.model.n_layers,
            cfg.model.d_model,
            all - body - head,
            if trainer.model.compute == Kind::Float { "fp32" } else { "bf16 mixed precision" },
            describe(device)
        );
        let o = &cfg.objectives;
        info!(
            "objectives: masked {}, bottleneck {}{}, contrastive {} (τ {}), decorrelation {}; views {} (thinning to ≥ {})",
            o.masked,
            o.bottleneck,
            if o.bottleneck_depth { " (told the depth)" } else { "" },
            o.contrastive,
            o.temperature,
            o.decorrelation,
            cfg.views.count,
            cfg.views.thin_min
        );
        info!(
            "data: {} training / {} validation cells, {} genes, sequence length {}, {per_epoch} steps per epoch, {total_steps} steps in all",
            data.train_cells().len(),
            data.val_cells.len(),
            data.tokenizer.genes.len(),
            data.seq_len()
        );
        let mut log = RunLog::open(lead, &run.path, resumed.as_ref().map(|(_, s)| s.step))?;
        log.text("config", state.step, &format!("```toml\n{}\n```", cfg.to_toml()?))?;
        let head_dim = (cfg.model.d_model / cfg.model.n_heads) as i64;
        match crate::device::attention_backend(device, trainer.model.compute, data.seq_len() as i64, cfg.model.n_heads as i64, head_dim) {
            Ok(kernel) => info!("attention kernel for unpadded batches: {kernel}"),
            Err(e) => info!("attention kernel: cannot tell ({e})"),
        }
        let peak = peak_flops(device, trainer.model.compute, cfg.train.peak_tflops);
        info!("MFU against {:.1} TFLOP/s ({})", peak.flops / 1e12, peak.source);
        let baseline = context_free_baselines(&cfg, &data, rank, &mut ddp)?;
        info!("validation baselines on the fixed masks: per-gene bin frequencies {:.3}, global bin frequencies {:.3} (perplexity)", baseline.0, baseline.1);
        let cursor = EpochCursor { position: state.position, stream: None, accum: cfg.train.grad_accum, per_epoch: data.batches_per_epoch() };
        let bar = progress_bar(opts.progress && lead, total_steps, state.step);
        let first_step = state.step;
        Ok(Session {
            checkpoints: Checkpoints::new(&run.path),
            fault: Fault::from_env()?,
            cfg,
            rank,
            trainer,
            data,
            ddp,
            cursor,
            state,
            log,
            peak,
            baseline,
            bar,
            total_steps,
            first_step,
            run_path: run.path.clone(),
            startup_s: 0.0,
            startup_read_share: 0.0,
        })
    }

    /// Peak rate of all ranks together (cells, tokens and FLOPs of a step are the group's).
    fn group_peak(&self) -> f64 {
        self.peak.flops * self.rank.world() as f64
    }

    /// Reads, uploads and trains one optimizer step.
    fn step(&mut self) -> Result<(StepStats, StepOutcome)> {
        let mut stats = StepStats::default();
        let (batches, wait) = self.cursor.next_step(&self.data)?;
        stats.data_wait = wait;
        let compute_start = Instant::now();
        let uploaded = batches.iter().map(|b| self.trainer.upload(b)).collect::<Result<Vec<_>>>()?;
        // Every size of the step is known before it runs: one collective sums them all.
        let mut group = [0.0; 5];
        for b in &uploaded {
            let g = [b.counts.masked, b.counts.bottleneck, b.counts.cells, b.tokens() as f64, self.trainer.train_flops(b)];
            group.iter_mut().zip(g).for_each(|(s, x)| *s += x);
        }
        self.ddp.sum(&mut group)?;
        let counts = TermCounts { masked: group[0], bottleneck: group[1], cells: group[2] };
        (stats.cells, stats.tokens, stats.flops) = (group[2] as usize, group[3] as usize, group[4]);
        let checkpoints = &self.checkpoints;
        let last_good = || match checkpoints.newest() {
            Some(p) => format!("The last good checkpoint is {}", p.display()),
            None => "No checkpoint was written yet".into(),
        };
        let step = self.trainer.step + 1;
        let outcome = self.trainer.train_step(&uploaded, counts, &mut self.ddp, last_good).map_err(|e| match e {
            TrainError::Distributed(msg) => TrainError::Distributed(format!("step {step}: {msg}")),
            other => other,
        })?;
        let total = compute_start.elapsed().as_secs_f64();
        let comm = self.ddp.take_cost().seconds;
        (stats.compute, stats.comm, stats.optimizer) = ((total - comm - outcome.optimizer_s).max(0.0), comm, outcome.optimizer_s);
        stats.loss = outcome.loss;
        (stats.masked_loss, stats.bottleneck_loss, stats.contrastive_loss, stats.decorrelation_loss) = (outcome.masked_loss, outcome.bottleneck_loss, outcome.contrastive_loss, outcome.decorrelation_loss);
        (stats.grad_norm, stats.lr) = (outcome.grad_norm, outcome.lr);
        self.state.step = self.trainer.step;
        self.state.position = self.cursor.resume_position();
        Ok((stats, outcome))
    }

    /// Validates on the fixed masks, logs, and says whether this is the best checkpoint so far.
    fn validate(&mut self, epoch: u64, elapsed: f64, last: &mut Option<ValMetrics>) -> Result<bool> {
        let mut s = self.trainer.evaluate(self.data.val_stream(self.rank))?;
        self.ddp.sum(&mut s)?;
        let loss = s[0] / s[3].max(1.0);
        let bottleneck_loss = (self.cfg.objectives.bottleneck > 0.0).then(|| s[2] / s[4].max(1.0));
        let (base, global) = self.baseline;
        let v = ValMetrics { loss, perplexity: loss.exp(), masked_acc: s[1] / s[3].max(1.0), bottleneck_loss, baseline_perplexity: base, global_baseline_perplexity: global };
        let is_best = self.state.best_val_loss.is_none_or(|b| v.loss < b);
        if is_best {
            self.state.best_val_loss = Some(v.loss);
        }
        let step = self.trainer.step;
        let mut row = Row::new(step, epoch, "val")
            .with(Column::Loss, v.loss)
            .with(Column::Perplexity, v.perplexity)
            .with(Column::MaskedAcc, v.masked_acc)
            .with(Column::BaselinePerplexity, base)
            .with(Column::GlobalBaselinePerplexity, global)
            .with(Column::ElapsedS, elapsed);
        if let Some(b) = bottleneck_loss {
            row = row.with(Column::BottleneckLoss, b);
        }
        self.log.row(&row)?;
        let msg = format!(
            "step {step} epoch {epoch}: val loss {:.4}, perplexity {:.3} (per-gene baseline {base:.3}, global {global:.3}), masked accuracy {:.3}{}",
            v.loss,
            v.perplexity,
            v.masked_acc,
            bottleneck_loss.map(|b| format!(", bottleneck {b:.4}")).unwrap_or_default()
        );
        info_above(self.bar.as_ref(), &msg);
        *last = Some(v);
        Ok(is_best)
    }

    /// Checks the ranks agree, then rank 0 writes a checkpoint.
    fn checkpoint(&mut self, is_best: bool) -> Result<()> {
        if self.rank.world() > 1 {
            let crc = self.ddp.check_in_sync()?;
            info!("step {}: parameters identical on all {} ranks (crc32c {crc:08x})", self.trainer.step, self.rank.world());
        }
        if self.rank.rank() == 0 {
            let t = &self.trainer;
            self.checkpoints.save(&self.state, is_best, self.cfg.train.keep_last, |dir| {
                t.vs.save(dir.join(MODEL_FILE))?;
                t.opt.save(&dir.join(OPTIMIZER_FILE))
            })?;
        }
        Ok(())
    }

    /// Throughput, the final flush and the quick demo.
    fn finish(mut self, overall: &Window) -> Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let lead = self.rank.rank() == 0;
        // Every rank's training reads and peak memory, gathered by a sum over rank slots.
        let (r, world) = (self.rank.rank(), self.rank.world());
        const SLOTS: usize = 4;
        let mut per_rank = vec![0.0; SLOTS * world];
        let reads = &self.data.train_reads;
        per_rank[SLOTS * r] = reads.decoded.load(std::sync::atomic::Ordering::Relaxed) as f64;
        per_rank[SLOTS * r + 1] = reads.wanted.load(std::sync::atomic::Ordering::Relaxed) as f64;
        per_rank[SLOTS * r + 2] = crate::logging::max_rss_mb().unwrap_or(0.0);
        per_rank[SLOTS * r + 3] = self.startup_read_share;
        self.ddp.sum(&mut per_rank)?;
        if overall.steps > 0 && lead {
            let mut summary = overall.summary(&self.peak, &self.ddp.take_cost(), world, self.trainer.device.is_cuda());
            let amplification: Vec<f64> = per_rank.chunks(SLOTS).map(|x| x[0] / x[1].max(1.0)).collect();
            summary["read_amplification"] = serde_json::json!({
                "per_rank": amplification,
                "max": amplification.iter().copied().fold(0.0, f64::max),
                "read_plan": self.cfg.data.read_plan,
                "note": "cells in the store chunks a rank decoded for training batches, over the cells those reads were for",
            });
            summary["startup_s"] = serde_json::json!(self.startup_s);
            summary["startup_read_share_per_rank"] = serde_json::json!(per_rank.chunks(SLOTS).map(|x| x[3]).collect::<Vec<f64>>());
            summary["max_rss_mb_per_rank"] = serde_json::json!(per_rank.chunks(SLOTS).map(|x| x[2]).collect::<Vec<f64>>());
            info!("throughput: {summary}");
            let json = serde_json::to_vec_pretty(&summary).map_err(|e| TrainError::Internal(e.to_string()))?;
            dataloader::write_atomic(&self.run_path.join("throughput.json"), &json)?;
        }
        self.log.flush()?;
        if lead {
            let demo = crate::demo::quick_demo(&self.trainer, &self.data, self.rank)?;
            dataloader::write_atomic(&self.run_path.join("demo.tsv"), demo.as_bytes())?;
            info!("quick demo (one validation cell, masked genes; also in demo.tsv):\n{demo}");
        }
        Ok(())
    }
}

/// Perplexities of the two context-free predictors on this run's validation masks, summed
/// over ranks: (per-gene table, global frequencies).
fn context_free_baselines(cfg: &TrainConfig, data: &RunData, rank: Rank, ddp: &mut Ddp) -> Result<(f64, f64)> {
    let fit_cells = sample_blocks(data.train_cells(), cfg.tokenizer.max_fit_cells, |c| data.corpus.block_of(c), cfg.seed, Purpose::BaselineSample);
    let frequencies = BinFrequencies::fit(&data.corpus, &data.unmasked()?, data.mask, &fit_cells)?;
    let mut baseline = BaselineScore::default();
    for b in data.val_stream(rank) {
        baseline.add(frequencies.score(&b?));
    }
    let mut sums = [baseline.per_gene_nll, baseline.global_nll, baseline.n_masked as f64];
    ddp.sum(&mut sums)?;
    Ok(BaselineScore { per_gene_nll: sums[0], global_nll: sums[1], n_masked: sums[2] as u64 }.perplexities())
}
