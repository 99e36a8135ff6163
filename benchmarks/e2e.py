"""Shared by the end-to-end training-step benchmarks (``bench_e2e_sgd``, ``bench_e2e_ea``).

A 2-process gloo world on 127.0.0.1 started by the command itself, the two
models, synthetic data, and timing of whole training steps, interleaved
across configurations.

Every configuration (no communication, ours, DDP, ...) owns a model built
from the same seed, an optimizer and the same per-rank batches, so all start
from the same state and do the same local work; they differ only in how the
ranks average. The configurations run one after the other in the same two
processes, in short blocks alternated round after round, so that drift of
the machine affects all of them alike; each block starts with both ranks
aligned by a barrier, so no block pays for the previous one's imbalance.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import itertools
import math
import multiprocessing as mp
import os
import queue
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distlearn_cuda.examples.digits import build_model as build_digits_cnn

from .harness import markdown_table, write_files

__all__ = [
    "BATCH_SIZE",
    "LR",
    "MLP_SIZES",
    "Config",
    "ModelSpec",
    "Row",
    "Timing",
    "Trainer",
    "add_common_arguments",
    "added_percent",
    "block_steps",
    "build_mlp",
    "build_rows",
    "format_rows",
    "format_targets",
    "header",
    "launch",
    "mlp_num_params",
    "model_spec",
    "ratio_chart",
    "resolve_common",
    "run_meta",
    "time_blocks",
    "warm_up",
]

BATCH_SIZE = 32  # per rank
LR = 0.01
MODEL_SEED = 0  # every configuration and rank builds the same initial model
DATA_SEED = 1000  # rank r draws its batches from DATA_SEED + r
NUM_BATCHES = 4  # distinct batches per rank, cycled: data making is never timed
DIGITS_CLASSES = 10
# 1024 -> 4096 -> 4096 -> 1024: 25,175,040 parameters (weights and biases).
MLP_SIZES = (1024, 4096, 4096, 1024)
MLP_QUICK_SIZES = (64, 256, 256, 64)
MODELS = ("digits", "mlp25m")
WORLD_SIZE = 2
COLLECTIVE_TIMEOUT_S = 120  # every collective in a rank; the parent's deadline bounds the run
# Imported once by the forkserver, so that each rank starts without importing
# them again (torch._dynamo: torch.optim imports it on the first step).
PRELOAD = [
    "torch",
    "torch.distributed",
    "torch._dynamo",
    "torch.optim",
    "torch.nn.parallel",
    "distlearn_cuda",
    "benchmarks.e2e",
]


# ---------------------------------------------------------------------------
# Models and data


def mlp_num_params(sizes: Sequence[int]) -> int:
    """Parameters of ``build_mlp(sizes)`` (a weight and a bias per layer), without building it."""
    return sum(n_in * n_out + n_out for n_in, n_out in itertools.pairwise(sizes))


def build_mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given widths with a ReLU between consecutive ones."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        if i > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: how to build it and the shape of its synthetic data."""

    name: str  # as --models spells it
    description: str
    num_params: int
    input_shape: tuple[int, ...]  # one sample's
    num_classes: int
    build: Callable[[], nn.Module]


