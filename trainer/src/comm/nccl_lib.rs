//! Binding cudarc to the NCCL that libtorch already loaded, without asking the user for symlinks.
//!
//! cudarc dlopens `libnccl.so` (or `.so.13`, `.so.12`, ...) by name and never `libnccl.so.2`,
//! the only name PyTorch's wheels ship (in `site-packages/nvidia/nccl/lib`, mapped by
//! libtorch_cuda). Left alone, cudarc either finds nothing or, worse, a system `libnccl.so` of
//! another version, and the process then holds two NCCLs. So before NCCL is first used we
//! make a private directory with a `libnccl.so` link to the mapped library and re-exec
//! ourselves with it first on `LD_LIBRARY_PATH` (the loader reads that variable only at process
//! start); glibc then resolves cudarc's dlopen to the copy already loaded.

use std::path::{Path, PathBuf};

/// Set on the re-exec'd process (to the link directory) so it never loops.
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

/// Candidate parents of the link directory: the user's cache, then the temp directory (a
/// read-only home in a container, or a scheduler's odd `HOME`, must not break NCCL).
fn link_parents() -> Vec<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    // SAFETY: getuid has no failure mode.
    let uid = unsafe { libc::getuid() };
    cache.map(|c| c.join("neurofm")).into_iter().chain([std::env::temp_dir().join(format!("neurofm-{uid}"))]).collect()
}

/// A directory holding `libnccl.so` → `target`, under the first writable of `parents` (made
/// atomically, shared by all ranks of a node).
pub fn link_dir(target: &Path, parents: &[PathBuf]) -> std::io::Result<PathBuf> {
    let key = dataloader::rng::hash_str(&target.display().to_string());
    let mut last = std::io::Error::other("no candidate directory");
    for (i, parent) in parents.iter().enumerate() {
        match make_link(&parent.join(format!("nccl-{key:016x}")), target) {
            Ok(dir) => {
                if i > 0 {
                    tracing::warn!("{} is not writable ({last}); linked NCCL under {} instead", parents[0].display(), dir.display());
                }
                return Ok(dir);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn make_link(dir: &Path, target: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let link = dir.join("libnccl.so");
    if std::fs::read_link(&link).ok().as_deref() != Some(target) {
        let tmp = dir.join(format!(".libnccl.so.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp)?;
        std::fs::rename(&tmp, &link)?;
    }
    Ok(dir.to_path_buf())
}

/// Re-execs this process so that cudarc loads the NCCL libtorch mapped. Call it before anything
/// else that matters (it never returns when it re-execs); returns at once in the re-exec'd
/// process, and when no libtorch NCCL exists (cudarc then searches the system as usual).
pub fn bind_to_torch_nccl() {
    if std::env::var_os(REEXEC_MARK).is_some() {
        return;
    }
    let Some(lib) = locate() else { return };
    let dir = match link_dir(&lib, &link_parents()) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("cannot make a libnccl.so link to {} ({e}); NCCL may not load", lib.display());
            return;
        }
    };
    let mut path = dir.clone().into_os_string();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        path.push(":");
        path.push(old);
    }
    let Ok(exe) = std::env::current_exe() else { return };
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).env("LD_LIBRARY_PATH", path).env(REEXEC_MARK, dir).exec();
    tracing::warn!("could not re-exec with NCCL on LD_LIBRARY_PATH: {err}");
}

/// The distinct NCCL library files in a `/proc/self/maps` text.
fn nccl_files(maps: &str) -> Vec<String> {
    let mut files: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.rsplit('/').next().is_some_and(|f| f.starts_with("libnccl.so") || f.starts_with("libnccl64")))
        .map(str::to_string)
        .collect();
    files.sort();
    files.dedup();
    files
}

/// Loads NCCL through cudarc and checks it is one library, the one libtorch mapped; returns
/// its path and version ("2.28.9") for the log.
pub fn load() -> Result<(String, String), String> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(format!("libnccl could not be loaded; {}", hint()));
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let files = nccl_files(&maps);
    if files.len() > 1 {
        return Err(format!(
            "two NCCL libraries are loaded ({}): libtorch's and another found on the library path. Remove the other from LD_LIBRARY_PATH, or start through neurofm-train (it binds to libtorch's NCCL by itself)",
            files.join(", ")
        ));
    }
    let version = cudarc::nccl::result::get_nccl_version().map(format_version).map_err(|e| format!("ncclGetVersion failed: {e:?}"))?;
    Ok((files.into_iter().next().unwrap_or_else(|| "(not mapped)".into()), version))
}

/// NCCL's version code (major × 10000 + minor × 100 + patch since 2.9) as "2.28.9".
fn format_version(code: i32) -> String {
    format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
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
        let cache = tempfile::tempdir().unwrap();
        let parents = [cache.path().to_path_buf()];
        let dir = link_dir(&lib, &parents).unwrap();
        assert_eq!(std::fs::read_link(dir.join("libnccl.so")).unwrap(), lib);
        // Linking twice is idempotent (every rank of a node does it).
        assert_eq!(link_dir(&lib, &parents).unwrap(), dir);
    }

    #[test]
    fn an_unwritable_cache_falls_back_to_the_next_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("libnccl.so.2");
        std::fs::write(&target, b"").unwrap();
        // A path below a regular file can never be created, even by root.
        let blocked = target.join("cache");
        let dir = link_dir(&target, &[blocked, tmp.path().join("fallback")]).unwrap();
        assert!(dir.starts_with(tmp.path().join("fallback")), "{}", dir.display());
        assert_eq!(std::fs::read_link(dir.join("libnccl.so")).unwrap(), target);
    }

    #[test]
    fn two_mapped_nccls_are_told_apart() {
        let maps = "7f00-7f01 r-xp 0 08:01 11 /site/nvidia/nccl/lib/libnccl.so.2\n\
                    7f01-7f02 r--p 0 08:01 11 /site/nvidia/nccl/lib/libnccl.so.2\n\
                    7f03-7f04 r-xp 0 08:01 12 /usr/lib/x86_64-linux-gnu/libnccl.so.2.21.5\n\
                    7f05-7f06 r-xp 0 08:01 13 /usr/lib/libnccl-net.so\n";
        assert_eq!(nccl_files(maps), vec!["/site/nvidia/nccl/lib/libnccl.so.2", "/usr/lib/x86_64-linux-gnu/libnccl.so.2.21.5"]);
        assert_eq!(format_version(22809), "2.28.9");
    }
}
