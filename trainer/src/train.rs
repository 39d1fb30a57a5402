//! The training run: data → masked batches → steps → validation, logs and checkpoints.
//!
//! One optimizer step is three phases so data parallelism can slot in between them:
//! `Trainer::accumulate` runs forward + backward on each micro-batch (summed losses, no
//! averaging), then gradients and the step's sums are reduced across ranks, then
//! `Trainer::apply` divides by the global number of masked tokens, clips and updates.
//! Everything random is keyed by (seed, step) or (seed, epoch, cell), so a resumed run
//! continues exactly where an uninterrupted one would be.
//!
//! With several ranks every rank runs this same loop on its slice of each global batch; only
//! rank 0 writes logs, events and checkpoints (`Outputs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use dataloader::mask::{batch_fn, Batcher, MaskConfig, MaskedBatch, IGNORE, VALIDATION_EPOCH};
use dataloader::rng::hash_keys;
use dataloader::shard::{eval_plan, BatchStream, ReaderPosition, ShardConfig, ShardReader};
use dataloader::split::SplitSpec;
use dataloader::store::Store;
use dataloader::tokenize::Tokenizer;
use dataloader::shard::Rank;
use tch::{Device, Kind, Tensor};
use tracing::info;

use crate::baseline::{BaselineScore, BinFrequencies};
use crate::checkpoint::{read_state, Checkpoints, TrainState, MODEL_FILE, OPTIMIZER_FILE};
use crate::comm::Communicator;
use crate::config::{Precision, TrainConfig};
use crate::ddp::{CommCost, Ddp, BUCKET_BYTES};
use crate::device::{classify_oom, peak_flops};
use crate::error::{Result, TrainError};
use crate::events::EventWriter;
use crate::fault::Fault;
use crate::metrics::{MetricsCsv, Row};
use crate::model::{self, Encoder, MaskedLoss, Vocabulary};
use crate::optim::{learning_rate, AdamW};
use crate::run_dir::RunDir;

/// Validation numbers on the fixed validation masks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValMetrics {
    pub loss: f64,
    pub perplexity: f64,
    pub masked_acc: f64,
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

/// A micro-batch on the device.
pub struct DeviceBatch {
    pub genes: Tensor,
    pub bins: Tensor,
    /// `None` when no position is padding (keeps the fused attention kernels).
    pub padding: Option<Tensor>,
    /// Flat positions with a target, and the targets.
    pub masked: Tensor,
    pub targets: Tensor,
    pub n_cells: usize,
    /// Non-padding length of each sequence.
    pub seq_lens: Vec<usize>,
}

impl DeviceBatch {
    pub fn new(b: &MaskedBatch, device: Device) -> Result<DeviceBatch> {
        let shape = [b.batch_size as i64, b.seq_len as i64];
        let on = |v: &[i64]| -> Result<Tensor> { Ok(Tensor::f_from_slice(v)?.f_view(shape)?.f_to_device(device)?) };
        let (mut masked, mut targets) = (Vec::new(), Vec::new());
        for (i, &t) in b.target_bins.iter().enumerate() {
            if t != IGNORE {
                masked.push(i as i64);
                targets.push(t);
            }
        }
        let padding = if b.padding.iter().any(|&p| p) {
            Some(Tensor::f_from_slice(&b.padding)?.f_view(shape)?.f_to_device(device)?)
        } else {
            None
        };
        let seq_lens = b.padding.chunks(b.seq_len.max(1)).map(|row| row.iter().filter(|&&p| !p).count()).collect();
        Ok(DeviceBatch {
            genes: on(&b.gene_ids)?,
            bins: on(&b.input_bins)?,
            padding,
            masked: Tensor::f_from_slice(&masked)?.f_to_device(device)?,
            targets: Tensor::f_from_slice(&targets)?.f_to_device(device)?,
            n_cells: b.batch_size,
            seq_lens,
        })
    }

    pub fn tokens(&self) -> usize {
        self.seq_lens.iter().sum()
    }
}

/// Sums over the micro-batches of one step (and, in data-parallel runs, over ranks).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTotals {
    pub loss_sum: f64,
    pub n_masked: f64,
    pub n_correct: f64,
}

impl StepTotals {
    fn of(l: &MaskedLoss) -> Result<StepTotals> {
        Ok(StepTotals { loss_sum: l.loss_sum.f_double_value(&[])?, n_masked: l.n_masked as f64, n_correct: l.n_correct as f64 })
    }

