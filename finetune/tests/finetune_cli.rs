//! End to end on generated cells with known types: a tiny pretrained run, then
//! `neurofm-finetune` (and its from-scratch control, a frozen encoder, exact resume, two MPI
//! ranks against one), `neurofm-annotate` on a store and on an h5ad with fewer genes, and
//! every refusal.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use dataloader::convert::{convert, ConvertOptions};
use dataloader::synth::{self, SynthOptions};
use trainer::comm::Single;
use trainer::config::TrainConfig;
use trainer::run_dir::{Resume, RunDir};
use trainer::train::{run, RunOptions};

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    /// 360 cells × 80 genes, 3 types, 2 conditions.
    h5ad: PathBuf,
    store: PathBuf,
    /// A 2-layer masked-bin run on the store.
    pretrained: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        std::env::set_var("HDF5_USE_FILE_LOCKING", "FALSE");
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let h5ad = root.join("cells.h5ad");
        synth::write(&SynthOptions { conditions: 2, ..SynthOptions::new(h5ad.clone(), 360, 80, 3, 5) }).expect("synth");
        let store = root.join("cells.zarr");
        convert(&h5ad, &store, &ConvertOptions::default()).expect("convert");
        let cfg_path = root.join("pretrain.toml");
        std::fs::write(
            &cfg_path,
            format!(
                "seed = 3\n[data]\nstore = \"{}\"\nworkers = 1\n[tokenizer]\nn_bins = 10\n[model]\nd_model = 16\nn_heads = 2\nn_layers = 2\nd_ff = 32\ndropout = 0.0\n\
                 [optim]\nlr = 3e-3\nwarmup_steps = 2\n[train]\nbatch_size = 32\nepochs = 2\nlog_every = 2\nthreads = 1\n",
                store.display()
            ),
        )
        .expect("config");
        let cfg = TrainConfig::load(&cfg_path, &[]).expect("config loads");
        let pretrained = root.join("pretrained");
        let run_dir = RunDir::prepare(&pretrained, &Resume::No, false).expect("run dir");
        run(cfg, &run_dir, &RunOptions { device: tch::Device::Cpu, progress: false, stop_at_step: None }, &Single).expect("pretraining");
        Fixture { _dir: dir, root, h5ad, store, pretrained }
    })
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Small, fast recipe: 6 epochs of batch 16, a narrow head, few trees (layer decay 0.8: at 6
/// epochs the tiny fixture model is steadier with it than with the default 1).
const FAST: &[&str] = &[
    "--set", "train.epochs=6", "--set", "train.batch_size=16", "--set", "train.threads=1", "--set", "optim.lr=3e-3", "--set", "optim.warmup_steps=5",
    "--set", "encoder.layer_decay=0.8",
    "--set", "head.hidden=32", "--set", "baselines.forest_trees=20", "--set", "data.workers=1",
];

/// The arguments of a fine-tune of the fixture's run on its store; `task` replaces any of the
/// defaults `--pretrained`, `--data`, `--label-col`.
fn finetune_args_with(run_dir: &Path, task: &[(&str, &str)], extra: &[&str]) -> Vec<String> {
    let f = fixture();
    let mut flags = vec![("--pretrained", s(&f.pretrained).to_string()), ("--data", s(&f.store).to_string()), ("--label-col", "cell_type".to_string())];
    for (flag, value) in task {
        flags.iter_mut().filter(|(k, _)| k == flag).for_each(|(_, v)| *v = value.to_string());
    }
    let mut a: Vec<String> = flags.into_iter().flat_map(|(k, v)| [k.to_string(), v]).collect();
    a.extend(["--run-dir", s(run_dir), "--device", "cpu", "--no-progress"].iter().map(|x| x.to_string()));
    a.extend(FAST.iter().map(|x| x.to_string()));
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn finetune_args(run_dir: &Path, extra: &[&str]) -> Vec<String> {
    finetune_args_with(run_dir, &[], extra)
}

fn run_finetune(args: Vec<String>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_neurofm-finetune")).args(args).env("HDF5_USE_FILE_LOCKING", "FALSE").output().expect("neurofm-finetune runs")
}

fn finetune(run_dir: &Path, extra: &[&str]) -> Output {
    run_finetune(finetune_args(run_dir, extra))
}

fn annotate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_neurofm-annotate")).args(args).env("HDF5_USE_FILE_LOCKING", "FALSE").output().expect("neurofm-annotate runs")
}

fn ok(what: &str, out: &Output) {
    assert!(out.status.success(), "{what} failed ({:?}):\n{}{}", out.status.code(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).expect("json")
}

/// Another workspace binary beside ours (`make test` builds every binary before the tests).
fn sibling_bin(name: &str) -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_neurofm-finetune")).with_file_name(name);
    assert!(exe.is_file(), "{} is missing: run `cargo build --workspace --bins` first", exe.display());
    exe
}

/// The TensorBoard tags of `tags` that the run's events file lacks.
fn events_without<'a>(run: &Path, tags: &[&'a str]) -> Vec<&'a str> {
    let events = std::fs::read_dir(run).unwrap().flatten().find(|e| e.file_name().to_string_lossy().starts_with("events.out.tfevents")).expect("events file");
    let bytes = std::fs::read(events.path()).unwrap();
    tags.iter().copied().filter(|tag| !bytes.windows(tag.len()).any(|w| w == tag.as_bytes())).collect()
}

