#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost (slurmctld + slurmd, auth/none) that runs the
# provided slurm/ scripts in CPU mode with 2 tasks, then checks what the jobs produced.
# Needs root and Debian's slurmctld/slurmd/slurm-client (`make setup` installs them).
#   tests/slurm/run.sh [BIN_DIR]      (default target/debug)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=$(realpath "${1:-target/debug}")
WORK=$(mktemp -d /tmp/neurofm-slurm.XXXXXX)
HOST=$(hostname -s)
PIDS=()

stop() {
    # Stop the daemons we started, by PID (nothing else on this machine is touched).
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
fail() {
    echo "slurm test FAILED: $*" >&2
    for f in "$WORK"/*.out "$WORK"/slurmctld.log "$WORK"/slurmd.log; do
        [ -f "$f" ] && { echo "---- $f"; tail -n 40 "$f"; } >&2
    done
    exit 1
}
trap stop EXIT

# ---- the cluster: one node with 16 CPUs and two fake GPUs ----------------------------------
mkdir -p "$WORK/state" "$WORK/spool"
for i in 0 1; do mknod "$WORK/gpu$i" c 1 3; done   # character devices slurmd can "bind"
cat > "$WORK/slurm.conf" <<CONF
ClusterName=neurofm-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=16 RealMemory=65536 Gres=gpu:2 State=UNKNOWN
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
echo "NodeName=$HOST Name=gpu File=$WORK/gpu[0-1]" > "$WORK/gres.conf"
export SLURM_CONF=$WORK/slurm.conf

slurmctld -D -i -f "$SLURM_CONF" >/dev/null 2>&1 & PIDS+=($!)
slurmd -D -f "$SLURM_CONF" >/dev/null 2>&1 & PIDS+=($!)
for _ in $(seq 60); do
    state=$(sinfo -h -N -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.5
done
[ "${state:-}" = idle ] || fail "the node did not come up (state: ${state:-none})"
echo "slurm: node $HOST idle"

submit() {  # submit SCRIPT [sbatch options...]: waits, fails the test if the job fails
    local script=$1; shift
    local out="$WORK/$(basename "$script" .sbatch).out"
    sbatch --wait --chdir="$ROOT" --output="$out" "$@" "$ROOT/slurm/$script" >/dev/null || fail "$script failed"
    echo "slurm: $script ok"
}

# ---- the jobs: convert, train on one node and with the multi-node script, evaluate ---------------
export NEUROFM_HOME=$ROOT BIN DEVICE=cpu
"$BIN/neurofm-data" --quiet synth --cells 600 --genes 50 --types 3 "$WORK/cells.h5ad"
cat > "$WORK/tiny.toml" <<CONF
seed = 3
[data]
workers = 1
[tokenizer]
n_bins = 8
[model]
d_model = 16
n_heads = 2
n_layers = 1
d_ff = 32
[train]
batch_size = 8
max_steps = 6
log_every = 2
val_every = 3
threads = 1
CONF

INPUT=$WORK/cells.h5ad OUTPUT=$WORK/cells.zarr submit convert.sbatch
[ -f "$WORK/cells.zarr/zarr.json" ] || fail "convert.sbatch made no store"

for script in train-1node.sbatch train-multinode.sbatch; do
    run=$WORK/run-${script%.sbatch}
    CONFIG=$WORK/tiny.toml DATA=$WORK/cells.zarr RUN_DIR=$run \
        submit "$script" --nodes=1 --ntasks-per-node=2 --gpus-per-node=2 --cpus-per-task=1 --time=10
    out="$WORK/${script%.sbatch}.out"
    [ -f "$run/checkpoints/step-0000006/model.safetensors" ] || fail "$script: no final checkpoint in $run"
    ls "$run"/events.out.tfevents.* >/dev/null 2>&1 || fail "$script: no TensorBoard events in $run"
    grep -q "data parallel over 2 ranks (mpi)" "$out" || fail "$script: the 2 tasks did not form one MPI group"
    grep -q "parameters identical on all 2 ranks" "$out" || fail "$script: no DDP consistency check in the log"
done
echo "slurm: every job produced checkpoints and events"

# ---- evaluate the one-node run with eval.sbatch ---------------------------------------------
RUN_DIR=$WORK/run-train-1node DATA=$WORK/cells.zarr LABEL_COL=cell_type OUT=$WORK/eval \
    submit eval.sbatch --gpus-per-node=1 --cpus-per-task=1 --time=10
[ -f "$WORK/eval/metrics.json" ] && [ -f "$WORK/eval/report.html" ] && [ -f "$WORK/eval/embeddings.h5ad" ] \
    || fail "eval.sbatch: no metrics.json, report.html or embeddings.h5ad in $WORK/eval"
echo "slurm: eval.sbatch wrote the report"
rm -rf "$WORK"
