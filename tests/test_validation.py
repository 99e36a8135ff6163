"""Bad input raises ValueError/TypeError naming the argument, and changes nothing."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import distlearn_cuda as dl

pytestmark = pytest.mark.usefixtures("world_of_one")


def snapshot(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def assert_unchanged(tensors: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(t, b)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"tau": 0}, ValueError, "tau must be >= 1"),
        ({"tau": -3}, ValueError, "tau must be >= 1"),
        ({"tau": 2.5}, TypeError, "tau must be an int"),
        ({"tau": "10"}, TypeError, "tau must be an int"),
        ({"tau": True}, TypeError, "tau must be an int"),
        ({"alpha": 0.0}, ValueError, "alpha must be in"),
        ({"alpha": 1.5}, ValueError, "alpha must be in"),
        ({"alpha": -0.1}, ValueError, "alpha must be in"),
        ({"alpha": float("nan")}, ValueError, "alpha must be in"),
        ({"alpha": "0.2"}, TypeError, "alpha must be a real number"),
        ({"comm_dtype": torch.int32}, TypeError, "comm_dtype"),
        ({"group": "world"}, TypeError, "group must be"),
    ],
)
def test_bad_hyperparameters(kwargs: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        dl.AllReduceEA(**kwargs)


@pytest.mark.parametrize("cls", [dl.AllReduceSGD, dl.AllReduceEA])
@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        (0, ValueError),
        (-1.5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (datetime.timedelta(0), ValueError),
        ("30", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_bad_timeout_is_named(cls: type, timeout: Any, error: type) -> None:
    with pytest.raises(error, match="timeout must be"):
        cls(timeout=timeout)


@pytest.mark.parametrize("cls", [dl.AllReduceSGD, dl.AllReduceEA])
def test_timeout_in_seconds_or_timedelta(cls: type) -> None:
    assert cls(timeout=2.5).timeout == datetime.timedelta(seconds=2.5)
    assert cls(timeout=datetime.timedelta(minutes=1)).timeout == datetime.timedelta(seconds=60)
    assert cls().timeout == datetime.timedelta(minutes=5)


def test_positional_order_and_alpha_or_beta() -> None:
    ea = dl.AllReduceEA(None, 3, 0.5)
    assert (ea.tau, ea.alpha, ea.beta) == (3, 0.5, 0.5)  # a world of one: beta = alpha
    assert dl.AllReduceEA(beta=0.6).alpha == 0.6
    assert dl.AllReduceEA().beta == 0.9  # the paper's, by default
    with pytest.raises(ValueError, match="give alpha or beta, not both"):
        dl.AllReduceEA(alpha=0.1, beta=0.1)
    # alpha = 1 swaps x and the center every round, whatever the world size.
    with pytest.raises(ValueError, match=r"alpha=1 \(1 ranks\) cannot be stable"):
        dl.AllReduceEA(alpha=1)


def test_sgd_rejects_bad_group_and_comm_dtype() -> None:
    with pytest.raises(TypeError, match="group must be"):
        dl.AllReduceSGD(42)
    with pytest.raises(TypeError, match="comm_dtype"):
        dl.AllReduceSGD(comm_dtype="bf16")


def sgd_sum(tensors: Any) -> None:
    dl.AllReduceSGD().sum_and_normalize_gradients(tensors)


def sgd_sync(tensors: Any) -> None:
    dl.AllReduceSGD().synchronize_parameters(tensors)


def ea_average(tensors: Any) -> None:
    dl.AllReduceEA(tau=1).average_parameters(tensors)


def ea_center(tensors: Any) -> None:
    dl.AllReduceEA(tau=1).synchronize_center(tensors)


CALLS = [sgd_sum, sgd_sync, ea_average, ea_center]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (torch.arange(4), TypeError, r"\[1\]: dtype torch.int64 is not supported"),
        (torch.ones(4, dtype=torch.bool), TypeError, r"\[1\]: dtype torch.bool"),
        (torch.ones(4, device="meta"), ValueError, r"\[1\]: is on meta but .*\[0\] is on cpu"),
        (torch.ones(4, 6)[:, ::2], ValueError, r"\[1\]: is not dense"),
        (None, TypeError, r"\[1\] is a NoneType"),
        (3.0, TypeError, r"\[1\] is a float"),
        (torch.ones(3, dtype=torch.complex64), TypeError, r"\[1\]: dtype torch.complex64"),
    ],
)
def test_bad_tensor_is_named_and_nothing_changes(
    call: Callable[[Any], None], bad: Any, error: type, message: str
) -> None:
    good = [torch.randn(5), torch.randn(2, 3)]
    before = snapshot(good)
    with pytest.raises(error, match=message):
        call([good[0], bad, good[1]])
    assert_unchanged(good, before)


@pytest.mark.parametrize("call", CALLS)
def test_empty_structure(call: Callable[[Any], None]) -> None:
    with pytest.raises(ValueError, match="contains no tensors"):
        call([])


def test_ea_structure_change_is_rejected_and_nothing_changes() -> None:
    ea = dl.AllReduceEA(tau=1, alpha=0.5)
    params = [torch.randn(4), torch.randn(3)]
    ea.synchronize_parameters(params)
    params[0].add_(1.0)
    before, center_before = snapshot(params), snapshot(ea.center)
    for changed in (
        params[:1],
        [params[0], torch.randn(4)],
        [params[0], params[1].double()],
        [params[0], torch.randn(3, 1)],
        {"a": params[0], "b": params[1]} | {"c": torch.randn(2)},
    ):
        with pytest.raises(ValueError, match=r"params: (rank 0: )?structure changed"):
            ea.average_parameters(changed)
    assert_unchanged(params, before)
    assert_unchanged(ea.center, center_before)


def test_ea_checks_a_changed_structure_on_the_round_that_would_use_it() -> None:
    ea = dl.AllReduceEA(tau=3, alpha=0.5)
    params = [torch.randn(4), torch.randn(3)]
    ea.synchronize_parameters(params)
    params[0].add_(1.0)
    before, center_before = snapshot(params), snapshot(ea.center)
    changed = [params[0], torch.randn(5)]
    # Steps 1 and 2 only count: nothing is read or written.
    ea.average_parameters(changed)
    ea.average_parameters(changed)
    assert_unchanged(params, before)
    with pytest.raises(ValueError, match=r"params: (rank 0: )?structure changed"):
        ea.average_parameters(changed)  # step 3 runs a round: checked first
    assert_unchanged(params, before)
    assert_unchanged(ea.center, center_before)


def test_sgd_structure_change_is_rejected_and_nothing_changes() -> None:
    sgd = dl.AllReduceSGD()
    grads = [torch.randn(4), torch.randn(3)]
    sgd.sum_gradients(grads)
    for changed in ([grads[0]], [grads[0], torch.randn(5)], [grads[0], grads[1].half()]):
        before = snapshot(changed)
        with pytest.raises(ValueError, match="grads: rank 0: structure changed"):
            sgd.sum_and_normalize_gradients(changed)
        assert_unchanged(changed, before)
    # The parameters a synchronization gives are not the gradients bound by the
    # first call: any structure, compared across ranks, and then kept.
    params = [torch.randn(4), torch.randn(3)]
    sgd.synchronize_parameters(params)
    before = snapshot(params)
    with pytest.raises(ValueError, match=r"params: (rank 0: )?structure changed"):
        sgd.synchronize_parameters([params[1], params[0]])
    assert_unchanged(params, before)


def test_missing_grad_on_a_module_parameter() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    model(torch.randn(1, 3)).sum().backward()
    model[1].bias.grad = None
    before = snapshot([p.grad for p in model.parameters() if p.grad is not None])
    with pytest.raises(ValueError, match=r"grads: rank 0: parameter '1.bias' has no .grad"):
        dl.AllReduceSGD().sum_and_normalize_gradients(model)
    assert_unchanged([p.grad for p in model.parameters() if p.grad is not None], before)


def test_overlapping_params_are_rejected_for_ea() -> None:
    base = torch.randn(10)
    before = snapshot([base])
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        dl.AllReduceEA(tau=1).average_parameters([base, base[5:]])
    assert_unchanged([base], before)


def test_dense_non_contiguous_params_are_averaged_correctly() -> None:
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    y = torch.randn(6, 4).t()
    ea = dl.AllReduceEA(tau=1, alpha=0.25)
    ea.synchronize_parameters([x, y])
    x.add_(torch.randn_like(x))
    y.sub_(torch.randn_like(y))
    centers = snapshot(ea.center)
    moved = [x.clone(), y.clone()]
    ea.average_parameters([x, y])
    # World of one: the allreduced delta is this rank's own.
    for got, start, center in zip([x, y], moved, centers, strict=True):
        delta = 0.25 * (start.double() - center.double())
        torch.testing.assert_close(got.double(), start.double() - delta)
        assert got.stride() == start.stride()
    for got, start, center in zip(ea.center, moved, centers, strict=True):
        torch.testing.assert_close(got.double(), center.double() + 0.25 * (start - center))


def test_sgd_checks_a_tensor_resized_in_place_between_calls() -> None:
    # The hot path skips the full check only when every tensor's metadata is
    # unchanged: a tensor resized in place (same object) must still be caught.
    sgd = dl.AllReduceSGD()
    grads = [torch.ones(3), torch.ones(4, 2)]
    sgd.sum_and_normalize_gradients(grads)
    sgd.sum_and_normalize_gradients(grads)
    grads[1].resize_(3, 2)
    before = snapshot(grads)
    with pytest.raises(ValueError, match="structure changed"):
        sgd.sum_and_normalize_gradients(grads)
    assert_unchanged(grads, before)
    grads[1] = torch.full((2, 4), 2.0).t()  # the bound shape, dense but not contiguous
    sgd.sum_and_normalize_gradients(grads)  # takes the full check, and passes it
    assert torch.equal(grads[1], torch.full((4, 2), 2.0))


def test_a_parameter_without_grad_given_as_gradient_raises_naming_it() -> None:
    model = nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    model.bias.grad = None
    before = snapshot([model.weight.grad, model.weight.detach(), model.bias.detach()])
    with pytest.raises(ValueError, match=r"grads\[1\] requires grad.*has none"):
        dl.AllReduceSGD().sum_and_normalize_gradients(list(model.parameters()))
    assert_unchanged([model.weight.grad, model.weight.detach(), model.bias.detach()], before)


def test_a_non_leaf_tensor_that_requires_grad_is_not_averaged_as_a_gradient() -> None:
    leaf = torch.randn(5, requires_grad=True)
    derived = leaf * 2  # requires grad, has no .grad of its own
    with pytest.raises(ValueError, match=r"grads\[0\] requires grad"):
        dl.AllReduceSGD().sum_gradients([derived])


@pytest.mark.parametrize("cls", [dl.AllReduceSGD, dl.AllReduceEA])
def test_bad_carry_arguments_raise_before_anything_changes(cls: type) -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    before = snapshot([p.detach() for p in model.parameters()])
    sync = cls()
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        sync.synchronize_parameters(model, optimizer="adam")
    with pytest.raises(TypeError, match="buffers must be a bool"):
        sync.synchronize_parameters(model, buffers=1)
    with pytest.raises(ValueError, match=r"buffers=True needs params to be an nn\.Module"):
        sync.synchronize_parameters(list(model.parameters()), buffers=True)
    assert_unchanged([p.detach() for p in model.parameters()], before)


def test_a_bound_module_still_checks_new_gradients() -> None:
    """After the first call binds the module, a gradient that went missing
    or was replaced by a strided view is still refused, nothing modified."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model(torch.randn(5, 3)).sum().backward()
    sgd = dl.AllReduceSGD()
    sgd.sum_and_normalize_gradients(model)  # binds
    model[1].bias.grad = None
    before = snapshot([model[0].weight.grad])
    with pytest.raises(ValueError, match=r"parameter '1\.bias' has no \.grad"):
        sgd.sum_and_normalize_gradients(model)
    assert_unchanged([model[0].weight.grad], before)
    model[1].bias.grad = torch.zeros(2)
    model[1].weight.grad = torch.zeros(2, 8)[:, ::2]  # the right shape, with gaps
    with pytest.raises(ValueError, match=r"1\.weight\.grad: is not dense"):
        sgd.sum_and_normalize_gradients(model)
    model[1].weight.grad = torch.ones(2, 4)
    sgd.sum_and_normalize_gradients(model)  # new, valid tensors: taken
    assert torch.equal(model[1].weight.grad, torch.ones(2, 4))


