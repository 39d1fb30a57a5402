//! Process exit codes, one meaning each across every binary (and what `neurofm-launch` and SLURM
//! scripts act on).

use std::process::ExitCode;

/// How a neurofm process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Success = 0,
    /// A runtime failure that is not the user's input (disk, libtorch, a bug): retry or report.
    Failure = 1,
    /// Bad input or usage: the message names the file, the field and the fix.
    BadInput = 2,
    /// Training diverged (a non-finite loss or gradient): change the recipe, not the machine.
    Diverged = 3,
    /// The group of ranks failed (a peer died, a collective timed out): the launcher may restart.
    GroupFailed = 4,
}

impl Exit {
    /// The numeric code, for `std::process::exit` and `libc::_exit`.
    pub fn code(self) -> i32 {
        self as i32
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// Implemented by each crate's error type: which [`Exit`] it means.
pub trait ExitStatus {
    fn exit(&self) -> Exit;

    /// The numeric code of [`ExitStatus::exit`].
    fn exit_code(&self) -> i32 {
        self.exit().code()
    }
}
