"""The extension's NCCL communicator, run on the CPU against a scripted CUDA
runtime and NCCL: its watchdog, abort or revoke at the deadline, close, and
shrink (tests/host_nccl/host_comm.cpp says what it covers and what it
cannot). Under AddressSanitizer and UndefinedBehaviorSanitizer, against an
NCCL with ncclCommRevoke and one without. Needs the host compiler and CUDA's
headers (the communicator's types), as the CUDA build does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from host_build import SANITIZERS, compile_all, compiler, cuda_include, link, run_sanitized

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "tests" / "host_nccl"
FLAGS = ["-std=c++17", "-O0", "-g1", *SANITIZERS, "-Wall", "-Wextra", "-Werror", "-pthread"]
# The fake NCCLs: one with ncclCommRevoke (2.32), one without (2.27), and
# the number of cases the harness runs against each.
FAKES = {"with-revoke": ([], 9), "without-revoke": (["-DFAKE_WITHOUT_REVOKE"], 8)}


def build(out: Path) -> dict[str, Path]:
    """Compiles everything in parallel; returns the harness per fake NCCL."""
    include = cuda_include()
    if include is None:
        pytest.skip("needs CUDA's headers (cuda_runtime.h), as the CUDA build does")
    cxx = compiler()
    csrc = ROOT / "csrc"
    flags = [*FLAGS, f"-I{include}", f"-I{csrc}"]
    sources = [HERE / "host_comm.cpp", csrc / "nccl_comm.cpp", csrc / "nccl_api.cpp"]
    objects = [out / f"{source.stem}.o" for source in sources]
    commands = [
        [cxx, *flags, "-c", str(source), "-o", str(obj)]
        for source, obj in zip(sources, objects, strict=True)
    ]
    commands += [
        [cxx, *flags, *defines, "-shared", "-fPIC", str(HERE / "fake_device.cpp"),
         "-o", str(out / f"fake_{variant}.so")]
        for variant, (defines, _) in FAKES.items()
    ]  # fmt: skip
    compile_all(commands)
    # The harness takes its CUDA runtime from the fake, which the loader then opens as NCCL.
    return {
        variant: link([*objects, out / f"fake_{variant}.so"], out / f"host_comm_{variant}")
        for variant in FAKES
    }


def test_the_communicator_runs_on_the_host_against_a_scripted_nccl(tmp_path: Path) -> None:
    for variant, binary in build(tmp_path).items():
        output = run_sanitized([str(binary), str(tmp_path / f"fake_{variant}.so"), variant], 120)
        assert output.splitlines()[-1] == f"ok: {FAKES[variant][1]} cases ({variant})", output
