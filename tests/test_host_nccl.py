"""The extension's NCCL communicator, run on the CPU against a scripted CUDA
runtime and NCCL: its watchdog, abort or revoke at the deadline, close, and
shrink (tests/host_nccl/host_comm.cpp says what it covers and what it
cannot). Under AddressSanitizer and UndefinedBehaviorSanitizer, against an
NCCL with ncclCommRevoke and one without, and under ThreadSanitizer (the
communicator's watchdog is a thread of its own). Needs the host compiler and
CUDA's headers (the communicator's types), as the CUDA build does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from host_build import (
    SANITIZERS,
    THREAD_SANITIZER,
    compile_all,
    compiler,
    cuda_include,
    link,
    run_sanitized,
)

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "tests" / "host_nccl"
FLAGS = ["-std=c++17", "-O0", "-g1", "-Wall", "-Wextra", "-Werror", "-pthread"]
SANITIZED = {"address": SANITIZERS, "thread": THREAD_SANITIZER}
# The fake NCCLs: one with ncclCommRevoke (2.32), one without (2.27), and
# the number of cases the harness runs against each.
FAKES = {"with-revoke": ([], 18), "without-revoke": (["-DFAKE_WITHOUT_REVOKE"], 17)}
# (sanitizer, fake NCCL) runs: the threads are the same with either fake.
RUNS = [("address", "with-revoke"), ("address", "without-revoke"), ("thread", "with-revoke")]


def build(out: Path) -> dict[tuple[str, str], Path]:
    """Compiles everything in parallel; returns the harness per run."""
    include = cuda_include()
    if include is None:
        pytest.skip("needs CUDA's headers (cuda_runtime.h), as the CUDA build does")
    cxx = compiler()
    csrc = ROOT / "csrc"
    sources = [HERE / "host_comm.cpp", csrc / "nccl_comm.cpp", csrc / "nccl_api.cpp"]
    commands = []
    for sanitizer, sanitizers in SANITIZED.items():
        (out / sanitizer).mkdir()
        flags = [*FLAGS, *sanitizers, f"-I{include}", f"-I{csrc}"]
        commands += [
            [cxx, *flags, "-c", str(source), "-o", str(out / sanitizer / f"{source.stem}.o")]
            for source in sources
        ]
        commands += [
            [cxx, *flags, *FAKES[variant][0], "-shared", "-fPIC", str(HERE / "fake_device.cpp"),
             "-o", str(fake(out, sanitizer, variant))]
            for s, variant in RUNS if s == sanitizer
        ]  # fmt: skip
    compile_all(commands)
    # The harness takes its CUDA runtime from the fake, which the loader then opens as NCCL.
    binaries = {}
    for sanitizer, variant in RUNS:
        objects = [out / sanitizer / f"{source.stem}.o" for source in sources]
        binary = out / sanitizer / f"host_comm_{variant}"
        link([*objects, fake(out, sanitizer, variant)], binary, SANITIZED[sanitizer])
        binaries[sanitizer, variant] = binary
    return binaries


def fake(out: Path, sanitizer: str, variant: str) -> Path:
    return out / sanitizer / f"fake_{variant}.so"


def test_the_communicator_runs_on_the_host_against_a_scripted_nccl(tmp_path: Path) -> None:
    binaries = build(tmp_path)
    commands = [
        [str(binary), str(fake(tmp_path, *run)), run[1]] for run, binary in binaries.items()
    ]
    for (sanitizer, variant), output in zip(binaries, run_sanitized(commands, 120), strict=True):
        expected = f"ok: {FAKES[variant][1]} cases ({variant})"
        assert output.splitlines()[-1] == expected, (sanitizer, output)
