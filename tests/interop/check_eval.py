"""Interop check of `neurofm-eval` against the Python stack, on the real WHB file:
metrics equal scikit-learn's on the same predictions, PCA equals NumPy's SVD up to sign,
`embeddings.h5ad` opens in anndata, every PNG is a valid image of the expected size, and our
UMAP keeps neighbourhoods as well as `umap-learn` (within a stated margin).

Run by `make test`:
  python check_eval.py --bin-dir target/debug --data ../shared/data
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib

import anndata as ad
import numpy as np
from sklearn import metrics as skm
from sklearn.decomposition import PCA
from sklearn.manifold import trustworthiness
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from checks import RESULTS, check, failures

warnings.filterwarnings("ignore")

PNG_SIZE = (960, 720)
# Our UMAP may trail umap-learn by at most this much on each neighbourhood score.
UMAP_KNN_MARGIN = 0.05
UMAP_TRUST_MARGIN = 0.03


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stderr[-3000:]}")
    return p


def close(a, b, what, tol=1e-9):
    if a is None or b is None or abs(a - b) > tol:
        raise AssertionError(f"{what}: neurofm {a} vs scikit-learn {b}")


@check("probe metrics equal scikit-learn's on the same predictions")
def check_metrics(out, m):
    pred = np.genfromtxt(os.path.join(out, "predictions.tsv"), delimiter="\t", names=True, dtype=None, encoding="utf-8")
    truth, yhat = pred["truth"].astype(int), pred["pred"].astype(int)
    probs = np.column_stack([pred[n] for n in pred.dtype.names[3:]])
    model = m["representations"][0]["probe"]
    close(model["accuracy"], skm.accuracy_score(truth, yhat), "accuracy")
    close(model["balanced_accuracy"], skm.balanced_accuracy_score(truth, yhat), "balanced accuracy")
    close(model["macro_f1"], skm.f1_score(truth, yhat, average="macro"), "macro F1")
    k = probs.shape[1]
    if k == 2:
        close(model["f1_positive"], skm.f1_score(truth, yhat), "F1 of class 1")
    auc = skm.roc_auc_score(truth, probs[:, 1]) if k == 2 else skm.roc_auc_score(truth, probs, multi_class="ovr", average="macro")
    close(model["roc_auc"], auc, "ROC-AUC", tol=1e-7)
    cm = skm.confusion_matrix(truth, yhat, labels=list(range(k)))
    if not np.array_equal(cm, np.array(m["representations"][0]["confusion"])):
        raise AssertionError(f"confusion matrix differs:\n{cm}\nvs {m['representations'][0]['confusion']}")


@check("clustering agreement, silhouette and participation ratio equal scikit-learn's and numpy's")
def check_clustering(out, m):
    cells = np.genfromtxt(os.path.join(out, "cells.tsv"), delimiter="\t", names=True, dtype=None, encoding="utf-8")
    r = m["representations"][0]
    close(r["cluster_ari"], skm.adjusted_rand_score(cells["label"], cells["cluster"]), "ARI")
    close(r["cluster_nmi"], skm.normalized_mutual_info_score(cells["label"], cells["cluster"]), "NMI")
    emb = np.load(os.path.join(out, "embeddings.npy")).astype(np.float64)
    close(r["silhouette"], skm.silhouette_score(emb, cells["label"]), "silhouette", tol=1e-6)
    ev = np.linalg.eigvalsh(np.cov(emb, rowvar=False))
    close(r["effective_dims"], ev.sum() ** 2 / (ev ** 2).sum(), "participation ratio", tol=1e-6)


@check("depth R² of every representation equals scikit-learn's cross-validated ridge")
def check_depth(out, m, store):
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import PredefinedSplit, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    cells = np.genfromtxt(os.path.join(out, "cells.tsv"), delimiter="\t", names=True, dtype=None, encoding="utf-8")
    x = ad.read_zarr(store).X
    totals = np.asarray(x.sum(axis=1)).ravel()[cells["store_row"]]
    target = np.log1p(totals)
    emb = np.load(os.path.join(out, "embeddings.npy")).astype(np.float64)
    n = len(target)
    folds = PredefinedSplit(np.arange(n) % 5)
    # neurofm: ridge on standardized features, its penalty per training cell chosen from these
    # by leave-one-out error on the training part.
    penalties = np.array([1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    pred = np.zeros(n)
    for train, test in folds.split():
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=penalties * len(train)))
        pred[test] = model.fit(emb[train], target[train]).predict(emb[test])
    close(m["representations"][0]["depth_r2"]["log_total_counts"], skm.r2_score(target, pred), "depth R² (log total counts)", tol=1e-4)
    qc = next(r for r in m["representations"] if r["name"].startswith("QC"))
    if qc["depth_r2"]["log_total_counts"] < 0.99:
        raise AssertionError(f"the QC features hold log total counts, R² must be ~1: {qc['depth_r2']}")


@check("PCA of the embeddings equals NumPy's SVD up to sign")
def check_pca(out, m):
    a = ad.read_h5ad(os.path.join(out, "embeddings.h5ad"))
    emb = np.load(os.path.join(out, "embeddings.npy")).astype(np.float64)
    xc = emb - emb.mean(axis=0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:2].T
    ours = np.asarray(a.obsm["X_pca"], dtype=np.float64)
    for j in range(2):
        sign = np.sign(ours[:, j] @ ref[:, j])
        err = np.abs(ours[:, j] - sign * ref[:, j]).max() / np.abs(ref[:, j]).max()
        if err > 1e-4:
            raise AssertionError(f"PC{j + 1}: max relative difference {err:.2e}")
    ratio = (s**2 / (s**2).sum())[:2]
    if not np.allclose(m["layouts"]["pca_explained_variance_ratio"], ratio, atol=1e-6):
        raise AssertionError(f"explained variance {m['layouts']['pca_explained_variance_ratio']} vs {ratio}")


@check("embeddings.h5ad opens in anndata with obs and obsm['X_neurofm']")
def check_h5ad(out, m, label_col):
    a = ad.read_h5ad(os.path.join(out, "embeddings.h5ad"))
    emb = np.load(os.path.join(out, "embeddings.npy"))
    if a.n_obs != emb.shape[0] or not np.array_equal(np.asarray(a.obsm["X_neurofm"]), emb):
        raise AssertionError("obsm['X_neurofm'] differs from embeddings.npy")
    cells = np.genfromtxt(os.path.join(out, "cells.tsv"), delimiter="\t", names=True, dtype=None, encoding="utf-8")
    if list(a.obs_names) != list(cells["cell"]):
        raise AssertionError("obs names differ from cells.tsv")
    for col in (label_col, "neurofm_class", "neurofm_split", "neurofm_cluster"):
        if col not in a.obs:
            raise AssertionError(f"obs lacks {col}")
    for key in ("X_pca", "X_tsne", "X_umap"):
        if a.obsm[key].shape != (a.n_obs, 2) or not np.isfinite(a.obsm[key]).all():
            raise AssertionError(f"obsm[{key}] has shape {a.obsm[key].shape} or non-finite values")
    counts = np.bincount(a.obs["neurofm_class"].cat.codes)
    if sorted(counts.tolist()) != sorted(m["data"]["class_counts"]):
        raise AssertionError(f"class counts {counts} vs {m['data']['class_counts']}")


def png_ok(path):
    """Checks signature, chunk CRCs, IHDR size and that IDAT inflates to the right length."""
    b = open(path, "rb").read()
    if b[:8] != b"\x89PNG\r\n\x1a\n":
        raise AssertionError(f"{path}: no PNG signature")
    pos, idat, size, bpp = 8, b"", None, None
    while pos < len(b):
        (length,) = struct.unpack(">I", b[pos:pos + 4])
        kind, data = b[pos + 4:pos + 8], b[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", b[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + data) != crc:
            raise AssertionError(f"{path}: bad CRC in {kind}")
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", data[:10])
            size, bpp = (w, h), {2: 3, 6: 4, 0: 1, 4: 2}[color] * depth // 8
        elif kind == b"IDAT":
            idat += data
        elif kind == b"IEND":
            break
        pos += 12 + length
    raw = zlib.decompress(idat)
    if len(raw) != size[1] * (1 + size[0] * bpp):
        raise AssertionError(f"{path}: image data has {len(raw)} bytes, expected {size[1] * (1 + size[0] * bpp)}")
    return size


@check("every PNG is a valid image of 960 × 720")
def check_pngs(out):
    pngs = [f for f in os.listdir(out) if f.endswith(".png")]
    if len(pngs) < 6:
        raise AssertionError(f"only {pngs}")
    for f in pngs:
        if png_ok(os.path.join(out, f)) != PNG_SIZE:
            raise AssertionError(f"{f}: wrong size")


def neighbourhood_scores(x, y, labels):
    knn = cross_val_score(KNeighborsClassifier(5), y, labels, cv=5).mean()
    return knn, trustworthiness(x, y, n_neighbors=15, metric="cosine")


@check("our UMAP keeps neighbourhoods as well as umap-learn (kNN-label accuracy, trustworthiness)")
def check_umap(bin_dir, tmp, name, x, labels):
    import umap  # imported here: numba compiles on first use

    inp, outp = os.path.join(tmp, f"{name}.npy"), os.path.join(tmp, f"{name}-umap.npy")
    np.save(inp, x.astype(np.float32))
    run([os.path.join(bin_dir, "neurofm-eval"), "layout", "--input", inp, "--method", "umap", "--out", outp])
    ours = np.load(outp)
    ref = umap.UMAP(n_neighbors=15, metric="cosine", random_state=0).fit_transform(x)
    (ok, ot), (rk, rt) = neighbourhood_scores(x, ours, labels), neighbourhood_scores(x, ref, labels)
    print(f"      {name}: 5-NN label accuracy {ok:.3f} (umap-learn {rk:.3f}), trustworthiness {ot:.3f} (umap-learn {rt:.3f})")
    if ok < rk - UMAP_KNN_MARGIN or ot < rt - UMAP_TRUST_MARGIN:
        raise AssertionError(f"{name}: ours ({ok:.3f}, {ot:.3f}) trails umap-learn ({rk:.3f}, {rt:.3f}) by more than the margin")


def log_pca(path, label_col, n_pcs=50):
    a = ad.read_h5ad(path)
    x = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    x = np.log1p(x / np.maximum(x.sum(axis=1, keepdims=True), 1e-12) * 1e4)
    return PCA(n_pcs, random_state=0).fit_transform(x), a.obs[label_col].astype(str).to_numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--data", required=True)
    args = ap.parse_args()
    whb = os.path.join(args.data, "whb_cortex_L5exc_MGEinh.h5ad")
    meta = os.path.join(args.data, "mouse_cortex_interneurons_metaneighbor_mixed_umi_rpkm.h5ad")
    if not os.path.exists(whb):
        # As the other checks: missing shared data fails in CI and is skipped elsewhere.
        if os.environ.get("CI"):
            sys.exit(f"shared data {whb} is missing in CI")
        print(f"skipping eval interop checks: {whb} not found")
        return
    b = lambda name: os.path.join(args.bin_dir, name)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="neurofm-eval-check-") as tmp:
        store, run_dir, out = (os.path.join(tmp, n) for n in ("whb.zarr", "run", "eval"))
        run([b("neurofm-data"), "convert", "-q", whb, store])
        run([b("neurofm-train"), "--config", "configs/debug-cpu.toml", "--data", store, "--run-dir", run_dir,
             "--device", "cpu", "--no-progress", "--set", "train.epochs=1", "--set", "train.max_steps=8"])
        run([b("neurofm-eval"), "--run", run_dir, "--data", store, "--label-col", "subtype",
             "--positive", "cluster_2523", "--negative", "cluster_210", "--out", out, "--device", "cpu"])
        m = json.load(open(os.path.join(out, "metrics.json")))
        check_metrics(out, m)
        check_clustering(out, m)
        check_depth(out, m, store)
        check_pca(out, m)
        check_h5ad(out, m, "subtype")
        check_pngs(out)
        for name, path, col in (("whb", whb, "subtype"), ("metaneighbor", meta, "cell_type")):
            x, labels = log_pca(path, col)
            check_umap(args.bin_dir, tmp, name, x, labels)
    sys.exit(1 if failures() or not RESULTS else 0)


if __name__ == "__main__":
    main()
