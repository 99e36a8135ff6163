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
"""

from __future__ import annotations

import datetime
import pickle
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["PrivateGloo", "restart_numbering"]

_made: Counter[str] = Counter()  # private groups made in this process, by user group name


def restart_numbering(group: dist.ProcessGroup) -> None:
    """Numbers the private groups made on ``group`` from 1 again.

    For a group made on a store namespace never used before (each elastic
    membership view's): its ranks may have made different numbers of private
    groups under the same name before (a rank that joined made none), and
    only a count that restarts is the same on all of them."""
    _made[dist.distributed_c10d._world.pg_names[group]] = 0


class PrivateGloo:
    """A gloo backend over the ranks of ``group``, with ``timeout`` as the
    deadline of every operation (gloo raises past it)."""

    def __init__(
        self, group: dist.ProcessGroup, rank: int, size: int, timeout: datetime.timedelta
    ) -> None:
        world = dist.distributed_c10d._world
        name = world.pg_names[group]
        _made[name] += 1
        self.prefix = f"distlearn/{name}/{_made[name]}"
        self.store = dist.PrefixStore(self.prefix, world.pg_map[group][1])
        self.backend = dist.ProcessGroupGloo(self.store, rank, size, timeout)
        self.rank = rank
        self.size = size

    def all_reduce(
        self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
    ) -> dist.Work:
        """Starts ``tensor`` <- its reduction over the ranks; ``wait()`` the work."""
        options = dist.AllreduceOptions()
        options.reduceOp = op
        return self.backend.allreduce([tensor], options)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        """``tensor`` <- group rank ``src``'s, in place."""
        options = dist.BroadcastOptions()
        options.rootRank = src
        options.rootTensor = 0
        self.backend.broadcast([tensor], options).wait()

    def broadcast_object(self, value: Any, src: int) -> Any:
        """Group rank ``src``'s picklable ``value`` (the peers are this job's
        own ranks, as for torch's ``broadcast_object_list``)."""
        data = pickle.dumps(value) if self.rank == src else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        self.broadcast(size, src)
        payload = torch.zeros(int(size.item()), dtype=torch.uint8)
        if self.rank == src:
            payload.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self.broadcast(payload, src)
        return pickle.loads(payload.numpy().tobytes())

    def all_gather_objects(self, value: Any) -> list[Any]:
        """Every rank's picklable ``value``, by rank."""
        data = pickle.dumps(value)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        self.backend.allgather([sizes], [torch.tensor([len(data)], dtype=torch.int64)]).wait()
        longest = max(int(s.item()) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        gathered = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.size)]
        self.backend.allgather([gathered], [mine]).wait()
        return [
            pickle.loads(g[: int(s.item())].numpy().tobytes())
            for g, s in zip(gathered, sizes, strict=True)
        ]
