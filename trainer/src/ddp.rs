//! Data parallelism (DESIGN §5): every rank holds the same weights and sums its gradients
//! with the others' before each update.
//!
//! The optimizer keeps parameters and gradients in flat buffers, so the all-reduce walks the
//! gradient buffer in slices of about 25 MB, in place: a few large collectives a step and no
//! copies. The objectives divide by the step's global counts, so W ranks with batch B take
//! the step of one rank with batch W·B.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::comm::Communicator;
use crate::error::{Result, TrainError};

/// Default slice size, as PyTorch DDP's buckets.
pub const BUCKET_BYTES: usize = 25 << 20;

/// What the gradient all-reduce costs, for logs and `throughput.json`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommCost {
    pub bytes_per_step: u64,
    pub buckets: usize,
    /// Seconds spent in collectives (gradients and step sums) since the last `Ddp::take_cost`.
    pub seconds: f64,
}

/// Gradient synchronization of one model's flat buffers on one communicator.
pub struct Ddp<'c> {
    comm: &'c dyn Communicator,
    params: Tensor,
    grads: Tensor,
    /// `(start, len)` slices of the flat buffers, reduced one collective each.
    buckets: Vec<(i64, i64)>,
    device: Device,
    /// Seconds in collectives since the last `take_cost`.
    seconds: f64,
}

impl<'c> Ddp<'c> {
    /// Slices the flat `params`/`grads` (fp32, same length) into buckets of at most
    /// `bucket_bytes`. A single rank gets no buckets: every call is then free.
    pub fn new(comm: &'c dyn Communicator, params: &Tensor, grads: &Tensor, bucket_bytes: usize, device: Device) -> Result<Ddp<'c>> {
        if params.kind() != Kind::Float || grads.kind() != Kind::Float || params.numel() != grads.numel() {
            return Err(TrainError::Internal("DDP needs flat fp32 parameter and gradient buffers of one length".into()));
        }
        let total = params.numel() as i64;
        let per = (bucket_bytes / 4).max(1) as i64;
        let buckets = if comm.world() == 1 { Vec::new() } else { (0..total).step_by(per as usize).map(|s| (s, per.min(total - s))).collect() };
        Ok(Ddp { comm, params: params.shallow_clone(), grads: grads.shallow_clone(), buckets, device, seconds: 0.0 })
    }

    /// Bytes, buckets and time of the collectives so far (time resets).
    pub fn take_cost(&mut self) -> CommCost {
        let bytes_per_step = self.buckets.iter().map(|b| b.1 as u64 * 4).sum();
        CommCost { bytes_per_step, buckets: self.buckets.len(), seconds: std::mem::take(&mut self.seconds) }
    }

    /// Makes every rank's parameters rank 0's.
    pub fn broadcast_parameters(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for &(at, len) in &self.buckets {
            self.comm.broadcast(&mut self.params.f_narrow(0, at, len)?, 0)?;
        }
        self.comm.wait()
    }

    /// Sums every gradient over ranks, in place.
    pub fn all_reduce_gradients(&mut self) -> Result<()> {
        if self.buckets.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let _guard = tch::no_grad_guard();
        for &(at, len) in &self.buckets {
            self.comm.all_reduce_sum(&mut self.grads.f_narrow(0, at, len)?)?;
        }
        self.comm.wait()?;
        self.seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Sums a small device tensor over ranks, in place (the step's loss sums stay on the device).
    pub fn sum_tensor(&mut self, t: &mut Tensor) -> Result<()> {
        if self.comm.world() == 1 {
            return Ok(());
        }
        let start = Instant::now();
        self.comm.all_reduce_sum(t)?;
        self.comm.wait()?;
        self.seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Sums a few host numbers over ranks (step counts, validation sums), in f64.
    pub fn sum(&mut self, values: &mut [f64]) -> Result<()> {
        if self.comm.world() == 1 {
            return Ok(());
        }
        let mut t = Tensor::f_from_slice(values)?.f_to_device(self.device)?;
        self.sum_tensor(&mut t)?;
        let summed = Vec::<f64>::try_from(t.f_to_device(Device::Cpu)?)?;
        values.copy_from_slice(&summed);
        Ok(())
    }

    /// Fails unless every rank's parameters are bit-identical (checked before checkpoints, so
    /// a desynchronized run never saves). Returns the checksum.
    pub fn check_in_sync(&mut self) -> Result<u32> {
        let values = Vec::<f32>::try_from(self.params.f_detach()?.f_to_device(Device::Cpu)?)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let crc = crc32c::crc32c(&bytes);
        let mut slots = vec![0.0; self.comm.world()];
        slots[self.comm.rank()] = crc as f64;
        self.sum(&mut slots)?;
        if slots.iter().any(|&s| s != slots[0]) {
            let list: Vec<String> = slots.iter().enumerate().map(|(r, s)| format!("rank {r}: {:08x}", *s as u32)).collect();
            return Err(TrainError::Distributed(format!("parameters differ across ranks ({}); not saving a checkpoint", list.join(", "))));
        }
        Ok(crc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Single;

    #[test]
    fn buckets_cover_the_buffer_in_slices() {
        let p = Tensor::zeros([10], (Kind::Float, Device::Cpu));
        let mut single = Ddp::new(&Single, &p, &p, 8, Device::Cpu).unwrap();
        assert_eq!(single.take_cost().buckets, 0, "one rank reduces nothing");
        struct Two;
        impl Communicator for Two {
            fn rank(&self) -> usize {
                0
            }
            fn world(&self) -> usize {
                2
            }
            fn name(&self) -> &'static str {
                "two"
            }
            /// Stands in for a peer holding the same values: the sum doubles.
            fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
                let _ = t.f_mul_scalar_(2.0)?;
                Ok(())
            }
            fn broadcast(&self, _: &mut Tensor, _: usize) -> Result<()> {
                Ok(())
            }
            fn barrier(&self) -> Result<()> {
                Ok(())
            }
        }
        let g = Tensor::arange(10, (Kind::Float, Device::Cpu));
        let mut ddp = Ddp::new(&Two, &p, &g, 12, Device::Cpu).unwrap();
        assert_eq!((ddp.take_cost().buckets, ddp.buckets.clone()), (4, vec![(0, 3), (3, 3), (6, 3), (9, 1)]));
        ddp.all_reduce_gradients().unwrap();
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), (0..10).map(|x| 2.0 * x as f32).collect::<Vec<_>>(), "every slice reduced once, in place");
    }
}
