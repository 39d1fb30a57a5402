//! `neurofm-finetune`: a pretrained encoder plus a classification head trained on labelled
//! cells, scored on the test cells of `neurofm-eval`'s split beside expression baselines; as
//! one process or as one rank of a data-parallel group (neurofm-launch, srun, mpirun).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use common::cli::OutputArgs;
use common::exit::ExitStatus;
use common::logging::{self, LogSetup};
use finetune::config::FinetuneConfig;
use finetune::train::{run, Plan, RunOptions};
use finetune::FinetuneError;
use launcher::env::DistEnv;
use trainer::comm::{connect, nccl_lib, resolve_backend, Backend, Communicator};
use trainer::device::{DeviceChoice, LocalRank};
use trainer::run_dir::{Resume, RunDir};
use trainer::TrainError;

/// Fine-tune a pretrained neurofm run for cell-type classification.
#[derive(Parser, Debug)]
#[command(version, after_help = "\
Examples:
  neurofm finetune --pretrained runs/whb --data whb.zarr --label-col subtype --run-dir runs/ft-whb
  neurofm finetune --pretrained runs/whb --data mn.zarr --label-col subclass --split group:study --from-scratch
  neurofm launch --nproc-per-node 2 -- neurofm finetune --pretrained runs/whb --data whb.zarr --label-col subtype")]
struct Args {
    /// Pretraining run directory (encoder, tokenizer, gene vocabulary) [task.pretrained].
    #[arg(long)]
    pretrained: Option<PathBuf>,
    /// Labelled zarr store from `neurofm-data convert` [task.data].
    #[arg(long)]
    data: Option<PathBuf>,
    /// obs column holding the labels [task.label_col].
    #[arg(long)]
    label_col: Option<String>,
    /// Only these label values, each its own class, comma-separated [task.classes].
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
    /// Drop classes with fewer cells (reported) instead of refusing them [task.min_class_cells].
    #[arg(long)]
    min_class_cells: Option<usize>,
    /// `stratified`, or `group:COLUMN` to test on whole groups never trained on [task.split].
    #[arg(long)]
    split: Option<String>,
    /// Share of the labelled cells held out for the test [task.test_frac].
    #[arg(long)]
    test_frac: Option<f64>,
    /// Train the head only [encoder.freeze].
    #[arg(long)]
    freeze_encoder: bool,
    /// Also train the same architecture from random weights (the control) [baselines.from_scratch].
    #[arg(long)]
    from_scratch: bool,
    /// TOML config (every key has a default; see README).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config value, e.g. --set optim.lr=1e-4 (repeatable; wins over the flags).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Run directory (default: runs/finetune-<pretrained run>-<label column>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue a run: `auto` (newest valid checkpoint) or a checkpoint directory.
    #[arg(long)]
    resume: Option<Resume>,
    /// Delete an existing run directory and start over.
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Checkpoint and exit after this optimizer step (continue later with --resume auto).
    #[arg(long)]
    stop_at_step: Option<u64>,
    /// Seed of the head's initialization, the validation split and dropout (overrides `seed`).
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    output: OutputArgs,
    /// Transport between ranks: auto (NCCL on GPUs, MPI on CPUs), nccl, mpi, single.
    #[arg(long, value_enum, env = "NEUROFM_BACKEND", default_value = "auto")]
    backend: Backend,
}

fn main() -> ExitCode {
    // As neurofm-train: libtorch backs large CPU tensors with transparent huge pages.
    if std::env::var_os("THP_MEM_ALLOC_ENABLE").is_none() {
        std::env::set_var("THP_MEM_ALLOC_ENABLE", "1");
    }
    let args = Args::parse();
    match finetune_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_with(&e, None),
    }
}

/// Reports `e`, aborts the communicator and exits at once, without destructors: a failing
/// rank must not wait in MPI/NCCL teardown while its peers spin in a collective (see
/// neurofm-train).
fn exit_with(e: &FinetuneError, comm: Option<&dyn Communicator>) -> ! {
    tracing::error!("{e}");
    eprintln!("error: {e}");
    if let Some(c) = comm {
        c.abort();
    }
    use std::io::Write;
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    // SAFETY: `_exit` ends the process without running destructors or atexit handlers, which
    // is the point; every line was written and flushed above.
    unsafe { libc::_exit(e.exit_code()) }
}

