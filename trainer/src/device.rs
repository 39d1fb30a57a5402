//! Which device a rank runs on, what that GPU is, and how fast it can go (the denominator of MFU).
//!
//! Two failure modes of a first cluster run are handled here rather than discovered hours
//! later: a node whose NVIDIA GPUs libtorch cannot use (driver older than the wheel's CUDA,
//! fabric manager down) must not silently train on the CPU, and several ranks of one node
//! must not all pick GPU 0.

use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

/// Oldest driver branch that runs the CUDA 13 build of the torch 2.11 wheel.
const MIN_DRIVER_FOR_CUDA_13: u32 = 580;

/// `--device auto|cpu|cuda|cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// This rank's GPU when CUDA is usable, the CPU on a node without NVIDIA GPUs; an error
    /// on a node whose GPUs CUDA cannot use.
    Auto,
    Cpu,
    /// `cuda`: this rank's GPU (local rank mod visible GPUs); `cuda:N`: exactly GPU N.
    Cuda(Option<usize>),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(None)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| DeviceChoice::Cuda(Some(n)))
                .ok_or_else(|| format!("`{s}` is not a device: use auto, cpu, cuda or cuda:N")),
        }
    }
}

/// What this process knows about GPUs, gathered once so the choice itself is a pure function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuProbe {
    /// GPUs libtorch can use (0 when CUDA does not initialize).
    pub usable: usize,
    /// NVIDIA GPUs the kernel driver reports, whether or not CUDA works.
    pub hardware: Option<NvidiaNode>,
    /// `CUDA_VISIBLE_DEVICES` hides every GPU on purpose (`""`, `-1`): the CPU is then wanted.
    pub hidden: bool,
}

/// The NVIDIA kernel driver's view of the node (`/proc/driver/nvidia`, `/dev/nvidia*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvidiaNode {
    pub gpus: usize,
    /// Kernel module version, e.g. `570.124.06`.
    pub driver: Option<String>,
}

impl NvidiaNode {
    /// Reads the driver's files below `root` (`/` on a real node; a fake tree in tests).
    pub fn detect(root: &Path) -> Option<NvidiaNode> {
        let count = |dir: &Path, keep: &dyn Fn(&str) -> bool| -> usize {
            std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()).filter(|e| keep(&e.file_name().to_string_lossy())).count()).unwrap_or(0)
        };
        let mut gpus = count(&root.join("proc/driver/nvidia/gpus"), &|_| true);
        if gpus == 0 {
            gpus = count(&root.join("dev"), &|n| n.strip_prefix("nvidia").is_some_and(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_digit())));
        }
        if gpus == 0 {
            return None;
        }
        let driver = std::fs::read_to_string(root.join("proc/driver/nvidia/version")).ok().and_then(|t| parse_driver_version(&t));
        Some(NvidiaNode { gpus, driver })
    }
}

/// The version in `/proc/driver/nvidia/version` ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.124.06  ...").
fn parse_driver_version(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let after = line.split("Kernel Module").nth(1)?;
    after.split_whitespace().next().map(str::to_string)
}

impl GpuProbe {
    /// Asks libtorch and the kernel driver.
    pub fn detect() -> GpuProbe {
        let usable = if tch::Cuda::is_available() { tch::Cuda::device_count().max(0) as usize } else { 0 };
        let hidden = std::env::var("CUDA_VISIBLE_DEVICES").is_ok_and(|v| matches!(v.trim(), "" | "-1" | "none" | "NoDevFiles"));
        GpuProbe { usable, hardware: NvidiaNode::detect(Path::new("/")), hidden }
    }

