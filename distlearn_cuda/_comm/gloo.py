"""Each object's private gloo backend: made under a store prefix never used
before, owned by the object, and the few collectives run on it.

Why not ``dist.new_group``: torch names a group made with local
synchronization after the number of groups that exist, so destroying one
(``close()``) and making the next gives the new group the old one's name and
store prefix, where the old group's rendezvous keys still lie; its ranks then
read stale addresses and hang. Here the prefix counts the private groups
this process made on the same user group, which every rank of that group
makes in the same order (constructing an object is collective), so the
ranks agree on it and it is never reused. Torch's registry never sees the
backend, so nothing but its owner keeps it alive: ``close()``, collection of
the object, or the exit handler releases it.

NOTE: [Construction handshake]. Every rank arrives under the prefix before
gloo's own rendezvous starts there: it adds itself to the prefix's arrival
count, and the rank that completes the count marks the prefix "go". A rank
that waits past the deadline marks it "abandoned" instead (one atomic
compare-and-set decides between the two), and every rank that arrived
raises. A later construction skips an abandoned prefix, so an object that
one rank made alone (a bug in the user's code, or a dead peer) leaves the
numbering of every rank aligned: the next objects made by all ranks meet
under the next prefix, and no rank reads the addresses that a failed
attempt left behind.

Objects travel between ranks as ``torch.save`` bytes read back with
``weights_only=True`` (tensors, numbers, strings, bytes and containers; a
payload naming any other class is refused): nothing a peer sends is
unpickled as arbitrary code.
"""

from __future__ import annotations

import ctypes
import datetime
import io
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CommunicationError

__all__ = ["PrivateGloo", "decode", "encode", "restart_numbering"]

_made: Counter[str] = Counter()  # private groups made in this process, by user group name

# Store keys under a private group's prefix (see the construction handshake).
_ARRIVED = "construct/arrived"
_STATE = "construct/state"
# Values as the store returns them (bytes); torch's stubs type compare_set's as str.
_GO = b"go"
_ABANDONED = b"abandoned"


def restart_numbering(group: dist.ProcessGroup) -> None:
    """Numbers the private groups made on ``group`` from 1 again.

    For a group made on a store namespace never used before (each elastic
    membership view's): its ranks may have made different numbers of private
    groups under the same name before (a rank that joined made none), and
    only a count that restarts is the same on all of them."""
    _made[dist.distributed_c10d._world.pg_names[group]] = 0


def encode(value: Any) -> bytes:
    """``value`` as bytes that ``decode`` reads back without running code."""
    stream = io.BytesIO()
    torch.save(value, stream)
    return stream.getvalue()


def decode(data: bytes) -> Any:
    """What ``encode`` wrote: tensors, numbers, strings, bytes and
    containers only (``torch.load(weights_only=True)``)."""
    return torch.load(io.BytesIO(data), weights_only=True)


def _bytes_of(tensor: torch.Tensor) -> bytes:
    """The bytes of a 1-D uint8 CPU tensor, in one copy (without numpy,
    which torch does not require). Not ``bytes(tensor.untyped_storage())``:
    that reads the storage one element at a time, 15 s for 4.4 MB (a 1.1M
    parameter model's hand-over took 20 s in bench_elastic)."""
    tensor = tensor.contiguous()
    return ctypes.string_at(tensor.data_ptr(), tensor.numel())


class PrivateGloo:
    """A gloo backend over the ranks of ``group``, with ``timeout`` as the
    deadline of every operation (gloo raises past it).

    Raises:
        CommunicationError: not every rank of ``group`` arrived within the
            deadline (see the construction handshake); ``what`` names the
            object in the message.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        rank: int,
        size: int,
        timeout: datetime.timedelta,
        what: str = "an object",
    ) -> None:
        world = dist.distributed_c10d._world
        name = world.pg_names[group]
        base = world.pg_map[group][1]
        number = _made[name]
        while True:
            number += 1
            self.prefix = f"distlearn/{name}/{number}"
            self.store = dist.PrefixStore(self.prefix, base)
            if not (self.store.check([_STATE]) and self.store.get(_STATE) == _ABANDONED):
                break
        _made[name] = number
        self.rank = rank
        self.size = size
        _arrive(self.store, rank, dist.get_process_group_ranks(group), timeout, what)
        self.backend = dist.ProcessGroupGloo(self.store, rank, size, timeout)

    def all_reduce(
        self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
    ) -> dist.Work:
        """Starts ``tensor`` <- its reduction over the ranks; ``wait()`` the work."""
        options = dist.AllreduceOptions()
        options.reduceOp = op  # type: ignore[assignment]  # torch's stubs: ReduceOp, not RedOpType
        # ProcessGroupGloo's collectives exist at run time, not in torch's stubs.
        return self.backend.allreduce([tensor], options)  # type: ignore[attr-defined]

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        """``tensor`` <- group rank ``src``'s, in place."""
        options = dist.BroadcastOptions()
        options.rootRank = src
        options.rootTensor = 0
        self.backend.broadcast([tensor], options).wait()  # type: ignore[attr-defined]

    def broadcast_object(self, value: Any, src: int) -> Any:
        """Group rank ``src``'s ``value`` (see ``encode``), on every rank."""
        data = encode(value) if self.rank == src else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        self.broadcast(size, src)
        payload = torch.zeros(int(size.item()), dtype=torch.uint8)
        if self.rank == src:
            payload.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self.broadcast(payload, src)
        return decode(_bytes_of(payload))

    def all_gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (see ``encode``), by rank."""
        data = encode(value)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        lengths = [torch.tensor([len(data)], dtype=torch.int64)]
        self.backend.allgather([sizes], lengths).wait()  # type: ignore[attr-defined]
        longest = max(int(s.item()) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        gathered = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.size)]
        self.backend.allgather([gathered], [mine]).wait()  # type: ignore[attr-defined]
        return [decode(_bytes_of(g[: int(s.item())])) for g, s in zip(gathered, sizes, strict=True)]


def _arrive(
    store: dist.Store, rank: int, ranks: list[int], timeout: datetime.timedelta, what: str
) -> None:
    """The construction handshake (see the note): returns once every rank
    arrived; CommunicationError on every rank that arrived, if one did not
    within ``timeout``. ``ranks``: the group's, in the default group's numbering."""
    size = len(ranks)
    store.set(f"construct/rank/{rank}", "1")
    if store.add(_ARRIVED, 1) == size:
        store.compare_set(_STATE, "", _GO)  # type: ignore[arg-type]
    try:
        store.wait([_STATE], timeout)
    except RuntimeError:  # DistStoreError: the deadline passed
        pass
    if store.compare_set(_STATE, "", _ABANDONED) == _GO:  # type: ignore[arg-type]
        return
    missing = [r for r in range(size) if not store.check([f"construct/rank/{r}"])]
    arrived = [r for r in range(size) if r not in missing]
    raise CommunicationError(
        f"{what}: not every rank of the group constructed one within the deadline "
        f"({timeout.total_seconds():g} s): ranks {arrived} did, ranks {missing} did not. "
        f"Constructing is collective: every rank of the group must make the same objects "
        f"in the same order (a rank that died or stalled shows the same way). Nothing was "
        f"made; objects constructed later by every rank are unaffected",
        operation="construct",
        ranks=ranks,
        rank=rank,
    )
