//! `neurofm-launch` spawning ranks itself (the NCCL path), checked with shell commands so it
//! runs without GPUs: `CUDA_VISIBLE_DEVICES` stands in for the node's GPUs.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn launch(args: &[&str], script: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_neurofm-launch"))
        .args(args)
        .args(["--", "sh", "-c", script])
        .env("CUDA_VISIBLE_DEVICES", "4,5")
        .env_remove("SLURM_JOB_ID")
        .output()
        .expect("run neurofm-launch")
}

#[test]
fn each_rank_gets_the_contract_and_its_own_gpu() {
    let out = launch(&["--nproc-per-node", "2", "--master-port", "29999"], "echo rank=$RANK/$WORLD_SIZE local=$LOCAL_RANK/$LOCAL_WORLD_SIZE gpu=$CUDA_VISIBLE_DEVICES at=$MASTER_ADDR:$MASTER_PORT backend=$NEUROFM_BACKEND");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[rank 0] rank=0/2 local=0/2 gpu=4 at=127.0.0.1:29999 backend=nccl"), "{text}");
    assert!(text.contains("[rank 1] rank=1/2 local=1/2 gpu=5"), "{text}");
}

#[test]
fn nodes_offset_the_global_ranks() {
    let out = launch(&["--nproc-per-node", "2", "--nnodes", "3", "--node-rank", "2"], "echo rank=$RANK/$WORLD_SIZE");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[rank 4] rank=4/6") && text.contains("[rank 5] rank=5/6"), "{text}");
}

#[test]
fn a_failing_rank_stops_the_others_with_its_code() {
    let start = Instant::now();
    let out = launch(&["--nproc-per-node", "2", "--grace-s", "1"], "if [ $RANK = 1 ]; then sleep 0.3; exit 9; fi; trap '' TERM; sleep 300");
    assert_eq!(out.status.code(), Some(9));
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rank 1 exited with code 9") && err.contains("grace period over"), "{err}");
}

#[test]
fn max_restarts_reruns_the_group() {
    let script = r#"if [ "$NEUROFM_RESTART_COUNT" = 0 ] && [ $RANK = 0 ]; then exit 5; fi; echo attempt $NEUROFM_RESTART_COUNT ok"#;
    let out = launch(&["--nproc-per-node", "2", "--max-restarts", "1", "--grace-s", "1"], script);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("[rank 0] attempt 1 ok"));
    // Without restarts the failure is final.
    assert_eq!(launch(&["--nproc-per-node", "2", "--grace-s", "1"], script).status.code(), Some(5));
}

#[test]
fn impossible_requests_exit_2_with_the_fix() {
    let out = launch(&["--nproc-per-node", "3", "--backend", "nccl"], "true");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("3 NCCL ranks need 3 GPUs but 2 are visible"));
    let out = launch(&["--nnodes", "2", "--node-rank", "2"], "true");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_command_that_cannot_start_is_a_runtime_failure() {
    let out = Command::new(env!("CARGO_BIN_EXE_neurofm-launch"))
        .args(["--nproc-per-node", "2", "--", "/nonexistent/neurofm-train", "--config", "x.toml"])
        .env("CUDA_VISIBLE_DEVICES", "4,5")
        .env_remove("SLURM_JOB_ID")
        .output()
        .expect("run neurofm-launch");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot start /nonexistent/neurofm-train (rank 0)"), "{err}");
}