def model_spec(name: str, quick: bool) -> ModelSpec:
    """The model ``name`` ("digits" or "mlp25m"); with ``quick``, a tiny MLP stands in for 25M."""
    if name == "digits":
        num_params = sum(p.numel() for p in build_digits_cnn().parameters())
        return ModelSpec(
            name,
            "digits CNN (distlearn_cuda.examples.digits), 1x8x8 inputs",
            num_params,
            (1, 8, 8),
            DIGITS_CLASSES,
            build_digits_cnn,
        )
    if name == "mlp25m":
        sizes = MLP_QUICK_SIZES if quick else MLP_SIZES
        return ModelSpec(
            name,
            "MLP " + "-".join(map(str, sizes)) + (" (quick: tiny stand-in)" if quick else ""),
            mlp_num_params(sizes),
            (sizes[0],),
            sizes[-1],
            lambda: build_mlp(sizes),
        )
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def synthetic_batches(spec: ModelSpec, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches: random inputs and labels, different on every rank."""
    generator = torch.Generator().manual_seed(DATA_SEED + rank)
    return [
        (
            torch.randn((BATCH_SIZE, *spec.input_shape), generator=generator),
            torch.randint(spec.num_classes, (BATCH_SIZE,), generator=generator),
        )
        for _ in range(NUM_BATCHES)
    ]


@dataclass
class Trainer:
    """One configuration's training step: zero_grad, forward, backward,
    ``after_backward`` (gradient averaging), optimizer step, ``after_step``
    (parameter averaging).

    ``forward`` is what the step calls: the model, or a wrapper of it (DDP).
    """

    model: nn.Module
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    after_backward: Callable[[], object] | None = None
    after_step: Callable[[], object] | None = None
    steps_taken: int = 0
    # False for gradients that live in communication buffers (bucket views):
    # zeroed in place, as those need, instead of made anew.
    set_to_none: bool = True

    @classmethod
    def fresh(cls, spec: ModelSpec, rank: int) -> Trainer:
        """A model from MODEL_SEED (the same on every rank and for every
        configuration), plain SGD, and this rank's batches."""
        torch.manual_seed(MODEL_SEED)
        model = spec.build()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        return cls(model, model, optimizer, synthetic_batches(spec, rank))

    def step(self) -> None:
        inputs, labels = self.batches[self.steps_taken % len(self.batches)]
        self.steps_taken += 1
        # First, as in PyTorch's examples: PeriodicModelAverager averages
        # only parameters that have a gradient when it is called.
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        nn.functional.cross_entropy(self.forward(inputs), labels).backward()
        if self.after_backward is not None:
            self.after_backward()
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step()

    def parameters(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.model.parameters()]


# ---------------------------------------------------------------------------
# Timing


@dataclass
class Config:
    """A timed configuration. ``finish`` completes work still in flight (an
    asynchronous allreduce) and is timed with the block it ends; blocks hold
    whole ``period``s, so every block of a configuration does the same work."""

    key: str  # stable, for the JSON
    label: str  # for the table
    step: Callable[[], object]
    finish: Callable[[], object] = lambda: None
    period: int = 1


@dataclass
class Timing:
    """A configuration's times in ms: every timed step alone, and every block
    (its steps and ``finish``) divided by its number of steps."""

    step_ms: list[float] = field(default_factory=list)
    block_ms_per_step: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        return {
            "median_step_ms": statistics.median(self.step_ms),
            "min_step_ms": min(self.step_ms),
            "median_block_ms_per_step": statistics.median(self.block_ms_per_step),
            "min_block_ms_per_step": min(self.block_ms_per_step),
            "steps": len(self.step_ms),
            "blocks": len(self.block_ms_per_step),
        }


def block_steps(steps: int, rounds: int, period: int) -> int:
    """Steps per block so that ``rounds`` blocks hold at least ``steps``, in whole periods."""
    if steps < 1 or rounds < 1 or period < 1:
        raise ValueError(f"steps, rounds and period must be >= 1, got {steps}, {rounds}, {period}")
    per_round = -(-steps // rounds)
    return -(-per_round // period) * period


def warm_up(config: Config, steps: int) -> None:
    """Untimed steps (allocator, plans, DDP's buckets), then ``finish``."""
    for _ in range(steps):
        config.step()
    config.finish()


def time_blocks(
    configs: Sequence[Config],
    steps: int,
    rounds: int,
    align: Callable[[], object],
) -> dict[str, Timing]:
    """Times ``rounds`` rounds; in each, every configuration runs one block.

    The order is reversed every other round, so no configuration always
    follows the same one. ``align`` (a barrier) runs untimed before each block.
    """
    timings = {config.key: Timing() for config in configs}
    for round_index in range(rounds):
        order = configs if round_index % 2 == 0 else configs[::-1]
        for config in order:
            timing = timings[config.key]
            length = block_steps(steps, rounds, config.period)
            align()
            block_start = time.perf_counter()
            for _ in range(length):
                start = time.perf_counter()
                config.step()
                timing.step_ms.append((time.perf_counter() - start) * 1e3)
            config.finish()
            timing.block_ms_per_step.append((time.perf_counter() - block_start) * 1e3 / length)
    return timings


# ---------------------------------------------------------------------------
# The 2-process world


def launch(
    target: str, args: tuple[Any, ...], *, timeout: float, world_size: int = WORLD_SIZE
) -> list[Any]:
    """Runs ``target(rank, world_size, *args)`` in ``world_size`` processes; returns
    what each returned, by rank.

    ``target`` is "module:function" (imported in the ranks). Each rank runs
    with one torch thread and the default process group initialized (gloo
    over 127.0.0.1, through a TCPStore this process hosts on a port the OS
    picks). Raises RuntimeError with the ranks' tracebacks if one fails or
    dies, or if the run outlasts ``timeout`` seconds (every rank is then
    killed): it never hangs.
    """
    # Forked from a fresh single-threaded server with torch imported, not
    # from this process (threads: the TCPStore server) and not spawned (an
    # import of torch per rank).
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size + 1,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    results = context.Queue()
    procs = [
        context.Process(
            target=_rank_main,
            args=(target, rank, world_size, store.port, results, args, max(1.0, timeout - 5.0)),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    reports = _collect(procs, results, deadline)
    errors = [f"rank {r}:\n{value}" for r, (status, value) in reports.items() if status != "ok"]
    missing = sorted(set(range(world_size)) - set(reports))
    if missing:
        codes = ", ".join(f"rank {r}: exit code {procs[r].exitcode}" for r in missing)
        late = f" within the {timeout:.0f} s timeout" if time.monotonic() >= deadline else ""
        errors.append(f"no result{late} from ranks {missing} ({codes})")
    if errors:
        raise RuntimeError("\n".join(errors))
    return [reports[rank][1] for rank in range(world_size)]


def _collect(
    procs: list[mp.process.BaseProcess], results: Any, deadline: float
) -> dict[int, tuple[str, Any]]:
    """Reports by rank, until all came, one failed or died, or the deadline;
    then every rank still running is given a moment and killed, and the
    reports sent meanwhile are read too."""
    reports: dict[int, tuple[str, Any]] = {}

    def done() -> bool:
        failed = any(status != "ok" for status, _ in reports.values())
        died = any(p.exitcode not in (None, 0) and r not in reports for r, p in enumerate(procs))
        return len(reports) == len(procs) or failed or died or time.monotonic() >= deadline

    def read(timeout: float | None) -> None:
        rank, status, value = results.get(timeout=timeout) if timeout else results.get_nowait()
        reports[rank] = (status, value)

    try:
        while not done():
            try:
                read(timeout=0.2)
            except queue.Empty:
                continue
    finally:
        all_ok = len(reports) == len(procs) and all(s == "ok" for s, _ in reports.values())
        for proc in procs:
            proc.join(timeout=10.0 if all_ok else 2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        while len(reports) < len(procs):
            try:
                read(timeout=None)
            except queue.Empty:
                break
    return reports


def _rank_main(
    target: str,
    rank: int,
    world_size: int,
    port: int,
    results: Any,
    args: tuple[Any, ...],
    stack_dump_after_s: float,
) -> None:
    # Shortly before the parent's deadline, a rank still running prints every
    # thread's stack to stderr: a hang fails with where it hung.
    faulthandler.dump_traceback_later(stack_dump_after_s, exit=False)
    try:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        torch.set_num_threads(1)  # 2 processes on 2 cores
        module_name, function_name = target.split(":")
        fn = getattr(importlib.import_module(module_name), function_name)
        collective_timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        store = dist.TCPStore(
            "127.0.0.1", port, world_size, is_master=False, timeout=collective_timeout
        )
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=collective_timeout
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", value))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        faulthandler.cancel_dump_traceback_later()


# ---------------------------------------------------------------------------
# Reports


@dataclass(frozen=True)
class Row:
    """One configuration of one model, as measured on rank 0.

    ``ms`` is the benchmark's step time (SGD: median of single steps; EA:
    median over blocks of whole periods of the mean step time) and ``ratio``
    is ``ms`` over the no-communication configuration's ``ms``. A
    configuration this version of the library lacks has ``ms`` None and says
    so in ``note``.
    """

    model: str
    num_params: int
    key: str
    label: str
    tau: int | None
    ms: float | None
    min_ms: float | None
    ratio: float | None
    steps: int
    ms_by_rank: list[float] | None
    note: str = ""

    def record(self) -> dict[str, object]:
        return asdict(self)


def added_percent(ratio: float | None) -> float | None:
    """What a configuration adds to the no-communication step time, in percent."""
    return None if ratio is None else (ratio - 1.0) * 100.0


def format_rows(rows: Sequence[Row], *, with_tau: bool) -> str:
    """The Markdown table of the rows (a tau column with ``with_tau``)."""
    header = ["model", "params"] + (["tau"] if with_tau else [])
    header += ["configuration", "step ms", "min ms", "x no-comm", "added"]
    numeric = [False, True] + ([True] if with_tau else []) + [False, True, True, True, True]
    cells = []
    for row in rows:
        line = [row.model, f"{row.num_params:,}"]
        if with_tau:
            line.append("" if row.tau is None else str(row.tau))
        if row.ms is None or row.min_ms is None or row.ratio is None:
            line += [f"{row.label} ({row.note})", "n/a", "n/a", "n/a", "n/a"]
        else:
            added = added_percent(row.ratio)
            line += [row.label, f"{row.ms:.2f}", f"{row.min_ms:.2f}", f"{row.ratio:.3f}x"]
            line.append(f"{added:+.1f}%")
        cells.append(line)
    return markdown_table(header, cells, numeric)


def ratio_chart(rows: Sequence[Row], title: str, path: Path) -> None:
    """Horizontal bars of every available row's ratio, a panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row.model for row in rows))
    shown = {m: [r for r in rows if r.model == m and r.ratio is not None] for m in models}
    height = 1.5 + 0.3 * max(len(v) for v in shown.values())
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), height), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        model_rows = shown[model]
        labels = [(f"tau={r.tau}: " if r.tau is not None else "") + r.label for r in model_rows]
        ratios = [r.ratio or math.nan for r in model_rows]
        positions = list(range(len(model_rows)))[::-1]
        ax.barh(positions, ratios, color="tab:blue")
        for y, ratio in zip(positions, ratios, strict=True):
            ax.annotate(f"{ratio:.2f}x", (ratio, y), va="center", fontsize=7)
        ax.axvline(1.0, color="tab:gray", linewidth=1)
        ax.set_xlim(0, 1.2 * max(ratios))
        ax.set_yticks(positions, labels, fontsize=7)
        ax.set_xlabel("step time / no-communication step time")
        ax.set_title(f"{model} ({model_rows[0].num_params:,} params)", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_rows(
    spec: ModelSpec,
    per_rank: Sequence[dict[str, Any]],
    entries: Sequence[tuple[str, str, str, int | None]],
    metric: str,
    min_metric: str,
) -> list[Row]:
    """A model's rows from every rank's results, one per entry (timing key,
    key, label, tau), timed against the "local" (no communication) timing.

    A rank's results: ``{"models": {name: {"timings": {timing key:
    Timing.summary()}, "unavailable": {timing key: note}}}}``.
    """
    results = [rank_results["models"][spec.name] for rank_results in per_rank]
    ours = results[0]  # rank 0's times are the report's; both ranks do the same work
    baseline = ours["timings"]["local"][metric]
    rows = []
    for timing_key, key, label, tau in entries:
        summary = ours["timings"].get(timing_key)
        if summary is None:
            note = ours["unavailable"].get(timing_key, "not run")
            rows.append(
                Row(spec.name, spec.num_params, key, label, tau, None, None, None, 0, None, note)
            )
            continue
        rows.append(
            Row(
                spec.name,
                spec.num_params,
                key,
                label,
                tau,
                ms=summary[metric],
                min_ms=summary[min_metric],
                ratio=summary[metric] / baseline,
                steps=int(summary["steps"]),
                ms_by_rank=[r["timings"][timing_key][metric] for r in results],
            )
        )
    return rows


def format_targets(targets: Sequence[dict[str, Any]], quick: bool) -> str:
    """The issue's targets as a Markdown list: what was measured and whether it is met."""
    verdicts = {True: "met", False: "NOT met", None: "n/a"}
    title = "Targets (quick run: tiny sizes, no verdict):" if quick else "Targets:"
    lines = [title]
    lines += [
        f"- {t['model']}: {t['target']}: {t['value']}"
        + ("" if quick else f": {verdicts[t['met']]}")
        for t in targets
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Command line and metadata


def add_common_arguments(
    parser: argparse.ArgumentParser, *, steps: int, quick_steps: int, warmup: int, out: Path
) -> None:
    """The options both benchmarks take; ``resolve_common`` fills the quick defaults."""
    parser.add_argument("--quick", action="store_true", help="tiny MLP, few steps: a smoke run")
    parser.add_argument(
        "--steps",
        type=_positive_int,
        help=f"timed steps per configuration ({steps}, quick {quick_steps})",
    )
    parser.add_argument(
        "--warmup",
        type=_positive_int,
        help=f"untimed steps per configuration first ({warmup}, quick 1)",
    )
    parser.add_argument(
        "--models", type=_model_list, default=list(MODELS), help="comma-separated: digits,mlp25m"
    )
    parser.add_argument("--out", type=Path, default=out, help="where reports go")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--timeout", type=float, help="seconds before the ranks are killed (3600, quick 110)"
    )
    parser.set_defaults(default_steps=(steps, quick_steps), default_warmup=warmup)


def resolve_common(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the options left out with their (quick or full) defaults."""
    steps, quick_steps = args.default_steps
    if args.steps is None:
        args.steps = quick_steps if args.quick else steps
    if args.warmup is None:
        args.warmup = 1 if args.quick else args.default_warmup
    if args.timeout is None:
        args.timeout = 110.0 if args.quick else 3600.0
    return args


def run_meta(
    specs: Sequence[ModelSpec],
    per_rank: Sequence[dict[str, Any]],
    args: argparse.Namespace,
    rounds: int,
) -> dict[str, object]:
    """What the run was, next to machine_info()'s where and when."""
    return {
        "processes": len(per_rank),
        "backend": "gloo",
        "torch_threads": per_rank[0]["torch_threads"],  # each rank's, not this process's
        "batch_size_per_rank": BATCH_SIZE,
        "optimizer": f"SGD, lr {LR}",
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": rounds,
        "quick": args.quick,
        "models": {s.name: {"description": s.description, "params": s.num_params} for s in specs},
    }


def header(meta: dict[str, Any]) -> str:
    """The Markdown report's first paragraph: machine, date, software and the run."""
    models = "; ".join(
        f"{m['description']}: {m['params']:,} params" for m in meta["models"].values()
    )
    quick = " **Quick run: a smoke test, not a measurement.**" if meta["quick"] else ""
    return (
        f"{meta['date']}, {meta['cpu']}, {meta['cores_available']} cores, torch {meta['torch']}, "
        f"commit {meta['commit']}. {meta['processes']} processes over {meta['backend']} on "
        f"127.0.0.1, {meta['torch_threads']} torch thread each; "
        f"batch {meta['batch_size_per_rank']} per rank, {meta['optimizer']}; "
        f"warm-up steps per configuration: {meta['warmup']}; then "
        f"{meta['rounds']} interleaved rounds. Models: {models}. {meta['metric']}.{quick}"
    )


def write_and_print(
    name: str,
    title: str,
    rows: Sequence[Row],
    found: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    args: argparse.Namespace,
    *,
    with_tau: bool,
) -> None:
    """Writes a run's JSON, Markdown and chart (``name``, ``name_quick`` in
    quick mode) under ``args.out``, and prints the table and where it went."""
    name = f"{name}_quick" if args.quick else name
    table = format_rows(rows, with_tau=with_tau) + "\n\n" + format_targets(found, args.quick)
    chart = None if args.no_chart else (lambda path: ratio_chart(rows, title, path))
    paths = write_files(
        name, meta, [row.record() for row in rows], table, args.out, chart, header(meta)
    )
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _model_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"models must be some of {','.join(MODELS)}, got {text!r}")
    return list(dict.fromkeys(names))
