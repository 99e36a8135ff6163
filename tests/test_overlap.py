"""AllReduceSGD.attach: allreduces started from backward hooks, in buckets,
against the plain mode in real gloo worlds."""

from __future__ import annotations

import random

import pytest
import torch
from multiproc import run_world
from torch import nn

import distlearn_cuda as dl

# Bucket sizes that cut the test model into several buckets (its parameters
# are a few KB each).
TINY_BUCKETS = {"bucket_mb": 0.004, "first_bucket_mb": 0.001}


class Net(nn.Module):
    """A small MLP; ``reverse`` runs its layers in the opposite order of their
    registration, so backward produces gradients in an unusual order."""

    def __init__(self, reverse: bool) -> None:
        super().__init__()
        self.reverse = reverse
        self.layers = nn.ModuleList([nn.Linear(24, 24) for _ in range(5)])
        self.frozen = nn.Linear(24, 24)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self.layers)[::-1] if self.reverse else list(self.layers)
        for layer in layers:
            x = torch.tanh(layer(x))
        return self.frozen(x).sum()


def _train(
    rank: int,
    world_size: int,
    overlapped: bool,
    reverse: bool,
    steps: list[int],
    seed: int,
    views: bool = False,
) -> dict:
    torch.manual_seed(seed)  # same init everywhere
    model = Net(reverse)
    sgd = dl.AllReduceSGD()
    if overlapped:
        sgd.attach(model, **TINY_BUCKETS, gradient_as_bucket_view=views)
    sgd.synchronize_parameters(model)
    started_during_backward = []
    generator = torch.Generator().manual_seed(seed * 100 + rank)
    for epoch_steps in steps:
        for _ in range(epoch_steps if rank < world_size - 1 else epoch_steps // 2):
            model.zero_grad(set_to_none=not views)  # bucket views stay in place
            model(torch.randn(8, 24, generator=generator)).backward()
            if overlapped:
                started_during_backward.append(sum(b.started for b in sgd._reducer.buckets))
            sgd.sum_and_normalize_gradients(model)
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.sub_(0.1 * p.grad)
        sgd.synchronize_parameters(model)
    buckets = sgd._reducer.buckets if overlapped else []
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "buckets": len(buckets),
        "started": started_during_backward,
        # Zero-copy: every gradient is still its bucket's view, never copied in.
        "in_views": all(
            b.views is not None
            and b.copied_steps == 0
            and all(p.grad is v for p, v in zip(b.params, b.views, strict=True))
            for b in buckets
        ),
    }


