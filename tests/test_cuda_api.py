"""The public API on CUDA tensors: NCCL from the extension, graph capture, no host sync.

A GPU takes one NCCL rank (NCCL refuses two ranks on one device), so NCCL is
tested as a world of one here; several ranks with CUDA tensors run over gloo
in test_sgd.py and test_ea.py. Skipped (and reported so) without a GPU.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from multiproc import run_world_outcomes
from tensor_cases import fresh_seed, needs_gpu

import distlearn_cuda as dl
from distlearn_cuda import _C

pytestmark = needs_gpu

# Odd sizes across vector widths and chunk boundaries (2^14 elements).
SHAPES = [(3,), (1023,), (5, 7), (1,), (65537,), (16384, 3)]


@pytest.fixture
def nccl_world_of_one() -> Iterator[None]:
    dist.init_process_group(
        "nccl",
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        device_id=torch.device("cuda", torch.cuda.current_device()),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def random_list(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(fresh_seed())
    return [torch.randn(s, generator=generator, dtype=dtype).cuda() for s in SHAPES]


def ea_reference(
    params: list[torch.Tensor], centers: list[torch.Tensor], alpha: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One elastic averaging round of a world of one, in float64."""
    deltas = [alpha * (p.double() - c.double()) for p, c in zip(params, centers, strict=True)]
    new_params = [p.double() - d for p, d in zip(params, deltas, strict=True)]
    new_centers = [c.double() + d for c, d in zip(centers, deltas, strict=True)]
    return new_params, new_centers


def test_collectives_go_through_the_extensions_nccl(nccl_world_of_one: None) -> None:
    sgd = dl.AllReduceSGD(comm_dtype=torch.bfloat16)
    grads = random_list()
    expected = [g.bfloat16().float() for g in grads]  # the only change in a world of one
    sgd.sum_and_normalize_gradients(grads)
    for g, e in zip(grads, expected, strict=True):
        assert torch.equal(g, e)
    info = dl.build_info()
    assert _C.nccl_loaded() is not None
    # The copy torch loaded, not a second NCCL.
    assert info["nccl_runtime_version"] == ".".join(map(str, torch.cuda.nccl.version()))
    params = random_list()
    before = [p.clone() for p in params]
    sgd.synchronize_parameters(params)  # a broadcast over NCCL
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_ea_round_over_nccl_matches_float64(nccl_world_of_one: None) -> None:
    alpha = 0.3
    ea = dl.AllReduceEA(tau=1, alpha=alpha)
    params = random_list()
    ea.average_parameters(params)  # binds: center = params, a zero delta
    for p in params:
        p.add_(torch.randn_like(p))
    centers = [c.clone() for c in ea.center]
    expected_params, expected_centers = ea_reference(params, centers, alpha)
    ea.average_parameters(params)
    for got, e in zip(params, expected_params, strict=True):
        torch.testing.assert_close(got.double(), e, rtol=2e-6, atol=2e-6)
    for got, e in zip(ea.center, expected_centers, strict=True):
        torch.testing.assert_close(got.double(), e, rtol=2e-6, atol=2e-6)