/// (step, split, loss) of every metrics.csv row, by header name.
fn rows(run: &Path) -> Vec<(u64, String, f64)> {
    trainer::metrics::read(&run.join("metrics.csv"))
        .expect("metrics.csv")
        .into_iter()
        .map(|r| (r.step, r.split.clone(), r.get(trainer::metrics::Column::Loss).expect("loss column")))
        .collect()
}

fn weights(ckpt: &Path) -> Vec<(String, tch::Tensor)> {
    let mut w = tch::Tensor::read_safetensors(ckpt.join("model.safetensors")).expect("weights");
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// The fine-tune, its control and the baselines, all scored on the same test cells; every
/// output is there and the test cells are `neurofm-eval`'s for the same seed.
#[test]
fn fine_tuning_learns_the_planted_types_beside_its_controls() {
    let f = fixture();
    let run_dir = f.root.join("ft");
    let out = finetune(&run_dir, &["--from-scratch", "--set", "train.epochs=12"]);
    ok("fine-tune", &out);
    let m = json(&run_dir.join("metrics.json"));
    let model = &m["model"];
    // Three balanced types: chance is 1/3 (this 16-wide model, pretrained for 18 steps, with
    // its layer 1 of 2 fine-tuned for 216 steps, reaches about 0.6 on split seeds 0, 1 and 2).
    assert!(model["accuracy"].as_f64().unwrap() > 0.5, "{model}");
    assert!(model["macro_f1"].as_f64().unwrap() > 0.5, "{model}");
    for b in ["logistic_expression", "random_forest", "from_scratch"] {
        let e = &m["baselines"][b];
        assert!(e["macro_f1"].as_f64().is_some(), "{b} missing: {}", m["baselines"]);
        assert_eq!(e["confusion"].as_array().unwrap().len(), 3);
    }
    assert_eq!(model["per_class"].as_object().unwrap().len(), 3);
    let support: u64 = model["per_class"].as_object().unwrap().values().map(|c| c["support"].as_u64().unwrap()).sum();
    assert_eq!(support, m["task"]["test_cells"].as_u64().unwrap());
    assert!(m["throughput"]["finetune_cells_per_s"].as_f64().unwrap() > 0.0);
    assert!(m["throughput"]["pretraining_cells_per_s"].as_f64().unwrap() > 0.0);
    for file in ["finetune.toml", "config.toml", "tokenizer.json", "classes.json", "report.html", "report.md", "predictions.tsv", "cells.tsv", "confusion_model.png", "throughput.json", "finetune.log", "from-scratch/checkpoints/best/model.safetensors"] {
        assert!(run_dir.join(file).exists(), "{file} missing");
    }
    let toml = std::fs::read_to_string(run_dir.join("finetune.toml")).unwrap();
    // The defaults: no validation part, the layer below the top (layer 1 of 2).
    for key in ["val_frac = 0.0", "pooling = \"mean\"", "layer = -2", "layer_decay = 0.8", "balance = \"class-weights\"", "from_scratch = true"] {
        assert!(toml.contains(key), "{key} not in finetune.toml:\n{toml}");
    }
    assert_eq!(events_without(&run_dir, &["finetune/loss", "finetune/lr"]), Vec::<&str>::new());
    // The fine-tune starts from the pretrained encoder, the control from random weights.
    let table = |ckpt: &Path| weights(ckpt).into_iter().find(|(n, _)| n == "gene_embedding.weight").expect("gene table").1;
    let pre = table(&f.pretrained.join("checkpoints/best"));
    let cosine = |t: &tch::Tensor| (t * &pre).sum(tch::Kind::Double).double_value(&[]) / (t.norm().double_value(&[]) * pre.norm().double_value(&[]));
    let (tuned, scratch) = (cosine(&table(&run_dir.join("checkpoints/best"))), cosine(&table(&run_dir.join("from-scratch/checkpoints/best"))));
    assert!(tuned > 0.6 && scratch.abs() < 0.3, "cosine with the pretrained gene table: fine-tuned {tuned}, from scratch {scratch}");
    let report = std::fs::read_to_string(run_dir.join("report.md")).unwrap();
    assert!(report.contains("random forest") && report.contains("from scratch") && report.contains("Per-class F1"), "{report}");

    // The test cells are neurofm-eval's for the same seed and split.
    let eval_out = f.root.join("eval");
    let e = Command::new(sibling_bin("neurofm-eval"))
        .args(["--run", s(&f.pretrained), "--data", s(&f.store), "--label-col", "cell_type", "--out", s(&eval_out), "--device", "cpu"])
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .output()
        .unwrap();
    ok("neurofm-eval", &e);
    let test_rows = |path: &Path, col: &str| -> Vec<String> {
        let text = std::fs::read_to_string(path).unwrap();
        let head: Vec<&str> = text.lines().next().unwrap().split('\t').collect();
        let (row, part) = (head.iter().position(|h| *h == "store_row").unwrap(), head.iter().position(|h| *h == col).unwrap());
        let mut v: Vec<String> = text.lines().skip(1).map(|l| l.split('\t').collect::<Vec<_>>()).filter(|c| c[part] == "test").map(|c| c[row].to_string()).collect();
        v.sort();
        v
    };
    let ours = test_rows(&run_dir.join("cells.tsv"), "part");
    assert!(!ours.is_empty());
    assert_eq!(ours, test_rows(&eval_out.join("cells.tsv"), "split"), "fine-tune and neurofm-eval test on the same cells");

    // neurofm-eval reads a fine-tune run as a pretraining run: the fine-tuned encoder embeds.
    let e = Command::new(sibling_bin("neurofm-eval"))
        .args(["--run", s(&run_dir), "--data", s(&f.store), "--label-col", "cell_type", "--out", s(&f.root.join("eval-ft")), "--device", "cpu"])
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .output()
        .unwrap();
    ok("neurofm-eval of the fine-tune", &e);
}

/// A run stopped halfway and resumed gives the same losses and bit-identical weights as an
/// uninterrupted one (dropout on, so its reseeding is part of what is checked).
#[test]
fn a_resumed_fine_tune_continues_exactly() {
    let f = fixture();
    // One log row per step: a row averaging steps on both sides of the stop could not match.
    let quick = ["--set", "task.val_frac=0.2", "--set", "train.max_steps=12", "--set", "train.val_every=4", "--set", "train.log_every=1", "--set", "head.dropout=0.3", "--set", "encoder.dropout=0.2", "--set", "baselines.logistic=false", "--set", "baselines.random_forest=false"];
    let (straight, split) = (f.root.join("resume-straight"), f.root.join("resume-split"));
    ok("straight", &finetune(&straight, &quick));
    let mut first: Vec<&str> = quick.to_vec();
    first.extend(["--stop-at-step", "6"]);
    ok("first half", &finetune(&split, &first));
    assert!(!split.join("metrics.json").exists(), "a stopped run is not scored");
    let mut second: Vec<&str> = quick.to_vec();
    second.extend(["--resume", "auto"]);
    let out = finetune(&split, &second);
    ok("second half", &out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rows(&straight), rows(&split), "same metrics.csv rows, losses bit for bit");
    let (a, b) = (weights(&straight.join("checkpoints/last")), weights(&split.join("checkpoints/last")));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs after resume");
    }
    assert_eq!(json(&straight.join("metrics.json"))["model"]["macro_f1"], json(&split.join("metrics.json"))["model"]["macro_f1"]);
    // Resuming with another recipe is refused, not mixed into the run.
    let mut other: Vec<&str> = quick.to_vec();
    other.extend(["--resume", "auto", "--set", "encoder.layer_decay=0.5"]);
    let out = finetune(&split, &other);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("encoder.layer_decay = 0.8,") && err.contains("resume with the same settings"), "{err}");
}

