"""Exceptions of distlearn_cuda."""

from __future__ import annotations

__all__ = ["CommunicationError"]


class CommunicationError(RuntimeError):
    """A collective failed or missed its deadline: a peer died, stalled, or the
    network broke. Raised on every surviving rank within the deadline (plus
    the time the transport takes to notice), never a hang.

    The object that raised it is unusable afterwards (its later calls raise
    this again at once, before touching any tensor); the process can still
    save a checkpoint and exit. Tensors are as the failed call left them:
    gradients unchanged (the sum never arrived); in an EA round, the params
    already moved by this rank's own delta while the center did not.

    Attributes:
        operation: the collective that failed, e.g. "all_reduce_sum".
        ranks: the ranks of the group (in the default group's numbering).
        rank: this process's rank in the group.
    """

    def __init__(self, message: str, *, operation: str, ranks: list[int], rank: int) -> None:
        super().__init__(message)
        self.operation = operation
        self.ranks = ranks
        self.rank = rank
