"""A stand-in for ``_C.NcclCommunicator`` in the CPU tests of ``_comm.nccl``'s
registry and of the elastic views' shrink agreement: a real communicator
needs a GPU. The stand-in keeps what ``_comm.nccl`` and ``elastic._shrink`` use
(made by the same arguments, closed, asked whether usable or shrinkable,
shrunk), records how it was used, and talks to nobody: the agreement these
tests check runs over real gloo groups."""

from __future__ import annotations


class StandInCommunicator:
    def __init__(
        self, unique_id: bytes, nranks: int, rank: int, device: int, init_timeout: float
    ) -> None:
        self.unique_id = unique_id
        self.nranks = nranks
        self.rank = rank
        self.device = device
        self.init_timeout = init_timeout
        self.closes = 0
        self.shrinkable = True  # what can_shrink answers while usable
        self.shrunk_with: tuple[list[int], float] | None = None
        self.kept_for_shrink = False
        self.aborted = False

    @property
    def closed(self) -> bool:
        return self.closes > 0

    @property
    def usable(self) -> bool:
        return not self.closed

    @property
    def can_shrink(self) -> bool:
        return self.usable and self.shrinkable

    def keep_for_shrink(self) -> None:
        self.kept_for_shrink = True

    def abort(self) -> None:
        self.aborted = True

    def close(self, timeout: float = 0.0) -> str:
        self.closes += 1
        if self.closes > 1:
            return "closed before"
        return "aborted: by the caller" if self.aborted else "destroyed"

    def shrink(self, excluded: list[int], init_timeout: float) -> StandInCommunicator:
        """As the real one: this communicator ends; the new one has the
        remaining ranks in their order."""
        assert self.can_shrink, "shrink() on a stand-in that cannot shrink"
        self.shrunk_with = (list(excluded), init_timeout)
        self.closes += 1
        below = sum(r < self.rank for r in excluded)
        return StandInCommunicator(
            b"shrunk", self.nranks - len(excluded), self.rank - below, self.device, init_timeout
        )
