"""AllReduceEA in real multi-process worlds over gloo, against an independent
float64 simulation of the elastic-averaging protocol."""

from __future__ import annotations

import random

import pytest
import torch
from multiproc import run_world
from tensor_cases import collection_choice, needs_gpu
from torch import nn

import distlearn_cuda as dl

SHAPES = [(3, 5), (1023,), (1,), (4, 1, 3)]


def start_params(seed: int, rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed * 7919 + rank)
    return [torch.randn(s, generator=generator, dtype=torch.float64) for s in SHAPES]


def local_step(seed: int, rank: int, epoch: int, step: int) -> list[torch.Tensor]:
    """A local 'optimizer step': noise that shrinks with the epoch and step."""
    generator = torch.Generator().manual_seed(((seed * 31 + rank) * 101 + epoch) * 1009 + step)
    scale = 0.1 / ((epoch + 1) * (step + 1))
    return [scale * torch.randn(s, generator=generator, dtype=torch.float64) for s in SHAPES]


def _ea_protocol(
    rank: int,
    world_size: int,
    schedule: list[list[int]],
    seed: int,
    tau: int,
    alpha: float,
    device: str,
    asynchronous: bool = True,
    dtype: torch.dtype = torch.float64,
) -> dict[str, list]:
    ea = dl.AllReduceEA(None, tau, alpha, asynchronous=asynchronous)
    params = [p.to(device, dtype) for p in start_params(seed, rank)]
    ea.synchronize_parameters(params)
    centers, params_at_sync = [], []
    for epoch, epoch_steps in enumerate(schedule):
        for step in range(epoch_steps[rank]):
            for p, d in zip(params, local_step(seed, rank, epoch, step), strict=True):
                p.add_(d.to(device, dtype))
            ea.average_parameters(params)
        ea.synchronize_center(params)
        centers.append([c.clone().cpu() for c in ea.center])
        params_at_sync.append([p.clone().cpu() for p in params])
    ea.synchronize_parameters(params)
    return {"centers": centers, "params": params_at_sync, "final": [p.cpu() for p in params]}


