//! `neurofm-train` end to end on generated data: exact resume, bad input, faults, events.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

mod common;
use common::{panel_store, synth_store, weights};

/// A tiny model that still exercises dropout, clipping, warmup, accumulation, thinned views
/// and every objective. 320 training cells in steps of 32: an epoch is 10 steps.
const TINY: &str = r#"
seed = 5
[data]
workers = 2
[tokenizer]
n_bins = 8
[views]
count = 2
thin_min = 0.5
gene_scale = 0.3
[objectives]
bottleneck = 0.5
contrastive = 0.5
decorrelation = 1.0
[model]
d_model = 16
n_heads = 2
n_layers = 2
d_ff = 32
dropout = 0.1
[optim]
lr = 3e-3
warmup_steps = 2
[train]
batch_size = 16
grad_accum = 2
max_steps = 14
log_every = 1
val_every = 4
keep_last = 2
threads = 1
"#;

/// Generated stores, shared by the tests of this file (built once).
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: PathBuf,
    /// Same cells, fewer genes: a different gene panel.
    narrow_store: PathBuf,
    /// 2000 cells whose marker genes reveal one of 3 hidden types: context helps.
    structured_store: PathBuf,
    config: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let store = synth_store(&root, "cells", 400, 60);
        let narrow_store = synth_store(&root, "narrow", 400, 50);
        let structured_store = synth_store(&root, "structured", 2000, 60);
        let config = root.join("tiny.toml");
        std::fs::write(&config, TINY).expect("config");
        Fixture { _dir: dir, root, store, narrow_store, structured_store, config }
    })
}

fn train(run: &Path, extra: &[&str]) -> Output {
    let f = fixture();
    let mut args: Vec<String> = vec!["--config".into(), f.config.display().to_string(), "--run-dir".into(), run.display().to_string()];
    // Defaults unless the test passes its own.
    for (flag, value) in [("--data", f.store.display().to_string()), ("--device", "cpu".to_string())] {
        if !extra.contains(&flag) {
            args.extend([flag.to_string(), value]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_neurofm-train")).args(&args).output().expect("run neurofm-train")
}

fn ok(out: &Output) {
    assert!(out.status.success(), "neurofm-train failed ({:?}):\n{}", out.status.code(), String::from_utf8_lossy(&out.stderr));
}

fn fails_with(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in:\n{err}");
}

/// (step, split, loss) of every metrics row.
fn losses(run: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).expect("metrics.csv");
    text.lines().skip(1).map(|l| {
        let c: Vec<&str> = l.split(',').collect();
        (c[0].to_string(), c[2].to_string(), c[3].to_string())
    }).collect()
}

/// Stopped exactly at the end of the first epoch and resumed, a run continues into the second
/// epoch bit for bit, every objective and thinned view included.
#[test]
fn stopping_and_resuming_reproduces_an_uninterrupted_run() {
    let root = &fixture().root;
    let straight = root.join("straight");
    ok(&train(&straight, &[]));
    let log = std::fs::read_to_string(straight.join("train.log")).unwrap();
    let per_epoch: u64 = log.split(" steps per epoch").next().and_then(|h| h.rsplit(' ').next()?.parse().ok()).expect("steps per epoch in train.log");
    assert!((4..14).contains(&per_epoch), "the run must cross an epoch boundary: {per_epoch} steps per epoch");
    let split = root.join("split");
    ok(&train(&split, &["--stop-at-step", &per_epoch.to_string()]));
    assert_eq!(losses(&split).len() as u64, per_epoch + per_epoch / 4, "train rows and validations (every 4 steps) before stopping");
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(split.join("checkpoints/last/state.json")).unwrap()).unwrap();
    assert_eq!((state["position"]["epoch"].as_u64(), state["position"]["batch"].as_u64()), (Some(1), Some(0)), "the epoch rolled over: {state}");
    ok(&train(&split, &["--resume", "auto"]));

    let (a, b) = (losses(&straight), losses(&split));
    assert_eq!(a.len(), 18, "14 train rows and validations at steps 4, 8, 12, 14");
    assert_eq!(a, b, "loss curves differ");
    let (wa, wb) = (weights(&straight.join("checkpoints/last")), weights(&split.join("checkpoints/last")));
    assert_eq!(wa.len(), wb.len());
    for ((na, ta), (nb, tb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "final weights differ in {na}");
    }
    // Training changed the weights, and the loss went down.
    let first: f64 = a[0].2.parse().unwrap();
    let last: f64 = a.iter().rev().find(|r| r.1 == "train").unwrap().2.parse().unwrap();
    assert!(last < first, "loss did not decrease: {first} → {last}");
    // Kept: the last 2 step checkpoints and best; the resolved config says what ran.
    let ckpts = straight.join("checkpoints");
    let mut steps: Vec<String> = std::fs::read_dir(&ckpts).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with("step-")).collect();
    steps.sort();
    let best = std::fs::read_link(ckpts.join("best")).unwrap().display().to_string();
    assert_eq!(std::fs::read_link(ckpts.join("last")).unwrap().display().to_string(), "step-0000014");
    assert!(steps.ends_with(&["step-0000012".to_string(), "step-0000014".to_string()]) && steps.contains(&best) && steps.len() <= 3, "{steps:?}, best {best}");
    let cfg = std::fs::read_to_string(straight.join("config.toml")).unwrap();
    assert!(cfg.contains("grad_accum = 2") && cfg.contains("attention_dropout = 0.0"), "{cfg}");
    assert!(std::fs::read_to_string(straight.join("demo.tsv")).unwrap().lines().count() > 1);
    // Each cell-level term is logged on its own, and the decorrelation term is trained down.
    use trainer::metrics::Column;
    let rows = trainer::metrics::read(&straight.join("metrics.csv")).unwrap();
    let train: Vec<_> = rows.iter().filter(|r| r.split == "train").collect();
    for c in [Column::BottleneckLoss, Column::ContrastiveLoss, Column::DecorrelationLoss] {
        assert!(train.iter().all(|r| r.get(c).is_some_and(|v| v > 0.0)), "{} missing or 0", c.name());
    }
    let decor: Vec<f64> = train.iter().filter_map(|r| r.get(Column::DecorrelationLoss)).collect();
    assert!(decor[decor.len() - 1] < decor[0], "decorrelation {decor:?}");
}

