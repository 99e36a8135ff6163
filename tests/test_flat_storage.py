"""AllReduceSGD.use_flat_storage: parameters and gradients as views of flat
buffers, the allreduce in place, against the plain mode in real gloo worlds."""

from __future__ import annotations

import random

import pytest
import torch
from multiproc import run_world
from torch import nn

import distlearn_cuda as dl


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(13, 31), nn.Tanh(), nn.Linear(31, 7), nn.Tanh(), nn.Linear(7, 1)
    )
    model[2].bias.requires_grad_(False)  # a frozen parameter stays out of the buffers
    return model


def _train(
    rank: int,
    world_size: int,
    flat: bool,
    set_to_none: bool,
    seed: int,
    steps: list[int],
    compression: str | None = None,
) -> dict:
    model = make_model(seed)
    sgd = dl.AllReduceSGD(compression=compression)  # type: ignore[arg-type]
    if flat:
        sgd.use_flat_storage(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # made after
    sgd.synchronize_parameters(model)
    generator = torch.Generator().manual_seed(seed * 10 + rank)
    in_place = []
    for rank_steps in steps:
        for _ in range(rank_steps if rank != 1 else rank_steps - 2):
            optimizer.zero_grad(set_to_none=set_to_none)
            model(torch.randn(5, 13, generator=generator)).pow(2).mean().backward()
            sgd.sum_and_normalize_gradients(model)
            optimizer.step()
            if flat:
                bucket = sgd._reducer.buckets[0]
                in_place.append(
                    all(p.grad is v for p, v in zip(bucket.params, bucket.views, strict=True))
                )
        sgd.synchronize_parameters(model)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "in_place": in_place,
        "copied_steps": sgd._reducer.buckets[0].copied_steps if flat else None,
        "residual": sgd.state_dict().get("residual"),
    }


@pytest.mark.parametrize("set_to_none", [False, True])
def test_flat_storage_matches_the_plain_mode(set_to_none: bool) -> None:
    seed = random.randrange(2**31)
    steps = [6, 4]  # rank 1 takes two fewer: uneven epochs
    plain = run_world(_train, 3, False, set_to_none, seed, steps, timeout=60)
    flat = run_world(_train, 3, True, set_to_none, seed, steps, timeout=60)
    for rank in range(3):
        for a, b in zip(flat[rank]["params"], plain[rank]["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert all(flat[rank]["in_place"])
        if set_to_none:  # gradients made anew each step: copied back, still correct
            assert flat[rank]["copied_steps"] > 0
        else:  # zero-copy: no step copied a gradient
            assert flat[rank]["copied_steps"] == 0


@pytest.mark.parametrize("compression", ["int8", "mxfp4"])
def test_flat_storage_with_compression_is_the_plain_mode_with_compression(
    compression: str,
) -> None:
    # The low-bit sum quantizes the same float32 values in the same layout
    # (the flat buffer is the plan's): the same messages, the same sums, the
    # same residuals, bit for bit, with uneven steps (a rank that ran out
    # sends zeros through the same sum).
    seed = random.randrange(2**31)
    steps = [5, 4]
    plain = run_world(_train, 3, False, False, seed, steps, compression, timeout=60)
    flat = run_world(_train, 3, True, False, seed, steps, compression, timeout=60)
    where = f"seed {seed}, {compression}"
    for rank in range(3):
        for a, b in zip(flat[rank]["params"], plain[rank]["params"], strict=True):
            assert torch.equal(a, b), where
        assert all(flat[rank]["in_place"]) and flat[rank]["copied_steps"] == 0, where
        residuals = flat[rank]["residual"], plain[rank]["residual"]
        if compression == "mxfp4":  # error feedback: on by default for 4 bits
            assert torch.equal(*residuals) and residuals[0].abs().sum() > 0, where
        else:
            assert residuals == (None, None), where


def inside(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    start = buffer.data_ptr()
    return start <= tensor.data_ptr() < start + buffer.numel() * buffer.element_size()


@pytest.mark.usefixtures("world_of_one")
def test_parameters_and_gradients_are_views_of_the_buffers() -> None:
    model = make_model(0)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # made before: still works
    sgd = dl.AllReduceSGD()
    sgd.use_flat_storage(model)
    bucket, param_buffer = sgd._reducer.buckets[0], sgd._reducer.flat_params.buffer
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    model(torch.ones(2, 13)).sum().backward()
    sgd.sum_and_normalize_gradients(model)
    optimizer.step()
    for p in bucket.params:
        assert inside(p, param_buffer) and inside(p.grad, bucket.plan.buffer)
    assert not model[2].bias.requires_grad and not inside(model[2].bias, param_buffer)
    assert all(
        not torch.equal(p, b)
        for p, b in zip(model.parameters(), before, strict=True)
        if p.requires_grad
    )


@pytest.mark.usefixtures("world_of_one")
def test_flat_storage_refuses_mixed_dtypes_and_a_second_mode() -> None:
    model = make_model(0)
    model[0].double()
    with pytest.raises(ValueError, match="one dtype"):
        dl.AllReduceSGD().use_flat_storage(model)
    model = make_model(0)
    sgd = dl.AllReduceSGD()
    sgd.use_flat_storage(model)
    with pytest.raises(RuntimeError, match="already"):
        sgd.use_flat_storage(model)
    with pytest.raises(ValueError, match="one dtype"):
        dl.AllReduceSGD(comm_dtype=torch.bfloat16).use_flat_storage(make_model(1))


@pytest.mark.usefixtures("world_of_one")
@pytest.mark.parametrize("mode", ["propagate", "skip", "raise"])
def test_flat_storage_nonfinite_guard(mode: str) -> None:
    model = make_model(0)
    sgd = dl.AllReduceSGD()
    sgd.use_flat_storage(model)
    model(torch.ones(2, 13)).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    if mode == "raise":
        with pytest.raises(FloatingPointError, match="on 1 of 1 ranks"):
            sgd.sum_and_normalize_gradients(model, nonfinite=mode)
        return
    sgd.sum_and_normalize_gradients(model, nonfinite=mode)
    grads = [p.grad for p in sgd._reducer.buckets[0].params]
    if mode == "skip":
        assert sgd.last_step_skipped and all(bool((g == 0).all()) for g in grads)
    else:
        assert grads[0][0, 0].isnan() and not sgd.last_step_skipped