/// With a frozen encoder only the head moves: every encoder tensor of the fine-tune equals the
/// pretrained checkpoint's, and the log says how few parameters trained.
#[test]
fn a_frozen_encoder_keeps_the_pretrained_weights() {
    let f = fixture();
    let run_dir = f.root.join("frozen");
    ok("frozen", &finetune(&run_dir, &["--freeze-encoder", "--set", "train.max_steps=6", "--set", "baselines.logistic=false", "--set", "baselines.random_forest=false"]));
    let pre: std::collections::HashMap<String, tch::Tensor> = weights(&f.pretrained.join("checkpoints/best")).into_iter().collect();
    let mut heads = 0;
    for (name, t) in weights(&run_dir.join("checkpoints/last")) {
        match pre.get(&name) {
            Some(p) => assert!(p.equal(&t), "{name} moved although the encoder is frozen"),
            None => {
                assert!(name.starts_with("classifier."), "{name}");
                heads += 1;
            }
        }
    }
    assert_eq!(heads, 4, "fc1 and fc2, weight and bias");
    let m = json(&run_dir.join("metrics.json"));
    assert_eq!(m["task"]["freeze_encoder"], true);
}

/// Layer-wise learning-rate decay: after one Adam step every update is the undecayed run's
/// times the parameter's factor: 1 for the head and the top layer, 0.5 for the layer below,
/// 0.25 for the embeddings under two layers (every layer runs: `head.layer = -1`).
#[test]
fn layer_wise_decay_scales_each_layers_first_step() {
    let f = fixture();
    let one_step = ["--set", "head.layer=-1", "--set", "train.max_steps=1", "--set", "optim.warmup_steps=0", "--set", "optim.weight_decay=0", "--set", "head.dropout=0", "--set", "baselines.logistic=false", "--set", "baselines.random_forest=false"];
    let (flat, decayed) = (f.root.join("decay-1"), f.root.join("decay-half"));
    let mut a: Vec<&str> = one_step.to_vec();
    a.extend(["--set", "encoder.layer_decay=1.0"]);
    ok("no decay", &finetune(&flat, &a));
    let mut a: Vec<&str> = one_step.to_vec();
    a.extend(["--set", "encoder.layer_decay=0.5"]);
    ok("decay 0.5", &finetune(&decayed, &a));
    let pre: std::collections::HashMap<String, tch::Tensor> = weights(&f.pretrained.join("checkpoints/best")).into_iter().collect();
    let (w1, w2): (std::collections::HashMap<_, _>, std::collections::HashMap<_, _>) =
        (weights(&flat.join("checkpoints/last")).into_iter().collect(), weights(&decayed.join("checkpoints/last")).into_iter().collect());
    for (name, factor) in [("gene_embedding.weight", 0.25), ("bin_embedding.weight", 0.25), ("layers.0.attn.qkv.weight", 0.5), ("layers.1.ff.fc1.weight", 1.0), ("final_norm.weight", 1.0)] {
        let moved = |w: &std::collections::HashMap<String, tch::Tensor>| (&w[name] - &pre[name]).abs().sum(tch::Kind::Double).double_value(&[]);
        let (m1, m2) = (moved(&w1), moved(&w2));
        assert!(m1 > 0.0 && (m2 / m1 - factor).abs() < 1e-3, "{name}: moved {m2} vs {m1} without decay, ratio {} (want {factor})", m2 / m1);
    }
    assert!(w1["classifier.fc1.weight"].equal(&w2["classifier.fc1.weight"]), "the head learns at the full rate either way");
}

