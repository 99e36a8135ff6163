"""Gloo worlds that stay up between tests: property-based tests run hundreds
of short scenarios, and starting a world costs more than most of them.

A world of each size is started on first use (from the same forkserver as
``multiproc``, real processes over real gloo on 127.0.0.1) and then runs one
function at a time on every rank, each with its deadline. A function that
raises reports its traceback and the world goes on; one that does not
return by the deadline (a hang) gets the world killed and the next use
starts a fresh one, so a bug fails its own scenario and never hangs the
others.
"""

from __future__ import annotations

import atexit
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from multiproc import _CONTEXT, Outcome, join_world


def _serve(rank: int, world_size: int, port: int, inbox: Any, outbox: Any) -> None:
    join_world(rank, world_size, port)
    outbox.put((-1, rank, "ready", None))
    while True:
        task = inbox.get()
        if task is None:
            break
        number, fn, args = task
        try:
            outbox.put((number, rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
        except BaseException:
            outbox.put((number, rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class _World:
    def __init__(self, world_size: int) -> None:
        self.size = world_size
        self.store = dist.TCPStore(
            "127.0.0.1",
            0,
            world_size + 1,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=30),
        )
        self.inboxes = [_CONTEXT.Queue() for _ in range(world_size)]
        self.outbox = _CONTEXT.Queue()
        self.procs = [
            _CONTEXT.Process(
                target=_serve,
                args=(rank, world_size, self.store.port, self.inboxes[rank], self.outbox),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in self.procs:
            proc.start()
        self.tasks = 0
        ready = set()
        deadline = time.monotonic() + 60
        while len(ready) < world_size:
            _, rank, status, _ = self.outbox.get(timeout=max(0.1, deadline - time.monotonic()))
            if status == "ready":
                ready.add(rank)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join()


class WorldPool:
    """Worlds by size, each running one function at a time on every rank."""

    def __init__(self) -> None:
        self._worlds: dict[int, _World] = {}
        self.restarts = 0

    def run(
        self, world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 60.0
    ) -> list[Outcome]:
        """Runs ``fn(rank, world_size, *args)`` on every rank of the world of
        ``world_size``; returns how each ended (see ``multiproc.Outcome``:
        "ok", "error", or "killed" when the deadline passed and the world
        was killed)."""
        world = self._worlds.get(world_size)
        if world is None or not world.alive():
            if world is not None:
                world.kill()
                self.restarts += 1
            world = self._worlds[world_size] = _World(world_size)
        world.tasks += 1
        number = world.tasks
        for inbox in world.inboxes:
            inbox.put((number, fn, args))
        outcomes: dict[int, Outcome] = {}
        deadline = time.monotonic() + timeout
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not world.alive():
                break
            try:
                got, rank, status, value = world.outbox.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if got != number:
                continue  # a report of an earlier task that timed out
            value = pickle.loads(value) if status == "ok" else value
            outcomes[rank] = Outcome(status, value)
        if len(outcomes) < world_size:
            world.kill()
            del self._worlds[world_size]
        return [outcomes.get(rank, Outcome("killed", None)) for rank in range(world_size)]

    def close(self) -> None:
        for world in self._worlds.values():
            for inbox in world.inboxes:
                inbox.put(None)
            for proc in world.procs:
                proc.join(timeout=5)
            world.kill()
        self._worlds.clear()


_POOL: WorldPool | None = None


def pool() -> WorldPool:
    """The process's pool (closed at exit)."""
    global _POOL
    if _POOL is None:
        _POOL = WorldPool()
        atexit.register(_POOL.close)
    return _POOL
