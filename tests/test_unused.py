"""allow_unused: parameters that some ranks, or none, produced gradients for
are averaged over the ranks that did, in real gloo worlds, against means
computed independently here."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from multiproc import run_world
from torch import nn

import distlearn_cuda as dl

# Which ranks use which expert: "a" rank 0 only, "b" ranks 0 and 2, "c" none;
# the trunk every rank.
USERS = {"a": {0}, "b": {0, 2}, "c": set()}
STEPS = [3, 2, 3]  # rank 1 runs out of data first


class Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 5)
        self.experts = nn.ModuleDict({name: nn.Linear(5, 3) for name in USERS})

    def forward(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        used = [e for name, e in self.experts.items() if rank in USERS[name]]
        return sum((e(h) for e in used), h.sum(1, keepdim=True)).pow(2).mean()


def batch(seed: int, rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(seed * 97 + rank * 13 + step))


def local_grads(model: Experts, seed: int, rank: int, step: int) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    model(batch(seed, rank, step), rank).backward()
    return {
        n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()
    }


def _train(rank: int, world_size: int, seed: int, mode: str) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    model = Experts()
    sgd = dl.AllReduceSGD(allow_unused=True)
    if mode.startswith("attach"):
        views = mode == "attach-views"
        sgd.attach(model, bucket_mb=0.0002, first_bucket_mb=0.0001, gradient_as_bucket_view=views)
    elif mode == "flat":
        sgd.use_flat_storage(model)
    results = []
    for step in range(STEPS[rank]):
        model.zero_grad(set_to_none=True)
        model(batch(seed, rank, step), rank).backward()
        sgd.sum_and_normalize_gradients(model)
        results.append(
            {
                n: (p.grad.clone() if p.grad is not None else None)
                for n, p in model.named_parameters()
            }
        )
    sgd.synchronize_parameters(model)
    return results


@pytest.mark.parametrize("mode", ["plain", "attach", "attach-views", "flat"])
def test_unused_parameters_are_averaged_over_the_ranks_that_produced_them(mode: str) -> None:
    seed, world_size = random.randrange(2**31), len(STEPS)
    results = run_world(_train, world_size, seed, mode, timeout=60)
    torch.manual_seed(seed)
    model = Experts()
    for step in range(max(STEPS)):
        stepping = [r for r in range(world_size) if STEPS[r] > step]
        per_rank = {r: local_grads(model, seed, r, step) for r in stepping}
        for name, _ in model.named_parameters():
            producers = [r for r in stepping if per_rank[r][name] is not None]
            for rank in stepping:
                got = results[rank][step][name]
                if not producers:
                    assert got is None, f"{mode}: {name} made on rank {rank}, no rank produced it"
                    continue
                want = sum(per_rank[r][name].double() for r in producers) / len(producers)
                assert got is not None, f"{mode}: {name} missing on rank {rank} at step {step}"
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def _all_used(rank: int, world_size: int, seed: int, allow_unused: bool) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    sgd = dl.AllReduceSGD(allow_unused=allow_unused)
    model(batch(seed, rank, 0)).pow(2).mean().backward()
    sgd.sum_and_normalize_gradients(model)
    return [p.grad for p in model.parameters()]


def test_with_every_gradient_present_results_are_bitwise_those_without_allow_unused() -> None:
    seed = random.randrange(2**31)
    with_flag = run_world(_all_used, 2, seed, True, timeout=60)
    without = run_world(_all_used, 2, seed, False, timeout=60)
    for a, b in zip(with_flag, without, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
