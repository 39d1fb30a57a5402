//! MPI transport (rsmpi over OpenMPI) for CPU ranks started by `mpirun` or `srun --mpi=pmix`.

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};
use tch::{Device, Kind, Tensor};

use super::Communicator;
use crate::error::{Result, TrainError};
use launcher::env::DistEnv;

/// The MPI world; finalized when dropped (only on success: a failing rank exits without
/// finalizing, so mpirun stops the group instead of waiting in MPI_Finalize).
pub struct Mpi {
    world: SimpleCommunicator,
    _universe: mpi::environment::Universe,
}

impl Mpi {
    /// Initializes MPI and checks it agrees with the environment contract.
    pub fn init(env: &DistEnv) -> Result<Mpi> {
        let universe = mpi::initialize().ok_or_else(|| TrainError::Internal("MPI was already initialized".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if (rank, size) != (env.rank, env.world) {
            return Err(TrainError::Config(format!(
                "MPI sees rank {rank} of {size} but the environment says rank {} of {} ({:?}); start CPU ranks with mpirun, `srun --mpi=pmix`, or neurofm-launch --backend mpi",
                env.rank, env.world, env.source
            )));
        }
        Ok(Mpi { world, _universe: universe })
    }
}

/// Runs `f` on `t`'s elements as f32 or f64 slices, staging through host memory if needed.
fn on_host(t: &mut Tensor, f: impl FnOnce(HostSlice<'_>)) -> Result<()> {
    let host = if t.device() == Device::Cpu && t.is_contiguous() { None } else { Some(t.f_to_device(Device::Cpu)?.f_contiguous()?) };
    let target = host.as_ref().unwrap_or(t);
    let n = target.numel();
    // SAFETY: `target` is a contiguous CPU tensor of `n` elements of the matched kind, and
    // nothing else touches it while the slice lives.
    match target.kind() {
        Kind::Float => f(HostSlice::F32(unsafe { std::slice::from_raw_parts_mut(target.data_ptr() as *mut f32, n) })),
        Kind::Double => f(HostSlice::F64(unsafe { std::slice::from_raw_parts_mut(target.data_ptr() as *mut f64, n) })),
        k => return Err(TrainError::Internal(format!("MPI collectives take f32 or f64 tensors, not {k:?}"))),
    }
    if let Some(h) = host {
        t.f_copy_(&h)?;
    }
    Ok(())
}

enum HostSlice<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world(&self) -> usize {
        self.world.size() as usize
    }
    fn name(&self) -> &'static str {
        "mpi"
    }
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        on_host(t, |s| match s {
            HostSlice::F32(x) => {
                let send = x.to_vec();
                self.world.all_reduce_into(&send[..], x, SystemOperation::sum());
            }
            HostSlice::F64(x) => {
                let send = x.to_vec();
                self.world.all_reduce_into(&send[..], x, SystemOperation::sum());
            }
        })
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        let root = self.world.process_at_rank(root as i32);
        on_host(t, |s| match s {
            HostSlice::F32(x) => root.broadcast_into(x),
            HostSlice::F64(x) => root.broadcast_into(x),
        })
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
}
