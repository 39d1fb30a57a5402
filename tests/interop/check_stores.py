"""Interop check: stores written by `neurofm-data convert` open in `anndata.read_zarr` and
hold exactly the source's counts, obs and var after the recorded selection and permutation.

Run by `make test`:  python check_stores.py --bin target/debug/neurofm-data --data ../shared/data
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from checks import RESULTS, check, failures

warnings.filterwarnings("ignore")

def convert(binary, src, out, *extra, expect=0):
    p = subprocess.run([binary, "convert", "-q", src, out, *extra], capture_output=True, text=True)
    if p.returncode != expect:
        raise AssertionError(f"convert {src} {extra}: exit {p.returncode}, expected {expect}\n{p.stderr}")
    return p


def source_counts(path, counts):
    """The source's count matrix (CSR, cells × genes) with obs/var frames, read independently."""
    if path.endswith(".loom"):
        with h5py.File(path) as f:
            X = sp.csr_matrix(f["matrix"][...].T.astype(np.float64))
            obs = {k: f["col_attrs"][k][...] for k in f["col_attrs"]}
            var = {k: f["row_attrs"][k][...] for k in f["row_attrs"]}
        return X, obs, var
    a = ad.read_h5ad(path)
    if counts == "X":
        X, var = a.X, a.var
    elif counts == "raw/X":
        X, var = a.raw.X, a.raw.var
    else:
        X, var = a.layers[counts.split("/", 1)[1]], a.var
    return sp.csr_matrix(X).astype(np.float64), a.obs.assign(_name=a.obs_names), var.assign(_name=var.index)


def as_text(values):
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values])


