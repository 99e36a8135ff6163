"""Fault injection in real gloo worlds: dead and stalled peers, ranks with
different models. Every test is bounded by the harness's deadline; the
survivors must raise within the library's own deadline plus a margin.
"""

from __future__ import annotations

import datetime
import gc
import os
import re
import signal
import time
import weakref
from pathlib import Path

import pytest
import torch
from multiproc import Outcome, run_world_outcomes

import distlearn_cuda as dl

SHAPES = [(7, 3), (11,), (1,), (300,)]
DEADLINE_S = 2.0
# What the transport may add to the deadline: gloo notices a dead peer when
# its connection drops, a stalled one when the deadline passes.
MARGIN_S = 3.0


def params_of(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + rank)
    return [torch.randn(s, generator=generator) for s in SHAPES]


def _train_until_a_peer_fails(
    rank: int, world_size: int, algo: str, fault: str, fault_step: int, scratch: str
) -> dict:
    """Trains; the faulty rank (1) dies or stalls at fault_step; the others
    report how their failure surfaced, that a checkpoint still works, and
    that the closed object is freed once dropped, with the garbage collector
    off (no reference cycle keeps its buffers, e.g. through the failure)."""
    gc.disable()
    params = params_of(rank)
    if algo == "sgd":
        sync = dl.AllReduceSGD(timeout=DEADLINE_S)
        sync.synchronize_parameters(params)
    else:
        sync = dl.AllReduceEA(tau=2, alpha=0.4, timeout=datetime.timedelta(seconds=DEADLINE_S))
        sync.synchronize_parameters(params)
    for step in range(100):
        if rank == 1 and step == fault_step:
            Path(scratch, "fault_time").write_text(repr(time.time()))
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)  # stalled: alive, never calls again
        started = time.time()
        try:
            if algo == "sgd":
                grads = [torch.full(s, 0.01) for s in SHAPES]
                sync.sum_and_normalize_gradients(grads)
                for p, g in zip(params, grads, strict=True):
                    p.sub_(g)
            else:
                for p in params:
                    p.mul_(0.99)
                sync.average_parameters(params)
        except dl.CommunicationError as error:
            raised = time.time()
            checkpoint = Path(scratch, f"checkpoint{rank}.pt")
            torch.save({"params": params, "step": step}, checkpoint)
            restored = torch.load(checkpoint)
            try:
                sync.synchronize_parameters(params)
                again = "no error"
            except dl.CommunicationError as second:
                again = str(second)
            sync.close()  # safe after the failure: raises nothing, releases the group
            sync.close()
            report = {
                "step": step,
                "call_seconds": raised - started,
                "raised_at": raised,
                "message": str(error),
                "operation": error.operation,
                "rank": error.rank,
                "checkpoint_ok": all(
                    torch.equal(a, b) for a, b in zip(restored["params"], params, strict=True)
                ),
                "again": again,
            }
            break
    else:
        return {"step": None}
    # Out of the except blocks, which held the raised errors and their frames.
    alive = weakref.ref(sync)
    del sync
    report["freed_without_gc"] = alive() is None
    return report


@pytest.mark.parametrize(
    ("algo", "fault"), [("sgd", "kill"), ("ea", "kill"), ("sgd", "stall"), ("ea", "stall")]
)
def test_survivors_raise_within_the_deadline(algo: str, fault: str, tmp_path: Path) -> None:
    world_size, fault_step = 3, 5
    outcomes = run_world_outcomes(
        _train_until_a_peer_fails,
        world_size,
        algo,
        fault,
        fault_step,
        str(tmp_path),
        timeout=40,
        expected=[0, 2],
    )
    assert outcomes[1].status == ("died" if fault == "kill" else "killed"), outcomes[1]
    if fault == "kill":
        assert outcomes[1].value == -signal.SIGKILL
    fault_time = float((tmp_path / "fault_time").read_text())
    for rank in (0, 2):
        outcome: Outcome = outcomes[rank]
        assert outcome.status == "ok", outcome.value
        report = outcome.value
        assert report["step"] is not None, f"rank {rank} never noticed the failure"
        detect = report["raised_at"] - fault_time
        print(f"{algo} {fault}: rank {rank} raised {detect:.2f} s after the fault")
        assert report["call_seconds"] <= DEADLINE_S + MARGIN_S
        assert detect <= DEADLINE_S + MARGIN_S
        assert report["rank"] == rank
        assert f"failed on rank {rank}" in report["message"]
        assert report["operation"] in report["message"]
        assert report["checkpoint_ok"]
        assert "not attempted, an earlier collective of this object failed" in report["again"]
        assert report["freed_without_gc"]
        # The failing rank is named with its last position, exactly: it took
        # part in the collective before the furthest one a survivor waited
        # in, whether or not its own report reached the store (every rank
        # took part in a collective that completed on any rank; see
        # _positions). A rank killed inside a collective can leave the
        # survivors one collective apart: one completed it, one did not.
        print(report["message"])
        named = named_positions(report["message"])
        assert set(named) == {0, 1, 2}, report["message"]
        furthest = max(number for number, _, _ in named.values())
        waited = {r for r, (number, how, _) in named.items() if how == "waited in"}
        assert waited == {r for r, (number, _, _) in named.items() if number == furthest}
        assert waited <= {0, 2}, report["message"]
        assert named[1][0] == furthest - 1, report["message"]
        assert all(named[r][0] >= furthest - 1 for r in (0, 2)), report["message"]
        if fault == "stall":  # a killed rank's last asynchronous EA round may fail first
            assert waited == {0, 2}, report["message"]
            assert named[0][2] == (fault_step if algo == "sgd" else fault_step + 1)


