//! End to end: a generated dataset with known cell types, a tiny trained run, then
//! `neurofm-eval` on a store and on an h5ad with a different gene panel, and every refusal.

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
    store: PathBuf,
    run: PathBuf,
}

/// 240 cells × 100 genes of 3 types in 8 libraries, and a 2-epoch run on them.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        std::env::set_var("HDF5_USE_FILE_LOCKING", "FALSE");
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let src = root.join("cells.h5ad");
        synth::write(&SynthOptions::new(src.clone(), 240, 100, 3, 5)).expect("synth");
        let store = root.join("cells.zarr");
        convert(&src, &store, &ConvertOptions::default()).expect("convert");
        let cfg_path = root.join("tiny.toml");
        std::fs::write(
            &cfg_path,
            format!(
                "seed = 3\n[data]\nstore = \"{}\"\nworkers = 1\n[tokenizer]\nn_bins = 10\n[model]\nd_model = 16\nn_heads = 2\nn_layers = 1\nd_ff = 32\ndropout = 0.0\n\
                 [optim]\nlr = 3e-3\nwarmup_steps = 2\n[train]\nbatch_size = 32\nepochs = 2\nlog_every = 2\n",
                store.display()
            ),
        )
        .expect("config");
        let cfg = TrainConfig::load(&cfg_path, &[]).expect("config loads");
        let run_path = root.join("run");
        let run_dir = RunDir::prepare(&run_path, &Resume::No, false).expect("run dir");
        run(cfg, &run_dir, &RunOptions { device: tch::Device::Cpu, progress: false, stop_at_step: None }, &Single).expect("training");
        Fixture { _dir: dir, root, store, run: run_path }
    })
}

fn eval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_neurofm-eval")).args(args).env("HDF5_USE_FILE_LOCKING", "FALSE").output().expect("neurofm-eval runs")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn metrics(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("metrics.json")).expect("metrics.json")).expect("json")
}

fn png_size(p: &Path) -> (u32, u32) {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", p.display());
    (u32::from_be_bytes(b[16..20].try_into().unwrap()), u32::from_be_bytes(b[20..24].try_into().unwrap()))
}

#[test]
fn evaluation_writes_every_output_and_baselines_find_the_planted_types() {
    let f = fixture();
    let out = f.root.join("eval-store");
    let o = eval(&["--run", s(&f.run), "--data", s(&f.store), "--label-col", "cell_type", "--out", s(&out), "--device", "cpu"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = metrics(&out);
    assert_eq!(m["data"]["cells"], 240);
    assert_eq!(m["data"]["classes"].as_array().unwrap().len(), 3);
    assert_eq!(m["embedding"]["dim"], 16);
    let reps = m["representations"].as_array().unwrap();
    let names: Vec<&str> = reps.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["neurofm (mean, layer 1)", "untrained model", "expression PCA(50)", "QC: log counts, log genes"], "the run's recommended pooling and last layer by default");
    // The generator plants marker genes per type: expression PCA must separate them.
    let pca = &reps[2];
    assert!(pca["probe"]["accuracy"].as_f64().unwrap() > 0.95, "{pca}");
    assert!(pca["cluster_ari"].as_f64().unwrap() > 0.8, "{pca}");
    // The depth diagnostic: the QC features hold log total counts itself (R² 1); normalized
    // expression's principal components hold much less of it.
    let depth = |r: &serde_json::Value| r["depth_r2"]["log_total_counts"].as_f64().unwrap();
    assert!(depth(&reps[3]) > 0.99, "{}", reps[3]);
    assert!(depth(&reps[2]) < 0.9 * depth(&reps[3]), "{}", reps[2]);
    for r in reps {
        let cm: u64 = r["confusion"].as_array().unwrap().iter().flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap())).sum();
        assert_eq!(cm, m["data"]["n_test"].as_u64().unwrap());
    }
    // embeddings.npy: header shape and size.
    let npy = std::fs::read(out.join("embeddings.npy")).unwrap();
    let hlen = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    assert!(std::str::from_utf8(&npy[10..10 + hlen]).unwrap().contains("(240, 16)"));
    assert_eq!(npy.len(), 10 + hlen + 240 * 16 * 4);
    let cells = std::fs::read_to_string(out.join("cells.tsv")).unwrap();
    assert_eq!(cells.lines().count(), 241);
    assert!(cells.starts_with("cell\tstore_row\tlabel\tsplit\tcluster\n"));
    for png in ["pca.png", "tsne.png", "umap.png", "roc.png", "confusion.png", "training.png"] {
        assert_eq!(png_size(&out.join(png)), evaluation::plots::SIZE, "{png}");
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(html.matches("data:image/png;base64,").count(), 6);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| expression PCA(50) |") && md.contains("![") && md.contains("Few-shot"));
    assert!(out.join("embeddings.h5ad").is_file() && out.join("confusion.csv").is_file() && out.join("predictions.tsv").is_file());
    assert!(std::fs::read_dir(&out).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with('.')), "temp files left behind");
}

