//! Tearing the group down from outside: a rank killed by someone else, SIGINT/SIGTERM sent to
//! the launcher, and the launcher itself killed. The ranks are `sh` scripts whose processes
//! (children, and grandchildren that left the process group with `setsid`) write their pids to
//! files; `/proc` then shows what is left. Once neurofm-launch has returned, nothing may be:
//! no process and no zombie.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Where the scripts write their pid files (`$DIR`). Dropping it SIGKILLs every process still
/// carrying its mark in the environment, so a failing test leaves nothing behind either.
struct Scratch {
    dir: tempfile::TempDir,
}

const MARK: &str = "TEARDOWN_TEST_DIR";

impl Scratch {
    fn new() -> Scratch {
        Scratch { dir: tempfile::tempdir().expect("tempdir") }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `neurofm-launch ARGS -- sh -c SCRIPT` in the background, two fake GPUs.
    fn launch(&self, args: &[&str], script: &str) -> Child {
        Command::new(env!("CARGO_BIN_EXE_neurofm-launch"))
            .args(args)
            .args(["--", "sh", "-c", script])
            .env("CUDA_VISIBLE_DEVICES", "4,5")
            .env_remove("SLURM_JOB_ID")
            .env("DIR", self.path())
            .env(MARK, self.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start neurofm-launch")
    }

    /// The pids in `names` (files under `$DIR`), once every one has been written.
    fn pids(&self, names: &[String]) -> Vec<(String, i32)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let read: Vec<Option<i32>> = names.iter().map(|n| std::fs::read_to_string(self.path().join(n)).ok().filter(|s| s.ends_with('\n')).and_then(|s| s.trim().parse().ok())).collect();
            if read.iter().all(Option::is_some) {
                return names.iter().cloned().zip(read.into_iter().flatten()).collect();
            }
            assert!(Instant::now() < deadline, "the scripts did not write all of {names:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mark = format!("{MARK}={}", self.path().display());
        let Ok(dir) = std::fs::read_dir("/proc") else { return };
        for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if environ.split(|&b| b == 0).any(|var| var == mark.as_bytes()) {
                // SAFETY: plain syscall on a process this test started (it carries the mark).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// The state letter of `pid` from /proc (R, S, Z, ...), or None if no such process exists.
fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn wait_within(launcher: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = launcher.try_wait().expect("wait for neurofm-launch") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = launcher.kill();
            let _ = launcher.wait();
            panic!("neurofm-launch did not return within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(launcher: &mut Child) -> String {
    use std::io::Read;
    let mut err = String::new();
    launcher.stderr.take().map(|mut e| e.read_to_string(&mut err));
    err
}

fn assert_all_gone(pids: &[(String, i32)]) {
    let left: Vec<String> = pids.iter().filter_map(|(name, pid)| state(*pid).map(|s| format!("{name} (pid {pid}, state {s})"))).collect();
    assert!(left.is_empty(), "still in /proc after neurofm-launch returned: {}", left.join(", "));
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: plain syscall on a process this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

#[test]
fn a_rank_killed_from_outside_takes_every_descendant_with_it() {
    let scratch = Scratch::new();
    // Each rank: a child in its process group, and a grandchild in a session of its own (out of
    // reach of the group's signals) with a child of its own.
    let script = r#"
        echo $$ > "$DIR/rank-$RANK"
        setsid sh -c 'sleep 300 & echo $! > "$DIR/session-child-$RANK"; echo $$ > "$DIR/session-$RANK"; wait' &
        sleep 300 & echo $! > "$DIR/child-$RANK"
        wait"#;
    let mut launcher = scratch.launch(&["--nproc-per-node", "2", "--grace-s", "1"], script);
    let names: Vec<String> = ["rank", "child", "session", "session-child"].iter().flat_map(|n| (0..2).map(move |r| format!("{n}-{r}"))).collect();
    let pids = scratch.pids(&names);
    let start = Instant::now();
    signal(pids.iter().find(|(n, _)| n == "rank-1").expect("rank 1").1, libc::SIGKILL);
    let status = wait_within(&mut launcher, Duration::from_secs(20));
    assert_all_gone(&pids);
    let err = stderr_of(&mut launcher);
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "{err}");
    assert!(err.contains("rank 1 exited with code 137"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10), "teardown took {:?}", start.elapsed());
}

#[test]
fn a_group_that_succeeds_leaves_no_daemon_behind() {
    let scratch = Scratch::new();
    // The ranks exit 0 at once, but one started a daemon (new session, own output).
    let script = r#"
        if [ $RANK = 1 ]; then
            setsid sh -c 'echo $$ > "$DIR/daemon"; exec sleep 300' > /dev/null 2>&1 &
            while [ ! -s "$DIR/daemon" ]; do sleep 0.01; done
        fi
        echo $$ > "$DIR/rank-$RANK""#;
    let mut launcher = scratch.launch(&["--nproc-per-node", "2"], script);
    let status = wait_within(&mut launcher, Duration::from_secs(20));
    let pids = scratch.pids(&["rank-0".into(), "rank-1".into(), "daemon".into()]);
    assert_all_gone(&pids);
    assert!(status.success(), "{}", stderr_of(&mut launcher));
}

/// mpirun is installed by `make setup`; outside CI a machine without it skips that test.
fn have_mpirun() -> bool {
    let found = Command::new("mpirun").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found || std::env::var_os("CI").is_none(), "CI must have mpirun (apt openmpi-bin)");
    found
}

#[test]
fn what_mpirun_leaves_behind_is_killed_too() {
    if !have_mpirun() {
        return;
    }
    let scratch = Scratch::new();
    // CPU ranks are started by mpirun, not by the launcher; one leaves a daemon behind.
    let script = r#"
        R=$OMPI_COMM_WORLD_RANK
        if [ $R = 1 ]; then
            setsid sh -c 'echo $$ > "$DIR/daemon"; exec sleep 300' > /dev/null 2>&1 &
            while [ ! -s "$DIR/daemon" ]; do sleep 0.01; done
        fi
        echo $$ > "$DIR/rank-$R""#;
    let mut launcher = scratch.launch(&["--backend", "mpi", "--nproc-per-node", "2"], script);
    let status = wait_within(&mut launcher, Duration::from_secs(60));
    let pids = scratch.pids(&["rank-0".into(), "rank-1".into(), "daemon".into()]);
    assert_all_gone(&pids);
    assert!(status.success(), "{}", stderr_of(&mut launcher));
}

#[test]
fn sigint_and_sigterm_reach_the_ranks_and_end_restarts() {
    for (sig, name) in [(libc::SIGINT, "INT"), (libc::SIGTERM, "TERM")] {
        let scratch = Scratch::new();
        let script = r#"
            echo "$NEUROFM_RESTART_COUNT" >> "$DIR/attempts-$RANK"
            trap 'echo INT > "$DIR/got-$RANK"; exit 3' INT
            trap 'echo TERM > "$DIR/got-$RANK"; exit 3' TERM
            echo $$ > "$DIR/rank-$RANK"
            while :; do sleep 0.1; done"#;
        // A rank exiting 3 would be restarted, were it not for the interrupt.
        let mut launcher = scratch.launch(&["--nproc-per-node", "2", "--max-restarts", "2", "--grace-s", "10"], script);
        let pids = scratch.pids(&["rank-0".into(), "rank-1".into()]);
        signal(launcher.id() as i32, sig);
        let status = wait_within(&mut launcher, Duration::from_secs(20));
        assert_all_gone(&pids);
        let err = stderr_of(&mut launcher);
        assert_eq!(status.code(), Some(128 + sig), "{err}");
        for rank in 0..2 {
            assert_eq!(scratch.read(&format!("got-{rank}")).trim(), name, "rank {rank} did not get SIG{name}: {err}");
            assert_eq!(scratch.read(&format!("attempts-{rank}")), "0\n", "the group was restarted after SIG{name}: {err}");
        }
    }
}

#[test]
fn the_ranks_die_with_a_killed_launcher() {
    // Orphans come to this test process instead of init, so it can see them die and reap them.
    // SAFETY: prctl with integer arguments only.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let scratch = Scratch::new();
    let mut launcher = scratch.launch(&["--nproc-per-node", "2"], r#"echo $$ > "$DIR/rank-$RANK"; exec sleep 300"#);
    let pids = scratch.pids(&["rank-0".into(), "rank-1".into()]);
    signal(launcher.id() as i32, libc::SIGKILL);
    let _ = launcher.wait();
    for (name, pid) in &pids {
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid out-pointer, on an orphan reparented to us.
            if unsafe { libc::waitpid(*pid, &mut status, libc::WNOHANG) } == *pid {
                break status;
            }
            assert!(Instant::now() < deadline, "{name} (pid {pid}, state {:?}) outlived the killed launcher by 10 s", state(*pid));
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGTERM, "{name} ended with status {status:#x}, not by SIGTERM");
        assert_eq!(state(*pid), None);
    }
}