def named_positions(message: str) -> dict[int, tuple[int, str, int | None]]:
    """Rank -> (collective number, how it is named, step or None) in a
    positions sentence ("rank 1 took part in collective 7 (...); ranks 0, 2
    waited in collective 8 (all_reduce_sum, step 5)")."""
    named = {}
    clause = re.compile(
        r"ranks? ([\d, ]+) (waited in|last reported|took part in) collective (\d+) "
        r"\((\w+)(?:, step (\d+))?\)"
    )
    for found in clause.finditer(message):
        for rank in found[1].split(", "):
            step = int(found[5]) if found[5] is not None else None
            named[int(rank)] = (int(found[3]), found[2], step)
    return named


def _structure(rank: int, world_size: int, algo: str, odd_rank: int) -> dict:
    shapes = list(SHAPES)
    if rank == odd_rank:
        shapes[2] = (2,)  # one tensor of a different shape
    params = [torch.randn(s) for s in shapes]
    before = [p.clone() for p in params]
    sync = dl.AllReduceSGD() if algo == "sgd" else dl.AllReduceEA(tau=1)
    try:
        if algo == "sgd":
            sync.synchronize_parameters(params)
        else:
            sync.average_parameters(params)
    except ValueError as error:
        unchanged = all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
        return {"message": str(error), "unchanged": unchanged}
    return {"message": None}


@pytest.mark.parametrize("algo", ["sgd", "ea"])
def test_ranks_with_different_models_all_raise_naming_the_rank_and_tensor(algo: str) -> None:
    outcomes = run_world_outcomes(_structure, 3, algo, 2, timeout=40)
    for rank, outcome in enumerate(outcomes):
        assert outcome.status == "ok", outcome.value
        message = outcome.value["message"]
        assert message is not None, f"rank {rank} did not notice"
        assert "rank 2 differs from rank 0 at tensor 2" in message
        assert "(2,)" in message and "(1,)" in message
        assert outcome.value["unchanged"]


def _gradients_of_another_structure(rank: int, world_size: int) -> dict:
    sgd = dl.AllReduceSGD()
    grads = [torch.ones(3), torch.ones(4 if rank == 0 else 5)]
    try:
        sgd.sum_and_normalize_gradients(grads)
    except ValueError as error:
        return {"message": str(error), "untouched": all(bool((g == 1).all()) for g in grads)}
    return {"message": None}


def test_first_gradients_of_different_shapes_raise_before_summing() -> None:
    for outcome in run_world_outcomes(_gradients_of_another_structure, 2, timeout=40):
        assert outcome.status == "ok", outcome.value
        assert "rank 1 differs from rank 0 at tensor 1" in outcome.value["message"]
        assert outcome.value["untouched"]


def _nan_on_one_rank(rank: int, world_size: int, algo: str, mode: str) -> dict:
    """Step 0 is clean; at step 1 rank 1's values hold a NaN; step 2 is clean again."""
    reports = []
    if algo == "sgd":
        sgd = dl.AllReduceSGD()
        for step in range(3):
            grads = [torch.full(s, float(rank + step)) for s in SHAPES]
            if step == 1 and rank == 1:
                grads[1][4] = float("nan")
            before = [g.clone() for g in grads]
            try:
                sgd.sum_and_normalize_gradients(grads, nonfinite=mode)
                raised = None
            except FloatingPointError as error:
                raised = str(error)
            reports.append(
                {
                    "raised": raised,
                    "grads": grads,
                    "unchanged": all(
                        torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
                        for a, b in zip(grads, before, strict=True)
                    ),
                    "skipped": sgd.last_step_skipped,
                }
            )
    else:
        ea = dl.AllReduceEA(tau=1, alpha=0.4, nonfinite=mode)
        params = [torch.full(s, float(rank)) for s in SHAPES]
        for step in range(3):
            if step == 1 and rank == 1:
                params[1][4] = float("nan")
            center_before = [c.clone() for c in ea.center] if ea.center else None
            try:
                ea.average_parameters(params)
                raised = None
            except FloatingPointError as error:
                raised = str(error)
            reports.append(
                {
                    "raised": raised,
                    "center": [c.clone() for c in ea.center],
                    "center_unchanged": center_before is not None
                    and all(
                        torch.equal(a, b) for a, b in zip(ea.center, center_before, strict=True)
                    ),
                    "skipped": ea.last_round_skipped,
                }
            )
            if step == 1 and rank == 1:
                params[1][4] = 0.0  # the rank recovers, e.g. from a checkpoint
    return {"reports": reports}


