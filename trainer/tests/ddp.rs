//! Data-parallel training end to end: 2 CPU ranks under mpirun (through neurofm-launch), their
//! equivalence with one rank at twice the batch, resume across world sizes, a crashing rank,
//! restarts, and a rank that never arrives.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;
use common::{panel_store, synth_store, weights};

/// Dropout off, so one rank with batch 16 and two with batch 8 compute the same steps; two
/// thinned views and the cell bottleneck (whose loss is averaged over the global number of
/// gene positions, so it is exact across ranks; the contrastive term's negatives are per rank,
/// so it is left out). 320 training cells in steps of 32: an epoch is 10 steps. The global
/// read plan keeps the epoch order independent of the world size.
const TINY: &str = r#"
seed = 5
[data]
workers = 2
read_plan = "global"
[tokenizer]
n_bins = 8
[views]
count = 2
thin_min = 0.5
[objectives]
bottleneck = 1.0
[model]
d_model = 16
n_heads = 2
n_layers = 2
d_ff = 32
dropout = 0.0
attention_dropout = 0.0
[optim]
lr = 3e-3
warmup_steps = 2
[train]
batch_size = 8
grad_accum = 2
max_steps = 14
log_every = 1
val_every = 4
checkpoint_every = 2
keep_last = 8
threads = 1
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: PathBuf,
    config: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let store = synth_store(&root, "cells", 400, 60);
        let config = root.join("tiny.toml");
        std::fs::write(&config, TINY).expect("config");
        Fixture { _dir: dir, root, store, config }
    })
}

/// mpirun is installed by `make setup`; outside CI a machine without it skips these tests.
fn have_mpirun() -> bool {
    let found = Command::new("mpirun").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found || std::env::var_os("CI").is_none(), "CI must have mpirun (apt openmpi-bin)");
    found
}

fn train_args(run: &Path, extra: &[&str]) -> Vec<String> {
    let f = fixture();
    let mut a: Vec<String> = ["--config", &f.config.display().to_string(), "--run-dir", &run.display().to_string(), "--device", "cpu", "--no-progress"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if !extra.contains(&"--data") {
        a.extend(["--data".to_string(), f.store.display().to_string()]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `neurofm-launch [launch_args] -- neurofm-train ...` with extra environment.
fn launch(launch_args: &[&str], run: &Path, train_extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(launcher_bin());
    cmd.args(launch_args).arg("--").arg(env!("CARGO_BIN_EXE_neurofm-train")).args(train_args(run, train_extra));
    cmd.env_remove("NEUROFM_FAULT").envs(env.iter().copied());
    cmd.output().expect("run neurofm-launch")
}

/// neurofm-launch beside neurofm-train (another crate's binary: `make test` builds every
/// workspace binary before the tests).
fn launcher_bin() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_neurofm-train")).with_file_name("neurofm-launch");
    assert!(exe.is_file(), "{} is missing: run `cargo build --workspace --bins` first", exe.display());
    exe
}

fn single(run: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_neurofm-train")).args(train_args(run, extra)).output().expect("run neurofm-train")
}

fn ok(what: &str, out: &Output) {
    assert!(out.status.success(), "{what} failed ({:?}):\n{}{}", out.status.code(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// (step, split, loss) of every metrics row.
fn losses(run: &Path) -> Vec<(u64, String, f64)> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).expect("metrics.csv");
    text.lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (c[0].parse().unwrap(), c[2].to_string(), c[3].parse().unwrap())
        })
        .collect()
}

fn assert_same_curve(a: &Path, b: &Path) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), lb.len(), "{la:?}\nvs\n{lb:?}");
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!((x.0, &x.1), (y.0, &y.1));
        assert!((x.2 - y.2).abs() < 1e-5, "step {} {}: loss {} vs {}", x.0, x.1, x.2, y.2);
    }
}

fn assert_same_weights(a: &Path, b: &Path) {
    let (wa, wb) = (weights(&a.join("checkpoints/last")), weights(&b.join("checkpoints/last")));
    assert_eq!(wa.len(), wb.len());
    for ((na, ta), (nb, tb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        let diff = (ta - tb).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{na} differs by {diff}");
    }
}

/// neurofm-train processes still running with `needle` in their command line.
fn leftovers(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z'));
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !zombie && text.contains("neurofm-train") && text.contains(needle) {
            found.push(text);
        }
    }
    found
}

