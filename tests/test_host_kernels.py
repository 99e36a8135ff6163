"""The CUDA flavor's kernels, run on the CPU: the real launch planning and kernel
body for every (block, thread) of each launch's grid, under AddressSanitizer and
UndefinedBehaviorSanitizer, against a reference in double and the CPU flavor
(the fused ops), or bit for bit against the CPU flavor (the low-bit sum's
passes, whose CPU flavor tests/test_low_bit_passes.py checks against the
float64 oracle of the formats).

tests/host_kernels/host_kernels.cpp and low_bit_kernels.cpp say what they
cover and what a sequential run cannot model. They need only the host
compiler, so they run everywhere CI does, GPU or not: a missing compiler
fails these tests rather than skipping them.
"""

from __future__ import annotations

from pathlib import Path

from host_build import SANITIZERS, compile_all, compiler, link, run_sanitized
from tensor_cases import fresh_seed

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "host_kernels" / "host_kernels.cpp"
# The fused ops' instantiations for the host launcher (the kernel bodies for
# every dtype pair, most of the compile time), compiled beside the harness.
LAUNCHES = sorted((ROOT / "tests" / "host_kernels").glob("launch_*.cpp"))
# The CPU flavor, linked in for the bit-for-bit comparison.
CPU_FLAVOR = ROOT / "csrc" / "ops_cpu.cpp"

# -O0 for the kernels (the launches and the CPU flavor: compile-bound, every
# op for every dtype pair); -O1 for the harness itself (its references, data
# and checks are most of the run time, and its compile runs beside the
# launches'); -ffp-contract=off: no FMA contraction, as the device build's
# -fmad=false.
FLAGS = [
    "-std=c++17",
    "-g1",
    *SANITIZERS,
    "-ffp-contract=off",
    "-Wall",
    "-Wextra",
    "-Werror",
    f"-I{ROOT / 'kernels'}",
    f"-I{ROOT / 'csrc'}",
]


def optimization(source: Path) -> str:
    return "-O1" if source == HARNESS else "-O0"


def build(out_dir: Path) -> Path:
    """Compiles the harness, its launches and the CPU flavor in parallel, then links."""
    sources = [HARNESS, *LAUNCHES, CPU_FLAVOR]
    assert len(LAUNCHES) == 2, LAUNCHES
    objects = [out_dir / f"{source.stem}.o" for source in sources]
    compile_all(
        [
            [compiler(), *FLAGS, optimization(source), "-c", str(source), "-o", str(obj)]
            for source, obj in zip(sources, objects, strict=True)
        ]
    )
    return link(objects, out_dir / "host_kernels")


# Processes the cases are spread over (one per core of CI's machine).
SHARDS = 2


def test_kernels_run_on_the_host_match_the_reference_and_the_cpu_flavor(tmp_path: Path) -> None:
    binary, seed = str(build(tmp_path)), str(fresh_seed())
    outputs = run_sanitized(
        [[binary, seed, str(shard), str(SHARDS)] for shard in range(SHARDS)], timeout=300
    )
    cases = 0
    for output in outputs:
        last = output.splitlines()[-1]
        assert last.startswith("host kernels: ") and last.endswith(": ok"), output
        cases += int(last.split()[2])
    assert cases == 39  # every case ran, in one shard or the other


LOW_BIT_HARNESS = ROOT / "tests" / "host_kernels" / "low_bit_kernels.cpp"
LOW_BIT_CPU_FLAVOR = ROOT / "csrc" / "low_bit_cpu.cpp"


def test_low_bit_kernels_run_on_the_host_match_the_cpu_flavor(tmp_path: Path) -> None:
    sources = [LOW_BIT_HARNESS, LOW_BIT_CPU_FLAVOR]
    objects = [tmp_path / f"{source.stem}.o" for source in sources]
    compile_all(
        [
            [compiler(), *FLAGS, "-O1", "-c", str(source), "-o", str(obj)]
            for source, obj in zip(sources, objects, strict=True)
        ]
    )
    binary = link(objects, tmp_path / "low_bit_kernels")
    (output,) = run_sanitized([[str(binary), str(fresh_seed())]], timeout=300)
    assert output.splitlines()[-1] == "low-bit kernels: 60 cases: ok", output
