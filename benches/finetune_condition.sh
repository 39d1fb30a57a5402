#!/usr/bin/env bash
# Issue 15's condition-transfer experiment (benches/README.md, "Fine-tuning"): the interop
# check's generated data (600 cells, 4 types, 2 conditions) and 3-epoch pretraining, then
# fine-tunes trained on one condition and tested on the other (plain, and with a frozen encoder).
# Release binaries in target/release; runs in ${FTCOND_DIR:-runs/ftcond}.
set -euo pipefail
B=${BIN:-target/release}; D=${FTCOND_DIR:-runs/ftcond}
mkdir -p "$D"
[ -f "$D/pretrain.toml" ] || python3 - "$D/pretrain.toml" <<'PY'
import re, sys
src = open("tests/interop/check_finetune.py").read()
open(sys.argv[1], "w").write(re.search(r'PRETRAIN = """(.*?)"""', src, re.S).group(1))
PY
[ -f $D/cells.h5ad ] || $B/neurofm-data -q synth $D/cells.h5ad --cells 600 --genes 120 --types 4 --conditions 2 --seed 4
[ -d $D/cells.zarr ] || $B/neurofm-data convert -q $D/cells.h5ad $D/cells.zarr
[ -d $D/pre ] || $B/neurofm-train --config $D/pretrain.toml --data $D/cells.zarr --run-dir $D/pre --device cpu --no-progress -q
ft() { name=$1; shift; $B/neurofm-finetune --pretrained $D/pre --data $D/cells.zarr --label-col cell_type --split group:condition --test-frac 0.5 \
  --run-dir $D/$name --force --device cpu --no-progress -q --set train.batch_size=16 --set head.hidden=64 "$@"
  python3 -c "import json;m=json.load(open('$D/$name/metrics.json'));print('$name', round(m['model']['macro_f1'],3), {k: round(v['macro_f1'],3) for k,v in m['baselines'].items()})" | tee -a $D/results.txt; }
ft base8 --set train.epochs=8
ft frozen40 --freeze-encoder --set train.epochs=40
ft frozen40-lr3e-3 --freeze-encoder --set train.epochs=40 --set optim.lr=3e-3
