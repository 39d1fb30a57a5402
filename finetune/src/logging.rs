//! Log lines of both binaries: stderr, and on rank 0 of a fine-tune also its run directory's
//! `finetune.log` (appended across resumes). The inputs are checked before the run directory
//! may be created, so lines are buffered until `attach` names the file; other ranks log
//! warnings and errors only, so a group's output stays readable.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::fmt::writer::MakeWriterExt;

use crate::error::{FinetuneError, Result};

/// Buffered lines (at most this many bytes) before the log file is known.
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

/// Logs to stderr; with `to_file`, also to the file `attach` names later.
pub fn init(rank: usize, to_file: bool) {
    let default = if rank == 0 { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false);
    if to_file && rank == 0 {
        fmt.with_writer(std::io::stderr.and(|| SinkWriter)).init();
    } else {
        fmt.with_writer(std::io::stderr).init();
    }
}

/// From now on log lines also go to `path` (appended), starting with those buffered so far.
pub fn attach(path: &Path) -> Result<()> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| FinetuneError::io(path, e))?;
    let mut sink = SINK.lock().map_err(|_| FinetuneError::Internal("the log sink is poisoned".into()))?;
    if let Sink::Buffer(b) = &*sink {
        file.write_all(b).map_err(|e| FinetuneError::io(path, e))?;
    }
    *sink = Sink::File(file);
    Ok(())
}
