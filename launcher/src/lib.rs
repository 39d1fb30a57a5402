//! Process-group plumbing shared by `neurofm-launch` and `neurofm-train` (DESIGN §5).
//!
//! Read top to bottom: `env` (who is which rank: the environment contract of the launcher,
//! SLURM and mpirun), `hostlist` (SLURM node lists), `store` (the TCP key-value store ranks
//! meet at, with deadlines, open only to the job's token), `supervise` (spawning one process per
//! rank and tearing the group down when one fails, leaving no process behind).

pub mod env;
pub mod error;
pub mod hostlist;
pub mod store;
pub mod supervise;

pub use error::{LaunchError, Result};
