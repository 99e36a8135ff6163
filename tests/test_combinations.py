"""The combinations an independent review and a new user's trial found broken,
each pinned as a scenario of the matrix test (``test_matrix``: the same
worker and independent reference) or, where the matrix cannot express it,
as a test of its own. Every scenario here failed on the library before the
fix (commit da3f0ba: a wrong result, a crash, or no error)."""

from __future__ import annotations

import ast
import datetime
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from matrix_reference import check
from matrix_scenario import scenario_from_dict
from matrix_worker import run
from multiproc import run_world, run_world_outcomes
from world_pool import pool

import distlearn_cuda as dl

ROOT = Path(__file__).resolve().parent.parent

SGD = {
    "algo": "sgd",
    "world": 2,
    "mode": "plain",
    "form": "module",
    "allow_unused": False,
    "comm_dtype": None,
    "nonfinite": "propagate",
    "defer": False,
    "channels_last": [],
    "tied": False,
    "epochs": [[2, 2]],
}
EA = {
    "algo": "ea",
    "world": 2,
    "tau": 1,
    "rate": ["alpha", 0.3],
    "asynchronous": False,
    "nonfinite": "propagate",
    "comm_dtype": None,
    "form": "module",
    "epochs": [[2, 2]],
}

PINNED: dict[str, dict[str, Any]] = {
    # 1. One rank's model channels_last, another's contiguous: a ValueError on
    # every rank naming the tensor and both layouts (was: permuted means).
    "1 layouts differ across ranks": {**SGD, "channels_last": [0]},
    "1 layouts differ across ranks, attached": {**SGD, "mode": "attach", "channels_last": [1]},
    # 2. allow_unused with a channels_last parameter one rank did not produce
    # (was: every rank got the same wrong partial mean).
    "2 allow_unused and channels_last": {
        **SGD,
        "world": 3,
        "allow_unused": True,
        "channels_last": [0, 1, 2],
        "epochs": [[1, 1, 1]],
        "skips": [[0, 1, 0, "conv"]],
    },
    "2 allow_unused and channels_last, flat storage": {
        **SGD,
        "mode": "flat",
        "allow_unused": True,
        "channels_last": [0, 1],
    },
    # 3. A layer unfrozen mid-training: bound again on every rank, averaged
    # from that step on (was: its gradient stayed local).
    "3 a layer unfrozen mid-training": {**SGD, "events": [[0, 1, "unfreeze", "gate", [0, 1]]]},
    "3 a layer unfrozen on one rank only": {**SGD, "events": [[0, 1, "unfreeze", "gate", [1]]]},
    "3 a layer frozen mid-training, attached with bucket views": {
        **SGD,
        "mode": "attach_views",
        "events": [[0, 1, "freeze", "lin1", [0, 1]]],
    },
    # 4. allow_unused bitwise the default path at 3 and 4 ranks (was: one
    # element differed: gloo's reduction order follows the buffer's length).
    "4 allow_unused bitwise the default path, 3 ranks": {
        **SGD,
        "world": 3,
        "epochs": [[3, 3, 3]],
        "twin": True,
    },
    "4 allow_unused bitwise the default path, 4 ranks": {
        **SGD,
        "world": 4,
        "allow_unused": True,
        "epochs": [[3, 3, 3, 3]],
        "twin": True,
    },
    # 5. EA's skip with a module whose rank holds a NaN (was: a crash).
    "5 EA skip with a module": {**EA, "nonfinite": "skip", "nans": [[0, 1, 0]]},
    # 6. attach with channels_last gradients (was: refused at the first backward).
    "6 attach with channels_last": {**SGD, "mode": "attach", "channels_last": [0, 1]},
    "6 bucket views keep channels_last": {**SGD, "mode": "attach_views", "channels_last": [0, 1]},
    # 7. A rank without a .grad: the same ValueError on every rank, in the call.
    "7 a missing .grad without allow_unused": {**SGD, "skips": [[0, 1, 1, "lin1"]]},
    # 11. alpha past 2 / (p + 1): refused on every rank; beta stable.
    "11 EA alpha that cannot be stable": {**EA, "world": 3, "rate": ["alpha", 0.5]},
    "11 EA beta": {**EA, "world": 4, "rate": ["beta", 0.9], "epochs": [[3, 1, 2, 3]]},
    # 12. A scheduler carried by synchronize_parameters after uneven epochs
    # (every SGD scenario checks it; here with uneven steps).
    "12 carried scheduler state": {**SGD, "world": 3, "epochs": [[4, 1, 2], [1, 3, 0]]},
    # 13. Flat storage and synchronize_parameters: the gradients untouched
    # (was: the parameters written into them).
    "13 flat storage and synchronize_parameters": {**SGD, "mode": "flat", "frozen_gate": False},
    # 14. An object one rank makes alone: it fails, the next ones work (was:
    # every later object of the job failed).
    "14 an object made by one rank alone": {**SGD, "extra_object": 1},
    "14 an object made by one rank alone, EA": {**EA, "extra_object": 0},
    # 15. Different calls, or different settings, on different ranks.
    "15 different calls on different ranks": {**SGD, "mismatch": [0, 1, 0, False, "propagate"]},
    "15 different nonfinite modes on different ranks": {
        **SGD,
        "mismatch": [0, 0, 1, True, "raise"],
    },
    "15 different settings, SGD": {**SGD, "settings_mismatch": True},
    "15 different settings, EA": {**EA, "settings_mismatch": True},
    # 9. torch without numpy.
    "9 torch without numpy": {**SGD, "numpy_off": True, "mode": "attach"},
    "9 torch without numpy, EA": {**EA, "numpy_off": True, "form": "params"},
    # What CUDA does (the codes read at the next call), on the CPU.
    "deferred agreement: a missing .grad": {**SGD, "defer": True, "skips": [[0, 0, 0, "conv"]]},
    "deferred agreement: a change every rank made": {
        **SGD,
        "defer": True,
        "events": [[0, 0, "unfreeze", "gate", [0, 1]]],
    },
    # Found by a random draw: the zeros of a disagreement, read on the host
    # (allow_unused), went to the gradients' own .grad (none) for gradients
    # given as themselves.
    "deferred agreement: gradients given as themselves, allow_unused": {
        **SGD,
        "form": "grads",
        "allow_unused": True,
        "defer": True,
        "epochs": [[1, 1]],
        "mismatch": [0, 0, 0, False, "propagate"],
    },
    # Found by a random draw: flat storage's "skip", the device deciding
    # alone, let the NaN through (the kernels can skip a bucket the call filled).
    "deferred agreement: flat storage skips a NaN": {
        **SGD,
        "mode": "flat",
        "nonfinite": "skip",
        "defer": True,
        "epochs": [[1, 2]],
        "nans": [[0, 1, 0]],
    },
    # A gradient in another layout than its segment, in a bf16 buffer: staged
    # in the gradient's own dtype (a stand-in in the buffer's overran it).
    "reordered gradient, bf16 buffer, missing gradient": {
        **SGD,
        "comm_dtype": "bfloat16",
        "allow_unused": True,
        "reorders": [[0, 0, 0]],
        "skips": [[0, 1, 0, "conv"]],
    },
}


