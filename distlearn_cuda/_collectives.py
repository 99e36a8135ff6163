"""The collectives the algorithms issue on their flat buffers, routed by device.

CUDA buffers on a group whose CUDA backend is NCCL go through the
extension's own NCCL communicator, enqueued on the current stream (no host
synchronization); everything else (CPU buffers, CUDA buffers on gloo, builds
without NCCL support) through ``torch.distributed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from . import _C, _nccl
from ._validate import DTYPE_CODES

if TYPE_CHECKING:
    from ._group import Group

__all__ = ["Collectives", "uses_own_nccl"]


def uses_own_nccl(group: dist.ProcessGroup) -> bool:
    """Whether CUDA buffers on ``group`` go through the extension's NCCL."""
    if not (_C.has_nccl and dist.is_nccl_available()):
        return False
    try:
        backend = group._get_backend(torch.device("cuda"))
    except RuntimeError:  # the group has no CUDA backend
        return False
    return type(backend).__name__ == "ProcessGroupNCCL"


class Collectives:
    """Sum-allreduce and broadcast of one buffer over a group."""

    def __init__(self, group: Group) -> None:
        self._group = group
        self._own_nccl = uses_own_nccl(group.group)
        self._communicators: dict[int | None, _C.NcclCommunicator] = {}

    def all_reduce_sum(self, buffer: torch.Tensor) -> None:
        """buffer <- its sum over the ranks, in place."""
        comm = self._communicator(buffer.device)
        if comm is None:
            dist.all_reduce(buffer, group=self._group.group)
            return
        comm.all_reduce_sum(
            buffer.data_ptr(), buffer.numel(), DTYPE_CODES[buffer.dtype], _stream(buffer.device)
        )

    def broadcast(self, buffer: torch.Tensor, src: int) -> None:
        """buffer <- group rank ``src``'s buffer, in place."""
        comm = self._communicator(buffer.device)
        if comm is None:
            dist.broadcast(buffer, src=self._group.global_rank(src), group=self._group.group)
            return
        comm.broadcast(
            buffer.data_ptr(),
            buffer.numel(),
            DTYPE_CODES[buffer.dtype],
            src,
            _stream(buffer.device),
        )

    def _communicator(self, device: torch.device) -> _C.NcclCommunicator | None:
        if device.type != "cuda" or not self._own_nccl:
            return None
        comm = self._communicators.get(device.index)
        if comm is None:
            comm = self._communicators[device.index] = _nccl.communicator(self._group, device)
        return comm


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