    /// Why a node with NVIDIA GPUs has no usable CUDA device, and what to do about it.
    fn unusable_gpus(&self, requested: &str) -> Option<TrainError> {
        let hw = self.hardware.as_ref()?;
        if self.usable > 0 || self.hidden {
            return None;
        }
        let driver = hw.driver.as_deref().unwrap_or("unknown");
        let major = hw.driver.as_deref().and_then(|d| d.split('.').next()?.parse::<u32>().ok());
        let cause = match major {
            Some(m) if m < MIN_DRIVER_FOR_CUDA_13 => format!(
                "the NVIDIA driver is {driver}, older than the {MIN_DRIVER_FOR_CUDA_13} branch that the CUDA 13 build of torch 2.11 needs. Fix: update the driver, or run against a PyTorch 2.11 built for your CUDA (cu126/cu128 wheels) with LD_LIBRARY_PATH=<its torch/lib>"
            ),
            _ => format!(
                "the driver ({driver}) loads but CUDA does not initialize. Likely causes: on HGX/NVSwitch nodes the fabric manager is down (`systemctl status nvidia-fabricmanager`), MIG is enabled without instances, or the GPUs are in a bad state (`nvidia-smi -q | grep -i -e xid -e retired`)"
            ),
        };
        Some(TrainError::Device {
            requested: requested.into(),
            problem: format!("this node has {} NVIDIA GPU(s) but libtorch can use none: {cause}. To train on the CPU on purpose, pass --device cpu", hw.gpus),
        })
    }
}

/// This process's place among the ranks of its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalRank {
    pub rank: usize,
    pub world: usize,
}

impl DeviceChoice {
    /// The libtorch device for local rank `local` (`neurofm-launch` pins one GPU per rank; under
    /// `srun` every task may see all of the node's GPUs).
    pub fn resolve(self, local: LocalRank) -> Result<Device> {
        self.resolve_with(&GpuProbe::detect(), local)
    }

    /// `resolve` with the GPU facts given (tests fake a GPU node with it).
    pub fn resolve_with(self, probe: &GpuProbe, local: LocalRank) -> Result<Device> {
        let gpus = probe.usable;
        let this_rank = || Device::Cuda(local.rank % gpus);
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => match probe.unusable_gpus("auto") {
                Some(e) => Err(e),
                None if gpus > 0 => Ok(this_rank()),
                None => Ok(Device::Cpu),
            },
            DeviceChoice::Cuda(n) => {
                let requested = n.map_or("cuda".to_string(), |n| format!("cuda:{n}"));
                if gpus == 0 {
                    return Err(probe.unusable_gpus(&requested).unwrap_or(TrainError::Device {
                        requested,
                        problem: "CUDA is not available here (no NVIDIA GPU on this node); use --device cpu or auto".into(),
                    }));
                }
                match n {
                    None => Ok(this_rank()),
                    Some(n) if n >= gpus => Err(TrainError::Device { requested, problem: format!("this process sees {gpus} GPU(s): cuda:0..cuda:{}", gpus - 1) }),
                    Some(_) if local.world > 1 && gpus > 1 => Err(TrainError::Device {
                        requested,
                        problem: format!(
                            "{} ranks run on this node and each sees {gpus} GPUs, so every rank would take the same GPU (NCCL then fails with \"Duplicate GPU\"); use --device cuda (rank r takes GPU r mod {gpus}) or auto",
                            local.world
                        ),
                    }),
                    Some(n) => Ok(Device::Cuda(n)),
                }
            }
        }
    }
}

/// Name, driver and CUDA versions of the GPU behind `device`, for the start-of-run log.
pub fn describe(device: Device) -> String {
    let Device::Cuda(i) = device else { return "CPU".into() };
    let info = gpu_info(i);
    let driver = NvidiaNode::detect(Path::new("/")).and_then(|n| n.driver).unwrap_or_else(|| "unknown".into());
    let cuda = match info.as_ref().map(|g| g.driver_cuda) {
        Some(v) if v > 0 => format!("{}.{}", v / 1000, (v % 1000) / 10),
        _ => "unknown".into(),
    };
    let runtime = mapped_library("libcudart.so").map(|p| p.rsplit('/').next().unwrap_or("").to_string()).unwrap_or_else(|| "unknown".into());
    match info {
        Some(g) => format!("GPU {i}: {} ({} SMs), driver {driver} (supports CUDA {cuda}), libtorch's CUDA runtime {runtime}", g.name, g.sms),
        None => format!("GPU {i}: name unknown (the CUDA driver library did not load), driver {driver}"),
    }
}