fn finetune_main(args: Args) -> Result<(), FinetuneError> {
    let env = DistEnv::from_env().map_err(TrainError::from)?;
    logging::init(LogSetup { rank: env.rank, quiet: args.output.quiet, to_file: true });
    let device = args.device.resolve(LocalRank { rank: env.local_rank, world: env.local_world })?;
    let backend = resolve_backend(args.backend, &env, device);
    if backend == Backend::Nccl {
        nccl_lib::bind_to_torch_nccl(); // re-execs this process so cudarc uses libtorch's NCCL
    }
    let comm = connect(backend, &env, device)?;
    if let Err(e) = in_group(&args, comm.as_ref(), device) {
        exit_with(&e, Some(comm.as_ref()));
    }
    Ok(())
}

/// The command-line flags as `[task]`/`[encoder]`/`[baselines]` overrides, then `--set`.
fn overrides(args: &Args) -> Vec<String> {
    let s = |v: &str| toml::Value::String(v.to_string()).to_string();
    let mut o = Vec::new();
    if let Some(p) = &args.pretrained {
        o.push(format!("task.pretrained={}", s(&p.to_string_lossy())));
    }
    if let Some(d) = &args.data {
        o.push(format!("task.data={}", s(&d.to_string_lossy())));
    }
    if let Some(c) = &args.label_col {
        o.push(format!("task.label_col={}", s(c)));
    }
    if !args.classes.is_empty() {
        let list = toml::Value::Array(args.classes.iter().map(|c| toml::Value::String(c.clone())).collect());
        o.push(format!("task.classes={list}"));
    }
    if let Some(n) = args.min_class_cells {
        o.push(format!("task.min_class_cells={n}"));
    }
    if let Some(sp) = &args.split {
        o.push(format!("task.split={}", s(sp)));
    }
    if let Some(f) = args.test_frac {
        o.push(format!("task.test_frac={f:?}"));
    }
    if args.freeze_encoder {
        o.push("encoder.freeze=true".into());
    }
    if args.from_scratch {
        o.push("baselines.from_scratch=true".into());
    }
    o.extend(args.seed.map(|seed| format!("seed={seed}")));
    o.extend(args.overrides.iter().cloned());
    o
}

fn in_group(args: &Args, comm: &dyn Communicator, device: tch::Device) -> Result<(), FinetuneError> {
    let run_path = match (&args.run_dir, &args.pretrained, &args.label_col) {
        (Some(d), _, _) => d.clone(),
        (None, Some(p), Some(label)) => {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
            PathBuf::from("runs").join(format!("finetune-{name}-{label}"))
        }
        _ => return Err(FinetuneError::Usage("give --run-dir, or --pretrained and --label-col (the default run directory is named after them)".into())),
    };
    // A group restarted by neurofm-launch --max-restarts continues from its newest checkpoint.
    let restarted = launcher::env::is_restart();
    let resume = match (&args.resume, restarted) {
        (Some(r), _) => r.clone(),
        (None, true) => Resume::Auto,
        (None, false) => Resume::No,
    };
    // The config: the given file, else (resuming) the run's own finetune.toml, else defaults.
    let saved = run_path.join(finetune::run_files::FINETUNE_CONFIG);
    let base = args.config.clone().or_else(|| (resume != Resume::No && saved.is_file()).then_some(saved));
    let cfg = FinetuneConfig::load(base.as_deref(), &overrides(args))?;
    // Every input is checked before the run directory is created or touched.
    let plan = Plan::new(cfg)?;
    plan.check_batches(comm.world())?;
    let force = args.force && !restarted;
    let run_dir = if comm.rank() == 0 {
        let dir = RunDir::prepare(&run_path, &resume, force);
        comm.barrier()?;
        dir?
    } else {
        comm.barrier()?;
        RunDir::join(&run_path, &resume)?
    };
    if comm.rank() == 0 {
        let log = run_dir.path.join("finetune.log");
        logging::attach(&log).map_err(|e| FinetuneError::io(&log, e))?;
    }
    tracing::info!("neurofm-finetune {} → {} (rank {} of {}, {})", env!("CARGO_PKG_VERSION"), run_dir.path.display(), comm.rank(), comm.world(), trainer::device::describe(device));
    let opts = RunOptions { device, progress: args.output.progress(), stop_at_step: args.stop_at_step };
    if let Some(m) = run(&plan, &run_dir, &opts, comm)? {
        println!("{:<58} {:>8} {:>8} {:>8}", "classifier (test cells)", "accuracy", "bal.acc", "macro F1");
        let mut all = vec![&m.model];
        all.extend(m.baselines.values());
        for e in all {
            println!("{:<58} {:>8.3} {:>8.3} {:>8.3}", e.name, e.accuracy, e.balanced_accuracy, e.macro_f1);
        }
        println!("report: {}", run_dir.path.join("report.html").display());
    }
    Ok(())
}
