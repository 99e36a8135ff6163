"""The public API on CUDA tensors: NCCL from the extension, graph capture, no host sync;
the communicator's devices, deadlines, sharing and lifetime; DISTLEARN_NCCL=group.

A GPU takes one NCCL rank (NCCL refuses two ranks on one device), so NCCL is
tested as a world of one here; several ranks with CUDA tensors run over gloo
in test_sgd.py and test_ea.py. Skipped (and reported so) without a GPU.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from multiproc import run_world, run_world_outcomes
from tensor_cases import fresh_seed, needs_gpu

import distlearn_cuda as dl
from distlearn_cuda import _C
from distlearn_cuda._comm import nccl as _nccl

pytestmark = needs_gpu

# Odd sizes across vector widths and chunk boundaries (_C.kChunkElements).
SHAPES = [(3,), (1023,), (5, 7), (1,), (65537,), (16384, 3)]


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


# About 0.25 s at an H100's or H200's 1.98 GHz boost clock, far longer than
# any call's host work: a call that returns while it still runs did not wait.
SPIN_CYCLES = 500_000_000


@pytest.mark.parametrize("form", ["list", "module", "attach", "flat", "ea"])
def test_a_training_step_returns_while_the_device_is_still_busy(
    nccl_world_of_one: None, form: str
) -> None:
    # Seen on an H200 (issue 9): attach()'s buckets waited on the host for
    # their allreduce at the end of every step. Sync debug mode does not see
    # an event wait; a spin queued before the step does.
    torch.manual_seed(fresh_seed())
    model = torch.nn.Sequential(
        torch.nn.Linear(33, 65), torch.nn.ReLU(), torch.nn.Linear(65, 7)
    ).cuda()
    x, y = torch.randn(16, 33, device="cuda"), torch.randn(16, 7, device="cuda")
    sgd = dl.AllReduceSGD()
    ea = dl.AllReduceEA(tau=1, alpha=0.3)
    if form == "attach":
        sgd.attach(model, bucket_mb=0.01, first_bucket_mb=0.005)
    elif form == "flat":
        sgd.use_flat_storage(model)

    def step() -> None:
        model.zero_grad(set_to_none=form != "flat")
        torch.nn.functional.mse_loss(model(x), y).backward()
        if form == "ea":
            ea.average_parameters(model)
        elif form == "list":
            sgd.sum_and_normalize_gradients([p.grad for p in model.parameters()])
        else:
            sgd.sum_and_normalize_gradients(model)

    for _ in range(3):  # plans, tables and the communicator made
        step()
    torch.cuda.synchronize()
    torch.cuda._sleep(SPIN_CYCLES)
    step()
    returned = torch.cuda.Event()
    returned.record()
    assert not returned.query(), f"{form}: the host waited for the device"
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


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


@pytest.mark.parametrize("kept_for_shrink", [False, True])
def test_a_collective_past_its_deadline_fails_nccl_and_the_next_call_raises(
    nccl_world_of_one: None, kept_for_shrink: bool
) -> None:
    # One GPU cannot host a second NCCL rank to kill, so the collective is
    # held back by queued work instead: the watchdog counts from enqueue. It
    # aborts NCCL, or revokes it (NCCL >= 2.28) where the communicator is
    # kept for a shrink (elastic views): that frees the queued collective the
    # same way and keeps the communicator shrinkable.
    sgd = dl.AllReduceSGD(timeout=0.5)
    grads = random_list()
    sgd.sum_and_normalize_gradients(grads)
    torch.cuda.synchronize()
    comm = communicator_of(sgd, torch.cuda.current_device())
    if kept_for_shrink:
        comm.keep_for_shrink()
    torch.cuda._sleep(4_000_000_000)  # ~2 s of GPU time ahead of the allreduce
    sgd.sum_and_normalize_gradients(grads)
    started = time.monotonic()
    torch.cuda.synchronize()  # returns: the abort (or revoke) stopped the allreduce
    time.sleep(0.1)  # the watchdog's poll
    with pytest.raises(dl.CommunicationError, match="did not complete within") as failure:
        sgd.sum_and_normalize_gradients(grads)
    assert time.monotonic() - started < 10
    version = _nccl.runtime_version()
    assert version is not None
    if kept_for_shrink and version >= 22900:  # revoke is in every NCCL since 2.29
        assert comm.revoked
    if not kept_for_shrink:
        assert not comm.revoked
    if comm.revoked:
        assert "NCCL was revoked" in str(failure.value)
        assert comm.can_shrink and not comm.usable
    else:
        assert "NCCL was aborted" in str(failure.value)
        assert not comm.can_shrink
    outcome = comm.close()
    assert outcome.startswith("aborted: all_reduce_sum did not complete within"), outcome
    assert time.monotonic() - started < 10
    sgd.close()


def test_an_aborted_ea_round_never_joins_the_center(nccl_world_of_one: None) -> None:
    """An injected NCCL failure (the watchdog aborts a round held past its
    deadline): the center and state_dict() stay those of the last good round."""
    ea = dl.AllReduceEA(tau=1, alpha=0.5, timeout=0.5)
    params = random_list()
    ea.average_parameters(params)  # binds
    for p in params:
        p.add_(1.0)
    ea.average_parameters(params)
    good = [c.clone() for c in ea.center]  # the round completed and was checked
    torch.cuda.synchronize()
    torch.cuda._sleep(4_000_000_000)  # ~2 s of GPU time ahead of the next round
    for p in params:
        p.add_(1.0)
    ea.average_parameters(params)  # its allreduce waits behind the sleep: aborted
    torch.cuda.synchronize()
    time.sleep(0.1)  # the watchdog's poll
    state = ea.state_dict()  # does not raise
    for got, want in zip(state["center"], good, strict=True):
        assert torch.equal(got, want)
    with pytest.raises(dl.CommunicationError):
        ea.average_parameters(params)
    assert all(torch.equal(c, g) for c, g in zip(ea.state_dict()["center"], good, strict=True))


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


def communicator_of(obj: dl.AllReduceSGD | dl.AllReduceEA, device: int) -> _C.NcclCommunicator:
    return obj._collectives._leases[device].comm


def test_one_communicator_serves_objects_whatever_their_timeouts(nccl_world_of_one: None) -> None:
    device = torch.cuda.current_device()
    objects = [dl.AllReduceSGD(timeout=0.5), dl.AllReduceSGD(timeout=60), dl.AllReduceEA(tau=1)]
    for obj in objects:
        grads = random_list()
        if isinstance(obj, dl.AllReduceSGD):
            obj.sum_and_normalize_gradients(grads)
        else:
            obj.average_parameters(grads)
    torch.cuda.synchronize()
    comms = {id(communicator_of(obj, device)) for obj in objects}
    assert len(comms) == 1
    # A diagnostic counter (benchmarks/profile_cuda_host.py): at most one per
    # collective enqueued, and each first call enqueues at most two (EA's
    # binding broadcast and its round's allreduce).
    assert 0 <= communicator_of(objects[0], device).enqueues_in_progress <= 2 * len(objects)
    for obj in objects:
        obj.close()


def test_each_collective_keeps_its_objects_deadline(nccl_world_of_one: None) -> None:
    patient, hasty = dl.AllReduceSGD(timeout=60), dl.AllReduceSGD(timeout=0.5)
    grads = random_list()
    patient.sum_and_normalize_gradients(grads)
    hasty.sum_and_normalize_gradients(grads)
    torch.cuda.synchronize()
    comm = communicator_of(patient, torch.cuda.current_device())
    assert comm is communicator_of(hasty, torch.cuda.current_device())
    # ~2 s of GPU time ahead: within the patient object's deadline...
    torch.cuda._sleep(4_000_000_000)
    patient.sum_and_normalize_gradients(grads)
    torch.cuda.synchronize()
    time.sleep(0.1)  # the watchdog's poll
    comm.check()
    patient.sum_and_normalize_gradients(grads)
    # ...past the hasty one's.
    torch.cuda._sleep(4_000_000_000)
    hasty.sum_and_normalize_gradients(grads)
    torch.cuda.synchronize()
    time.sleep(0.1)
    with pytest.raises(dl.CommunicationError, match=r"did not complete within 0\.5"):
        hasty.sum_and_normalize_gradients(grads)
    # The communicator was aborted: every object on it fails from now on.
    with pytest.raises(dl.CommunicationError, match="did not complete within"):
        patient.sum_and_normalize_gradients(grads)


def test_shrink_refuses_bad_ranks_and_changes_nothing(nccl_world_of_one: None) -> None:
    sgd = dl.AllReduceSGD()
    grads = random_list()
    sgd.sum_and_normalize_gradients(grads)
    comm = communicator_of(sgd, torch.cuda.current_device())
    version = _nccl.runtime_version()
    assert version is not None
    assert comm.can_shrink == (version >= 22700)
    for excluded, message in [
        ([], "at least one rank"),
        ([0], "holds this rank"),  # a world of one has no other rank to lose
        ([1], "not in a world of 1"),
        ([-1], "not in a world of 1"),
        ([0, 0], "names a rank twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            comm.shrink(excluded, 10.0)
    assert comm.usable
    expected = [g.clone() for g in grads]
    sgd.sum_and_normalize_gradients(grads)  # a world of one: the mean is the gradient
    torch.cuda.synchronize()
    assert all(torch.equal(g, e) for g, e in zip(grads, expected, strict=True))
    sgd.close()


def test_joining_has_its_own_bound(nccl_world_of_one: None) -> None:
    _nccl.load()
    device = torch.cuda.current_device()
    unique_id = _C.NcclCommunicator.unique_id()
    with pytest.raises(RuntimeError, match="ncclCommInitRankConfig did not finish within"):
        _C.NcclCommunicator(unique_id, 1, 0, device, 1e-6)  # no NCCL joins in a microsecond
    # An object whose collective deadline is far shorter than NCCL's init can
    # take still joins: joining is bounded by max(timeout, 60 s).
    sgd = dl.AllReduceSGD(timeout=0.3)
    grads = random_list()
    started = time.monotonic()
    sgd.sum_and_normalize_gradients(grads)
    torch.cuda.synchronize()
    print(f"first step, NCCL init included: {time.monotonic() - started:.3f} s")
    sgd.sum_and_normalize_gradients(grads)
    torch.cuda.synchronize()
    sgd.close()


def test_the_last_user_closing_destroys_the_communicator(nccl_world_of_one: None) -> None:
    first, second = dl.AllReduceSGD(), dl.AllReduceEA(tau=1)
    first.sum_and_normalize_gradients(random_list())
    second.average_parameters(random_list())
    comm = communicator_of(first, torch.cuda.current_device())
    assert comm in _nccl.open_communicators()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first.close()
        assert not comm.closed and comm.usable
        second.close()
    assert not [w for w in caught if "did not close cleanly" in str(w.message)]
    assert comm.closed and comm not in _nccl.open_communicators()
    assert comm.in_flight == 0


def test_close_waits_for_the_collectives_in_flight(nccl_world_of_one: None) -> None:
    sgd = dl.AllReduceSGD()
    grads = random_list()
    sgd.sum_and_normalize_gradients(grads)
    torch.cuda.synchronize()
    comm = communicator_of(sgd, torch.cuda.current_device())
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU time ahead of the allreduce
    sgd.sum_and_normalize_gradients(grads)
    assert comm.in_flight >= 1
    started = time.monotonic()
    assert comm.close() == "destroyed"
    assert time.monotonic() - started > 0.1  # it waited for the allreduce
    assert comm.in_flight == 0 and comm.closed
    assert comm.close() == "closed before"
    torch.cuda.synchronize()
    with pytest.raises(dl.CommunicationError, match="closed"):
        sgd.sum_and_normalize_gradients(grads)
    sgd.close()


def test_close_aborts_a_collective_stuck_past_its_deadline(nccl_world_of_one: None) -> None:
    sgd = dl.AllReduceSGD(timeout=0.5)
    grads = random_list()
    sgd.sum_and_normalize_gradients(grads)
    torch.cuda.synchronize()
    comm = communicator_of(sgd, torch.cuda.current_device())
    torch.cuda._sleep(4_000_000_000)  # ~2 s ahead: past the deadline
    sgd.sum_and_normalize_gradients(grads)
    started = time.monotonic()
    outcome = comm.close()
    assert outcome.startswith("aborted: all_reduce_sum did not complete within"), outcome
    assert time.monotonic() - started < 10
    torch.cuda.synchronize()
    sgd.close()


def test_destroying_the_group_closes_its_communicator() -> None:
    dist.init_process_group(
        "nccl",
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        device_id=torch.device("cuda", torch.cuda.current_device()),
    )
    try:
        sgd = dl.AllReduceSGD()
        sgd.sum_and_normalize_gradients(random_list())
        torch.cuda.synchronize()
        comm = communicator_of(sgd, torch.cuda.current_device())
    finally:
        dist.destroy_process_group()
    gc.collect()
    assert comm.closed and comm not in _nccl.open_communicators()
    sgd.close()  # its lease on the closed communicator: nothing left to do


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_a_communicator_on_a_gpu_that_is_not_the_current_one() -> None:
    # Issue 12: the watchdog's event was made on the current device and
    # recorded on a stream of the communicator's device.
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 1)
    )
    try:
        sgd = dl.AllReduceSGD()
        collectives = sgd._collectives
        buffer = torch.arange(1000, dtype=torch.float32, device="cuda:1")
        collectives.all_reduce_sum(buffer)
        collectives.broadcast(buffer, 0)
        collectives.all_reduce_sum_async(buffer, verify=True).wait()
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0
        assert torch.equal(buffer.cpu(), torch.arange(1000, dtype=torch.float32))
        comm = communicator_of(sgd, 1)
        assert comm.device == 1 and comm.usable and comm.in_flight == 0
        sgd.close()
        assert comm.closed
    finally:
        dist.destroy_process_group()


GROUP_MODE_SCRIPT = """
import json
import torch
import torch.distributed as dist
import distlearn_cuda as dl
from distlearn_cuda import _C
from distlearn_cuda._comm import nccl as _nccl