#[test]
fn an_h5ad_with_another_gene_panel_is_converted_padded_and_split_by_group() {
    let f = fixture();
    // Same generator with 80 genes: gene_0..gene_79 are the model's first 80 of 100.
    let src = f.root.join("fewer-genes.h5ad");
    synth::write(&SynthOptions::new(src.clone(), 240, 80, 3, 5)).expect("synth");
    let out = f.root.join("eval-h5ad");
    let o = eval(&[
        "--run", s(&f.run), "--data", s(&src), "--label-col", "cell_type", "--positive", "type_1", "--negative", "type_0,type_2",
        "--split", "group:library", "--checkpoint", "last", "--embedding", "concat", "--out", s(&out), "--device", "cpu",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = metrics(&out);
    assert_eq!(m["data"]["model_genes_missing"], 20);
    let o = &m["data"]["gene_overlap"];
    assert_eq!((o["shared"].as_u64(), o["missing"].as_u64(), o["unknown"].as_u64(), o["share"].as_f64()), (Some(80), Some(20), Some(0), Some(1.0)));
    assert_eq!(m["data"]["classes"], serde_json::json!(["type_0+type_2", "type_1"]));
    assert_eq!(m["embedding"]["dim"], 48);
    assert!(m["data"]["split"].as_str().unwrap().contains("library"));
    assert!(m["representations"][0]["probe"]["roc_auc"].as_f64().is_some());
    // The split never puts one library on both sides.
    let cells = std::fs::read_to_string(out.join("cells.tsv")).unwrap();
    assert_eq!(cells.lines().count(), 241);
    let obs = dataloader::source::read_h5ad_obs(&out.join("embeddings.h5ad")).unwrap();
    let (lib, part) = (obs.column("library").unwrap(), obs.column("neurofm_split").unwrap());
    let sides = |want: &str| -> std::collections::HashSet<String> { (0..obs.index.len()).filter(|&i| part.text(i) == want).map(|i| lib.text(i)).collect() };
    let (train_libs, test_libs) = (sides("train"), sides("test"));
    assert!(!train_libs.is_empty() && !test_libs.is_empty() && train_libs.is_disjoint(&test_libs), "{train_libs:?} / {test_libs:?}");
    assert!(!std::fs::read_dir(&out).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with(".neurofm-eval-")), "converted temp store left behind");
}

/// Zero-shot use on a third panel: genes 70..140 of a 140-gene generator against the model's
/// 100 share 30 (43 % of the smaller panel): refused under the default minimum of 50 %, and
/// with a lower minimum evaluated with the overlap in the log, `metrics.json` and the report.
#[test]
fn a_foreign_panel_reports_its_overlap_and_too_small_a_one_is_refused() {
    let f = fixture();
    let src = f.root.join("wider.h5ad");
    synth::write(&SynthOptions::new(src.clone(), 240, 140, 3, 5)).expect("synth");
    let list = f.root.join("wider-genes.txt");
    std::fs::write(&list, (70..140).map(|g| format!("gene_{g}\n")).collect::<String>()).unwrap();
    let store = f.root.join("wider.zarr");
    convert(&src, &store, &ConvertOptions { genes: dataloader::select::GeneSelection::List(list), ..ConvertOptions::default() }).expect("convert");
    let out = f.root.join("eval-wider");
    let args = ["--run", s(&f.run), "--data", s(&store), "--label-col", "cell_type", "--out", s(&out), "--device", "cpu"];
    let refused = eval(&args);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert!(err.contains("shares only 30 genes") && err.contains("--min-gene-overlap 0.5"), "{err}");
    let o = eval(&[&args[..], &["--min-gene-overlap", "0.4"]].concat());
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("30 genes in common (43 % of the smaller panel), 70 vocabulary genes missing"), "{log}");
    let m = metrics(&out);
    let g = &m["data"]["gene_overlap"];
    assert_eq!((g["shared"].as_u64(), g["missing"].as_u64(), g["unknown"].as_u64()), (Some(30), Some(70), Some(40)));
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(report.contains("30 genes in common"), "the report states the overlap");
}