/// Two stores with partly overlapping panels train as one corpus: the union vocabulary is the
/// run's, each store's overlap is recorded, and the run resumes exactly.
#[test]
fn a_two_store_run_resumes_exactly_with_the_union_vocabulary() {
    let root = &fixture().root;
    let a = panel_store(root, "panel-a", 300, 60, 0..45, 21, 1 << 20).display().to_string();
    let b = panel_store(root, "panel-b", 300, 60, 15..60, 22, 1 << 20).display().to_string();
    let data = ["--data", a.as_str(), "--data", b.as_str(), "--set", "train.max_steps=10"];
    let (straight, split) = (root.join("corpus-straight"), root.join("corpus-split"));
    ok(&train(&straight, &data));
    ok(&train(&split, &[&data[..], &["--stop-at-step", "5"]].concat()));
    ok(&train(&split, &[&data[..], &["--resume", "auto"]].concat()));
    assert_eq!(losses(&straight), losses(&split), "loss curves differ");
    for ((na, ta), (_, tb)) in weights(&straight.join("checkpoints/last")).iter().zip(&weights(&split.join("checkpoints/last"))) {
        assert!(ta.equal(tb), "final weights differ in {na}");
    }
    let tok: serde_json::Value = serde_json::from_slice(&std::fs::read(straight.join("tokenizer.json")).unwrap()).unwrap();
    let genes: Vec<String> = serde_json::from_value(tok["genes"].clone()).unwrap();
    assert_eq!(genes, (0..60).map(|g| format!("gene_{g}")).collect::<Vec<_>>(), "a's genes, then b's new ones");
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(straight.join("corpus.json")).unwrap()).unwrap();
    let missing: Vec<u64> = record["stores"].as_array().unwrap().iter().map(|s| s["overlap"]["missing"].as_u64().unwrap()).collect();
    assert_eq!(missing, vec![15, 15]);
    // Resuming on one of the two stores is refused.
    fails_with(&train(&split, &["--data", a.as_str(), "--resume", "auto", "--set", "train.max_steps=12"]), 2, "this resume passes 1");
}