def compare(store_path, src_path, gene_rows=None):
    a = ad.read_zarr(store_path)
    prov = json.loads(a.uns["neurofm"]["provenance"])
    rows = np.asarray(a.uns["neurofm"]["cell_source_row"])
    X, obs, var = source_counts(src_path, prov["counts_source"])
    genes = np.arange(X.shape[1]) if gene_rows is None else gene_rows
    expected = X[rows][:, genes]
    got = sp.csr_matrix(a.X).astype(np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert abs(got - expected).max() == 0, "counts differ"
    assert np.array_equal(np.asarray(a.uns["neurofm"]["cell_total"]), np.asarray(expected.sum(axis=1)).ravel())
    assert np.array_equal(np.asarray(a.uns["neurofm"]["gene_nnz"]), np.diff(sp.csc_matrix(expected).indptr))
    if src_path.endswith(".loom"):
        names = as_text(obs["Cell_id"])[rows]
        assert list(a.obs_names) == list(names), "obs names"
        assert list(as_text(a.obs["Cell_cluster"])) == list(as_text(obs["Cell_cluster"])[rows])
        assert list(a.var_names) == list(as_text(var["Gene"])[genes])
    else:
        assert list(a.obs_names) == list(obs["_name"].iloc[rows]), "obs names"
        for col in a.obs.columns:
            assert list(as_text(a.obs[col])) == list(as_text(obs[col].iloc[rows])), f"obs column {col}"
        assert list(a.var_names) == list(var["_name"].iloc[genes]), "var names"
        for col in a.var.columns:
            assert list(as_text(a.var[col])) == list(as_text(var[col].iloc[genes])), f"var column {col}"
    return a, prov, rows


def write_legacy_h5ad(src, out):
    """Writes `src` in anndata 0.6's layout: obs/var as compound datasets (the index first,
    strings fixed-width), string columns with few values as integer codes whose categories are
    in `uns/<column>_categories`, sparse X by `h5sparse_format`/`h5sparse_shape`, no
    `encoding-type` attributes anywhere."""
    a = ad.read_h5ad(src)
    X = sp.csr_matrix(a.X)

    def records(df, index):
        names, arrays, uns = ["index"], [np.array(index, dtype="S")], {}
        for k in df.columns:
            col = df[k]
            names.append(k)
            if col.dtype == "category" or col.dtype == object:
                c = col.astype("category")
                if len(c.cat.categories) < len(c):
                    uns[k + "_categories"] = np.array(c.cat.categories.astype(str), dtype="S")
                    arrays.append(c.cat.codes.to_numpy())
                else:
                    arrays.append(np.array(col.astype(str), dtype="S"))
            else:
                arrays.append(col.to_numpy())
        return np.rec.fromarrays(arrays, names=names), uns

    extra = dict(n_counts=np.asarray(X.sum(1)).ravel().astype(np.float32), rank=np.arange(a.n_obs), odd=np.arange(a.n_obs) % 2 == 1)
    obs, uns_obs = records(a.obs.assign(**extra), a.obs_names)
    var, uns_var = records(a.var, a.var_names)
    with h5py.File(out, "w") as f:
        g = f.create_group("X")
        g.attrs["h5sparse_format"] = "csr"
        g.attrs["h5sparse_shape"] = np.array(X.shape)
        g["data"], g["indices"], g["indptr"] = X.data, X.indices, X.indptr
        f["obs"], f["var"] = obs, var
        u = f.create_group("uns")
        for k, v in {**uns_obs, **uns_var}.items():
            u[k] = v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--data", required=True)
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    data = args.data
    if not os.path.isdir(data):
        if os.environ.get("CI"):
            print(f"shared data directory {data} is missing in CI")
            return 1
        print(f"skipping interop checks on real data: {data} not found")
        data = None
    tmp = tempfile.mkdtemp(prefix="neurofm-interop-")

    files = {
        "whb": "whb_cortex_L5exc_MGEinh.h5ad",
        "zeisel": "zeisel2015_ca1_interneuron_endothelial_dense.h5ad",
        "kang": "kang2018_pbmc_muscat_subset_ensembl_countslayer.h5ad",
        "furlan": "furlan2016_sympathetic_neurons.loom",
        "metaneighbor": "mouse_cortex_interneurons_metaneighbor_mixed_umi_rpkm.h5ad",
    }

    def each(key, fname):
        @check(f"{key}: converts and anndata.read_zarr equals the source")
        def t():
            src = os.path.join(data, fname)
            out = os.path.join(tmp, key + ".zarr")
            extra = ["--allow-non-integer"] if key == "metaneighbor" else []
            convert(binary, src, out, *extra)
            _, prov, rows = compare(out, src)
            assert sorted(rows) == list(range(len(rows))), "all cells, each once"
            assert rows.tolist() != sorted(rows), "cells are shuffled by default"
            if key == "kang":
                assert prov["counts_source"] == "layers/counts", prov["counts_source"]
        t()

    if data:
        for key, fname in files.items():
            each(key, fname)

        @check("metaneighbor: mixed counts/RPKM is refused without --allow-non-integer")
        def refused():
            p = convert(binary, os.path.join(data, files["metaneighbor"]), os.path.join(tmp, "mn-refused.zarr"), expect=2)
            assert "non-integer" in p.stderr and "--allow-non-integer" in p.stderr, p.stderr
            assert not os.path.exists(os.path.join(tmp, "mn-refused.zarr"))
        refused()

        @check("whb: --keep + --genes hvg:500 + --no-shuffle select what s4/s8 did")
        def selection():
            src = os.path.join(data, files["whb"])
            out = os.path.join(tmp, "whb-sel.zarr")
            convert(binary, src, out, "--keep", "subtype=cluster_2523", "--genes", "hvg:500", "--no-shuffle")
            s = ad.read_h5ad(src)
            a0 = ad.read_zarr(out)
            genes = np.array([s.var_names.get_loc(g) for g in a0.var_names])
            a, prov, rows = compare(out, src, gene_rows=genes)
            assert a.n_obs == 620 and a.n_vars == 500, a.shape
            assert set(a.obs["subtype"]) == {"cluster_2523"}
            assert rows.tolist() == sorted(rows), "--no-shuffle keeps source order"
            assert prov["gene_selection"] == "hvg:500" and prov["keep"] == ["subtype=cluster_2523"]
        selection()

        @check("whb: --cell-metadata joins a CSV usable by --keep")
        def metadata():
            src = os.path.join(data, files["whb"])
            s = ad.read_h5ad(src)
            csv = os.path.join(tmp, "meta.csv")
            with open(csv, "w") as f:
                f.write("cell_label,region,x\n")
                for i, name in enumerate(s.obs_names):
                    f.write(f"{name},{'A' if i % 3 == 0 else 'B'},{i * 0.5}\n")
            out = os.path.join(tmp, "whb-meta.zarr")
            convert(binary, src, out, "--cell-metadata", csv, "--metadata-key", "cell_label", "--keep", "region=A")
            a = ad.read_zarr(out)
            assert a.n_obs == len(range(0, s.n_obs, 3)), a.n_obs
            assert set(a.obs["region"]) == {"A"} and "x" in a.obs.columns
            src_rows = np.asarray(a.uns["neurofm"]["cell_source_row"])
            assert np.allclose(a.obs["x"].to_numpy(), src_rows * 0.5)
        metadata()

        @check("whb in anndata 0.6's layout: inspect reads obs/var, convert equals anndata's reading")
        def legacy():
            src = os.path.join(tmp, "whb-legacy.h5ad")
            write_legacy_h5ad(os.path.join(data, files["whb"]), src)
            p = subprocess.run([binary, "inspect", src], capture_output=True, text=True)
            assert p.returncode == 0, p.stderr
            assert "subtype" in p.stdout and "categorical       2 distinct" in p.stdout, p.stdout
            out = os.path.join(tmp, "whb-legacy.zarr")
            convert(binary, src, out)
            a, _, _ = compare(out, src)
            assert list(a.obs["subtype"].cat.categories) == ["cluster_210", "cluster_2523"]
            assert a.obs["odd"].dtype == bool and a.obs["rank"].dtype.kind == "i", a.obs.dtypes
        legacy()

        # --genes hvg:N is scanpy's flavor="seurat" on CP10k + log1p of the same cells. Genes may
        # differ only where scanpy's normalized dispersion ties the cut-off (float32 round-off).
        def hvg_case(key, fname, n, *extra, source=None):
            @check(f"{key}: --genes hvg:{n} equals scanpy flavor=seurat")
            def t():
                src = source or os.path.join(data, fname)
                out = os.path.join(tmp, f"{key}-hvg.zarr")
                convert(binary, src, out, "--genes", f"hvg:{n}", "--allow-non-integer", *extra)
                store = ad.read_zarr(out)
                prov = json.loads(store.uns["neurofm"]["provenance"])
                rows = np.sort(np.asarray(store.uns["neurofm"]["cell_source_row"]))
                X, _, var = source_counts(src, prov["counts_source"])
                names = as_text(var["Gene"]) if src.endswith(".loom") else np.asarray(var["_name"])
                ref = ad.AnnData(X[rows].astype(np.float32), var=pd.DataFrame(index=names))
                sc.pp.normalize_total(ref, target_sum=1e4)
                sc.pp.log1p(ref)
                sc.pp.highly_variable_genes(ref, flavor="seurat", n_top_genes=n)
                want = set(ref.var_names[ref.var["highly_variable"]])
                got = set(store.var_names)
                norm = ref.var["dispersions_norm"].to_numpy()
                cut = np.sort(np.nan_to_num(norm, nan=-np.inf))[::-1][n - 1]
                differ = sorted(want ^ got)
                far = [g for g in differ if abs(norm[ref.var_names.get_loc(g)] - cut) > 1e-3]
                assert not far, f"{len(differ)} genes differ, {len(far)} not at the cut-off {cut:.4f}: {far[:8]}"
                assert abs(len(got) - len(want)) <= len(differ), (len(got), len(want))
            t()

        hvg_case("whb", files["whb"], 500)
        hvg_case("whb-exc", files["whb"], 500, "--keep", "subtype=cluster_2523")
        hvg_case("zeisel", files["zeisel"], 300)
        hvg_case("kang", files["kang"], 400)
        hvg_case("metaneighbor", files["metaneighbor"], 1000)
        hvg_case("furlan", files["furlan"], 2000)
        # 200 genes never detected: they widen scanpy's mean bins, which a binning over detected
        # genes only would miss.
        s = ad.read_h5ad(os.path.join(data, files["whb"]))
        zeros = sp.csr_matrix((s.n_obs, 200), dtype=s.X.dtype)
        padded = ad.AnnData(sp.hstack([s.X, zeros]).tocsr(), obs=s.obs,
                            var=pd.DataFrame(index=list(s.var_names) + [f"UNDETECTED{i}" for i in range(200)]))
        padded_path = os.path.join(tmp, "whb-undetected.h5ad")
        padded.write_h5ad(padded_path)
        hvg_case("whb+200 undetected", None, 500, source=padded_path)

    failed = failures()
    return 1 if failed or not RESULTS and data else 0


if __name__ == "__main__":
    sys.exit(main())