/// The ranks start from different weights (only rank 0's broadcast makes them equal), reduce
/// their gradients in several buckets, and cross an epoch boundary: still the steps of one
/// rank with the whole batch.
#[test]
fn two_mpi_ranks_equal_one_rank_with_twice_the_batch() {
    if !have_mpirun() {
        return;
    }
    let root = &fixture().root;
    let (one, two) = (root.join("one-rank"), root.join("two-ranks"));
    ok("1 rank", &single(&one, &["--set", "train.batch_size=16"]));
    let out = launch(&["--backend", "mpi", "--nproc-per-node", "2"], &two, &["--set", "train.bucket_mb=0.02"], &[("NEUROFM_TEST_INIT", "per-rank")]);
    ok("2 ranks", &out);
    assert_same_curve(&one, &two);
    assert_same_weights(&one, &two);
    // Every checkpoint verified that both ranks hold bit-identical parameters.
    let log = std::fs::read_to_string(two.join("train.log")).unwrap();
    assert_eq!(log.matches("parameters identical on all 2 ranks").count(), 7, "{log}");
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(two.join("throughput.json")).unwrap()).unwrap();
    assert_eq!(t["world_size"], 2);
    let floats: u64 = weights(&two.join("checkpoints/last")).iter().map(|(_, w)| w.numel() as u64).sum();
    assert_eq!(t["allreduce"]["bytes_per_step"], floats * 4, "every f32 parameter's gradient, once");
    let buckets = t["allreduce"]["buckets"].as_u64().unwrap();
    assert_eq!(buckets, (floats * 4).div_ceil((0.02 * (1 << 20) as f64) as u64), "slices of 0.02 MiB");
    assert!(buckets > 1);
}

