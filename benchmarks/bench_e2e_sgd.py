"""End-to-end SGD training steps: ours against DDP, 2 CPU processes over gloo.

    python -m benchmarks.bench_e2e_sgd [--quick] [--steps N] [--warmup N]
        [--models digits,mlp25m] [--out DIR] [--no-chart] [--timeout S]

The command starts the two ranks itself (127.0.0.1, one torch thread each).
For each model (the digits CNN of ``distlearn_cuda.examples.digits`` on
random 8x8 inputs, and an MLP of 25,175,040 parameters), every rank trains
the same initial model on its own synthetic batches (32 per rank, plain SGD,
lr 0.01) in five configurations:

1. no communication (the local step alone: the baseline);
2. ours: ``sgd.sum_and_normalize_gradients(model)`` after backward;
3. ours overlapped: ``sgd.attach(model, bucket_mb=25.0)`` once, then the
   same call after backward (the allreduces start from autograd hooks
   during backward); reported as not available where the library has no
   ``attach``;
4. ``DistributedDataParallel(model)``, default settings;
5. DDP with ``gradient_as_bucket_view=True``.

Before timing, every configuration takes one step from the same state on
the same batches, and ours, ours overlapped and both DDPs must then hold
the same parameters (and differ from the no-communication model): the
comparison is of the same work. A step is forward, backward, the averaging,
the optimizer step and ``zero_grad``; the reported time is rank 0's median
over the timed steps, taken in blocks of 5 steps alternated across the
configurations, and each configuration's ratio to the baseline's.
"""

from __future__ import annotations

import argparse
import gc
import inspect
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import distlearn_cuda as dl

from . import e2e
from .harness import machine_info

WORKER = "benchmarks.bench_e2e_sgd:run_rank"
BLOCK = 5  # steps per configuration per round
BUCKET_MB = 25.0
METRIC = "median_step_ms"  # of Timing.summary(): every step does the same work
MIN_METRIC = "min_step_ms"
CONFIGS = {  # key: label, in the order of the report
    "local": "no communication",
    "ours": "ours: sum_and_normalize_gradients",
    "ours_overlapped": f"ours overlapped: attach(bucket_mb={BUCKET_MB:g})",
    "ours_bucket_view": "ours overlapped, gradient_as_bucket_view=True",
    "ddp": "DDP (default)",
    "ddp_bucket_view": "DDP, gradient_as_bucket_view=True",
}
# Configurations that average gradients: after one step from the same
# state, all of them hold the same parameters.
AVERAGING = ("ours", "ours_overlapped", "ours_bucket_view", "ddp", "ddp_bucket_view")
NOT_AVAILABLE = "not available in this version"
DEFAULT_OUT = Path(__file__).parent / "results"


def has_overlap() -> bool:
    """Whether this version of the library can overlap the allreduce with backward."""
    return hasattr(dl.AllReduceSGD, "attach")


def has_bucket_view() -> bool:
    """Whether this version's attach can keep gradients in its buckets' buffers."""
    return (
        has_overlap()
        and "gradient_as_bucket_view" in inspect.signature(dl.AllReduceSGD.attach).parameters
    )


def ours_trainer(
    spec: e2e.ModelSpec, rank: int, *, overlapped: bool, bucket_view: bool = False
) -> e2e.Trainer:
    """A trainer whose gradients ``AllReduceSGD`` averages after backward
    (allreduces started during backward with ``overlapped``; gradients in
    the buckets' buffers with ``bucket_view``)."""
    trainer = e2e.Trainer.fresh(spec, rank)
    sgd = dl.AllReduceSGD(timeout=e2e.COLLECTIVE_TIMEOUT_S)
    if bucket_view:
        sgd.attach(trainer.model, bucket_mb=BUCKET_MB, gradient_as_bucket_view=True)
        trainer.set_to_none = False
    elif overlapped:
        sgd.attach(trainer.model, bucket_mb=BUCKET_MB)
    trainer.after_backward = lambda: sgd.sum_and_normalize_gradients(trainer.model)
    return trainer


def ddp_trainer(spec: e2e.ModelSpec, rank: int, *, bucket_view: bool) -> e2e.Trainer:
    """A trainer whose forward goes through DDP (gradients averaged during backward)."""
    trainer = e2e.Trainer.fresh(spec, rank)
    trainer.forward = DistributedDataParallel(trainer.model, gradient_as_bucket_view=bucket_view)
    # Bucket views are zero-copy only while the gradients stay in them.
    trainer.set_to_none = not bucket_view
    return trainer


def build_trainers(spec: e2e.ModelSpec, rank: int) -> dict[str, e2e.Trainer]:
    """Every available configuration's trainer, by key (collective: both ranks
    build them in the same order)."""
    trainers = {
        "local": e2e.Trainer.fresh(spec, rank),
        "ours": ours_trainer(spec, rank, overlapped=False),
    }
    if has_overlap():
        trainers["ours_overlapped"] = ours_trainer(spec, rank, overlapped=True)
    if has_bucket_view():
        trainers["ours_bucket_view"] = ours_trainer(spec, rank, overlapped=True, bucket_view=True)
    trainers["ddp"] = ddp_trainer(spec, rank, bucket_view=False)
    trainers["ddp_bucket_view"] = ddp_trainer(spec, rank, bucket_view=True)
    return trainers


