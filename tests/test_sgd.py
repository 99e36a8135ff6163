"""AllReduceSGD in real multi-process worlds over gloo, against independent
computations of what each step and each synchronization must produce."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
from multiproc import run_world
from tensor_cases import collection_choice, needs_gpu, tolerance
from torch import nn

import distlearn_cuda as dl

SHAPES = [(3,), (1023,), (5, 7), (1,), (65537,)]


def rank_grads(seed: int, rank: int, step: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The gradients rank ``rank`` produces at ``step``: any rank can recompute them."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step)
    return [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in SHAPES]


def _mean_over_contributors(
    rank: int, world_size: int, steps: list[int], seed: int, dtype: torch.dtype
) -> list[list[torch.Tensor]]:
    sgd = dl.AllReduceSGD()
    params = [torch.zeros(s, dtype=dtype) for s in SHAPES]
    results = []
    for step in range(steps[rank]):
        grads = rank_grads(seed, rank, step, dtype)
        sgd.sum_and_normalize_gradients(grads)
        results.append(grads)
    sgd.synchronize_parameters(params)
    return results


@pytest.mark.parametrize(
    ("steps", "dtype"),
    [
        ([3], torch.float32),
        ([4, 2], torch.float32),
        ([1, 5, 0, 3], torch.float64),
        ([2, 2, 3, 1], torch.bfloat16),
    ],
)
def test_sum_and_normalize_is_the_mean_over_contributing_ranks(
    steps: list[int], dtype: torch.dtype
) -> None:
    seed = random.randrange(2**31)
    world_size = len(steps)
    results = run_world(_mean_over_contributors, world_size, steps, seed, dtype)
    for step in range(max(steps)):
        contributors = [r for r in range(world_size) if steps[r] > step]
        expected = [
            sum(rank_grads(seed, r, step, dtype)[i].double() for r in contributors)
            / len(contributors)
            for i in range(len(SHAPES))
        ]
        for rank in contributors:
            got = results[rank][step]
            for g, e in zip(got, expected, strict=True):
                # 16-bit grads are summed in 16 bits by gloo: one rounding per rank.
                torch.testing.assert_close(g.double(), e, **tolerance(dtype, dtype))
        first = results[contributors[0]][step]
        for rank in contributors[1:]:
            assert all(torch.equal(a, b) for a, b in zip(first, results[rank][step], strict=True))


def _sum_gradients(rank: int, world_size: int, seed: int) -> list[torch.Tensor]:
    sgd = dl.AllReduceSGD()
    grads = rank_grads(seed, rank, 0, torch.float64)
    sgd.sum_gradients(grads)
    return grads


def test_sum_gradients_is_the_plain_sum() -> None:
    seed = random.randrange(2**31)
    results = run_world(_sum_gradients, 3, seed)
    for i in range(len(SHAPES)):
        expected = sum(rank_grads(seed, r, 0, torch.float64)[i] for r in range(3))
        for rank in range(3):
            torch.testing.assert_close(results[rank][i], expected, rtol=1e-12, atol=1e-12)


def _seed_protocol(
    rank: int, world_size: int, schedule: list[list[int]], seed: int, device: str
) -> list[list[torch.Tensor]]:
    """torch-distlearn's test: uneven steps, grad = 1/steps, sync every epoch."""
    sgd = dl.AllReduceSGD()
    generator = torch.Generator().manual_seed(seed + rank)  # ranks start apart
    params = {
        "w": torch.randn(7, 3, generator=generator).to(device),
        "b": [torch.randn(11, generator=generator).to(device)],
    }
    sgd.synchronize_parameters(params)
    per_epoch = []
    for epoch_steps in schedule:
        steps = epoch_steps[rank]
        for _ in range(steps):
            grads = {
                "w": torch.full((7, 3), 1.0 / steps, device=device),
                "b": [torch.full((11,), 1.0 / steps, device=device)],
            }
            sgd.sum_and_normalize_gradients(grads)
            params["w"].sub_(grads["w"])
            params["b"][0].sub_(grads["b"][0])
        sgd.synchronize_parameters(params)
        per_epoch.append([params["w"].clone().cpu(), params["b"][0].clone().cpu()])
    return per_epoch