#[test]
fn an_existing_run_needs_resume_or_force() {
    let run = fixture().root.join("exists");
    ok(&train(&run, &["--set", "train.max_steps=2"]));
    fails_with(&train(&run, &["--set", "train.max_steps=2"]), 2, "--resume auto");
    ok(&train(&run, &["--set", "train.max_steps=2", "--force"]));
}

#[test]
fn resuming_with_another_model_tokenizer_or_gene_panel_is_refused() {
    let f = fixture();
    let run = f.root.join("mismatch");
    ok(&train(&run, &["--set", "train.max_steps=2"]));
    fails_with(&train(&run, &["--resume", "auto", "--set", "model.d_model=32"]), 2, "different model shape");
    fails_with(&train(&run, &["--resume", "auto", "--set", "tokenizer.n_bins=10"]), 2, "tokenizer.n_bins");
    let narrow = f.narrow_store.display().to_string();
    fails_with(&train(&run, &["--resume", "auto", "--data", &narrow]), 2, "gene panel differs");
    let ckpt = run.join("checkpoints/last");
    assert!(ckpt.join("model.safetensors").exists(), "refusals must not touch the run");
}

#[test]
fn bad_configs_and_stores_exit_2_naming_the_problem() {
    let f = fixture();
    let run = |name: &str| f.root.join(name);
    fails_with(&train(&run("k"), &["--set", "model.widht=3"]), 2, "widht");
    fails_with(&train(&run("h"), &["--set", "model.n_heads=3"]), 2, "model.n_heads");
    fails_with(&train(&run("t"), &["--set", "optim.lr=\"fast\""]), 2, "lr");
    if !tch::Cuda::is_available() {
        fails_with(&train(&run("d"), &["--device", "cuda:0"]), 2, "--device cpu");
    }
    // A store whose conversion did not finish.
    let partial = f.root.join("partial.zarr");
    let _ = std::fs::remove_dir_all(&partial);
    copy_dir(&f.store, &partial);
    std::fs::remove_dir_all(partial.join("uns/neurofm")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_neurofm-train"))
        .args(["--config", &f.config.display().to_string(), "--data", &partial.display().to_string(), "--run-dir", &run("p").display().to_string()])
        .output()
        .unwrap();
    fails_with(&out, 2, "incomplete");
}

#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let run = fixture().root.join("nan");
    ok(&train(&run, &["--set", "train.max_steps=4", "--set", "train.val_every=2"]));
    let before = weights(&run.join("checkpoints/last"));
    // Continue with an absurd learning rate: weights blow up and the loss turns non-finite.
    let out = train(&run, &["--resume", "auto", "--set", "train.max_steps=12", "--set", "optim.lr=1e30", "--set", "optim.warmup_steps=0", "--set", "optim.clip_norm=0"]);
    fails_with(&out, 3, "at step");
    fails_with(&out, 3, "step-0000004");
    let after = weights(&run.join("checkpoints/last"));
    for ((n, a), (_, b)) in before.iter().zip(&after) {
        assert!(a.equal(b), "{n} changed in the last good checkpoint");
    }
}

