#!/usr/bin/env bash
# The DeepSpeed launcher on one machine. On CPU it needs --num_gpus N to start N ranks, and it
# does not set OMP_NUM_THREADS (torchrun does), so we do:
#   NPROC=2 launch/deepspeed.sh --config configs/demo.yaml
set -o pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
source launch/common.sh
run_launcher deepspeed --num_gpus "${NPROC:-2}" --master_port "${MASTER_PORT:-29500}" --module simcse_dist.cli "$@"
