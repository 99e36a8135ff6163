"""CUDA graphs: a whole training step captured and replayed, for every
algorithm, on a GPU (skipped elsewhere); and, on any machine, the state
machine of asynchronous EA rounds and DiLoCo exchanges around a capture.

PyTorch's whole-network recipe: warm up on a side stream, set the gradients
to None, capture forward, backward, averaging and optimizer step, so the
gradients come from the graph's private pool at fixed addresses; each
replay then repeats the captured step on whatever the static input holds.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tensor_cases import fresh_seed, needs_gpu
from torch import nn

import distlearn_cuda as dl
import distlearn_cuda.diloco as diloco_module
import distlearn_cuda.ea as ea_module

STEPS = 4


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(33, 65), nn.ReLU(), nn.Linear(65, 7)).cuda()


def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed + 1)
    return [
        (
            torch.randn(16, 33, generator=generator).cuda(),
            torch.randn(16, 7, generator=generator).cuda(),
        )
        for _ in range(STEPS)
    ]


def make_step(
    mode: str, model: nn.Module
) -> tuple[Callable[[torch.Tensor, torch.Tensor], None], torch.optim.Optimizer, object]:
    """One training step of ``mode`` (sgd, sgd-attach, sgd-flat, ea, diloco) on ``model``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if mode == "ea":
        sync: object = dl.AllReduceEA(tau=1, alpha=0.3)
    elif mode == "diloco":  # an outer step at every call: each replay takes one
        sync = dl.DiLoCo(tau=1, mix=0.25, nonfinite="skip")
    else:
        sync = dl.AllReduceSGD()
        if mode == "sgd-attach":
            sync.attach(model, bucket_mb=0.01, first_bucket_mb=0.005)
        elif mode == "sgd-flat":
            sync.use_flat_storage(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if mode == "sgd-flat":
            # Gradients stay in the flat buffer and backward adds into
            # them: each replay must start from zero, as each eager step does.
            optimizer.zero_grad(set_to_none=False)
        nn.functional.mse_loss(model(x), y).backward()
        if isinstance(sync, dl.AllReduceSGD):
            sync.sum_and_normalize_gradients(model)
        optimizer.step()
        if isinstance(sync, (dl.AllReduceEA, dl.DiLoCo)):
            sync.average_parameters(model)

    return step, optimizer, sync


@needs_gpu
@pytest.mark.parametrize("mode", ["sgd", "sgd-attach", "sgd-flat", "ea", "diloco"])
def test_a_whole_training_step_is_captured_and_replays_as_eager_steps(
    nccl_world_of_one: None, mode: str
) -> None:
    seed = fresh_seed()
    data = batches(seed)
    set_to_none = mode != "sgd-flat"  # flat storage keeps gradients in their views

    eager_model = make_model(seed)
    eager_step, eager_opt, _ = make_step(mode, eager_model)
    warmup = batches(seed + 7)[:3]
    for x, y in warmup + data:
        eager_step(x, y)
        eager_opt.zero_grad(set_to_none=set_to_none)
    torch.cuda.synchronize()

    model = make_model(seed)
    step, optimizer, sync = make_step(mode, model)
    static_x, static_y = torch.zeros_like(data[0][0]), torch.zeros_like(data[0][1])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in warmup:
            static_x.copy_(x)
            static_y.copy_(y)
            step(static_x, static_y)
            optimizer.zero_grad(set_to_none=set_to_none)
        if isinstance(sync, (dl.AllReduceEA, dl.DiLoCo)):
            sync.wait()  # a capture cannot wait on the warm-up's round in flight
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=set_to_none)
    with torch.cuda.graph(graph):
        step(static_x, static_y)
    # Capturing ran no kernel: the captured step is the first of the data's.
    for x, y in data:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(model.parameters(), eager_model.parameters(), strict=True):
        # The same kernels in the same order: bitwise.
        assert torch.equal(got, want), f"{mode}: replayed steps differ from eager ones"


@needs_gpu
def test_rounds_inside_a_capture_join_the_stream_they_fork(nccl_world_of_one: None) -> None:
    params = [torch.randn(1000, device="cuda") for _ in range(3)]
    ea = dl.AllReduceEA(tau=1, alpha=0.5)
    ea.average_parameters(params)
    ea.wait()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # ending the capture fails on an unjoined fork
        ea.average_parameters(params)
    graph.replay()
    torch.cuda.synchronize()


