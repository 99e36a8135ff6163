"""What was built into the extension, and what is loaded at run time."""

from __future__ import annotations

from typing import Any

import torch

from . import _C
from ._comm import nccl as _nccl

__all__ = ["build_info"]


def build_info() -> dict[str, Any]:
    """Describes the installed extension.

    Keys:
        cuda: the CUDA flavor of ``_C`` was built (nvcc found at install time).
        cuda_archs: compute capabilities compiled in, e.g. ``["80", "90"]``
            (PTX of the last one is included); empty for the CPU flavor.
        cuda_build_version: CUDART_VERSION the extension was built with, or None.
        nccl_abi_version: the NCCL version whose C ABI the extension
            declares (e.g. "2.14.0"; it runs with that NCCL or any newer
            one, and needed no nccl.h to build), or None in the CPU flavor,
            which calls no NCCL itself.
        nccl_runtime_version: version of the NCCL the extension loaded, or
            None until a CUDA tensor on an NCCL group made it load one.
        nccl_library: the path of the NCCL library loaded (for the copy
            torch had already loaded, the file it was loaded from), or None.
        nccl_mode: which NCCL carries CUDA collectives on NCCL groups by
            default: "own" (the extension's communicator) or "group" (the
            group's own), from ``DISTLEARN_NCCL``; "invalid: ..." when that
            is neither (the objects' constructors raise ValueError then).
        device: the GPU torch would use (name and compute capability), or "cpu".
    """
    cuda = bool(_C.has_cuda)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        device = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    else:
        device = "cpu"
    loaded = _C.nccl_loaded() if _C.has_nccl else None
    return {
        "cuda": cuda,
        "cuda_archs": [a for a in _C.cuda_archs.split(";") if a],
        "cuda_build_version": _C.cuda_build_version() if cuda else None,
        "nccl_abi_version": _version_string(_C.nccl_abi_version),
        "nccl_runtime_version": _version_string(_nccl.runtime_version()),
        "nccl_library": loaded[1] if loaded is not None else None,
        "nccl_mode": _nccl.mode_or_invalid(),
        "device": device,
    }


def _version_string(code: int | None) -> str | None:
    """NCCL_VERSION_CODE (major * 10000 + minor * 100 + patch since 2.9) as "2.32.3"."""
    if code is None:
        return None
    return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"
