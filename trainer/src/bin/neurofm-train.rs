//! `neurofm-train`: masked-bin pretraining from a TOML config, as one process or as one rank
//! of a data-parallel group (started by neurofm-launch, srun or mpirun; DESIGN §5).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use common::cli::OutputArgs;
use common::exit::ExitStatus;
use common::logging::{self, LogSetup};
use launcher::env::DistEnv;
use trainer::comm::{connect, nccl_lib, resolve_backend, Backend, Communicator};
use trainer::config::TrainConfig;
use trainer::device::{describe, DeviceChoice, LocalRank};
use trainer::run_dir::{Resume, RunDir};
use trainer::train::{run, RunOptions};
use trainer::TrainError;

/// Pretrain the neurofm encoder on a zarr store (see configs/ for presets).
#[derive(Parser, Debug)]
#[command(version, after_help = "\
Examples:
  neurofm train --config configs/whb-fast.toml --data whb.zarr --run-dir runs/whb
  neurofm train --config configs/whb-fast.toml --data whb.zarr --run-dir runs/whb --resume auto
  neurofm launch --nproc-per-node 4 -- neurofm train --config configs/atlas.toml --data atlas.zarr
  neurofm train --config configs/debug-cpu.toml --data a.zarr --data b.zarr --set optim.lr=1e-4")]
struct Args {
    /// TOML config (configs/debug-cpu.toml, configs/seed-hello.toml, ...).
    #[arg(long, required_unless_present = "preflight")]
    config: Option<PathBuf>,
    /// Zarr store from `neurofm-data convert` (overrides data.store); repeat it to train on a
    /// corpus of several stores (overrides data.stores; see the README's corpus section).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Run directory (default: runs/<config name>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Override a config value, e.g. --set optim.lr=1e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue a run: `auto` (newest valid checkpoint of the run directory) or a checkpoint directory.
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
    /// Seed of initialization, split, shuffling, masking and dropout (overrides `seed`).
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    output: OutputArgs,
    /// Transport between ranks: auto (NCCL on GPUs, MPI on CPUs), nccl, mpi, single.
    #[arg(long, value_enum, env = "NEUROFM_BACKEND", default_value = "auto")]
    backend: Backend,
    /// Check this node (device choice, GPU, driver, NCCL, MPI) without training, then exit.
    #[arg(long)]
    preflight: bool,
}

fn main() -> ExitCode {
    // libtorch's CPU allocator then backs large tensors with transparent huge pages: without
    // it every step faults in gigabytes of fresh 4 KB pages (1.4× slower at seed-hello shape).
    // Read once by libtorch at its first allocation, so it is set before anything else runs.
    if std::env::var_os("THP_MEM_ALLOC_ENABLE").is_none() {
        std::env::set_var("THP_MEM_ALLOC_ENABLE", "1");
    }
    let args = Args::parse();
    match train(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_with(&e, None),
    }
}

/// Reports `e`, aborts the communicator and exits at once. Skipping destructors is deliberate
/// in a group: a failing rank must not wait in MPI_Finalize, NCCL teardown or CUDA's atexit
/// handlers while peers spin in a collective; its exit is what makes mpirun, srun or
/// neurofm-launch stop the others, and the abort frees peers blocked on it.
fn exit_with(e: &TrainError, comm: Option<&dyn Communicator>) -> ! {
    tracing::error!("{e}");
    eprintln!("error: {e}");
    if let Some(c) = comm {
        c.abort();
    }
    use std::io::Write;
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    // SAFETY: `_exit` ends the process without running destructors or atexit handlers, which
    // is the point; every log line was written and flushed above.
    unsafe { libc::_exit(e.exit_code()) }
}

fn train(args: Args) -> Result<(), TrainError> {
    let env = DistEnv::from_env()?;
    logging::init(LogSetup { rank: env.rank, quiet: args.output.quiet, to_file: true });
    let device = args.device.resolve(LocalRank { rank: env.local_rank, world: env.local_world })?;
    let backend = resolve_backend(args.backend, &env, device);
    if backend == Backend::Nccl || args.preflight {
        nccl_lib::bind_to_torch_nccl(); // re-execs this process so cudarc uses libtorch's NCCL
    }
    if args.preflight {
        return preflight(&env, device, backend);
    }
    let comm = connect(backend, &env, device)?;
    // From here on a failure aborts the communicator and exits (see `exit_with`).
    if let Err(e) = train_in_group(&args, comm.as_ref(), device) {
        exit_with(&e, Some(comm.as_ref()));
    }
    Ok(())
}