/// Early stopping: with a learning rate too small to change anything, the second validation
/// is no better than the first, so patience 1 stops the run there and `best` is the first.
#[test]
fn early_stopping_ends_the_run_at_the_first_stale_validation() {
    let f = fixture();
    let run_dir = f.root.join("early");
    ok("early", &finetune(&run_dir, &["--set", "task.val_frac=0.2", "--set", "optim.lr=1e-9", "--set", "train.patience=1", "--set", "train.epochs=10", "--set", "baselines.logistic=false", "--set", "baselines.random_forest=false"]));
    let val: Vec<u64> = rows(&run_dir).into_iter().filter(|r| r.1 == "val").map(|r| r.0).collect();
    assert_eq!(val.len(), 2, "validations {val:?}");
    let m = json(&run_dir.join("metrics.json"));
    assert_eq!(m["model"]["detail"]["stopped_early"], true);
    assert_eq!(m["model"]["detail"]["best_step"], val[0]);
    let best = std::fs::read_link(run_dir.join("checkpoints/best")).unwrap();
    assert_eq!(best, PathBuf::from(format!("step-{:07}", val[0])));
    // Validation is logged and drawn beside the training loss.
    assert_eq!(events_without(&run_dir, &["finetune/loss", "val/macro_f1", "val/loss"]), Vec::<&str>::new());
    assert!(run_dir.join("training.png").exists());
}