@pytest.mark.parametrize("name", list(PINNED))
def test_pinned_combination(name: str) -> None:
    scenario = scenario_from_dict({"seed": len(name), **PINNED[name]})
    outcomes = pool().run(scenario.world, run, scenario, timeout=45)
    assert all(o.status == "ok" for o in outcomes), [o.value for o in outcomes]
    check(scenario, [o.value for o in outcomes])


# -- 8: positions when the store's host is gone ------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stall_with_the_store_on_rank_0(rank: int, world_size: int, port: int) -> str:
    """Rank 0 hosts the store (a tcp:// init) and exits as soon as its own
    error is raised, as a script does; rank 1 stalls; rank 2, with a longer
    deadline, fails after the store is gone."""
    dist.destroy_process_group()  # the harness's: this world is rank 0's
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )
    deadline = {0: 3.0, 1: 30.0, 2: 6.0}[rank]
    sgd = dl.AllReduceSGD(timeout=deadline)
    grads = [torch.ones(5)]
    for step in range(100):
        if rank == 1 and step == 3:
            time.sleep(3600)
        try:
            sgd.sum_and_normalize_gradients(grads)
        except dl.CommunicationError as error:
            if rank == 0:
                print(error, flush=True)
                os._exit(0)  # the store goes with this process
            return str(error)
    return "no failure"