def expected_epoch_update(steps: list[int]) -> float:
    """What every element of the params moves by in an epoch: the winner's
    (most steps, lowest rank) sum over its steps of the mean of 1/steps_r
    over the ranks still stepping."""
    total = 0.0
    for step in range(max(steps)):
        contributing = [1.0 / n for n in steps if n > step]
        total += sum(contributing) / len(contributing)
    return total


@pytest.mark.parametrize(
    ("world_size", "min_steps", "device"),
    [
        (collection_choice([2, 3, 5]), 4, "cpu"),
        (8, 4, "cpu"),
        (4, 0, "cpu"),
        (3, 0, "cpu"),
        pytest.param(3, 0, "cuda", marks=needs_gpu),
    ],
)
def test_seed_protocol_uneven_steps(world_size: int, min_steps: int, device: str) -> None:
    rng = random.Random()
    seed = rng.randrange(2**31)
    schedule = [[rng.randint(min_steps, 13) for _ in range(world_size)] for _ in range(5)]
    if min_steps == 0:
        schedule[1][0] = 0  # rank 0 sits an epoch out
        schedule[2][-1] = 0
        schedule[3] = [0] * world_size  # nobody steps: rank 0's params stand
    results = run_world(_seed_protocol, world_size, schedule, seed, device, timeout=90)
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 3, generator=generator).double()
    b = torch.randn(11, generator=generator).double()
    for epoch, steps in enumerate(schedule):
        for rank in range(1, world_size):
            for got, first in zip(results[rank][epoch], results[0][epoch], strict=True):
                assert torch.equal(got, first), f"epoch {epoch}: rank {rank} differs from rank 0"
        update = expected_epoch_update(steps) if max(steps) > 0 else 0.0
        w, b = w - update, b - update
        torch.testing.assert_close(results[0][epoch][0].double(), w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[0][epoch][1].double(), b, rtol=1e-5, atol=1e-5)


def _winner(rank: int, world_size: int, steps: list[int]) -> torch.Tensor:
    sgd = dl.AllReduceSGD()
    params = torch.full((5,), float(rank))
    for _ in range(steps[rank]):
        sgd.sum_gradients(torch.zeros(5))
    sgd.synchronize_parameters(params)
    return params


@pytest.mark.parametrize(
    ("steps", "winner"),
    [([3, 5, 5, 2], 1), ([0, 0, 0], 0), ([1, 0, 2, 2, 0], 2), ([4, 4], 0)],
)
def test_synchronize_gives_the_params_of_the_rank_with_most_steps(
    steps: list[int], winner: int
) -> None:
    results = run_world(_winner, len(steps), steps)
    for params in results:
        assert torch.equal(params, torch.full((5,), float(winner)))


def _module_training(rank: int, world_size: int, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed + rank)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    model[0].bias.requires_grad_(False)  # frozen: no gradient, still synchronized
    sgd = dl.AllReduceSGD()
    sgd.synchronize_parameters(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3 + rank):
        model(torch.randn(8, 6)).pow(2).mean().backward()
        sgd.sum_and_normalize_gradients(model)
        opt.step()
        opt.zero_grad()
    sgd.synchronize_parameters(model)
    return [p.detach().clone() for p in model.parameters()]


def test_module_with_frozen_parameter_trains_in_lockstep() -> None:
    results = run_world(_module_training, 3, random.randrange(2**31))
    for rank in range(1, 3):
        assert all(torch.equal(a, b) for a, b in zip(results[0], results[rank], strict=True))


def _group_subset(rank: int, world_size: int) -> list[float]:
    group = dist.new_group([1, 2])
    if rank == 0:
        return []
    sgd = dl.AllReduceSGD(group)
    grads = [torch.full((3,), float(rank))]
    sgd.sum_and_normalize_gradients(grads)
    params = torch.full((3,), float(rank))
    sgd.synchronize_parameters(params)  # ranks 1 and 2 tie: group rank 0 (global 1) wins
    return grads[0].tolist() + params.tolist()


def test_explicit_subgroup() -> None:
    results = run_world(_group_subset, 3)
    assert results[1] == results[2] == [1.5, 1.5, 1.5, 1.0, 1.0, 1.0]