# The state machine, on any machine: the capture predicate is the only GPU
# fact it reads, so the test sets it; the collectives are real (gloo).
@pytest.mark.usefixtures("world_of_one")
def test_a_round_in_flight_when_a_capture_begins_is_refused_and_nothing_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params = [torch.randn(5, 3), torch.randn(11)]
    ea = dl.AllReduceEA(tau=1, alpha=0.5)
    ea.average_parameters(params)  # binds
    torch._foreach_add_(params, 1.0)
    ea.average_parameters(params)  # a round in flight (asynchronous)
    before = [p.clone() for p in params]
    monkeypatch.setattr(ea_module, "is_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match=r"call ea\.wait\(\) before capturing"):
        ea.average_parameters(params)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    monkeypatch.setattr(ea_module, "is_capturing", lambda device: False)
    ea.wait()
    monkeypatch.setattr(ea_module, "is_capturing", lambda device: True)
    ea.average_parameters(params)  # completes within the "capture"
    assert ea._pending is None


@pytest.mark.usefixtures("world_of_one")
def test_captured_rounds_give_the_asynchronous_rounds_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = torch.Generator().manual_seed(fresh_seed())
    start = [torch.randn(7, 3, generator=generator), torch.randn(13, generator=generator)]
    noise = [[torch.randn_like(p) for p in start] for _ in range(4)]

    def run(capturing: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = [p.clone() for p in start]
        ea = dl.AllReduceEA(tau=1, alpha=0.3)
        monkeypatch.setattr(ea_module, "is_capturing", lambda device: capturing)
        for step_noise in noise:
            torch._foreach_add_(params, step_noise)
            ea.average_parameters(params)
        monkeypatch.setattr(ea_module, "is_capturing", lambda device: False)
        return params, list(ea.center)

    captured, asynchronous = run(True), run(False)
    for a, b in zip(captured[0] + captured[1], asynchronous[0] + asynchronous[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("world_of_one")
def test_an_exchange_in_flight_when_a_capture_begins_is_refused_and_nothing_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params = [torch.randn(5, 3), torch.randn(130)]
    diloco = dl.DiLoCo(tau=3, fragments=2, delay=2)
    diloco.synchronize_parameters(params)
    diloco.average_parameters(params)  # step 1: fragment 1 exchanges (in flight)
    before = [p.clone() for p in params]
    counts = (diloco._step, diloco.outer_steps)  # (state_dict() would wait for the exchange)
    monkeypatch.setattr(diloco_module, "is_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match=r"call diloco\.wait\(\) before capturing"):
        diloco.average_parameters(params)
    with pytest.raises(RuntimeError, match="synchronize_global cannot be captured"):
        diloco.synchronize_global(params)
    monkeypatch.setattr(diloco_module, "is_capturing", lambda device: False)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert (diloco._step, diloco.outer_steps) == counts
    diloco.wait()
    monkeypatch.setattr(diloco_module, "is_capturing", lambda device: True)
    diloco.average_parameters(params)  # step 2: nothing in flight is waited on
    monkeypatch.setattr(diloco_module, "is_capturing", lambda device: False)
    diloco.close()


@pytest.mark.usefixtures("world_of_one")
def test_nonfinite_raise_is_refused_inside_a_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    params = [torch.randn(7)]
    diloco = dl.DiLoCo(tau=1, nonfinite="raise")
    diloco.average_parameters(params)
    monkeypatch.setattr(diloco_module, "is_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="nonfinite='raise'"):
        diloco.average_parameters(params)
    monkeypatch.setattr(diloco_module, "is_capturing", lambda device: False)
    diloco.close()


@pytest.mark.usefixtures("world_of_one")
@pytest.mark.parametrize(
    "settings", [{"tau": 1}, {"tau": 3, "fragments": 2, "delay": 1, "mix": 0.5}]
)
def test_captured_exchanges_give_the_overlapped_exchanges_results(
    monkeypatch: pytest.MonkeyPatch, settings: dict
) -> None:
    # A captured call's exchange completes within it; its outer step stays
    # due at its step: the results are bitwise those of eager calls.
    generator = torch.Generator().manual_seed(fresh_seed())
    start = [torch.randn(7, 3, generator=generator), torch.randn(150, generator=generator)]
    noise = [[torch.randn_like(p) for p in start] for _ in range(9)]

    def run(capturing: bool) -> list[torch.Tensor]:
        params = [p.clone() for p in start]
        diloco = dl.DiLoCo(nonfinite="skip", **settings)
        diloco.synchronize_parameters(params)
        for step_noise in noise:
            torch._foreach_add_(params, step_noise)
            monkeypatch.setattr(diloco_module, "is_capturing", lambda device: capturing)
            diloco.average_parameters(params)
            monkeypatch.setattr(diloco_module, "is_capturing", lambda device: False)
            if capturing:
                assert all(f.in_flight is None or f.in_flight.pending is None
                           for f in diloco._fragments)  # fmt: skip
        state = diloco.state_dict()
        diloco.close()
        return [*params, *state["globals"], *state["momenta"]]

    captured, eager = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(captured, eager, strict=True))
