"""NCCL for CUDA tensors: loading the library, and one communicator per process group.

The extension never links NCCL: it opens it with dlopen the first time a
CUDA tensor needs it, so importing the package needs no GPU, driver or NCCL.
Which library: the path in ``DISTLEARN_NCCL_LIBRARY`` when set (and only it);
otherwise the copy torch has already loaded, then the ``nvidia-nccl-cu13``
wheel's, then whatever ``libnccl.so.2`` the dynamic linker finds.
"""

from __future__ import annotations

import atexit
import os
import weakref
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from . import _C

if TYPE_CHECKING:
    from ._group import Group

__all__ = ["LIBRARY_ENV", "communicator", "library_candidates", "load", "runtime_version"]

LIBRARY_ENV = "DISTLEARN_NCCL_LIBRARY"
_ALREADY_LOADED = ""  # the loader's name for "a libnccl.so.2 this process has loaded"

# group -> (CUDA device index, deadline in seconds) -> communicator. Weak in
# the group, so a destroyed group takes its communicators along; the rest are
# destroyed at exit, before the CUDA context goes away.
_communicators: weakref.WeakKeyDictionary[
    dist.ProcessGroup, dict[tuple[int, float], _C.NcclCommunicator]
] = weakref.WeakKeyDictionary()
atexit.register(_communicators.clear)


def library_candidates() -> list[str]:
    """What ``load`` tries, in order."""
    override = os.environ.get(LIBRARY_ENV, "").strip()
    if override:
        return [override]
    candidates = [_ALREADY_LOADED]
    try:
        import nvidia.nccl  # the wheel: a namespace package, no __init__
    except ImportError:
        pass
    else:
        candidates += [os.path.join(d, "lib", "libnccl.so.2") for d in nvidia.nccl.__path__]
    candidates.append("libnccl.so.2")
    return candidates


def load() -> tuple[int, str]:
    """Loads NCCL once per process; returns (NCCL_VERSION_CODE, what was opened).

    Raises:
        RuntimeError: this build has no NCCL support, or no candidate loaded
            (the message lists each one and why).
    """
    if not _C.has_nccl:
        raise RuntimeError(
            "this build of distlearn_cuda calls no NCCL itself: nccl.h was not found when it "
            "was built (install nvidia-nccl-cu13 and rebuild, see setup.py)"
        )
    return _C.nccl_load(library_candidates())


def runtime_version() -> int | None:
    """NCCL_VERSION_CODE of the loaded NCCL (e.g. 23203 for 2.32.3), or None before it loads."""
    if not _C.has_nccl:
        return None
    loaded = _C.nccl_loaded()
    return None if loaded is None else loaded[0]


def communicator(
    group: Group, device: torch.device, bootstrap: dist.ProcessGroup, timeout_s: float
) -> _C.NcclCommunicator:
    """The communicator of ``group`` on ``device`` with deadline ``timeout_s``,
    made on first use (collective).

    Rank 0 makes the unique id and ``bootstrap`` (a CPU group over the same
    ranks) carries it to the others; every rank then joins, within the deadline.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, timeout_s)
    of_group = _communicators.setdefault(group.group, {})
    found = of_group.get(key)
    if found is not None:
        return found
    load()
    payload = [_C.NcclCommunicator.unique_id() if group.rank == 0 else None]
    dist.broadcast_object_list(payload, src=group.global_rank(0), group=bootstrap)
    made = _C.NcclCommunicator(payload[0], group.world_size, group.rank, index, timeout_s)
    of_group[key] = made
    return made
