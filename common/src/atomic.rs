//! Outputs appear whole or not at all: written under a temporary name beside the target, then
//! renamed over it (atomic within a filesystem), the temporary removed on any failure.

use std::io;
use std::path::{Path, PathBuf};

/// A hidden temporary name beside `path`, unique to this process, with the same extension
/// (writers such as the PNG encoder choose their format by it): `.STEM.tmp-PID.EXT`.
pub fn temp_beside(path: &Path) -> PathBuf {
    let stem = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    path.with_file_name(format!(".{stem}.tmp-{}{ext}", std::process::id()))
}

/// Runs `write` on a temporary path beside `path` (a file or a directory), then renames the
/// result to `path`. `io_err` turns a rename failure into the caller's error type.
pub fn write_via_temp<T, E>(path: &Path, write: impl FnOnce(&Path) -> Result<T, E>, io_err: impl FnOnce(&Path, io::Error) -> E) -> Result<T, E> {
    let tmp = temp_beside(path);
    let done = write(&tmp).and_then(|t| std::fs::rename(&tmp, path).map(|()| t).map_err(|e| io_err(path, e)));
    if done.is_err() {
        let _ = if tmp.is_dir() { std::fs::remove_dir_all(&tmp) } else { std::fs::remove_file(&tmp) };
    }
    done
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_via_temp(path, |tmp| std::fs::write(tmp, bytes), |_, e| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_neither_target_nor_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.json");
        let failed: Result<(), String> = write_via_temp(
            &target,
            |tmp| {
                std::fs::write(tmp, b"half").unwrap();
                Err("disk full".to_string())
            },
            |_, e| e.to_string(),
        );
        assert_eq!(failed, Err("disk full".to_string()));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left behind");
        assert_eq!(temp_beside(&target).extension().unwrap(), "json");
        write_bytes(&target, b"whole").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