/// `task.val_frac = 0`: every training cell is fit (none held out for validation), no
/// validation row is logged, and `best` is the last checkpoint; early stopping without
/// validation cells is refused.
#[test]
fn without_validation_cells_every_training_cell_is_fit_and_the_last_model_kept() {
    let f = fixture();
    let run_dir = f.root.join("no-val");
    let quiet = ["--set", "train.epochs=2", "--set", "baselines.logistic=false", "--set", "baselines.random_forest=false"];
    let mut a = vec!["--set", "task.val_frac=0"];
    a.extend(quiet);
    ok("no validation", &finetune(&run_dir, &a));
    let cells = std::fs::read_to_string(run_dir.join("cells.tsv")).unwrap();
    let parts: Vec<&str> = cells.lines().skip(1).map(|l| l.split('\t').nth(3).unwrap()).collect();
    assert!(!parts.contains(&"val"), "no cell is held out for validation");
    // The same test cells as with validation, so all the others are fit.
    let with_val = f.root.join("with-val");
    let mut a = vec!["--set", "task.val_frac=0.2"];
    a.extend(quiet);
    ok("with validation", &finetune(&with_val, &a));
    let test_of = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("cells.tsv")).unwrap().lines().skip(1).filter(|l| l.ends_with("\ttest")).map(String::from).collect()
    };
    assert_eq!(test_of(&run_dir), test_of(&with_val));
    assert_eq!(parts.iter().filter(|p| **p == "fit").count(), parts.len() - test_of(&run_dir).len());
    let r = rows(&run_dir);
    assert!(r.iter().all(|r| r.1 != "val"), "a validation row was logged without validation cells");
    let last = r.iter().map(|r| r.0).max().unwrap();
    assert_eq!(std::fs::read_link(run_dir.join("checkpoints/best")).unwrap(), PathBuf::from(format!("step-{last:07}")));
    assert_eq!(json(&run_dir.join("metrics.json"))["model"]["detail"]["best_step"], last);

    let refused = f.root.join("no-val-patience");
    let mut a = vec!["--set", "task.val_frac=0", "--set", "train.patience=2"];
    a.extend(quiet);
    let out = finetune(&refused, &a);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("early stopping needs validation cells"));
    assert!(!refused.exists());
}

/// Label transfer across a condition shift: trained on one condition, tested on the other.
#[test]
fn labels_transfer_to_a_condition_never_trained_on() {
    let f = fixture();
    let run_dir = f.root.join("transfer");
    ok("transfer", &finetune(&run_dir, &["--split", "group:condition", "--test-frac", "0.5", "--set", "train.epochs=12"]));
    let m = json(&run_dir.join("metrics.json"));
    // Chance is 1/3; this tiny model reaches about 0.6 on the shifted condition.
    assert!(m["model"]["macro_f1"].as_f64().unwrap() > 0.45, "{}", m["model"]);
    // Every test cell comes from the condition no training cell has.
    let cells = std::fs::read_to_string(run_dir.join("cells.tsv")).unwrap();
    let store = dataloader::store::Store::open(&f.store).unwrap();
    let condition = store.column("obs", "condition").unwrap();
    let mut parts: std::collections::HashMap<String, std::collections::HashSet<String>> = Default::default();
    for line in cells.lines().skip(1) {
        let c: Vec<&str> = line.split('\t').collect();
        let part = if c[3] == "test" { "test" } else { "train" };
        parts.entry(part.into()).or_default().insert(condition.text(c[1].parse().unwrap()));
    }
    assert_eq!(parts["test"].len(), 1);
    assert!(parts["test"].is_disjoint(&parts["train"]), "{parts:?}");

    // Annotating the whole file labels the held-out condition as the fine-tune scored it.
    let out = f.root.join("transfer.h5ad");
    ok("annotate", &annotate(&["--model", s(&run_dir), "--data", s(&f.store), "--out", s(&out), "--device", "cpu", "--min-confidence", "0"]));
    let h = hdf5::File::open(&out).unwrap();
    let codes: Vec<i32> = h.dataset("obs/neurofm_label/codes").unwrap().read_raw().unwrap();
    let preds = std::fs::read_to_string(run_dir.join("predictions.tsv")).unwrap();
    let head: Vec<&str> = preds.lines().next().unwrap().split('\t').collect();
    let (row, pred) = (head.iter().position(|h| *h == "store_row").unwrap(), head.iter().position(|h| *h == "pred_model").unwrap());
    for line in preds.lines().skip(1) {
        let c: Vec<&str> = line.split('\t').collect();
        assert_eq!(codes[c[row].parse::<usize>().unwrap()].to_string(), c[pred], "annotate agrees with the fine-tune's test predictions");
    }
}

