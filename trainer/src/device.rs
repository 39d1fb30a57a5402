//! Which device to run on, and how fast it can go (the denominator of MFU).

use std::str::FromStr;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

/// `--device auto|cpu|cuda|cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first GPU when CUDA is usable, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device: use auto, cpu, cuda or cuda:N")),
        }
    }
}

impl DeviceChoice {
    /// The libtorch device, or an error when the requested GPU is not there. `auto` gives
    /// local rank r the GPU r (mod the visible count; one when the launcher pinned it).
    pub fn resolve(self, local_rank: usize) -> Result<Device> {
        let gpus = if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
        match self {
            DeviceChoice::Auto => Ok(if gpus > 0 { Device::Cuda(local_rank % gpus) } else { Device::Cpu }),
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) if n < gpus => Ok(Device::Cuda(n)),
            DeviceChoice::Cuda(n) => Err(TrainError::Device {
                requested: format!("cuda:{n}"),
                problem: if gpus == 0 {
                    "CUDA is not available here (no GPU, or no driver libtorch can load); use --device cpu or auto".into()
                } else {
                    format!("this machine has {gpus} GPU(s): cuda:0..cuda:{}", gpus - 1)
                },
            }),
        }
    }
}

/// Dense bf16 tensor-core peak in TFLOP/s of GPUs we know (datasheet values, SXM parts).
fn known_gpu_peak(name: &str) -> Option<f64> {
    let table = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0), ("V100", 125.0)];
    table.iter().find(|(k, _)| name.contains(k)).map(|(_, v)| *v)
}

/// Peak rate for MFU in FLOP/s: `configured` TFLOP/s when > 0, else the GPU's datasheet bf16
/// rate (via `nvidia-smi`), else a measured fp32 matmul rate on the CPU. Returns a label
/// saying where the number came from.
pub fn peak_flops(device: Device, configured_tflops: f64) -> (f64, String) {
    if configured_tflops > 0.0 {
        return (configured_tflops * 1e12, "configured".into());
    }
    match device {
        Device::Cuda(i) => {
            let name = std::process::Command::new("nvidia-smi")
                .args(["--query-gpu=name", "--format=csv,noheader", &format!("--id={i}")])
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            match known_gpu_peak(&name) {
                Some(t) => (t * 1e12, format!("{name} bf16 datasheet")),
                None => (989e12, format!("unknown GPU `{name}`: assumed H100 bf16; set train.peak_tflops")),
            }
        }
        _ => match measure_cpu_matmul() {
            Ok(f) => (f, "measured fp32 matmul on this CPU".into()),
            Err(_) => (1e11, "assumed 100 GFLOP/s".into()),
        },
    }
}

/// Best of a few 1024³ fp32 matmuls with libtorch's threads.
fn measure_cpu_matmul() -> Result<f64> {
    let n = 1024;
    let a = Tensor::f_randn([n, n], (Kind::Float, Device::Cpu))?;
    let b = Tensor::f_randn([n, n], (Kind::Float, Device::Cpu))?;
    let _ = a.f_matmul(&b)?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let _ = a.f_matmul(&b)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best)
}

/// Maps a libtorch error to `OutOfMemory` when it is one, with a smaller batch to try.
pub fn classify_oom(e: tch::TchError, batch_size: usize, grad_accum: usize) -> TrainError {
    let text = e.to_string();
    if text.contains("out of memory") || text.contains("CUDA error: out of memory") || text.contains("OutOfMemoryError") {
        let suggest = (batch_size / 2).max(1);
        let accum = grad_accum * batch_size.div_ceil(suggest);
        let detail = text.lines().next().unwrap_or("").chars().take(200).collect();
        TrainError::OutOfMemory { batch_size, suggest, accum, detail }
    } else {
        TrainError::Torch(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("auto".parse::<DeviceChoice>(), Ok(DeviceChoice::Auto));
        assert_eq!("cuda:3".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(3)));
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert_eq!(known_gpu_peak("NVIDIA H100 80GB HBM3"), Some(989.0));
        assert_eq!(known_gpu_peak("NVIDIA H100 PCIe"), Some(756.0));
    }

    #[test]
    fn missing_gpu_is_a_device_error() {
        if tch::Cuda::is_available() {
            return;
        }
        let e = DeviceChoice::Cuda(0).resolve(0).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--device cpu"), "{e}");
    }

    #[test]
    fn oom_suggests_a_smaller_batch_with_the_same_cells_per_step() {
        let e = classify_oom(tch::TchError::Torch("CUDA out of memory. Tried to allocate 2.00 GiB".into()), 64, 1);
        let msg = e.to_string();
        assert!(msg.contains("batch_size = 32") && msg.contains("grad_accum = 2"), "{msg}");
        assert_eq!(e.exit_code(), 2);
        assert!(matches!(classify_oom(tch::TchError::Torch("shape mismatch".into()), 64, 1), TrainError::Torch(_)));
    }
}
