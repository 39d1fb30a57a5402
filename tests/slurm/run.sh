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

submit() {  # submit SCRIPT [sbatch options...]: waits, fails the test if the job fails (log: $WORK/${LOG:-SCRIPT}.out)
    local script=$1; shift
    local out="$WORK/${LOG:-$(basename "$script" .sbatch)}.out"
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

# ---- resubmission: the default run directory has no job id, so a second job continues the first
TWO_TASKS="--nodes=1 --ntasks-per-node=2 --gpus-per-node=2 --cpus-per-task=1 --time=10"
run=$WORK/runs/neurofm-train-tiny-cells      # $RUNS/<job name>-<config>-<store>
CONFIG=$WORK/tiny.toml DATA=$WORK/cells.zarr RUNS=$WORK/runs EXTRA="--stop-at-step 3" LOG=resubmit-1 \
    submit train-1node.sbatch $TWO_TASKS
[ -f "$run/checkpoints/step-0000003/state.json" ] || fail "the first job left no step-3 checkpoint in $run"
[ ! -e "$run/checkpoints/step-0000006" ] || fail "the first job did not stop at step 3"
CONFIG=$WORK/tiny.toml DATA=$WORK/cells.zarr RUNS=$WORK/runs LOG=resubmit-2 \
    submit train-1node.sbatch $TWO_TASKS
grep -qF "resuming from $run/checkpoints/step-0000003 at step 3" "$WORK/resubmit-2.out" \
    || fail "the resubmitted job did not resume from the first job's step-3 checkpoint"
[ -f "$run/checkpoints/step-0000006/model.safetensors" ] || fail "the resubmitted job did not reach step 6 in $run"
[ "$(grep -c '^6,0,train,' "$run/metrics.csv")" = 1 ] || fail "metrics.csv of $run does not end with one step-6 row"
echo "slurm: a resubmitted job resumed at step 3 and finished at step 6"

# ---- requeue: the job runs again under the same id and continues from its newest checkpoint ----
run=$WORK/runs-requeue/neurofm-train-tiny-cells
jobid=$(CONFIG=$WORK/tiny.toml DATA=$WORK/cells.zarr RUNS=$WORK/runs-requeue \
    EXTRA="--set train.max_steps=1000 --set train.checkpoint_every=50 --set train.val_every=1000 --set train.log_every=100" \
    sbatch --parsable --requeue --open-mode=append --chdir="$ROOT" --output="$WORK/requeue.out" $TWO_TASKS \
    "$ROOT/slurm/train-1node.sbatch") || fail "sbatch refused the requeue job"
for _ in $(seq 600); do [ -e "$run/checkpoints/last" ] && break; sleep 0.2; done
[ -e "$run/checkpoints/last" ] || fail "the requeue job wrote no checkpoint within 120 s"
scontrol requeue "$jobid" || fail "scontrol requeue $jobid failed"
# SLURM holds a requeued job for about two minutes (Reason=BeginTime): once it is pending
# again and its first run has left the node, let it start early. Not within the second of the
# requeue: slurmd refuses ("credential revoked") a launch credential no newer than the
# revocation of the first run's, and both count in whole seconds.
for _ in $(seq 200); do
    scontrol show job -o "$jobid" | grep -q 'JobState=PENDING' && [ "$(sinfo -h -N -o %t)" = idle ] && break
    sleep 0.1
done
sleep 2
scontrol update JobId="$jobid" StartTime=now || fail "scontrol update $jobid StartTime=now failed"
for _ in $(seq 600); do
    state=$(scontrol show job -o "$jobid" | grep -o 'JobState=[A-Z_]*' || true)
    [ "$state" = JobState=COMPLETED ] && break
    case $state in *FAILED*|*CANCELLED*|*TIMEOUT*) fail "the requeued job ended in $state";; esac
    sleep 0.5
done
[ "${state:-}" = JobState=COMPLETED ] || fail "the requeued job did not complete within 300 s (${state:-no state})"
grep -q "resuming from $run/checkpoints/step-[0-9]* at step [1-9]" "$WORK/requeue.out" \
    || fail "the requeued job did not resume from a checkpoint of its first run"
[ -f "$run/checkpoints/step-0001000/model.safetensors" ] || fail "the requeued job did not reach step 1000"
echo "slurm: a requeued job resumed from its checkpoint and finished"

# ---- the rendezvous token: every task of the step gets the batch script's --------------------
# NCCL ranks on CPUs stop right after the rendezvous (NCCL needs a GPU). Rank 0 only gets there
# once every rank has joined its store, which admits only ranks presenting its token.
out=$WORK/rendezvous.out
if CONFIG=$WORK/tiny.toml DATA=$WORK/cells.zarr RUN_DIR=$WORK/run-nccl BACKEND=nccl \
    sbatch --wait --chdir="$ROOT" --output="$out" $TWO_TASKS "$ROOT/slurm/train-1node.sbatch" >/dev/null; then
    fail "an NCCL job on CPUs succeeded"
fi
grep -q "^0: .*--backend nccl needs a GPU" "$out" || fail "rank 0 did not get past the rendezvous (a task without the job's token?)"
! grep -q "refused this rank's token\|NEUROFM_RENDEZVOUS_TOKEN is not set" "$out" || fail "a task was refused by the rendezvous store"
echo "slurm: both tasks met at rank 0's store with the batch script's token"

# ---- evaluate the one-node run with eval.sbatch ---------------------------------------------
RUN_DIR=$WORK/run-train-1node DATA=$WORK/cells.zarr LABEL_COL=cell_type OUT=$WORK/eval \
    submit eval.sbatch --gpus-per-node=1 --cpus-per-task=1 --time=10
[ -f "$WORK/eval/metrics.json" ] && [ -f "$WORK/eval/report.html" ] && [ -f "$WORK/eval/embeddings.h5ad" ] \
    || fail "eval.sbatch: no metrics.json, report.html or embeddings.h5ad in $WORK/eval"
echo "slurm: eval.sbatch wrote the report"
rm -rf "$WORK"
