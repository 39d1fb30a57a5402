//! Errors of the launcher library, each naming what to fix.

use thiserror::Error;

/// Why a group could not be formed or run.
#[derive(Debug, Error)]
pub enum LaunchError {
    /// An environment variable of the contract is malformed.
    #[error("environment variable {var}={value:?} {problem}")]
    Env { var: String, value: String, problem: String },
    /// Bad launcher arguments.
    #[error("{0}")]
    Config(String),
    /// A rank or the store did not show up in time.
    #[error("{0}")]
    Timeout(String),
    /// The store's peer broke the protocol or went away.
    #[error("rendezvous store at {addr}: {problem}")]
    Store { addr: String, problem: String },
    /// An OS call failed. The cause is not called `source`: anyhow would print it twice.
    #[error("{context}: {cause}")]
    Io { context: String, cause: std::io::Error },
}

impl LaunchError {
    pub fn io(context: impl Into<String>, cause: std::io::Error) -> Self {
        LaunchError::Io { context: context.into(), cause }
    }
}

pub type Result<T, E = LaunchError> = std::result::Result<T, E>;
