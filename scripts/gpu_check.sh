#!/usr/bin/env bash
# Everything that needs a GPU, in one command: build the CUDA flavor into the
# current Python (which must already have a CUDA build of torch and pybind11),
# run the GPU tests, then the CUDA kernel tests under compute-sanitizer.
# Logs go to ${OUT:-gpu_check_out}/.
#
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
python="${PYTHON:-python}"
status=0

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
DISTLEARN_CUDA=1 "$python" -m pip install --no-build-isolation -e . > "$out/build.log" 2>&1 \
  || { echo "build failed: $out/build.log"; tail -30 "$out/build.log"; exit 1; }
"$python" -c "import distlearn_cuda as dl, json; print(json.dumps(dl.build_info()))" \
  | tee "$out/build_info.json"

"$python" -m pytest -q -rs tests/test_cuda_ops.py tests/test_build.py 2>&1 | tee "$out/gpu_tests.log"
status=$((status | ${PIPESTATUS[0]}))

compute-sanitizer --tool memcheck --error-exitcode 1 \
  "$python" -m pytest -q -x tests/test_cuda_ops.py > "$out/memcheck.log" 2>&1
memcheck=$?
tail -5 "$out/memcheck.log"
echo "compute-sanitizer memcheck exit status: $memcheck"
status=$((status | memcheck))
exit "$status"
