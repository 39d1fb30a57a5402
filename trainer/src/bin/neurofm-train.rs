//! `neurofm-train`: masked-bin pretraining from a TOML config.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::fmt::writer::MakeWriterExt;
use trainer::config::TrainConfig;
use trainer::device::DeviceChoice;
use trainer::run_dir::{Resume, RunDir};
use trainer::train::{run, RunOptions};
use trainer::TrainError;

/// Pretrain the neurofm encoder on a zarr store (see configs/ for presets).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// TOML config (configs/debug-cpu.toml, configs/seed-hello.toml, ...).
    #[arg(long)]
    config: PathBuf,
    /// Zarr store from `neurofm-data convert` (overrides data.store).
    #[arg(long)]
    data: Option<PathBuf>,
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
    /// No progress bar (it is drawn only on a terminal anyway).
    #[arg(long)]
    no_progress: bool,
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
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn train(args: Args) -> Result<(), TrainError> {
    let mut overrides = args.overrides.clone();
    if let Some(data) = &args.data {
        overrides.push(format!("data.store={}", toml_string(&data.to_string_lossy())));
    }
    let cfg = TrainConfig::load(&args.config, &overrides)?;
    let stem = args.config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    let run_path = args.run_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(stem));
    let run_dir = RunDir::prepare(&run_path, &args.resume.clone().unwrap_or(Resume::No), args.force)?;
    init_logging(&run_dir.path)?;
    tracing::info!("neurofm-train {} → {}", env!("CARGO_PKG_VERSION"), run_dir.path.display());
    let summary = run(cfg, &run_dir, &RunOptions { device: args.device, progress: !args.no_progress, stop_at_step: args.stop_at_step })?;
    if let Some(v) = summary.val {
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

/// Logs to stderr and to `train.log` in the run directory (appended across resumes).
fn init_logging(run_dir: &std::path::Path) -> Result<(), TrainError> {
    let path = run_dir.join("train.log");
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| TrainError::Io { path: path.clone(), source: e })?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr.and(std::sync::Mutex::new(file)))
        .init();
    Ok(())
}
