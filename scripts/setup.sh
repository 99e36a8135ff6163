#!/usr/bin/env bash
# Sets up .venv: torch and NCCL's wheel, then distlearn_cuda (editable, which
# builds the _C extension: the CUDA flavor, NCCL path included, where nvcc is
# found) with the test and example extras. Safe to run again.
#
# DISTLEARN_TORCH picks the torch requirement. The default is the CPU build
# of torch 2.13.0: an unpinned "torch" would pull a multi-GB CUDA build. On
# a GPU machine, install your CUDA build of torch first and set
# DISTLEARN_TORCH=torch so it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet "${DISTLEARN_TORCH:-torch==2.13.0}"
# NCCL's wheel (~300 MB) is for the tests only: the build declares NCCL's ABI
# itself, and the tests load this libnccl.so.2 (version, messages, no GPU
# needed) and check those declarations against this nccl.h.
.venv/bin/python -m pip install --quiet nvidia-nccl-cu13
# cuobjdump, for the test that every kernel of the CUDA flavor stays within
# its register budget with no local memory (tests/test_build.py). No 13.0
# release of the wheel exists; 13.2's reads the cubins nvcc 13.0 writes.
.venv/bin/python -m pip install --quiet "nvidia-cuda-cuobjdump==13.2.86"
.venv/bin/python -m pip install --quiet -e ".[test,example,bench,nccl,docs]"