/// The annotation keeps the input's obs and adds labels, confidences, probabilities and
/// embeddings; an h5ad with fewer genes is annotated with those genes as padding, and the
/// overlap is reported.
#[test]
fn annotate_writes_labels_probabilities_and_the_gene_overlap() {
    let f = fixture();
    let run_dir = f.root.join("for-annotate");
    ok("fine-tune", &finetune(&run_dir, &["--set", "train.max_steps=30", "--set", "baselines.random_forest=false"]));
    let fewer = f.root.join("fewer-genes.h5ad");
    synth::write(&SynthOptions::new(fewer.clone(), 50, 60, 3, 9)).unwrap();
    let out = f.root.join("annotated.h5ad");
    let o = annotate(&["--model", s(&run_dir), "--data", s(&fewer), "--out", s(&out), "--device", "cpu", "--min-confidence", "0.999"]);
    ok("annotate", &o);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("60 of the model's 80 genes"), "{text}");
    let h = hdf5::File::open(&out).unwrap();
    let p: Vec<f32> = h.dataset("obsm/neurofm_probabilities").unwrap().read_raw().unwrap();
    assert_eq!(h.dataset("obsm/neurofm_probabilities").unwrap().shape(), vec![50, 3]);
    assert_eq!(h.dataset("obsm/X_neurofm").unwrap().shape(), vec![50, 16]);
    for row in p.chunks(3) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }
    let conf: Vec<f64> = h.dataset("obs/neurofm_confidence").unwrap().read_raw().unwrap();
    let codes: Vec<i32> = h.dataset("obs/neurofm_label/codes").unwrap().read_raw().unwrap();
    let cats: Vec<hdf5::types::VarLenUnicode> = h.dataset("obs/neurofm_label/categories").unwrap().read_raw().unwrap();
    assert_eq!(cats.last().unwrap().as_str(), "unassigned");
    for (c, &k) in conf.iter().zip(&codes) {
        assert_eq!(cats[k as usize].as_str() == "unassigned", *c < 0.999, "below --min-confidence means unassigned");
    }
    let classes: Vec<hdf5::types::VarLenUnicode> = h.dataset("uns/neurofm_classes").unwrap().read_raw().unwrap();
    assert_eq!(classes.iter().map(|c| c.as_str().to_string()).collect::<Vec<_>>(), vec!["type_0", "type_1", "type_2"]);
    // The input's own obs columns are kept.
    assert!(h.group("obs/cell_type").is_ok() && h.group("obs/library").is_ok());
    // Nothing replaces an existing file without --force.
    let again = annotate(&["--model", s(&run_dir), "--data", s(&fewer), "--out", s(&out), "--device", "cpu"]);
    assert_eq!(again.status.code(), Some(2));
}

