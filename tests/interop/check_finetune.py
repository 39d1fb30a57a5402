"""Interop check of `neurofm-finetune` and `neurofm-annotate` against the Python stack, on
generated data with a condition shift (`neurofm-data synth --conditions 2`): the fine-tune is
trained on one condition (with per-gene augmentation) and tested on the other; it stays close
to logistic regression there; its scores equal scikit-learn's on its own predictions; our random forest and logistic baselines score within a stated margin of
scikit-learn's on the same features and cells; the TensorBoard events hold the fine-tuning
tags; and the annotated .h5ad opens in anndata with the input's obs, the labels, confidences,
probabilities (class names in uns) and embeddings, agreeing with the fine-tune's predictions.

Run by `make test-interop`:
  python check_finetune.py --bin-dir target/debug
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import tomllib
import warnings

import anndata as ad
import numpy as np
from sklearn import metrics as skm
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from checks import check, failures

warnings.filterwarnings("ignore")

# Our baselines may trail scikit-learn's by at most this much macro F1 on the same cells.
BASELINE_MARGIN = 0.05

# With per-gene augmentation (`augment.gene_scale`) the fine-tune carries its labels to the
# other condition at most this far below logistic regression (issue 15's goal is 0.02; measured
# 0.97 vs 0.99 here, and 0.67 without the augmentation: benches/README.md, "Fine-tuning").
TRANSFER_MARGIN = 0.1

# The default recipe of configs/demo.toml (rank-value sequences, masked genes + contrastive
# views, [CLS]), shorter and without its decorrelation term (the transfer numbers of
# benches/README.md were measured with this pretraining).
PRETRAIN = """
seed = 1
[data]
workers = 1
[tokenizer]
kind = "rank-value"
[sequence]
mode = "nonzero-plus-zeros"
max_len = 65
[views]
count = 2
thin_min = 0.3
[objectives]
contrastive = 1.0
[embedding]
pooling = "cls"
[model]
d_model = 32
n_heads = 2
n_layers = 2
d_ff = 64
dropout = 0.0
[optim]
lr = 2e-3
warmup_steps = 5
[train]
batch_size = 32
epochs = 3
log_every = 5
"""


def run(cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))}: exit {p.returncode}\n{p.stderr[-3000:]}")
    return p


def close(a, b, what, tol=1e-9):
    if a is None or b is None or abs(a - b) > tol:
        raise AssertionError(f"{what}: neurofm {a} vs scikit-learn {b}")


def read_tsv(path):
    return np.genfromtxt(path, delimiter="\t", names=True, dtype=None, encoding="utf-8")


@check("fine-tune scores equal scikit-learn's on its test predictions")
def check_scores(run_dir, m):
    pred = read_tsv(os.path.join(run_dir, "predictions.tsv"))
    truth, yhat = pred["truth"].astype(int), pred["pred_model"].astype(int)
    model = m["model"]
    close(model["accuracy"], skm.accuracy_score(truth, yhat), "accuracy")
    close(model["balanced_accuracy"], skm.balanced_accuracy_score(truth, yhat), "balanced accuracy")
    close(model["macro_f1"], skm.f1_score(truth, yhat, average="macro"), "macro F1")
    k = len(m["task"]["classes"])
    p, r, f, support = skm.precision_recall_fscore_support(truth, yhat, labels=list(range(k)), zero_division=0)
    for c, name in enumerate(m["task"]["classes"]):
        got = model["per_class"][name]
        close(got["precision"], p[c], f"precision of {name}")
        close(got["recall"], r[c], f"recall of {name}")
        close(got["f1"], f[c], f"F1 of {name}")
        assert got["support"] == support[c], (name, got["support"], support[c])
    cm = skm.confusion_matrix(truth, yhat, labels=list(range(k)))
    assert np.array_equal(cm, np.array(model["confusion"])), (cm, model["confusion"])


def expression(h5ad_path, cells, genes):
    """log1p(CP10k) of `cells` (obs names) over `genes` (var names), as the baselines see it."""
    a = ad.read_h5ad(h5ad_path)
    a = a[cells, genes]
    x = a.X.toarray().astype(np.float64)
    totals = x.sum(axis=1, keepdims=True)
    return np.log1p(x / np.maximum(totals, 1e-12) * 1e4)


@check("the augmented fine-tune carries its labels across the condition")
def check_transfer(m):
    ours, lr = m["model"]["macro_f1"], m["baselines"]["logistic_expression"]["macro_f1"]
    if ours < lr - TRANSFER_MARGIN:
        raise AssertionError(f"held-out condition macro F1 {ours:.3f}, logistic regression {lr:.3f}")


@check("our baselines score within the margin of scikit-learn's on the same cells")
def check_baselines(run_dir, m, h5ad_path):
    cells = read_tsv(os.path.join(run_dir, "cells.tsv"))
    genes = json.load(open(os.path.join(run_dir, "tokenizer.json")))["genes"]
    classes = m["task"]["classes"]
    y = np.array([classes.index(l) for l in cells["label"]])
    train, test = cells["part"] != "test", cells["part"] == "test"
    x = expression(h5ad_path, list(cells["cell"]), genes)
    forest = RandomForestClassifier(n_estimators=200, random_state=0, n_jobs=-1).fit(x[train], y[train])
    sk_rf = skm.f1_score(y[test], forest.predict(x[test]), average="macro")
    ours_rf = m["baselines"]["random_forest"]["macro_f1"]
    if abs(ours_rf - sk_rf) > BASELINE_MARGIN:
        raise AssertionError(f"random forest macro F1: ours {ours_rf:.3f} vs scikit-learn {sk_rf:.3f}")
    # Log-normalized expression as it is, not standardized (finetune/src/baselines.rs).
    c = m["baselines"]["logistic_expression"]["detail"]["c"]
    lr = LogisticRegression(C=c, max_iter=2000).fit(x[train], y[train])
    sk_lr = skm.f1_score(y[test], lr.predict(x[test]), average="macro")
    ours_lr = m["baselines"]["logistic_expression"]["macro_f1"]
    if abs(ours_lr - sk_lr) > BASELINE_MARGIN:
        raise AssertionError(f"logistic regression (C = {c}) macro F1: ours {ours_lr:.3f} vs scikit-learn {sk_lr:.3f}")
    print(f"      random forest {ours_rf:.3f} (scikit-learn {sk_rf:.3f}), logistic {ours_lr:.3f} (scikit-learn {sk_lr:.3f})")


def d_model(run_dir):
    """Width of the fine-tuned encoder (the cell embedding of a `cls` or `mean` pooling)."""
    with open(os.path.join(run_dir, "config.toml"), "rb") as f:
        return tomllib.load(f)["model"]["d_model"]


@check("the events hold finetune/* scalars TensorBoard can read, and val/* only with validation cells")
def check_events(run_dir, m):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for t in ["finetune/loss", "finetune/lr", "finetune/grad_norm", "finetune/cells_per_s", "finetune/accuracy"]:
        assert t in tags, f"{t} missing; have {tags}"
    train_acc = [e.value for e in acc.Scalars("finetune/accuracy")]
    assert train_acc and all(0.0 <= v <= 1.0 for v in train_acc), train_acc
    val = [t for t in tags if t.startswith("val/")]
    if m["task"]["val_cells"] == 0:
        assert not val, f"validation scalars {val} without validation cells"
    else:
        assert {"val/loss", "val/macro_f1", "val/accuracy", "val/balanced_accuracy"} <= set(val), val


@check("the annotated .h5ad opens in anndata with obs, labels, probabilities and embeddings")
def check_annotation(run_dir, m, h5ad_path, out):
    src = ad.read_h5ad(h5ad_path)
    a = ad.read_h5ad(out)
    assert a.n_obs == src.n_obs and list(a.obs_names) == list(src.obs_names), "same cells in the same order"
    for col in src.obs.columns:
        assert (a.obs[col].astype(str).values == src.obs[col].astype(str).values).all(), f"obs {col} changed"
    classes = list(a.uns["neurofm_classes"])
    assert classes == m["task"]["classes"], (classes, m["task"]["classes"])
    p = a.obsm["neurofm_probabilities"]
    assert p.shape == (a.n_obs, len(classes)) and np.allclose(p.sum(axis=1), 1.0, atol=1e-4)
    assert a.obsm["X_neurofm"].shape[1] == d_model(run_dir), a.obsm["X_neurofm"].shape
    assert str(a.obs["neurofm_label"].dtype) == "category"
    conf = a.obs["neurofm_confidence"].values
    assert np.allclose(conf, p.max(axis=1), atol=1e-6), "confidence is the top probability"
    labels = a.obs["neurofm_label"].astype(str).values
    top = np.array(classes)[p.argmax(axis=1)]
    assert (labels == np.where(conf >= 0.5, top, "unassigned")).all(), "below 0.5 is unassigned"
    assert a.uns["neurofm_annotation"]["model_genes_found"] == a.uns["neurofm_annotation"]["model_genes"]
    # The held-out condition's labels agree with the fine-tune's test predictions.
    pred = read_tsv(os.path.join(run_dir, "predictions.tsv"))
    by_name = dict(zip(a.obs_names, top))
    ours = np.array([by_name[c] for c in pred["cell"]])
    assert (ours == np.array(classes)[pred["pred_model"].astype(int)]).all(), "annotate and fine-tune disagree on test cells"
    print(f"      {a.n_obs} cells annotated, {(labels == 'unassigned').sum()} unassigned")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True)
    args = ap.parse_args()
    b = os.path.abspath(args.bin_dir)
    os.environ["HDF5_USE_FILE_LOCKING"] = "FALSE"
    with tempfile.TemporaryDirectory() as tmp:
        h5ad = os.path.join(tmp, "cells.h5ad")
        store = os.path.join(tmp, "cells.zarr")
        run([f"{b}/neurofm-data", "-q", "synth", h5ad, "--cells", "600", "--genes", "120", "--types", "4", "--conditions", "2", "--seed", "4"])
        run([f"{b}/neurofm-data", "convert", "-q", h5ad, store])
        cfg = os.path.join(tmp, "pretrain.toml")
        open(cfg, "w").write(PRETRAIN)
        pre = os.path.join(tmp, "pretrained")
        run([f"{b}/neurofm-train", "--config", cfg, "--data", store, "--run-dir", pre, "--device", "cpu", "--no-progress"])
        ft = os.path.join(tmp, "ft")
        run([f"{b}/neurofm-finetune", "--pretrained", pre, "--data", store, "--label-col", "cell_type", "--split", "group:condition", "--test-frac", "0.5",
             "--run-dir", ft, "--device", "cpu", "--no-progress", "--set", "train.epochs=40", "--set", "train.patience=0", "--set", "augment.gene_scale=1",
             "--set", "train.batch_size=16", "--set", "head.hidden=64"])
        m = json.load(open(os.path.join(ft, "metrics.json")))
        print(f"      fine-tuned macro F1 {m['model']['macro_f1']:.3f} on the held-out condition; "
              + ", ".join(f"{k} {v['macro_f1']:.3f}" for k, v in m["baselines"].items()))
        out = os.path.join(tmp, "annotated.h5ad")
        run([f"{b}/neurofm-annotate", "--model", ft, "--data", h5ad, "--out", out, "--device", "cpu"])
        check_scores(ft, m)
        check_transfer(m)
        check_baselines(ft, m, h5ad)
        check_events(ft, m)
        check_annotation(ft, m, h5ad, out)
    sys.exit(1 if failures() else 0)


if __name__ == "__main__":
    main()
