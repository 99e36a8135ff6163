"""The CUDA flavor's kernels, run on the CPU: the real launch planning and kernel
body for every (block, thread) of each launch's grid, under AddressSanitizer and
UndefinedBehaviorSanitizer, against a reference in double and the CPU flavor.

tests/host_kernels/host_kernels.cpp says what it covers and what a sequential
run cannot model. It needs only the host compiler, so it runs everywhere CI
does, GPU or not: a missing compiler fails this test rather than skipping it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tensor_cases import fresh_seed

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "host_kernels" / "host_kernels.cpp"
# The CPU flavor, linked in for the bit-for-bit comparison.
CPU_FLAVOR = ROOT / "csrc" / "ops_cpu.cpp"

# -O0: the harness is compile-bound (every op for every dtype pair);
# -ffp-contract=off: no FMA contraction, as the device build's -fmad=false.
FLAGS = [
    "-std=c++17",
    "-O0",
    "-g1",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-ffp-contract=off",
    "-Wall",
    "-Wextra",
    "-Werror",
    f"-I{ROOT / 'kernels'}",
    f"-I{ROOT / 'csrc'}",
]


def compiler() -> str:
    found = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert found, "no C++ compiler (g++ or c++ on PATH, or CXX): the host kernel tests need one"
    return found


def build(out_dir: Path) -> Path:
    """Compiles the harness and the CPU flavor in parallel, then links."""
    cxx = compiler()
    objects = [out_dir / "host_kernels.o", out_dir / "ops_cpu.o"]
    jobs = [
        subprocess.Popen(
            [cxx, *FLAGS, "-c", str(source), "-o", str(obj)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for source, obj in zip([HARNESS, CPU_FLAVOR], objects, strict=True)
    ]
    for job in jobs:
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, output
    binary = out_dir / "host_kernels"
    link = subprocess.run(
        [cxx, "-fsanitize=address,undefined", *map(str, objects), "-o", str(binary), "-pthread"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert link.returncode == 0, link.stdout + link.stderr
    return binary


def test_kernels_run_on_the_host_match_the_reference_and_the_cpu_flavor(tmp_path: Path) -> None:
    binary = build(tmp_path)
    env = dict(
        os.environ,
        ASAN_OPTIONS="halt_on_error=1:detect_leaks=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
    )
    done = subprocess.run(
        [str(binary), str(fresh_seed())],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "", done.stderr  # a sanitizer report that did not halt
    assert "ok" in done.stdout.splitlines()[-1]
