#!/usr/bin/env bash
# Issue 15's condition-transfer experiment (benches/README.md, "Fine-tuning"): the interop
# check's generated data (600 cells, 4 types, 2 conditions) and 3-epoch pretraining, then
# fine-tunes trained on one condition and tested on the other: plain, with a frozen encoder,
# and with per-gene augmentation of the training cells (`augment.gene_scale`, 1 by default), at three
# fine-tuning seeds. DATA_SEED (default 4, the interop check's) draws another dataset.
# Release binaries in target/release; runs in ${FTCOND_DIR:-runs/ftcond}.
set -euo pipefail
B=${BIN:-target/release}; DATA_SEED=${DATA_SEED:-4}; D=${FTCOND_DIR:-runs/ftcond}
mkdir -p "$D"
[ -f "$D/pretrain.toml" ] || python3 - "$D/pretrain.toml" <<'PY'
import re, sys
src = open("tests/interop/check_finetune.py").read()
open(sys.argv[1], "w").write(re.search(r'PRETRAIN = """(.*?)"""', src, re.S).group(1))
PY
[ -f $D/cells.h5ad ] || $B/neurofm-data -q synth $D/cells.h5ad --cells 600 --genes 120 --types 4 --conditions 2 --seed $DATA_SEED
[ -d $D/cells.zarr ] || $B/neurofm-data convert -q $D/cells.h5ad $D/cells.zarr
[ -d $D/pre ] || $B/neurofm-train --config $D/pretrain.toml --data $D/cells.zarr --run-dir $D/pre --device cpu --no-progress -q
ft() { name=$1; shift; $B/neurofm-finetune --pretrained $D/pre --data $D/cells.zarr --label-col cell_type --split group:condition --test-frac 0.5 \
  --run-dir $D/$name --force --device cpu --no-progress -q --set train.batch_size=16 --set head.hidden=64 "$@" > /dev/null
  python3 -c "import json;m=json.load(open('$D/$name/metrics.json'));print('$name', round(m['model']['macro_f1'],3), {k: round(v['macro_f1'],3) for k,v in m['baselines'].items()})" | tee -a $D/results.txt; }
ft base8 --set train.epochs=8 --set augment.gene_scale=0
ft frozen40 --freeze-encoder --set train.epochs=40 --set augment.gene_scale=0
for s in 1 2 3; do
  ft none40-seed$s --set train.epochs=40 --set train.patience=0 --set seed=$s --set augment.gene_scale=0
  ft gs1-40-seed$s --set train.epochs=40 --set train.patience=0 --set seed=$s --set augment.gene_scale=1
  ft gs1-80-seed$s --set train.epochs=80 --set train.patience=0 --set seed=$s --set augment.gene_scale=1
done
