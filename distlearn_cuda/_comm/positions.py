"""Where each rank is, so that a missed deadline names the rank that stalled.

Every collective of an object has a number, the same on every rank (the ranks
make the same calls in the same order). A rank records the number, the
operation and its step count when it enters one: a few attribute writes,
nothing else on the hot path. A daemon thread posts the latest record to
the group's store when it changed, at most every ``POST_INTERVAL_S``, so the
store sees each rank's position up to that lag, and a rank stuck outside the
library (or killed) leaves its last position there.

Two facts make a failure's message exact without relying on that lag:

- A collective that needs every rank's contribution (an allreduce, an
  allgather) completed on a rank only if every rank entered it. The last
  such collective to complete on any survivor is the floor of every rank's
  position; each rank posts its own floor with its position, and a
  survivor takes the highest it reads. A collective can complete on some
  ranks and fail on others (a rank killed inside it), so the survivors can
  wait in two consecutive collectives: the lost rank is named with the
  later one's predecessor, which it entered, whatever its own posting
  thread managed to post.
- The posted positions are also read back now and then (every
  ``refresh_interval``, which grows with the world so that the store's load
  does not), so a survivor still names the ranks that fell behind when the
  store itself is gone by the time it fails (it lived in a rank that raised
  and exited first); the message then says how old that reading is.

When a collective misses its deadline, the survivors post their own position
at once, give the others ``GRACE_S`` to do the same, and read every rank's,
all within ``READ_BOUND_S`` in a helper thread, so a dead store cannot hang
the error path: "rank 2 last reported collective 1043 (sum_gradients, step
17); ranks 0, 1, 3 waited in collective 1044 (sum_gradients, step 18)".
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .threads import StoppableThread

__all__ = ["Positions", "refresh_interval", "summarize"]

# Lag of a posted position behind the rank's real one: small next to any
# deadline, and at most 2 store writes per second per rank while it trains.
POST_INTERVAL_S = 0.5
# What the survivors of a failure give each other to post their positions
# (detection of a killed peer can be faster than the posting lag).
GRACE_S = 0.6
# Bound on reading the positions from the store: past it, the message says
# the store did not answer.
READ_BOUND_S = 3.0
# Reading every rank's position back (one multi_get of world_size keys) at
# least this far apart, and further apart on large worlds: the store then
# answers about REFRESH_READS_PER_S such reads per second, whatever the size.
REFRESH_MIN_S = 2.0
REFRESH_READS_PER_S = 32.0

# (collective number, operation, step) as a rank recorded it.
Record = tuple[int, str, int]
# Every rank's posted position, and the highest floor any rank posted.
Reading = tuple[dict[int, Record | None], Record | None]


def refresh_interval(world_size: int) -> float:
    """Seconds between two readings of every rank's position by one rank."""
    return max(REFRESH_MIN_S, world_size / REFRESH_READS_PER_S)


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
        self._entered: Record | None = None  # the last collective this rank entered
        self._posted: tuple[Record | None, Record | None] | None = None  # (entered, floor)
        # The last collective that every rank entered (see the module).
        self._floor: Record | None = None
        # Every rank's position as last read back, and when.
        self._snapshot: Reading | None = None
        self._snapshot_at = 0.0
        self._refresh_s = refresh_interval(world_size)
        self._thread: StoppableThread | None = None

    def enter(self, operation: str) -> None:
        """Counts a collective this rank enters (hot path: no store access)."""
        self.number += 1
        self._entered = (self.number, operation, self._step())
        if self._thread is None:
            # The thread holds the object weakly: an object dropped without
            # close() takes its thread along.
            self._thread = StoppableThread(_post_loop, (weakref.ref(self),), "distlearn-positions")

    def completed_by_all(self) -> None:
        """The collective entered last completed, and needed every rank to:
        every rank has entered it (hot path: no store access)."""
        self._floor = self._entered

    def close(self) -> None:
        """Stops the posting thread (bounded; NOTE [Threads at exit])."""
        if self._thread is not None:
            self._thread.close(2 * POST_INTERVAL_S)

    def describe(self) -> str:
        """Every rank's last position, as one sentence; bounded in time."""
        found: list[str] = []

        def read(stop: threading.Event) -> None:
            early = self._try_read()  # before the grace: the store may go meanwhile
            try:
                self._post()
            except Exception:  # the store is gone: what was read still counts
                pass
            time.sleep(GRACE_S)
            late = self._try_read()
            found.append(self._summary(late if not isinstance(late, str) else early))

        StoppableThread(read, (), "distlearn-positions-read").close(READ_BOUND_S)
        if found:
            return found[0]
        return self._summary("the store did not answer in time")

    def _key(self, rank: int) -> str:
        return f"{self._prefix}/position/{rank}"

    def _post(self) -> None:
        """Posts "number operation step" and, once known, the floor's three
        fields after them: one write, so a reader sees both or neither."""
        posted = (self._entered, self._floor)
        if posted[0] is not None and posted != self._posted:
            fields = [*posted[0], *(posted[1] or ())]
            self._store.set(self._key(self._rank), " ".join(map(str, fields)))
            self._posted = posted

    def _try_read(self) -> Reading | str:
        """Every rank's posted position, or why it could not be read."""
        try:
            return self._read_all()
        except Exception as error:  # a dead store: say so rather than raise again
            return f"could not be read ({error})"

    def _read_all(self) -> Reading:
        keys = [self._key(rank) for rank in range(self._world_size)]
        if self._store.check(keys):  # every rank posted: two round trips in all
            present = list(range(self._world_size))
        else:
            present = [rank for rank, key in enumerate(keys) if self._store.check([key])]
        values = self._store.multi_get([keys[rank] for rank in present]) if present else []
        positions: dict[int, Record | None] = dict.fromkeys(range(self._world_size))
        floor: Record | None = None
        for rank, value in zip(present, values, strict=True):
            fields = value.decode().split(" ")
            positions[rank] = _record(fields[:3])
            if len(fields) == 6:
                floor = _highest(floor, _record(fields[3:]))
        return positions, floor

    def refresh(self) -> None:
        """Reads every rank's position back, if the last reading is old enough
        (called by the posting thread)."""
        now = time.monotonic()
        if now - self._snapshot_at >= self._refresh_s:
            self._snapshot = self._read_all()
            self._snapshot_at = now

    def _summary(self, read: Reading | str) -> str:
        """The sentence for what was read now, or (the store failing) the
        last reading, each position raised to the highest floor."""
        if not isinstance(read, str):
            reading, note = read, ""
        elif self._snapshot is None:
            reading = dict.fromkeys(range(self._world_size)), None
            note = f"; the ranks' positions {read}"
        else:
            age = time.monotonic() - self._snapshot_at
            reading = self._snapshot
            note = f" (as read {age:.1f} s before; the ranks' positions now {read})"
        positions, floor = reading
        return summarize(positions, _highest(self._floor, floor), self._rank, self._entered) + note


