"""Fused CPU ops against eager PyTorch on a ResNet-50-shaped tensor list.

    python -m benchmarks.bench_cpu_ops [--quick] [--threads N] [--out DIR]

Four comparisons, each timed against its eager baseline in the same run:

- the ops alone: pack + normalize + unpack (SGD's work around the
  allreduce), and EA blend + center update (EA's);
- the full public API in a world of one (gloo): an SGD step
  (``sum_and_normalize_gradients``) and an EA round (``average_parameters``
  with tau = 1), against eager code doing the same work with the same
  ``dist.all_reduce``.

The eager baselines are PyTorch best practice: ``torch._foreach_*`` ops and
``torch._utils._flatten_dense_tensors``. Minimal bytes per fp32 parameter:
SGD 16 (pack reads 4 and writes 4; unpack the same); EA ops 28 (blend reads
x and c, writes x and delta; center update reads c and the sum, writes c);
an EA round 24 (asynchronous, it folds the previous round's center update
into its blend: reads x, c and the sum, writes x, c and delta); DiLoCo's
outer step 36 (the outer gradient reads the local and global params and
writes the buffer; the outer step reads the sum, the global params and the
momenta and writes the three tensors).

The low-bit sum's passes (``low_bit_ops``: quantize with error feedback,
sum a shard, dequantize; int8 and int4, world 4) against the same work in
eager PyTorch: 16 + m * (3 + 1 / world) bytes per element, m a message's
bytes per element (1.03 for int8, 0.53 for int4, block 128).

DiLoCo's eager baseline is the outer step as torchft's DiLoCo takes it,
without its host copies: the outer gradient with ``_foreach_sub``, flattened,
divided by the count, then ``torch.optim.SGD(nesterov=True)`` (foreach)
stepping the global params, and the local params set to them.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

import distlearn_cuda as dl
from distlearn_cuda import _C

from .harness import Comparison, machine_info, summarize, time_interleaved, write_report
from .low_bit_ops import LowBitPasses
from .low_bit_ops import bytes_per_element as low_bit_bytes_per_element
from .shapes import resnet50_shapes

SGD_BYTES_PER_ELEMENT = 16  # fp32: pack 4 + 4, unpack 4 + 4
EA_BYTES_PER_ELEMENT = 28  # fp32: blend 4 * 4, center update 3 * 4
EA_ROUND_BYTES_PER_ELEMENT = 24  # fp32: the folded blend, 6 * 4
DILOCO_BYTES_PER_ELEMENT = 36  # fp32: outer gradient 3 * 4, outer step 6 * 4
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9  # the DiLoCo paper's
ALPHA = 0.2
LOW_BIT_WORLD = 4  # the slow-link benchmark's ranks
DEFAULT_OUT = Path(__file__).parent / "results"


def tensor_shapes(quick: bool) -> list[tuple[int, ...]]:
    """ResNet-50's parameter shapes; with ``quick``, 161 tensors of 1/64 the size."""
    shapes = resnet50_shapes()
    if quick:
        return [(max(1, math.prod(s) // 64),) for s in shapes]
    return shapes


def random_tensors(shapes: list[tuple[int, ...]], generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(s, generator=generator) for s in shapes]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth_gbps(numel: int, repeats: int) -> dict[str, float]:
    """Measured fp32 bandwidths in GB/s of bytes the op names, not bytes the hardware moves.

    ``stream``: in-place ``a += b`` (reads a and b, writes a: 12 B per
    element, and no write-allocate since the written line was just read):
    the yardstick the minimum bytes are priced at. ``copy``: ``dst.copy_(src)``
    (8 B per element named; a write-allocate read of dst comes on top).
    """
    a, b = torch.randn(numel), torch.randn(numel)
    dst = torch.empty(numel)
    return {
        "stream": 12 * numel / median_seconds(lambda: a.add_(b), repeats) / 1e9,
        "copy": 8 * numel / median_seconds(lambda: dst.copy_(b), repeats) / 1e9,
    }


class SgdOps:
    """pack + normalize + unpack of gradients, fused and eager, without communication."""

    def __init__(self, grads: list[torch.Tensor]) -> None:
        self.fused_grads = [g.clone() for g in grads]
        self.eager_grads = [g.clone() for g in grads]
        self.layout = _C.Layout([g.numel() for g in grads], [0] * len(grads), 0, 1)
        self.buffer = torch.zeros(self.layout.buffer_numel)
        self.addresses = [g.data_ptr() for g in self.fused_grads]
        self.one = torch.ones(1)

    def fused(self) -> None:
        threads = torch.get_num_threads()
        _C.pack(self.layout, self.addresses, self.buffer.data_ptr(), 0, threads)
        _C.unpack(self.layout, self.addresses, self.buffer.data_ptr(), True, threads)

    def eager(self) -> None:
        eager_sgd_step(self.eager_grads, self.one, allreduce=None)


def eager_sgd_step(
    grads: list[torch.Tensor],
    one: torch.Tensor,
    allreduce: Callable[[torch.Tensor], object] | None,
) -> None:
    """Eager AllReduceSGD step: flatten with a count, allreduce, divide by the count, copy back."""
    flat = _flatten_dense_tensors([*grads, one])
    if allreduce is not None:
        allreduce(flat)
    data = flat[:-1]
    data.div_(flat[-1])  # a tensor divisor: no host synchronization
    torch._foreach_copy_(grads, _unflatten_dense_tensors(data, grads))


def eager_ea_round(
    params: list[torch.Tensor],
    centers: list[torch.Tensor],
    allreduce: Callable[[torch.Tensor], object] | None,
) -> None:
    """Eager elastic averaging round: delta = alpha (x - c), x -= delta, c += allreduce(delta)."""
    deltas = torch._foreach_sub(params, centers)
    torch._foreach_mul_(deltas, ALPHA)
    torch._foreach_sub_(params, deltas)
    flat = _flatten_dense_tensors(deltas)
    if allreduce is not None:
        allreduce(flat)
    torch._foreach_add_(centers, _unflatten_dense_tensors(flat, centers))


class EaOps:
    """EA blend + center update, fused and eager, without communication.

    Repeated rounds shrink x - c geometrically toward denormals, which would
    slow both paths for reasons unrelated to the ops, so ``reset`` (untimed)
    restores the starting values before each timed round.
    """

    def __init__(self, params: list[torch.Tensor], centers: list[torch.Tensor]) -> None:
        self.start = (params, centers)
        self.fused_x = [p.clone() for p in params]
        self.fused_c = [c.clone() for c in centers]
        self.eager_x = [p.clone() for p in params]
        self.eager_c = [c.clone() for c in centers]
        self.layout = _C.Layout([p.numel() for p in params], [0] * len(params), 0, 1)
        self.buffer = torch.zeros(self.layout.buffer_numel)
        self.x_addresses = [x.data_ptr() for x in self.fused_x]
        self.c_addresses = [c.data_ptr() for c in self.fused_c]

    def reset(self) -> None:
        for xs, cs in ((self.fused_x, self.fused_c), (self.eager_x, self.eager_c)):
            torch._foreach_copy_(xs, self.start[0])
            torch._foreach_copy_(cs, self.start[1])

    def fused(self) -> None:
        threads = torch.get_num_threads()
        buffer = self.buffer.data_ptr()
        _C.ea_blend(self.layout, self.x_addresses, self.c_addresses, buffer, ALPHA, 0, threads)
        _C.center_update(self.layout, self.c_addresses, buffer, threads)

    def eager(self) -> None:
        eager_ea_round(self.eager_x, self.eager_c, allreduce=None)


class DilocoOps:
    """DiLoCo's outer gradient + outer step (mix 0), fused and eager, without
    communication (a world of one: the sum is the rank's own gradient).
    ``reset`` (untimed) restores the starting values before each timed step."""

    def __init__(self, locals_: list[torch.Tensor], globals_: list[torch.Tensor]) -> None:
        self.start = (locals_, globals_)
        self.fused = _FusedOuter(locals_, globals_)
        self.eager_locals = [t.clone() for t in locals_]
        self.eager_globals = [t.clone().requires_grad_() for t in globals_]
        self.optimizer = torch.optim.SGD(
            self.eager_globals, lr=OUTER_LR, momentum=OUTER_MOMENTUM, nesterov=True, foreach=True
        )
        self.count = torch.ones(1)

    def reset(self) -> None:
        self.fused.reset(*self.start)
        torch._foreach_copy_(self.eager_locals, self.start[0])
        with torch.no_grad():
            torch._foreach_copy_(self.eager_globals, self.start[1])

    def eager(self) -> None:
        eager_outer_step(self.eager_locals, self.eager_globals, self.optimizer, self.count)


class _FusedOuter:
    def __init__(self, locals_: list[torch.Tensor], globals_: list[torch.Tensor]) -> None:
        self.locals_ = [t.clone() for t in locals_]
        self.globals_ = [t.clone() for t in globals_]
        self.momenta = [torch.zeros_like(t) for t in globals_]
        self.layout = _C.Layout([t.numel() for t in locals_], [0] * len(locals_), 0, 1)
        self.buffer = torch.zeros(self.layout.buffer_numel)
        self.addresses = [
            [t.data_ptr() for t in g] for g in (self.locals_, self.globals_, self.momenta)
        ]

    def reset(self, locals_: list[torch.Tensor], globals_: list[torch.Tensor]) -> None:
        torch._foreach_copy_(self.locals_, locals_)
        torch._foreach_copy_(self.globals_, globals_)

    def __call__(self) -> None:
        threads, buffer = torch.get_num_threads(), self.buffer.data_ptr()
        _C.outer_gradient(self.layout, *self.addresses[:2], buffer, 0, threads)
        _C.outer_step(
            self.layout, *self.addresses, buffer, OUTER_LR, OUTER_MOMENTUM, True, 0.0, threads
        )


def eager_outer_step(
    locals_: list[torch.Tensor],
    globals_: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    count: torch.Tensor,
    allreduce: Callable[[torch.Tensor], object] | None = None,
) -> None:
    """Eager DiLoCo outer step: the mean of global - local as the globals'
    gradient, a Nesterov SGD step, the locals reset to the globals."""
    with torch.no_grad():
        grads = torch._foreach_sub([g.detach() for g in globals_], locals_)
        flat = _flatten_dense_tensors([*grads, count])
        if allreduce is not None:
            allreduce(flat)
        flat[:-1].div_(flat[-1])
        for g, grad in zip(globals_, _unflatten_dense_tensors(flat[:-1], grads), strict=True):
            g.grad = grad
    optimizer.step()
    with torch.no_grad():
        torch._foreach_copy_(locals_, [g.detach() for g in globals_])


def check_same(case: str, fused: list[torch.Tensor], eager: list[torch.Tensor]) -> None:
    """Fails the benchmark if the two paths did not compute the same thing."""
    for i, (a, b) in enumerate(zip(fused, eager, strict=True)):
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            raise AssertionError(f"{case}: fused and eager differ at tensor {i}")


def run(quick: bool, repeats: int, warmup: int) -> tuple[list[Comparison], dict[str, object]]:
    """Runs all comparisons in a world of one; returns the rows and the run's metadata."""
    generator = torch.Generator().manual_seed(0)
    shapes = tensor_shapes(quick)
    numel = sum(math.prod(s) for s in shapes)
    bandwidth = memory_bandwidth_gbps(numel, repeats)
    rows: list[Comparison] = []

    def compare(
        case: str,
        fused: Callable[[], object],
        eager: Callable[[], object],
        bytes_per_element: float,
        reset: Callable[[], object] | None = None,
    ) -> None:
        fused_ms, eager_ms = time_interleaved(
            fused, eager, warmup=warmup, repeats=repeats, before_each=reset
        )
        rows.append(
            summarize(
                case, fused_ms, eager_ms, round(bytes_per_element * numel), bandwidth["stream"]
            )
        )
        print(f"  {rows[-1].case}: {rows[-1].speedup:.2f}x", flush=True)

    sgd_ops = SgdOps(random_tensors(shapes, generator))
    sgd_ops.fused()
    sgd_ops.eager()
    check_same("SGD ops", sgd_ops.fused_grads, sgd_ops.eager_grads)
    compare("SGD ops: pack+scale+unpack", sgd_ops.fused, sgd_ops.eager, SGD_BYTES_PER_ELEMENT)

    ea_ops = EaOps(random_tensors(shapes, generator), random_tensors(shapes, generator))
    ea_ops.fused()
    ea_ops.eager()
    check_same("EA ops (params)", ea_ops.fused_x, ea_ops.eager_x)
    check_same("EA ops (centers)", ea_ops.fused_c, ea_ops.eager_c)
    compare(
        "EA ops: blend+center update",
        ea_ops.fused,
        ea_ops.eager,
        EA_BYTES_PER_ELEMENT,
        reset=ea_ops.reset,
    )

    diloco_ops = DilocoOps(random_tensors(shapes, generator), random_tensors(shapes, generator))
    diloco_ops.fused()
    diloco_ops.eager()
    check_same("DiLoCo ops (globals)", diloco_ops.fused.globals_, diloco_ops.eager_globals)
    check_same("DiLoCo ops (locals)", diloco_ops.fused.locals_, diloco_ops.eager_locals)
    compare(
        "DiLoCo ops: outer gradient+outer step",
        diloco_ops.fused,
        diloco_ops.eager,
        DILOCO_BYTES_PER_ELEMENT,
        reset=diloco_ops.reset,
    )

    for fmt in ("int8", "int4"):
        passes = LowBitPasses(fmt, random_tensors([(numel,)], generator)[0], LOW_BIT_WORLD)
        passes.fused()
        passes.eager()
        check_same(f"low-bit {fmt} (values)", [passes.fused_values], [passes.eager_values])
        check_same(f"low-bit {fmt} (residual)", [passes.fused_residual], [passes.eager_residual])
        compare(
            f"low-bit sum's passes: {fmt}+EF, world {LOW_BIT_WORLD}",
            passes.fused,
            passes.eager,
            low_bit_bytes_per_element(fmt, LOW_BIT_WORLD),
        )

    group = dist.group.WORLD
    sgd = dl.AllReduceSGD(group)
    api_grads = random_tensors(shapes, generator)
    eager_grads = [g.clone() for g in api_grads]
    one = torch.ones(1)
    compare(
        "SGD step: sum_and_normalize_gradients",
        lambda: sgd.sum_and_normalize_gradients(api_grads),
        lambda: eager_sgd_step(
            eager_grads, one, allreduce=lambda t: dist.all_reduce(t, group=group)
        ),
        SGD_BYTES_PER_ELEMENT,
    )
    check_same("SGD step", api_grads, eager_grads)

    params = random_tensors(shapes, generator)
    ea = dl.AllReduceEA(group, tau=1, alpha=ALPHA)
    ea.synchronize_parameters(params)  # the center starts as a copy of the params
    eager_x = [p.clone() for p in params]
    eager_c = [p.clone() for p in params]
    start = [p.clone() for p in params]

    def reset_params() -> None:
        torch._foreach_copy_(params, start)
        torch._foreach_copy_(eager_x, start)

    compare(
        "EA round: average_parameters, tau=1",
        lambda: ea.average_parameters(params),
        lambda: eager_ea_round(
            eager_x, eager_c, allreduce=lambda t: dist.all_reduce(t, group=group)
        ),
        EA_ROUND_BYTES_PER_ELEMENT,
        reset=reset_params,
    )
    check_same("EA round (params)", params, eager_x)
    check_same("EA round (centers)", list(ea.center), eager_c)

    meta = machine_info() | {
        "tensors": len(shapes),
        "elements": numel,
        "dtype": "float32",
        "stream_gbps": round(bandwidth["stream"], 1),
        "copy_gbps": round(bandwidth["copy"], 1),
        "repeats": repeats,
        "quick": quick,
    }
    return rows, meta


def main(argv: list[str] | None = None) -> list[Comparison]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small tensors, few repeats")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, help="timed runs per path (default 20, quick 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where reports go")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 20)
    warmup = 1 if args.quick else 3

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        rows, meta = run(args.quick, repeats, warmup)
    finally:
        if owns_group:
            dist.destroy_process_group()
    name = "cpu_ops_quick" if args.quick else "cpu_ops"
    paths = write_report(name, rows, meta, args.out, chart=not args.no_chart)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return rows


if __name__ == "__main__":
    main()
