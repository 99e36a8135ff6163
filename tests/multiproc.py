"""Runs a test function in N real processes that talk over gloo on 127.0.0.1.

The parent hosts the TCPStore on a port the OS picks (no port races), starts
one process per rank, and gives the whole run a deadline: a rank that hangs
or dies makes the test fail with every rank's traceback, never hang CI.

Ranks are forked from a forkserver, never from the test process itself: the
test process runs threads (the TCPStore server, torch's thread pools), and a
child forked while one of them holds a lock can deadlock on it, which was
seen here as a rank stuck creating its TCPStore client or importing a module.
The forkserver is a fresh single-threaded process with torch preloaded, so
starting a rank stays cheap.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Collectives inside a worker give up after this; the parent's deadline is
# the hard bound for the whole run.
COLLECTIVE_TIMEOUT_S = 30

_CONTEXT = mp.get_context("forkserver")
# torch._dynamo: torch.optim imports it on the first step, seconds of CPU per rank.
_CONTEXT.set_forkserver_preload(
    ["torch", "torch.distributed", "torch._dynamo", "torch.optim", "distlearn_cuda"]
)


def join_world(rank: int, world_size: int, port: int) -> None:
    """This process joins the gloo world whose store the parent hosts on ``port``."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        world_size,
        is_master=False,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    dist.init_process_group(
        "gloo",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    # gloo's init returns on a rank once its own connections are up: a rank
    # whose fn ends at once (a non-member of a subgroup) could otherwise
    # destroy the group while a peer still connects to it ("Connection closed
    # by peer" in that peer's init, seen in CI).
    dist.barrier()


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    results: mp.Queue,
    args: tuple[Any, ...],
    stack_dump_after_s: float,
) -> None:
    # A rank still running shortly before the parent's deadline prints every
    # thread's stack to stderr, so a hang fails with where it hung.
    faulthandler.dump_traceback_later(stack_dump_after_s, exit=False)
    try:
        join_world(rank, world_size, port)
        try:
            # Plain pickle copies tensors into the message; the queue's own
            # pickler would share memory that dies with this process.
            results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


@dataclass(frozen=True)
class Outcome:
    """How one rank ended: "ok" (value: what fn returned), "error" (value:
    the traceback), "died" (value: the exit code, e.g. -9 for SIGKILL) or
    "killed" (still running when the run ended; the harness killed it)."""

    status: str
    value: Any


def run_world_outcomes(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    expected: Collection[int] | None = None,
) -> list[Outcome]:
    """Runs ``fn(rank, world_size, *args)`` on every rank; returns how each ended.

    Returns once every rank in ``expected`` (default: all) has reported or
    died, or at the deadline; ranks still running then are killed. For
    fault-injection tests, where some ranks are meant to die or stall.
    """
    expected = set(range(world_size) if expected is None else expected)
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size + 1,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    results: mp.Queue = _CONTEXT.Queue()
    procs = [
        _CONTEXT.Process(
            target=_worker,
            args=(fn, rank, world_size, store.port, results, args, max(1.0, timeout - 2.0)),
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    outcomes: dict[int, Outcome] = {}

    def waiting() -> set[int]:
        dead = {r for r, p in enumerate(procs) if p.exitcode not in (None, 0)}
        return expected - set(outcomes) - dead

    try:
        while waiting():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                continue
            outcomes[rank] = Outcome(status, value)
        if len(outcomes) < world_size:
            time.sleep(0.2)  # reports of ranks that finished alongside the last expected one
        while True:
            try:
                rank, status, value = results.get_nowait()
            except queue.Empty:
                break
            outcomes[rank] = Outcome(status, value)
    finally:
        killed = set()
        for rank, proc in enumerate(procs):
            # Expected ranks get a moment to exit; the others (stalled on
            # purpose) are killed at once.
            grace = min(5.0, deadline - time.monotonic()) if rank in expected else 0.0
            proc.join(timeout=max(0.0, grace))
            if proc.is_alive():
                proc.kill()
                proc.join()
                killed.add(rank)
    ended = []
    for rank, proc in enumerate(procs):
        if rank in outcomes:
            outcome = outcomes[rank]
            if outcome.status == "ok":
                outcome = Outcome("ok", pickle.loads(outcome.value))
            ended.append(outcome)
        else:
            ended.append(Outcome("killed" if rank in killed else "died", proc.exitcode))
    return ended


def run_world(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on every rank; returns the results by rank.

    ``fn`` runs with the default process group initialized (gloo). Raises
    AssertionError with the tracebacks if any rank fails, and if the run
    does not finish within ``timeout`` seconds (all ranks are then killed).
    """
    outcomes = run_world_outcomes(fn, world_size, *args, timeout=timeout)
    errors = [f"rank {r}:\n{o.value}" for r, o in enumerate(outcomes) if o.status == "error"]
    missing = [r for r, o in enumerate(outcomes) if o.status in ("died", "killed")]
    if missing:
        errors.append(f"ranks {missing} did not finish within {timeout} s (killed or died)")
    assert not errors, "\n".join(errors)
    return [o.value for o in outcomes]
