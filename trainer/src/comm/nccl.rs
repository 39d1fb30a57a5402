//! NCCL transport through cudarc's raw API, loaded at run time (builds and runs without CUDA).
//!
//! Collectives run on the legacy default stream, the one libtorch uses unless told otherwise,
//! so they are ordered with the backward pass before them and the update after them (an
//! invariant: a side stream for overlap would need an event from stream 0 first).
//!
//! Raw NCCL has no timeout: a dead or stalled peer leaves the others spinning in the kernel
//! forever. So every wait for a collective polls a CUDA event and `ncclCommGetAsyncError`
//! against a deadline, and on failure asks the rendezvous store which ranks never reached
//! this collective, aborts the communicator and returns an error naming them.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{result as cu, sys as cusys, CudaContext};
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
    /// How long one collective may take before the group is declared broken.
    timeout: Duration,
    /// Collectives issued so far: the same sequence on every rank, so it names one collective.
    issued: Cell<u64>,
    /// Set-up barriers so far (rank 0 may spend long on them, e.g. fitting the tokenizer).
    barriers: Cell<u64>,
    /// `ncclCommAbort` ran: the communicator must not be used or destroyed again.
    aborted: Cell<bool>,
    done: cusys::CUevent,
    _ctx: Arc<CudaContext>,
    /// Kept open: rank 0 serves the store; barriers and failure reports go through it.
    rendezvous: std::cell::RefCell<Rendezvous>,
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> TrainError {
    TrainError::Distributed(format!("NCCL {what} failed: {e:?} (NCCL_DEBUG=INFO shows why)"))
}

/// How long set-up barriers wait for rank 0 (`NEUROFM_SETUP_TIMEOUT`, seconds; default 7200):
/// longer than collectives, since rank 0 may fit a tokenizer on an atlas meanwhile.
fn setup_timeout() -> Duration {
    std::env::var("NEUROFM_SETUP_TIMEOUT").ok().and_then(|v| v.parse::<f64>().ok()).filter(|s| *s > 0.0).map_or(Duration::from_secs(7200), Duration::from_secs_f64)
}

impl Nccl {
    /// Rank 0 creates the unique id and publishes it through the rendezvous store.
    pub fn connect(env: &DistEnv, ordinal: usize, mut rendezvous: Rendezvous, timeout: Duration) -> Result<Nccl> {
        let (path, version) = super::nccl_lib::load().map_err(TrainError::Distributed)?;
        if env.rank == 0 {
            tracing::info!("NCCL {version} from {path}");
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
        let done = cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|e| nccl_err("cuEventCreate", e))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; id, rank and world agree on every rank.
        unsafe { result::comm_init_rank(&mut comm, env.world as i32, unique, env.rank as i32) }.map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(Nccl {
            comm,
            rank: env.rank,
            world: env.world,
            ordinal,
            timeout,
            issued: Cell::new(0),
            barriers: Cell::new(0),
            aborted: Cell::new(false),
            done,
            _ctx: ctx,
            rendezvous: std::cell::RefCell::new(rendezvous),
        })
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

    /// An error from NCCL's own asynchronous checks (a peer's network failure, say), if any.
    fn async_error(&self) -> Option<String> {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator is live and `state` a valid out-pointer.
        let call = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
        match (call, state) {
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) => None,
            (sys::ncclResult_t::ncclSuccess, s) => Some(format!("{s:?}")),
            (c, _) => Some(format!("ncclCommGetAsyncError returned {c:?}")),
        }
    }

    /// After a collective failed here: which ranks never reached collective `op`, asked through
    /// the store (every rank stuck in the same collective reports itself).
    fn absent_peers(&self, op: u64) -> String {
        match self.rendezvous.borrow_mut().meet(&format!("stuck/{op}"), b"", Duration::from_secs(15)) {
            Ok(missing) if missing.is_empty() => "every rank reached it, so the network or a GPU failed (NCCL_DEBUG=INFO shows which)".into(),
            Ok(missing) => {
                let ranks: Vec<String> = missing.iter().map(usize::to_string).collect();
                format!("rank(s) {} never reached it (dead, or stuck elsewhere: see their logs)", ranks.join(", "))
            }
            Err(_) => "rank 0 (the rendezvous store) no longer answers: it has likely died".into(),
        }
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
        self.issued.set(self.issued.get() + 1);
        Ok(())
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.check(t)?;
        let p = t.data_ptr();
        // SAFETY: as above.
        unsafe { result::broadcast(p, p, t.numel(), Self::dtype(t)?, root as i32, self.comm, std::ptr::null_mut()) }.map_err(|e| nccl_err("ncclBroadcast", e))?;
        self.issued.set(self.issued.get() + 1);
        Ok(())
    }
    /// Polls for the collectives issued so far, never blocking in CUDA: a stuck group ends in
    /// an error at the deadline instead of a hang.
    fn wait(&self) -> Result<()> {
        let op = self.issued.get();
        // SAFETY: the event is live; stream 0 is the legacy default stream libtorch uses.
        unsafe { cu::event::record(self.done, std::ptr::null_mut()) }.map_err(|e| nccl_err("cuEventRecord", e))?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            // SAFETY: as above.
            match unsafe { cu::event::query(self.done) } {
                Ok(()) => return Ok(()),
                Err(e) if e.0 == cusys::cudaError_enum::CUDA_ERROR_NOT_READY => {}
                Err(e) => return Err(TrainError::Distributed(format!("rank {}: CUDA failed during collective {op}: {e:?}", self.rank))),
            }
            let failure = match self.async_error() {
                Some(err) => Some(format!("NCCL reported {err}")),
                None if start.elapsed() > self.timeout => Some(format!("it did not finish within {:.0} s (NEUROFM_RENDEZVOUS_TIMEOUT)", self.timeout.as_secs_f64())),
                None => None,
            };
            if let Some(why) = failure {
                let peers = self.absent_peers(op);
                self.abort();
                return Err(TrainError::Distributed(format!("rank {}: collective {op} failed: {why}; {peers}. The NCCL communicator was aborted", self.rank)));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }
    /// Through the store, not NCCL: rank 0 may be busy for long (fitting the tokenizer) while
    /// the others wait, and a TCP wait costs no GPU and has its own deadline.
    fn barrier(&self) -> Result<()> {
        let n = self.barriers.get();
        self.barriers.set(n + 1);
        let timeout = setup_timeout();
        let missing = self.rendezvous.borrow_mut().meet(&format!("barrier/{n}"), b"", timeout)?;
        if missing.is_empty() {
            return Ok(());
        }
        let ranks: Vec<String> = missing.iter().map(usize::to_string).collect();
        Err(TrainError::Distributed(format!("rank(s) {} did not reach set-up barrier {n} within {:.0} s (NEUROFM_SETUP_TIMEOUT)", ranks.join(", "), timeout.as_secs_f64())))
    }
    fn abort(&self) {
        if self.aborted.replace(true) {
            return;
        }
        // SAFETY: the communicator is live (not aborted before); abort is the documented way
        // out of a hung group.
        let _ = unsafe { result::comm_abort(self.comm) };
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator and event were created here and are not used after this.
        unsafe {
            if !self.aborted.get() {
                let _ = result::comm_destroy(self.comm);
            }
            let _ = cu::event::destroy(self.done);
        }
    }
}
