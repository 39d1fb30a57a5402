//! The environment contract (DESIGN §5): which rank this process is, in which group, and where
//! the rendezvous store listens.
//!
//! Read in this order, first match wins: `RANK`/`WORLD_SIZE`/... (set by `neurofm-launch`,
//! torchrun-compatible), `SLURM_*` of an `srun` step, `OMPI_COMM_WORLD_*` (under `mpirun`),
//! else a single process.

use crate::error::{LaunchError, Result};
use crate::hostlist;

/// Who set the contract; decides defaults (e.g. MPI is only possible under mpirun or srun).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Launcher,
    Slurm,
    Mpirun,
    Single,
}

/// The transport between ranks: `--backend` of neurofm-launch and neurofm-train, and
/// `NEUROFM_BACKEND`, which the launcher sets for its ranks. Defined once so that the two binaries
/// agree on the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// NCCL on a GPU, MPI on the CPU.
    Auto,
    Nccl,
    Mpi,
    /// One process, no communication.
    Single,
}

impl Backend {
    /// The name on the command line and in `NEUROFM_BACKEND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Nccl => "nccl",
            Backend::Mpi => "mpi",
            Backend::Single => "single",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where rank 0 serves the rendezvous store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Master {
    pub addr: String,
    pub port: u16,
}

impl std::fmt::Display for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

/// This process's place in the group. `rank < world` and `local_rank < local_world` hold by
/// construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub local_world: usize,
    pub master: Option<Master>,
    pub source: Source,
}

/// Default store port under SLURM when MASTER_PORT is unset: distinct per job and step, so
/// two jobs sharing a node do not collide.
const SLURM_PORT_BASE: u64 = 20000;

impl DistEnv {
    /// A process that is alone.
    pub fn single() -> DistEnv {
        DistEnv { rank: 0, world: 1, local_rank: 0, local_world: 1, master: None, source: Source::Single }
    }

    /// Reads the contract from this process's environment.
    pub fn from_env() -> Result<DistEnv> {
        DistEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// Reads the contract through `get` (tests pass a map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<DistEnv> {
        let num = |var: &str| -> Result<Option<usize>> {
            match get(var) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| LaunchError::Env {
                    var: var.into(),
                    value: v.clone(),
                    problem: "is not a non-negative integer; unset it or fix the launch command".into(),
                }),
            }
        };
        let explicit_master = || -> Result<Option<Master>> {
            match (get("MASTER_ADDR"), num("MASTER_PORT")?) {
                (Some(addr), Some(port)) => Ok(Some(Master { addr, port: port_of("MASTER_PORT", port)? })),
                (Some(addr), None) => Ok(Some(Master { addr, port: 29500 })),
                _ => Ok(None),
            }
        };
        let env = if let (Some(rank), Some(world)) = (num("RANK")?, num("WORLD_SIZE")?) {
            let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
            let local_world = num("LOCAL_WORLD_SIZE")?.unwrap_or(world);
            DistEnv { rank, world, local_rank, local_world, master: explicit_master()?, source: Source::Launcher }
        } else if let (Some(rank), Some(world)) = (num("SLURM_PROCID")?, num("SLURM_STEP_NUM_TASKS")?) {
            // SLURM_STEP_NUM_TASKS exists only inside an `srun` step, not in the batch script
            // itself, so a bare `neurofm-train` in an sbatch script stays a single process.
            let local_rank = num("SLURM_LOCALID")?.unwrap_or(0);
            let node = num("SLURM_NODEID")?.unwrap_or(0);
            let local_world = get("SLURM_STEP_TASKS_PER_NODE").and_then(|t| tasks_on_node(&t, node)).unwrap_or(1);
            let master = match explicit_master()? {
                Some(m) => Some(m),
                None => {
                    let nodes = get("SLURM_STEP_NODELIST").or_else(|| get("SLURM_JOB_NODELIST")).unwrap_or_default();
                    let job = num("SLURM_JOB_ID")?.unwrap_or(0) as u64;
                    let step = num("SLURM_STEP_ID")?.unwrap_or(0) as u64;
                    hostlist::first_host(&nodes).map(|addr| Master { addr, port: (SLURM_PORT_BASE + (job * 7 + step) % 20000) as u16 })
                }
            };
            DistEnv { rank, world, local_rank, local_world, master, source: Source::Slurm }
        } else if let (Some(rank), Some(world)) = (num("OMPI_COMM_WORLD_RANK")?, num("OMPI_COMM_WORLD_SIZE")?) {
            let local_rank = num("OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(0);
            let local_world = num("OMPI_COMM_WORLD_LOCAL_SIZE")?.unwrap_or(1);
            DistEnv { rank, world, local_rank, local_world, master: explicit_master()?, source: Source::Mpirun }
        } else {
            DistEnv::single()
        };
        env.validated()
    }

    fn validated(self) -> Result<DistEnv> {
        if self.world == 0 || self.rank >= self.world {
            return Err(LaunchError::Config(format!(
                "rank {} is not in a world of {} ({:?} environment); check the launch command",
                self.rank, self.world, self.source
            )));
        }
        if self.local_world == 0 || self.local_rank >= self.local_world {
            return Err(LaunchError::Config(format!(
                "local rank {} is not below the local world size {} ({:?} environment)",
                self.local_rank, self.local_world, self.source
            )));
        }
        Ok(self)
    }

    /// The store address, or an error saying how to provide one.
    pub fn require_master(&self) -> Result<&Master> {
        self.master.as_ref().ok_or_else(|| {
            LaunchError::Config(format!(
                "rank {} of {} needs a rendezvous address: set MASTER_ADDR and MASTER_PORT (neurofm-launch and srun set them for you)",
                self.rank, self.world
            ))
        })
    }
}