dist.init_process_group(
    "nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0)
)
grads = [torch.randn(1000, device="cuda") for _ in range(3)]
expected = [g.clone() for g in grads]
with dl.AllReduceSGD() as sgd, dl.AllReduceEA(tau=1) as ea:
    sgd.sum_and_normalize_gradients(grads)
    sgd.synchronize_parameters(grads)
    ea.average_parameters(grads)
    torch.cuda.synchronize()
    report = {
        "equal": all(torch.equal(g, e) for g, e in zip(grads, expected)),
        "own": [sgd._collectives._own_nccl, ea._collectives._own_nccl],
        "loaded": _C.nccl_loaded(),
        "open": len(_nccl.open_communicators()),
        "mode": dl.build_info()["nccl_mode"],
    }
dist.destroy_process_group()
print(json.dumps(report))
"""


def test_group_mode_sends_cuda_collectives_through_the_groups_own_nccl() -> None:
    done = subprocess.run(
        [sys.executable, "-c", GROUP_MODE_SCRIPT],
        env={**os.environ, "DISTLEARN_NCCL": "group"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {
        "equal": True,
        "own": [False, False],
        "loaded": None,
        "open": 0,
        "mode": "group",
    }


EXIT_SCRIPT = """
import sys
import torch
import torch.distributed as dist
import distlearn_cuda as dl

