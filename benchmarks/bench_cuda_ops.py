"""CUDA kernels and the public API against eager PyTorch on one GPU, in the spirit of nccl-tests.

    python -m benchmarks.bench_cuda_ops [--quick] [--repeats N] [--warmup N]
        [--backend nccl|gloo] [--out DIR] [--no-chart]

One row per tensor list and op. Tensor lists: ResNet-50's 161 parameters
(fp32), GPT-2 small's 148 (fp32, and bf16 with a bf16 buffer), 1000 small
tensors of irregular sizes (fp32; see ``benchmarks.shapes``). Ops:

- ``sgd step``: ``AllReduceSGD().sum_and_normalize_gradients(grads)`` (pack,
  allreduce, unpack and normalize) vs eager ``_flatten_dense_tensors``,
  ``dist.all_reduce``, ``div_`` by the world size, ``_foreach_copy_`` of the
  unflattened views;
- ``ea round``: ``AllReduceEA(tau=1, alpha=0.2).average_parameters(params)``
  (asynchronous, the default: in steady state each call completes the
  previous round's center update, blends, and starts its allreduce)
  vs eager ``_foreach_sub``, ``_foreach_mul_``, ``_foreach_sub_``, flatten,
  ``dist.all_reduce``, ``_foreach_add_`` into the centers;
- ``pack``, ``unpack``, ``ea_blend``, ``center_update``: one kernel of the
  extension (``_C.*_cuda``) with no collective, vs its eager equivalent.

The collectives run in a world of one that the script makes (NCCL, or gloo
with ``--backend gloo``) and tears down at the end.

Time is device time: CUDA events around each call, the median of
``--repeats`` timed calls after ``--warmup`` untimed ones, fused and eager
alternating call by call. Before each call the device is drained, then
given a spin (``torch.cuda._sleep``) that outlasts the call's host work
(twice the longest host time seen in warm-up), so the whole call is queued
when its start event fires, as in a training loop where the host runs
ahead. Calls whose host work outlasted the spin are counted in the notes
(their device time includes waiting for the host). The host's own cost is
its own column: ``perf_counter_ns`` around the call alone, no
synchronization inside, median over the same calls.

L2: each row keeps K copies of every tensor and buffer, fused and eager
alike, and call r uses copy r mod K, so that between two uses of a copy the
other copies touch more than twice the L2 (K is capped to keep them under
40% of device memory; the notes say when the cap bit). Eager temporaries
come from PyTorch's caching allocator and are not rotated.

GB/s counts the minimal bytes (``min_bytes_per_element``): each input read
once, each output written once. The SGD step and EA round rows do not count
the allreduce's own traffic (in a world of one it exchanges nothing; what it
costs on the device is in the time, not in the bytes). "% copy bw" relates
GB/s to ``dst.copy_(src)`` on 256 MiB, timed the same way, counting its
read and its write. Values drift from call to call (the EA rounds pull x and
c together); these streaming ops cost the same for any values, so unlike
the CPU benchmark nothing is reset between calls.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

import distlearn_cuda as dl
from distlearn_cuda import _C
from distlearn_cuda._native import DTYPE_CODES

from .harness import machine_info, markdown_table, write_files
from .shapes import gpt2_small_shapes, resnet50_shapes, small_tensor_shapes

ALPHA = 0.2
SEED = 0
DEFAULT_OUT = Path(__file__).parent / "results"
COPY_BYTES = 256 * 2**20  # the copy-bandwidth source: 256 MiB, 5x an H100's 50 MiB L2
MEMORY_FRACTION = 0.4  # the rotated copies of one row stay under this share of device memory
MIN_LEAD_US = 20.0  # the spin before a call: at least a few launch latencies
MAX_LEAD_US = 50_000.0
LEAD_PER_HOST_US = 2.0  # spin = this times the longest warm-up host time of the row
QUICK_SHRINK = 64  # --quick: every tensor 1/64 the size, as bench_cpu_ops --quick

OPS = ("sgd step", "ea round", "pack", "unpack", "ea_blend", "center_update")

# rtol/atol of the once-before-timing check that fused and eager computed the
# same values. Inputs are N(0, 1). In bf16 eager rounds x - c, alpha (x - c)
# and x - delta to bf16 where the kernel rounds delta and x once each
# (kernels/element_ops.h): a few bf16 ulps apart at |x - c| < 16, so 2^-4.
CHECK_TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 2**-4},
}


def min_bytes_per_element(op: str, param_bytes: int, buffer_bytes: int) -> int:
    """Bytes an op must move per tensor element: each input read once, each output written once.

    P = ``param_bytes`` (parameter or gradient dtype), B = ``buffer_bytes``:
    pack reads P, writes B; unpack reads B, writes P; ea_blend reads x and c
    (2P), writes x and delta (P + B); center_update reads c and the summed
    delta (P + B), writes c (P). The count slots (a few elements per list)
    are left out. An SGD step is pack + unpack; the allreduce between them is
    not counted. An EA round (asynchronous, the default and what is timed)
    folds the previous round's center update into its blend: it reads x, c
    and the previous sum (2P + B) and writes x, c and delta (2P + B), one
    read of c fewer than ea_blend + center_update. Counting those two
    (5P + 2B) put the first GPU run's EA rows above the copy bandwidth.
    """
    p, b = param_bytes, buffer_bytes
    kernels = {"pack": p + b, "unpack": b + p, "ea_blend": 3 * p + b, "center_update": 2 * p + b}
    if op in kernels:
        return kernels[op]
    if op == "sgd step":
        return kernels["pack"] + kernels["unpack"]
    if op == "ea round":
        return 4 * p + 2 * b
    raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")


def copies_for_l2(bytes_per_copy: int, l2_bytes: int) -> int:
    """Smallest K with (K - 1) * bytes_per_copy > 2 * l2_bytes.

    Call r uses copy r mod K, so between two uses of one copy the other K - 1
    copies (fused and eager state) are touched: more than twice the L2
    evicts what the copy left there.
    """
    if bytes_per_copy <= 0:
        raise ValueError(f"bytes_per_copy must be > 0, got {bytes_per_copy}")
    return 2 * l2_bytes // bytes_per_copy + 2


def copies_within(needed: int, bytes_per_copy: int, budget_bytes: int) -> int:
    """``needed``, capped so that all copies fit in ``budget_bytes``; at least 1."""
    return max(1, min(needed, budget_bytes // max(1, bytes_per_copy)))


def lead_us_for(host_us: Sequence[float]) -> float:
    """The spin before each timed call: LEAD_PER_HOST_US times the longest host time,
    clamped to [MIN_LEAD_US, MAX_LEAD_US]."""
    longest = max(host_us, default=0.0)
    return min(MAX_LEAD_US, max(MIN_LEAD_US, LEAD_PER_HOST_US * longest))


@dataclass(frozen=True)
class TensorList:
    """A named list of parameter shapes, all of one dtype (the buffer's too)."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def tensor_lists(quick: bool) -> list[TensorList]:
    """The benchmarked lists; with ``quick``, the same tensor counts at 1/64 the size."""
    lists = [
        TensorList("resnet50", tuple(resnet50_shapes()), torch.float32),
        TensorList("gpt2-small", tuple(gpt2_small_shapes()), torch.float32),
        TensorList("gpt2-small", tuple(gpt2_small_shapes()), torch.bfloat16),
        TensorList("1000 small", tuple(small_tensor_shapes()), torch.float32),
    ]
    if not quick:
        return lists
    return [
        TensorList(
            t.name, tuple((max(1, math.prod(s) // QUICK_SHRINK),) for s in t.shapes), t.dtype
        )
        for t in lists
    ]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Row:
    """One tensor list and op: fused against eager, device and host time."""

    tensor_list: str
    num_tensors: int
    elements: int
    dtype: str
    op: str
    fused_us: float  # median device time per call
    eager_us: float
    fused_host_us: float  # median host time per call
    eager_host_us: float
    min_bytes: int  # per call, min_bytes_per_element * elements
    copy_gbps: float  # dst.copy_(src) in the same run
    copies: int  # K, rotated through for L2
    copies_needed: int  # K that copies_for_l2 asked for (more than copies: memory cap)
    lead_us: float  # the spin before each timed call
    host_over_lead: int  # timed calls (fused or eager) whose host work outlasted the spin
    repeats: int

    @property
    def gbps(self) -> float:
        """Minimal bytes over the fused median time, in 1e9 bytes per second."""
        return self.min_bytes / self.fused_us / 1e3

    @property
    def eager_gbps(self) -> float:
        return self.min_bytes / self.eager_us / 1e3

    @property
    def pct_copy_bw(self) -> float:
        return 100.0 * self.gbps / self.copy_gbps

    @property
    def eager_pct_copy_bw(self) -> float:
        return 100.0 * self.eager_gbps / self.copy_gbps

    @property
    def speedup(self) -> float:
        """Eager median over fused median (device time): above 1, fused is faster."""
        return self.eager_us / self.fused_us

    def record(self) -> dict[str, object]:
        """The row for the JSON: its fields and the derived figures."""
        return asdict(self) | {
            "gbps": self.gbps,
            "eager_gbps": self.eager_gbps,
            "pct_copy_bw": self.pct_copy_bw,
            "eager_pct_copy_bw": self.eager_pct_copy_bw,
            "speedup": self.speedup,
        }


TABLE_HEADER = (
    "tensor list",
    "#tensors",
    "elements",
    "dtype",
    "op",
    "time us",
    "eager us",
    "GB/s",
    "% copy bw",
    "speedup",
    "host us",
    "eager host us",
    "K",
    "notes",
)
_NUMERIC = (False, True, True, False, False, True, True, True, True, True, True, True, True, False)


def row_notes(row: Row) -> str:
    """What makes a row less clean than the method promises; empty when nothing does."""
    notes = []
    if row.copies < row.copies_needed:
        notes.append(f"L2 rotation short: K={row.copies} of {row.copies_needed} (memory cap)")
    if row.host_over_lead:
        notes.append(f"host outran the spin in {row.host_over_lead}/{2 * row.repeats} calls")
    return "; ".join(notes)


def format_row(row: Row) -> list[str]:
    """The table cells of a row."""
    return [
        row.tensor_list,
        str(row.num_tensors),
        f"{row.elements:,}",
        row.dtype,
        row.op,
        f"{row.fused_us:.1f}",
        f"{row.eager_us:.1f}",
        f"{row.gbps:.0f}",
        f"{row.pct_copy_bw:.1f}",
        f"{row.speedup:.2f}x",
        f"{row.fused_host_us:.1f}",
        f"{row.eager_host_us:.1f}",
        str(row.copies),
        row_notes(row),
    ]


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table of the rows."""
    return markdown_table(TABLE_HEADER, [format_row(r) for r in rows], _NUMERIC)


# ---------------------------------------------------------------------------
# Timing

Sample = tuple[float, float]  # (device us, host us) of one call
Timer = Callable[[Callable[[], object]], Sample]


def interleave(
    paths: Sequence[Sequence[Callable[[], object]]], repeats: int, timed: Timer, first: int = 0
) -> list[list[Sample]]:
    """Times ``repeats`` rounds; returns each path's samples in call order.

    ``paths[j][k]`` is path j (fused, then eager) on copy k; all paths have
    the same number K of copies. Round r calls every path once, in order, on
    copy (first + r) mod K, so the paths alternate call by call and see the
    same machine conditions.
    """
    copies = len(paths[0])
    if copies == 0 or any(len(path) != copies for path in paths):
        raise ValueError("every path needs the same number (>= 1) of copies")
    samples: list[list[Sample]] = [[] for _ in paths]
    for r in range(repeats):
        k = (first + r) % copies
        for path, out in zip(paths, samples, strict=True):
            out.append(timed(path[k]))
    return samples


class CudaTimer:
    """Times one call: CUDA events around it on the current stream, host time around it alone."""

    def __init__(self) -> None:
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)
        # A private but long-standing torch API (its own tests use it); without
        # it, calls start right after the drain and pay one launch latency.
        self._sleep: Callable[[int], None] | None = getattr(torch.cuda, "_sleep", None)
        self.cycles_per_us = self._calibrate() if self._sleep is not None else 0.0
        self.lead_us = MIN_LEAD_US

    def __call__(self, fn: Callable[[], object]) -> Sample:
        torch.cuda.synchronize()
        if self._sleep is not None:
            self._sleep(int(self.lead_us * self.cycles_per_us))
        self._start.record()
        begin = time.perf_counter_ns()
        fn()
        host_ns = time.perf_counter_ns() - begin
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end) * 1e3, host_ns / 1e3

    def _calibrate(self) -> float:
        """GPU clock cycles per microsecond of ``torch.cuda._sleep``, measured."""
        assert self._sleep is not None
        cycles = 1_000_000
        self._sleep(cycles)  # the first launch loads the kernel
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            self._start.record()
            self._sleep(cycles)
            self._end.record()
            self._end.synchronize()
            times.append(self._start.elapsed_time(self._end) * 1e3)
        return cycles / statistics.median(times)


def copy_bandwidth_gbps(timer: CudaTimer, warmup: int, repeats: int) -> float:
    """``dst.copy_(src)`` on COPY_BYTES, device to device, read + write bytes per second / 1e9."""
    src = torch.rand(COPY_BYTES // 4, device="cuda")
    dst = torch.empty_like(src)
    paths = [[lambda: dst.copy_(src)]]
    timer.lead_us = MIN_LEAD_US
    interleave(paths, warmup, timer)
    samples = interleave(paths, repeats, timer)[0]
    return 2 * COPY_BYTES / statistics.median(d for d, _ in samples) / 1e3


# ---------------------------------------------------------------------------
# The work: each case holds one copy of a row's fused and eager state.


@dataclass(frozen=True)
class Context:
    """Where a case's tensors live and what its calls are given."""

    device: torch.device
    generator: torch.Generator  # on ``device``
    stream: int  # the cudaStream_t address the kernels are enqueued on
    world_size: int


class Case(Protocol):
    def fused(self) -> None: ...

    def eager(self) -> object: ...

    def check(self) -> None:
        """Runs fused and eager once each; AssertionError if they computed different values."""
        ...


def random_tensors(ctx: Context, tensor_list: TensorList) -> list[torch.Tensor]:
    """Fresh N(0, 1) tensors of the list's shapes and dtype."""
    return [
        torch.randn(s, dtype=tensor_list.dtype, device=ctx.device, generator=ctx.generator)
        for s in tensor_list.shapes
    ]


def clones(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def addresses(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def layout_for(tensors: Sequence[torch.Tensor], buffer_dtype: torch.dtype) -> _C.Layout:
    """The layout the library would plan; one count slot (a world of one needs no more)."""
    codes = [DTYPE_CODES[t.dtype] for t in tensors]
    return _C.Layout([t.numel() for t in tensors], codes, DTYPE_CODES[buffer_dtype], 1)


def segments(layout: _C.Layout, buffer: torch.Tensor) -> torch.Tensor:
    """The buffer's data segments end to end, without padding or count slots."""
    parts = [buffer[o : o + n] for o, n in zip(layout.offsets, layout.numels, strict=True)]
    return torch.cat(parts)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_close(what: str, got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> None:
    """AssertionError naming ``what`` when fused (``got``) and eager values differ."""
    tolerance = CHECK_TOLERANCE[got[0].dtype]
    torch.testing.assert_close(
        list(got),
        list(expected),
        **tolerance,
        msg=lambda detail: f"{what}: fused and eager differ, no speedup to report: {detail}",
    )


def check_count(what: str, layout: _C.Layout, buffer: torch.Tensor) -> None:
    """The kernel wrote count 1 into the (single) count slot."""
    count = float(buffer[layout.count_offset])
    if count != 1.0:
        raise AssertionError(f"{what}: count slot holds {count}, expected 1")


def eager_sgd_step(grads: list[torch.Tensor], world_size: int) -> None:
    """Eager data-parallel step: flatten, allreduce, divide by the world size, copy back."""
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world_size)
    torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))


def eager_ea_blend(
    params: list[torch.Tensor], centers: list[torch.Tensor], alpha: float
) -> torch.Tensor:
    """delta = alpha (x - c), x -= delta; returns the deltas flattened (what is allreduced)."""
    deltas = torch._foreach_sub(params, centers)
    torch._foreach_mul_(deltas, alpha)
    torch._foreach_sub_(params, deltas)
    return _flatten_dense_tensors(deltas)


def eager_ea_round(params: list[torch.Tensor], centers: list[torch.Tensor], alpha: float) -> None:
    """Eager elastic averaging round: blend, allreduce the deltas, c += their sum."""
    flat = eager_ea_blend(params, centers, alpha)
    dist.all_reduce(flat)
    torch._foreach_add_(centers, _unflatten_dense_tensors(flat, centers))


class SgdStep:
    """The public SGD step against eager flatten, all_reduce, div_, _foreach_copy_.

    In a world of one the step returns the gradients unchanged, so its check
    only shows that they survive the round trip; the pack and unpack rows
    check each kernel on its own.
    """

    def __init__(self, ctx: Context, tensor_list: TensorList) -> None:
        self.world_size = ctx.world_size
        self.grads = random_tensors(ctx, tensor_list)
        self.eager_grads = clones(self.grads)
        # One object per copy: an object binds its plan (and buffer) at its first call.
        self.sgd = dl.AllReduceSGD()
        self.fused()

    def fused(self) -> None:
        self.sgd.sum_and_normalize_gradients(self.grads)

    def eager(self) -> None:
        eager_sgd_step(self.eager_grads, self.world_size)

    def check(self) -> None:
        self.fused()
        self.eager()
        check_close("sgd step", self.grads, self.eager_grads)


class EaRound:
    """The public EA round (tau = 1) against the eager round."""

    def __init__(self, ctx: Context, tensor_list: TensorList) -> None:
        self.params = random_tensors(ctx, tensor_list)
        # One object per copy: it binds its plan, and makes its center, at its first call.
        self.ea = dl.AllReduceEA(tau=1, alpha=ALPHA)
        self.ea.average_parameters(self.params)  # the center starts as x: delta 0
        for p in self.params:  # move x off the center, so that rounds have work
            p.normal_(generator=ctx.generator)
        self.centers: list[torch.Tensor] = list(self.ea.center)
        self.eager_params = clones(self.params)
        self.eager_centers = clones(self.centers)

    def fused(self) -> None:
        self.ea.average_parameters(self.params)

    def eager(self) -> None:
        eager_ea_round(self.eager_params, self.eager_centers, ALPHA)

    def check(self) -> None:
        self.fused()
        self.eager()
        check_close("ea round (params)", self.params, self.eager_params)
        # Reading ea.center completes the round's asynchronous center update.
        check_close("ea round (centers)", list(self.ea.center), self.eager_centers)


class Pack:
    """_C.pack_cuda against _flatten_dense_tensors."""

    def __init__(self, ctx: Context, tensor_list: TensorList) -> None:
        self.stream = ctx.stream
        self.tensors = random_tensors(ctx, tensor_list)
        self.eager_tensors = clones(self.tensors)
        self.layout = layout_for(self.tensors, tensor_list.dtype)
        # Zeros: padding is never written and stays 0, as in the library.
        self.buffer = torch.zeros(
            self.layout.buffer_numel, dtype=tensor_list.dtype, device=ctx.device
        )
        self.buffer_ptr = self.buffer.data_ptr()
        self.addresses = addresses(self.tensors)

    def fused(self) -> None:
        _C.pack_cuda(self.layout, self.addresses, self.buffer_ptr, 0, self.stream)

    def eager(self) -> torch.Tensor:
        return _flatten_dense_tensors(self.eager_tensors)

    def check(self) -> None:
        self.fused()
        flat = self.eager()
        check_close("pack", [segments(self.layout, self.buffer)], [flat])
        check_count("pack", self.layout, self.buffer)


class Unpack:
    """_C.unpack_cuda (normalize) against div_ and _foreach_copy_ of the unflattened views."""

    def __init__(self, ctx: Context, tensor_list: TensorList) -> None:
        self.stream = ctx.stream
        self.world_size = ctx.world_size
        source = random_tensors(ctx, tensor_list)
        self.layout = layout_for(source, tensor_list.dtype)
        self.buffer = torch.zeros(
            self.layout.buffer_numel, dtype=tensor_list.dtype, device=ctx.device
        )
        self.buffer_ptr = self.buffer.data_ptr()
        # The buffer as a world of one's allreduce leaves it: values and count 1.
        _C.pack_cuda(self.layout, addresses(source), self.buffer_ptr, 0, self.stream)
        self.flat = _flatten_dense_tensors(source)
        synchronize(ctx.device)  # the pack has read the source before it is freed
        del source
        # NaN targets: an element the kernel skips fails the check.
        self.tensors = [
            torch.full(s, float("nan"), dtype=tensor_list.dtype, device=ctx.device)
            for s in tensor_list.shapes
        ]
        self.eager_tensors = clones(self.tensors)
        self.addresses = addresses(self.tensors)

    def fused(self) -> None:
        _C.unpack_cuda(self.layout, self.addresses, self.buffer_ptr, True, self.stream)

    def eager(self) -> None:
        self.flat.div_(self.world_size)
        views = _unflatten_dense_tensors(self.flat, self.eager_tensors)
        torch._foreach_copy_(self.eager_tensors, views)

    def check(self) -> None:
        self.fused()
        self.eager()
        check_close("unpack", self.tensors, self.eager_tensors)


class EaBlend:
    """_C.ea_blend_cuda against the eager blend (its deltas flattened)."""

    def __init__(self, ctx: Context, tensor_list: TensorList) -> None:
        self.stream = ctx.stream
        self.params = random_tensors(ctx, tensor_list)
        self.centers = random_tensors(ctx, tensor_list)
        self.eager_params = clones(self.params)
        self.eager_centers = clones(self.centers)
        self.layout = layout_for(self.params, tensor_list.dtype)
        self.buffer = torch.zeros(
            self.layout.buffer_numel, dtype=tensor_list.dtype, device=ctx.device
        )
        self.buffer_ptr = self.buffer.data_ptr()
        self.param_addresses = addresses(self.params)
        self.center_addresses = addresses(self.centers)

    def fused(self) -> None:
        _C.ea_blend_cuda(
            self.layout,
            self.param_addresses,
            self.center_addresses,
            self.buffer_ptr,
            ALPHA,
            0,
            self.stream,
        )

    def eager(self) -> torch.Tensor:
        return eager_ea_blend(self.eager_params, self.eager_centers, ALPHA)

    def check(self) -> None:
        self.fused()
        flat = self.eager()
        check_close("ea_blend (params)", self.params, self.eager_params)
        check_close("ea_blend (deltas)", [segments(self.layout, self.buffer)], [flat])
        check_count("ea_blend", self.layout, self.buffer)


class CenterUpdate:
    """_C.center_update_cuda against _foreach_add_ of the unflattened deltas."""

    def __init__(self, ctx: Context, tensor_list: TensorList) -> None:
        self.stream = ctx.stream
        deltas = random_tensors(ctx, tensor_list)
        self.layout = layout_for(deltas, tensor_list.dtype)
        self.buffer = torch.zeros(
            self.layout.buffer_numel, dtype=tensor_list.dtype, device=ctx.device
        )
        self.buffer_ptr = self.buffer.data_ptr()
        # The buffer as the allreduce leaves it: the summed deltas.
        _C.pack_cuda(self.layout, addresses(deltas), self.buffer_ptr, 0, self.stream)
        self.flat = _flatten_dense_tensors(deltas)
        synchronize(ctx.device)  # the pack has read the deltas before they are freed
        del deltas
        self.centers = random_tensors(ctx, tensor_list)
        self.eager_centers = clones(self.centers)
        self.addresses = addresses(self.centers)

    def fused(self) -> None:
        _C.center_update_cuda(self.layout, self.addresses, self.buffer_ptr, self.stream)

    def eager(self) -> None:
        views = _unflatten_dense_tensors(self.flat, self.eager_centers)
        torch._foreach_add_(self.eager_centers, views)

    def check(self) -> None:
        self.fused()
        self.eager()
        check_close("center_update", self.centers, self.eager_centers)


CASES: dict[str, Callable[[Context, TensorList], Case]] = {
    "sgd step": SgdStep,
    "ea round": EaRound,
    "pack": Pack,
    "unpack": Unpack,
    "ea_blend": EaBlend,
    "center_update": CenterUpdate,
}


# ---------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class Settings:
    """What every row is measured with."""

    warmup: int
    repeats: int
    l2_bytes: int
    budget_bytes: int  # the memory a row's copies may take
    copy_gbps: float


def bench_row(
    ctx: Context, tensor_list: TensorList, op: str, timer: CudaTimer, settings: Settings
) -> Row:
    """Builds K copies of the op's state, checks fused against eager once, then times both."""
    make = CASES[op]
    before = torch.cuda.memory_allocated(ctx.device)
    cases = [make(ctx, tensor_list)]
    bytes_per_copy = max(1, torch.cuda.memory_allocated(ctx.device) - before)
    needed = copies_for_l2(bytes_per_copy, settings.l2_bytes)
    copies = copies_within(needed, bytes_per_copy, settings.budget_bytes)
    cases += [make(ctx, tensor_list) for _ in range(copies - 1)]
    cases[0].check()

    paths = [[c.fused for c in cases], [c.eager for c in cases]]
    timer.lead_us = MIN_LEAD_US
    warm = interleave(paths, settings.warmup, timer)
    # The first warm-up call pays one-time costs (allocations, plans): left out.
    timer.lead_us = lead_us_for([h for path in warm for _, h in (path[1:] or path)])
    fused, eager = interleave(paths, settings.repeats, timer, first=settings.warmup)
    del paths, cases, warm
    gc.collect()
    torch.cuda.empty_cache()

    bytes_per_element = min_bytes_per_element(
        op, tensor_list.dtype.itemsize, tensor_list.dtype.itemsize
    )
    return Row(
        tensor_list=tensor_list.name,
        num_tensors=len(tensor_list.shapes),
        elements=tensor_list.numel,
        dtype=dtype_name(tensor_list.dtype),
        op=op,
        fused_us=statistics.median(d for d, _ in fused),
        eager_us=statistics.median(d for d, _ in eager),
        fused_host_us=statistics.median(h for _, h in fused),
        eager_host_us=statistics.median(h for _, h in eager),
        min_bytes=bytes_per_element * tensor_list.numel,
        copy_gbps=settings.copy_gbps,
        copies=copies,
        copies_needed=needed,
        lead_us=timer.lead_us,
        host_over_lead=sum(h > timer.lead_us for _, h in (*fused, *eager)),
        repeats=settings.repeats,
    )


def run(
    quick: bool, warmup: int, repeats: int, backend: str
) -> tuple[list[Row], dict[str, object]]:
    """Measures copy bandwidth, then every row; returns the rows and the run's metadata."""
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    timer = CudaTimer()
    copy_gbps = copy_bandwidth_gbps(timer, warmup, repeats)
    print(f"device-to-device copy ({COPY_BYTES >> 20} MiB): {copy_gbps:.0f} GB/s", flush=True)
    settings = Settings(
        warmup=warmup,
        repeats=repeats,
        l2_bytes=props.L2_cache_size,
        budget_bytes=int(MEMORY_FRACTION * props.total_memory),
        copy_gbps=copy_gbps,
    )
    ctx = Context(
        device=device,
        generator=torch.Generator(device=device).manual_seed(SEED),
        stream=torch.cuda.current_stream(device).cuda_stream,
        world_size=dist.get_world_size(),
    )
    rows: list[Row] = []
    for tensor_list in tensor_lists(quick):
        for op in OPS:
            row = bench_row(ctx, tensor_list, op, timer, settings)
            rows.append(row)
            print(
                f"  {row.tensor_list} {row.dtype} {row.op}: {row.fused_us:.1f} us, "
                f"{row.gbps:.0f} GB/s ({row.pct_copy_bw:.1f}% of copy), {row.speedup:.2f}x",
                flush=True,
            )
    meta = machine_info() | {
        "device": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "device_memory_bytes": props.total_memory,
        "l2_bytes": props.L2_cache_size,
        "cuda": torch.version.cuda,
        "build_info": dl.build_info(),
        "backend": backend,
        "world_size": ctx.world_size,
        "copy_gbps": round(copy_gbps, 1),
        "copy_bytes": COPY_BYTES,
        "copies": {f"{r.tensor_list} {r.dtype} {r.op}": r.copies for r in rows},
        "warmup": warmup,
        "repeats": repeats,
        "sleep_cycles_per_us": round(timer.cycles_per_us, 1),
        "quick": quick,
    }
    return rows, meta


def report_header(meta: dict[str, object]) -> str:
    """The Markdown report's first line: what was measured on, and how."""
    l2 = meta.get("l2_bytes")
    l2_mib = f"{l2 / 2**20:.0f} MiB" if isinstance(l2, int) else "unknown"
    return (
        f"{meta.get('device')} (compute capability {meta.get('compute_capability')}), "
        f"L2 {l2_mib}, copy {meta.get('copy_gbps')} GB/s; "
        f"torch {meta.get('torch')}, CUDA {meta.get('cuda')}, {meta.get('backend')}; "
        f"commit {meta.get('commit')}; {meta.get('date')}; device time median of "
        f"{meta.get('repeats')} calls after {meta.get('warmup')} warm-up; K = copies "
        f"rotated for L2"
    )


def write_cuda_report(
    name: str, rows: Sequence[Row], meta: dict[str, object], out_dir: Path, *, chart: bool = True
) -> dict[str, Path]:
    """Writes ``name``.json, .md and (with ``chart``) .png under ``out_dir``; returns the paths."""
    draw = (lambda path: draw_chart(rows, meta, path)) if chart else None
    records = [row.record() for row in rows]
    return write_files(
        name, meta, records, format_table(rows), out_dir, draw, header=report_header(meta)
    )


def draw_chart(rows: Sequence[Row], meta: dict[str, object], path: Path) -> None:
    """% of copy bandwidth (fused and eager) and speedup, one bar group per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.tensor_list} {r.dtype} {r.op}" for r in rows]
    positions = list(range(len(rows)))
    fig, (bandwidth, speedup) = plt.subplots(
        1, 2, figsize=(12, 1.5 + 0.32 * len(rows)), sharey=True
    )
    bandwidth.barh(
        [p - 0.2 for p in positions],
        [r.pct_copy_bw for r in rows],
        0.4,
        label="distlearn_cuda (fused)",
        color="tab:blue",
    )
    bandwidth.barh(
        [p + 0.2 for p in positions],
        [r.eager_pct_copy_bw for r in rows],
        0.4,
        label="eager PyTorch",
        color="tab:gray",
    )
    bandwidth.axvline(100, color="black", linewidth=0.8)
    bandwidth.set_xlabel("% of dst.copy_(src) bandwidth (minimal bytes, median device time)")
    bandwidth.legend(fontsize=8, loc="lower right")
    speedup.barh(positions, [r.speedup for r in rows], 0.6, color="tab:blue")
    speedup.axvline(1, color="black", linewidth=0.8)
    for p, row in zip(positions, rows, strict=True):
        speedup.annotate(f"{row.speedup:.2f}x", (row.speedup, p), va="center", fontsize=7)
    speedup.set_xlabel("speedup over eager PyTorch (median device time)")
    bandwidth.set_yticks(positions, labels, fontsize=7)
    bandwidth.invert_yaxis()
    fig.suptitle(f"{meta.get('device')}, copy {meta.get('copy_gbps')} GB/s, {meta.get('date')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def missing_requirements(backend: str) -> list[str]:
    """What this machine lacks for the benchmark, one phrase each; empty when nothing."""
    missing = []
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            missing.append(f"a CUDA build of torch (torch {torch.__version__} is CPU-only)")
        else:
            missing.append(
                f"a CUDA GPU (torch {torch.__version__} built for CUDA {torch.version.cuda} "
                f"sees none)"
            )
    if not _C.has_cuda:
        missing.append(
            "the CUDA flavor of distlearn_cuda._C (this one was built without nvcc; "
            "rebuild with DISTLEARN_CUDA=1 pip install --no-build-isolation -e .)"
        )
    if backend == "nccl" and torch.cuda.is_available() and not dist.is_nccl_available():
        missing.append("NCCL in torch.distributed (or pass --backend gloo)")
    return missing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1/64-size tensors, few repeats")
    parser.add_argument("--repeats", type=int, help="timed calls per path (default 30, quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls per path (default 5, quick 2)")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where reports go")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 30
    if args.warmup is None:
        args.warmup = 2 if args.quick else 5
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and writes its reports; 2 (and one line on stderr) without a GPU."""
    args = parse_args(argv)
    missing = missing_requirements(args.backend)
    if missing:
        print(f"bench_cuda_ops needs a GPU; missing: {'; '.join(missing)}", file=sys.stderr)
        return 2
    torch.cuda.set_device(0)
    owns_group = not dist.is_initialized()
    if owns_group:
        # The GPU is bound at init for NCCL (eager communicator); gloo takes none.
        device_id = torch.device("cuda", 0) if args.backend == "nccl" else None
        dist.init_process_group(
            args.backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id
        )
    try:
        rows, meta = run(args.quick, args.warmup, args.repeats, args.backend)
    finally:
        if owns_group:
            dist.destroy_process_group()
    name = "cuda_ops_quick" if args.quick else "cuda_ops"
    paths = write_cuda_report(name, rows, meta, args.out, chart=not args.no_chart)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