/// Name of the attempt counter `neurofm-launch --max-restarts` sets (0 on the first attempt).
pub const RESTART_COUNT: &str = "NEUROFM_RESTART_COUNT";

/// Whether this process belongs to a restarted group (it should resume, not start over).
pub fn is_restart() -> bool {
    std::env::var(RESTART_COUNT).ok().and_then(|c| c.parse::<u32>().ok()).unwrap_or(0) > 0
}

fn port_of(var: &str, port: usize) -> Result<u16> {
    u16::try_from(port).ok().filter(|&p| p > 0).ok_or_else(|| LaunchError::Env {
        var: var.into(),
        value: port.to_string(),
        problem: "is not a TCP port (1-65535)".into(),
    })
}

/// Tasks on node `node` from SLURM's compressed form, e.g. `4(x2),3` = 4, 4, 3.
fn tasks_on_node(spec: &str, node: usize) -> Option<usize> {
    let mut per_node = Vec::new();
    for part in spec.split(',') {
        match part.split_once("(x") {
            Some((n, rep)) => {
                let n: usize = n.parse().ok()?;
                let rep: usize = rep.trim_end_matches(')').parse().ok()?;
                per_node.extend(std::iter::repeat_n(n, rep));
            }
            None => per_node.push(part.parse().ok()?),
        }
    }
    per_node.get(node).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn launcher_variables_come_first() {
        let e = env(&[("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"), ("MASTER_ADDR", "n1"), ("MASTER_PORT", "1234"), ("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "1")]).unwrap();
        assert_eq!((e.rank, e.world, e.local_rank, e.local_world, e.source), (3, 8, 1, 2, Source::Launcher));
        assert_eq!(e.master, Some(Master { addr: "n1".into(), port: 1234 }));
    }

    #[test]
    fn srun_steps_give_rank_and_master_from_the_node_list() {
        let e = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "2"),
            ("SLURM_STEP_TASKS_PER_NODE", "2(x3),2"),
            ("SLURM_STEP_NODELIST", "gpu[07-10]"),
            ("SLURM_JOB_ID", "1000"),
            ("SLURM_STEP_ID", "0"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world, e.local_rank, e.local_world, e.source), (5, 8, 1, 2, Source::Slurm));
        assert_eq!(e.master.as_ref().map(|m| m.addr.as_str()), Some("gpu07"));
        // The batch script itself (no step) is a single process.
        assert_eq!(env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")]).unwrap().source, Source::Single);
    }

    #[test]
    fn mpirun_and_single() {
        let e = env(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "2")]).unwrap();
        assert_eq!((e.rank, e.world, e.source, e.master.clone()), (1, 2, Source::Mpirun, None));
        assert!(e.require_master().unwrap_err().to_string().contains("MASTER_ADDR"));
        assert_eq!(env(&[]).unwrap(), DistEnv::single());
    }

    #[test]
    fn backend_names_are_the_command_line_names() {
        use clap::ValueEnum;
        for b in Backend::value_variants() {
            assert_eq!(b.to_possible_value().map(|v| v.get_name().to_string()).as_deref(), Some(b.as_str()));
            assert_eq!(Backend::from_str(b.as_str(), false), Ok(*b));
        }
    }

    #[test]
    fn malformed_contracts_are_named() {
        let e = env(&[("RANK", "two"), ("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("RANK=\"two\""), "{e}");
        assert!(env(&[("RANK", "2"), ("WORLD_SIZE", "2")]).unwrap_err().to_string().contains("not in a world of 2"));
        assert!(env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "70000")]).unwrap_err().to_string().contains("TCP port"));
    }
}