    pub fn add(&mut self, o: StepTotals) {
        self.loss_sum += o.loss_sum;
        self.n_masked += o.n_masked;
        self.n_correct += o.n_correct;
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

/// Model, optimizer and schedule: the part of a run that checkpoints hold.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub device: Device,
    pub vs: tch::nn::VarStore,
    pub model: Encoder,
    pub opt: AdamW,
    /// Optimizer steps done.
    pub step: u64,
    pub total_steps: u64,
    /// This process's rank: dropout differs between ranks (they see different cells).
    pub rank: usize,
}

impl Trainer {
    /// A freshly initialized model (seeded from the config), for data-parallel rank `rank`.
    pub fn new(cfg: &TrainConfig, vocab: Vocabulary, device: Device, total_steps: u64, rank: usize) -> Result<Trainer> {
        let (vs, mut model) = model::build(&cfg.model, vocab, device, cfg.seed);
        model.compute = match (cfg.train.precision, device) {
            (Precision::Fp32, _) | (Precision::Auto, Device::Cpu) => Kind::Float,
            (Precision::Bf16 | Precision::Auto, _) => Kind::BFloat16,
        };
        let opt = AdamW::new(&vs, &cfg.optim)?;
        Ok(Trainer { cfg: cfg.clone(), device, vs, model, opt, step: 0, total_steps, rank })
    }

    /// Starts a step: clears gradients and reseeds dropout from (seed, step, rank).
    pub fn begin_step(&mut self) -> Result<()> {
        self.opt.zero_grad()?;
        tch::manual_seed(hash_keys(&[self.cfg.seed, 40, self.step, self.rank as u64]) as i64 >> 1);
        Ok(())
    }

    /// Forward and backward of one micro-batch; gradients of the *summed* loss accumulate.
    pub fn accumulate(&mut self, b: &DeviceBatch) -> Result<StepTotals> {
        let step = || -> Result<StepTotals> {
            let states = self.model.forward(&b.genes, &b.bins, b.padding.as_ref(), true)?;
            let l = self.model.masked_loss(&states, &b.masked, &b.targets)?;
            if l.n_masked > 0 {
                l.loss_sum.f_backward()?;
            }
            StepTotals::of(&l)
        };
        step().map_err(|e| match e {
            TrainError::Torch(t) => classify_oom(t, self.cfg.train.batch_size, self.cfg.train.grad_accum),
            other => other,
        })
    }

    /// Averages gradients over `totals.n_masked` (global over micro-batches and ranks), clips,
    /// and updates. Refuses a non-finite loss or gradient before touching the weights.
    pub fn apply(&mut self, totals: StepTotals, last_good: impl FnOnce() -> String) -> Result<StepOutcome> {
        let n = totals.n_masked.max(1.0);
        let loss = totals.loss_sum / n;
        self.opt.scale_grads(1.0 / n)?;
        let grad_norm = self.opt.clip_grad_norm(self.cfg.optim.clip_norm)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            let value = if loss.is_finite() { grad_norm } else { loss };
            return Err(TrainError::NonFinite { step: self.step + 1, value, last_good: last_good() });
        }
        let lr = learning_rate(&self.cfg.optim, self.step, self.total_steps);
        self.opt.apply(lr)?;
        self.step += 1;
        Ok(StepOutcome { loss, grad_norm, lr })
    }

    /// Loss and accuracy sums over batches, without dropout or gradients.
    pub fn evaluate(&self, batches: impl Iterator<Item = Result<MaskedBatch>>) -> Result<StepTotals> {
        let mut t = StepTotals::default();
        for b in batches {
            let b = DeviceBatch::new(&b?, self.device)?;
            let l = tch::no_grad(|| -> Result<_> {
                let states = self.model.forward(&b.genes, &b.bins, b.padding.as_ref(), false)?;
                self.model.masked_loss(&states, &b.masked, &b.targets)
            })?;
            t.add(StepTotals::of(&l)?);
        }
        Ok(t)
    }
}

/// The data side of a run: store, split, tokenizer, per-rank shard and batchers.
pub struct RunData {
    pub store: Arc<Store>,
    pub tokenizer: Arc<Tokenizer>,
    pub train_cells: Vec<u32>,
    pub val_cells: Vec<u32>,
    reader: ShardReader,
    batcher: Batcher,
    mask: MaskConfig,
    workers: usize,
    prefetch: usize,
    batch_size: usize,
}