def _record(fields: list[str]) -> Record:
    number, operation, step = fields
    return int(number), operation, int(step)


def _highest(a: Record | None, b: Record | None) -> Record | None:
    """The later of two floors (by collective number)."""
    if a is None or b is None:
        return a or b
    return a if a[0] >= b[0] else b


def _post_loop(positions: weakref.ref[Positions], stop: threading.Event) -> None:
    while True:
        owner = positions()
        if owner is None:
            return
        try:
            owner._post()
            owner.refresh()
        except Exception:  # the store went away (group destroyed): stop posting
            return
        del owner
        if stop.wait(POST_INTERVAL_S):
            return


def summarize(
    positions: dict[int, Record | None],
    floor: Record | None = None,
    rank: int | None = None,
    entered: Record | None = None,
) -> str:
    """ "rank 2 last reported collective 9 (...); ranks 0, 1 waited in 10 (...)":
    the ranks furthest ahead waited there; every other rank is named with
    where it last was. ``floor``: a collective every rank entered (a
    rank that reported less, or nothing, took part in it); ``rank`` and
    ``entered``: this rank's own position, which it knows whatever the store
    holds."""
    positions = dict(positions)
    if rank is not None and entered is not None:
        positions[rank] = entered
    reached: set[int] = set()
    if floor is not None:
        for other, position in positions.items():
            if position is None or position[0] < floor[0]:
                positions[other] = floor
                reached.add(other)
    reported = {r: p for r, p in positions.items() if p is not None}
    silent = sorted(r for r, p in positions.items() if p is None)
    if not reported:
        return "no rank reported its position"
    ahead = max(number for number, _, _ in reported.values())
    groups: dict[tuple[Record, bool], list[int]] = {}
    for other, position in sorted(reported.items()):
        groups.setdefault((position, other in reached), []).append(other)
    behind, waited = [], []
    for ((number, operation, step), from_floor), ranks in sorted(groups.items()):
        who = _ranks(ranks)
        if number == ahead:
            waited.append(f"{who} waited in collective {number} ({operation}, step {step})")
        elif from_floor:
            behind.append(
                f"{who} took part in collective {number} ({operation}) and reported no later one"
            )
        else:
            behind.append(f"{who} last reported collective {number} ({operation}, step {step})")
    if silent:
        behind.append(f"{_ranks(silent)} reported no position")
    return "; ".join(behind + waited)


def _ranks(ranks: list[int]) -> str:
    label = "rank" if len(ranks) == 1 else "ranks"
    return f"{label} {', '.join(map(str, ranks))}"
