"""State and checkpoints: a run stopped and resumed continues bit-identically;
an interrupted save leaves the previous checkpoint loadable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from multiproc import run_world

import distlearn_cuda as dl

pytestmark = pytest.mark.usefixtures("world_of_one")

SHAPES = [(7, 3), (11,), (1,), (129,)]
TAU, ALPHA, LR = 3, 0.4, 0.05


def local_gradient(params: list[torch.Tensor], rank: int, step: int) -> list[torch.Tensor]:
    """A deterministic gradient that depends on the params, the rank and the step."""
    return [torch.sin(p * (rank + 1) + step) for p in params]


def _train(
    rank: int, world_size: int, algo: str, steps: int, save_at: int | None, resume: bool, dir: str
) -> dict[str, Any]:
    """Ranks take steps - rank steps (uneven), then synchronize the parameters."""
    generator = torch.Generator().manual_seed(7 + rank)
    params = [torch.randn(s, generator=generator) for s in SHAPES]
    sync = dl.AllReduceSGD() if algo == "sgd" else dl.AllReduceEA(tau=TAU, alpha=ALPHA)
    path = Path(dir, "rank{rank}.ckpt")  # each rank its own file
    start = 0
    if resume:
        state = dl.load_checkpoint(path)
        torch._foreach_copy_(params, state["params"])
        sync.load_state_dict(state["sync"])
        start = state["step"]
    else:
        sync.synchronize_parameters(params)
    for step in range(start, steps - rank):
        grads = local_gradient(params, rank, step)
        if algo == "sgd":
            sync.sum_and_normalize_gradients(grads)
            torch._foreach_add_(params, grads, alpha=-LR)
        else:
            torch._foreach_add_(params, grads, alpha=-LR)
            sync.average_parameters(params)
        if step + 1 == save_at:
            dl.save_checkpoint(
                {"params": params, "sync": sync.state_dict(), "step": step + 1}, path
            )
    center = [c.clone() for c in sync.center] if algo == "ea" else []
    sync.synchronize_parameters(params)
    return {"params": params, "center": center}


@pytest.mark.parametrize("algo", ["sgd", "ea"])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(algo: str, tmp_path: Path) -> None:
    steps, save_at = 17, 7  # 7 is not a multiple of tau: the step counter matters
    whole = run_world(_train, 3, algo, steps, save_at, False, str(tmp_path), timeout=60)
    resumed = run_world(_train, 3, algo, steps, None, True, str(tmp_path), timeout=60)
    for rank in range(3):
        for key in ("params", "center"):
            for a, b in zip(whole[rank][key], resumed[rank][key], strict=True):
                assert torch.equal(a, b), f"rank {rank} {key} differs after resuming"


def test_sgd_state_round_trip_and_validation() -> None:
    sgd = dl.AllReduceSGD()
    sgd.sum_and_normalize_gradients([torch.ones(3)])
    assert sgd.state_dict() == {"steps": 1}
    other = dl.AllReduceSGD()
    other.load_state_dict(sgd.state_dict())
    assert other.steps == 1
    for bad, error in [({}, ValueError), ({"steps": -1}, ValueError), ([1], TypeError)]:
        with pytest.raises(error, match="state"):
            other.load_state_dict(bad)
        assert other.steps == 1


def test_ea_center_loaded_before_the_first_call_is_taken_up() -> None:
    params = [torch.zeros(4), torch.zeros(2, 3)]
    center = [torch.full((4,), 2.0), torch.full((2, 3), -2.0)]
    ea = dl.AllReduceEA(tau=1, alpha=0.5)
    ea.load_state_dict({"step": 0, "center": center})
    ea.average_parameters(params)  # x -= 0.5 (x - c); c += 0.5 (x - c)
    assert torch.equal(params[0], torch.full((4,), 1.0))
    assert torch.equal(ea.center[0], torch.full((4,), 1.0))
    assert torch.equal(params[1], torch.full((2, 3), -1.0))


def test_ea_state_that_does_not_match_is_refused_and_nothing_changes() -> None:
    params = [torch.randn(4), torch.randn(2, 3)]
    ea = dl.AllReduceEA(tau=2)
    ea.average_parameters(params)
    before = ea.state_dict()
    wrong = {"step": 5, "center": [torch.zeros(4), torch.zeros(3, 2)]}
    with pytest.raises(ValueError, match=r"state\['center'\]\[1\]"):
        ea.load_state_dict(wrong)
    after = ea.state_dict()
    assert after["step"] == before["step"]
    assert all(torch.equal(a, b) for a, b in zip(after["center"], before["center"], strict=True))
    with pytest.raises(TypeError, match="center"):
        ea.load_state_dict({"step": 1, "center": "zeros"})


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "state.ckpt"
    script = f"""
        import os, signal, torch
        import distlearn_cuda as dl

        class DiesWhilePickled:
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGKILL)

        dl.save_checkpoint({{"version": 1, "w": torch.arange(1000.0)}}, {str(path)!r})
        dl.save_checkpoint({{"version": 2, "w": torch.zeros(10**6), "x": DiesWhilePickled()}},
                           {str(path)!r})
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=60
    )
    assert done.returncode == -9, done.stderr
    state = dl.load_checkpoint(path)
    assert state["version"] == 1 and torch.equal(state["w"], torch.arange(1000.0))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "state.ckpt"]
    assert all(name.startswith(".state.ckpt.") and name.endswith(".tmp") for name in leftovers)


