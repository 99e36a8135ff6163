"""Where each rank is, so that a missed deadline names the rank that stalled.

Every collective of an object has a number, the same on every rank (the ranks
make the same calls in the same order). A rank records the number, the
operation and its step count when it enters one: a few attribute writes,
nothing else on the hot path. A daemon thread posts the latest record to
the group's store when it changed, at most every ``POST_INTERVAL_S``, so the
store sees each rank's position up to that lag, and a rank stuck outside the
library (or killed) leaves its last position there.

When a collective misses its deadline, the survivors post their own position
at once, give the others ``GRACE_S`` to do the same, and read every rank's,
all within ``READ_BOUND_S`` in a helper thread, so a dead store cannot hang
the error path: "rank 2 last reported collective 1043 (sum_gradients, step
17); ranks 0, 1, 3 waited in 1044 (sum_gradients, step 18)".
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["Positions"]

# Lag of a posted position behind the rank's real one: small next to any
# deadline, and at most 2 store writes per second per rank while it trains.
POST_INTERVAL_S = 0.5
# What the survivors of a failure give each other to post their positions
# (detection of a killed peer can be faster than the posting lag).
GRACE_S = 0.6
# Bound on reading the positions from the store: past it, the message says
# the store did not answer.
READ_BOUND_S = 3.0


class Positions:
    """The collective positions of one object's ranks, posted under ``prefix``."""

    def __init__(
        self, store: Any, prefix: str, rank: int, world_size: int, step: Callable[[], int]
    ) -> None:
        self._store = store
        self._prefix = prefix
        self._rank = rank
        self._world_size = world_size
        self._step = step
        self.number = 0
        self._record = ""  # "number operation step" of the last collective entered
        self._posted = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def enter(self, operation: str) -> None:
        """Counts a collective this rank enters (hot path: no store access)."""
        self.number += 1
        self._record = f"{self.number} {operation} {self._step()}"
        if self._thread is None:
            # The thread holds the object weakly: an object dropped without
            # close() takes its thread along.
            self._thread = threading.Thread(
                target=_post_loop,
                args=(weakref.ref(self), self._stop),
                name="distlearn-positions",
                daemon=True,
            )
            self._thread.start()

    def close(self) -> None:
        """Stops the posting thread (bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * POST_INTERVAL_S)

    def describe(self) -> str:
        """Every rank's last position, as one sentence; bounded in time."""
        found: list[str] = []

        def read() -> None:
            self._post()
            time.sleep(GRACE_S)
            found.append(self._read_all())

        reader = threading.Thread(target=read, name="distlearn-positions-read", daemon=True)
        reader.start()
        reader.join(timeout=READ_BOUND_S)
        return found[0] if found else "the ranks' positions: the store did not answer in time"

    def _key(self, rank: int) -> str:
        return f"{self._prefix}/position/{rank}"

    def _post(self) -> None:
        record = self._record
        if record and record != self._posted:
            self._store.set(self._key(self._rank), record)
            self._posted = record

    def _read_all(self) -> str:
        positions: dict[int, tuple[int, str, str] | None] = {}
        try:
            for rank in range(self._world_size):
                key = self._key(rank)
                if self._store.check([key]):
                    number, operation, step = self._store.get(key).decode().split(" ")
                    positions[rank] = (int(number), operation, step)
                else:
                    positions[rank] = None
        except Exception as error:  # a dead store: say so rather than raise again
            return f"the ranks' positions could not be read ({error})"
        return summarize(positions)


def _post_loop(positions: weakref.ref[Positions], stop: threading.Event) -> None:
    while True:
        owner = positions()
        if owner is None:
            return
        try:
            owner._post()
        except Exception:  # the store went away (group destroyed): stop posting
            return
        del owner
        if stop.wait(POST_INTERVAL_S):
            return


def summarize(positions: dict[int, tuple[int, str, str] | None]) -> str:
    """ "rank 2 last reported collective 9 (...); ranks 0, 1 waited in 10 (...)":
    the ranks furthest ahead waited there; every other rank is named with
    where it last was."""
    reported = {r: p for r, p in positions.items() if p is not None}
    silent = sorted(r for r, p in positions.items() if p is None)
    if not reported:
        return "no rank reported its position"
    ahead = max(number for number, _, _ in reported.values())
    groups: dict[tuple[int, str, str], list[int]] = {}
    for rank, position in sorted(reported.items()):
        groups.setdefault(position, []).append(rank)
    parts = []
    for (number, operation, step), ranks in sorted(groups.items()):
        where = f"{number} ({operation}, step {step})"
        who = _ranks(ranks)
        if number == ahead:
            parts.append(f"{who} waited in collective {where}")
        else:
            parts.append(f"{who} last reported collective {where}")
    if silent:
        parts.append(f"{_ranks(silent)} reported no position")
    behind = [p for p in parts if "last reported" in p or "no position" in p]
    waited = [p for p in parts if p not in behind]
    return "; ".join(behind + waited)


def _ranks(ranks: list[int]) -> str:
    label = "rank" if len(ranks) == 1 else "ranks"
    return f"{label} {', '.join(map(str, ranks))}"