/// A gene the data does not measure is left out of the sequence (padding), which is not the
/// same as measuring it at zero: the two embeddings differ, and the layer, pooling and gene
/// embedding options do what they say.
#[test]
fn missing_genes_are_absent_not_zero_and_layers_poolings_and_gene_embeddings_work() {
    let f = fixture();
    let embed = |data: &Path, name: &str, extra: &[&str]| -> Vec<f32> {
        let out = f.root.join(name);
        let mut args = vec!["--run", s(&f.run), "--data", s(data), "--label-col", "cell_type", "--out", s(&out), "--device", "cpu"];
        args.extend_from_slice(extra);
        let o = eval(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let npy = std::fs::read(out.join("embeddings.npy")).unwrap();
        let hlen = u16::from_le_bytes([npy[8], npy[9]]) as usize;
        npy[10 + hlen..].chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    // The same 240 cells: once with genes 80..99 measured at zero, once without them.
    let zeroed = f.root.join("zeroed.h5ad");
    let absent = f.root.join("absent.h5ad");
    let mut o = SynthOptions::new(zeroed.clone(), 240, 100, 3, 5);
    o.undetected_genes = 20;
    synth::write(&o).expect("synth");
    synth::write(&SynthOptions::new(absent.clone(), 240, 80, 3, 5)).expect("synth");
    let (a, b) = (embed(&zeroed, "emb-zeroed", &[]), embed(&absent, "emb-absent", &[]));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(diff > 1e-3, "unmeasured genes were read as zeros (max difference {diff})");
    // Every pooling of the same layer differs from the others; a layer is one of the model's.
    let mean = embed(&f.store, "emb-mean", &["--embedding", "mean", "--layer", "-1"]);
    let expressed = embed(&f.store, "emb-expressed", &["--embedding", "expressed", "--layer", "1", "--gene-embeddings"]);
    assert_eq!(mean.len(), expressed.len());
    assert_ne!(mean, expressed);
    refused(&["--run", s(&f.run), "--data", s(&f.store), "--label-col", "cell_type", "--layer", "2", "--device", "cpu"], "the model has 1 layers");
    // Gene embeddings: the static table and one contextual matrix per class, opened as AnnData.
    let genes = dataloader::source::read_h5ad_obs(&f.root.join("emb-expressed/gene_embeddings.h5ad")).unwrap();
    assert_eq!(genes.index.len(), 100);
    assert!(genes.column("n_cells_type_0").is_some() && genes.column("n_cells_type_2").is_some());
}

fn refused(args: &[&str], expect: &str) {
    let o = eval(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(expect), "{args:?}: expected `{expect}` in: {err}");
}

#[test]
fn bad_input_exits_2_with_a_message_naming_the_problem() {
    let f = fixture();
    let (run, store) = (s(&f.run), s(&f.store));
    let out = f.root.join("refused");
    let out = s(&out);
    let base = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = ["--run", run, "--data", store, "--out", out, "--device", "cpu"].iter().map(|x| x.to_string()).collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let call = |extra: &[&'static str], expect: &str| {
        let v = base(extra);
        refused(&v.iter().map(String::as_str).collect::<Vec<_>>(), expect);
    };
    call(&["--label-col", "no_such_column"], "obs has no column `no_such_column`");
    call(&["--label-col", "cell_type", "--classes", "type_0"], "1 class(es)");
    call(&["--label-col", "cell_type", "--positive", "type_9"], "--positive value(s) type_9 do not occur");
    call(&["--label-col", "cell_type", "--test-frac", "0.99"], "the split needs at least");

    // A run directory without checkpoints.
    let empty = f.root.join("no-checkpoints");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(f.run.join("config.toml"), empty.join("config.toml")).unwrap();
    std::fs::copy(f.run.join("tokenizer.json"), empty.join("tokenizer.json")).unwrap();
    refused(&["--run", s(&empty), "--data", store, "--label-col", "cell_type", "--device", "cpu"], "has no checkpoints");

    // A tokenizer that is not the one the checkpoint was trained with.
    let swapped = f.root.join("swapped-tokenizer");
    copy_dir(&f.run, &swapped);
    let mut tok: serde_json::Value = serde_json::from_slice(&std::fs::read(swapped.join("tokenizer.json")).unwrap()).unwrap();
    tok["genes"][0] = serde_json::json!("renamed_gene");
    std::fs::write(swapped.join("tokenizer.json"), serde_json::to_vec(&tok).unwrap()).unwrap();
    refused(&["--run", s(&swapped), "--data", store, "--label-col", "cell_type", "--device", "cpu"], "is not the tokenizer checkpoint");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), &target).unwrap();
        } else if meta.is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// The default recipe (`configs/demo.toml`, as `make demo` runs it on the same generated data)
