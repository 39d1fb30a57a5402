//! Runs a group of processes as one unit: output prefixed per process, signals forwarded, and
//! when one fails the rest are stopped (SIGTERM, then SIGKILL after a grace period).
//!
//! No process of the group outlives [`run_group`], not even as a zombie:
//! * each child leads its own process group, so signals reach what it starts;
//! * the supervisor is a child subreaper (`PR_SET_CHILD_SUBREAPER`): a descendant whose parent
//!   dies is reparented to it, not to init, even one that left the process group (`setsid`,
//!   daemons, what `mpirun` leaves behind);
//! * it reaps every child itself (`waitpid`), and once the ranks are gone it kills and reaps
//!   every descendant left, layer by layer, before returning;
//! * if the supervisor itself dies, the kernel sends each child SIGTERM (`PR_SET_PDEATHSIG`).
//!
//! Since it reaps with `waitpid(-1)`, `run_group` owns every child of the calling process while
//! it runs: call it from a process that starts nothing else meanwhile, such as neurofm-launch.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

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

/// Runs `children` until all exit; on the first failure or signal, stops the others. Returns
/// once every descendant is gone (killed if need be) and reaped.
pub fn run_group(children: Vec<ChildSpec>, grace: Duration) -> Result<Outcome> {
    become_subreaper()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| LaunchError::io("starting the supervisor's runtime", e))?;
    let mut group = Group::default();
    let outcome = rt.block_on(supervise(&mut group, &children, grace));
    group.sweep();
    group.finish_output();
    outcome
}