def check_same_step(trainers: dict[str, e2e.Trainer]) -> None:
    """One step of every trainer from the same state; every averaging
    configuration must hold ours' parameters, and those must differ from the
    local step's (the ranks' batches differ, so averaging changed something)."""
    for trainer in trainers.values():
        trainer.step()
    reference = trainers["ours"].parameters()
    for key in AVERAGING:
        if key in trainers:
            for i, (p, q) in enumerate(zip(trainers[key].parameters(), reference, strict=True)):
                torch.testing.assert_close(
                    p, q, msg=lambda m, key=key, i=i: f"{key} vs ours, tensor {i}: {m}"
                )
    local = trainers["local"].parameters()
    if all(torch.equal(p, q) for p, q in zip(local, reference, strict=True)):
        raise AssertionError("ours averaged nothing: its step equals the local step")


def run_rank(
    rank: int, world_size: int, models: list[str], quick: bool, steps: int, warmup: int
) -> dict[str, Any]:
    """One rank's run: for each model, the check, warm-up and interleaved timing."""
    results: dict[str, Any] = {}
    for name in models:
        spec = e2e.model_spec(name, quick)
        trainers = build_trainers(spec, rank)
        check_same_step(trainers)
        configs = [e2e.Config(key, CONFIGS[key], t.step) for key, t in trainers.items()]
        for config in configs:
            e2e.warm_up(config, warmup)
        timings = e2e.time_blocks(configs, steps, rounds_for(steps), dist.barrier)
        results[name] = {
            "timings": {key: timing.summary() for key, timing in timings.items()},
            "unavailable": {
                key: NOT_AVAILABLE
                for key, available in (
                    ("ours_overlapped", has_overlap()),
                    ("ours_bucket_view", has_bucket_view()),
                )
                if not available
            },
        }
        del trainers, configs
        gc.collect()  # the next model's configurations take the memory
    return {"models": results, "torch_threads": torch.get_num_threads()}


def rounds_for(steps: int) -> int:
    """Rounds of BLOCK-step blocks that hold ``steps`` (one longer block when fewer)."""
    return max(1, steps // BLOCK)


def build_rows(specs: list[e2e.ModelSpec], per_rank: list[dict[str, Any]]) -> list[e2e.Row]:
    """The report's rows from every rank's results: rank 0's times, every rank's medians."""
    entries = [(key, key, label, None) for key, label in CONFIGS.items()]
    return [
        row for spec in specs for row in e2e.build_rows(spec, per_rank, entries, METRIC, MIN_METRIC)
    ]


# The targets, each of our overlapped configurations against DDP's
# like it: ours with bucket views vs DDP's (both keep gradients in their
# buffers, zeroed in place), and ours plain vs DDP's default (both let
# zero_grad set them to None).
PAIRS = (
    ("ours_bucket_view", "ddp_bucket_view", False),
    ("ours_overlapped", "ddp", True),
)


def targets(rows: list[e2e.Row]) -> list[dict[str, Any]]:
    """Per model and pair: our step no slower than DDP's with bucket views,
    faster than DDP's default."""
    found = []
    for model in dict.fromkeys(row.model for row in rows):
        by_key = {row.key: row for row in rows if row.model == model}
        for ours_key, ddp_key, strict in PAIRS:
            ours, ddp = by_key.get(ours_key), by_key.get(ddp_key)
            met = None
            if ours and ddp and ours.ms is not None and ddp.ms is not None:
                met = ours.ms < ddp.ms if strict else ours.ms <= ddp.ms
            value = (
                NOT_AVAILABLE
                if met is None
                else f"{ours.ms:.2f} ms ({ours.ratio:.3f}x) vs {ddp.ms:.2f} ms ({ddp.ratio:.3f}x)"
            )
            relation = "<" if strict else "<="
            found.append(
                {
                    "model": model,
                    "target": f"{CONFIGS[ours_key]} {relation} {CONFIGS[ddp_key]}",
                    "value": value,
                    "met": met,
                }
            )
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    e2e.add_common_arguments(parser, steps=60, quick_steps=10, warmup=5, out=DEFAULT_OUT)
    return e2e.resolve_common(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> list[e2e.Row]:
    args = parse_args(argv)
    specs = [e2e.model_spec(name, args.quick) for name in args.models]
    per_rank = e2e.launch(
        WORKER, (args.models, args.quick, args.steps, args.warmup), timeout=args.timeout
    )
    rows = build_rows(specs, per_rank)
    found = targets(rows)
    meta = machine_info() | e2e.run_meta(specs, per_rank, args, rounds_for(args.steps))
    meta |= {"metric": "Rank 0's median step time over the timed steps", "targets": found}
    title = "SGD training step, 2 gloo processes on CPU"
    e2e.write_and_print("e2e_sgd", title, rows, found, meta, args, with_tau=False)
    return rows


if __name__ == "__main__":
    main()