@pytest.mark.parametrize("algo", ["sgd", "ea"])
@pytest.mark.parametrize("mode", ["propagate", "skip", "raise"])
def test_a_nan_on_one_rank_gets_the_same_decision_on_every_rank(algo: str, mode: str) -> None:
    outcomes = run_world_outcomes(_nan_on_one_rank, 3, algo, mode, timeout=40)
    for rank, outcome in enumerate(outcomes):
        assert outcome.status == "ok", outcome.value
        clean0, bad, clean2 = outcome.value["reports"]
        for clean in (clean0, clean2):
            assert clean["raised"] is None and not clean["skipped"]
        assert (bad["raised"] is not None) == (mode == "raise"), f"rank {rank}"
        assert bad["skipped"] == (mode == "skip"), f"rank {rank}"
        if mode == "raise":
            assert "on 1 of 3 ranks" in bad["raised"]
        if algo == "sgd":
            tensor = bad["grads"][1]
            if mode == "propagate":
                assert tensor[4].isnan() and not tensor[3].isnan()
            elif mode == "skip":
                assert all(bool((g == 0).all()) for g in bad["grads"])
            else:
                assert bad["unchanged"]
            # The next step is the plain mean again: (0+2) + (1+2) + (2+2) over 3.
            assert all(bool((g == 3.0).all()) for g in clean2["grads"])
        else:
            center = bad["center"][1]
            if mode == "propagate":
                assert center[4].isnan()
            else:
                assert bad["center_unchanged"] and not center.isnan().any()


def _ea_state_after_a_failed_round(rank: int, world_size: int) -> dict:
    """Asynchronous EA, tau=1: rank 1 dies with a round in flight on the others."""
    params = params_of(rank)
    ea = dl.AllReduceEA(tau=1, alpha=0.4, timeout=DEADLINE_S)
    ea.synchronize_parameters(params)
    good = None
    for step in range(50):
        if rank == 1 and step == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        for p in params:
            p.mul_(0.99)
        try:
            good = [c.clone() for c in ea.center]  # after every completed round
            ea.average_parameters(params)
        except dl.CommunicationError:
            break
    state = ea.state_dict()  # does not raise after the failure
    again = ea.state_dict()
    return {
        "step": step,
        "same_as_last_good": all(
            torch.equal(a, b) for a, b in zip(state["center"], good, strict=True)
        ),
        "stable": all(
            torch.equal(a, b) for a, b in zip(state["center"], again["center"], strict=True)
        ),
    }


def test_ea_state_after_a_failed_round_is_the_last_good_round() -> None:
    outcomes = run_world_outcomes(_ea_state_after_a_failed_round, 3, timeout=40, expected=[0, 2])
    for rank in (0, 2):
        assert outcomes[rank].status == "ok", outcomes[rank].value
        report = outcomes[rank].value
        assert report["step"] < 49, "the failure never surfaced"
        assert report["same_as_last_good"] and report["stable"]


def test_positions_are_raised_to_the_last_collective_every_rank_took_part_in() -> None:
    """summarize(): a rank that reported nothing, or less than the floor,
    took part in the floor's collective; this rank's own position is its
    own, whatever the store held."""
    from distlearn_cuda._comm.positions import summarize

    posted = {0: (12, "all_reduce_sum", 5), 1: (3, "all_reduce_sum", 1), 2: None, 3: None}
    message = summarize(posted, floor=(11, "all_reduce_sum", 4), rank=3, entered=(12, "x", 5))
    assert message == (
        "ranks 1, 2 took part in collective 11 (all_reduce_sum) and reported no later one; "
        "rank 0 waited in collective 12 (all_reduce_sum, step 5); "
        "rank 3 waited in collective 12 (x, step 5)"
    )
    assert summarize({0: None, 1: None}) == "no rank reported its position"


def test_a_collective_completed_on_one_survivor_raises_every_floor() -> None:
    """Rank 1 killed inside collective 8: it completed on rank 2 (which then
    waited in 9) and failed on rank 0. Rank 2's posted floor says every rank
    entered 8, so rank 0 names rank 1 with 8, not with its own floor 7."""
    import torch.distributed as dist

    from distlearn_cuda._comm.positions import Positions

    store = dist.HashStore()
    ranks = [Positions(store, "p", rank, 3, step=lambda: 0) for rank in range(3)]
    try:
        for number in range(1, 10):
            for rank, positions in enumerate(ranks):
                reached = {0: 8, 1: 7, 2: 9}[rank]
                if number <= reached:
                    positions.enter(f"op{number}")
                    if number < reached or (rank == 1 and number == 7):
                        positions.completed_by_all()
        for positions in ranks[1:]:
            positions._post()
        assert set(ranks[0].describe().split("; ")) == {
            "rank 1 took part in collective 8 (op8) and reported no later one",
            "rank 0 last reported collective 8 (op8, step 0)",
            "rank 2 waited in collective 9 (op9, step 0)",
        }
    finally:
        for positions in ranks:
            positions.close()
