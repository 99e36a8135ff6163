"""Where the host's time goes in a call on a GPU: a diagnostic, not a benchmark.

    python -m benchmarks.profile_cuda_host [--calls N] [--out FILE]

An NCCL world of one on cuda:0 and ResNet-50's 161 parameter shapes (fp32),
gradients in place. For each call form: the median host time per call over
``--calls`` calls (``perf_counter_ns`` around the call alone; the device is
drained before each call, outside the timing, so the figure is the host's
own work: an EA round otherwise waits for the previous round's sum, which
with tau=1 back to back is device time), then
the same calls under cProfile, whose 15 costliest functions by own time are
printed. cProfile's overhead inflates every figure; read it for where the
time goes, and the medians (or ``bench_cuda_ops``' host column) for how much.

Also, for scale: the host time of the extension's NCCL allreduce called
alone on ResNet-50's element count, of ``torch.distributed.all_reduce`` on
the same buffer (torch's NCCL), and how many enqueues NCCL answered with
ncclInProgress (each makes the host poll the communicator).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import distlearn_cuda as dl
from distlearn_cuda._comm import nccl as _nccl
from distlearn_cuda._native import DTYPE_CODES

from .shapes import resnet50_shapes


def resnet50_module() -> nn.Module:
    """ResNet-50's parameter shapes on the GPU, each with a gradient in place."""
    module = nn.ParameterList(
        [nn.Parameter(torch.randn(s, device="cuda")) for s in resnet50_shapes()]
    )
    for p in module:
        p.grad = torch.randn_like(p)
    return module


def call_forms() -> dict[str, Callable[[], object]]:
    """One call of each form, each on its own object and module."""
    forms: dict[str, Callable[[], object]] = {}
    module = resnet50_module()
    sgd = dl.AllReduceSGD()
    forms["sgd: sum_and_normalize_gradients(module)"] = lambda: sgd.sum_and_normalize_gradients(
        module
    )
    list_module = resnet50_module()
    grads = [p.grad for p in list_module]
    sgd_list = dl.AllReduceSGD()
    forms["sgd: sum_and_normalize_gradients(list)"] = lambda: sgd_list.sum_and_normalize_gradients(
        grads
    )
    flat_module = resnet50_module()
    flat = dl.AllReduceSGD()
    flat.use_flat_storage(flat_module)
    forms["sgd: flat storage"] = lambda: flat.sum_and_normalize_gradients(flat_module)
    ea_module = resnet50_module()
    ea = dl.AllReduceEA(tau=1, alpha=0.2)
    forms["ea: average_parameters(module), tau=1"] = lambda: ea.average_parameters(ea_module)
    return forms


def host_us(call: Callable[[], object], calls: int) -> float:
    """Median host time of one call, in microseconds."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
    torch.cuda.synchronize()
    return statistics.median(times) / 1000


def profile(call: Callable[[], object], calls: int) -> str:
    """cProfile's 15 costliest functions by own time over ``calls`` calls."""
    profiler = cProfile.Profile()
    for _ in range(calls):
        torch.cuda.synchronize()
        profiler.enable()
        call()
        profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    return text.getvalue()


def in_progress() -> int:
    """ncclInProgress answers so far, over the extension's communicators."""
    return sum(comm.enqueues_in_progress for comm in _nccl.open_communicators())


def bare_allreduces(calls: int) -> list[str]:
    """Host time of one allreduce alone: the extension's, then torch's."""
    buffer = torch.randn(sum(math.prod(s) for s in resnet50_shapes()), device="cuda")
    comms = _nccl.open_communicators()
    if not comms:
        return ["no communicator of the extension is open"]
    comm, code = comms[0], DTYPE_CODES[buffer.dtype]

    def ours() -> None:
        comm.all_reduce_sum(
            buffer.data_ptr(), buffer.numel(), code, torch.cuda.current_stream().cuda_stream, 300.0
        )

    before = in_progress()
    ours_us = host_us(ours, calls)
    answered = in_progress() - before
    torch_us = host_us(lambda: dist.all_reduce(buffer), calls)
    return [
        f"extension's NCCL allreduce alone: median host time {ours_us:.1f} us "
        f"({answered} of {calls} enqueues answered ncclInProgress)",
        f"torch.distributed.all_reduce (NCCL): median host time {torch_us:.1f} us",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        print("profile_cuda_host needs a GPU and NCCL", file=sys.stderr)
        return 2
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0)
    )
    lines = [f"{torch.cuda.get_device_name()}; torch {torch.__version__}; {args.calls} calls"]
    try:
        forms = call_forms()
        for call in forms.values():
            for _ in range(20):  # plans, tables, the communicator
                call()
        for name, call in forms.items():
            before = in_progress()
            median = host_us(call, args.calls)
            lines.append(
                f"{name}: median host time {median:.1f} us "
                f"(ncclInProgress answers: {in_progress() - before})"
            )
        lines += bare_allreduces(args.calls)
        for name, call in forms.items():
            lines += [f"\n=== cProfile: {name}", profile(call, args.calls)]
    finally:
        dist.destroy_process_group()
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
