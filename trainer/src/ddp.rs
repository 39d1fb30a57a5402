//! Data parallelism (DESIGN §5): every rank holds the same weights and sums its gradients
//! with the others' before each update.
//!
//! Gradients are copied into flat buckets of about 25 MB, so a step makes a few large
//! collectives instead of one per tensor. The trainer divides the summed gradients by the
//! global number of masked tokens, so W ranks with batch B take exactly the step of one rank
//! with batch W·B.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::comm::Communicator;
use crate::error::{Result, TrainError};

/// Default bucket size, as PyTorch DDP's.
pub const BUCKET_BYTES: usize = 25 << 20;

/// Parameters `params[first..first + count]` share one flat buffer.
struct Bucket {
    members: std::ops::Range<usize>,
    flat: Tensor,
}

/// What the gradient all-reduce costs, for logs and `throughput.json`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommCost {
    pub bytes_per_step: u64,
    pub buckets: usize,
    /// Seconds spent in collectives (gradients and step sums) since the last `Ddp::take_cost`.
    pub seconds: f64,
}

/// Gradient synchronization for one model on one communicator.
pub struct Ddp<'c> {
    comm: &'c dyn Communicator,
    params: Vec<Tensor>,
    buckets: Vec<Bucket>,
    device: Device,
    /// Seconds in collectives since the last `take_cost`.
    seconds: f64,
}

