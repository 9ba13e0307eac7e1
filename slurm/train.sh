#!/usr/bin/env bash
# Multi-node training under Slurm: one task per node, each running torchrun with c10d rendezvous.
#   sbatch --nodes 4 --gpus-per-node 8 slurm/train.sh --config configs/sup-bert-base.yaml
#   GPUS_PER_NODE=0 NPROC_PER_NODE=2 sbatch --nodes 1 slurm/train.sh --config configs/demo.yaml  # CPU/gloo
#SBATCH --job-name=simcse
#SBATCH --ntasks-per-node=1
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
set -eo pipefail

GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))}"
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT="${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
# NCCL: set NCCL_SOCKET_IFNAME / NCCL_IB_HCA for your fabric; NCCL_DEBUG=WARN shows init problems.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

cd "${SIMCSE_DIR:-$SLURM_SUBMIT_DIR}"
ARGS=$(printf ' %q' "$@")  # quoted once here, expanded by the per-node shell below
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c "torchrun \
  --nnodes $SLURM_NNODES --nproc_per_node $NPROC_PER_NODE --node_rank \$SLURM_PROCID \
  --rdzv_id $SLURM_JOB_ID --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT \
  -m simcse_dist.cli $ARGS"