/// The first file this process mapped whose name starts with `prefix` (from `/proc/self/maps`).
pub fn mapped_library(prefix: &str) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.rsplit('/').next().is_some_and(|f| f.starts_with(prefix))).map(str::to_string)
}

/// What the CUDA driver says about one device (its ordinal honours `CUDA_VISIBLE_DEVICES`,
/// unlike `nvidia-smi --id`).
struct GpuInfo {
    name: String,
    sms: u32,
    /// Highest CUDA version the driver supports, as 1000 × major + 10 × minor.
    driver_cuda: i32,
}

fn gpu_info(ordinal: usize) -> Option<GpuInfo> {
    use cudarc::driver::{result, sys};
    // SAFETY: only tries to dlopen the driver library; every call below needs it.
    if !unsafe { sys::is_culib_present() } {
        return None;
    }
    result::init().ok()?;
    let dev = result::device::get(ordinal as i32).ok()?;
    let name = result::device::get_name(dev).ok()?;
    // SAFETY: `dev` is a valid device handle and the out-pointers are live.
    let sms = unsafe { result::device::get_attribute(dev, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) }.ok()?;
    let mut driver_cuda = 0;
    // SAFETY: as above.
    let _ = unsafe { sys::cuDriverGetVersion(&mut driver_cuda) };
    Some(GpuInfo { name, sms: sms.max(0) as u32, driver_cuda })
}

/// A GPU's datasheet peaks (dense, no sparsity) in TFLOP/s, and its full SM count (a MIG slice
/// or a partial part has fewer SMs and gets a proportional share).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Datasheet {
    bf16: f64,
    /// Plain fp32 (CUDA cores): tch cannot turn TF32 on, so fp32 runs at this rate.
    fp32: f64,
    sms: u32,
}

/// Looks a device name up by its model token and variant ("NVIDIA H100 NVL" → H100, NVL), so
/// "A10" never matches "A100" or "A10G" and NVL/PCIe parts get their own rates.
fn datasheet(name: &str) -> Option<Datasheet> {
    let tokens: Vec<String> = name.split(|c: char| !c.is_ascii_alphanumeric()).map(|t| t.to_ascii_uppercase()).collect();
    let has = |t: &str| tokens.iter().any(|x| x == t);
    let d = |bf16, fp32, sms| Some(Datasheet { bf16, fp32, sms });
    if has("H100") {
        return if has("NVL") { d(835.0, 60.0, 132) } else if has("PCIE") { d(756.0, 51.0, 114) } else { d(989.0, 67.0, 132) };
    }
    if has("H200") {
        return if has("NVL") { d(835.0, 60.0, 132) } else { d(989.0, 67.0, 132) };
    }
    match () {
        _ if has("GH200") => d(989.0, 67.0, 132),
        _ if has("B200") => d(2250.0, 75.0, 148),
        _ if has("A100") => d(312.0, 19.5, 108),
        _ if has("L40S") => d(362.0, 91.6, 142),
        _ if has("L40") => d(181.0, 90.5, 142),
        _ if has("L4") => d(121.0, 30.3, 58),
        _ if has("A40") => d(150.0, 37.4, 84),
        _ if has("A10") => d(125.0, 31.2, 72),
        _ if has("H20") => d(148.0, 44.0, 78),
        _ => None,
    }
}

/// Where the MFU denominator came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeakKind {
    /// `train.peak_tflops`.
    Configured,
    /// The GPU's datasheet rate for the run's precision.
    Datasheet,
    /// Timed on this machine (CPU runs).
    Measured,
    /// A guess: unknown GPU, or the measurement failed.
    Assumed,
}

/// The MFU denominator and what it is.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Peak {
    pub flops: f64,
    pub kind: PeakKind,
    /// For logs and `throughput.json`, e.g. "NVIDIA H200 bf16 datasheet".
    pub source: String,
}