def test_a_bound_module_takes_dense_gradients_and_refuses_sparse_ones() -> None:
    """New gradients each call (zero_grad's default) take a batch check: the
    contiguous ones pass it, a channels_last one passes the slow check, a
    sparse one is refused by it, naming the parameter, nothing modified."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(2, 2))
    sgd = dl.AllReduceSGD()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    sgd.sum_and_normalize_gradients(model)  # binds
    weight = model[0].weight
    dense = torch.randn_like(weight).to(memory_format=torch.channels_last)
    assert not dense.is_contiguous()
    weight.grad = dense
    expected = dense.clone()
    sgd.sum_and_normalize_gradients(model)  # a world of one: the mean is the gradient
    assert torch.equal(weight.grad, expected)
    model[1].bias.grad = torch.randn(2).to_sparse()
    before = snapshot([weight.grad])
    with pytest.raises(TypeError, match=r"grads\.1\.bias\.grad: torch\.sparse_coo tensors"):
        sgd.sum_and_normalize_gradients(model)
    assert_unchanged([weight.grad], before)


def test_allow_unused_must_be_a_bool_and_without_it_a_missing_grad_raises() -> None:
    with pytest.raises(TypeError, match="allow_unused must be a bool"):
        dl.AllReduceSGD(allow_unused=1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0](torch.randn(5, 3)).sum().backward()  # the second layer is unused
    before = snapshot([model[0].weight.grad])
    with pytest.raises(ValueError, match=r"parameter '1\.weight' has no \.grad"):
        dl.AllReduceSGD().sum_and_normalize_gradients(model)
    assert_unchanged([model[0].weight.grad], before)
    sgd = dl.AllReduceSGD(allow_unused=True)
    sgd.sum_and_normalize_gradients(model)  # a world of one: its own gradients, None kept
    assert model[1].weight.grad is None and torch.equal(model[0].weight.grad, before[0])
