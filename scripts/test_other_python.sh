#!/usr/bin/env bash
# Runs the test suite under another Python, in a fresh clone of this
# checkout's HEAD, for the lowest and highest Python that pyproject.toml
# declares. This machine has a CPU wheel of torch for 3.11 only; elsewhere
# this takes PyPI's torch (its CUDA build, about 5 GB with its CUDA wheels,
# which runs on a CPU), so it is not part of CI: run it when the Python
# floor or ceiling changes, and record the result in docs/getting-started.md
# (Install).
#
#   bash scripts/test_other_python.sh 3.10     # a pyenv version, or a python path
set -euo pipefail
version="${1:?usage: $0 PYTHON_VERSION_OR_PATH}"
if [ -x "$version" ]; then
  python="$version"
else
  python="$(ls -d "$HOME"/.pyenv/versions/"$version"*/bin/python | sort -V | tail -1)"
fi
here="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$here" "$work/repo"
cd "$work/repo"
PYTHON="$python" DISTLEARN_TORCH="${DISTLEARN_TORCH:-torch==2.13.0}" bash scripts/setup.sh
.venv/bin/python --version
.venv/bin/python -m pytest -q
