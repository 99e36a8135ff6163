"""The algorithm objects' base class: the group they talk over, their
collectives, and their lifetime.

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
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .._comm.collectives import Collectives
from .._comm.group import resolve

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

    def _bind_ahead(self, params: Any) -> None:
        """Binds ``params`` before the first call (see ``ElasticPort.bind``);
        nothing to bind ahead unless a subclass says so."""

    def _drop_exchanges(self) -> None:
        """Forgets the exchanges in flight (see ``ElasticPort.drop_exchanges``);
        none unless a subclass keeps some across calls."""

    def _keep_premerge(self, buffers: list[torch.Tensor]) -> None:
        """See ``ElasticPort.keep_premerge``: only DiLoCo merges fragments."""
        raise TypeError(f"{type(self).__name__} has no fragments to merge")

    def _fragment_views(self, tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """See ``ElasticPort.fragment_views``: only DiLoCo has fragments."""
        raise TypeError(f"{type(self).__name__} has no fragments")

    def _residuals(self) -> list[torch.Tensor | None]:
        """See ``ElasticPort.residuals``: none without error feedback."""
        return []

    def __enter__(self: _Member) -> _Member:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class ElasticPort:
    """Everything elastic mode (``distlearn_cuda.elastic``) does with an
    algorithm object beyond its public API: it reaches the object only
    through this, as torchft's LocalSGD reaches its manager only through
    ``start_quorum``, ``allreduce`` and ``should_commit``.

    The agreement collectives of a view change run on the object's own
    group, each bounded by its deadline and failing with
    ``CommunicationError`` like any of its collectives.
    """

    def __init__(self, member: GroupMember) -> None:
        self._member = member

    @property
    def collectives(self) -> Collectives:
        """The object's collectives: a shrunk NCCL communicator is installed
        into them (``elastic._shrink``)."""
        return self._member._collectives

    def max_int(self, value: int) -> int:
        """The largest ``value`` over the view."""
        return self._member._collectives.max_int(value)

    def broadcast_object(self, value: Any, src: int) -> Any:
        """Rank ``src``'s ``value`` (plain data and tensors), on every rank."""
        return self._member._collectives.broadcast_object(value, src)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value``, by rank."""
        return self._member._collectives.gather_objects(value)

    def verify_every_sum(self) -> None:
        """Waits on the host for every allreduce before its sum is used: on
        NCCL a failed allreduce is otherwise known only at a later call,
        with the inputs already overwritten, and a failed step could not
        run again on the next view."""
        self._member._collectives.verify_sums = True

    def bind(self, params: Any) -> None:
        """Binds ``params`` now, not at the first call (EA: the center
        exists, so ``state_dict()`` holds it before the first round)."""
        self._member._bind_ahead(params)

    def drop_exchanges(self) -> None:
        """Forgets every exchange in flight as if it had never started
        (DiLoCo: their fragments exchange again at their next turn); for a
        view change, whose new group cannot complete the old one's."""
        self._member._drop_exchanges()

    def keep_premerge(self, buffers: list[torch.Tensor]) -> None:
        """DiLoCo copies each local fragment into its place in ``buffers``
        (shaped like the bound params) before the fragment's outer step, so
        that a merge the job did not take can be undone."""
        self._member._keep_premerge(buffers)

    def fragment_views(self, tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """DiLoCo: each fragment's pieces of ``tensors`` (shaped like the
        bound params), as 1-D views."""
        return self._member._fragment_views(tensors)

    def residuals(self) -> list[torch.Tensor | None]:
        """DiLoCo with compression: each fragment's error-feedback residual
        (this rank's own: a hand-over must not give it the source's)."""
        return self._member._residuals()
