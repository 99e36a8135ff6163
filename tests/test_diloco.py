"""dl.DiLoCo in real processes over gloo, against the float64 oracle written
from the DiLoCo and Streaming DiLoCo papers (tests/diloco_reference.py):
every rank's local parameters, the global parameters and the outer momenta
after every step, with uneven steps, fragments, delays, mixing and the
outer optimizer's settings drawn at random.

``DISTLEARN_DILOCO_EXAMPLES=N`` draws N configurations per world size
instead of CI's few.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import asdict, dataclass, replace

import pytest
import torch
from diloco_reference import streaming_diloco_uneven
from multiproc import run_world, run_world_outcomes
from tensor_cases import fresh_seed, needs_gpu

import distlearn_cuda as dl
from distlearn_cuda.diloco import split_fragments

SHAPES = [(3,), (5, 4), (7,), (2, 3, 2), (1,), (6,)]
SIZES = [int(torch.Size(s).numel()) for s in SHAPES]
EXAMPLES = int(os.environ.get("DISTLEARN_DILOCO_EXAMPLES", "3"))


@dataclass(frozen=True)
class Config:
    seed: int
    tau: int
    fragments: int
    delay: int
    mix: float
    outer_lr: float
    momentum: float
    nesterov: bool
    steps: tuple[int, ...]  # inner steps per rank
    end: str  # "global" or "parameters": the synchronization that ends the run
    dtype: str = "float64"  # the params'
    comm_dtype: str | None = None
    nonfinite: str = "propagate"  # no value is non-finite: every mode computes alike
    device: str = "cpu"  # CUDA tensors travel over gloo (NCCL refuses two ranks on one GPU)


def draw(rng: random.Random, world_size: int) -> Config:
    tau = rng.randint(1, 6)
    momentum = rng.choice([0.0, 0.9, 0.5])
    return Config(
        seed=rng.randrange(2**31),
        tau=tau,
        fragments=rng.randint(1, 4),
        delay=rng.randrange(tau),
        mix=rng.choice([0.0, 0.0, 0.3, 0.75]),
        outer_lr=rng.choice([0.7, 1.0, 0.35]),
        momentum=momentum,
        nesterov=momentum > 0 and rng.random() < 0.7,
        steps=tuple(rng.randint(0, 3 * tau + 4) for _ in range(world_size)),
        end=rng.choice(["global", "parameters"]),
        dtype=rng.choice(["float64", "float32"]),
        comm_dtype=rng.choice([None, None, "float64"]),
        nonfinite=rng.choice(["propagate", "skip", "raise"]),
    )


def noise(seed: int, worker: int, step: int) -> list[float]:
    rng = random.Random(f"{seed}/{worker}/{step}")
    return [rng.uniform(-0.1, 0.1) for _ in range(sum(SIZES))]


def initial(seed: int, rank: int) -> list[float]:
    rng = random.Random(f"{seed}/initial/{rank}")
    return [rng.uniform(-1, 1) for _ in range(sum(SIZES))]


def as_tensors(values: list[float]) -> list[torch.Tensor]:
    flat = torch.tensor(values, dtype=torch.float64)
    return [
        part.reshape(shape).clone() for part, shape in zip(flat.split(SIZES), SHAPES, strict=True)
    ]


def flat(tensors: list[torch.Tensor]) -> list[float]:
    return torch.cat([t.reshape(-1) for t in tensors]).tolist()


def _run_configs(rank: int, world_size: int, configs: list[dict]) -> list[dict]:
    results = []
    for raw in configs:
        c = Config(**raw)
        dtype = getattr(torch, c.dtype)
        params = [t.to(c.device, dtype) for t in as_tensors(initial(c.seed, rank))]  # synced below
        diloco = dl.DiLoCo(
            comm_dtype=None if c.comm_dtype is None else getattr(torch, c.comm_dtype),
            nonfinite=c.nonfinite,  # type: ignore[arg-type]
            tau=c.tau,
            fragments=c.fragments,
            delay=c.delay,
            mix=c.mix,
            outer_lr=c.outer_lr,
            momentum=c.momentum,
            nesterov=c.nesterov,
        )
        diloco.synchronize_parameters(params)
        names = diloco.fragment_pieces
        after: dict[int, tuple] = {}
        for t in range(1, c.steps[rank] + 1):
            with torch.no_grad():
                step = as_tensors(noise(c.seed, rank, t))
                for p, n in zip(params, step, strict=True):
                    p.mul_(0.97).add_(n.to(c.device, dtype))
            diloco.average_parameters(params)
            after[t] = (
                flat(params),
                flat(diloco.global_parameters),
                flat(diloco.state_dict()["momenta"]),
            )
        if c.end == "global":
            diloco.synchronize_global(params)
        else:
            diloco.synchronize_parameters(params)
        final = (flat(params), flat(diloco.global_parameters), flat(diloco.state_dict()["momenta"]))
        diloco.close()
        results.append({"names": names, "after": after, "final": final})
    return results


def check(config: Config, rank: int, result: dict) -> None:
    names = [f"params[{i}]" for i in range(len(SHAPES))]
    offsets = [sum(SIZES[:i]) for i in range(len(SHAPES))]
    parts = [
        [offsets[names.index(name)] + k for name, begin, end in fragment for k in range(begin, end)]
        for fragment in result["names"]
    ]

    def inner_step(worker: int, step: int, x: list[float]) -> list[float]:
        return [0.97 * v + n for v, n in zip(x, noise(config.seed, worker, step), strict=True)]

    snapshots, final = streaming_diloco_uneven(
        initial(config.seed, 0),
        config.steps,
        inner_step,
        config.tau,
        parts,
        delay=config.delay,
        mix=config.mix,
        lr=config.outer_lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
    )
    for t, (local, global_, momenta) in result["after"].items():
        want = snapshots[t]
        where = f"rank {rank} after step {t}: {asdict(config)}"
        want_state = (want.local[rank], want.global_params, want.momentum)
        assert_state(where, (local, global_, momenta), want_state, config.dtype)
    want_local = final.global_params if config.end == "parameters" else final.local[rank]
    where = f"rank {rank} at the end: {asdict(config)}"
    want_state = (want_local, final.global_params, final.momentum)
    assert_state(where, result["final"], want_state, config.dtype)


# float32 params: the inner steps round too (the oracle's are float64),
# a few ulps a step over at most 22 steps, amplified by the momentum.
TOLERANCE = {"float64": 1e-9, "float32": 2e-4}


def assert_state(where: str, got: tuple, want: tuple, dtype: str) -> None:
    tol = TOLERANCE[dtype]
    for name, g, w in zip(("local", "global", "momentum"), got, want, strict=True):
        torch.testing.assert_close(
            g, w, rtol=tol, atol=tol, msg=lambda m, name=name: f"{where}: {name}: {m}"
        )


@pytest.mark.parametrize(
    ("world_size", "device"),
    [(2, "cpu"), (3, "cpu"), pytest.param(2, "cuda", marks=needs_gpu)],
)
def test_every_step_matches_the_papers_float64_algorithm(world_size: int, device: str) -> None:
    rng = random.Random(fresh_seed())
    configs = [replace(draw(rng, world_size), device=device) for _ in range(EXAMPLES)]
    results = run_world(_run_configs, world_size, [asdict(c) for c in configs], timeout=120)
    for index, config in enumerate(configs):
        print(f"config {index}: {asdict(config)}")
        for rank in range(world_size):
            check(config, rank, results[rank][index])
        # The global parameters and momenta: bitwise the same on every rank.
        finals = [results[rank][index]["final"] for rank in range(world_size)]
        assert all(f[1:] == finals[0][1:] for f in finals), asdict(config)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_fragments_cover_every_element_once_in_order_and_balanced(count: int) -> None:
    rng = random.Random(fresh_seed())
    sizes = [(rng.choice([0, 1, 7, 64, 300, 5000]), rng.choice([2, 4, 8])) for _ in range(12)]
    runs = split_fragments(sizes, count)
    assert len(runs) == count and all(runs)
    flat = [(p.tensor, e) for run in runs for p in run for e in range(p.begin, p.end)]
    assert flat == [(t, e) for t, (n, _) in enumerate(sizes) for e in range(n)], (sizes, runs)
    total = sum(n * size for n, size in sizes)
    # Each run's bytes within 64 elements of the widest type of its share.
    for run in runs:
        got = sum((p.end - p.begin) * sizes[p.tensor][1] for p in run)
        assert abs(got - total / count) <= 2 * 64 * 8, (sizes, runs)
    # Cuts inside a tensor fall on multiples of 64 elements when they can.
    if total >= count * 64 * 8 * 4:
        assert all(p.begin % 64 == 0 for run in runs for p in run), (sizes, runs)


def test_more_fragments_than_elements_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="fragments=7, but the params have only 6 elements"):
        split_fragments([(1, 4), (2, 4), (3, 4)], 7)
    assert len(split_fragments([(1, 4), (2, 4), (3, 4)], 6)) == 6


# -- checkpoints, overlap, faults, bad input ---------------------------------


def _train(
    rank: int,
    seed: int,
    diloco: dl.DiLoCo,
    params: list[torch.Tensor],
    steps: range,
) -> None:
    for t in steps:
        with torch.no_grad():
            for p, n in zip(params, as_tensors(noise(seed, rank, t)), strict=True):
                p.mul_(0.97).add_(n.to(p.dtype))
        diloco.average_parameters(params)


def _resume(rank: int, world_size: int, seed: int, settings: dict, cut: int, steps: int) -> dict:
    """An uninterrupted run, and one checkpointed after step ``cut`` (an
    exchange in flight) and resumed by a new object: their params, global
    parameters and momenta must be bitwise the same."""
    runs = []
    for interrupted in (False, True):
        params = [t.float() for t in as_tensors(initial(seed, rank))]
        diloco = dl.DiLoCo(**settings)
        diloco.synchronize_parameters(params)
        if interrupted:
            _train(rank, seed, diloco, params, range(1, cut + 1))
            state = diloco.state_dict()
            in_flight = sum(f["in_flight"] is not None for f in state["fragments"])
            saved = [p.clone() for p in params]
            diloco.close()
            del diloco
            params = [torch.full_like(p, float("nan")) for p in params]  # poisoned
            diloco = dl.DiLoCo(**settings)
            diloco.load_state_dict(state)
            # Saved again before the first call: the loaded state, as it was.
            again = diloco.state_dict()
            kept = [again[k] == state[k] for k in ("step", "last_active", "outer_steps")] + [
                torch.equal(a, b)
                for key in ("globals", "momenta")
                for a, b in zip(again[key], state[key], strict=True)
            ]
            for mine, theirs in zip(again["fragments"], state["fragments"], strict=True):
                kept.append(mine["last_send"] == theirs["last_send"])
                kept.append(mine["merges"] == theirs["merges"])
                if theirs["in_flight"] is not None:
                    kept.append(torch.equal(mine["in_flight"]["sum"], theirs["in_flight"]["sum"]))
                if theirs["residual"] is not None:
                    kept.append(torch.equal(mine["residual"], theirs["residual"]))
                    kept.append(bool(theirs["residual"].abs().sum() > 0))  # feedback ran
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
            _train(rank, seed, diloco, params, range(cut + 1, steps + 1))
        else:
            _train(rank, seed, diloco, params, range(1, steps + 1))
        end = diloco.state_dict()
        runs.append([*params, *end["globals"], *end["momenta"]])
        diloco.close()
    same = all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    return {"same": same, "in_flight": in_flight, "kept": all(kept)}


@pytest.mark.parametrize("compression", [None, "int4"])
def test_a_checkpoint_with_an_exchange_in_flight_resumes_bitwise(compression: str | None) -> None:
    seed = fresh_seed()
    # int4: the error feedback's residuals are in the state too.
    settings = {"tau": 5, "fragments": 3, "delay": 2, "mix": 0.5, "compression": compression}
    # Fragment 1 exchanges at steps 1, 6, 11, ...: after step 7 it is in flight.
    results = run_world(_resume, 2, seed, settings, 7, 23, timeout=60)
    assert all(r["in_flight"] >= 1 for r in results), results
    assert all(r["same"] and r["kept"] for r in results), results


def _overlapped_and_not(rank: int, world_size: int, seed: int) -> bool:
    # nonfinite="raise" waits for every allreduce when it starts; with
    # finite values it computes the same: the overlap must not change a bit.
    finals = []
    for nonfinite in ("propagate", "raise"):
        params = [t.float() for t in as_tensors(initial(seed, rank))]
        diloco = dl.DiLoCo(tau=4, fragments=2, delay=3, mix=0.25, nonfinite=nonfinite)
        diloco.synchronize_parameters(params)
        _train(rank, seed, diloco, params, range(1, 18 + 3 * rank))
        diloco.synchronize_global(params)
        finals.append([*params, *diloco.state_dict()["globals"]])
        diloco.close()
    return all(torch.equal(a, b) for a, b in zip(*finals, strict=True))


def test_overlapped_exchanges_are_bitwise_the_waited_ones() -> None:
    assert all(run_world(_overlapped_and_not, 3, fresh_seed(), timeout=60))


def _nan_on_rank_1(rank: int, world_size: int, mode: str) -> dict:
    params = [t.float() for t in as_tensors(initial(5, rank))]
    diloco = dl.DiLoCo(tau=2, nonfinite=mode)
    diloco.synchronize_parameters(params)
    _train(rank, 5, diloco, params, range(1, 3))  # one outer step
    before = [g.clone() for g in diloco.state_dict()["globals"]]
    report: dict = {"error": None}
    with torch.no_grad():
        params[0].add_(0.5)
        if rank == 1:
            params[1][0] = float("nan")
    try:
        diloco.average_parameters(params)
        diloco.average_parameters(params)  # the exchange of step 4
    except FloatingPointError as error:
        report["error"] = str(error)
    after = diloco.state_dict()["globals"]
    report["globals_unchanged"] = all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    report["globals_finite"] = all(bool(g.isfinite().all()) for g in after)
    report["skipped"] = diloco.last_outer_step_skipped
    report["params_are_globals"] = all(
        torch.equal(p, g) for p, g in zip(params, after, strict=True)
    )
    try:
        diloco.synchronize_parameters(params)
        report["synchronized"] = "ok"
    except FloatingPointError as error:
        report["synchronized"] = str(error)
    diloco.close()
    return report


@pytest.mark.parametrize("mode", ["propagate", "skip", "raise"])
def test_a_nan_on_one_rank_gets_the_same_decision_on_every_rank(mode: str) -> None:
    reports = run_world(_nan_on_rank_1, 3, mode, timeout=60)
    for rank, r in enumerate(reports):
        where = f"rank {rank}: {r}"
        if mode == "propagate":
            assert r["error"] is None and not r["globals_finite"], where
            assert "hold NaN or infinite values" in r["synchronized"], where
        elif mode == "skip":
            assert r["error"] is None and r["skipped"] and r["globals_unchanged"], where
            assert r["params_are_globals"], where  # every rank restarts from the globals
            assert r["synchronized"] == "ok", where
        else:
            assert "NaN or infinite outer gradients on 1 of 3 ranks" in r["error"], where
            assert r["globals_unchanged"], where
    assert len({r["error"] for r in reports}) == 1


def _params_change_on_rank_1(rank: int, world_size: int, delay: int) -> dict:
    params = [t.float() for t in as_tensors(initial(3, rank))]
    diloco = dl.DiLoCo(tau=3, delay=delay, fragments=2)
    diloco.synchronize_parameters(params)
    _train(rank, 3, diloco, params, range(1, 6))
    if rank == 1:
        params = [*params[:-1], torch.zeros(6, dtype=torch.float64)]  # its dtype changed
    error = None
    for t in range(6, 12):
        with torch.no_grad():
            for p, n in zip(params, as_tensors(noise(3, rank, t)), strict=True):
                p.mul_(0.97).add_(n.to(p.dtype))
        kept = [p.clone() for p in params]
        try:
            diloco.average_parameters(params)
        except ValueError as raised:
            error = str(raised)
            break
    return {
        "error": error,
        "globals": [g.tolist() for g in diloco.state_dict()["globals"]],
        "untouched": rank != 1 or all(torch.equal(p, k) for p, k in zip(params, kept, strict=True)),
    }


@pytest.mark.parametrize("delay", [0, 2])
def test_a_rank_whose_params_changed_makes_every_rank_raise_alike(delay: int) -> None:
    reports = run_world(_params_change_on_rank_1, 3, delay, timeout=60)
    assert all(r["error"] is not None for r in reports), reports
    assert len({r["error"] for r in reports}) == 1, reports
    assert "on 1 of 3 ranks the params no longer match" in reports[0]["error"]
    assert all(r["globals"] == reports[0]["globals"] for r in reports)
    assert reports[1]["untouched"]


def _peer_fails(rank: int, world_size: int, fault: str) -> dict:
    params = [t.float() for t in as_tensors(initial(9, rank))]
    diloco = dl.DiLoCo(tau=2, fragments=2, delay=1, timeout=DEADLINE_S)
    diloco.synchronize_parameters(params)
    good = None
    for t in range(1, 200):
        if rank == 1 and t == 6:
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        started = time.time()
        try:
            good = [g.clone() for g in diloco.state_dict()["globals"]]
            _train(rank, 9, diloco, params, range(t, t + 1))
        except dl.CommunicationError as error:
            state = diloco.state_dict()  # does not raise after the failure
            diloco.close()
            diloco.close()
            return {
                "step": t,
                "seconds": time.time() - started,
                "message": str(error),
                "last_good": all(
                    torch.equal(a, b) for a, b in zip(state["globals"], good, strict=True)
                ),
            }
    return {"step": None}


DEADLINE_S = 2.0


@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_survivors_raise_within_the_deadline_and_keep_the_last_good_state(fault: str) -> None:
    outcomes = run_world_outcomes(_peer_fails, 3, fault, timeout=40, expected=[0, 2])
    for rank in (0, 2):
        assert outcomes[rank].status == "ok", outcomes[rank].value
        report = outcomes[rank].value
        assert report["step"] is not None, f"rank {rank} never noticed the failure"
        assert report["seconds"] <= DEADLINE_S + 3.0, report
        assert f"failed on rank {rank}" in report["message"], report
        assert report["last_good"], report


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"tau": 0}, ValueError, "tau"),
        ({"tau": 4, "delay": 4}, ValueError, "delay must be below tau"),
        ({"delay": -1}, ValueError, "delay must be >= 0"),
        ({"fragments": 0}, ValueError, "fragments must be >= 1"),
        ({"fragments": 2.0}, TypeError, "fragments must be an int"),
        ({"mix": 1.0}, ValueError, "mix must be finite and in"),
        ({"momentum": 1.0}, ValueError, "momentum must be finite and in"),
        ({"momentum": 0.0}, ValueError, "nesterov=True needs momentum > 0"),
        ({"outer_lr": float("nan")}, ValueError, "outer_lr must be finite"),
        ({"outer_lr": "0.7"}, TypeError, "outer_lr must be a real number"),
        ({"nesterov": 1}, TypeError, "nesterov must be a bool"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
    ],
)
def test_bad_settings_are_refused_naming_the_argument(
    kwargs: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        dl.DiLoCo(**kwargs)


def _first_call_with_too_many_fragments(rank: int, world_size: int) -> str:
    diloco = dl.DiLoCo(tau=2, fragments=6)
    try:
        diloco.average_parameters([torch.zeros(3), torch.zeros(2)])
    except ValueError as error:
        return str(error)
    return "no error"


def test_more_fragments_than_elements_raises_on_every_rank() -> None:
    for message in run_world(_first_call_with_too_many_fragments, 2, timeout=60):
        assert "fragments=6, but the params have only 5 elements" in message


def _module_run(rank: int, world_size: int) -> dict:
    # Options together: a channels_last conv, bf16 exchanges, fragments, an
    # overlap, the non-finite skip, uneven steps, optimizer state carried.
    torch.manual_seed(rank)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(16, 1)
    ).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    diloco = dl.DiLoCo(tau=3, fragments=2, delay=1, nonfinite="skip", comm_dtype=torch.bfloat16)
    diloco.synchronize_parameters(model, optimizer=opt)
    x = torch.randn(8, 3, 4, 4).to(memory_format=torch.channels_last)
    y = torch.randn(8, 1)
    for _ in range(7 + rank):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        diloco.average_parameters(model)
    diloco.synchronize_parameters(model, optimizer=opt)
    weight = diloco.global_parameters["0.weight"]
    return {
        "keys": sorted(diloco.global_parameters),
        "names": diloco.fragment_pieces,
        "channels_last": weight.is_contiguous(memory_format=torch.channels_last)
        and not weight.is_contiguous(),
        "state": {k: v.tolist() for k, v in model.state_dict().items()},
        "moments": opt.state_dict()["state"][0]["exp_avg"].tolist(),
    }


def test_a_channels_last_module_with_every_option_ends_the_same_on_every_rank() -> None:
    reports = run_world(_module_run, 2, timeout=60)
    assert reports[0]["keys"] == ["0.bias", "0.weight", "3.bias", "3.weight"]
    named = {name for pieces in reports[0]["names"] for name, _, _ in pieces}
    assert named == set(reports[0]["keys"]), "fragment_pieces names the global_parameters keys"
    assert reports[0]["channels_last"], "the global parameters keep the params' layout"
    assert reports[0]["state"] == reports[1]["state"]
    assert reports[0]["moments"] == reports[1]["moments"]
    assert reports[0]["names"] == reports[1]["names"]