impl<'c> Ddp<'c> {
    /// Groups `params` (in order) into buckets of at most `bucket_bytes` (one tensor may exceed
    /// it alone). A single rank gets no buckets: every call is then free.
    pub fn new(comm: &'c dyn Communicator, params: Vec<Tensor>, bucket_bytes: usize, device: Device) -> Result<Ddp<'c>> {
        let mut buckets = Vec::new();
        if comm.world() == 1 {
            return Ok(Ddp { comm, buckets, params, device, seconds: 0.0 });
        }
        if params.iter().any(|p| p.kind() != Kind::Float) {
            return Err(TrainError::Internal("DDP buckets hold f32 parameters only".into()));
        }
        let (mut start, mut numel) = (0, 0i64);
        for (i, p) in params.iter().enumerate() {
            let n = p.numel() as i64;
            if numel > 0 && (numel + n) as usize * 4 > bucket_bytes {
                buckets.push(Bucket { members: start..i, flat: Tensor::f_zeros([numel], (Kind::Float, device))? });
                (start, numel) = (i, 0);
            }
            numel += n;
        }
        if numel > 0 {
            buckets.push(Bucket { members: start..params.len(), flat: Tensor::f_zeros([numel], (Kind::Float, device))? });
        }
        Ok(Ddp { comm, buckets, params, device, seconds: 0.0 })
    }

    /// Bytes, buckets and time of the collectives so far (time resets).
    pub fn take_cost(&mut self) -> CommCost {
        let bytes_per_step = self.buckets.iter().map(|b| b.flat.numel() as u64 * 4).sum();
        CommCost { bytes_per_step, buckets: self.buckets.len(), seconds: std::mem::take(&mut self.seconds) }
    }

    /// Makes every rank's parameters rank 0's.
    pub fn broadcast_parameters(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for b in &mut self.buckets {
            pack(&self.params[b.members.clone()], &mut b.flat, |p| p.shallow_clone())?;
            self.comm.broadcast(&mut b.flat, 0)?;
            unpack(&self.params[b.members.clone()], &b.flat, |p| p.shallow_clone())?;
        }
        Ok(())
    }

    /// Sums every parameter's gradient over ranks, in place.
    pub fn all_reduce_gradients(&mut self) -> Result<()> {
        if self.buckets.is_empty() {
            return Ok(());
        }
        self.sync_device();
        let start = Instant::now();
        let _guard = tch::no_grad_guard();
        for b in &mut self.buckets {
            pack(&self.params[b.members.clone()], &mut b.flat, Tensor::grad)?;
            self.comm.all_reduce_sum(&mut b.flat)?;
            unpack(&self.params[b.members.clone()], &b.flat, Tensor::grad)?;
        }
        self.sync_device();
        self.seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Sums a few numbers over ranks (step totals, validation sums), in f64.
    pub fn sum(&mut self, values: &mut [f64]) -> Result<()> {
        if self.comm.world() == 1 {
            return Ok(());
        }
        let start = Instant::now();
        let mut t = Tensor::f_from_slice(values)?.f_to_device(self.device)?;
        self.comm.all_reduce_sum(&mut t)?;
        let summed = Vec::<f64>::try_from(t.f_to_device(Device::Cpu)?)?;
        values.copy_from_slice(&summed);
        self.seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Fails unless every rank's parameters are bit-identical (checked before checkpoints, so
    /// a desynchronized run never saves). Returns the checksum.
    pub fn check_in_sync(&mut self) -> Result<u32> {
        let mut crc = 0u32;
        for p in &self.params {
            let values = Vec::<f32>::try_from(p.f_detach()?.f_flatten(0, -1)?.f_to_device(Device::Cpu)?)?;
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            crc = crc32c::crc32c_append(crc, &bytes);
        }
        let mut slots = vec![0.0; self.comm.world()];
        slots[self.comm.rank()] = crc as f64;
        self.sum(&mut slots)?;
        if slots.iter().any(|&s| s != slots[0]) {
            let list: Vec<String> = slots.iter().enumerate().map(|(r, s)| format!("rank {r}: {:08x}", *s as u32)).collect();
            return Err(TrainError::Distributed(format!("parameters differ across ranks ({}); not saving a checkpoint", list.join(", "))));
        }
        Ok(crc)
    }

    fn sync_device(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }
}

/// Copies `part(p)` of each parameter into consecutive ranges of `flat`.
fn pack(params: &[Tensor], flat: &mut Tensor, part: impl Fn(&Tensor) -> Tensor) -> Result<()> {
    let mut at = 0;
    for p in params {
        let n = p.numel() as i64;
        let src = part(p);
        let mut dst = flat.f_narrow(0, at, n)?;
        if src.defined() {
            dst.f_copy_(&src.f_reshape([-1])?)?;
        } else {
            let _ = dst.f_zero_()?;
        }
        at += n;
    }
    Ok(())
}

/// The inverse of `pack`.
fn unpack(params: &[Tensor], flat: &Tensor, part: impl Fn(&Tensor) -> Tensor) -> Result<()> {
    let mut at = 0;
    for p in params {
        let n = p.numel() as i64;
        let mut dst = part(p);
        if dst.defined() {
            dst.f_copy_(&flat.f_narrow(0, at, n)?.f_view_as(&dst)?)?;
        }
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Single;

    #[test]
    fn single_rank_ddp_is_free_and_in_sync() {
        let p = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
        let mut ddp = Ddp::new(&Single, vec![p.shallow_clone()], BUCKET_BYTES, Device::Cpu).unwrap();
        assert_eq!(ddp.take_cost().buckets, 0);
        let mut v = [1.5, 2.5];
        ddp.sum(&mut v).unwrap();
        assert_eq!(v, [1.5, 2.5]);
        ddp.check_in_sync().unwrap();
    }

    #[test]
    fn pack_and_unpack_round_trip_across_shapes() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        let b = Tensor::from_slice(&[5.0f32]);
        let mut flat = Tensor::zeros([5], (Kind::Float, Device::Cpu));
        pack(&[a.shallow_clone(), b.shallow_clone()], &mut flat, |p| p.shallow_clone()).unwrap();
        assert_eq!(Vec::<f32>::try_from(&flat).unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0]);
        let _ = flat.f_mul_scalar_(2.0).unwrap();
        unpack(&[a.shallow_clone(), b.shallow_clone()], &flat, |p| p.shallow_clone()).unwrap();
        assert_eq!(Vec::<f32>::try_from(a.reshape([-1])).unwrap(), [2.0, 4.0, 6.0, 8.0]);
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), [10.0]);
    }
}
