"""Shared fixtures: world-of-one process groups for single-process tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist


@pytest.fixture
def world_of_one() -> Iterator[None]:
    """The default process group as a gloo world of one, torn down afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def nccl_world_of_one() -> Iterator[None]:
    """The default process group as an NCCL world of one on the current GPU
    (NCCL refuses two ranks on one device), torn down afterwards."""
    dist.init_process_group(
        "nccl",
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        device_id=torch.device("cuda", torch.cuda.current_device()),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
