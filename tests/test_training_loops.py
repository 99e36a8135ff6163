"""What a PyTorch user's training loop does, in real gloo worlds: parameters
given where gradients are expected, optimizer state and buffers after uneven
epochs, per-rank checkpoints, a rank whose parameters go non-finite in EA.
Every expected value is computed independently in the test."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from multiproc import run_world
from torch import nn

import distlearn_cuda as dl


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def local_batch(seed: int, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed * 7919 + rank * 104_729 + step)
    return torch.randn(4 + rank, 5, generator=generator), torch.randn(
        4 + rank, 3, generator=generator
    )


def local_grads(model: nn.Module, seed: int, rank: int, step: int) -> list[torch.Tensor]:
    """This rank's gradients at ``step`` for ``model``'s current weights."""
    model.zero_grad(set_to_none=True)
    x, y = local_batch(seed, rank, step)
    nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


# The forms PyTorch's own APIs (clip_grad_norm_, optimizers) accept for "the
# gradients of these parameters"; each must average the .grad, not the weights.
PARAMETER_FORMS: dict[str, Callable[[nn.Module], Any]] = {
    "list of parameters": lambda m: list(m.parameters()),
    "generator": lambda m: m.parameters(),
    "dict of named parameters": lambda m: dict(m.named_parameters()),
    "one parameter": lambda m: m[0].weight,
}


def _parameters_as_gradients(rank: int, world_size: int, seed: int) -> dict[str, Any]:
    sgd = dl.AllReduceSGD()
    model = small_model(seed)
    weights = [p.detach().clone() for p in model.parameters()]
    results = {}
    for form, given in PARAMETER_FORMS.items():
        local_grads(model, seed, rank, 0)
        if form == "one parameter":
            # Bound structure: every call passes all gradients, so the single
            # parameter goes with the others' .grad tensors.
            sgd.sum_and_normalize_gradients(
                [given(model)] + [p.grad for p in list(model.parameters())[1:]]
            )
        else:
            sgd.sum_and_normalize_gradients(given(model))
        results[form] = [p.grad.clone() for p in model.parameters()]
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True)), (
            form
        )
    return results


def test_parameters_given_as_gradients_average_their_grad() -> None:
    seed, world_size = random.randrange(2**31), 3
    results = run_world(_parameters_as_gradients, world_size, seed, timeout=60)
    # Independently: each rank's gradient from the same weights, mean in float64.
    model = small_model(seed)
    per_rank = [local_grads(model, seed, r, 0) for r in range(world_size)]
    expected = [sum(g[i].double() for g in per_rank) / world_size for i in range(len(per_rank[0]))]
    for rank, result in enumerate(results):
        for form in PARAMETER_FORMS:
            for got, want in zip(result[form], expected, strict=True):
                torch.testing.assert_close(
                    got.double(), want, rtol=1e-6, atol=1e-7, msg=f"rank {rank}, {form}"
                )


def bn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Everything that must agree across ranks, copied."""
    state = optimizer.state_dict()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": {name: b.clone() for name, b in model.named_buffers()},
        "optimizer_state": {
            index: {key: v.clone() if isinstance(v, torch.Tensor) else v for key, v in s.items()}
            for index, s in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def _uneven_epochs_with_adamw(
    rank: int, world_size: int, seed: int, steps: list[int], algo: str
) -> dict[str, Any]:
    model = bn_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    # Step-dependent learning rates: the ranks' schedules differ after uneven epochs.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    sync = dl.AllReduceSGD() if algo == "sgd" else dl.AllReduceEA(tau=2, alpha=0.3)
    sync.synchronize_parameters(model)
    for step in range(steps[rank]):
        x, y = local_batch(seed, rank, step)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if algo == "sgd":
            sync.sum_and_normalize_gradients(model)
        optimizer.step()
        schedule.step()
        if algo == "ea":
            sync.average_parameters(model)
    before = snapshot(model, optimizer)
    sync.synchronize_parameters(model, optimizer=optimizer, buffers=True)
    after = snapshot(model, optimizer)
    # The next epoch, even: identical ranks must stay identical. SGD ranks
    # train on their own batches; EA ranks train apart by design, so they
    # take the same local steps here.
    for step in range(3):
        x, y = local_batch(seed, rank if algo == "sgd" else 0, 100 + step)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if algo == "sgd":
            sync.sum_and_normalize_gradients(model)
        optimizer.step()
    return {"before": before, "after": after, "next": snapshot(model, optimizer)}


def assert_same_state(
    got: dict[str, Any], want: dict[str, Any], what: str, params: bool = True, buffers: bool = True
) -> None:
    if params:
        for a, b in zip(got["params"], want["params"], strict=True):
            assert torch.equal(a, b), f"{what}: params differ"
    if buffers:
        assert got["buffers"].keys() == want["buffers"].keys()
        for name in want["buffers"]:
            assert torch.equal(got["buffers"][name], want["buffers"][name]), f"{what}: {name}"
    assert got["optimizer_state"].keys() == want["optimizer_state"].keys(), what
    for index, state in want["optimizer_state"].items():
        for key, value in state.items():
            mine = got["optimizer_state"][index][key]
            if isinstance(value, torch.Tensor):
                assert mine.dtype == value.dtype and torch.equal(mine, value), f"{what}: {key}"
            else:
                assert mine == value, f"{what}: {key}"
    assert got["param_groups"] == want["param_groups"], f"{what}: hyperparameters"


@pytest.mark.parametrize(
    ("algo", "steps"),
    [("sgd", [3, 5, 0]), ("sgd", [4, 2, 4]), ("ea", [4, 2, 3])],
)
def test_synchronize_carries_optimizer_state_and_buffers(algo: str, steps: list[int]) -> None:
    """After uneven epochs with AdamW and BatchNorm, every rank ends bitwise
    with the source rank's parameters, buffers (float and int64) and optimizer
    state (a rank that took no step receives it whole), and stays identical
    over the next epoch (but for BatchNorm's statistics of each rank's own
    batches). EA's synchronization runs a last averaging round first, so its
    parameters are compared across ranks, the rest with rank 0's."""
    seed = random.randrange(2**31)
    results = run_world(_uneven_epochs_with_adamw, len(steps), seed, steps, algo, timeout=90)
    # SGD: the most steps win, ties to the lowest rank; EA: rank 0.
    source = max(range(len(steps)), key=lambda r: (steps[r], -r)) if algo == "sgd" else 0
    want = results[source]["before"]
    assert want["optimizer_state"], "the source rank took steps: it has optimizer state"
    for rank, result in enumerate(results):
        assert_same_state(result["after"], want, f"rank {rank}", params=algo == "sgd")
        assert_same_state(result["after"], results[0]["after"], f"rank {rank}")
        assert_same_state(
            result["next"], results[0]["next"], f"rank {rank}, next epoch", buffers=algo == "ea"
        )
    if algo == "sgd" and 0 in steps:
        assert not results[steps.index(0)]["before"]["optimizer_state"]


NAN_SHAPES = [(7, 3), (11,)]
ALPHA = 0.4  # below 2 / (p + 1) for the 3 ranks (see the note "EA stability")


def local_noise(seed: int, rank: int, step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed * 31 + rank * 1009 + step)
    return [0.1 * torch.randn(s, generator=generator) for s in NAN_SHAPES]


def _ea_rank_goes_nan(rank: int, world_size: int, seed: int) -> list[dict[str, Any]]:
    """EA with nonfinite="skip", tau=1: rank 1's params hold a NaN at round 1."""
    generator = torch.Generator().manual_seed(seed + rank)
    params = [torch.randn(s, generator=generator) for s in NAN_SHAPES]
    ea = dl.AllReduceEA(tau=1, alpha=ALPHA, nonfinite="skip")
    ea.synchronize_parameters(params)
    rounds = []
    for step in range(4):
        torch._foreach_add_(params, local_noise(seed, rank, step))  # a local "step"
        if step == 1 and rank == 1:
            params[0][2, 1] = float("nan")
        before = [p.clone() for p in params]
        ea.average_parameters(params)
        rounds.append(
            {
                "before": before,
                "after": [p.clone() for p in params],
                "center": [c.clone() for c in ea.center],
                "skipped": ea.last_round_skipped,
                "rejoined": ea.last_round_rejoined,
            }
        )
    return rounds


def test_an_ea_rank_with_nan_params_rejoins_from_the_center_and_training_goes_on() -> None:
    seed, world_size = random.randrange(2**31), 3
    ranks = run_world(_ea_rank_goes_nan, world_size, seed, timeout=60)
    center = ranks[0][0]["center"]
    for step in range(1, 4):
        for rank, rounds in enumerate(ranks):
            this = rounds[step]
            assert this["skipped"] == (step == 1), f"rank {rank} round {step}"
            assert this["rejoined"] == (step == 1 and rank == 1), f"rank {rank} round {step}"
            assert all(bool(p.isfinite().all()) for p in this["after"]), f"rank {rank} round {step}"
        if step == 1:
            # The round's update is skipped everywhere; the NaN rank takes the
            # center, the others their own elastic step.
            expected_center = center
            for rank, rounds in enumerate(ranks):
                if rank == 1:
                    expected_after = center
                else:
                    expected_after = [
                        x.double() - ALPHA * (x.double() - c.double())
                        for x, c in zip(rounds[step]["before"], center, strict=True)
                    ]
                for got, want in zip(rounds[step]["after"], expected_after, strict=True):
                    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-6)
        else:
            # A normal round again: center += sum over ranks of alpha (x - c).
            expected_center = [
                c.double()
                + sum(ALPHA * (r[step]["before"][i].double() - c.double()) for r in ranks)
                for i, c in enumerate(center)
            ]
        for rank, rounds in enumerate(ranks):
            for got, want in zip(rounds[step]["center"], expected_center, strict=True):
                torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-5)
                assert bool(got.isfinite().all()), f"rank {rank} round {step}: center not finite"
        center = ranks[0][step]["center"]


