//! Gradient all-reduce throughput of the DDP path (buckets + communicator), for the scaling
//! estimate. Run under a launcher, e.g.
//!   neurofm-launch --backend mpi --nproc-per-node 2 -- target/release/examples/allreduce_bench
//!   neurofm-launch --nproc-per-node 8 -- target/release/examples/allreduce_bench   (NCCL, GPUs)
//! Prints, per gradient size: buckets, ms per all-reduce, algorithm and bus bandwidth
//! (bus = alg × 2(W-1)/W, NCCL's convention).

use std::time::Instant;

use launcher::env::DistEnv;
use tch::{Kind, Tensor};
use trainer::comm::{connect, nccl_lib, resolve_backend, Backend};
use trainer::ddp::{Ddp, BUCKET_BYTES};
use trainer::device::{DeviceChoice, LocalRank};

fn main() -> anyhow::Result<()> {
    let env = DistEnv::from_env()?;
    let device = DeviceChoice::Auto.resolve(LocalRank { rank: env.local_rank, world: env.local_world })?;
    // NEUROFM_BACKEND=nccl forces NCCL even for one rank (the GPU check times its set-up).
    let requested = std::env::var("NEUROFM_BACKEND").ok().and_then(|v| <Backend as clap::ValueEnum>::from_str(&v, true).ok()).unwrap_or(Backend::Auto);
    let backend = if requested == Backend::Nccl { Backend::Nccl } else { resolve_backend(requested, &env, device) };
    let init = Instant::now();
    if backend == Backend::Nccl {
        nccl_lib::bind_to_torch_nccl();
    }
    let comm = connect(backend, &env, device)?;
    let w = comm.world() as f64;
    if comm.rank() == 0 {
        println!("world {} over {} on {device:?}; communicator ready in {:.2} s", comm.world(), comm.name(), init.elapsed().as_secs_f64());
        println!("{:>10} {:>8} {:>10} {:>10} {:>10}", "MB", "buckets", "ms", "algbw GB/s", "busbw GB/s");
    }
    // Gradient buffers the size of the models': 1 MB … 512 MB of f32 (the optimizer keeps
    // parameters and gradients flat, and DDP reduces slices of that buffer in place).
    for mb in [1usize, 4, 16, 64, 156, 512] {
        let n = ((mb << 20) / 4) as i64;
        let params = Tensor::ones([n], (Kind::Float, device));
        let grads = Tensor::ones([n], (Kind::Float, device));
        let mut ddp = Ddp::new(comm.as_ref(), &params, &grads, BUCKET_BYTES, device)?;
        ddp.all_reduce_gradients()?; // warm-up
        let reps = if mb >= 156 { 5 } else { 20 };
        comm.barrier()?;
        let start = Instant::now();
        for _ in 0..reps {
            ddp.all_reduce_gradients()?;
        }
        let secs = start.elapsed().as_secs_f64() / reps as f64;
        let bytes = ddp.take_cost().bytes_per_step as f64;
        if comm.rank() == 0 {
            let alg = bytes / secs / 1e9;
            println!("{:>10.1} {:>8} {:>10.2} {:>10.2} {:>10.2}", bytes / 1e6, ddp.take_cost().buckets, secs * 1e3, alg, alg * 2.0 * (w - 1.0) / w);
        }
    }
    Ok(())
}
