#!/usr/bin/env bash
# Training throughput of a config on the WHB file (or BENCH_STORE), release build.
# usage: benches/train_throughput.sh CONFIG [STEPS] [extra neurofm-train args...]
# Prints cells/s, tokens/s, the step time split (data wait, forward+backward, optimizer),
# achieved TFLOP/s and MFU from the run's throughput.json (the first step is not timed).
# BENCH_RANKS=N runs N CPU ranks over MPI (through neurofm-launch) and adds the all-reduce split.
set -euo pipefail
config=${1:?config}; steps=${2:-6}; shift $(( $# > 1 ? 2 : 1 ))
cache=${CACHE:-$HOME/.cache/neurofm}/bench
mkdir -p "$cache"
store=${BENCH_STORE:-$cache/whb.zarr}
if [ ! -e "$store/uns/neurofm" ]; then
  target/release/neurofm-data convert --force -q "${NEUROFM_SHARED_DATA:-../shared/data}/whb_cortex_L5exc_MGEinh.h5ad" "$store"
fi
run="$cache/run-$(basename "$config" .toml)"
launch=()
if [ "${BENCH_RANKS:-1}" -gt 1 ]; then
  launch=(target/release/neurofm-launch --backend mpi --nproc-per-node "$BENCH_RANKS" --)
fi
/usr/bin/time -f "wall %e s, max RSS %M KB" "${launch[@]}" target/release/neurofm-train --config "$config" --data "$store" \
  --run-dir "$run" --force --no-progress --set train.max_steps="$steps" --set train.val_every=0 \
  --set train.log_every=1 "$@" 2> "$run.log" || { tail -20 "$run.log"; exit 1; }
grep -E "model:|data:|MFU against" "$run.log" | sed 's/^.*INFO [a-z_:]*: //'
tail -1 "$run.log"
python3 -m json.tool "$run/throughput.json"
