//! Test-only fault injection: `NEUROFM_FAULT=rank=R,step=S,exit=C` makes rank R exit with
//! code C right after optimizer step S, as a crash would (no cleanup, no checkpoint). It fires
//! only on a group's first attempt (`NEUROFM_RESTART_COUNT` unset or 0), so restart tests can
//! check recovery.

use crate::error::{Result, TrainError};

/// A crash to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub rank: usize,
    pub step: u64,
    pub exit: i32,
}

impl Fault {
    /// The fault configured for this attempt, if any.
    pub fn from_env() -> Result<Option<Fault>> {
        let Ok(spec) = std::env::var("NEUROFM_FAULT") else { return Ok(None) };
        let fault = Fault::parse(&spec)?;
        Ok((!launcher::env::is_restart()).then_some(fault))
    }

    fn parse(spec: &str) -> Result<Fault> {
        let bad = || TrainError::Config(format!("NEUROFM_FAULT={spec:?} must look like rank=1,step=3,exit=7"));
        let (mut rank, mut step, mut exit) = (None, None, None);
        for part in spec.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(bad)?;
            match k.trim() {
                "rank" => rank = v.trim().parse().ok(),
                "step" => step = v.trim().parse().ok(),
                "exit" => exit = v.trim().parse().ok(),
                _ => return Err(bad()),
            }
        }
        Ok(Fault { rank: rank.ok_or_else(bad)?, step: step.ok_or_else(bad)?, exit: exit.ok_or_else(bad)? })
    }

    /// Exits the process if this is the faulty rank at the faulty step.
    pub fn maybe_crash(&self, rank: usize, step: u64) {
        if rank == self.rank && step == self.step {
            eprintln!("NEUROFM_FAULT: rank {rank} exits with code {} after step {step}", self.exit);
            std::process::exit(self.exit);
        }
    }
}

/// Test-only knobs that break an invariant on purpose, so a test can show that the check
/// guarding it works: `NEUROFM_TEST_INIT=per-rank` initializes each rank's model from a
/// different seed (the start-up broadcast must make them equal), and
/// `NEUROFM_TEST_SKIP_BROADCAST=1` skips that broadcast (the cross-rank check before a
/// checkpoint must then refuse to save).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestKnobs {
    pub init_per_rank: bool,
    pub skip_broadcast: bool,
}

impl TestKnobs {
    pub fn from_env() -> TestKnobs {
        TestKnobs {
            init_per_rank: std::env::var("NEUROFM_TEST_INIT").is_ok_and(|v| v == "per-rank"),
            skip_broadcast: std::env::var("NEUROFM_TEST_SKIP_BROADCAST").is_ok_and(|v| v == "1"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!(Fault::parse("rank=1,step=3,exit=7").unwrap(), Fault { rank: 1, step: 3, exit: 7 });
        assert!(Fault::parse("rank=1,step=3").unwrap_err().to_string().contains("rank=1,step=3,exit=7"));
        assert!(Fault::parse("when=now").is_err());
    }
}