variant = int(sys.argv[1])
dist.init_process_group(
    "nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0)
)
tensors = [torch.randn(4096, device="cuda") for _ in range(3)]
if variant == 0:  # a step, then exit
    dl.AllReduceSGD().sum_and_normalize_gradients(tensors)
elif variant == 1:  # an EA round still in flight (asynchronous by default)
    dl.AllReduceEA(tau=1).average_parameters(tensors)
else:  # an allreduce waiting behind ~0.2 s of GPU work at exit (2) or at
    # dist.destroy_process_group() (3)
    sgd = dl.AllReduceSGD()
    sgd.sum_and_normalize_gradients(tensors)
    torch.cuda._sleep(400_000_000)
    sgd.sum_and_normalize_gradients(tensors)
    if variant == 3:
        dist.destroy_process_group()
print("done", flush=True)
"""


def test_a_script_that_exits_without_close_neither_hangs_nor_crashes(tmp_path: Path) -> None:
    script = tmp_path / "exit_after_a_step.py"
    script.write_text(EXIT_SCRIPT)
    runs, parallel = 20, 4
    failures = []
    for start in range(0, runs, parallel):
        procs = [
            (
                run,
                subprocess.Popen(
                    [sys.executable, str(script), str(run % 4)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
            for run in range(start, min(start + parallel, runs))
        ]
        for run, proc in procs:
            try:
                out, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                failures.append(f"run {run} (variant {run % 4}) hung:\n{err[-2000:]}")
                continue
            bad = [m for m in BAD_EXIT_SIGNS if m in err]
            if proc.returncode != 0 or "done" not in out or bad:
                failures.append(
                    f"run {run} (variant {run % 4}) exit {proc.returncode}, {bad}:\n{err[-2000:]}"
                )
    assert not failures, "\n".join(failures)


BAD_EXIT_SIGNS = (
    "Traceback",
    "terminate called",
    "Fatal Python error",
    "Segmentation fault",
    "did not close cleanly",
)


def _ranks_disagree_then_agree(rank: int, world_size: int) -> bool:
    torch.cuda.set_device(rank)
    group = dist.new_group(backend="nccl", device_id=torch.device("cuda", rank))
    first = dl.AllReduceSGD(group)
    grads = [torch.ones(1000, device="cuda")]
    first.sum_and_normalize_gradients(grads)
    if rank == 0:
        first.close()  # rank 0 alone: its communicator is destroyed, rank 1's lives on
    second = dl.AllReduceSGD(group, timeout=30)  # the ranks agree to make a new one
    grads = [torch.full((1000,), float(rank + 1), device="cuda")]
    second.sum_and_normalize_gradients(grads)
    torch.cuda.synchronize()
    ok = bool(torch.all(grads[0] == 1.5).item())
    second.close()
    first.close()
    return ok


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: 2 GPUs")
def test_ranks_whose_objects_closed_at_different_times_agree_on_a_new_communicator() -> None:
    assert run_world(_ranks_disagree_then_agree, 2, timeout=120) == [True, True]


def _cuda_calls_differ(rank: int, world_size: int) -> dict:
    """CUDA gradients over gloo: rank 1 calls sum_gradients where rank 0
    calls sum_and_normalize_gradients (see the note "Deferred agreement")."""
    sgd = dl.AllReduceSGD(timeout=20)
    grads = [torch.full((5,), 1.0 + rank, device="cuda"), torch.ones(3, 7, device="cuda")]
    sgd.sum_and_normalize_gradients([g.clone() for g in grads])  # agreed: binds
    call = sgd.sum_gradients if rank == 1 else sgd.sum_and_normalize_gradients
    call(grads)  # the device decides: zeros on every rank, no host read
    torch.cuda.synchronize()
    zeros = all(bool((g == 0).all()) for g in grads)
    try:
        sgd.sum_and_normalize_gradients(grads)  # the host reads the codes here
        error = None
    except ValueError as raised:
        error = str(raised)
    return {"zeros": zeros, "error": error}


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (two processes share it over gloo)"
)
def test_different_calls_on_cuda_write_zeros_then_raise_at_the_next_call() -> None:
    for report in run_world(_cuda_calls_differ, 2, timeout=120):
        assert report["zeros"]
        assert report["error"] is not None and "different calls" in report["error"]


def test_the_deferred_agreement_allocates_and_synchronizes_nothing(
    nccl_world_of_one: None,
) -> None:
    """A warm step on CUDA copies its count slots into host memory made once
    and records an event made once; the next call reads them."""
    sgd = dl.AllReduceSGD()
    grads = random_list()
    for _ in range(2):
        sgd.sum_and_normalize_gradients(grads)
    host = sgd._reducer._deferred_host
    assert host is not None and host.is_pinned()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sgd.sum_and_normalize_gradients(grads)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sgd._reducer._deferred_host is host
