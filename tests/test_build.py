"""What setup.py built: the flavor, its kernels' resources, and how it behaves here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import distlearn_cuda as dl
from distlearn_cuda import _C


def test_build_info_describes_the_extension() -> None:
    info = dl.build_info()
    keys = {"cuda", "cuda_archs", "nccl_abi_version", "nccl_runtime_version", "nccl_library"}
    assert keys | {"nccl_mode", "device"} <= info.keys()
    assert info["cuda"] is bool(_C.has_cuda)
    if info["cuda"]:
        assert info["cuda_archs"] and all(a.isdigit() for a in info["cuda_archs"])
        assert info["cuda_build_version"] >= 11000
        assert info["nccl_abi_version"] == "2.14.0"  # the CUDA flavor always has NCCL
    else:
        assert info["cuda_archs"] == [] and info["cuda_build_version"] is None
        assert info["nccl_abi_version"] is None
    assert (info["device"] == "cpu") is (not torch.cuda.is_available())


@pytest.mark.skipif(
    shutil.which("nvcc") is None or os.environ.get("DISTLEARN_CUDA") == "0",
    reason="nvcc is not on PATH here, so the CPU flavor is the expected build",
)
def test_cuda_flavor_is_built_where_nvcc_is_found() -> None:
    # CI has nvcc and no GPU: this is what makes a kernel compile error fail CI.
    assert _C.has_cuda


@pytest.mark.skipif(
    not _C.has_cuda or torch.cuda.is_available(), reason="needs the CUDA flavor without a GPU"
)
def test_cuda_ops_without_a_gpu_raise_instead_of_crashing() -> None:
    layout = _C.Layout([3], [0], 0, 1)
    with pytest.raises(RuntimeError, match="cudaMemsetAsync"):  # pack zeroes the flag first
        _C.pack_cuda(layout, [4096], 8192, 0, 0)
    with pytest.raises(RuntimeError, match="cudaGetLastError"):  # the launch itself
        _C.unpack_cuda(layout, [4096], 8192, True, 0)


# Every kernel of _C within 64 registers per thread and with no stack or
# local memory, on every architecture compiled in (sm_80 and sm_90 by
# default): the register cap is __launch_bounds__'s (kMinBlocksPerSm in
# kernels/multi_tensor_engine.h); a spill would show here as stack or local
# bytes. One kernel per (op, tensor dtype, buffer dtype): 8 ops (pack,
# unpack, the EA blend and its catch-up form, the center update, DiLoCo's
# outer gradient, and its outer step with and without reading the local
# params) x 4 x 4.
MAX_REGISTERS = 64
KERNELS_PER_ARCH = 8 * 4 * 4
# The low-bit sum's kernels (csrc/low_bit_cuda.cu): encode, sum, decode.
# Encode and sum keep one block's values and codes in a thread's local
# array (kernels/low_bit_sum.h: kMaxLowBitBlock = 256 floats and 256
# codes, 1280 bytes); the compiler may add a few bytes (sum's: 1296 with
# CUDA 13.0).
LOW_BIT_KERNELS = 3
LOW_BIT_STACK = 5 * 256 + 64


def find_cuobjdump() -> str | None:
    """The nvidia-cuda-cuobjdump wheel's cuobjdump (scripts/setup.sh installs it), else
    one on PATH or in the toolkit."""
    try:
        import nvidia  # namespace package of NVIDIA's wheels
    except ImportError:
        nvidia = None
    for directory in getattr(nvidia, "__path__", []):
        candidate = Path(directory) / "cu13" / "bin" / "cuobjdump"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home) / "bin" / "cuobjdump"
    return str(candidate) if candidate.exists() else None


def kernel_resources(dump: str) -> dict[str, dict[str, dict[str, int]]]:
    """{arch: {kernel: {"REG": n, "STACK": n, "LOCAL": n, ...}}} from
    ``cuobjdump --dump-resource-usage`` (the SASS sections; PTX has no such figures)."""
    found: dict[str, dict[str, dict[str, int]]] = {}
    arch = kernel = None
    in_elf = False
    for line in dump.splitlines():
        if line.startswith("Fatbin "):
            in_elf, arch = line.startswith("Fatbin elf code"), None
        elif in_elf and (m := re.match(r"arch = (sm_\d+)", line)):
            arch = m.group(1)
            found.setdefault(arch, {})
        elif in_elf and (m := re.match(r"\s*Function (\S+):", line)):
            kernel = m.group(1)
        elif in_elf and arch and kernel and "REG:" in line:
            found[arch][kernel] = {
                k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)
            }
            kernel = None
    return found


def demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if filt is None:
        return names
    done = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    return done.stdout.splitlines() if done.returncode == 0 else names


@pytest.mark.skipif(
    not _C.has_cuda and (shutil.which("nvcc") is None or os.environ.get("DISTLEARN_CUDA") == "0"),
    reason="the CPU flavor is the expected build here (no nvcc): it has no kernels",
)
def test_every_kernel_fits_64_registers_with_no_stack_or_local_memory() -> None:
    """Every kernel within the register budget, with no stack or local
    memory but the low-bit kernels' block arrays (LOW_BIT_STACK)."""
    assert _C.has_cuda, "nvcc is on PATH but _C is the CPU flavor: no kernels were checked"
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        # CI's setup installs it, so there its absence is a failure; elsewhere
        # (a GPU machine without the wheel or a full toolkit) a skip.
        message = "cuobjdump not found: scripts/setup.sh installs nvidia-cuda-cuobjdump"
        assert not os.environ.get("CI"), message
        pytest.skip(message)
    done = subprocess.run(
        [cuobjdump, "--dump-resource-usage", _C.__file__],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    resources = kernel_resources(done.stdout)
    archs = {f"sm_{a}" for a in dl.build_info()["cuda_archs"]}
    assert set(resources) == archs, f"SASS for {sorted(resources)}, built for {sorted(archs)}"
    offenders = []
    for arch, kernels in sorted(resources.items()):
        names = list(kernels)
        readable_names = demangle(names)
        low_bit = sum("low_bit_kernel" in r for r in readable_names)
        assert low_bit == LOW_BIT_KERNELS, f"{arch}: {low_bit} low-bit kernels"
        assert len(kernels) == KERNELS_PER_ARCH + low_bit, f"{arch}: {len(kernels)} kernels"
        for name, readable in zip(names, readable_names, strict=True):
            use = kernels[name]
            stack = LOW_BIT_STACK if "low_bit_kernel" in readable else 0
            if use["REG"] > MAX_REGISTERS or use["STACK"] > stack or use["LOCAL"] > 0:
                offenders.append(
                    f"{arch} REG:{use['REG']} STACK:{use['STACK']} LOCAL:{use['LOCAL']} {readable}"
                )
    assert not offenders, "kernels over budget:\n" + "\n".join(offenders)


def test_the_resource_parser_reads_sass_sections_only() -> None:
    dump = """
Fatbin elf code:
================
arch = sm_80
Resource usage:
 Common:
  GLOBAL:0
 Function _Z1kv:
  REG:70 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:32764 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin ptx code:
================
arch = sm_90

Fatbin elf code:
================
arch = sm_90
Resource usage:
 Function _Z1kv:
  REG:40 STACK:0 SHARED:0 LOCAL:4 CONSTANT[0]:32764 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    found = kernel_resources(dump)
    assert found == {
        "sm_80": {"_Z1kv": found["sm_80"]["_Z1kv"]},
        "sm_90": {"_Z1kv": found["sm_90"]["_Z1kv"]},
    }
    assert (found["sm_80"]["_Z1kv"]["REG"], found["sm_80"]["_Z1kv"]["STACK"]) == (70, 8)
    assert (found["sm_90"]["_Z1kv"]["REG"], found["sm_90"]["_Z1kv"]["LOCAL"]) == (40, 4)
    assert found["sm_90"]["_Z1kv"]["CONSTANT[0]"] == 32764


CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _methods_that_take_the_mutex(source: str) -> set[str]:
    """NcclCommunicator's methods that lock ``mutex_``, directly or through
    another method they call (read from the C++ definitions)."""
    bodies = dict(
        re.findall(
            r"^\S.*?NcclCommunicator::(\w+)\(.*?\n(.*?)^\}", source, flags=re.MULTILINE | re.DOTALL
        )
    )
    locking = {name for name, body in bodies.items() if re.search(r"lock\w*<std::mutex>", body)}
    while True:
        more = {
            name
            for name, body in bodies.items()
            if name not in locking and any(re.search(rf"\b{m}\(", body) for m in locking)
        }
        if not more:
            return locking
        locking |= more


def test_every_binding_that_can_wait_on_the_communicator_releases_the_gil() -> None:
    # A call that waits on the mutex while holding the GIL stalls every
    # Python thread while the watchdog holds it through a slow abort: the
    # elastic heartbeat too, which gets a healthy rank declared dead.
    locking = _methods_that_take_the_mutex((CSRC / "nccl_comm.cpp").read_text())
    assert {"check", "usable", "can_shrink", "revoked", "closed", "all_reduce_sum"} <= locking
    bindings = (CSRC / "bindings.cpp").read_text()
    chain = bindings[bindings.index('m, "NcclCommunicator"') :]
    statements = re.split(r"\n\s*\.def", chain)
    bound = set()
    for statement in statements:
        called = set(re.findall(r"NcclCommunicator::(\w+)|comm\.(\w+)\(", statement))
        names = {a or b for a, b in called} & locking
        bound |= names
        assert not names or "release" in statement, f"holds the GIL while waiting: {statement}"
    assert {"check", "usable", "close", "abort", "shrink"} <= bound