/// An ensemble of two, each averaged over three test views: member 1 trains in `members/1/`
/// from its own seed (other weights), the report scores the members and views combined and
/// lists each member, and annotate combines them the same way: its probabilities on the
/// store's test cells are `predictions.tsv`'s, and differ from member 0's alone and from the
/// measured cells alone (`--test-views 1`); `--test-views 0` is refused.
#[test]
fn an_ensemble_is_scored_and_annotated_as_one_classifier() {
    let f = fixture();
    let run_dir = f.root.join("ensemble");
    let train = ["--set", "train.members=2", "--set", "augment.test_views=3", "--set", "train.max_steps=20"];
    ok("fine-tune", &finetune(&run_dir, &[&train[..], &["--set", "baselines.random_forest=false", "--set", "baselines.logistic=false"]].concat()));
    let m = json(&run_dir.join("metrics.json"));
    let members = m["model"]["detail"]["members"].as_array().expect("metrics.json lists the members");
    assert_eq!(members.len(), 2);
    assert_eq!(m["task"]["test_views"], 3);
    let head = |ckpt: &Path| weights(ckpt).into_iter().find(|(n, _)| n == "classifier.fc1.weight").expect("head weights").1;
    assert!(!head(&run_dir.join("checkpoints/last")).equal(&head(&run_dir.join("members/1/checkpoints/last"))), "each member starts from its own seed");

    let tsv = std::fs::read_to_string(run_dir.join("predictions.tsv")).unwrap();
    let mut lines = tsv.lines();
    let cols: Vec<&str> = lines.next().unwrap().split('\t').collect();
    let first_p = cols.iter().position(|c| c.starts_with("p_")).unwrap();
    let test: Vec<(usize, Vec<f32>)> = lines
        .map(|l| {
            let v: Vec<&str> = l.split('\t').collect();
            (v[1].parse().unwrap(), v[first_p..].iter().map(|x| x.parse::<f64>().unwrap() as f32).collect())
        })
        .collect();
    let probabilities = |args: &[&str], name: &str| -> Vec<f32> {
        let out = f.root.join(name);
        let mut a = vec!["--model", s(&run_dir), "--data", s(&f.store), "--out", s(&out), "--device", "cpu"];
        a.extend(args);
        ok("annotate", &annotate(&a));
        hdf5::File::open(&out).unwrap().dataset("obsm/neurofm_probabilities").unwrap().read_raw().unwrap()
    };
    let together = probabilities(&[], "ensemble.h5ad");
    let member0 = members[0]["checkpoint"].as_str().unwrap().to_string();
    let alone = probabilities(&["--checkpoint", &member0], "member0.h5ad");
    let measured = probabilities(&["--test-views", "1"], "measured.h5ad");
    let (mut largest_gap, mut moved, mut viewed) = (0.0f32, 0.0f32, 0.0f32);
    for (row, p) in &test {
        for (c, &want) in p.iter().enumerate() {
            largest_gap = largest_gap.max((together[row * 3 + c] - want).abs());
            moved = moved.max((alone[row * 3 + c] - want).abs());
            viewed = viewed.max((measured[row * 3 + c] - want).abs());
        }
    }
    assert!(largest_gap < 1e-5, "annotate's ensemble differs from the report's by {largest_gap}");
    assert!(moved > 1e-3, "member 0 alone should differ from the ensemble (largest difference {moved})");
    assert!(viewed > 1e-3, "the measured cells alone should differ from the three views (largest difference {viewed})");

    let out = f.root.join("no-views.h5ad");
    let refused = annotate(&["--model", s(&run_dir), "--data", s(&f.store), "--out", s(&out), "--device", "cpu", "--test-views", "0"]);
    assert_eq!(refused.status.code(), Some(2), "{}", String::from_utf8_lossy(&refused.stderr));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--test-views 0") && !out.exists());
}

/// Two CPU ranks under mpirun (through neurofm-launch) with batch 8 each take exactly the steps
/// of one rank with batch 16: same losses and weights; the ranks start from different head
/// weights, so rank 0's broadcast is what makes them one model.
#[test]
fn two_mpi_ranks_equal_one_rank_at_the_global_batch() {
    let found = Command::new("mpirun").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found || std::env::var_os("CI").is_none(), "CI must have mpirun (apt openmpi-bin)");
    if !found {
        return;
    }
    let f = fixture();
    let same = ["--set", "task.val_frac=0.2", "--set", "head.dropout=0", "--set", "encoder.dropout=0", "--set", "train.max_steps=10", "--set", "train.val_every=5", "--set", "baselines.logistic=false", "--set", "baselines.random_forest=false"];
    let (one, two) = (f.root.join("one-rank"), f.root.join("two-ranks"));
    let mut args: Vec<&str> = same.to_vec();
    args.extend(["--set", "train.batch_size=16"]);
    ok("1 rank", &finetune(&one, &args));
    let mut args: Vec<&str> = same.to_vec();
    args.extend(["--set", "train.batch_size=8", "--set", "train.bucket_mb=0.002"]);
    let out = Command::new(sibling_bin("neurofm-launch"))
        .args(["--backend", "mpi", "--nproc-per-node", "2", "--"])
        .arg(env!("CARGO_BIN_EXE_neurofm-finetune"))
        .args(finetune_args(&two, &args))
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .env("NEUROFM_TEST_INIT", "per-rank")
        .output()
        .expect("neurofm-launch");
    ok("2 ranks", &out);
    let (a, b) = (rows(&one), rows(&two));
    assert_eq!(a.len(), b.len(), "{a:?}\nvs\n{b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.0, &x.1), (y.0, &y.1));
        assert!((x.2 - y.2).abs() < 1e-5, "step {} {}: loss {} vs {}", x.0, x.1, x.2, y.2);
    }
    let (wa, wb) = (weights(&one.join("checkpoints/last")), weights(&two.join("checkpoints/last")));
    assert_eq!(wa.len(), wb.len());
    for ((na, ta), (nb, tb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        let diff = (ta - tb).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{na} differs by {diff}");
    }
    let log = std::fs::read_to_string(two.join("finetune.log")).unwrap();
    assert!(log.contains("parameters identical on all 2 ranks"), "{log}");
    let t = json(&two.join("throughput.json"));
    assert_eq!(t["world_size"], 2);
    assert!(t["allreduce"]["buckets"].as_u64().unwrap() > 1, "several buckets: {t}");
}

