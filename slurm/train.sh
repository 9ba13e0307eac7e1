#!/usr/bin/env bash
# SimCSE training under Slurm, one node or many, with checkpoint-and-requeue on preemption.
# One task per node; each task runs torchrun (c10d rendezvous), or the deepspeed launcher with
# LAUNCHER=deepspeed, which starts that node's ranks. Submit from the repository root:
#
#   sbatch --nodes 1 --gpus-per-node 8 --cpus-per-task 64 slurm/train.sh --config configs/sup-bert-base.yaml
#   sbatch --nodes 4 --gpus-per-node 8 --cpus-per-task 64 slurm/train.sh --config configs/sup-bert-base.yaml
#   GPUS_PER_NODE=0 NPROC_PER_NODE=2 sbatch slurm/train.sh --config configs/demo.yaml   # CPU ranks, gloo
#
# Arguments are passed to `python -m simcse_dist.cli` unchanged (config file, then `section.key=value`
# overrides). Environment (sbatch exports the submitting shell's environment to the job):
#   GPUS_PER_NODE   GPUs per node; default: what Slurm allocated (SLURM_GPUS_ON_NODE), else 0.
#                   0 means CPU mode: GPUs hidden, gloo backend, OMP_NUM_THREADS=1 per rank.
#   NPROC_PER_NODE  ranks per node; default GPUS_PER_NODE, or 1 in CPU mode.
#   LAUNCHER        torchrun (default) | deepspeed
#   PYTHON          the Python that has simcse_dist installed (default: python on PATH)
#   SIMCSE_DIR      directory to run in, where relative config/data paths resolve (default: the
#                   directory sbatch was called from)
#   SIMCSE_STOP_DIR where the per-job stop file goes; must be visible from every node (default
#                   SIMCSE_DIR)
#   RDZV_PORT       rendezvous port on the first node (default: 20000 + job id % 20000; a
#                   MASTER_PORT left in the submitting shell is ignored on purpose)
# Preemption: Slurm sends USR1 to this batch shell <seconds> before the time limit (change it
# with `sbatch --signal=B:USR1@600 ...`; the command line wins over the #SBATCH line). The trap
# below creates $SIMCSE_STOP_FILE; every rank finishes its optimizer step, the trainer writes a
# checkpoint, deletes the stop file and exits 0; then this script requeues the job, which starts
# again with the same job id and output_dir and resumes from the checkpoint. See slurm/README.md.
#SBATCH --job-name=simcse
#SBATCH --ntasks-per-node=1
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -eo pipefail

LAUNCHER="${LAUNCHER:-torchrun}"
PYTHON="${PYTHON:-python}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))}"
NNODES="${SLURM_NNODES:-1}"
# The first node hosts the rendezvous. Its host name, or Slurm's NodeAddr for it where the name
# does not resolve (node names that are not host names, as on the test cluster).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
if ! getent hosts "$MASTER_ADDR" >/dev/null; then
    MASTER_ADDR=$(scontrol show node -o "$MASTER_ADDR" | grep -oE 'NodeAddr=[^ ]+' | cut -d= -f2)
fi
MASTER_PORT="${RDZV_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"
export MASTER_ADDR MASTER_PORT

cd "${SIMCSE_DIR:-$SLURM_SUBMIT_DIR}"
SIMCSE_STOP_DIR="${SIMCSE_STOP_DIR:-$PWD}"
export SIMCSE_STOP_FILE="$SIMCSE_STOP_DIR/.simcse-stop-$SLURM_JOB_ID"
rm -f "$SIMCSE_STOP_FILE"  # a stale one (from an attempt that died) would stop this run at once
# Rank 0 (on whichever node) records {"status": "done"|"stopped", "step": N} here when the run
# ends cleanly, so a launcher that exits non-zero after forwarding a stop signal (torchrun
# does) is not taken for a failure. Same visibility rule as the stop file.
export SIMCSE_STATUS_FILE="$SIMCSE_STOP_DIR/.simcse-status-$SLURM_JOB_ID"
rm -f "$SIMCSE_STATUS_FILE"
# How long torchrun lets the ranks finish their step and checkpoint after a signal.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"
ended_cleanly() {  # ended_cleanly RC: RC, or 0 when the trainer recorded a clean end (simcse_dist/cli/status.py)
    local rc=0
    "$PYTHON" -m simcse_dist.cli.status "$1" || rc=$?
    rm -f "$SIMCSE_STATUS_FILE"
    return "$rc"
}

