#!/usr/bin/env bash
# One cell of the pretraining-recipe ablation (benches/README.md): train CONFIG on STORE with
# the given overrides, evaluate with neurofm-eval, and append one TSV row of the numbers that
# matter (probe balanced accuracy, Louvain ARI, depth R² of the model, the untrained model,
# expression PCA and QC) to $RECIPES_TSV (default benches/recipes.tsv).
#
#   benches/recipe.sh NAME CONFIG STORE LABEL_COL [--split group:COL] [eval args...] -- [--set k=v ...]
#
# Release binaries in target/release (make build). Runs go to ${RECIPES_DIR:-runs/recipes}/NAME.
set -euo pipefail
name=$1 config=$2 store=$3 label=$4
shift 4
eval_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do eval_args+=("$1"); shift; done
[ $# -gt 0 ] && shift
train_args=("$@")
bin=${BIN:-target/release}
dir=${RECIPES_DIR:-runs/recipes}/$name
tsv=${RECIPES_TSV:-benches/recipes.tsv}
mkdir -p "$dir"
# A frozen copy: editing CONFIG while a queue of recipes runs must not change later rows.
cp "$config" "$dir/base.toml"
start=$(date +%s.%N)
"$bin/neurofm-train" --config "$dir/base.toml" --data "$store" --run-dir "$dir/run" --force --no-progress "${train_args[@]}" > "$dir/train.out" 2>&1 \
  || { tail -20 "$dir/train.out"; exit 1; }
train_s=$(python3 -c "import time; print(f'{time.time() - $start:.0f}')")
"$bin/neurofm-eval" --run "$dir/run" --data "$store" --label-col "$label" --out "$dir/eval" "${eval_args[@]}" > "$dir/eval.out" 2>&1 \
  || { tail -20 "$dir/eval.out"; exit 1; }
python3 - "$dir/eval/metrics.json" "$name" "$train_s" "$tsv" "${eval_args[*]:-stratified}" "${train_args[*]:-}" <<'EOF'
import json, sys
sys.path.insert(0, "benches")
from eval_rows import append, rep
path, name, train_s, tsv, split, overrides = sys.argv[1:7]
m = json.load(open(path))
cols = ["recipe", "split", "train_s", "val_ppl", "per_gene_ppl"]
row = [name, split, train_s, f'{m["run"]["final_val_perplexity"] or float("nan"):.3f}', f'{m["run"]["per_gene_baseline_perplexity"] or float("nan"):.3f}']
for label, prefix in [("model", "neurofm"), ("untrained", "untrained"), ("pca", "expression PCA"), ("qc", "QC")]:
    r = rep(m, prefix)
    cols += [f"{label}_bacc", f"{label}_ari", f"{label}_depth_r2"]
    row += [f'{r["probe"]["balanced_accuracy"]:.3f}', f'{r["cluster_ari"]:.3f}', f'{r["depth_r2"]["log_total_counts"]:.2f}']
cols.append("overrides"); row.append(overrides)
append(tsv, cols, row)
EOF
