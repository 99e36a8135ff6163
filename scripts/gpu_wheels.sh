#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored through .git/info/exclude), the wheels
# that elastic mode needs and the lent GPU machine's image lacks: torchft
# and the OpenTelemetry packages it imports, for that machine's Python 3.12
# on x86-64 (3.6 MB; these versions passed there on 2026-11-26).
#
#   bash scripts/gpu_wheels.sh          # here, before the GPU run
#
# The run then names .whl in carry and starts with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
# so that gpu_check.sh's elastic step finds torchft.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
mkdir -p .git/info .whl
grep -qx "/.whl/" .git/info/exclude 2> /dev/null || echo "/.whl/" >> .git/info/exclude
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  torchft==0.2.0 protobuf==7.36.2 googleapis-common-protos==1.76.0 \
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-proto==1.45.2 \
  opentelemetry-exporter-otlp-proto-http==1.45.2 \
  opentelemetry-exporter-otlp-proto-common==1.45.2 \
  opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
ls .whl
