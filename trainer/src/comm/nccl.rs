//! NCCL transport through cudarc's raw API, loaded at run time (builds and runs without CUDA).
//!
//! Collectives run on the legacy default stream, the one libtorch uses unless told otherwise,
//! so they are ordered with the backward pass before them and the update after them.

use std::sync::Arc;

use cudarc::driver::CudaContext;
use cudarc::nccl::{result, sys};
use launcher::env::DistEnv;
use launcher::store::Rendezvous;
use tch::{Kind, Tensor};

use super::Communicator;
use crate::error::{Result, TrainError};

/// One NCCL communicator over all ranks, one GPU per rank.
pub struct Nccl {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    ordinal: usize,
    _ctx: Arc<CudaContext>,
    /// Kept open: rank 0 serves the store other ranks may still be reading from.
    _rendezvous: Rendezvous,
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> TrainError {
    TrainError::Distributed(format!("NCCL {what} failed: {e:?} (NCCL_DEBUG=INFO shows why)"))
}

impl Nccl {
    /// Rank 0 creates the unique id and publishes it through the rendezvous store.
    pub fn connect(env: &DistEnv, ordinal: usize, mut rendezvous: Rendezvous) -> Result<Nccl> {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(TrainError::Distributed(format!(
                "libnccl could not be loaded; {}",
                super::nccl_lib::hint()
            )));
        }
        let id = if env.rank == 0 {
            let id = result::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            rendezvous.share("nccl/unique-id", 0, Some(&bytes))?
        } else {
            rendezvous.share("nccl/unique-id", 0, None)?
        };
        let mut unique = sys::ncclUniqueId { internal: [0; 128] };
        if id.len() != unique.internal.len() {
            return Err(TrainError::Distributed(format!("NCCL unique id has {} bytes, expected 128", id.len())));
        }
        for (d, s) in unique.internal.iter_mut().zip(&id) {
            *d = *s as _;
        }
        // The rank's device becomes current for this thread; NCCL binds the communicator to it.
        let ctx = CudaContext::new(ordinal).map_err(|e| nccl_err("CUDA context", e))?;
        ctx.bind_to_thread().map_err(|e| nccl_err("CUDA context", e))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; id, rank and world agree on every rank.
        unsafe { result::comm_init_rank(&mut comm, env.world as i32, unique, env.rank as i32) }.map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(Nccl { comm, rank: env.rank, world: env.world, ordinal, _ctx: ctx, _rendezvous: rendezvous })
    }

    fn dtype(t: &Tensor) -> Result<sys::ncclDataType_t> {
        match t.kind() {
            Kind::Float => Ok(sys::ncclDataType_t::ncclFloat32),
            Kind::Double => Ok(sys::ncclDataType_t::ncclFloat64),
            Kind::BFloat16 => Ok(sys::ncclDataType_t::ncclBfloat16),
            k => Err(TrainError::Internal(format!("NCCL collectives here take f32, f64 or bf16 tensors, not {k:?}"))),
        }
    }

    fn check(&self, t: &Tensor) -> Result<()> {
        if t.device() != tch::Device::Cuda(self.ordinal) || !t.is_contiguous() {
            return Err(TrainError::Internal(format!("NCCL needs a contiguous tensor on cuda:{}, got {:?}", self.ordinal, t.device())));
        }
        Ok(())
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn name(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        self.check(t)?;
        let p = t.data_ptr();
        // SAFETY: in-place reduction of `numel` elements of a live, contiguous device tensor.
        unsafe { result::all_reduce(p, p, t.numel(), Self::dtype(t)?, sys::ncclRedOp_t::ncclSum, self.comm, std::ptr::null_mut()) }
            .map_err(|e| nccl_err("ncclAllReduce", e))?;
        Ok(())
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.check(t)?;
        let p = t.data_ptr();
        // SAFETY: as above.
        unsafe { result::broadcast(p, p, t.numel(), Self::dtype(t)?, root as i32, self.comm, std::ptr::null_mut()) }.map_err(|e| nccl_err("ncclBroadcast", e))?;
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        let mut one = Tensor::f_ones([1], (Kind::Float, tch::Device::Cuda(self.ordinal)))?;
        self.all_reduce_sum(&mut one)?;
        tch::Cuda::synchronize(self.ordinal as i64);
        Ok(())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator was initialized and is not used after this.
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}
