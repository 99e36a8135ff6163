"""The collectives the algorithms issue, each with a deadline, routed by device.

NOTE [Deadlines]. Every object makes a private gloo group over the ranks of its group, with
the deadline as gloo's timeout: gloo then bounds each operation itself (a
stalled peer raises after the deadline, a dead one as soon as its
connections drop) and leaves nothing blocked behind, so the process can
still save a checkpoint and exit. CPU buffers, CUDA buffers on gloo groups
and the small bookkeeping collectives go through it. CUDA buffers on a
group whose CUDA backend is NCCL go through the extension's own NCCL
communicator (one per group and device, shared by the objects and owned by
``_comm.nccl``), enqueued on the current stream (no host synchronization), whose
watchdog aborts NCCL when a collective misses this object's deadline so that
the next call raises. With ``DISTLEARN_NCCL=group``, or in the CPU flavor of
the extension, they go through that group itself, bounded by its timeout.

Any failure becomes a ``CommunicationError`` naming the operation, the
ranks and this rank; the object is unusable afterwards.

The private group is a gloo backend this object owns (``_comm.gloo``): released
by ``close()``, when the object is collected, or at exit. The user's group
is held by weak reference, so ``dist.destroy_process_group()`` destroys it;
the object then raises at its next call and lets its backend go.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from .. import _C
from .._native import DTYPE_CODES, current_stream_handle
from ..errors import CommunicationError
from . import nccl as _nccl
from .gloo import PrivateGloo
from .group import Group, GroupGoneError
from .low_bit import LowBitSum
from .positions import Positions

logger = logging.getLogger(__name__)

__all__ = [
    "Collectives",
    "PendingSum",
    "is_capturing",
    "uses_cuda_nccl",
]


def uses_cuda_nccl(group: dist.ProcessGroup) -> bool:
    """Whether ``group`` runs its CUDA collectives on NCCL."""
    if not dist.is_nccl_available():
        return False
    try:
        backend = group._get_backend(torch.device("cuda"))
    except RuntimeError:  # the group has no CUDA backend
        return False
    return type(backend).__name__ == "ProcessGroupNCCL"


def is_capturing(device: torch.device) -> bool:
    """Whether work enqueued for ``device`` now goes into a CUDA graph capture."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class PendingSum:
    """A sum-allreduce in flight. ``wait()`` makes its result usable by work
    the caller issues next (on a GPU: makes the current stream wait for it,
    without blocking the host)."""

    def __init__(self, finish: Callable[[], None]) -> None:
        self._finish: Callable[[], None] | None = finish

    def wait(self) -> None:
        """Idempotent; raises CommunicationError if the allreduce failed."""
        finish, self._finish = self._finish, None
        if finish is not None:
            finish()


# NOTE [Low-bit sums in flight]: a low-bit sum is three collectives on the
# private gloo group (an all-to-all and the exact tail's allreduce, then an
# all-gather of the shards each rank summed), which pair up across the ranks
# in the order each rank starts them. The all-gather can start only once the
# all-to-all arrived and the shard was summed, so an asynchronous sum leaves
# it for later, and "later" must fall at the same place in every rank's
# sequence of collectives even where the ranks' calls differ (a rank waiting
# in a synchronization while the others train, a rank with a problem): it
# starts when the object starts its next collective of any kind, or when the
# sum is waited for, whichever comes first. Between two collective starts
# only the sum started last can be pending, so either way its all-gather
# falls between the same two starts on every rank.
class PendingLowBitSum(PendingSum):
    """A low-bit sum in flight (``Collectives.all_reduce_low_bit_async``)."""

    def __init__(
        self,
        owner: Collectives,
        started: float,
        gather: Callable[[], Any],
        finish: Callable[[Any], None],
        tail_sum: Any,
    ) -> None:
        super().__init__(self._finish_sum)
        self._owner, self._started = owner, started
        self._gather: Callable[[], Any] | None = gather
        self._gathered: Any = None
        self._finish_with = finish
        self._tail_sum = tail_sum

    def start_gather(self) -> None:
        """Sums this rank's shard once the all-to-all arrived and starts the
        all-gather (once)."""
        gather, self._gather = self._gather, None
        if gather is None:
            return
        if self._owner._gathering is self:
            self._owner._gathering = None
        try:
            self._gathered = gather()
        except RuntimeError as error:
            self._owner._fail("all_reduce_low_bit", self._started, error)

    def wait_for_tail(self) -> None:
        """Waits for the exact tail only (the count slots and the non-finite
        flag), readable then: the low-bit payload stays in flight."""
        try:
            self._tail_sum.wait()
        except RuntimeError as error:
            self._owner._fail("all_reduce_low_bit", self._started, error)

    def _finish_sum(self) -> None:
        self.start_gather()
        if self._gathered is None:  # the all-to-all failed: _fail raised then
            self._owner.check_usable("all_reduce_low_bit")
        try:
            self._finish_with(self._gathered)
        except RuntimeError as error:
            self._owner._fail("all_reduce_low_bit", self._started, error)