echo "$(date '+%F %T') job $SLURM_JOB_ID restart count ${SLURM_RESTART_COUNT:-0}:" \
     "$NNODES node(s) [$SLURM_JOB_NODELIST] x $NPROC_PER_NODE rank(s), $LAUNCHER," \
     "$([[ $GPUS_PER_NODE -gt 0 ]] && echo "$GPUS_PER_NODE GPU(s)/node, nccl" || echo "CPU, gloo")," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, stop file $SIMCSE_STOP_FILE"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if (( GPUS_PER_NODE == 0 )); then
    export CUDA_VISIBLE_DEVICES=""
    # One node: ranks talk over loopback, whatever the host name resolves to. Many CPU nodes:
    # set GLOO_SOCKET_IFNAME to the interface that connects them (e.g. eth0, ib0).
    (( NNODES == 1 )) && export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
else
    # A rank stuck in a collective after a peer died errors out (after engine.dist_timeout_s)
    # instead of hanging until the time limit. Fabric settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA,
    # NCCL_DEBUG=WARN/INFO, ...) come from the environment: see slurm/README.md.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
fi
# Slurm 22.05-23.02: srun does not inherit sbatch's --cpus-per-task; without this the node's
# ranks all share one CPU where Slurm binds tasks to cores.
[[ -n $SLURM_CPUS_PER_TASK ]] && export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"

# The per-node command. Variables escaped with \$ expand in each task (its own SLURM_PROCID).
ARGS=""; (( $# )) && ARGS=$(printf ' %q' "$@")  # quoted once here, unquoted by each task's bash
PYTHON_Q=$(printf '%q' "$PYTHON")
case "$LAUNCHER" in
torchrun)
    # c10d rendezvous: the nodes find each other through a store on the first node; node ranks
    # are assigned by the rendezvous (a --node_rank would be ignored).
    NODE_CMD="$PYTHON_Q -m torch.distributed.run --nnodes $NNODES --nproc_per_node $NPROC_PER_NODE \
--rdzv_id $SLURM_JOB_ID --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT \
-m simcse_dist.cli$ARGS" ;;
deepspeed)
    # No ssh/pdsh: every node runs the launcher for its own ranks (--no_ssh --node_rank); the
    # hostfile tells each one the whole layout. On CPU, --num_gpus N starts N ranks.
    HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | tr '\n' ' ')
    HOSTFILE="\${TMPDIR:-/tmp}/simcse-hostfile-$SLURM_JOB_ID-\$SLURM_PROCID"
    NODE_CMD="printf '%s slots=$NPROC_PER_NODE\n' $HOSTS > $HOSTFILE && \
$PYTHON_Q -m deepspeed.launcher.runner --hostfile $HOSTFILE --no_ssh --node_rank \$SLURM_PROCID \
--num_nodes $NNODES --num_gpus $NPROC_PER_NODE --master_addr $MASTER_ADDR --master_port $MASTER_PORT \
--module simcse_dist.cli$ARGS" ;;
*)
    echo "LAUNCHER=$LAUNCHER: expected torchrun or deepspeed" >&2; exit 2 ;;
esac

# USR1 (time limit near, or `scancel --batch --signal=USR1 JOBID`): ask the trainer to checkpoint
# and stop, wait for it, requeue. TERM (scancel, or preemption with PreemptMode=REQUEUE, where
# Slurm requeues by itself): the same stop request within KillWait, no requeue from here.
SRUN_PID=""
on_signal() {
    local sig=$1 rc=0
    echo "$(date '+%F %T') batch shell got SIG$sig: asking the trainer to checkpoint and stop"
    touch "$SIMCSE_STOP_FILE"
    [[ -n $SRUN_PID ]] && { wait "$SRUN_PID" || rc=$?; }
    local cs=0; ended_cleanly "$rc" || cs=$?; rc=$cs
    if (( rc != 0 )); then
        echo "$(date '+%F %T') training exited with $rc after SIG$sig: not requeueing"
        rm -f "$SIMCSE_STOP_FILE"; exit "$rc"
    fi
    if [[ -e $SIMCSE_STOP_FILE ]]; then  # the trainer deletes it when it stops on request
        echo "$(date '+%F %T') training finished before it saw the stop request: not requeueing"
        rm -f "$SIMCSE_STOP_FILE"; exit 0
    fi
    if [[ $sig == USR1 ]]; then
        echo "$(date '+%F %T') checkpoint written: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 0
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# In the background, so that bash runs the trap as soon as a signal arrives (a foreground srun
# would delay it until srun exits).
srun --kill-on-bad-exit=1 --nodes "$NNODES" --ntasks-per-node=1 bash -c "$NODE_CMD" &
SRUN_PID=$!
rc=0; wait "$SRUN_PID" || rc=$?
ended_cleanly "$rc" || exit $?
rm -f "$SIMCSE_STOP_FILE"
echo "$(date '+%F %T') job $SLURM_JOB_ID: training finished"
