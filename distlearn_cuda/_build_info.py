"""What was built into the extension, and what is loaded at run time."""

from __future__ import annotations

from typing import Any

import torch

from . import _C

__all__ = ["build_info"]


def build_info() -> dict[str, Any]:
    """Describes the installed extension.

    Keys:
        cuda: the CUDA flavor of ``_C`` was built (nvcc found at install time).
        cuda_archs: compute capabilities compiled in, e.g. ``["80", "90"]``
            (PTX of the last one is included); empty for the CPU flavor.
        cuda_build_version: CUDART_VERSION the extension was built with, or None.
        nccl_header_version: NCCL version the extension was built against, or
            None: this build does not call NCCL itself yet (collectives go
            through torch.distributed).
        nccl_runtime_version: the NCCL loaded by the extension, or None.
        device: the GPU torch would use (name and compute capability), or "cpu".
    """
    cuda = bool(_C.has_cuda)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        device = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    else:
        device = "cpu"
    return {
        "cuda": cuda,
        "cuda_archs": [a for a in _C.cuda_archs.split(";") if a],
        "cuda_build_version": _C.cuda_build_version() if cuda else None,
        "nccl_header_version": None,
        "nccl_runtime_version": None,
        "device": device,
    }
