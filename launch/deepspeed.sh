#!/usr/bin/env bash
# The DeepSpeed launcher on one machine. On CPU it needs --num_gpus N to start N ranks, and it
# does not set OMP_NUM_THREADS (torchrun does), so we do:
#   NPROC=2 launch/deepspeed.sh --config configs/demo.yaml
set -o pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
source launch/common.sh
# --num_gpus makes the runner ignore CUDA_VISIBLE_DEVICES and take devices 0..N-1 (on a node
# without cgroup confinement, another job's GPUs): with a device list, pass it as --include.
if [[ -n $CUDA_VISIBLE_DEVICES ]]; then
    DEVICES=(--include "localhost:$CUDA_VISIBLE_DEVICES")
else
    DEVICES=(--num_gpus "${NPROC:-2}")
fi
run_launcher deepspeed "${DEVICES[@]}" --master_port "${MASTER_PORT:-29500}" --module simcse_dist.cli "$@"