/// `--preflight`: what this rank would run on and whether its libraries load, for a first
/// contact with a cluster (run it under srun to check every node).
fn preflight(env: &DistEnv, device: tch::Device, backend: Backend) -> Result<(), TrainError> {
    println!("rank {} of {} (local {} of {}, from {:?})", env.rank, env.world, env.local_rank, env.local_world, env.source);
    println!("device: {device:?}: {}", describe(device));
    println!("backend: {backend:?}");
    let kind = if device.is_cuda() { tch::Kind::BFloat16 } else { tch::Kind::Float };
    match trainer::device::attention_backend(device, kind, 2048, 8, 64) {
        Ok(b) => println!("attention: {b} (8 heads of 64 over 2048 tokens, {kind:?})"),
        Err(e) => println!("attention: cannot tell ({e})"),
    }
    match nccl_lib::load() {
        Ok((path, version)) => println!("nccl: {version} from {path}"),
        Err(e) => println!("nccl: not usable: {e}"),
    }
    println!("mpi: {}", if cfg!(feature = "mpi") { "built in" } else { "not built in (cargo feature `mpi` off)" });
    Ok(())
}

fn train_in_group(args: &Args, comm: &dyn Communicator, device: tch::Device) -> Result<(), TrainError> {
    let mut overrides = args.overrides.clone();
    overrides.extend(args.seed.map(|s| format!("seed={s}")));
    match args.data.as_slice() {
        [] => {}
        [one] => overrides.push(format!("data.store={}", toml_string(&one.to_string_lossy()))),
        many => {
            let list: Vec<String> = many.iter().map(|p| format!("{{path = {}}}", toml_string(&p.to_string_lossy()))).collect();
            overrides.push(format!("data.stores=[{}]", list.join(", ")));
        }
    }
    let config = args.config.as_deref().ok_or_else(|| TrainError::Config("--config FILE is required (configs/ has presets)".into()))?;
    let cfg = TrainConfig::load(config, &overrides)?;
    let stem = config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    let run_path = args.run_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(stem));
    // A group restarted by neurofm-launch --max-restarts continues from its newest checkpoint.
    let restarted = launcher::env::is_restart();
    let resume = match (&args.resume, restarted) {
        (Some(r), _) => r.clone(),
        (None, true) => Resume::Auto,
        (None, false) => Resume::No,
    };
    let force = args.force && !restarted;
    // Rank 0 creates (or wipes) the directory; the others open it once it is ready.
    let run_dir = if comm.rank() == 0 {
        let dir = RunDir::prepare(&run_path, &resume, force);
        comm.barrier()?;
        dir?
    } else {
        comm.barrier()?;
        RunDir::join(&run_path, &resume)?
    };
    if comm.rank() == 0 {
        let log = run_dir.path.join("train.log");
        logging::attach(&log).map_err(|e| TrainError::Io { path: log, source: e })?;
        if comm.world() > 1 {
            tracing::info!("rank 0 of {} writes this log, the events and the checkpoints", comm.world());
        }
    }
    tracing::info!("neurofm-train {} → {}", env!("CARGO_PKG_VERSION"), run_dir.path.display());
    tracing::info!("rank {} runs on {}", comm.rank(), describe(device));
    let opts = RunOptions { device, progress: args.output.progress(), stop_at_step: args.stop_at_step };
    let summary = run(cfg, &run_dir, &opts, comm)?;
    if let (Some(v), 0) = (summary.val, comm.rank()) {
        tracing::info!(
            "done: {} steps; validation perplexity {:.3} vs per-gene baseline {:.3}, masked accuracy {:.3}",
            summary.steps,
            v.perplexity,
            v.baseline_perplexity,
            v.masked_acc
        );
    }
    Ok(())
}

/// A TOML string literal (paths with quotes or backslashes stay intact).
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}