/// Without the broadcast, ranks that started apart stay apart, and the check before each
/// checkpoint refuses to save.
#[test]
fn ranks_out_of_sync_refuse_to_checkpoint() {
    if !have_mpirun() {
        return;
    }
    let run = fixture().root.join("out-of-sync");
    let out = launch(&["--backend", "mpi", "--nproc-per-node", "2", "--grace-s", "5"], &run, &[], &[("NEUROFM_TEST_INIT", "per-rank"), ("NEUROFM_TEST_SKIP_BROADCAST", "1")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("parameters differ across ranks") && err.contains("rank 0:") && err.contains("rank 1:"), "{err}");
    assert!(!run.join("checkpoints/last").exists(), "nothing was saved");
}

/// Gradient accumulation: two micro-batches of 8 are one step of 16.
#[test]
fn accumulating_two_micro_batches_equals_one_twice_as_large() {
    let root = &fixture().root;
    let (accumulated, whole) = (root.join("accum-2x8"), root.join("accum-1x16"));
    ok("8 × 2", &single(&accumulated, &["--set", "train.batch_size=8"]));
    ok("16 × 1", &single(&whole, &["--set", "train.batch_size=16", "--set", "train.grad_accum=1"]));
    assert_same_curve(&accumulated, &whole);
    assert_same_weights(&accumulated, &whole);
}

#[test]
fn a_run_resumes_with_another_world_size() {
    if !have_mpirun() {
        return;
    }
    let root = &fixture().root;
    let (straight, switched) = (root.join("straight-16"), root.join("two-then-one"));
    ok("1 rank", &single(&straight, &["--set", "train.batch_size=16"]));
    ok("2 ranks to step 4", &launch(&["--backend", "mpi", "--nproc-per-node", "2"], &switched, &["--stop-at-step", "4"], &[]));
    // Same global batch (1 × 16 = 2 × 8): the run continues exactly.
    ok("1 rank from step 4", &single(&switched, &["--resume", "auto", "--set", "train.batch_size=16"]));
    assert_same_curve(&straight, &switched);
    assert_same_weights(&straight, &switched);
}

#[test]
fn a_crashing_rank_stops_the_group_with_its_exit_code() {
    if !have_mpirun() {
        return;
    }
    let run = fixture().root.join("crash");
    let start = Instant::now();
    let out = launch(&["--backend", "mpi", "--nproc-per-node", "2", "--grace-s", "5"], &run, &[], &[("NEUROFM_FAULT", "rank=1,step=3,exit=7")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(start.elapsed() < Duration::from_secs(60), "took {:?}", start.elapsed());
    assert!(leftovers(&run.display().to_string()).is_empty(), "processes left: {:?}", leftovers(&run.display().to_string()));
    // The checkpoint of step 2 survived for a restart.
    assert!(run.join("checkpoints/step-0000002/state.json").is_file());
}

#[test]
fn max_restarts_recovers_from_a_crash_and_finishes() {
    if !have_mpirun() {
        return;
    }
    let root = &fixture().root;
    let (clean, run) = (root.join("restart-reference"), root.join("restarted"));
    ok("reference", &launch(&["--backend", "mpi", "--nproc-per-node", "2"], &clean, &[], &[]));
    let out = launch(&["--backend", "mpi", "--nproc-per-node", "2", "--max-restarts", "1", "--grace-s", "5"], &run, &[], &[("NEUROFM_FAULT", "rank=1,step=3,exit=7")]);
    ok("restarted group", &out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("restarting the group (1 of 1)"), "{err}");
    // Resumed from step 2 (the newest checkpoint) and ended where an uninterrupted run ends.
    assert!(std::fs::read_to_string(run.join("train.log")).unwrap().contains("at step 2"));
    assert_same_curve(&clean, &run);
    assert_same_weights(&clean, &run);
}

#[test]
fn a_rank_that_never_arrives_is_named_within_the_deadline() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let run = fixture().root.join("lonely");
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_neurofm-train"))
        .args(train_args(&run, &["--backend", "nccl"]))
        .envs([("RANK", "0"), ("WORLD_SIZE", "3"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port), ("NEUROFM_RENDEZVOUS_TIMEOUT", "2"), ("NEUROFM_RENDEZVOUS_TOKEN", "a-token-for-this-test")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("rank(s) 1, 2 of 3 did not join the rendezvous"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn every_rank_stops_together_when_the_loss_diverges() {
    if !have_mpirun() {
        return;
    }
    let run = fixture().root.join("diverge");
    let blow_up = ["--set", "optim.lr=1e30", "--set", "optim.warmup_steps=0", "--set", "optim.clip_norm=0"];
    let out = launch(&["--backend", "mpi", "--nproc-per-node", "2", "--grace-s", "5"], &run, &blow_up, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    // Both ranks saw the same reduced loss and refused the same step.
    assert_eq!(err.matches("ERROR neurofm_train: the training loss became NaN at step 2").count(), 2, "{err}");
}

/// The default local read plan: each of W ranks decodes about 1/W of the store (read
/// amplification ≤ 1.25 at 2 and 4 ranks, where the global plan's is ≈ W), and a run is
/// reproducible for its (seed, world size).
#[test]
fn local_read_plans_decode_a_ranks_share_and_reproduce() {
    if !have_mpirun() {
        return;
    }
    let root = &fixture().root;
    let store = panel_store(root, "small-chunks", 3000, 60, 0..60, 3, 1024).display().to_string();
    let amplification = |run: &Path| -> f64 {
        let t: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("throughput.json")).unwrap()).unwrap();
        t["read_amplification"]["max"].as_f64().expect("read_amplification in throughput.json")
    };
    let local = [
        "--data", &store, "--set", "data.read_plan=\"local\"", "--set", "train.max_steps=6", "--set", "train.grad_accum=1",
        "--set", "split.val_fraction=0.02", "--set", "tokenizer.max_fit_cells=300",
    ];
    // Start-up (a 300-cell tokenizer fit, 60 validation cells) decodes a part of the store,
    // whole chunks at a time: more than nothing, far less than all of it.
    let startup_share = |run: &Path| -> Vec<f64> {
        let t: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("throughput.json")).unwrap()).unwrap();
        t["startup_read_share_per_rank"].as_array().expect("startup_read_share_per_rank").iter().filter_map(|x| x.as_f64()).collect()
    };
    for world in ["2", "4"] {
        let run = root.join(format!("local-{world}"));
        ok(&format!("{world} ranks, local"), &launch(&["--backend", "mpi", "--nproc-per-node", world], &run, &local, &[]));
        let a = amplification(&run);
        assert!(a <= 1.25, "{world} ranks: read amplification {a:.3}");
        let shares = startup_share(&run);
        eprintln!("start-up read shares at {world} ranks: {shares:?}");
        assert!(shares.len() == world.parse::<usize>().unwrap() && shares.iter().all(|&x| x > 0.05 && x < 0.6), "start-up read shares {shares:?}");
        if world == "2" {
            let again = root.join("local-2-again");
            ok("2 ranks, local, again", &launch(&["--backend", "mpi", "--nproc-per-node", "2"], &again, &local, &[]));
            assert_same_curve(&run, &again);
            let global = root.join("global-2");
            let mut g = local.to_vec();
            g[3] = "data.read_plan=\"global\"";
            ok("2 ranks, global", &launch(&["--backend", "mpi", "--nproc-per-node", "2"], &global, &g, &[]));
            assert!(amplification(&global) > 1.6, "the global plan decodes every chunk on every rank: {}", amplification(&global));
        }
    }
}
