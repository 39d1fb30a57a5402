#!/usr/bin/env bash
# Atlas-scale reads (issue 13): generated atlases of CELLS cells (default two sizes) × 2000 genes,
# converted with peak RSS measured, then 2-rank CPU training over each plus a second store with
# a partly overlapping panel: start-up seconds, read_amplification and peak RSS of every rank
# from throughput.json, and the simulated read plans of 1 … 64 ranks (examples/reader_bench).
#
#   benches/scale.sh [CELLS ...]      # default: 250000 1000000; release binaries in target/release
#   TAG=-raw SYNTH_ARGS="--seed 3 --depth 2000 --compression none" benches/scale.sh 3000000
#                                     # the ≥ 20 GB atlas: uncompressed, as anndata writes by default
#   CONVERT_ONLY=1 GENES=20 TAG=-narrow SYNTH_ARGS="--seed 1 --depth 40" benches/scale.sh 16000000
#                                     # conversion memory at many cells: few genes, no training
set -euo pipefail
sizes=("$@"); [ ${#sizes[@]} -gt 0 ] || sizes=(250000 1000000)
bin=${BIN:-target/release}
dir=${SCALE_DIR:-runs/scale}
tag=${TAG:-}   # a suffix of the atlas's files, for variants made with SYNTH_ARGS
mkdir -p "$dir"
rss() { awk '/Maximum resident/ {printf "%.0f", $6 / 1024}' "$1"; }

# The second store: 20,000 cells, genes 1000..2999 of another generator (1000 shared).
if [ ! -d "$dir/second.zarr" ]; then
  "$bin/neurofm-data" -q synth --cells 20000 --genes 3000 --types 4 --seed 9 --force "$dir/second.h5ad"
  seq 1000 2999 | sed 's/^/gene_/' > "$dir/second.genes.txt"
  "$bin/neurofm-data" convert -q --force --genes "list:$dir/second.genes.txt" "$dir/second.h5ad" "$dir/second.zarr"
fi
cat > "$dir/train.toml" <<'EOF'
seed = 1
[data]
workers = 1
val_max_cells = 2000
[tokenizer]
kind = "rank-value"
max_fit_cells = 20000
[sequence]
mode = "nonzero-plus-zeros"
max_len = 65
[split]
val_fraction = 0.01
unit = "block"
[model]
d_model = 32
n_heads = 2
n_layers = 2
d_ff = 64
[train]
batch_size = 32
max_steps = 200
val_every = 100
log_every = 50
threads = 1
EOF

for n in "${sizes[@]}"; do
  h5="$dir/atlas-$n$tag.h5ad" store="$dir/atlas-$n$tag.zarr"
  # shellcheck disable=SC2086 # SYNTH_ARGS is a list of options
  [ -f "$h5" ] || "$bin/neurofm-data" -q synth --cells "$n" --genes "${GENES:-2000}" --types 8 ${SYNTH_ARGS:---seed 1} "$h5"
  if [ ! -d "$store" ]; then
    /usr/bin/time -v "$bin/neurofm-data" convert -q --json "$h5" "$store" > "$dir/convert-$n$tag.json" 2> "$dir/convert-$n$tag.time"
  fi
  python3 - "$dir/convert-$n$tag.json" "$(rss "$dir/convert-$n$tag.time")" "$n" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"atlas {sys.argv[3]} cells: {s['input_bytes']/1e9:.2f} GB h5ad, {s['nnz']:.3g} non-zeros, converted in {s['seconds']:.0f} s "
      f"({s['input_bytes']/1e6/s['seconds']:.1f} MB/s), peak RSS {sys.argv[2]} MB")
EOF
  [ -z "${CONVERT_ONLY:-}" ] || continue
  run="$dir/run-$n$tag"
  "$bin/neurofm-launch" --backend mpi --nproc-per-node 2 -- "$bin/neurofm-train" --config "$dir/train.toml" \
    --data "$store" --data "$dir/second.zarr" --run-dir "$run" --force --device cpu --no-progress > "$run.out" 2>&1 \
    || { tail -20 "$run.out"; exit 1; }
  python3 - "$run/throughput.json" "$n" <<'EOF'
import json, sys
t = json.load(open(sys.argv[1]))
ra = t["read_amplification"]
print(f"  2-rank training ({sys.argv[2]} + 20000 cells): start-up {t['startup_s']:.1f} s decoding "
      f"{', '.join(f'{100 * x:.1f} %' for x in t['startup_read_share_per_rank'])} of the cells, {t['cells_per_s']:.0f} cells/s, "
      f"read_amplification per rank {', '.join(f'{x:.3f}' for x in ra['per_rank'])}, peak RSS per rank "
      f"{', '.join(f'{x:.0f}' for x in t['max_rss_mb_per_rank'])} MB")
EOF
done
# Simulated read plans of 1 … 64 ranks over the largest atlas.
[ -z "${CONVERT_ONLY:-}" ] || exit 0
NEUROFM_BENCH_PLANS_ONLY=1 cargo run -q --release -p neurofm-dataloader --example reader_bench -- "$dir/atlas-${sizes[-1]}$tag.zarr" | grep -A9 "read plans"
