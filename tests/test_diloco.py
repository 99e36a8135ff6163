"""dl.DiLoCo in real processes over gloo, against the float64 oracle written
from the DiLoCo and Streaming DiLoCo papers (tests/diloco_reference.py):
every rank's local parameters, the global parameters and the outer momenta
after every step, with uneven steps, fragments, delays, mixing and the
outer optimizer's settings drawn at random.

``DISTLEARN_DILOCO_EXAMPLES=N`` draws N configurations per world size
instead of CI's few.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import asdict, dataclass

import pytest
import torch
from diloco_reference import streaming_diloco_uneven
from multiproc import run_world
from tensor_cases import fresh_seed

import distlearn_cuda as dl
from distlearn_cuda.diloco import split_fragments

SHAPES = [(3,), (5, 4), (7,), (2, 3, 2), (1,), (6,)]
SIZES = [int(torch.Size(s).numel()) for s in SHAPES]
EXAMPLES = int(os.environ.get("DISTLEARN_DILOCO_EXAMPLES", "4"))


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
        params = as_tensors(initial(c.seed, rank))  # each rank its own: synchronized below
        diloco = dl.DiLoCo(
            tau=c.tau,
            fragments=c.fragments,
            delay=c.delay,
            mix=c.mix,
            outer_lr=c.outer_lr,
            momentum=c.momentum,
            nesterov=c.nesterov,
        )
        diloco.synchronize_parameters(params)
        names = diloco.fragment_names
        after: dict[int, tuple] = {}
        for t in range(1, c.steps[rank] + 1):
            with torch.no_grad():
                step = as_tensors(noise(c.seed, rank, t))
                for p, n in zip(params, step, strict=True):
                    p.mul_(0.97).add_(n)
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
        [offsets[names.index(n)] + k for n in fragment for k in range(SIZES[names.index(n)])]
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
        assert_state(
            where, (local, global_, momenta), (want.local[rank], want.global_params, want.momentum)
        )
    want_local = final.global_params if config.end == "parameters" else final.local[rank]
    where = f"rank {rank} at the end: {asdict(config)}"
    assert_state(where, result["final"], (want_local, final.global_params, final.momentum))


def assert_state(where: str, got: tuple, want: tuple) -> None:
    for name, g, w in zip(("local", "global", "momentum"), got, want, strict=True):
        torch.testing.assert_close(
            g, w, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{where}: {name}: {m}"
        )


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_step_matches_the_papers_float64_algorithm(world_size: int) -> None:
    rng = random.Random(fresh_seed())
    configs = [draw(rng, world_size) for _ in range(EXAMPLES)]
    results = run_world(_run_configs, world_size, [asdict(c) for c in configs], timeout=120)
    for index, config in enumerate(configs):
        print(f"config {index}: {asdict(config)}")
        for rank in range(world_size):
            check(config, rank, results[rank][index])


def test_the_globals_and_momenta_are_bitwise_the_same_on_every_rank() -> None:
    rng = random.Random(fresh_seed())
    configs = [draw(rng, 3) for _ in range(2)]
    results = run_world(_run_configs, 3, [asdict(c) for c in configs], timeout=120)
    for index in range(len(configs)):
        finals = [results[rank][index]["final"] for rank in range(3)]
        assert all(f[1] == finals[0][1] and f[2] == finals[0][2] for f in finals), asdict(
            configs[index]
        )


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_fragments_are_consecutive_nonempty_and_balanced(count: int) -> None:
    rng = random.Random(fresh_seed())
    sizes = [rng.randint(1, 1000) for _ in range(rng.randint(count, 20))]
    bounds = split_fragments(sizes, count)
    assert bounds[0] == 0 and bounds[-1] == len(sizes) and len(bounds) == count + 1
    assert all(a < b for a, b in itertools.pairwise(bounds))
    # Each cut is within one tensor of its share of the total.
    total = sum(sizes)
    for k, cut in enumerate(bounds[1:-1], start=1):
        before = sum(sizes[:cut])
        assert abs(before - total * k / count) <= max(sizes), (sizes, bounds)


def test_more_fragments_than_tensors_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="fragments=4, but the params have only 3 tensors"):
        split_fragments([1, 2, 3], 4)