# What objects closed in a forked child held: the parent's backends and
# threads, never torn down in the child (NOTE [Fork] in _nccl).
_kept_in_child: list[object] = []


class Collectives:
    """Collectives of one algorithm object over a group."""

    def __init__(
        self,
        group: Group,
        timeout: datetime.timedelta,
        nccl: str | None = None,
        step: Callable[[], int] = lambda: 0,
        what: str = "an object",
    ) -> None:
        """``nccl``: "own" or "group" (see ``_nccl.mode``); None reads DISTLEARN_NCCL.
        ``step``: the owner's step count, named with each rank's position
        when a collective fails. ``what``: the owner, as error messages name it.

        Collective: see ``PrivateGloo`` (CommunicationError when not every
        rank of the group makes one)."""
        nccl_mode = _nccl.mode(nccl)
        self._group = group
        self._timeout = timeout
        self._timeout_s = timeout.total_seconds()
        self._ranks = dist.get_process_group_ranks(group.group)
        # Collective over the group's ranks only (not the whole world), so
        # objects on subgroups can be made by their members alone.
        self._gloo: PrivateGloo | None = PrivateGloo(
            group.group, group.rank, group.world_size, timeout, what
        )
        self._positions = Positions(
            self._gloo.store, "positions", group.rank, len(self._ranks), step
        )
        self._cuda_nccl = uses_cuda_nccl(group.group)
        # CUDA buffers on the extension's communicator, else on the group's own NCCL.
        self._own_nccl = self._cuda_nccl and _C.has_nccl and nccl_mode == "own"
        self._leases: dict[int, _nccl.Lease] = {}  # by CUDA device index
        # How a device's buffers travel, chosen at its first collective.
        self._routes: dict[torch.device, _GlooRoute | _GroupRoute | _OwnNcclRoute] = {}
        self._failure: CommunicationError | None = None
        self._closed = False
        self._pid = os.getpid()  # NOTE [Fork] in _comm/nccl.py
        # Every all_reduce_sum as if verify=True (elastic SGD redoes a failed step).
        self.verify_sums = False
        # Bytes the low-bit sums sent (LowBitSum.wire_bytes, summed over the calls).
        self.low_bit_wire_bytes = 0
        # A low-bit sum whose all-gather has not started (NOTE [Low-bit sums in flight]).
        self._gathering: PendingLowBitSum | None = None

    @property
    def timeout(self) -> datetime.timedelta:
        return self._timeout

    @property
    def ranks(self) -> list[int]:
        """The group's ranks, in the default group's numbering."""
        return self._ranks

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return self._group.rank

    @property
    def gloo(self) -> PrivateGloo:
        """The private gloo backend (check_usable() first)."""
        assert self._gloo is not None, "checked by check_usable"
        return self._gloo

    def close(self) -> None:
        """Releases the private group and the communicators (the last user of
        one closes it); idempotent, local. In a forked child it only marks
        the object closed: what it holds is the parent's (NOTE [Fork])."""
        self._closed = True
        if self._in_forked_child():
            _kept_in_child.append((self._gloo, self._positions, self._leases))
            return
        self._positions.close()
        leases, self._leases = self._leases, {}
        for lease in leases.values():
            lease.release()
        self._routes.clear()
        self._gloo = None  # the backend goes with its last reference: this one

    def all_reduce_sum(self, buffer: torch.Tensor, verify: bool = False) -> None:
        """buffer <- its sum over the ranks, in place.

        On the extension's NCCL the allreduce is enqueued and a failure
        surfaces at a later call; with ``verify`` (outside a CUDA graph
        capture) the host waits for it and raises here, so that a caller
        about to consume the sum irreversibly never consumes a broken one.
        """
        self._begin("all_reduce_sum")
        started = time.monotonic()
        try:
            self._route(buffer.device).all_reduce_sum(buffer, verify or self.verify_sums)
        except RuntimeError as error:
            self._fail("all_reduce_sum", started, error)

    def all_reduce_low_bit(
        self,
        buffer: torch.Tensor,
        low_bit: LowBitSum,
        residual: torch.Tensor | None,
        contributes: bool = True,
        *,
        settle: bool = True,
    ) -> None:
        """buffer <- its sum over the ranks, its first ``low_bit.payload``
        elements in ``low_bit``'s format (see ``_comm.low_bit``), the rest
        exactly; ``residual``: the error feedback of the call site (or
        None), added and updated only when this rank ``contributes``, and
        only when the call succeeds (see ``LowBitSum.settle_residual``;
        ``settle=False`` leaves that to the caller, once it knows the sum is
        used). CPU float32 buffers, over the private gloo group (each of its
        three collectives bounded by the deadline)."""
        pending = self.all_reduce_low_bit_async(
            buffer, low_bit, residual, contributes, settle=settle
        )
        pending.wait()

    def all_reduce_low_bit_async(
        self,
        buffer: torch.Tensor,
        low_bit: LowBitSum,
        residual: torch.Tensor | None,
        contributes: bool = True,
        *,
        settle: bool = True,
    ) -> PendingLowBitSum:
        """Starts ``all_reduce_low_bit``: quantizes, and starts the
        all-to-all and the exact tail's allreduce. The rest (NOTE [Low-bit
        sums in flight]) runs when this object next starts a collective, or
        at ``wait()``, whichever comes first; ``wait()`` then dequantizes.
        Until then the caller must not touch ``buffer`` nor start another
        sum of ``low_bit``."""
        self._begin("all_reduce_low_bit")
        started = time.monotonic()
        payload, tail = buffer[: low_bit.payload], buffer[low_bit.payload :]
        try:
            backend = self.gloo.backend
            low_bit.quantize_into_messages(payload, residual if contributes else None)
            shards = low_bit.exchange_shards(backend)
            tail_sum = self.gloo.all_reduce(tail)
        except RuntimeError as error:
            self._fail("all_reduce_low_bit", started, error)

        def gather() -> Any:
            shards.wait()
            low_bit.sum_shard()
            return low_bit.gather_shards(backend)

        def finish(gathered: Any) -> None:
            gathered.wait()
            tail_sum.wait()
            self._positions.completed_by_all()
            low_bit.dequantize_into(payload)
            if residual is not None and settle:
                low_bit.settle_residual(residual, buffer, contributes)
            self.low_bit_wire_bytes += low_bit.wire_bytes

        pending = PendingLowBitSum(self, started, gather, finish, tail_sum)
        self._gathering = pending
        return pending

    def _begin(self, operation: str) -> None:
        """What every collective does first: checks the object, starts the
        second half of a low-bit sum in flight (NOTE [Low-bit sums in
        flight]), and counts this collective's position."""
        self.check_usable(operation)
        gathering, self._gathering = self._gathering, None
        if gathering is not None:
            gathering.start_gather()
        self._positions.enter(operation)

    def all_reduce_sum_async(self, buffer: torch.Tensor, *, verify: bool) -> PendingSum:
        """Starts buffer <- its sum over the ranks; the caller must not touch
        the buffer until the returned ``PendingSum`` was waited for.

        On the extension's NCCL the allreduce runs on a side stream (after
        the work already queued on the current stream), so it overlaps what
        the current stream does next; elsewhere it is an asynchronous
        torch.distributed work, bounded by the private group's deadline.

        ``verify``: on NCCL, ``wait()`` first makes sure on the host that the
        allreduce completed and NCCL was not aborted (waiting for it if it
        still runs), for a sum about to be consumed irreversibly (the EA
        center). Without it, ``wait()`` only orders the current stream after
        the allreduce and the host runs on (SGD's buckets). Inside a CUDA
        graph capture nothing is verified: the capture runs nothing.
        """
        self._begin("all_reduce_sum")
        started = time.monotonic()
        try:
            wait = self._route(buffer.device).all_reduce_sum_async(buffer, verify)
        except RuntimeError as error:
            self._fail("all_reduce_sum", started, error)

        def finish() -> None:
            try:
                wait()
            except RuntimeError as error:
                self._fail("all_reduce_sum", started, error)

        return PendingSum(finish)

    def broadcast(self, buffer: torch.Tensor, src: int) -> None:
        """buffer <- group rank ``src``'s buffer, in place."""
        self._begin("broadcast")
        started = time.monotonic()
        try:
            self._route(buffer.device).broadcast(buffer, src)
        except RuntimeError as error:
            self._fail("broadcast", started, error)

    def broadcast_object(self, value: Any, src: int) -> Any:
        """Group rank ``src``'s picklable ``value``, on every rank (small host-side data)."""
        self._begin("broadcast_object")
        started = time.monotonic()
        try:
            return self.gloo.broadcast_object(value, src)
        except RuntimeError as error:
            self._fail("broadcast_object", started, error)

    def max_int(self, value: int) -> int:
        """The largest ``value`` over the ranks (a small host-side collective)."""
        self._begin("max_int")
        started = time.monotonic()
        key = torch.tensor([value], dtype=torch.int64)
        try:
            self.gloo.all_reduce(key, dist.ReduceOp.MAX).wait()
        except RuntimeError as error:
            self._fail("max_int", started, error)
        self._positions.completed_by_all()
        return int(key.item())

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (tensors, numbers, strings, containers; see
        ``_comm.gloo.encode``), by group rank (small host-side data)."""
        self._begin("gather_objects")
        started = time.monotonic()
        try:
            gathered = self.gloo.all_gather_objects(value)
        except RuntimeError as error:
            self._fail("gather_objects", started, error)
        self._positions.completed_by_all()
        return gathered

    def check_same_structure(
        self, entries: Sequence[str], names: Sequence[str], arg: str, noun: str = "tensor"
    ) -> None:
        """ValueError on every rank unless all ranks pass the same ``entries``.

        One allreduce of a 62-bit digest (its max and its min); only on a
        mismatch do the ranks exchange their entries, to name the first rank
        that differs from rank 0 and the first entry (a ``noun``) where it does.
        """
        self._begin("check_same_structure")
        started = time.monotonic()
        digest = hashlib.blake2b("\n".join(entries).encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little") >> 2  # 62 bits: it and -it fit int64
        extremes = torch.tensor([value, -value], dtype=torch.int64)
        try:
            self.gloo.all_reduce(extremes, dist.ReduceOp.MAX).wait()
            self._positions.completed_by_all()
            if extremes[0].item() == -extremes[1].item():
                return
            gathered = self.gloo.all_gather_objects((list(entries), list(names)))
        except RuntimeError as error:
            self._fail("check_same_structure", started, error)
        raise ValueError(f"{arg}: " + _first_difference(gathered, noun))

    def _route(self, device: torch.device) -> _GlooRoute | _GroupRoute | _OwnNcclRoute:
        """How ``device``'s buffers travel (see the module), chosen once: a
        CUDA device on an NCCL group takes the extension's communicator (made
        now, collectively: every rank's first CUDA collective is the same
        one) or the group itself; anything else goes over the private gloo."""
        route = self._routes.get(device)
        if route is None:
            if device.type == "cuda" and self._own_nccl:
                index = device.index if device.index is not None else torch.cuda.current_device()
                lease = self._leases.get(index)
                if lease is None:
                    lease = self._leases[index] = _nccl.acquire(
                        self._group, device, self, self._timeout_s
                    )
                route = _OwnNcclRoute(self, lease.comm, device)
            elif device.type == "cuda" and self._cuda_nccl:
                route = _GroupRoute(self)
            else:
                route = _GlooRoute(self)
            self._routes[device] = route
            logger.debug("collectives over ranks %s: %s by %s", self._ranks, device, route.name)
        return route

    def _in_forked_child(self) -> bool:
        """Whether this process is a child forked after the object was made."""
        return os.getpid() != self._pid

    def check_usable(self, operation: str) -> None:
        """CommunicationError if an earlier collective of this object failed;
        RuntimeError once closed, or once its groups were destroyed."""
        if self._closed:
            raise RuntimeError(f"{operation}: this object was closed (close())")
        if self._in_forked_child():
            raise RuntimeError(
                f"{operation}: this object was made in process {self._pid} and this is a child "
                f"forked from it ({os.getpid()}); its connections and threads are the parent's. "
                f"Call it from the parent only (not from DataLoader workers), or make a new "
                f"object in the child on a group of its own"
            )
        if self._group.ref() is None:
            self._gloo = None  # nothing to talk to any more: let the backend go
            raise GroupGoneError(
                f"{operation}: the process group was destroyed "
                f"(dist.destroy_process_group); make a new object on a live group"
            )
        if self._failure is not None:
            raise CommunicationError(
                f"{operation}: not attempted, an earlier collective of this object failed: "
                f"{self._failure}",
                operation=operation,
                ranks=self._ranks,
                rank=self._group.rank,
            )

    def _fail(self, operation: str, started: float, error: RuntimeError) -> NoReturn:
        elapsed = time.monotonic() - started
        where = self._positions.describe()
        message = (
            f"{operation} over ranks {_describe(self._ranks)} failed on rank {self._group.rank} "
            f"after {elapsed:.1f} s (deadline {self._timeout.total_seconds():g} s): {error}; "
            f"{where}"
        )

        def failure() -> CommunicationError:
            return CommunicationError(
                message, operation=operation, ranks=self._ranks, rank=self._group.rank
            )

        # The record is never raised: a raised exception's traceback holds
        # the frames of the call (the owner, its buffers), and kept here it
        # would tie them to this object in a cycle only the garbage
        # collector breaks, holding device buffers past close().
        self._failure = failure()
        raise failure() from error


class _GlooRoute:
    """Buffers over the object's private gloo group (CPU buffers, and CUDA
    buffers on a group whose CUDA backend is not NCCL)."""

    name = "the private gloo group"

    def __init__(self, owner: Collectives) -> None:
        self._owner = owner

    def all_reduce_sum(self, buffer: torch.Tensor, verify: bool) -> None:
        self.all_reduce_sum_async(buffer, verify)()

    def all_reduce_sum_async(self, buffer: torch.Tensor, verify: bool) -> Callable[[], None]:
        return _waiter(self._owner, self._owner.gloo.all_reduce(buffer))

    def broadcast(self, buffer: torch.Tensor, src: int) -> None:
        self._owner.gloo.broadcast(buffer, src)


class _GroupRoute:
    """CUDA buffers through the user's NCCL group itself (``DISTLEARN_NCCL=group``,
    or the CPU flavor of the extension), bounded by the group's timeout."""

    name = "the group's own NCCL"

    def __init__(self, owner: Collectives) -> None:
        self._owner = owner

    def all_reduce_sum(self, buffer: torch.Tensor, verify: bool) -> None:
        dist.all_reduce(buffer, group=self._owner._group.group)
        self._owner._positions.completed_by_all()

    def all_reduce_sum_async(self, buffer: torch.Tensor, verify: bool) -> Callable[[], None]:
        work = dist.all_reduce(buffer, group=self._owner._group.group, async_op=True)
        return _waiter(self._owner, work)

    def broadcast(self, buffer: torch.Tensor, src: int) -> None:
        owner = self._owner
        dist.broadcast(buffer, src=owner._ranks[src], group=owner._group.group)