/// Peak rate of `device` for matmuls in `compute` precision: `configured` TFLOP/s when > 0,
/// else the GPU's datasheet rate, else a measured fp32 matmul rate on the CPU.
pub fn peak_flops(device: Device, compute: Kind, configured_tflops: f64) -> Peak {
    if configured_tflops > 0.0 {
        return Peak { flops: configured_tflops * 1e12, kind: PeakKind::Configured, source: "configured (train.peak_tflops)".into() };
    }
    match device {
        Device::Cuda(i) => {
            let info = gpu_info(i);
            let name = info.as_ref().map(|g| g.name.clone()).unwrap_or_else(|| "unknown".into());
            gpu_peak(&name, info.as_ref().map(|g| g.sms), compute)
        }
        _ => match measure_cpu_matmul(compute) {
            Ok(f) => Peak { flops: f, kind: PeakKind::Measured, source: format!("measured {} matmul on this CPU", if compute == Kind::Float { "fp32" } else { "bf16" }) },
            Err(_) => Peak { flops: 1e11, kind: PeakKind::Assumed, source: "assumed 100 GFLOP/s (the CPU measurement failed)".into() },
        },
    }
}

/// The datasheet peak of GPU `name` with `sms` streaming multiprocessors (fewer than the full
/// part on a MIG slice), or a loudly flagged guess.
fn gpu_peak(name: &str, sms: Option<u32>, compute: Kind) -> Peak {
    let precision = if compute == Kind::Float { "fp32" } else { "bf16" };
    match datasheet(name) {
        Some(ds) => {
            let rate = if compute == Kind::Float { ds.fp32 } else { ds.bf16 };
            let share = sms.filter(|&s| s > 0 && s < ds.sms).map(|s| s as f64 / ds.sms as f64);
            let source = match share {
                Some(f) => format!("{name} {precision} datasheet × {:.3} ({} of {} SMs: a MIG slice or partial part)", f, sms.unwrap_or(0), ds.sms),
                None => format!("{name} {precision} datasheet"),
            };
            Peak { flops: rate * share.unwrap_or(1.0) * 1e12, kind: PeakKind::Datasheet, source }
        }
        None => {
            let rate = if compute == Kind::Float { 67.0 } else { 989.0 };
            tracing::warn!("unknown GPU `{name}`: MFU is computed against an assumed {rate} TFLOP/s ({precision}, H100 SXM) and is likely wrong; set train.peak_tflops to this GPU's dense {precision} rate");
            Peak { flops: rate * 1e12, kind: PeakKind::Assumed, source: format!("unknown GPU `{name}`: assumed H100 {precision}; set train.peak_tflops") }
        }
    }
}

/// Best of a few 1024³ matmuls with libtorch's threads, in `kind`.
fn measure_cpu_matmul(kind: Kind) -> Result<f64> {
    let n = 1024;
    let a = Tensor::f_randn([n, n], (kind, Device::Cpu))?;
    let b = Tensor::f_randn([n, n], (kind, Device::Cpu))?;
    let _ = a.f_matmul(&b)?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let _ = a.f_matmul(&b)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best)
}

/// The attention kernel libtorch's dispatcher picks for unmasked self-attention of `heads`
/// heads of width `head_dim` over `seq` tokens in `kind` on `device` (flash needs no mask and
/// a supported dtype and width; an unexpected `math` is a large slowdown worth knowing).
pub fn attention_backend(device: Device, kind: Kind, seq: i64, heads: i64, head_dim: i64) -> Result<&'static str> {
    let q = Tensor::f_zeros([1, heads, seq, head_dim], (kind, device))?;
    let choice = Tensor::f_internal_fused_sdp_choice(&q, &q, &q, None::<Tensor>, 0.0, false, None, false)?;
    // PyTorch's `sdp::SDPBackend` numbering.
    Ok(match choice {
        0 => "math (unfused)",
        1 => "flash",
        2 => "memory-efficient",
        3 => "cuDNN",
        4 => "overrideable",
        _ => "none",
    })
}

/// Whether a libtorch error text is the GPU running out of memory: the caching allocator's
/// message, the CUDA runtime's, or cuBLAS failing to allocate its workspace or handle (how an
/// exhausted GPU usually shows at the first matmul).
pub fn is_oom(text: &str) -> bool {
    const NEEDLES: [&str; 6] = [
        "out of memory",
        "OutOfMemoryError",
        "cudaErrorMemoryAllocation",
        "CUBLAS_STATUS_ALLOC_FAILED",
        "CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate",
        "CUDNN_STATUS_ALLOC_FAILED",
    ];
    NEEDLES.iter().any(|n| text.contains(n))
}

