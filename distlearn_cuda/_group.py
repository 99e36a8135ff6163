"""The process group the algorithms talk over.

torch.distributed starts and meets the ranks; this module only makes sure it
is initialized, the way a user launching with torchrun (or plain python)
expects.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._collectives import Collectives

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
    """A process group with this process's rank and the world size in it."""

    group: dist.ProcessGroup
    rank: int
    world_size: int

    def global_rank(self, group_rank: int) -> int:
        """The default-group rank of a rank of this group (what src= takes)."""
        return dist.get_global_rank(self.group, group_rank)


def resolve(group: dist.ProcessGroup | None) -> Group:
    """The given group, or the default group (initialized on demand) for None."""
    if group is None:
        init_default_group()
        group = dist.group.WORLD
    elif not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}"
        )
    return Group(group, dist.get_rank(group), dist.get_world_size(group))


class GroupMember:
    """Base of the algorithm classes: the group they talk over, this rank in
    it, and the collectives they issue on it."""

    def __init__(self, group: dist.ProcessGroup | None, timeout: datetime.timedelta) -> None:
        self._group = resolve(group)
        self._collectives = Collectives(self._group, timeout)

    @property
    def group(self) -> dist.ProcessGroup:
        """The process group every collective of this object runs on."""
        return self._group.group

    @property
    def rank(self) -> int:
        """This process's rank in ``group``."""
        return self._group.rank

    @property
    def timeout(self) -> datetime.timedelta:
        """The deadline of every collective this object issues."""
        return self._collectives.timeout

    @property
    def world_size(self) -> int:
        """Number of ranks in ``group``."""
        return self._group.world_size
