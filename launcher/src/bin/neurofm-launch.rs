//! `neurofm-launch`: one rank per local GPU (NCCL), or N CPU ranks through mpirun/srun (MPI);
//! the group lives and dies together, and `--max-restarts` restarts it from its checkpoint.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use common::exit::Exit;
use launcher::env::{Backend, RESTART_COUNT};
use launcher::store::{RendezvousToken, TOKEN_VAR};
use launcher::supervise::{run_group, ChildSpec, Outcome};

/// Launch a data-parallel group: `neurofm-launch --nproc-per-node 4 -- neurofm-train --config ...`
#[derive(Parser, Debug)]
#[command(version, after_help = "\
Examples:
  neurofm launch --nproc-per-node 4 -- neurofm train --config configs/atlas.toml --data atlas.zarr
  neurofm launch --backend mpi --nproc-per-node 2 -- neurofm train --config configs/debug-cpu.toml --data whb.zarr
  neurofm launch --nnodes 2 --node-rank 0 --master-addr node01 --nproc-per-node 8 -- neurofm train ...
  (under SLURM, srun starts the ranks itself: see slurm/)")]
struct Args {
    /// Ranks on this node (default: the visible GPUs, or 1 without GPUs).
    #[arg(long)]
    nproc_per_node: Option<usize>,
    /// Nodes in the job (each runs its own neurofm-launch with its --node-rank).
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Host of global rank 0, where the rendezvous store listens.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    #[arg(long, default_value_t = 29500)]
    master_port: u16,
    /// auto: NCCL when GPUs are visible, else MPI.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    backend: Backend,
    /// Restart the whole group this many times after a failure (the command should resume,
    /// which neurofm-train does by itself on a restart).
    #[arg(long, default_value_t = 0)]
    max_restarts: u32,
    /// Seconds between SIGTERM and SIGKILL when stopping the group.
    #[arg(long, default_value_t = 30.0)]
    grace_s: f64,
    /// The command every rank runs.
    #[arg(trailing_var_arg = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

fn main() -> ExitCode {
    let plan = match Plan::new(Args::parse()) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("neurofm-launch: error: {e:#}");
            return Exit::BadInput.into();
        }
    };
    match plan.launch() {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("neurofm-launch: error: {e:#}");
            Exit::Failure.into()
        }
    }
}

/// A checked request: everything that can be wrong with the command line is found here, before
/// anything starts (exit 2); what fails later is a runtime failure (exit 1).
struct Plan {
    args: Args,
    backend: Backend,
    nproc: usize,
    gpus: Vec<String>,
    grace: Duration,
    /// Handed to every rank through its environment; `None` when the ranks inherit the
    /// launcher's own `NEUROFM_RENDEZVOUS_TOKEN`.
    token: Option<RendezvousToken>,
}

impl Plan {
    fn new(args: Args) -> Result<Plan> {
        let gpus = visible_gpus();
        let backend = match args.backend {
            Backend::Auto if gpus.is_empty() => Backend::Mpi,
            Backend::Auto => Backend::Nccl,
            b => b,
        };
        let nproc = args.nproc_per_node.unwrap_or(if backend == Backend::Nccl { gpus.len() } else { 1 }).max(1);
        if args.nnodes == 0 || args.node_rank >= args.nnodes {
            bail!("--node-rank {} is not in --nnodes {}", args.node_rank, args.nnodes);
        }
        if backend == Backend::Nccl && nproc > gpus.len() {
            bail!("{nproc} NCCL ranks need {nproc} GPUs but {} are visible on this node; lower --nproc-per-node or use --backend mpi for CPU ranks", gpus.len());
        }
        if backend == Backend::Single && nproc * args.nnodes > 1 {
            bail!("--backend single runs one process; use nccl (GPUs) or mpi (CPU) for {} ranks", nproc * args.nnodes);
        }
        let in_slurm = std::env::var_os("SLURM_JOB_ID").is_some();
        if backend == Backend::Mpi && args.nnodes > 1 && !in_slurm {
            bail!("multi-node CPU runs need a host list: run inside a SLURM allocation (srun), or call mpirun with a hostfile yourself");
        }
        // Ranks on other nodes must present the same token: only the user can give it to all
        // launchers. On one node the launcher makes one.
        let token = if std::env::var_os(TOKEN_VAR).is_some() {
            RendezvousToken::from_env()?;
            None
        } else if args.nnodes > 1 && backend == Backend::Nccl {
            bail!(
                "{TOKEN_VAR} is not set: with --nnodes {} every node's launcher must give its ranks the same secret token for the rendezvous; \
                 export one value on all nodes, e.g. `export {TOKEN_VAR}=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \\n')` (the slurm/ scripts do this)",
                args.nnodes
            );
        } else {
            Some(RendezvousToken::generate()?)
        };
        let grace = Duration::from_secs_f64(args.grace_s.max(0.0));
        Ok(Plan { args, backend, nproc, gpus, grace, token })
    }

