"""The real-data gate: the original study's pipeline on the WHB file, with the default recipe.

../shared/data/whb_cortex_L5exc_MGEinh.h5ad → `neurofm data convert` → 2-rank training through
`neurofm launch` (configs/whb-fast.toml, the recipe of benches/README.md) → `neurofm eval
--label-col subtype`, each step through the one `neurofm` command. Fails if the model's probe
accuracy is below 0.95, if validation perplexity did not fall below the per-gene table, or if an
output (events, checkpoints, embeddings.h5ad, plots, report) is missing or empty. About 4 minutes on 2 cores.

Run by `make test`:  python tests/e2e/whb_gate.py --bin-dir target/debug --data ../shared/data
"""

import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import tempfile

MIN_ACCURACY = 0.95
WHB = "whb_cortex_L5exc_MGEinh.h5ad"


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"gate FAILED: {' '.join(cmd[:2])} exited {p.returncode}\n{p.stderr[-4000:]}")
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", help="keep outputs here (default: a temporary directory)")
    args = ap.parse_args()
    src = os.path.join(args.data, WHB)
    if not os.path.exists(src):
        if os.environ.get("CI"):
            sys.exit(f"gate FAILED: {src} is missing in CI")
        print(f"skipping the WHB gate: {src} not found")
        return 0
    neurofm = os.path.join(os.path.abspath(args.bin_dir), "neurofm")
    work = args.work or tempfile.mkdtemp(prefix="neurofm-gate-")
    store, run_dir, out = (os.path.join(work, p) for p in ("whb.zarr", "run", "eval"))

    run([neurofm, "data", "convert", "-q", "--force", src, store])
    # fp32: bf16 matmuls are only fast on CPUs with bf16 units; the recipe is otherwise as shipped.
    run([neurofm, "launch", "--nproc-per-node", "2", "--backend", "mpi", "--",
         neurofm, "train", "--config", "configs/whb-fast.toml", "--data", store, "--run-dir", run_dir,
         "--force", "--no-progress", "--set", 'train.precision="fp32"'])
    run([neurofm, "eval", "--run-dir", run_dir, "--data", store, "--label-col", "subtype", "--out", out, "--no-progress"])

    problems = []
    wanted = {
        "TensorBoard events": glob.glob(os.path.join(run_dir, "events.out.tfevents.*")),
        "checkpoints/last": [os.path.join(run_dir, "checkpoints", "last")],
        "checkpoints/best": [os.path.join(run_dir, "checkpoints", "best")],
        "metrics.csv": [os.path.join(run_dir, "metrics.csv")],
        **{name: [os.path.join(out, name)] for name in
           ("embeddings.h5ad", "metrics.json", "report.html", "report.md", "pca.png", "umap.png", "tsne.png",
            "confusion.png", "roc.png", "training.png")},
    }
    for what, paths in wanted.items():
        if not any(os.path.exists(p) and (os.path.isdir(p) or os.path.getsize(p) > 0) for p in paths):
            problems.append(f"missing or empty: {what} ({paths[0] if paths else run_dir})")

    with open(os.path.join(run_dir, "metrics.csv")) as f:
        val = [r for r in csv.DictReader(f) if r["split"] == "val"]
    if not val:
        problems.append("metrics.csv has no validation row")
    else:
        last = val[-1]
        ppl, table = float(last["perplexity"]), float(last["baseline_perplexity"])
        print(f"validation perplexity {ppl:.1f} vs per-gene table {table:.1f}")
        if not ppl < table:
            problems.append(f"validation perplexity {ppl:.1f} did not fall below the per-gene table {table:.1f}")

    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    model = metrics["representations"][0]
    acc = model["probe"]["accuracy"]
    print(f"{model['name']}: probe accuracy {acc:.3f} (gate {MIN_ACCURACY})")
    for r in metrics["representations"][1:]:
        print(f"  {r['name']}: {r['probe']['accuracy']:.3f}")
    if acc < MIN_ACCURACY:
        problems.append(f"probe accuracy {acc:.3f} < {MIN_ACCURACY}")

    if problems:
        print("gate FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("gate passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
