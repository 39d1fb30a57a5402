//! One logging set-up for every binary: lines to stderr, and on rank 0 of a run also to a log
//! file in its run directory (appended across resumes). A binary checks its inputs before the
//! run directory may exist, so lines are buffered until [`attach`] names the file; ranks other
//! than 0 log warnings and errors only, so a group's output stays readable.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::fmt::writer::MakeWriterExt;

/// Buffered bytes (at most) before the log file is known.
const BUFFER_LIMIT: usize = 1 << 20;

enum Sink {
    Buffer(Vec<u8>),
    File(File),
}

static SINK: Mutex<Sink> = Mutex::new(Sink::Buffer(Vec::new()));

/// Writes to the log file once attached, into the buffer before.
struct SinkWriter;

impl Write for SinkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut sink) = SINK.lock() {
            match &mut *sink {
                Sink::Buffer(b) if b.len() + bytes.len() <= BUFFER_LIMIT => b.extend_from_slice(bytes),
                Sink::Buffer(_) => {}
                Sink::File(f) => f.write_all(bytes)?,
            }
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match SINK.lock() {
            Ok(mut sink) => match &mut *sink {
                Sink::File(f) => f.flush(),
                Sink::Buffer(_) => Ok(()),
            },
            Err(_) => Ok(()),
        }
    }
}

/// Who logs, and where.
#[derive(Debug, Clone, Copy)]
pub struct LogSetup {
    /// Rank in a data-parallel group (0 alone).
    pub rank: usize,
    /// Warnings and errors only (`-q`).
    pub quiet: bool,
    /// Also write to the file [`attach`] names (rank 0 only).
    pub to_file: bool,
}

impl LogSetup {
    /// A single process logging to stderr only.
    pub fn stderr(quiet: bool) -> Self {
        LogSetup { rank: 0, quiet, to_file: false }
    }
}

/// Installs the global subscriber (`RUST_LOG` overrides the level). Call once, first thing.
pub fn init(setup: LogSetup) {
    let default = if setup.rank == 0 && !setup.quiet { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false);
    let result = if setup.to_file && setup.rank == 0 {
        fmt.with_writer(std::io::stderr.and(|| SinkWriter)).try_init()
    } else {
        fmt.with_writer(std::io::stderr).try_init()
    };
    if result.is_err() {
        tracing::debug!("logging was already set up");
    }
}

/// From now on log lines also go to `path` (appended), starting with those buffered so far.
pub fn attach(path: &Path) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let mut sink = SINK.lock().map_err(|_| std::io::Error::other("the log sink is poisoned"))?;
    if let Sink::Buffer(b) = &*sink {
        file.write_all(b)?;
    }
    *sink = Sink::File(file);
    Ok(())
}
