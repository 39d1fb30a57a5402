# neurofm SLURM settings shared by the sbatch scripts: site paths and the NCCL environment.
# Every value can be overridden from the submitting shell, e.g.
#   DATA=/scratch/atlas.zarr CONFIG=configs/atlas.toml sbatch slurm/train-multinode.sbatch
# Submit from the neurofm checkout (or set NEUROFM_HOME).

NEUROFM_HOME=${NEUROFM_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
BIN=${BIN:-$NEUROFM_HOME/target/release}        # built with `make build`
RUNS=${RUNS:-$NEUROFM_HOME/runs}
DEVICE=${DEVICE:-auto}       # auto | cpu | cuda
BACKEND=${BACKEND:-auto}     # auto: nccl on GPUs, mpi on CPU nodes
EXTRA=${EXTRA:-}             # more flags for the neurofm command, e.g. "--set train.max_steps=2000" or "--stop-at-step 500"

# libtorch: binaries carry an rpath to the torch they were built with; on nodes where that
# path differs, point TORCH_LIB at another PyTorch 2.11 install's torch/lib.
if [ -n "${TORCH_LIB:-}" ]; then export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi

# ---- NCCL ------------------------------------------------------------------------------------
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                 # INFO prints topology and transports: use it when a job hangs
export NCCL_DEBUG_SUBSYS=${NCCL_DEBUG_SUBSYS:-INIT,NET}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}         # InfiniBand verbs timeout (4.096 µs × 2^n); raise on congested fabrics
export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-7}
# InfiniBand: keep enabled where the fabric exists; name the HCAs and the socket interface when
# the defaults pick the wrong ones (see `ibstat`, `ip addr`).
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}          # 1 on Ethernet-only clusters
# export NCCL_IB_HCA=mlx5_0,mlx5_1                    # which InfiniBand adapters
# export NCCL_SOCKET_IFNAME=ib0                       # interface for bootstrap / TCP fallback
# export NCCL_NET_GDR_LEVEL=PHB                       # GPUDirect RDMA distance
export NEUROFM_RENDEZVOUS_TIMEOUT=${NEUROFM_RENDEZVOUS_TIMEOUT:-600}   # seconds ranks wait for each other
# Rank 0's rendezvous store admits only ranks that present this job's token. Made here in the
# batch script from /dev/urandom and exported, so srun hands the same one to every task; it is
# never on a command line (other users can read those).
export NEUROFM_RENDEZVOUS_TOKEN=${NEUROFM_RENDEZVOUS_TOKEN:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}

# CPU ranks talk MPI: srun starts them with PMIx. GPU ranks use NCCL and need no MPI plugin.
if [ "$BACKEND" = mpi ] || { [ "$BACKEND" = auto ] && [ "$DEVICE" = cpu ]; }; then
    SRUN_MPI=--mpi=pmix
else
    SRUN_MPI=
fi
