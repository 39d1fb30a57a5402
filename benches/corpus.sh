#!/usr/bin/env bash
# Does a corpus help? (issue 13, benches/README.md "Corpus pretraining"). Converts the four
# neuron datasets of ../shared/data, trains one model on all four (gene symbols matched
# case-insensitively: WHB is human, the rest mouse) and one model per dataset with the same
# config, then evaluates every model on every dataset it can read (the per-dataset WHB model on
# the mouse sets is cross-species zero-shot) and appends one TSV row per evaluation to
# ${CORPUS_TSV:-benches/corpus.tsv}.
#
#   benches/corpus.sh [CONFIG]        # default configs/whb-fast.toml; release binaries in target/release
#   EVAL_ONLY=1 benches/corpus.sh     # re-evaluate the trained runs
# Every evaluation refuses panels sharing < MIN_OVERLAP (default 0.2) of the smaller panel.
set -euo pipefail
config=${1:-configs/whb-fast.toml}
bin=${BIN:-target/release}
shared=${NEUROFM_SHARED_DATA:-../shared/data}
dir=${CORPUS_DIR:-runs/corpus}
tsv=${CORPUS_TSV:-benches/corpus.tsv}
mkdir -p "$dir/data"

# name  file  label  gene_key
datasets=(
  "whb whb_cortex_L5exc_MGEinh.h5ad subtype gene_symbol"
  "meta mouse_cortex_interneurons_metaneighbor_mixed_umi_rpkm.h5ad cell_type -"
  "zeisel zeisel2015_ca1_interneuron_endothelial_dense.h5ad cell_type -"
  "furlan furlan2016_sympathetic_neurons.loom Cell_cluster -"
)
for d in "${datasets[@]}"; do
  read -r name file _ _ <<<"$d"
  [ -d "$dir/data/$name.zarr" ] || "$bin/neurofm-data" convert -q --allow-non-integer "$shared/$file" "$dir/data/$name.zarr"
done

# A config for a list of datasets: the base config plus their [[data.stores]].
make_config() {
  local out=$1 name d n key; shift
  cp "$config" "$out"
  printf '\n[data]\ngene_case = "insensitive"\n' >> "$out"
  for name in "$@"; do
    for d in "${datasets[@]}"; do
      read -r n _ _ key <<<"$d"
      [ "$n" = "$name" ] || continue
      printf '[[data.stores]]\npath = "%s"\n' "$dir/data/$n.zarr" >> "$out"
      [ "$key" = "-" ] || printf 'gene_key = "%s"\n' "$key" >> "$out"
    done
  done
}

train() {
  local run=$1 start; shift
  make_config "$dir/$run.toml" "$@"
  start=$(date +%s)
  "$bin/neurofm-train" --config "$dir/$run.toml" --run-dir "$dir/$run" --force --no-progress > "$dir/$run.train.out" 2>&1 \
    || { tail -20 "$dir/$run.train.out"; exit 1; }
  echo "$run: trained in $(( $(date +%s) - start )) s"
}

evaluate() {
  local run=$1 name=$2 d n label key
  for d in "${datasets[@]}"; do
    read -r n _ label key <<<"$d"
    [ "$n" = "$name" ] || continue
    local gk=(); [ "$key" = "-" ] || gk=(--gene-key "$key")
    local out="$dir/eval-$run-on-$n"
    "$bin/neurofm-eval" --run "$dir/$run" --data "$dir/data/$n.zarr" --label-col "$label" "${gk[@]}" --min-gene-overlap "${MIN_OVERLAP:-0.2}" --out "$out" > "$out.log" 2>&1 \
      || { tail -5 "$out.log"; return 0; }
    python3 - "$out/metrics.json" "$run" "$n" "$tsv" <<'EOF'
import json, sys
sys.path.insert(0, "benches")
from eval_rows import append, rep
path, run, data, tsv = sys.argv[1:5]
m = json.load(open(path))
o = m["data"]["gene_overlap"]
cols = ["model", "data", "genes_shared", "overlap_share", "model_bacc", "model_ari", "untrained_bacc", "pca_bacc", "pca_ari"]
row = [run, data, str(o["shared"]), f'{o["share"]:.2f}']
for prefix in ["neurofm", "untrained"]:
    r = rep(m, prefix)
    row += [f'{r["probe"]["balanced_accuracy"]:.3f}'] + ([f'{r["cluster_ari"]:.3f}'] if prefix == "neurofm" else [])
p = rep(m, "expression PCA")
row += [f'{p["probe"]["balanced_accuracy"]:.3f}', f'{p["cluster_ari"]:.3f}']
append(tsv, cols, row)
EOF
  done
}

names=(whb meta zeisel furlan)
[ -n "${EVAL_ONLY:-}" ] || train corpus "${names[@]}"
for ds in "${names[@]}"; do evaluate corpus "$ds"; done
for ds in "${names[@]}"; do
  [ -n "${EVAL_ONLY:-}" ] || train "only-$ds" "$ds"
  evaluate "only-$ds" "$ds"
done
# Cross-species zero-shot: the human-only model on the mouse datasets (WHB's 2000 genes share
# 15-17 % with Zeisel's and MetaNeighbor's panels: below the default minimum, so lowered here).
for ds in meta zeisel furlan; do MIN_OVERLAP=0.1 evaluate only-whb "$ds"; done