/// learns the planted types: its embedding separates them, is far above the untrained network
/// and holds less of the sequencing depth than expression PCA. Fails if the recipe regresses
/// to one that encodes depth instead of type (the binned masked-bin recipe scores 0.48 here).
#[test]
fn the_default_recipe_learns_the_planted_types() {
    std::env::set_var("HDF5_USE_FILE_LOCKING", "FALSE");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let src = root.join("demo.h5ad");
    synth::write(&SynthOptions::new(src.clone(), 2000, 200, 4, 7)).expect("synth");
    let store = root.join("demo.zarr");
    convert(&src, &store, &ConvertOptions::default()).expect("convert");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/demo.toml");
    let cfg = TrainConfig::load(&demo, &[format!("data.store=\"{}\"", store.display())]).expect("configs/demo.toml loads");
    let run_path = root.join("run");
    let run_dir = RunDir::prepare(&run_path, &Resume::No, false).expect("run dir");
    run(cfg, &run_dir, &RunOptions { device: tch::Device::Cpu, progress: false, stop_at_step: None }, &Single).expect("training");
    let out = root.join("eval");
    let o = eval(&["--run", s(&run_path), "--data", s(&store), "--label-col", "cell_type", "--out", s(&out), "--device", "cpu", "--max-layout-cells", "300"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = metrics(&out);
    let reps = m["representations"].as_array().unwrap();
    let bacc = |i: usize| reps[i]["probe"]["balanced_accuracy"].as_f64().unwrap();
    let depth = |i: usize| reps[i]["depth_r2"]["log_total_counts"].as_f64().unwrap();
    assert!(reps[0]["name"].as_str().unwrap().starts_with("neurofm (cls"), "the recipe's [CLS] pooling: {}", reps[0]["name"]);
    assert!(bacc(0) >= 0.95, "trained: {}", reps[0]);
    assert!(bacc(0) >= bacc(1) + 0.1, "trained {} vs untrained {}", bacc(0), bacc(1));
    assert!(depth(0) < depth(2), "depth R² of the embedding {} vs expression PCA {}", depth(0), depth(2));
}
