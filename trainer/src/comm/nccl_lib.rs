//! Finding NCCL without asking the user for symlinks.
//!
//! cudarc dlopens `libnccl.so` (or `.so.13`, `.so.12`, ...) by name, but PyTorch's wheels ship
//! only `libnccl.so.2` (in `site-packages/nvidia/nccl/lib`, already loaded by libtorch_cuda).
//! If NCCL is needed and cudarc cannot load it, we make a private directory with a
//! `libnccl.so` link to the wheel's library and re-exec ourselves with it on
//! `LD_LIBRARY_PATH` (the loader reads that variable only at process start).

use std::path::{Path, PathBuf};

/// Set on the re-exec'd process so it never loops.
const REEXEC_MARK: &str = "NEUROFM_NCCL_REEXEC";

/// Where a `libnccl.so.2` is: one this process already mapped (libtorch_cuda's), else one
/// beside the libtorch we run with.
pub fn locate() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mapped = |suffix: &str| maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.ends_with(suffix)).map(PathBuf::from);
    if let Some(p) = mapped("/libnccl.so.2") {
        return Some(p);
    }
    // torch/lib/libtorch_cpu.so → site-packages/nvidia/nccl/lib/libnccl.so.2
    let torch_lib = mapped("/libtorch_cpu.so")?.parent()?.to_path_buf();
    let candidate = torch_lib.parent()?.parent()?.join("nvidia/nccl/lib/libnccl.so.2");
    candidate.is_file().then_some(candidate)
}

/// A directory holding `libnccl.so` → `target`, under the user's cache (made atomically, shared
/// by all ranks of a node).
pub fn link_dir(target: &Path) -> std::io::Result<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"))).unwrap_or_else(std::env::temp_dir);
    let key = dataloader::rng::hash_str(&target.display().to_string());
    let dir = cache.join("neurofm").join(format!("nccl-{key:016x}"));
    std::fs::create_dir_all(&dir)?;
    let link = dir.join("libnccl.so");
    if std::fs::read_link(&link).ok().as_deref() != Some(target) {
        let tmp = dir.join(format!(".libnccl.so.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp)?;
        std::fs::rename(&tmp, &link)?;
    }
    Ok(dir)
}

/// Re-execs this process with NCCL loadable, if NCCL is about to be used and cannot be
/// loaded as is. Returns only when no re-exec was needed or possible.
pub fn ensure_loadable() {
    // SAFETY: only tries to dlopen the library.
    if std::env::var_os(REEXEC_MARK).is_some() || unsafe { cudarc::nccl::sys::is_culib_present() } {
        return;
    }
    let Some(dir) = locate().and_then(|lib| link_dir(&lib).ok()) else { return };
    let mut path = dir.into_os_string();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        path.push(":");
        path.push(old);
    }
    let Ok(exe) = std::env::current_exe() else { return };
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).env("LD_LIBRARY_PATH", path).env(REEXEC_MARK, "1").exec();
    tracing::warn!("could not re-exec with NCCL on LD_LIBRARY_PATH: {err}");
}

/// What to tell a user whose NCCL cannot be loaded.
pub fn hint() -> String {
    match locate() {
        Some(p) => format!("found {} but could not load it as libnccl.so; put a directory with a `libnccl.so` link to it on LD_LIBRARY_PATH", p.display()),
        None => "no libnccl.so.2 found beside libtorch; install PyTorch's nvidia-nccl wheel or NCCL, and put it on LD_LIBRARY_PATH".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_wheel_nccl_and_links_it_loadably() {
        // The test binary links libtorch, whose wheel ships NCCL: CI has it; skip elsewhere.
        let Some(lib) = locate() else {
            assert!(std::env::var_os("CI").is_none(), "CI must find the torch wheel's libnccl.so.2");
            return;
        };
        assert!(lib.ends_with("libnccl.so.2") && lib.is_file(), "{}", lib.display());
        let dir = link_dir(&lib).unwrap();
        assert_eq!(std::fs::read_link(dir.join("libnccl.so")).unwrap(), lib);
        // Linking twice is idempotent (every rank of a node does it).
        assert_eq!(link_dir(&lib).unwrap(), dir);
    }
}
