"""The float64 DiLoCo oracle (tests/diloco_reference.py) against what the
papers and PyTorch say independently of it: its outer optimizer is
``torch.optim.SGD(nesterov=True)``, DiLoCo with an outer lr of 1 and no
momentum is parameter averaging, Streaming DiLoCo with one fragment, no
overlap and no mixing is DiLoCo, fragments synchronize on their staggered
schedule, an overlapped exchange merges tau steps later, and the mean is
over the contributors. Issue 23's class will be checked against it."""

from __future__ import annotations

import random

import pytest
import torch
from diloco_reference import OuterOptimizer, diloco, streaming_diloco
from tensor_cases import fresh_seed


def noisy_steps(seed: int, size: int) -> tuple[list[float], object]:
    """An initial vector and an inner step: a worker's own gradient-like
    update, different per worker and step (drawn from ``seed``)."""
    rng = random.Random(seed)
    initial = [rng.uniform(-1, 1) for _ in range(size)]
    table: dict[tuple[int, int], list[float]] = {}

    def inner_step(worker: int, step: int, params: list[float]) -> list[float]:
        key = (worker, step)
        if key not in table:
            table[key] = [rng.uniform(-0.1, 0.1) for _ in range(size)]
        return [p - 0.5 * p * 0.1 + d for p, d in zip(params, table[key], strict=True)]

    return initial, inner_step


@pytest.mark.parametrize("nesterov", [True, False])
def test_the_outer_optimizer_is_torchs_sgd(nesterov: bool) -> None:
    rng = random.Random(fresh_seed())
    params = [rng.uniform(-1, 1) for _ in range(7)]
    weights = torch.tensor(params, dtype=torch.float64, requires_grad=True)
    torch_sgd = torch.optim.SGD([weights], lr=0.7, momentum=0.9, nesterov=nesterov)
    ours = OuterOptimizer(0.7, 0.9, nesterov)
    for _ in range(5):
        grad = [rng.uniform(-1, 1) for _ in range(7)]
        weights.grad = torch.tensor(grad, dtype=torch.float64)
        torch_sgd.step()
        params = ours.step(params, grad)
        torch.testing.assert_close(torch.tensor(params, dtype=torch.float64), weights.detach())


def test_diloco_with_plain_outer_sgd_of_lr_one_is_parameter_averaging() -> None:
    initial, inner_step = noisy_steps(fresh_seed(), 9)
    workers, H = 3, 4
    got, _ = diloco(initial, workers, 3, inner_step, H, lr=1.0, momentum=0.0)
    averaged = list(initial)
    for outer in range(3):
        ends = []
        for w in range(workers):
            x = list(averaged)
            for h in range(1, H + 1):
                x = inner_step(w, outer * H + h, x)
            ends.append(x)
        averaged = [sum(column) / workers for column in zip(*ends, strict=True)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(averaged), rtol=1e-12, atol=1e-12)


def test_streaming_with_one_fragment_no_overlap_and_a_reset_is_diloco() -> None:
    initial, inner_step = noisy_steps(fresh_seed(), 11)
    want, want_locals = diloco(initial, 4, 5, inner_step, H=6)
    got, got_locals = streaming_diloco(initial, 4, 30, inner_step, H=6)
    assert got == want and got_locals == want_locals


def test_fragments_synchronize_on_their_staggered_schedule() -> None:
    # Fragment p changes only at the steps t with (t - p*H//P) % H == tau.
    size, H, P, tau = 8, 8, 4, 2
    initial, inner_step = noisy_steps(fresh_seed(), size)
    changed: dict[int, list[int]] = {p: [] for p in range(P)}
    previous = list(initial)
    for steps in range(1, 30):
        global_params, _ = streaming_diloco(initial, 2, steps, inner_step, H, P, tau)
        for p in range(P):
            if any(global_params[i] != previous[i] for i in range(p, size, P)):
                changed[p].append(steps)
        previous = global_params
    for p in range(P):
        offset = p * H // P
        want = [t for t in range(1, 30) if t - tau >= 1 and (t - tau - offset) % H == 0]
        assert changed[p] == want, (p, changed[p], want)


def test_an_overlapped_exchange_sends_now_and_merges_tau_steps_later() -> None:
    # One worker whose inner step adds 1; H 2, tau 1, plain outer SGD of lr 1.
    def add_one(worker: int, step: int, params: list[float]) -> list[float]:
        return [params[0] + 1.0]

    # t1: local 1. t2: local 2, sends 0 - 2. t3: local 3, global 0 + 2 = 2,
    # merged with alpha 0.25: 0.25 * 3 + 0.75 * 2 = 2.25. t4: local 3.25, sends 2 - 3.25.
    got, locals_ = streaming_diloco([0.0], 1, 4, add_one, 2, tau=1, alpha=0.25, lr=1.0, momentum=0)
    assert got == [2.0] and locals_ == [[3.25]]


def test_the_outer_gradient_is_the_mean_over_the_contributors() -> None:
    def drift(worker: int, step: int, params: list[float]) -> list[float]:
        return [params[0] + (1.0 if worker == 0 else 5.0)]

    # Worker 1 has no data at the first synchronization: worker 0's alone.
    got, _ = streaming_diloco(
        [0.0], 2, 2, drift, 2, lr=1.0, momentum=0, contributes=lambda w, t: w == 0
    )
    assert got == [2.0]
    both, _ = streaming_diloco([0.0], 2, 2, drift, 2, lr=1.0, momentum=0)
    assert both == [(2.0 + 10.0) / 2]