def _one_path_for_all_ranks(rank: int, world_size: int, dir: str) -> dict:
    state = {"rank": rank, "w": torch.full((3,), float(rank))}
    report = {}
    try:
        dl.save_checkpoint(state, Path(dir, "run.ckpt"))
        report["same_path"] = None
    except ValueError as error:
        report["same_path"] = str(error)
    report["file"] = str(dl.save_checkpoint(state, Path(dir, "run-{rank}.ckpt")))
    report["loaded"] = dl.load_checkpoint(Path(dir, "run-{rank}.ckpt"))
    torch.distributed.barrier()  # every rank's file is written
    # Another rank's file, under this rank's name: refused.
    other = Path(dir, f"run-{(rank + 1) % world_size}.ckpt").read_bytes()
    Path(dir, f"swapped-{rank}.ckpt").write_bytes(other)
    try:
        dl.load_checkpoint(Path(dir, "swapped-{rank}.ckpt"))
        report["swapped"] = None
    except ValueError as error:
        report["swapped"] = str(error)
    if rank == 0:
        dl.save_checkpoint(state, Path(dir, "shared.ckpt"), shared=True)
    return report


def test_each_rank_writes_and_reads_its_own_checkpoint(tmp_path: Path) -> None:
    """The README's mistake (every rank saving to one path, so a resume mixes
    ranks) is refused on every rank before anything is written."""
    reports = run_world(_one_path_for_all_ranks, 2, str(tmp_path), timeout=60)
    assert not (tmp_path / "run.ckpt").exists()
    for rank, report in enumerate(reports):
        assert "has no {rank}" in report["same_path"], report
        assert report["file"] == str(tmp_path / f"run-{rank}.ckpt")
        assert report["loaded"]["rank"] == rank
        assert torch.equal(report["loaded"]["w"], torch.full((3,), float(rank)))
        assert f"holds rank {(rank + 1) % 2}'s state, this is rank {rank}" in report["swapped"]
    # A shared file (one writer) loads in this world of one too.
    assert dl.load_checkpoint(tmp_path / "shared.ckpt", shared=True)["rank"] == 0


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run-{rank}.ckpt"
    written = dl.save_checkpoint({"x": 1}, path)
    record = torch.load(written, weights_only=True)
    record["world_size"] = 4
    torch.save(record, written)
    with pytest.raises(ValueError, match="written by a world of 4 ranks, this one has 1"):
        dl.load_checkpoint(path)