/// Every bad input exits 2 with the file or flag and the fix, before anything is written.
#[test]
fn bad_input_is_refused_before_anything_is_written() {
    let f = fixture();
    let refused = |name: &str, task: &[(&str, &str)], extra: &[&str], needle: &str| {
        let dir = f.root.join(format!("bad-{name}"));
        let out = run_finetune(finetune_args_with(&dir, task, extra));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(needle), "{name}: `{needle}` not in\n{err}");
        assert!(!dir.exists(), "{name}: the run directory was created");
    };
    refused("no-column", &[("--label-col", "subtype")], &[], "obs has no column `subtype`");
    refused("one-class", &[], &["--classes", "type_0"], "1 class(es)");
    refused("small-class", &[], &["--test-frac", "0.99"], "--min-class-cells");
    refused("not-a-store", &[("--data", s(&f.h5ad))], &[], "neurofm-data convert");
    refused("not-a-run", &[("--pretrained", s(&f.root))], &[], "--pretrained takes a run directory");
    refused("accumulation", &[], &["--set", "train.grad_accum=1000"], "lower train.grad_accum or train.batch_size");

    // A pretrained run whose tokenizer is not its checkpoint's.
    let other_tok = f.root.join("other-tokenizer");
    copy_dir(&f.pretrained, &other_tok);
    let tok_path = other_tok.join("tokenizer.json");
    let mut tok = json(&tok_path);
    tok["genes"][0] = "renamed".into();
    std::fs::write(&tok_path, serde_json::to_vec(&tok).unwrap()).unwrap();
    refused("other-tokenizer", &[("--pretrained", s(&other_tok))], &[], "sha256 differs");

    // A pretrained run on another gene panel: no gene in common with the data.
    let other_panel = f.root.join("other-panel");
    copy_dir(&f.pretrained, &other_panel);
    let tok_path = other_panel.join("tokenizer.json");
    let mut tok = json(&tok_path);
    let n = tok["genes"].as_array().unwrap().len();
    tok["genes"] = (0..n).map(|g| serde_json::Value::from(format!("ENSG{g:011}"))).collect();
    std::fs::write(&tok_path, serde_json::to_vec(&tok).unwrap()).unwrap();
    let sha = dataloader::convert::sha256_file(&tok_path).unwrap();
    for ckpt in std::fs::read_dir(other_panel.join("checkpoints")).unwrap().flatten() {
        let state = ckpt.path().join("state.json");
        if let Ok(bytes) = std::fs::read(&state) {
            let mut st: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            st["tokenizer_sha256"] = sha.clone().into();
            std::fs::write(&state, serde_json::to_vec(&st).unwrap()).unwrap();
        }
    }
    refused("other-panel", &[("--pretrained", s(&other_panel))], &[], "none of its 80 genes");

    // Annotating with a pretraining run, or a directory that is no run at all.
    let out = f.root.join("never.h5ad");
    let o = annotate(&["--model", s(&f.pretrained), "--data", s(&f.store), "--out", s(&out), "--device", "cpu"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is a pretraining run, not a fine-tune"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = annotate(&["--model", s(&f.root), "--data", s(&f.store), "--out", s(&out), "--device", "cpu"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!out.exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let meta = std::fs::symlink_metadata(&src).unwrap();
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if meta.is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}
