#!/usr/bin/env bash
# Everything that needs a GPU, in one command: build the CUDA flavor into the
# current Python (which must already have a CUDA build of torch, pybind11 and
# the nvidia-nccl-cu13 wheel), run every GPU test, the CUDA kernel tests under
# compute-sanitizer memcheck, then the kernel microbenchmarks.
# Logs and results go to ${OUT:-gpu_check_out}/; the exit status is non-zero
# if any step failed.
#
#   bash scripts/gpu_check.sh            # everything
#   SKIP_BENCH=1 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
python="${PYTHON:-python}"
status=0

step() {  # step NAME COMMAND...: runs it, logs to $out/NAME.log, records failure
  local name="$1"
  shift
  echo "== $name"
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -4 "$out/$name.log"
  echo "== $name: exit status $rc"
  status=$((status | rc))
}

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
DISTLEARN_CUDA=1 "$python" -m pip install --no-build-isolation -e . > "$out/build.log" 2>&1 \
  || { echo "build failed: $out/build.log"; tail -30 "$out/build.log"; exit 1; }
"$python" -c "import distlearn_cuda as dl, json; print(json.dumps(dl.build_info()))" \
  | tee "$out/build_info.json"

# The GPU tests, then the whole suite (CPU tests must pass on a GPU machine too).
step gpu_tests "$python" -m pytest -q -rs tests/test_cuda_ops.py tests/test_cuda_api.py \
  tests/test_build.py tests/test_nccl.py tests/test_sgd.py tests/test_ea.py -k "cuda or nccl or build or Nccl"
step full_suite "$python" -m pytest -q -rs
step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 \
  "$python" -m pytest -q -x tests/test_cuda_ops.py
if [ -z "${SKIP_BENCH:-}" ]; then
  step bench_cuda_ops "$python" -m benchmarks.bench_cuda_ops --out "$out"
fi
exit "$status"