    fn launch(&self) -> Result<i32> {
        let mut attempt = 0;
        loop {
            let children = match self.backend {
                Backend::Mpi => vec![self.mpi_handoff(attempt)],
                _ => self.spawn_ranks(attempt),
            };
            let Outcome { code, failed, interrupted } = run_group(children, self.grace).context("running the group")?;
            if code == 0 || interrupted || attempt == self.args.max_restarts {
                return Ok(code);
            }
            attempt += 1;
            eprintln!(
                "neurofm-launch: {} failed with exit code {code}; restarting the group ({attempt} of {}) from its newest checkpoint",
                failed.as_deref().unwrap_or("a rank"),
                self.args.max_restarts
            );
        }
    }

    /// What every rank's environment gets besides the per-rank contract.
    fn common_env(&self, attempt: u32) -> Vec<(String, String)> {
        let mut env = vec![("NEUROFM_BACKEND".to_string(), self.backend.to_string()), (RESTART_COUNT.into(), attempt.to_string())];
        if let Some(token) = &self.token {
            env.push((TOKEN_VAR.into(), token.as_str().into()));
        }
        env
    }

    /// One child per local rank, with the environment contract (DESIGN §5) and its own GPU.
    fn spawn_ranks(&self, attempt: u32) -> Vec<ChildSpec> {
        let args = &self.args;
        let world = self.nproc * args.nnodes;
        (0..self.nproc)
            .map(|local| {
                let rank = args.node_rank * self.nproc + local;
                let mut env = vec![
                    ("RANK".to_string(), rank.to_string()),
                    ("WORLD_SIZE".into(), world.to_string()),
                    ("LOCAL_RANK".into(), local.to_string()),
                    ("LOCAL_WORLD_SIZE".into(), self.nproc.to_string()),
                    ("MASTER_ADDR".into(), args.master_addr.clone()),
                    ("MASTER_PORT".into(), args.master_port.to_string()),
                ];
                env.extend(self.common_env(attempt));
                if let Some(gpu) = self.gpus.get(local) {
                    env.push(("CUDA_VISIBLE_DEVICES".into(), gpu.clone()));
                }
                ChildSpec { label: format!("rank {rank}"), program: args.command[0].clone(), args: args.command[1..].to_vec(), env, prefix_output: true }
            })
            .collect()
    }

    /// CPU ranks talk MPI, so MPI's own launcher starts them: `srun --mpi=pmix` inside a SLURM
    /// allocation, else `mpirun` on this node.
    fn mpi_handoff(&self, attempt: u32) -> ChildSpec {
        let args = &self.args;
        let env = self.common_env(attempt);
        let mut argv: Vec<OsString> = Vec::new();
        let program = if std::env::var_os("SLURM_JOB_ID").is_some() {
            let ntasks = self.nproc * args.nnodes;
            argv.extend(["--mpi=pmix".into(), format!("--ntasks={ntasks}").into(), "--kill-on-bad-exit=1".into(), "--label".into()]);
            if args.nnodes > 1 {
                argv.push(format!("--nodes={}", args.nnodes).into());
            }
            "srun"
        } else {
            argv.extend(["-np".into(), self.nproc.to_string().into(), "--oversubscribe".into(), "--bind-to".into(), "none".into(), "--tag-output".into()]);
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                argv.push("--allow-run-as-root".into()); // containers and CI run as root
            }
            // Forward the neurofm settings explicitly (mpirun only guarantees them on this
            // node), by name: their values, the token among them, stay off the command line.
            let mut names: Vec<String> = std::env::vars().map(|(k, _)| k).filter(|k| k.starts_with("NEUROFM_") || k == "RUST_LOG").collect();
            names.extend(env.iter().map(|(k, _)| k.clone()));
            names.sort();
            names.dedup();
            for k in names {
                argv.extend(["-x".into(), k.into()]);
            }
            "mpirun"
        };
        argv.extend(args.command.iter().cloned());
        ChildSpec { label: program.into(), program: program.into(), args: argv, env, prefix_output: false }
    }
}

/// The GPUs this node may use: `CUDA_VISIBLE_DEVICES` if set, else every NVIDIA device the
/// driver lists. Read without touching CUDA, so the launcher never holds a GPU context.
fn visible_gpus() -> Vec<String> {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return v.split(',').map(str::trim).filter(|s| !s.is_empty() && *s != "-1" && *s != "NoDevFiles").map(String::from).collect();
    }
    let n = std::fs::read_dir("/proc/driver/nvidia/gpus").map(|d| d.count()).unwrap_or(0);
    (0..n).map(|i| i.to_string()).collect()
}