def test_a_stalled_rank_is_named_after_the_store_host_exited() -> None:
    outcomes = run_world_outcomes(
        _stall_with_the_store_on_rank_0, 3, _free_port(), timeout=40, expected=[2]
    )
    assert outcomes[2].status == "ok", outcomes[2].value
    message = outcomes[2].value
    print(message)
    # Rank 2 read everyone's positions before the store went (they are read
    # back every few seconds): rank 1 is named behind, rank 0 beside rank 2.
    found = re.search(
        r"rank 1 (?:last reported|took part in) collective (\d+).*"
        r"ranks 0, 2 waited in collective (\d+) .*as read [\d.]+ s before",
        message,
    )
    assert found, message
    assert int(found[2]) == int(found[1]) + 1


# -- 9: no numpy -------------------------------------------------------------------------

NO_NUMPY = """
import sys
sys.modules["numpy"] = None  # as if not installed: torch runs without it
import torch, distlearn_cuda as dl
model = torch.nn.Linear(3, 2)
opt = torch.optim.Adam(model.parameters())
scheduler = torch.optim.lr_scheduler.StepLR(opt, 2)
model(torch.randn(4, 3)).sum().backward()
opt.step()
sgd = dl.AllReduceSGD()
sgd.synchronize_parameters(model, optimizer=opt, buffers=True, state=scheduler)
sgd.sum_and_normalize_gradients(model)
ea = dl.AllReduceEA(tau=1)
ea.synchronize_parameters(model, optimizer=opt, state=[scheduler])
ea.average_parameters(model)
ea.synchronize_center(model)
print("ok")
"""


def test_runs_where_numpy_is_not_installed() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_NUMPY], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_numpy_is_not_imported_by_the_library() -> None:
    for path in (ROOT / "distlearn_cuda").rglob("*.py"):
        if "examples" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        names = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in (node.names if isinstance(node, ast.Import) else [node])
            if isinstance(alias, ast.alias)
        }
        modules = {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert "numpy" not in names | modules, path
        assert ".numpy()" not in path.read_text(), path


# -- 10: the lowest Python declared ----------------------------------------------------


def _declared_minimum() -> tuple[int, int]:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'requires-python = ">=(\d+)\.(\d+)"', text)
    assert found, "requires-python"
    return int(found[1]), int(found[2])


