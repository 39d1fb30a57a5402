//! Collective communication between data-parallel ranks, behind one trait (DESIGN §5):
//! NCCL for GPUs, MPI for CPU ranks (and tests), and a no-op for a single process.

#[cfg(feature = "mpi")]
mod mpi_comm;
mod nccl;
pub mod nccl_lib;

use std::time::Duration;

use launcher::env::DistEnv;
use launcher::store::Rendezvous;
use tch::{Device, Tensor};

use crate::error::{Result, TrainError};

/// `--backend`: auto picks NCCL on a GPU and MPI on the CPU (shared with neurofm-launch).
pub use launcher::env::Backend;
#[cfg(feature = "mpi")]
pub use mpi_comm::Mpi;
pub use nccl::Nccl;

/// What DDP needs from a transport. Tensors are contiguous and live on the run's device.
pub trait Communicator {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// For logs: `single`, `mpi`, `nccl`.
    fn name(&self) -> &'static str;
    /// Replaces `t` with its sum over all ranks (f32, f64 or bf16).
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()>;
    /// Replaces `t` with rank `root`'s `t`.
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Returns once the collectives issued so far are complete (they may run asynchronously on
    /// the device), or fails at the deadline instead of hanging.
    fn wait(&self) -> Result<()> {
        Ok(())
    }
    /// Tears the group down at once after a failure, so no peer spins in a collective this
    /// rank will never join (NCCL's `ncclCommAbort`); the process exits right after.
    fn abort(&self) {}
}

/// The only rank: every collective is the identity.
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn name(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut Tensor, _: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// How long ranks wait for each other (`NEUROFM_RENDEZVOUS_TIMEOUT`, seconds; default 300).
pub fn rendezvous_timeout() -> Result<Duration> {
    match std::env::var("NEUROFM_RENDEZVOUS_TIMEOUT") {
        Err(_) => Ok(Duration::from_secs(300)),
        Ok(v) => v
            .parse::<f64>()
            .ok()
            .filter(|s| *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| TrainError::Config(format!("NEUROFM_RENDEZVOUS_TIMEOUT={v:?} is not a positive number of seconds"))),
    }
}

/// Which transport `requested` means for this process's group and device.
pub fn resolve_backend(requested: Backend, env: &DistEnv, device: Device) -> Backend {
    match requested {
        _ if env.world == 1 => Backend::Single,
        Backend::Auto if device.is_cuda() => Backend::Nccl,
        Backend::Auto => Backend::Mpi,
        b => b,
    }
}

/// Joins the group described by `env` over `backend` (already resolved).
pub fn connect(backend: Backend, env: &DistEnv, device: Device) -> Result<Box<dyn Communicator>> {
    let comm: Box<dyn Communicator> = match backend {
        Backend::Single if env.world == 1 => Box::new(Single),
        Backend::Single | Backend::Auto => {
            return Err(TrainError::Config(format!("--backend single cannot serve {} ranks; use nccl (GPUs) or mpi (CPU)", env.world)));
        }
        #[cfg(feature = "mpi")]
        Backend::Mpi => Box::new(Mpi::init(env)?),
        #[cfg(not(feature = "mpi"))]
        Backend::Mpi => {
            return Err(TrainError::Config("this neurofm-train was built without MPI (cargo feature `mpi`); CPU ranks need it, GPU ranks use --backend nccl".into()));
        }
        Backend::Nccl => {
            // Everyone checks in first, so a missing rank is named instead of hanging NCCL.
            let rendezvous = Rendezvous::join(env, rendezvous_timeout()?)?;
            let Device::Cuda(ordinal) = device else {
                return Err(TrainError::Config("--backend nccl needs a GPU (this rank runs on the CPU); CPU ranks use --backend mpi, which neurofm-launch picks without GPUs".into()));
            };
            Box::new(Nccl::connect(env, ordinal, rendezvous, rendezvous_timeout()?)?)
        }
    };
    Ok(comm)
}
