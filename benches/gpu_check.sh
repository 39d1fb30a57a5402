#!/usr/bin/env bash
# The one-call GPU check (`make gpu-bundle` puts it, stripped binaries and their libraries in
# .gpu-bundle/). Runs on a machine with an NVIDIA GPU and PyTorch 2.11 but no Rust, in under
# 8 minutes on one H100/H200, and writes one JSON ($OUT/gpu_check.json, OUT defaults to
# ./gpu-check-out):
#   preflight  device choice, GPU, driver, NCCL version and path, SDPA kernel
#   train      single-gpu.toml shapes (d 512, 12 layers, 2001 binned tokens, masked bins only: the
#              PyTorch reference's model, bf16) for 50 steps on
#              generated cells: loss must fall; cells/s, MFU and the step split
#   torch      the same model in PyTorch eager (bf16 autocast) on the same GPU: cells/s ratio
#   nccl       NCCL communicator init and all-reduce at world size 1
#   embed      neurofm-eval on 10,000 cells: embedding cells/s on the GPU
# Exits 2 with a message on a machine without an NVIDIA GPU, 1 if a check fails.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$PWD/gpu-check-out}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ ! -e /dev/nvidia0 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (no /dev/nvidia0, no nvidia-smi); run it on a GPU node" >&2
  exit 2
fi
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null) || {
  echo "gpu_check: python3 cannot import torch; this check needs PyTorch 2.11 (its libtorch runs the binaries)" >&2
  exit 2
}
export LD_LIBRARY_PATH="$torch_lib:$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing=$(for b in neurofm-data neurofm-train neurofm-eval allreduce_bench; do ldd "$here/$b" | grep "not found"; done | sort -u)
if [ -n "$missing" ]; then
  echo "gpu_check: shared libraries missing:" >&2
  echo "$missing" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/nvidia-smi.txt" 2>&1 || true

failed=()
run() { # run NAME CMD...: logs to $out/NAME.log, records failures
  local name=$1; shift
  local t0=$SECONDS
  if "$@" > "$out/$name.log" 2>&1; then echo "$name: ok ($((SECONDS - t0)) s)"; else echo "$name: FAILED ($((SECONDS - t0)) s), see $name.log"; failed+=("$name"); fi
}

run preflight "$here/neurofm-train" --preflight --device cuda
run synth "$here/neurofm-data" --quiet synth --cells 20000 --genes 2000 --types 8 --seed 3 "$work/cells.h5ad"
run convert "$here/neurofm-data" convert -q "$work/cells.h5ad" "$work/cells.zarr"
run train "$here/neurofm-train" --config "$here/single-gpu.toml" --data "$work/cells.zarr" --run-dir "$work/run" --device cuda --no-progress \
  --set train.max_steps=50 --set train.log_every=5 --set train.val_every=50 --set train.checkpoint_every=50 \
  --set optim.warmup_steps=10 --set data.val_max_cells=1024 --set sequence.mode='"full-panel"' \
  --set tokenizer.kind='"gene-quantile"' --set tokenizer.n_bins=51 --set views.count=1 --set views.thin_min=1 \
  --set objectives.contrastive=0
run torch python3 "$here/torch_reference.py" --d-model 512 --layers 12 --heads 8 --d-ff 2048 --seq 2001 --batch 32 --genes 2000 --bins 51 --steps 20
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port NEUROFM_BACKEND=nccl \
  NEUROFM_RENDEZVOUS_TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n') run nccl "$here/allreduce_bench"
run embed "$here/neurofm-eval" --run "$work/run" --data "$work/cells.zarr" --label-col cell_type --max-cells 10000 \
  --max-layout-cells 2000 --out "$work/eval" --device cuda --batch-size 128
cp "$work/run/throughput.json" "$work/run/metrics.csv" "$out/" 2>/dev/null
cp "$work/eval/metrics.json" "$out/eval-metrics.json" 2>/dev/null

python3 - "$out" "${failed[*]:-}" <<'EOF'
import csv, json, os, sys
out, failed = sys.argv[1], sys.argv[2].split()
def read(name):
    try:
        return open(os.path.join(out, name)).read()
    except OSError:
        return ""
def js(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
train = js("throughput.json") or {}
rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv")))) if os.path.exists(os.path.join(out, "metrics.csv")) else []
losses = [float(r["loss"]) for r in rows if r["split"] == "train" and r["loss"]]
torch_line = next((l for l in read("torch.log").splitlines() if l.startswith("{")), None)
torch_ref = json.loads(torch_line) if torch_line else {}
ev = js("eval-metrics.json") or {}
result = {
    "gpu": read("nvidia-smi.txt").strip(),
    "failed": failed,
    "preflight": read("preflight.log").strip().splitlines(),
    "train": {
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_fell": bool(losses) and losses[-1] < losses[0],
        "cells_per_s": train.get("cells_per_s"),
        "tokens_per_s": train.get("tokens_per_s"),
        "mfu": train.get("mfu"),
        "peak": [train.get("peak_tflops"), train.get("peak_kind"), train.get("peak_source")],
        "step_ms": train.get("step_ms"),
        "max_rss_mb": train.get("max_rss_mb"),
    },
    "torch_eager": torch_ref,
    "neurofm_vs_torch_cells_per_s": (train.get("cells_per_s") or 0) / torch_ref["cells_per_s"] if torch_ref.get("cells_per_s") else None,
    "nccl": read("nccl.log").strip().splitlines(),
    "embed": ev.get("embedding"),
}
json.dump(result, open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
print(json.dumps(result, indent=2))
if failed or not result["train"]["loss_fell"]:
    sys.exit(1)
EOF