fn become_subreaper() -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(LaunchError::io("becoming the child subreaper of the group (prctl)", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The processes started so far: pid (= process group id) to index in the specs, and the
/// threads copying their output (each says on `pumped` when its pipe is at its end).
struct Group {
    running: HashMap<i32, usize>,
    leaders: Vec<i32>,
    pumps: usize,
    pumped: (mpsc::Sender<()>, mpsc::Receiver<()>),
}

impl Default for Group {
    fn default() -> Group {
        Group { running: HashMap::new(), leaders: Vec::new(), pumps: 0, pumped: mpsc::channel() }
    }
}

impl Group {
    fn spawn(&mut self, index: usize, spec: &ChildSpec) -> std::io::Result<()> {
        let mut cmd = std::process::Command::new(&spec.program);
        cmd.args(&spec.args).envs(spec.env.iter().map(|(k, v)| (k, v))).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let supervisor = std::process::id() as i32;
        // SAFETY: prctl and getppid are async-signal-safe, and nothing here allocates. The
        // death signal is tied to the thread that forks, which lives until the group is gone.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The supervisor died between fork and prctl: no signal will come, so stop.
                if libc::getppid() != supervisor {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        // Reaped by `reap`, never through `child` (dropping a std Child does not wait).
        let pid = child.id() as i32;
        self.running.insert(pid, index);
        self.leaders.push(pid);
        let prefix = spec.prefix_output.then(|| format!("[{}] ", spec.label));
        if let Some(out) = child.stdout.take() {
            pump(out, prefix.clone(), false, self.pumped.0.clone());
            self.pumps += 1;
        }
        if let Some(err) = child.stderr.take() {
            pump(err, prefix, true, self.pumped.0.clone());
            self.pumps += 1;
        }
        Ok(())
    }

    /// Waits for the last output lines. After the sweep every writer is dead and each pipe at
    /// its end, unless a descendant handed its end to a process outside the group: such a pipe
    /// is given 2 s, then left to its thread.
    fn finish_output(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.pumps > 0 && self.pumped.1.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok() {
            self.pumps -= 1;
        }
    }

    fn live_groups(&self) -> Vec<i32> {
        self.running.keys().copied().collect()
    }

    /// Kills the ranks' process groups, then every process left below the supervisor (each
    /// kill reparents the victim's own children to it), reaping all, until it has no child.
    fn sweep(&mut self) {
        signal_groups(&self.leaders, libc::SIGKILL);
        let started = Instant::now();
        let mut warned = false;
        loop {
            for pid in children_of(std::process::id() as i32) {
                // SAFETY: plain syscall. `pid` is our child and not yet reaped, so it cannot
                // have been reused by another process.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            if reap(|_, _| {}) == Reaped::NoChildLeft {
                self.running.clear();
                return;
            }
            if !warned && started.elapsed() > Duration::from_secs(10) {
                eprintln!("neurofm-launch: still waiting for killed processes to die: pids {:?} (uninterruptible I/O?)", children_of(std::process::id() as i32));
                warned = true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

async fn supervise(group: &mut Group, children: &[ChildSpec], grace: Duration) -> Result<Outcome> {
    // Listening before the first spawn, so no exit goes unnoticed.
    let mut sigchld = signal(SignalKind::child()).map_err(|e| LaunchError::io("installing the SIGCHLD handler", e))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| LaunchError::io("installing the SIGINT handler", e))?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| LaunchError::io("installing the SIGTERM handler", e))?;
    for (i, spec) in children.iter().enumerate() {
        group.spawn(i, spec).map_err(|e| LaunchError::io(format!("cannot start {} ({})", spec.program.to_string_lossy(), spec.label), e))?;
    }

    let mut outcome: Option<Outcome> = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    while !group.running.is_empty() {
        tokio::select! {
            _ = sigchld.recv() => {
                let mut exited = Vec::new();
                reap(|pid, code| exited.push((pid, code)));
                for (pid, code) in exited {
                    // Not a rank: a descendant reparented to us, now reaped.
                    let Some(i) = group.running.remove(&pid) else { continue };
                    if code != 0 && outcome.is_none() {
                        eprintln!("neurofm-launch: {} exited with code {code}; stopping the others (SIGTERM, SIGKILL after {:.0} s)", children[i].label, grace.as_secs_f64());
                        outcome = Some(Outcome { code, failed: Some(children[i].label.clone()), interrupted: false });
                        signal_groups(&group.live_groups(), libc::SIGTERM);
                        kill_at = Some(tokio::time::Instant::now() + grace);
                    }
                }
            }
            _ = sigint.recv() => forward(&mut outcome, &mut kill_at, &group.live_groups(), libc::SIGINT, grace),
            _ = sigterm.recv() => forward(&mut outcome, &mut kill_at, &group.live_groups(), libc::SIGTERM, grace),
            _ = sleep_until(kill_at), if kill_at.is_some() => {
                eprintln!("neurofm-launch: grace period over; killing the remaining processes");
                signal_groups(&group.live_groups(), libc::SIGKILL);
                kill_at = None;
            }
        }
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

#[derive(Debug, PartialEq, Eq)]
enum Reaped {
    /// Children remain, none of them exited yet.
    SomeRunning,
    NoChildLeft,
}

/// Reaps every child of this process that has exited, passing `(pid, exit code)` to `exited`
/// (128 + signal for a killed one).
fn reap(mut exited: impl FnMut(i32, i32)) -> Reaped {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        match pid {
            0 => return Reaped::SomeRunning,
            -1 if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => continue,
            -1 => return Reaped::NoChildLeft, // ECHILD
            pid => exited(pid, exit_code(status)),
        }
    }
}

fn exit_code(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// The processes whose parent is `parent`, zombies included, from `/proc/PID/stat`.
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which is in parentheses and may contain anything:
        // state, ppid, ...
        let ppid: i32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == parent).then_some(pid)
    })
    .collect()
}

/// Copies a child's output line by line, with an optional prefix, on its own thread; says on
/// `done` when the pipe is at its end.
fn pump(from: impl Read + Send + 'static, prefix: Option<String>, to_stderr: bool, done: mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let mut lines = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match lines.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => {
                    let _ = done.send(());
                    return;
                }
                Ok(_) => {
                    let mut out = prefix.as_deref().unwrap_or("").as_bytes().to_vec();
                    out.extend_from_slice(&line);
                    if !out.ends_with(b"\n") {
                        out.push(b'\n');
                    }
                    let _ = if to_stderr { std::io::stderr().lock().write_all(&out) } else { std::io::stdout().lock().write_all(&out) };
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// `run_group` reaps every child of the process, so tests that run groups take turns.
    static ONE_GROUP_AT_A_TIME: Mutex<()> = Mutex::new(());

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
        let _turn = ONE_GROUP_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let o = run_group(vec![sh("a", "echo hi"), sh("b", "true")], Duration::from_secs(5)).unwrap();
        assert_eq!(o, Outcome { code: 0, failed: None, interrupted: false });
    }

    #[test]
    fn a_failure_stops_the_rest_and_their_children() {
        let _turn = ONE_GROUP_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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
