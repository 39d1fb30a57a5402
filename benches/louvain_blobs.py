#!/usr/bin/env python3
# benches/louvain_blobs.py (issue 12; run with the interop venv: ~/.cache/neurofm/pyenv/bin/python):
# Louvain (resolution 1) on the UMAP-style fuzzy kNN graph (k=15, cosine), as neurofm-eval and
# scanpy cluster: 4 well-separated isotropic Gaussian types of 500 cells, within-type noise in
# d_int dimensions. Does a low intrinsic dimension alone make Louvain split the types?
import sys, numpy as np, scanpy as sc, anndata as ad, networkx as nx
from sklearn.metrics import adjusted_rand_score, silhouette_score
rows = []
for d_int in [2, 3, 5, 10, 20, 30]:
    for seed in [0, 1, 2]:
        rng = np.random.default_rng(seed)
        D = 32
        centers = rng.normal(size=(4, D)) * 3.0 + 10.0  # far from the origin (cosine metric)
        basis = np.linalg.qr(rng.normal(size=(D, D)))[0][:, :d_int]
        y = np.repeat(np.arange(4), 500)
        x = centers[y] + rng.normal(size=(2000, d_int)) @ basis.T * 0.5
        a = ad.AnnData(x.astype(np.float32))
        sc.pp.neighbors(a, use_rep="X", n_neighbors=15, metric="cosine", random_state=seed)
        g = nx.from_scipy_sparse_array(a.obsp["connectivities"])
        comms = nx.community.louvain_communities(g, resolution=1.0, seed=seed)
        lab = np.zeros(2000, int)
        for i, c in enumerate(comms):
            lab[list(c)] = i
        rows.append((d_int, seed, len(comms), adjusted_rand_score(y, lab), silhouette_score(x, y)))
for d in sorted({r[0] for r in rows}):
    rs = [r for r in rows if r[0] == d]
    print(f"d_int {d:>2}: communities {[r[2] for r in rs]}, ARI {[round(r[3], 3) for r in rs]}, silhouette {np.mean([r[4] for r in rs]):.2f}")