impl RunData {
    /// Opens the store, splits it, and fits the tokenizer on training cells (or reuses `tokenizer`).
    pub fn open(cfg: &TrainConfig, rank: Rank, tokenizer: Option<Tokenizer>) -> Result<RunData> {
        if cfg.data.store.as_os_str().is_empty() {
            return Err(TrainError::Config("data.store is empty: pass --data STORE (a store made by `neurofm-data convert`)".into()));
        }
        let store = Arc::new(Store::open(&cfg.data.store)?);
        let by = (!cfg.split.by.is_empty()).then(|| cfg.split.by.clone());
        let split = SplitSpec { val_fraction: cfg.split.val_fraction, seed: cfg.seed, by }.apply(&store)?;
        let val_cells = match cfg.data.val_max_cells {
            0 => split.val,
            cap => sample_cells(&split.val, cap, cfg.seed, 41),
        };
        let tokenizer = match tokenizer {
            Some(t) => t,
            None => {
                let t = &cfg.tokenizer;
                Tokenizer::fit(&store, &split.train, t.kind, t.n_bins, t.max_fit_cells, cfg.seed)?
            }
        };
        tokenizer.check_genes(&store.var_names()?, &store.path)?;
        let tokenizer = Arc::new(tokenizer);
        let shard = ShardConfig { batch_size: cfg.train.batch_size, seed: cfg.seed, window_blocks: 4 };
        let reader = ShardReader::new(split.train.clone(), |c| store.chunk_of(c), rank, shard)?;
        let mask = MaskConfig { ratio: cfg.mask.ratio, nonzero_fraction: cfg.mask.nonzero_fraction, seed: cfg.seed };
        let batcher = Batcher::new(tokenizer.clone(), cfg.sequence, Some(mask))?;
        Ok(RunData {
            store,
            tokenizer,
            train_cells: split.train,
            val_cells,
            reader,
            batcher,
            mask,
            workers: cfg.data.workers,
            prefetch: cfg.data.prefetch,
            batch_size: cfg.train.batch_size,
        })
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.reader.batches_per_epoch()
    }

    /// Training batches of `start.epoch` from `start.batch` on.
    pub fn train_stream(&self, start: ReaderPosition) -> BatchStream<MaskedBatch> {
        let plan = self.reader.plan(start.epoch);
        BatchStream::new(self.store.clone(), plan, start, self.workers, self.prefetch, batch_fn(self.batcher.clone(), start.epoch))
    }

