"""The process group the algorithms talk over, held by weak reference.

torch.distributed starts and meets the ranks; this module only makes sure it
is initialized, the way a user launching with torchrun (or plain python)
expects, and holds it so that ``dist.destroy_process_group()`` really
destroys it (see the lifetime invariant in ``_algorithms/member.py``).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist


class GroupGoneError(RuntimeError):
    """The process group was destroyed while an object still used it."""


def live(ref: weakref.ref[dist.ProcessGroup], what: str) -> dist.ProcessGroup:
    """The group behind ``ref``; GroupGoneError once it was destroyed."""
    group = ref()
    if group is None:
        raise GroupGoneError(
            f"{what} was destroyed (dist.destroy_process_group); make a new object on a live group"
        )
    return group


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_default_group() -> None:
    """Initializes the default process group if it is not initialized yet.

    With torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    it joins that world; otherwise it makes a world of one, so a script runs
    unchanged without a launcher. CPU tensors go over gloo, CUDA tensors over
    NCCL; with CUDA and LOCAL_RANK set, the process takes GPU LOCAL_RANK.
    """
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if all(var in os.environ for var in _TORCHRUN_VARS):
        if cuda and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, init_method="env://")
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


@dataclass(frozen=True)
class Group:
    """A process group (weakly held) with this process's rank and the world size in it."""

    ref: weakref.ref[dist.ProcessGroup]
    rank: int
    world_size: int

    @property
    def group(self) -> dist.ProcessGroup:
        return live(self.ref, "the process group")


def resolve(group: dist.ProcessGroup | None) -> Group:
    """The given group, or the default group (initialized on demand) for None."""
    if group is None:
        init_default_group()
        group = dist.group.WORLD
        assert group is not None, "initialized just now"
    elif not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}"
        )
    return Group(weakref.ref(group), dist.get_rank(group), dist.get_world_size(group))
