//! Runs a group of processes as one unit: output prefixed per process, signals forwarded, and
//! when one fails the rest are stopped (SIGTERM, then SIGKILL after a grace period).
//!
//! Each child leads its own process group, so whatever it starts is stopped with it, and gets
//! SIGTERM if the supervisor itself dies: no orphans either way.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::error::{LaunchError, Result};

/// One process of the group.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// Names the process in messages and prefixes its output lines (`[rank 3] ...`).
    pub label: String,
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Added to the supervisor's environment.
    pub env: Vec<(String, String)>,
    /// Prefix each output line with `[label] `.
    pub prefix_output: bool,
}

/// How the group ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// 0 if all succeeded; else the first failure's exit code (128 + signal if killed).
    pub code: i32,
    /// The label of the first process that failed.
    pub failed: Option<String>,
    /// Stopped by SIGINT/SIGTERM sent to the supervisor: do not restart.
    pub interrupted: bool,
}

/// Runs `children` until all exit; on the first failure or signal, stops the others.
pub fn run_group(children: Vec<ChildSpec>, grace: Duration) -> Result<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| LaunchError::io("starting the supervisor's runtime", e))?;
    rt.block_on(supervise(children, grace))
}

async fn supervise(children: Vec<ChildSpec>, grace: Duration) -> Result<Outcome> {
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| LaunchError::io("installing the SIGINT handler", e))?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| LaunchError::io("installing the SIGTERM handler", e))?;
    let (tx, mut exits) = mpsc::unbounded_channel::<(usize, std::io::Result<ExitStatus>)>();
    let mut groups: Vec<i32> = Vec::new();
    let mut pumps = Vec::new();
    for (i, spec) in children.iter().enumerate() {
        let mut cmd = tokio::process::Command::new(&spec.program);
        cmd.args(&spec.args).envs(spec.env.iter().map(|(k, v)| (k, v))).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM the child if
        // the supervisor dies.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                signal_groups(&groups, libc::SIGKILL);
                return Err(LaunchError::io(format!("cannot start {} ({})", spec.program.to_string_lossy(), spec.label), e));
            }
        };
        groups.push(child.id().map(|p| p as i32).unwrap_or(0));
        let prefix = spec.prefix_output.then(|| format!("[{}] ", spec.label));
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(out, prefix.clone(), false)));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(err, prefix, true)));
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send((i, status));
        });
    }
    drop(tx);

    let mut running = vec![true; children.len()];
    let mut outcome: Option<Outcome> = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let live = |running: &[bool]| -> Vec<i32> { groups.iter().zip(running).filter(|(_, r)| **r).map(|(g, _)| *g).collect() };
    while running.iter().any(|r| *r) {
        tokio::select! {
            Some((i, status)) = exits.recv() => {
                running[i] = false;
                let code = match status {
                    Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
                    Err(_) => 1,
                };
                if code != 0 && outcome.is_none() {
                    eprintln!("neurofm-launch: {} exited with code {code}; stopping the others (SIGTERM, SIGKILL after {:.0} s)", children[i].label, grace.as_secs_f64());
                    outcome = Some(Outcome { code, failed: Some(children[i].label.clone()), interrupted: false });
                    signal_groups(&live(&running), libc::SIGTERM);
                    kill_at = Some(tokio::time::Instant::now() + grace);
                }
            }
            _ = sigint.recv() => forward(&mut outcome, &mut kill_at, &live(&running), libc::SIGINT, grace),
            _ = sigterm.recv() => forward(&mut outcome, &mut kill_at, &live(&running), libc::SIGTERM, grace),
            _ = sleep_until(kill_at), if kill_at.is_some() => {
                eprintln!("neurofm-launch: grace period over; killing the remaining processes");
                signal_groups(&live(&running), libc::SIGKILL);
                kill_at = None;
            }
        }
    }
    // Whatever the children left behind in their groups goes too.
    signal_groups(&groups, libc::SIGKILL);
    for p in pumps {
        let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
    }
    Ok(outcome.unwrap_or(Outcome { code: 0, failed: None, interrupted: false }))
}

fn forward(outcome: &mut Option<Outcome>, kill_at: &mut Option<tokio::time::Instant>, live: &[i32], sig: i32, grace: Duration) {
    eprintln!("neurofm-launch: got signal {sig}; passing it on to {} process(es)", live.len());
    signal_groups(live, sig);
    outcome.get_or_insert(Outcome { code: 128 + sig, failed: None, interrupted: false }).interrupted = true;
    kill_at.get_or_insert(tokio::time::Instant::now() + grace);
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn signal_groups(groups: &[i32], sig: i32) {
    for &g in groups.iter().filter(|&&g| g > 0) {
        // SAFETY: plain syscall; a group that is already gone gives ESRCH, which is fine.
        unsafe {
            libc::kill(-g, sig);
        }
    }
}

/// Copies a child's output line by line, with an optional prefix.
async fn pump(from: impl AsyncRead + Unpin, prefix: Option<String>, to_stderr: bool) {
    let mut lines = tokio::io::BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match lines.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let mut out = prefix.as_deref().unwrap_or("").as_bytes().to_vec();
                out.extend_from_slice(&line);
                if !out.ends_with(b"\n") {
                    out.push(b'\n');
                }
                let _ = if to_stderr { tokio::io::stderr().write_all(&out).await } else { tokio::io::stdout().write_all(&out).await };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn sh(label: &str, script: &str) -> ChildSpec {
        ChildSpec { label: label.into(), program: "sh".into(), args: vec!["-c".into(), script.into()], env: vec![], prefix_output: true }
    }

    /// Running (a zombie waiting for a reaper counts as gone).
    fn alive(pid_file: &std::path::Path) -> bool {
        let pid = std::fs::read_to_string(pid_file).unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
        stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z') && !rest.is_empty())
    }

    #[test]
    fn all_succeed() {
        let o = run_group(vec![sh("a", "echo hi"), sh("b", "true")], Duration::from_secs(5)).unwrap();
        assert_eq!(o, Outcome { code: 0, failed: None, interrupted: false });
    }

    #[test]
    fn a_failure_stops_the_rest_and_their_children() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("grandchild.pid");
        // `b` starts a grandchild that ignores nothing and would outlive a naive teardown; `c`
        // ignores SIGTERM and must be killed after the grace period.
        let b = format!("sleep 300 & echo $! > {}; wait", pid.display());
        let start = Instant::now();
        let o = run_group(vec![sh("a", "sleep 0.5; exit 7"), sh("b", &b), sh("c", "trap '' TERM; sleep 300")], Duration::from_secs(1)).unwrap();
        assert_eq!(o.code, 7);
        assert_eq!(o.failed.as_deref(), Some("a"));
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
        std::thread::sleep(Duration::from_millis(200));
        assert!(!alive(&pid), "grandchild survived");
    }
}