@pytest.mark.parametrize(("reverse", "views"), [(False, False), (True, False), (True, True)])
def test_overlapped_matches_plain_with_uneven_steps(reverse: bool, views: bool) -> None:
    seed = random.randrange(2**31)
    steps = [5, 3]  # the last rank takes half: uneven epochs
    plain = run_world(_train, 3, False, reverse, steps, seed, timeout=60)
    overlapped = run_world(_train, 3, True, reverse, steps, seed, views, timeout=60)
    for rank in range(3):
        assert overlapped[rank]["buckets"] > 2
        assert overlapped[rank]["in_views"] == views
        # Every bucket but the last started during backward, before the sum
        # call; the last carries the call's agreement.
        assert all(n == overlapped[rank]["buckets"] - 1 for n in overlapped[rank]["started"])
        for a, b in zip(overlapped[rank]["params"], plain[rank]["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for a, b in zip(overlapped[rank]["params"], overlapped[0]["params"], strict=True):
            assert torch.equal(a, b)


def _nan_overlapped(rank: int, world_size: int, mode: str, views: bool) -> dict:
    torch.manual_seed(0)
    model = Net(reverse=False)
    sgd = dl.AllReduceSGD()
    sgd.attach(model, **TINY_BUCKETS, gradient_as_bucket_view=views)
    x = torch.ones(2, 24)
    if rank == 1:
        x[0, 0] = float("nan")  # NaN gradients, packed by the hooks during backward
    model(x).backward()
    before = [p.grad.clone() for p in model.layers.parameters()]
    try:
        sgd.sum_and_normalize_gradients(model, nonfinite=mode)
        raised = False
    except FloatingPointError:
        raised = True
    after = [p.grad for p in model.layers.parameters()]
    return {
        "raised": raised,
        "skipped": sgd.last_step_skipped,
        "zeros": all(bool((g == 0).all()) for g in after),
        "unchanged": all(
            torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
            for a, b in zip(after, before, strict=True)
        ),
    }


@pytest.mark.parametrize("views", [False, True])
@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_overlapped_nonfinite_guard_decides_alike_on_every_rank(mode: str, views: bool) -> None:
    for report in run_world(_nan_overlapped, 2, mode, views, timeout=60):
        if mode == "skip":
            assert report["skipped"] and report["zeros"] and not report["raised"]
        else:
            # Bucket views are the allreduce's buffer: they hold the sum, so
            # only the plain buckets leave the gradients as they were.
            assert report["raised"] and (report["unchanged"] or views)


@pytest.mark.usefixtures("world_of_one")
def test_a_second_backward_in_one_step_is_refused() -> None:
    model = Net(reverse=False)
    sgd = dl.AllReduceSGD()
    sgd.attach(model, **TINY_BUCKETS)
    model(torch.ones(2, 24)).backward()
    with pytest.raises(
        RuntimeError, match=r"a second backward before sum_and_normalize_gradients.*no_sync"
    ):
        model(torch.ones(2, 24)).backward()


@pytest.mark.usefixtures("world_of_one")
def test_detach_returns_to_the_plain_mode_and_attach_checks_its_arguments() -> None:
    model = Net(reverse=False)
    sgd = dl.AllReduceSGD()
    with pytest.raises(TypeError, match="module must be"):
        sgd.attach([torch.ones(3)])
    with pytest.raises(ValueError, match="bucket_mb"):
        sgd.attach(model, bucket_mb=0)
    sgd.attach(model)
    with pytest.raises(RuntimeError, match="already attached"):
        sgd.attach(model)
    model(torch.ones(2, 24)).backward()
    with pytest.raises(RuntimeError, match="finish the step first"):
        sgd.detach()
    sgd.sum_and_normalize_gradients(model)
    sgd.detach()
    for _ in range(2):  # gradient accumulation works again
        model(torch.ones(2, 24)).backward()
    sgd.sum_and_normalize_gradients(model)
    assert sgd.steps == 2


@pytest.mark.usefixtures("world_of_one")
def test_a_parameter_without_gradient_is_named() -> None:
    model = Net(reverse=False)
    sgd = dl.AllReduceSGD()
    sgd.attach(model, **TINY_BUCKETS)
    with pytest.raises(ValueError, match=r"has no \.grad"):
        sgd.sum_and_normalize_gradients(model)


ACCUMULATE = 3  # micro-batches per step: 2 inside no_sync(), the last synced


def micro_batch(seed: int, rank: int, step: int, k: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 7919 + rank * 1013 + step * 31 + k)
    return torch.randn(4, 24, generator=generator)


def _accumulate(rank: int, world_size: int, attached: bool, seed: int) -> list[list[torch.Tensor]]:
    torch.manual_seed(seed)
    net = Net(reverse=False)
    sgd = dl.AllReduceSGD()
    if attached:
        sgd.attach(net, **TINY_BUCKETS)
    steps = []
    for step in range(2):
        for k in range(ACCUMULATE - 1):
            with sgd.no_sync():
                net(micro_batch(seed, rank, step, k)).backward()
        net(micro_batch(seed, rank, step, ACCUMULATE - 1)).backward()
        sgd.sum_and_normalize_gradients(net)
        steps.append([p.grad.clone() for p in net.parameters() if p.requires_grad])
        net.zero_grad()
    return steps


def test_accumulated_micro_batches_with_no_sync_match_the_plain_mode() -> None:
    seed, world_size = random.randrange(2**31), 2
    attached = run_world(_accumulate, world_size, True, seed, timeout=60)
    plain = run_world(_accumulate, world_size, False, seed, timeout=60)
    # Independently: each rank's summed micro-batch gradients, mean over ranks
    # (the weights never change: no optimizer step).
    torch.manual_seed(seed)
    net = Net(reverse=False)
    for step in range(2):
        per_rank = []
        for rank in range(world_size):
            net.zero_grad()
            for k in range(ACCUMULATE):
                net(micro_batch(seed, rank, step, k)).backward()
            per_rank.append([p.grad.double() for p in net.parameters() if p.requires_grad])
        expected = [sum(g) / world_size for g in zip(*per_rank, strict=True)]
        for rank in range(world_size):
            for got_a, got_p, want in zip(
                attached[rank][step], plain[rank][step], expected, strict=True
            ):
                torch.testing.assert_close(got_a.double(), want, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(got_a, got_p, rtol=1e-6, atol=1e-7)
