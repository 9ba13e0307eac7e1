#!/usr/bin/env bash
# The GPU path in one command: correctness, throughput + peak memory, input pipeline.
#
#   bench/gpu_suite.sh --out DIR [--wheels WHEELS_DIR] [--model DIR] [--data FILE] [--sts-dev FILE]
#   bench/gpu_suite.sh --dry-run --out DIR      # CPU, tiny random BERT: checks the suite itself (<= 60 s)
#
# Writes DIR/gpu_suite.json and DIR/gpu_suite.md (python -m bench.gpu_suite does the work; see its
# docstring for the checks). A machine without deepspeed (e.g. a CUDA image with torch and
# transformers only) gets it from WHEELS_DIR, built beforehand by bench/build_gpu_wheels.sh:
# pip --no-index, nothing downloaded, nothing compiled (DS_BUILD_OPS=0: the engine uses torch's
# optimizers, and DeepSpeed's JIT ops break under some images' TORCH_CUDA_ARCH_LIST).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
wheels=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels=$2; shift 2 ;;
        --wheels=*) wheels=${1#--wheels=}; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
export DS_BUILD_OPS=0
if "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    export GPU_SUITE_DEEPSPEED="present"
else
    if [ -z "$wheels" ]; then
        echo "gpu_suite: deepspeed is not installed and no --wheels DIR was given: build the wheel dir with" \
             "bench/build_gpu_wheels.sh on a machine with PyPI access and pass it here" >&2
        exit 2
    fi
    echo "gpu_suite: deepspeed is NOT installed on this machine: installing it from the wheel dir $wheels" \
         "(pip --no-index --find-links, no download, no build)"
    "$PY" -m pip install -q --no-index --no-build-isolation --find-links "$wheels" \
        deepspeed hjson pydantic pydantic-core annotated-types typing-inspection
    export GPU_SUITE_DEEPSPEED="installed from wheels in $wheels"
    echo "gpu_suite: installed $("$PY" -c 'import deepspeed; print("deepspeed", deepspeed.__version__)' 2>/dev/null)"
fi
exec "$PY" -m bench.gpu_suite "${args[@]}"
