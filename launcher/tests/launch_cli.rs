//! `neurofm-launch` spawning ranks itself (the NCCL path), checked with shell commands so it
//! runs without GPUs: `CUDA_VISIBLE_DEVICES` stands in for the node's GPUs.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

const TOKEN_VAR: &str = "NEUROFM_RENDEZVOUS_TOKEN";

fn launch(args: &[&str], script: &str) -> Output {
    launch_with(args, script, &[])
}

/// `neurofm-launch ARGS -- sh -c SCRIPT` with extra environment (and none of the caller's
/// token or SLURM job).
fn launch_with(args: &[&str], script: &str, env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_neurofm-launch"))
        .args(args)
        .args(["--", "sh", "-c", script])
        .env("CUDA_VISIBLE_DEVICES", "4,5")
        .env_remove("SLURM_JOB_ID")
        .env_remove(TOKEN_VAR)
        .envs(env.iter().copied())
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
    let token = [(TOKEN_VAR, "a-token-shared-by-all-nodes")];
    let out = launch_with(&["--nproc-per-node", "2", "--nnodes", "3", "--node-rank", "2"], "echo rank=$RANK/$WORLD_SIZE", &token);
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
fn ranks_of_one_node_share_a_fresh_token_and_nodes_need_the_users() {
    let tokens = |out: &Output| -> Vec<String> {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut t: Vec<String> = text.lines().filter_map(|l| l.split_once("token=")).map(|(_, t)| t.to_string()).collect();
        t.sort();
        t
    };
    let script = "echo token=$NEUROFM_RENDEZVOUS_TOKEN";
    let first = tokens(&launch(&["--nproc-per-node", "2"], script));
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(first[0], first[1], "the ranks of a group got different tokens");
    assert!(first[0].len() == 32 && first[0].bytes().all(|b| b.is_ascii_hexdigit()), "{first:?}");
    assert_ne!(tokens(&launch(&["--nproc-per-node", "2"], script))[0], first[0], "two groups got the same token");
    // The user's token is passed on unchanged (every node's launcher must hand out the same).
    let given = tokens(&launch_with(&["--nproc-per-node", "2"], script, &[(TOKEN_VAR, "the-users-own-token")]));
    assert_eq!(given, ["the-users-own-token", "the-users-own-token"]);
    // Several nodes without one: refused before anything starts, naming the fix.
    let out = launch(&["--nproc-per-node", "2", "--nnodes", "2"], script);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NEUROFM_RENDEZVOUS_TOKEN is not set") && err.contains("/dev/urandom"), "{err}");
    assert!(tokens(&out).is_empty());
    let out = launch_with(&["--nproc-per-node", "2"], script, &[(TOKEN_VAR, "short")]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
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
