"""The next view's NCCL communicator shrunk from the last one's, when the
next view only lost ranks.

A dropped view's communicator (detached from ``_comm.nccl``'s registry, revoked
rather than aborted if it failed) is the parent. If every member of the next
view holds the same parent (the same unique id: they were all in the same
last view) and the next view is that view less some ranks, in the same
order, the members shrink it (``ncclCommShrink``, over the parent's
bootstrap connections, which the lost ranks leave) instead of meeting on a
new unique id; NCCL keeps the remaining ranks' order, which is the views'
order, so the new communicator's ranks are the view's. Otherwise, or if the
loaded NCCL cannot shrink, the next view's first CUDA collective makes a new
communicator as before.

The members agree first, over the view's gloo group: rank 0 offers its
parent's unique id, and the shrink runs only if every member holds that very
parent and can shrink it. One broadcast and one allreduce, only at a
membership change.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .._comm import nccl as _nccl
from ._membership import View

__all__ = ["Parent", "excluded_ranks", "shrink_into"]


@dataclass
class Parent:
    """The communicators detached from a dropped view, and that view's members."""

    members: tuple[str, ...]
    communicators: list = field(default_factory=list)  # of _comm.nccl._Shared

    def discard(self) -> None:
        """Closes every communicator still held (idempotent)."""
        communicators, self.communicators = self.communicators, []
        for shared in communicators:
            _nccl.discard(shared)


def excluded_ranks(old: tuple[str, ...], new: tuple[str, ...]) -> list[int] | None:
    """The ranks of the old view that the new view lost, when the new view is
    the old one less at least one rank, in the same order; else None."""
    kept = tuple(member for member in old if member in new)
    if kept != tuple(new) or len(kept) == len(old) or not kept:
        return None
    return [rank for rank, member in enumerate(old) if member not in new]


def shrink_into(
    parent: Parent | None,
    view: View,
    process_group: object,
    bootstrap: _nccl.Bootstrap,
    init_timeout_s: float,
) -> bool:
    """Every member of ``view`` calls this once the view's group exists:
    shrinks the parent into the communicator of ``process_group`` if all
    agree (see the module), registers it with ``_comm.nccl``, and closes whatever
    of the parent is left. Returns whether it shrank.

    Raises:
        CommunicationError: a member was lost during the agreement.
        RuntimeError: the shrink failed (the members that got that far
            raise within ``init_timeout_s``); the parent is closed.
    """
    try:
        candidate = None
        excluded = None
        if parent is not None and len(parent.communicators) == 1:
            excluded = excluded_ranks(parent.members, view.members)
            shared = parent.communicators[0]
            if excluded is not None and shared.comm.can_shrink:
                candidate = shared
        token = candidate.token if candidate is not None else None
        offered = bootstrap.broadcast_object(token if view.rank == 0 else None, 0)
        holds = int(token is not None and token == offered)
        if -bootstrap.max_int(-holds) != 1:
            return False
        assert candidate is not None and excluded is not None and parent is not None
        parent.communicators.remove(candidate)  # shrink() ends it, succeeded or not
        comm = candidate.comm.shrink(excluded, init_timeout_s)
        # The same on every member, and never a unique id's.
        token = hashlib.sha256(candidate.token + view.prefix.encode()).digest()
        _nccl.adopt(process_group, candidate.key[1], comm, token)
        return True
    finally:
        if parent is not None:
            parent.discard()
