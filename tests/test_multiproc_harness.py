"""The harness itself: results come back by rank, failures and hangs fail fast."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from multiproc import run_world


def _allreduce_rank(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("boom on rank one")


def _hang_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(60)


def test_results_by_rank() -> None:
    assert run_world(_allreduce_rank, 3) == [3.0, 3.0, 3.0]


def test_a_failing_rank_fails_the_run() -> None:
    with pytest.raises(AssertionError, match="boom on rank one"):
        run_world(_fail_on_rank_one, 2, timeout=30)


def test_a_hanging_rank_is_killed_at_the_deadline() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError, match="did not finish"):
        run_world(_hang_on_rank_one, 2, timeout=5)
    assert time.monotonic() - start < 15
