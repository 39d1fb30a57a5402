#!/usr/bin/env bash
# Evaluation speed, release build: embedding cells/s of RUN's model on the WHB file (its
# t-SNE/UMAP time for those 1152 cells too), then UMAP and t-SNE time for N generated cells
# (a 64-dimensional mixture of 8 Gaussians, the shape of an embedding).
# usage: benches/eval_speed.sh RUN [N]      (RUN: a run directory trained on WHB)
set -euo pipefail
run=${1:?run directory}; n=${2:-10000}
cache=${CACHE:-$HOME/.cache/neurofm}/bench
py=${NEUROFM_PYTHON:-python3}
mkdir -p "$cache"
store=${BENCH_STORE:-$cache/whb.zarr}
if [ ! -e "$store/uns/neurofm" ]; then
  target/release/neurofm-data convert --force -q "${NEUROFM_SHARED_DATA:-../shared/data}/whb_cortex_L5exc_MGEinh.h5ad" "$store"
fi
out="$cache/eval-$(basename "$run")"
target/release/neurofm-eval --run "$run" --data "$store" --label-col subtype --out "$out" --device "${DEVICE:-auto}" 2> "$out.log" \
  || { tail -20 "$out.log"; exit 1; }
"$py" - "$out/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
e, l = m["embedding"], m["layouts"]
print(f"embedding: {m['data']['cells']} cells in {e['seconds']:.1f} s = {e['cells_per_s']:.1f} cells/s on {e['device']} ({e['pooling']}, dim {e['dim']})")
print(f"layouts of {l['cells']} cells: t-SNE {l['tsne_seconds']:.1f} s, UMAP {l['umap_seconds']:.1f} s")
PY
"$py" -c "
import numpy as np
rng = np.random.default_rng(0)
centres = rng.normal(0, 3, (8, 64))
x = centres[rng.integers(0, 8, $n)] + rng.normal(0, 1, ($n, 64))
np.save('$cache/layout-$n.npy', x.astype(np.float32))"
for method in umap tsne; do
  target/release/neurofm-eval layout --input "$cache/layout-$n.npy" --method "$method" --out "$cache/layout-$n-$method.npy"
done
