"""What setup.py built: the flavor, and how it behaves on this machine."""

from __future__ import annotations

import os
import shutil

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
    with pytest.raises(RuntimeError, match="cudaGetDevice"):
        _C.DeviceTable(layout, [4096])