    /// Validation batches of this rank with the fixed validation masks.
    pub fn val_stream(&self, rank: Rank) -> impl Iterator<Item = Result<MaskedBatch>> {
        let plan = eval_plan(&self.val_cells, rank, self.batch_size);
        let f = batch_fn(self.batcher.clone(), VALIDATION_EPOCH);
        BatchStream::new(self.store.clone(), plan, ReaderPosition::default(), self.workers, self.prefetch, f).map(|r| r.map(|(_, b)| b).map_err(TrainError::from))
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
/// `comm`'s group (every rank calls this with the same config and run directory).
pub fn run(cfg: TrainConfig, run: &RunDir, opts: &RunOptions, comm: &dyn Communicator) -> Result<RunSummary> {
    let device = opts.device;
    if cfg.train.threads > 0 {
        tch::set_num_threads(cfg.train.threads as i32);
    }
    let rank = Rank::new(comm.rank(), comm.world())?;
    let lead = rank.rank() == 0;
    let fault = Fault::from_env()?;

    // Resume: the checkpoint must belong to this model, tokenizer and gene panel.
    let resumed = match &run.resume_from {
        Some(ckpt) => Some((ckpt.clone(), read_state(ckpt)?)),
        None => None,
    };
    let tokenizer_path = run.tokenizer_path();
    let tokenizer = match &resumed {
        Some((ckpt, state)) => {
            check_resume_compatible(&cfg, ckpt, state)?;
            let sha = dataloader::convert::sha256_file(&tokenizer_path)?;
            if sha != state.tokenizer_sha256 {
                return Err(TrainError::input(&tokenizer_path, format!("is not the tokenizer checkpoint {} was trained with (sha256 differs); resume in the original run directory", ckpt.display())));
            }
            let t = Tokenizer::load(&tokenizer_path)?;
            if t.vocab.n_bins != cfg.tokenizer.n_bins {
                return Err(TrainError::Config(format!("tokenizer.n_bins = {} but the run being resumed used {}; resume with its config", cfg.tokenizer.n_bins, t.vocab.n_bins)));
            }
            Some(t)
        }
        None => None,
    };
    // Rank 0 fits the tokenizer; the others wait and load the same file.
    let own_tokenizer = run.path.join("tokenizer.json");
    let data = if lead {
        let data = RunData::open(&cfg, rank, tokenizer)?;
        if resumed.is_none() || !own_tokenizer.exists() {
            data.tokenizer.save(&own_tokenizer)?;
        }
        dataloader::write_atomic(&run.path.join("config.toml"), cfg.to_toml()?.as_bytes())?;
        comm.barrier()?;
        data
    } else {
        comm.barrier()?;
        RunData::open(&cfg, rank, Some(Tokenizer::load(&own_tokenizer)?))?
    };
    let tokenizer_sha256 = dataloader::convert::sha256_file(&own_tokenizer)?;

    let per_epoch = (data.batches_per_epoch() / cfg.train.grad_accum) as u64;
    if per_epoch == 0 {
        return Err(TrainError::Config(format!(
            "train.grad_accum = {} exceeds the {} batches per epoch of {} training cells; lower train.grad_accum or train.batch_size",
            cfg.train.grad_accum,
            data.batches_per_epoch(),
            data.train_cells.len()
        )));
    }
    let total_steps = if cfg.train.max_steps > 0 { cfg.train.max_steps } else { cfg.train.epochs * per_epoch };
    let vocab = Vocabulary { n_genes: data.tokenizer.genes.len(), n_bins: data.tokenizer.vocab.n_bins };
    let mut trainer = Trainer::new(&cfg, vocab, device, total_steps, rank.rank())?;
    let mut state = TrainState {
        step: 0,
        position: ReaderPosition::default(),
        best_val_loss: None,
        model: cfg.model.clone(),
        vocab,
        tokenizer_sha256,
        world_size: rank.world(),
        global_batch: rank.world() * cfg.train.batch_size,
        rng: "dropout reseeded from (seed, step, rank) each step; data from (seed, epoch, cell)".into(),
    };
    if let Some((ckpt, saved)) = &resumed {
        trainer.vs.load(ckpt.join(MODEL_FILE)).map_err(|e| TrainError::input(&ckpt.join(MODEL_FILE), e.to_string()))?;
        trainer.opt.load(&ckpt.join(OPTIMIZER_FILE), saved.step)?;
        trainer.step = saved.step;
        state.step = saved.step;
        state.position = saved.position;
        state.best_val_loss = saved.best_val_loss;
        info!("resuming from {} at step {} (epoch {}, batch {})", ckpt.display(), saved.step, saved.position.epoch, saved.position.batch);
        if saved.global_batch > 0 && saved.global_batch != state.global_batch {
            state.position = saved.position.rescale(saved.global_batch, state.global_batch);
            info!(
                "global batch changed from {} to {} cells (world size {} → {}): continuing at batch {} of the same epoch order",
                saved.global_batch, state.global_batch, saved.world_size, rank.world(), state.position.batch
            );
        }
    }
    let mut ddp = Ddp::new(comm, trainer.opt.parameters().map(Tensor::shallow_clone).collect(), BUCKET_BYTES, device)?;
    ddp.broadcast_parameters()?;
    if rank.world() > 1 {
        let c = ddp.take_cost();
        info!("data parallel over {} ranks ({}): {:.2} MB of gradients all-reduced per step in {} buckets", rank.world(), comm.name(), c.bytes_per_step as f64 / 1e6, c.buckets);
    }

    let (all, body, head) = trainer.model.param_counts();
    info!(
        "model: {all} parameters ({body} in {} layers of width {}, {} in the embeddings, {head} in the head); {} on {device:?}",
        cfg.model.n_layers,
        cfg.model.d_model,
        all - body - head,
        if trainer.model.compute == Kind::Float { "fp32" } else { "bf16 mixed precision" }
    );
    info!(
        "data: {} training / {} validation cells, {} genes, sequence length {}, {} steps per epoch, {} steps in all",
        data.train_cells.len(),
        data.val_cells.len(),
        vocab.n_genes,
        data.batcher.seq_len(),
        per_epoch,
        total_steps
    );

    let mut out = Outputs::open(lead, &run.path, resumed.as_ref().map(|(_, s)| s.step))?;
    out.text("config", state.step, &format!("```toml\n{}\n```", cfg.to_toml()?))?;
    let checkpoints = Checkpoints::new(&run.path);
    let (peak, peak_source) = peak_flops(device, cfg.train.peak_tflops);
    info!("MFU against {:.1} TFLOP/s ({peak_source})", peak / 1e12);
    // Cells, tokens and FLOPs of a step are summed over ranks, so rates compare with all ranks' peak.
    let group_peak = peak * rank.world() as f64;

    let unmasked = Batcher::new(data.tokenizer.clone(), cfg.sequence, None)?;
    let fit_cells = sample_cells(&data.train_cells, cfg.tokenizer.max_fit_cells, cfg.seed, 42);
    let frequencies = BinFrequencies::fit(&data.store, &unmasked, data.mask, &fit_cells)?;
    let mut baseline = BaselineScore::default();
    for b in data.val_stream(rank) {
        baseline.add(frequencies.score(&b?));
    }
    let mut sums = [baseline.per_gene_nll, baseline.global_nll, baseline.n_masked as f64];
    ddp.sum(&mut sums)?;
    let baseline = BaselineScore { per_gene_nll: sums[0], global_nll: sums[1], n_masked: sums[2] as u64 };
    let (base_ppl, global_ppl) = baseline.perplexities();
    info!("validation baselines on the fixed masks: per-gene bin frequencies {base_ppl:.3}, global bin frequencies {global_ppl:.3} (perplexity)");

    let validate = |trainer: &Trainer, ddp: &mut Ddp| -> Result<ValMetrics> {
        let t = trainer.evaluate(data.val_stream(rank))?;
        let mut sums = [t.loss_sum, t.n_masked, t.n_correct];
        ddp.sum(&mut sums)?;
        let t = StepTotals { loss_sum: sums[0], n_masked: sums[1], n_correct: sums[2] };
        let loss = t.loss_sum / t.n_masked.max(1.0);
        Ok(ValMetrics { loss, perplexity: loss.exp(), masked_acc: t.n_correct / t.n_masked.max(1.0), baseline_perplexity: base_ppl, global_baseline_perplexity: global_ppl })
    };

    let bar = progress_bar(opts.progress && lead, total_steps, state.step);
    let started = Instant::now();
    let mut window = Window::default();
    let mut overall = Window::default();
    let first_step = state.step;
    let mut last_val = None;
    let accum = cfg.train.grad_accum;
    let batches_per_epoch = data.batches_per_epoch();
    while trainer.step < total_steps {
        if state.position.batch + accum > batches_per_epoch {
            state.position = ReaderPosition { epoch: state.position.epoch + 1, batch: 0 };
        }
        let mut stream = data.train_stream(state.position);
        while trainer.step < total_steps && state.position.batch + accum <= batches_per_epoch {
            trainer.begin_step()?;
            let mut stats = StepStats::default();
            let mut totals = StepTotals::default();
            let compute_start = Instant::now();
            for _ in 0..accum {
                let wait = Instant::now();
                let (pos, batch) = stream.next().ok_or_else(|| TrainError::Internal("the epoch ended before its planned batches".into()))??;
                stats.data_wait += wait.elapsed().as_secs_f64();
                let b = DeviceBatch::new(&batch, device)?;
                let t = trainer.accumulate(&b)?;
                totals.add(t);
                stats.cells += b.n_cells;
                stats.tokens += b.tokens();
                stats.flops += trainer.model.train_flops(&b.seq_lens, t.n_masked as usize);
                state.position = pos;
            }
            stats.compute = compute_start.elapsed().as_secs_f64() - stats.data_wait;
            // Data parallelism: gradients and the step's sums over all ranks.
            ddp.all_reduce_gradients()?;
            let mut sums = [totals.loss_sum, totals.n_masked, totals.n_correct, stats.cells as f64, stats.tokens as f64, stats.flops];
            ddp.sum(&mut sums)?;
            totals = StepTotals { loss_sum: sums[0], n_masked: sums[1], n_correct: sums[2] };
            (stats.cells, stats.tokens, stats.flops) = (sums[3] as usize, sums[4] as usize, sums[5]);
            let comm_cost = ddp.take_cost();
            stats.comm = comm_cost.seconds;
            let opt_start = Instant::now();
            let last_good = || match checkpoints.newest() {
                Some(p) => format!("The last good checkpoint is {}", p.display()),
                None => "No checkpoint was written yet".into(),
            };
            let outcome = trainer.apply(totals, last_good)?;
            stats.optimizer = opt_start.elapsed().as_secs_f64();
            (stats.loss_sum, stats.n_masked, stats.grad_norm, stats.lr) = (totals.loss_sum, totals.n_masked, outcome.grad_norm, outcome.lr);
            window.add(&stats);
            if trainer.step > first_step + 1 {
                overall.add(&stats); // the first step warms up allocators and kernels
            }
            state.step = trainer.step;
            if let Some(f) = &fault {
                f.maybe_crash(rank.rank(), state.step);
            }
            let epoch_done = state.position.batch + accum > batches_per_epoch;
            if epoch_done {
                state.position = ReaderPosition { epoch: state.position.epoch + 1, batch: 0 };
            }
            if let Some(bar) = &bar {
                bar.set_position(trainer.step);
                bar.set_message(format!("loss {:.3}  {:.1} cells/s", outcome.loss, window.sum.cells as f64 / window.seconds()));
            }
            let step = trainer.step;
            if step % cfg.train.log_every == 0 || step == total_steps {
                let row = window.row(step, state.position.epoch, group_peak, started.elapsed().as_secs_f64());
                for (tag, v) in [
                    ("train/loss", row.loss),
                    ("train/lr", row.lr),
                    ("train/grad_norm", row.grad_norm),
                    ("train/cells_per_s", row.cells_per_s),
                    ("train/tokens_per_s", row.tokens_per_s),
                    ("train/mfu", row.mfu),
                    ("train/data_wait_frac", row.data_wait_frac),
                    ("train/allreduce_frac", row.allreduce_frac),
                ] {
                    out.scalar(tag, step, v.unwrap_or(f64::NAN))?;
                }
                out.row(&row)?;
                window = Window::default();
            }
            let stop_here = opts.stop_at_step == Some(step);
            let final_step = step == total_steps;
            let do_val = final_step || if cfg.train.val_every > 0 { step % cfg.train.val_every == 0 } else { epoch_done };
            let mut is_best = false;
            if do_val {
                let v = validate(&trainer, &mut ddp)?;
                is_best = state.best_val_loss.is_none_or(|b| v.loss < b);
                if is_best {
                    state.best_val_loss = Some(v.loss);
                }
                log_validation(&mut out, step, state.position.epoch, &v, started.elapsed().as_secs_f64())?;
                let msg = format!(
                    "step {step} epoch {}: val loss {:.4}, perplexity {:.3} (per-gene baseline {:.3}, global {:.3}), masked accuracy {:.3}",
                    state.position.epoch, v.loss, v.perplexity, v.baseline_perplexity, v.global_baseline_perplexity, v.masked_acc
                );
                match &bar {
                    Some(bar) => bar.suspend(|| info!("{msg}")),
                    None => info!("{msg}"),
                }
                last_val = Some(v);
            }
            let do_ckpt = final_step || stop_here || if cfg.train.checkpoint_every > 0 { step % cfg.train.checkpoint_every == 0 } else { do_val };
            if do_ckpt {
                if rank.world() > 1 {
                    let crc = ddp.check_in_sync()?;
                    info!("step {step}: parameters identical on all {} ranks (crc32c {crc:08x})", rank.world());
                }
                if lead {
                    checkpoints.save(&state, is_best, cfg.train.keep_last, |dir| {
                        trainer.vs.save(dir.join(MODEL_FILE))?;
                        trainer.opt.save(&dir.join(OPTIMIZER_FILE))
                    })?;
                }
            }
            if stop_here {
                info!("stopping at step {step} as asked (--stop-at-step); continue with --resume auto");
                return Ok(RunSummary { steps: step, val: last_val, run_dir: run.path.clone() });
            }
            if epoch_done {
                break;
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if overall.steps > 0 && lead {
        let summary = overall.summary(group_peak, &peak_source, &ddp.take_cost(), rank.world());
        info!("throughput: {summary}");
        let json = serde_json::to_vec_pretty(&summary).map_err(|e| TrainError::Internal(e.to_string()))?;
        dataloader::write_atomic(&run.path.join("throughput.json"), &json)?;
    }
    out.flush()?;
    if lead {
        let demo = quick_demo(&trainer, &data, rank)?;
        dataloader::write_atomic(&run.path.join("demo.tsv"), demo.as_bytes())?;
        info!("quick demo (one validation cell, masked genes; also in demo.tsv):\n{demo}");
    }
    Ok(RunSummary { steps: trainer.step, val: last_val, run_dir: run.path.clone() })
}

/// Refuses to resume a checkpoint whose model shape differs from the config.
fn check_resume_compatible(cfg: &TrainConfig, ckpt: &std::path::Path, state: &TrainState) -> Result<()> {
    if state.model != cfg.model {
        let old = toml::to_string(&state.model).unwrap_or_default();
        return Err(TrainError::input(
            ckpt,
            format!("was trained with a different model shape; the [model] section must be unchanged to resume. Checkpoint's:\n{old}"),
        ));
    }
    Ok(())
}

/// At most `max` cells, ascending: those with the smallest hash of (seed, purpose, cell).
fn sample_cells(cells: &[u32], max: usize, seed: u64, purpose: u64) -> Vec<u32> {
    if cells.len() <= max {
        return cells.to_vec();
    }
    let mut s = cells.to_vec();
    s.sort_by_key(|&c| hash_keys(&[seed, purpose, c as u64]));
    s.truncate(max);
    s.sort_unstable();
    s
}

/// Events and metrics.csv, written by rank 0 only (other ranks get no-ops).
struct Outputs {
    events: Option<EventWriter>,
    csv: Option<MetricsCsv>,
}

impl Outputs {
    fn open(lead: bool, run: &std::path::Path, resumed_at: Option<u64>) -> Result<Outputs> {
        if !lead {
            return Ok(Outputs { events: None, csv: None });
        }
        Ok(Outputs { events: Some(EventWriter::create(run)?), csv: Some(MetricsCsv::open(run, resumed_at)?) })
    }

    fn scalar(&mut self, tag: &str, step: u64, v: f64) -> Result<()> {
        self.events.as_mut().map_or(Ok(()), |e| e.scalar(tag, step, v))
    }

    fn text(&mut self, tag: &str, step: u64, text: &str) -> Result<()> {
        self.events.as_mut().map_or(Ok(()), |e| e.text(tag, step, text))
    }

    /// Writes a metrics.csv row and flushes the events.
    fn row(&mut self, row: &Row) -> Result<()> {
        if let Some(c) = self.csv.as_mut() {
            c.write(row)?;
        }
        self.flush()
    }

    fn flush(&mut self) -> Result<()> {
        self.events.as_mut().map_or(Ok(()), EventWriter::flush)
    }
}

fn log_validation(out: &mut Outputs, step: u64, epoch: u64, v: &ValMetrics, elapsed: f64) -> Result<()> {
    for (tag, x) in [
        ("val/loss", v.loss),
        ("val/perplexity", v.perplexity),
        ("val/masked_acc", v.masked_acc),
        ("val/baseline_perplexity", v.baseline_perplexity),
        ("val/global_baseline_perplexity", v.global_baseline_perplexity),
    ] {
        out.scalar(tag, step, x)?;
    }
    out.row(&Row {
        step,
        epoch,
        split: "val",
        loss: Some(v.loss),
        perplexity: Some(v.perplexity),
        masked_acc: Some(v.masked_acc),
        baseline_perplexity: Some(v.baseline_perplexity),
        global_baseline_perplexity: Some(v.global_baseline_perplexity),
        elapsed_s: Some(elapsed),
        ..Row::default()
    })
}

fn progress_bar(enabled: bool, total: u64, at: u64) -> Option<indicatif::ProgressBar> {
    if !enabled {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} (eta {eta})") {
        bar.set_style(style);
    }
    bar.set_position(at);
    Some(bar)
}

/// Timings and sizes of one optimizer step.
#[derive(Debug, Clone, Copy, Default)]
struct StepStats {
    cells: usize,
    tokens: usize,
    flops: f64,
    data_wait: f64,
    compute: f64,
    /// Gradient all-reduce and step sums across ranks.
    comm: f64,
    optimizer: f64,
    loss_sum: f64,
    n_masked: f64,
    grad_norm: f64,
    lr: f64,
}

/// Steps since the last log row (or over the whole run). Rates use step time only, so
/// validation and checkpoints do not count against throughput.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    steps: u64,
    sum: StepStats,
}

impl Window {
    fn add(&mut self, s: &StepStats) {
        let t = &mut self.sum;
        self.steps += 1;
        t.cells += s.cells;
        t.tokens += s.tokens;
        t.flops += s.flops;
        t.data_wait += s.data_wait;
        t.compute += s.compute;
        t.comm += s.comm;
        t.optimizer += s.optimizer;
        t.loss_sum += s.loss_sum;
        t.n_masked += s.n_masked;
        (t.grad_norm, t.lr) = (s.grad_norm, s.lr);
    }

    fn seconds(&self) -> f64 {
        (self.sum.data_wait + self.sum.compute + self.sum.comm + self.sum.optimizer).max(1e-9)
    }

    /// `group_peak`: the peak of all ranks together (cells, tokens and FLOPs are the group's).
    fn row(&self, step: u64, epoch: u64, group_peak: f64, elapsed: f64) -> Row {
        let (t, secs) = (&self.sum, self.seconds());
        Row {
            step,
            epoch,
            split: "train",
            loss: Some(t.loss_sum / t.n_masked.max(1.0)),
            lr: Some(t.lr),
            grad_norm: Some(t.grad_norm),
            cells_per_s: Some(t.cells as f64 / secs),
            tokens_per_s: Some(t.tokens as f64 / secs),
            mfu: Some(t.flops / secs / group_peak),
            data_wait_frac: Some(t.data_wait / secs),
            allreduce_frac: Some(t.comm / secs),
            elapsed_s: Some(elapsed),
            ..Row::default()
        }
    }

    /// Throughput summary written to `throughput.json` (what `make bench-train` prints).
    /// Cells, tokens and FLOPs are summed over ranks; times are rank 0's.
    fn summary(&self, group_peak: f64, peak_source: &str, comm: &CommCost, world: usize) -> serde_json::Value {
        let (t, secs) = (&self.sum, self.seconds());
        let per_step_ms = |x: f64| 1e3 * x / self.steps.max(1) as f64;
        serde_json::json!({
            "steps_timed": self.steps,
            "cells_per_s": t.cells as f64 / secs,
            "tokens_per_s": t.tokens as f64 / secs,
            "step_ms": {
                "data_wait": per_step_ms(t.data_wait),
                "forward_backward": per_step_ms(t.compute),
                "allreduce": per_step_ms(t.comm),
                "optimizer": per_step_ms(t.optimizer),
            },
            "world_size": world,
            "allreduce": {
                "bytes_per_step": comm.bytes_per_step,
                "buckets": comm.buckets,
                "share_of_step": t.comm / secs,
            },
            "tflops_achieved": t.flops / secs / 1e12,
            "mfu": t.flops / secs / group_peak,
            "peak_tflops": group_peak / world as f64 / 1e12,
            "peak_source": peak_source,
            "max_rss_mb": max_rss_mb(),
        })
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), in MB.
fn max_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The original's demo: for one validation cell, each masked gene's true bin and the model's
/// three most likely bins, as TSV.
fn quick_demo(trainer: &Trainer, data: &RunData, rank: Rank) -> Result<String> {
    let mut out = String::from("gene\ttrue_bin\ttop1\tp1\ttop2\tp2\ttop3\tp3\n");
    let Some(batch) = data.val_stream(rank).next() else { return Ok(out) };
    let batch = batch?;
    let l = batch.seq_len;
    let cell: Vec<(usize, i64)> = (0..l).filter(|&p| batch.target_bins[p] != IGNORE).map(|p| (p, batch.target_bins[p])).collect();
    let b = DeviceBatch::new(&batch, trainer.device)?;
    let probs = tch::no_grad(|| -> Result<Tensor> {
        let states = trainer.model.forward(&b.genes, &b.bins, b.padding.as_ref(), false)?;
        // The first cell's masked positions lead `b.masked` (flat positions are ascending).
        let logits = trainer.model.logits_at(&states, &b.masked.f_narrow(0, 0, cell.len() as i64)?)?;
        Ok(logits.f_softmax(-1, Kind::Float)?.f_to_device(Device::Cpu)?)
    })?;
    let (top_p, top_i) = probs.f_topk(3.min(data.tokenizer.vocab.n_bins as i64), -1, true, true)?;
    for (row, &(p, truth)) in cell.iter().enumerate() {
        let gene = &data.tokenizer.genes[batch.gene_ids[p] as usize];
        out.push_str(&format!("{gene}\t{truth}"));
        for k in 0..top_i.size()[1] {
            out.push_str(&format!("\t{}\t{:.3}", top_i.f_int64_value(&[row as i64, k])?, top_p.f_double_value(&[row as i64, k])?));
        }
        out.push('\n');
    }
    Ok(out)
}