def simulate_ea(
    world_size: int, schedule: list[list[int]], seed: int, tau: int, alpha: float
) -> tuple[list, list]:
    """The protocol written out round by round, all ranks in one process.

    Round k of an epoch happens at local step (k + 1) * tau of each rank that
    still has that many steps; a rank with fewer has finished its steps and
    joins with its params as they are. The epoch ends with the first round
    that no rank reached by stepping; every round's deltas enter the center.
    """
    x = [start_params(seed, 0) for _ in range(world_size)]  # synchronize_parameters
    center = [t.clone() for t in x[0]]
    centers, params = [], []
    for epoch, steps in enumerate(schedule):
        done = [0] * world_size
        rounds = max(n // tau for n in steps)
        for k in range(rounds + 1):
            for r in range(world_size):
                target = (k + 1) * tau if (k + 1) * tau <= steps[r] else steps[r]
                for step in range(done[r], target):
                    x[r] = [
                        p + d for p, d in zip(x[r], local_step(seed, r, epoch, step), strict=True)
                    ]
                done[r] = target
            total = [torch.zeros_like(c) for c in center]
            for r in range(world_size):
                deltas = [alpha * (p - c) for p, c in zip(x[r], center, strict=True)]
                x[r] = [p - d for p, d in zip(x[r], deltas, strict=True)]
                total = [t + d for t, d in zip(total, deltas, strict=True)]
            center = [c + t for c, t in zip(center, total, strict=True)]
        centers.append(center)
        params.append([list(p) for p in x])
    return centers, params


@pytest.mark.parametrize(
    ("world_size", "min_steps", "device"),
    [
        (collection_choice([2, 3, 4]), 45, "cpu"),
        (8, 45, "cpu"),
        (3, 0, "cpu"),
        pytest.param(3, 0, "cuda", marks=needs_gpu),
    ],
)
def test_seed_protocol_uneven_steps(world_size: int, min_steps: int, device: str) -> None:
    rng = random.Random()
    seed = rng.randrange(2**31)
    # Anywhere in the stable range alpha < 2 / (p + 1) (see the note "EA stability").
    tau, alpha = rng.choice([3, 7, 10]), rng.choice([0.2, 0.5, 0.9]) * 2 / (world_size + 1)
    schedule = [[rng.randint(min_steps, 53) for _ in range(world_size)] for _ in range(5)]
    if min_steps == 0:
        schedule[0][1] = 0  # a rank that takes no step in an epoch
        schedule[2] = [0] * world_size
    results = run_world(_ea_protocol, world_size, schedule, seed, tau, alpha, device, timeout=120)
    centers, params = simulate_ea(world_size, schedule, seed, tau, alpha)
    for epoch in range(len(schedule)):
        for rank in range(world_size):
            got_centers = results[rank]["centers"][epoch]
            # synchronize_center: every rank holds the same center, bit for bit.
            assert all(
                torch.equal(a, b)
                for a, b in zip(got_centers, results[0]["centers"][epoch], strict=True)
            )
            for got, expected in zip(got_centers, centers[epoch], strict=True):
                torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
            for got, expected in zip(
                results[rank]["params"][epoch], params[epoch][rank], strict=True
            ):
                torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    for rank in range(world_size):
        for got, first in zip(results[rank]["final"], results[0]["final"], strict=True):
            assert (got - first).abs().max() <= 1e-6
            assert torch.equal(got, first)


def _conservation(rank: int, world_size: int, seed: int, rounds: list[int]) -> list:
    """No local steps: x moves only by averaging, so sum_r x_r + center is conserved."""
    ea = dl.AllReduceEA(tau=1, alpha=0.35)
    params = start_params(seed, 0)
    ea.synchronize_parameters(params)
    for p, q in zip(params, start_params(seed, rank + 1), strict=True):
        p.copy_(q)  # each rank moves away from the common center
    snapshots = [[p.clone() for p in params] + [c.clone() for c in ea.center]]
    for _ in range(rounds[rank]):
        ea.average_parameters(params)
        snapshots.append([p.clone() for p in params] + [c.clone() for c in ea.center])
    ea.synchronize_center(params)  # ranks with fewer rounds join the others' rounds
    snapshots.append([p.clone() for p in params] + [c.clone() for c in ea.center])
    return snapshots


def test_sum_of_params_and_center_is_conserved() -> None:
    seed = random.randrange(2**31)
    rounds = [4, 0, 2]
    results = run_world(_conservation, 3, seed, rounds)
    n = len(SHAPES)

    def invariant(final: bool) -> list[torch.Tensor]:
        index = -1 if final else 0
        snaps = [results[r][index] for r in range(3)]
        return [sum(s[i] for s in snaps) + snaps[0][n + i] for i in range(n)]

    for before, after in zip(invariant(False), invariant(True), strict=True):
        torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    # The final round's deltas went into the center: the centers agree and
    # they moved in the last (all-waiting) round too.
    assert all(
        torch.equal(results[0][-1][n + i], results[r][-1][n + i])
        for r in range(3)
        for i in range(n)
    )


def _module_structure(rank: int, world_size: int) -> tuple[list[str], bool]:
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    ea = dl.AllReduceEA(tau=2, alpha=0.4)
    ea.synchronize_parameters(model)
    center = ea.center
    same = all(torch.equal(center[name], p) for name, p in model.named_parameters())
    return sorted(center), same


def test_center_of_a_module_is_a_dict_by_parameter_name() -> None:
    for names, same in run_world(_module_structure, 2):
        assert names == ["0.bias", "0.weight", "1.bias", "1.weight"]
        assert same


def _bfloat16_deltas(rank: int, world_size: int, seed: int) -> list[torch.Tensor]:
    ea = dl.AllReduceEA(tau=1, alpha=0.5, comm_dtype=torch.bfloat16)
    params = start_params(seed, 0)
    ea.synchronize_parameters(params)
    params[0].add_(float(rank))
    ea.average_parameters(params)
    ea.synchronize_center(params)
    return list(ea.center)


def test_comm_dtype_bfloat16_deltas() -> None:
    seed = random.randrange(2**31)
    results = run_world(_bfloat16_deltas, 2, seed)
    start = start_params(seed, 0)
    # Round 1: deltas 0 and 0.5 (exact in bf16): center[0] += 0.5. Round 2
    # (synchronize_center, all waiting): x moved to start + (0, 0.5) and
    # centers to start + 0.5; deltas -0.25 and 0: center[0] -= 0.25.
    torch.testing.assert_close(results[0][0], start[0] + 0.25, rtol=0, atol=1e-2)
    for got, expected in zip(results[0][1:], start[1:], strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1], strict=True))


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.float64),
        ("cpu", torch.float32),
        pytest.param("cuda", torch.float32, marks=needs_gpu),
    ],
)
def test_asynchronous_rounds_are_bitwise_the_synchronous_ones(
    device: str, dtype: torch.dtype
) -> None:
    rng = random.Random()
    seed, world_size, tau = rng.randrange(2**31), 3, rng.choice([1, 2, 5])
    schedule = [[rng.randint(0, 23) for _ in range(world_size)] for _ in range(3)]
    runs = {
        mode: run_world(_ea_protocol, world_size, schedule, seed, tau, 0.3, device, mode, dtype)
        for mode in (True, False)
    }
    for rank in range(world_size):
        for key in ("centers", "params"):
            for epoch, (a, b) in enumerate(
                zip(runs[True][rank][key], runs[False][rank][key], strict=True)
            ):
                assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (key, epoch)
        assert all(
            torch.equal(x, y)
            for x, y in zip(runs[True][rank]["final"], runs[False][rank]["final"], strict=True)
        )