/// TensorBoard reads our event files (checked with Python's `tensorboard` when available).
#[test]
fn tensorboard_reads_the_event_file() {
    let run = fixture().root.join("events");
    ok(&train(&run, &["--set", "train.max_steps=4"]));
    let Some(python) = std::env::var_os("NEUROFM_PYTHON") else {
        assert!(std::env::var_os("CI").is_none(), "NEUROFM_PYTHON must be set in CI");
        eprintln!("note: NEUROFM_PYTHON not set; skipping the TensorBoard check");
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/check_events.py");
    let out = Command::new(python).arg(script).arg(&run).output().expect("python");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// On synthetic cells whose genes co-vary with a hidden cell type, the model must use context:
/// its validation perplexity has to beat the per-gene bin-frequency table on the same masks.
#[test]
fn the_model_beats_the_context_free_baseline_on_data_with_structure() {
    let f = fixture();
    let run = f.root.join("learns");
    let data = f.structured_store.display().to_string();
    ok(&train(&run, &[
        "--data", &data, "--set", "train.max_steps=700", "--set", "train.val_every=700", "--set", "train.grad_accum=1",
        "--set", "model.dropout=0.0", "--set", "model.d_model=64", "--set", "model.n_heads=4", "--set", "model.d_ff=128",
        "--set", "optim.lr=1e-3", "--set", "optim.warmup_steps=10",
        // The masked-bin objective alone: this test is about its use of context.
        "--set", "objectives.bottleneck=0", "--set", "objectives.contrastive=0", "--set", "views.count=1", "--set", "views.thin_min=1",
        "--set", "objectives.decorrelation=0", "--set", "views.gene_scale=0",
    ]));
    let rows = trainer::metrics::read(&run.join("metrics.csv")).unwrap();
    let val = rows.iter().rev().find(|r| r.split == "val").unwrap();
    let get = |c| val.get(c).unwrap();
    use trainer::metrics::Column;
    let (ppl, baseline, global) = (get(Column::Perplexity), get(Column::BaselinePerplexity), get(Column::GlobalBaselinePerplexity));
    assert!(baseline < global, "per-gene table {baseline} should beat global frequencies {global}");
    assert!(ppl < 0.97 * baseline, "model perplexity {ppl} does not clearly beat the per-gene baseline {baseline}");
}

/// cudarc looks for `libnccl.so`, which the torch wheel does not ship, and would take any
/// system one first: neurofm-train binds it to the NCCL libtorch mapped, even with a decoy
/// `libnccl.so` (another copy of the library) first on the library path.
#[test]
fn nccl_is_the_one_libtorch_loaded() {
    let preflight = |extra_path: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_neurofm-train"));
        cmd.args(["--preflight", "--device", "cpu"]).env_remove("NEUROFM_NCCL_REEXEC");
        if let Some(dir) = extra_path {
            cmd.env("LD_LIBRARY_PATH", dir);
        }
        let out = cmd.output().expect("run neurofm-train --preflight");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().find(|l| l.starts_with("nccl:")).unwrap_or_default().to_string()
    };
    let line = preflight(None);
    let Some(wheel) = line.split(" from ").nth(1).map(str::to_string) else {
        assert!(std::env::var_os("CI").is_none(), "CI has the torch wheel's NCCL: {line}");
        return;
    };
    assert!(line.starts_with("nccl: 2.") && wheel.ends_with("nvidia/nccl/lib/libnccl.so.2"), "{line}");
    let decoy = fixture().root.join("decoy-nccl");
    std::fs::create_dir_all(&decoy).unwrap();
    std::fs::copy(&wheel, decoy.join("libnccl.so")).unwrap();
    assert_eq!(preflight(Some(&decoy)), line, "the decoy on LD_LIBRARY_PATH must not be loaded");
}

/// Rank-value sequences (Geneformer): the masked-gene objective must learn from context too,
/// beating each rank's context-free gene frequencies on the same masks; the quick demo names
/// the hidden genes.
#[test]
fn rank_value_training_predicts_hidden_genes_from_context() {
    let f = fixture();
    let run = f.root.join("ranked");
    let data = f.structured_store.display().to_string();
    ok(&train(&run, &[
        "--data", &data, "--set", "tokenizer.kind=\"rank-value\"", "--set", "sequence.mode=\"nonzero-plus-zeros\"", "--set", "sequence.max_len=33",
        "--set", "objectives.bottleneck=0", "--set", "objectives.contrastive=0", "--set", "views.count=1", "--set", "views.thin_min=1",
        "--set", "objectives.decorrelation=0", "--set", "views.gene_scale=0",
        "--set", "train.max_steps=2000", "--set", "train.val_every=2000", "--set", "train.log_every=500", "--set", "train.grad_accum=1",
        "--set", "model.dropout=0.0", "--set", "model.d_model=64", "--set", "model.n_heads=4", "--set", "model.d_ff=128", "--set", "optim.lr=1e-3",
    ]));
    let rows = trainer::metrics::read(&run.join("metrics.csv")).unwrap();
    let val = rows.iter().rev().find(|r| r.split == "val").unwrap();
    use trainer::metrics::Column;
    let (ppl, baseline) = (val.get(Column::Perplexity).unwrap(), val.get(Column::BaselinePerplexity).unwrap());
    assert!(ppl < 0.9 * baseline, "masked-gene perplexity {ppl} does not clearly beat the per-rank gene frequencies {baseline}");
    let demo = std::fs::read_to_string(run.join("demo.tsv")).unwrap();
    assert!(demo.starts_with("position\ttrue_gene") && demo.lines().nth(1).is_some_and(|l| l.contains("gene_")), "{demo}");
}