def _waiter(owner: Collectives, work: Any) -> Callable[[], None]:
    """Waits for a torch.distributed work, then records that every rank completed it."""

    def wait() -> None:
        work.wait()
        owner._positions.completed_by_all()

    return wait


class _OwnNcclRoute:
    """CUDA buffers on the extension's NCCL communicator of one device,
    enqueued on the current stream (asynchronous ones on a side stream), its
    watchdog enforcing the deadline (NOTE [Deadlines])."""

    name = "the extension's NCCL"

    def __init__(self, owner: Collectives, comm: _C.NcclCommunicator, device: torch.device) -> None:
        self._owner = owner
        self._comm = comm
        self._device = device
        self._side: torch.cuda.Stream | None = None

    def all_reduce_sum(self, buffer: torch.Tensor, verify: bool) -> None:
        code = DTYPE_CODES[buffer.dtype]
        self._comm.all_reduce_sum(
            buffer.data_ptr(), buffer.numel(), code, _stream(buffer), self._owner._timeout_s
        )
        if verify and not is_capturing(buffer.device):
            torch.cuda.current_stream(buffer.device).synchronize()
            self._comm.check()

    def all_reduce_sum_async(self, buffer: torch.Tensor, verify: bool) -> Callable[[], None]:
        current = torch.cuda.current_stream(buffer.device)
        if self._side is None:
            self._side = torch.cuda.Stream(self._device)
        side = self._side
        side.wait_stream(current)
        # Freed while NCCL still writes it (its owner collected), the buffer
        # must not go to another tensor before the side stream is done with it.
        buffer.record_stream(side)
        code = DTYPE_CODES[buffer.dtype]
        comm = self._comm
        comm.all_reduce_sum(
            buffer.data_ptr(), buffer.numel(), code, side.cuda_stream, self._owner._timeout_s
        )
        done = torch.cuda.Event()
        done.record(side)

        def joined() -> None:
            # An event recorded in a capture cannot be queried.
            if verify and not is_capturing(buffer.device):
                if not done.query():
                    done.synchronize()
                comm.check()
            torch.cuda.current_stream(buffer.device).wait_event(done)

        return joined

    def broadcast(self, buffer: torch.Tensor, src: int) -> None:
        code = DTYPE_CODES[buffer.dtype]
        self._comm.broadcast(
            buffer.data_ptr(), buffer.numel(), code, src, _stream(buffer), self._owner._timeout_s
        )
        # What a broadcast brings overwrites params: know it arrived whole
        # before the caller unpacks it (not on a hot path).
        torch.cuda.current_stream(buffer.device).synchronize()
        self._comm.check()


def _stream(buffer: torch.Tensor) -> int:
    return current_stream_handle(buffer.get_device())


def _describe(ranks: list[int]) -> str:
    if len(ranks) <= 8:
        return str(ranks)
    return f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}] ({len(ranks)} ranks)"


def _first_difference(gathered: Sequence[tuple[list[str], list[str]] | None], noun: str) -> str:
    """Names the first rank whose entries differ from rank 0's, and where."""
    assert gathered[0] is not None
    reference, reference_names = gathered[0]
    for rank, item in enumerate(gathered[1:], start=1):
        assert item is not None
        entries, names = item
        if entries == reference:
            continue
        for index, (mine, theirs) in enumerate(zip(entries, reference, strict=False)):
            if mine != theirs:
                return (
                    f"the ranks disagree: rank {rank} differs from rank 0 at "
                    f"{noun} {index} ({names[index]}): {mine} on rank {rank}, {theirs} "
                    f"({reference_names[index]}) on rank 0"
                )
        return (
            f"the ranks disagree: rank {rank} has {len(entries)} {noun}s, "
            f"rank 0 has {len(reference)}"
        )
    return "the ranks disagree"  # a digest collision, 2^-62
