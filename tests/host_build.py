"""Building and running the host harnesses (tests/host_kernels, tests/host_nccl):
C++ programs built by the host compiler under AddressSanitizer and
UndefinedBehaviorSanitizer, whose every failure, sanitizer reports included,
fails the test that runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SANITIZERS = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
]
# For harnesses that run threads (it cannot be combined with AddressSanitizer).
THREAD_SANITIZER = ["-fsanitize=thread", "-fno-omit-frame-pointer"]


def compiler() -> str:
    """The host C++ compiler: a missing one fails the harness tests, not skips them."""
    found = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert found, "no C++ compiler (g++ or c++ on PATH, or CXX): the host harnesses need one"
    return found


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime.h), if there is one."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc is not None:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for candidate in filter(None, candidates):
        include = Path(candidate) / "include"
        if (include / "cuda_runtime.h").exists():
            return include
    return None


def compile_all(commands: list[list[str]]) -> None:
    """Runs the compiler commands in parallel; each must succeed."""
    jobs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for command in commands
    ]
    for job in jobs:
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, output


def link(inputs: list[Path], binary: Path, sanitizers: list[str] = SANITIZERS) -> Path:
    """Links a sanitized harness."""
    done = subprocess.run(
        [compiler(), *sanitizers, "-pthread", *map(str, inputs), "-ldl", "-o", str(binary)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return binary


def run_sanitized(commands: list[list[str]], timeout: float) -> list[str]:
    """Runs harnesses in parallel, each halting at its first sanitizer report
    (leaks and data races included); returns their outputs once each exited
    0 with nothing on stderr."""
    env = dict(
        os.environ,
        ASAN_OPTIONS="halt_on_error=1:detect_leaks=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        TSAN_OPTIONS="halt_on_error=1",
    )
    jobs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for c in commands
    ]
    outputs = []
    for job in jobs:
        try:
            stdout, stderr = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in jobs:
                other.kill()
            raise
        print(stdout)
        assert job.returncode == 0, stdout + stderr
        assert stderr == "", stderr  # a sanitizer report that did not halt
        outputs.append(stdout)
    return outputs
