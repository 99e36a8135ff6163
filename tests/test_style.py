"""The code is formatted and linted as the repository's configs say."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPP_SOURCES = sorted(
    str(p)
    for d in ("csrc", "kernels", "tests/host_kernels", "tests/host_nccl", "tests/host_common")
    for p in (ROOT / d).iterdir()
    if p.suffix in {".h", ".cpp", ".cu", ".cuh"}
)


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_python_is_ruff_clean() -> None:
    lint = run(sys.executable, "-m", "ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_cpp_is_clang_formatted() -> None:
    clang_format = shutil.which("clang-format", path=str(Path(sys.executable).parent))
    clang_format = clang_format or shutil.which("clang-format")
    assert clang_format, "clang-format is not installed (it is in the test extras)"
    result = run(clang_format, "--dry-run", "--Werror", *CPP_SOURCES)
    assert result.returncode == 0, result.stdout + result.stderr
