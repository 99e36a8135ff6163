"""What a PyTorch user's training loop does, in real gloo worlds: parameters
given where gradients are expected, optimizer state and buffers after uneven
epochs, per-rank checkpoints, a rank whose parameters go non-finite in EA.
Every expected value is computed independently in the test."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

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