/// Maps a libtorch error to `OutOfMemory` when it is one, with a smaller batch to try.
pub fn classify_oom(e: tch::TchError, batch_size: usize, grad_accum: usize) -> TrainError {
    let text = e.to_string();
    if !is_oom(&text) {
        return TrainError::Torch(e);
    }
    let suggest = (batch_size / 2).max(1);
    let accum = grad_accum * batch_size.div_ceil(suggest);
    let detail = text.lines().next().unwrap_or("").chars().take(200).collect();
    TrainError::OutOfMemory { batch_size, suggest, accum, detail }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::exit::ExitStatus;

    const ONE: LocalRank = LocalRank { rank: 0, world: 1 };

    fn node(usable: usize, gpus: usize, driver: &str) -> GpuProbe {
        let hardware = (gpus > 0).then(|| NvidiaNode { gpus, driver: Some(driver.into()) });
        GpuProbe { usable, hardware, hidden: false }
    }

    #[test]
    fn parses_devices() {
        assert_eq!("auto".parse::<DeviceChoice>(), Ok(DeviceChoice::Auto));
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(None)));
        assert_eq!("cuda:3".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(Some(3))));
        assert!("gpu".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn auto_refuses_a_gpu_node_whose_gpus_cuda_cannot_use() {
        let e = DeviceChoice::Auto.resolve_with(&node(0, 8, "550.54.15"), ONE).unwrap_err();
        let msg = e.to_string();
        assert_eq!(e.exit_code(), 2);
        assert!(msg.contains("8 NVIDIA GPU(s)") && msg.contains("550.54.15") && msg.contains("580") && msg.contains("--device cpu"), "{msg}");
        let msg = DeviceChoice::Auto.resolve_with(&node(0, 8, "580.65.06"), ONE).unwrap_err().to_string();
        assert!(msg.contains("fabric manager"), "a new driver points at the fabric manager: {msg}");
        // No NVIDIA hardware, or GPUs hidden on purpose: the CPU, without complaint.
        assert_eq!(DeviceChoice::Auto.resolve_with(&node(0, 0, ""), ONE).unwrap(), Device::Cpu);
        let hidden = GpuProbe { hidden: true, ..node(0, 8, "550.54.15") };
        assert_eq!(DeviceChoice::Auto.resolve_with(&hidden, ONE).unwrap(), Device::Cpu);
        assert_eq!(DeviceChoice::Cpu.resolve_with(&node(0, 8, "550.54.15"), ONE).unwrap(), Device::Cpu);
        assert!(DeviceChoice::Cuda(None).resolve_with(&node(0, 8, "550.54.15"), ONE).unwrap_err().to_string().contains("550.54.15"));
    }

    #[test]
    fn cuda_means_this_ranks_gpu_and_a_fixed_gpu_is_refused_for_several_local_ranks() {
        let eight = node(8, 8, "580.65.06");
        for r in 0..8 {
            let local = LocalRank { rank: r, world: 8 };
            assert_eq!(DeviceChoice::Cuda(None).resolve_with(&eight, local).unwrap(), Device::Cuda(r));
            assert_eq!(DeviceChoice::Auto.resolve_with(&eight, local).unwrap(), Device::Cuda(r));
        }
        // The launcher pins one GPU per rank: each sees only "its" GPU 0.
        let pinned = node(1, 8, "580.65.06");
        assert_eq!(DeviceChoice::Cuda(None).resolve_with(&pinned, LocalRank { rank: 5, world: 8 }).unwrap(), Device::Cuda(0));
        assert_eq!(DeviceChoice::Cuda(Some(0)).resolve_with(&pinned, LocalRank { rank: 5, world: 8 }).unwrap(), Device::Cuda(0));
        let e = DeviceChoice::Cuda(Some(0)).resolve_with(&eight, LocalRank { rank: 1, world: 8 }).unwrap_err().to_string();
        assert!(e.contains("Duplicate GPU") && e.contains("--device cuda"), "{e}");
        assert_eq!(DeviceChoice::Cuda(Some(3)).resolve_with(&eight, ONE).unwrap(), Device::Cuda(3));
        assert!(DeviceChoice::Cuda(Some(8)).resolve_with(&eight, ONE).is_err());
    }

    #[test]
    fn reads_the_kernel_drivers_files() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(NvidiaNode::detect(root.path()), None);
        let gpus = root.path().join("proc/driver/nvidia/gpus");
        for bus in ["0000:18:00.0", "0000:2a:00.0"] {
            std::fs::create_dir_all(gpus.join(bus)).unwrap();
        }
        std::fs::write(root.path().join("proc/driver/nvidia/version"), "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.124.06  Wed Feb 26 2025\nGCC version: gcc 12\n").unwrap();
        assert_eq!(NvidiaNode::detect(root.path()), Some(NvidiaNode { gpus: 2, driver: Some("570.124.06".into()) }));
        // Containers often expose only the device files.
        let dev_only = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dev_only.path().join("dev")).unwrap();
        for f in ["nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"] {
            std::fs::write(dev_only.path().join("dev").join(f), "").unwrap();
        }
        assert_eq!(NvidiaNode::detect(dev_only.path()), Some(NvidiaNode { gpus: 2, driver: None }));
    }

    #[test]
    fn datasheet_peaks_match_the_part_and_precision() {
        let bf16 = |n: &str| gpu_peak(n, None, Kind::BFloat16).flops / 1e12;
        assert_eq!(bf16("NVIDIA H100 80GB HBM3"), 989.0);
        assert_eq!(bf16("NVIDIA H100 PCIe"), 756.0);
        assert_eq!(bf16("NVIDIA H100 NVL"), 835.0);
        assert_eq!(bf16("NVIDIA H200"), 989.0);
        assert_eq!(bf16("NVIDIA H200 NVL"), 835.0);
        assert_eq!(bf16("NVIDIA GH200 480GB"), 989.0);
        assert_eq!(bf16("NVIDIA A100-SXM4-80GB"), 312.0);
        assert_eq!(bf16("NVIDIA A10"), 125.0);
        assert_eq!(gpu_peak("NVIDIA A10G", None, Kind::BFloat16).kind, PeakKind::Assumed, "A10G is not an A10");
        let fp32 = gpu_peak("NVIDIA H200", None, Kind::Float);
        assert_eq!((fp32.flops / 1e12, fp32.kind), (67.0, PeakKind::Datasheet));
        assert!(fp32.source.contains("fp32"));
        // A MIG 1g slice of an H100 (16 of 132 SMs) gets its share of the peak.
        let mig = gpu_peak("NVIDIA H100 80GB HBM3", Some(16), Kind::BFloat16);
        assert!((mig.flops / 1e12 - 989.0 * 16.0 / 132.0).abs() < 1e-6 && mig.source.contains("MIG"), "{mig:?}");
        assert_eq!(peak_flops(Device::Cpu, Kind::Float, 12.5), Peak { flops: 12.5e12, kind: PeakKind::Configured, source: "configured (train.peak_tflops)".into() });
    }

    #[test]
    fn the_cpu_attention_kernel_is_named() {
        let b = attention_backend(Device::Cpu, Kind::Float, 64, 2, 16).unwrap();
        assert!(["flash", "math (unfused)"].contains(&b), "{b}");
    }

    #[test]
    fn oom_of_every_kind_suggests_a_smaller_batch_with_the_same_cells_per_step() {
        for text in [
            "CUDA out of memory. Tried to allocate 2.00 GiB",
            "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
            "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`",
            "cudaErrorMemoryAllocation: out of memory",
        ] {
            let e = classify_oom(tch::TchError::Torch(text.into()), 64, 1);
            let msg = e.to_string();
            assert!(msg.contains("batch_size = 32") && msg.contains("grad_accum = 2"), "{text}: {msg}");
            assert_eq!(e.exit_code(), 2);
        }
        assert!(matches!(classify_oom(tch::TchError::Torch("shape mismatch".into()), 64, 1), TrainError::Torch(_)));
    }
}
