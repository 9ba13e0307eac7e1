#!/usr/bin/env bash
# CPU only (gloo backend), e.g. a laptop or a CI box: hides GPUs, one thread per rank.
#   NPROC=2 launch/cpu-gloo.sh --config configs/demo.yaml eval.sts_dev_file=../shared/data/stsb/dev.tsv
set -o pipefail
cd "$(dirname "$0")/.."
export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
source launch/common.sh
run_launcher torchrun --standalone --nproc_per_node "${NPROC:-2}" -m simcse_dist.cli "$@"
