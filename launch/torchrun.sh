#!/usr/bin/env bash
# One machine, N processes (GPUs, or CPU ranks on gloo when no GPU is visible):
#   NPROC=8 launch/torchrun.sh --config configs/unsup-bert-base.yaml [section.key=value ...]
set -o pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
source launch/common.sh
run_launcher torchrun --standalone --nproc_per_node "${NPROC:-2}" -m simcse_dist.cli "$@"
