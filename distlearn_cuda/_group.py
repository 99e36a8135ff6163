"""The process group the algorithms talk over, and the objects' lifetime.

torch.distributed starts and meets the ranks; this module only makes sure it
is initialized, the way a user launching with torchrun (or plain python)
expects.

Lifetime invariant: an algorithm object never keeps a user's process group
alive. It holds the group by weak reference (torch's registry holds the
strong one), so ``dist.destroy_process_group()`` really destroys it, joining
gloo's worker threads then and there, instead of leaving them running into
the interpreter's teardown, where a worker that releases a tensor must take
the GIL of a finalizing interpreter and the process aborts. What an object
owns (its private gloo backend, NCCL leases, a positions thread) goes with
``close()``, with the object when it is collected, or in the exit handler,
which runs before the interpreter's teardown.
"""

from __future__ import annotations

import atexit
import datetime
import os
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import torch
import torch.distributed as dist

from ._collectives import Collectives, live

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
    return Group(weakref.ref(group), dist.get_rank(group), dist.get_world_size(group))


# Objects not closed yet: closed at interpreter exit (registered after torch
# was imported, so this runs before torch's own exit handlers).
_open_members: weakref.WeakSet[GroupMember] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for member in list(_open_members):
        member._collectives.close()


_Member = TypeVar("_Member", bound="GroupMember")


class GroupMember:
    """Base of the algorithm classes: the group they talk over, this rank in
    it, the collectives they issue on it, and their lifetime (``close()``,
    or a ``with`` block)."""

    def __init__(self, group: dist.ProcessGroup | None, timeout: datetime.timedelta) -> None:
        """Collective over the ranks of ``group``: every rank makes the same
        objects, in the same order, with the same settings (``_settings``).

        Raises:
            CommunicationError: not every rank constructed one within
                ``timeout`` (nothing is left behind: later objects made by
                every rank work).
            ValueError: on every rank, when the ranks' settings differ.
        """
        self._group = resolve(group)
        owner = weakref.ref(self)  # no cycle through the collectives

        def step() -> int:
            member = owner()
            try:
                return member._position_step() if member is not None else 0
            except AttributeError:  # still being constructed
                return 0

        what = f"{type(self).__name__}()"
        self._collectives = Collectives(self._group, timeout, step=step, what=what)
        self._closed = False
        settings = self._settings()
        try:
            self._collectives.check_same_structure(
                [f"{name}={value}" for name, value in settings],
                [name for name, _ in settings],
                f"{what}: settings",
                noun="setting",
            )
        except BaseException:
            self._collectives.close()
            raise
        _open_members.add(self)

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

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    def close(self) -> None:
        """Releases what this object holds: completes a collective still in
        flight (bounded by the deadline; its failure is not raised again),
        removes hooks, and releases the private gloo group and any NCCL
        communicator. Idempotent, local (not collective), safe after a
        ``CommunicationError``. Later calls that communicate raise
        RuntimeError; the state already computed (``state_dict()``, the EA
        center) stays readable. ``with dl.AllReduceSGD() as sgd:`` closes
        on leaving the block."""
        if self._closed:
            return
        self._closed = True
        _open_members.discard(self)
        try:
            self._release()
        finally:
            self._collectives.close()

    def _position_step(self) -> int:
        """The step count a failure message names with each rank's position."""
        return 0

    def _settings(self) -> list[tuple[str, object]]:
        """(name, value) of each setting every rank's object must share,
        compared when the objects are made."""
        return [("class", type(self).__name__)]

    def _release(self) -> None:
        """What a subclass must finish before its collectives go (never raises
        CommunicationError)."""

    def __enter__(self: _Member) -> _Member:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