def test_the_library_uses_nothing_newer_than_the_declared_python() -> None:
    """Compiles every module with the lowest Python declared (pyenv's, where
    present), and checks each name imported from the standard library's
    typing, collections.abc and itertools exists there (``typing.Self`` is
    3.11+). The full suite ran on it as recorded in the README."""
    major, minor = _declared_minimum()
    candidates = sorted(Path.home().glob(f".pyenv/versions/{major}.{minor}.*/bin/python"))
    assert candidates, f"no Python {major}.{minor} under ~/.pyenv (this project's machines have it)"
    python = str(candidates[-1])
    sources = sorted(str(p) for p in (ROOT / "distlearn_cuda").rglob("*.py"))
    compile_all = "import sys\nfor p in sys.argv[1:]: compile(open(p).read(), p, 'exec')"
    compiled = subprocess.run(
        [python, "-c", compile_all, *sources],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert compiled.returncode == 0, compiled.stderr
    wanted: dict[str, set[str]] = {"typing": set(), "collections.abc": set(), "itertools": set()}
    for source in sources:
        for node in ast.walk(ast.parse(Path(source).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in wanted:
                wanted[node.module] |= {alias.name for alias in node.names}
    probe = "import importlib, sys\n" + "".join(
        f"m = importlib.import_module({module!r})\n"
        + "".join(f"assert hasattr(m, {name!r}), ({module!r}, {name!r})\n" for name in names)
        for module, names in wanted.items()
    )
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr


# -- 11: EA's rate ----------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 10, 64])
def test_ea_rate_bound_and_beta(world: int) -> None:
    from distlearn_cuda._tensors.validate import DEFAULT_BETA, check_ea_rate

    bound = 2 / (world + 1)
    assert check_ea_rate(None, None, world) == pytest.approx(DEFAULT_BETA / world)
    assert check_ea_rate(0.9 * bound, None, world) == pytest.approx(0.9 * bound)
    with pytest.raises(ValueError, match=r"cannot be stable.*2 / \(ranks \+ 1\).*Pass beta"):
        check_ea_rate(min(1.0, bound * 1.0001), None, world)
    assert check_ea_rate(None, 0.9, world) == pytest.approx(0.9 / world)
    # The paper's beta is stable below 2p / (p + 1): 0.9 at any p.
    with pytest.raises(ValueError, match="cannot be stable"):
        check_ea_rate(None, 2 * world / (world + 1), world)


def test_the_examples_default_to_a_stable_rate() -> None:
    from distlearn_cuda.examples import common

    args = common.base_parser("test").parse_args([])
    assert args.alpha is None and args.beta is None  # AllReduceEA's default beta


# -- 12: any state ----------------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.epoch = 0
        self.seen = torch.zeros(2)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seen": self.seen.clone(), "tag": ("a", 1.5, None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.seen = state["epoch"], state["seen"].clone()
        assert state["tag"] == ("a", 1.5, None)


def _carry_any_state(rank: int, world_size: int, unsafe: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (rank + 3))
    counter = _Counter()
    sgd = dl.AllReduceSGD()
    for _ in range([3, 1, 2][rank]):  # uneven: rank 0 wins
        model(torch.randn(2, 4)).sum().backward()
        sgd.sum_and_normalize_gradients(model)
        opt.step()
        sched.step()
        counter.epoch += 1
        counter.seen += rank
    if unsafe and rank == 0:
        counter.state_dict = lambda: {"callback": _Counter}  # type: ignore[method-assign]
    before = sched.state_dict()["last_epoch"]
    try:
        sgd.synchronize_parameters(model, optimizer=opt, state=[sched, scaler, counter])
        error = None
    except TypeError as raised:
        error = str(raised)
    return {
        "error": error,
        "before": before,
        "last_epoch": sched.state_dict()["last_epoch"],
        "lr": opt.param_groups[0]["lr"],
        "scale": scaler.get_scale(),
        "counter": (counter.epoch, counter.seen.tolist()),
    }


def test_schedulers_scalers_and_counters_are_carried_from_the_winner() -> None:
    results = run_world(_carry_any_state, 3, False, timeout=60)
    winner = results[0]
    assert winner["before"] == 3
    for result in results:
        assert result["error"] is None
        assert result["last_epoch"] == 3 and result["lr"] == pytest.approx(0.1 * 0.5**3)
        assert result["scale"] == 8.0
        assert result["counter"] == (3, [0.0, 0.0])


def test_state_that_cannot_travel_safely_is_refused_on_every_rank() -> None:
    for result in run_world(_carry_any_state, 3, True, timeout=60):
        assert result["error"] is not None and "cannot be sent safely" in result["error"]
        assert result["last_epoch"] == result["before"]  # nothing loaded


# -- 14: constructing alone ---------------------------------------------------------------


def _alone_then_together(rank: int, world_size: int) -> list[str]:
    seen = []
    if rank == 1:
        try:
            dl.AllReduceSGD(timeout=0.5)
        except dl.CommunicationError as error:
            seen.append(str(error))
    dist.barrier()
    for _ in range(2):  # every later object of the job works
        with dl.AllReduceSGD(timeout=10) as sgd:
            grads = [torch.full((3,), float(rank))]
            sgd.sum_and_normalize_gradients(grads)
            seen.append(str(grads[0].tolist()))
    return seen


def test_an_object_one_rank_makes_alone_fails_there_and_the_next_ones_work() -> None:
    results = run_world(_alone_then_together, 3, timeout=60)
    assert "every rank of the group must make the same objects" in results[1][0]
    assert "ranks [1] did, ranks [0, 2] did not" in results[1][0]
    for result in results:
        assert result[-2:] == ["[1.0, 1.0, 1.0]"] * 2


# -- 6: views keep their parameters' layouts ------------------------------------------------


@pytest.mark.usefixtures("world_of_one")
@pytest.mark.parametrize("mode", ["flat", "views"])
def test_flat_storage_and_bucket_views_keep_channels_last(mode: str) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1))
    model.to(memory_format=torch.channels_last)
    sgd = dl.AllReduceSGD()
    if mode == "flat":
        sgd.use_flat_storage(model)
    else:
        sgd.attach(model, gradient_as_bucket_view=True)
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    model(x).sum().backward()
    sgd.sum_and_normalize_gradients(model)
    for p in model.parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
            assert p.grad.is_contiguous(memory_format=torch.channels_last)


# -- errors every rank raises, EA and synchronizations --------------------------------------


def _ea_rank_changes_its_params(rank: int, world_size: int, asynchronous: bool) -> dict[str, Any]:
    """At the second round, rank 1 passes its parameters in another layout
    (a conv converted to channels_last on that rank only)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(2, 2))
    ea = dl.AllReduceEA(tau=1, timeout=20, asynchronous=asynchronous)
    ea.synchronize_parameters(model)
    ea.average_parameters(model)
    with torch.no_grad():  # a local step: each rank moves away from the center
        for p in model.parameters():
            p.add_(rank + 1.0)
    if rank == 1:
        model[0].to(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in model.parameters()]
    errors = []
    for when, call in (("round", ea.average_parameters), ("next call", ea.synchronize_center)):
        try:
            call(model)  # rank 1's round with a problem; asynchronous: the others' next call
        except ValueError as raised:
            errors.append((when, str(raised)))
            break
    # The round completed among the others, consistently: every center alike.
    center = [c.clone() for c in ea.center.values()]
    moved = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    return {"errors": errors, "center": center, "moved": moved}


@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_ea_rank_whose_params_changed_makes_every_rank_raise(asynchronous: bool) -> None:
    """Synchronous rounds: every rank raises in that round. Asynchronous ones:
    the others see the round's codes when it completes, at their next call."""
    results = run_world(_ea_rank_changes_its_params, 3, asynchronous, timeout=60)
    for rank, result in enumerate(results):
        late = asynchronous and rank != 1
        assert [when for when, _ in result["errors"]] == ["next call" if late else "round"]
        message = result["errors"][0][1]
        assert "rank 1" in message and "structure changed" in message, message
        assert all(
            torch.equal(a, b) for a, b in zip(result["center"], results[0]["center"], strict=True)
        )
    assert not any(results[1]["moved"])  # the rank with the problem: nothing changed
    assert all(results[0]["moved"]) and all(results[2]["moved"])  # the others: their round


def _bad_synchronize_argument(rank: int, world_size: int, algo: str) -> str:
    """Rank 2 passes an optimizer that is not one; the others are right."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = dl.AllReduceSGD(timeout=20) if algo == "sgd" else dl.AllReduceEA(tau=1, timeout=20)
    sync.synchronize_parameters(model)  # bound
    try:
        sync.synchronize_parameters(model, optimizer="adam" if rank == 2 else opt)
    except (TypeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


@pytest.mark.parametrize("algo", ["sgd", "ea"])
def test_one_ranks_bad_synchronize_argument_raises_on_every_rank(algo: str) -> None:
    for message in run_world(_bad_synchronize_argument, 3, algo, timeout=60):
        assert message.startswith("TypeError") and "rank 2" in message, message
        assert "optimizer must be a torch.optim.Optimizer" in message