def _synchronize_from_a_nan_rank(
    rank: int, world_size: int, algo: str, nan_ranks: list[int]
) -> dict[str, Any]:
    params = [torch.full(s, float(rank + 1)) for s in NAN_SHAPES]
    if algo == "sgd":
        sync = dl.AllReduceSGD()
        for _ in range(2 if rank == 0 else 1):  # rank 0 took the most steps
            sync.sum_and_normalize_gradients([torch.zeros(s) for s in NAN_SHAPES])
    else:
        sync = dl.AllReduceEA(tau=5)  # no round before the synchronization
        sync.average_parameters(params)
    if rank in nan_ranks:
        params[1][3] = float("inf") if rank % 2 else float("nan")
    before = [p.clone() for p in params]
    try:
        sync.synchronize_parameters(params)
        raised = None
    except FloatingPointError as error:
        raised = str(error)
    unchanged = all(
        bool(((a == b) | (a.isnan() & b.isnan())).all())
        for a, b in zip(params, before, strict=True)
    )
    return {"params": params, "raised": raised, "unchanged": unchanged}


@pytest.mark.parametrize("algo", ["sgd", "ea"])
def test_synchronize_never_copies_non_finite_params(algo: str) -> None:
    """The source rank (SGD: most steps; EA: rank 0) holds a NaN: the next
    rank in line gives its params; when every rank holds one, every rank
    raises and nothing is broadcast (SGD's params are untouched; EA's had
    the synchronization's last averaging round)."""
    results = run_world(_synchronize_from_a_nan_rank, 3, algo, [0], timeout=60)
    for rank, result in enumerate(results):
        assert result["raised"] is None, result["raised"]
        for p in result["params"]:
            assert bool((p == 2.0).all()), f"rank {rank}: not rank 1's params"
    results = run_world(_synchronize_from_a_nan_rank, 3, algo, [0, 1, 2], timeout=60)
    for result in results:
        assert "NaN or infinite values on every rank" in result["raised"]
        assert result["unchanged"] or algo == "ea"