def test_a_warm_call_makes_no_host_synchronization(nccl_world_of_one: None) -> None:
    sgd = dl.AllReduceSGD()
    ea = dl.AllReduceEA(tau=1)
    grads, params = random_list(), random_list()
    sgd.sum_and_normalize_gradients(grads)  # first calls plan, build tables, join NCCL
    ea.average_parameters(params)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing torch call raises
    try:
        sgd.sum_and_normalize_gradients(grads)
        ea.average_parameters(params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_a_step_is_captured_in_a_cuda_graph_and_replayed(nccl_world_of_one: None) -> None:
    alpha = 0.25
    sgd = dl.AllReduceSGD(comm_dtype=torch.bfloat16)
    ea = dl.AllReduceEA(tau=1, alpha=alpha)
    grads, params = random_list(), random_list()

    # torch's recipe: warm up on a side stream, then capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            sgd.sum_and_normalize_gradients(grads)
            ea.average_parameters(params)
        ea.wait()  # a capture cannot wait on the warm-up's round in flight
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sgd.sum_and_normalize_gradients(grads)
        ea.average_parameters(params)

    for _ in range(3):
        new_grads, new_params = random_list(), random_list()
        centers = [c.clone() for c in ea.center]
        for t, n in zip(grads + params, new_grads + new_params, strict=True):
            t.copy_(n)
        graph.replay()
        torch.cuda.synchronize()
        for g, n in zip(grads, new_grads, strict=True):
            assert torch.equal(g, n.bfloat16().float())
        expected_params, expected_centers = ea_reference(new_params, centers, alpha)
        for got, e in zip(params, expected_params, strict=True):
            torch.testing.assert_close(got.double(), e, rtol=2e-6, atol=2e-6)
        for got, e in zip(ea.center, expected_centers, strict=True):
            torch.testing.assert_close(got.double(), e, rtol=2e-6, atol=2e-6)


def test_a_call_on_another_stream_waits_for_the_previous_call(nccl_world_of_one: None) -> None:
    # The plan's buffer is shared by all calls: a call on stream B must not
    # start while the previous call, on stream A, may still use it.
    sgd = dl.AllReduceSGD(comm_dtype=torch.bfloat16)
    first, second = random_list(), random_list()
    expected = [[g.bfloat16().float() for g in gs] for gs in (first, second)]
    # Warm (plan, communicator): setting them up may synchronize the device,
    # which would hide what this test looks for.
    # Rounding to bf16 twice equals rounding once, so expected still holds.
    sgd.sum_and_normalize_gradients(first)
    sgd.sum_and_normalize_gradients(second)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued before the first call
    sgd.sum_and_normalize_gradients(first)
    other = torch.cuda.Stream()
    with torch.cuda.stream(other):
        sgd.sum_and_normalize_gradients(second)
    time.sleep(0.02)  # ample for the second call's few kernels, were they not held back
    assert not other.query(), "the call on the other stream did not wait for the first call"
    torch.cuda.synchronize()
    for got, want in zip(first + second, expected[0] + expected[1], strict=True):
        assert torch.equal(got, want)


def test_a_collective_past_its_deadline_aborts_nccl_and_the_next_call_raises(
    nccl_world_of_one: None,
) -> None:
    # One GPU cannot host a second NCCL rank to kill, so the collective is
    # held back by queued work instead: the watchdog counts from enqueue.
    sgd = dl.AllReduceSGD(timeout=0.5)
    grads = random_list()
    sgd.sum_and_normalize_gradients(grads)
    torch.cuda.synchronize()
    torch.cuda._sleep(4_000_000_000)  # ~2 s of GPU time ahead of the allreduce
    sgd.sum_and_normalize_gradients(grads)
    started = time.monotonic()
    torch.cuda.synchronize()
    time.sleep(0.1)  # the watchdog's poll
    with pytest.raises(dl.CommunicationError, match="did not complete within"):
        sgd.sum_and_normalize_gradients(grads)
    assert time.monotonic() - started < 10


def _nccl_rank_dies(rank: int, world_size: int, deadline_s: float) -> dict:
    torch.cuda.set_device(rank)
    group = dist.new_group(backend="nccl", device_id=torch.device("cuda", rank))
    sgd = dl.AllReduceSGD(group, timeout=deadline_s)
    grads = random_list()
    for step in range(50):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            sgd.sum_and_normalize_gradients(grads)
            torch.cuda.synchronize()  # returns once the watchdog aborted a stuck kernel
        except dl.CommunicationError as error:
            return {"step": step, "message": str(error), "at": time.time()}
    return {"step": None}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: 2 GPUs")
def test_a_rank_killed_over_nccl_makes_the_survivor_raise() -> None:
    outcomes = run_world_outcomes(_nccl_rank_dies, 2, 2.0, timeout=60, expected=[0])
    assert outcomes[1].status == "died"
    report = outcomes[0].value
    assert outcomes[0].status == "ok", report
    assert report["step"] == 4 or report["step"] == 3, report
    assert "NCCL" in report["message"] or "did not complete" in report["message"]
