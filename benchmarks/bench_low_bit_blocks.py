"""The low-bit sum's block size, by measurement (issue 24): for each format
and block size, the bits each value costs on the wire against the error of
one sum over 4 ranks of real gradients.

    python -m benchmarks.bench_low_bit_blocks [--quick] [--out DIR]

The values are, per rank:

- ``init``, ``trained``: the gradients of the slow-link benchmark's
  byte-level transformer (``slow_link_lm``: the Python standard library's
  source as text), one batch each, at initialization and after 200 AdamW
  steps;
- ``outer``: that transformer's DiLoCo outer gradients, what 50 AdamW
  steps on the rank's own batches moved the trained parameters (the
  values DiLoCo's ``compression=`` sends);
- ``conv init``, ``conv trained``: the gradients of the digits example's
  convolutional network (``examples.digits``) on scikit-learn's digits, a
  batch of 64 each, at initialization and after 100 SGD steps.

The sum is the library's (``kernels/low_bit_sum.h`` through ``_C``: each
rank's quantization into messages, each shard's sum in float32 and its
quantization, the dequantization), run in one process: rank j's received
messages are every rank's message j, as the all-to-all delivers them, so
the result is bitwise the distributed one. Error: the relative L2 distance
to the float64 sum of the ranks' float32 values (no error feedback: one
call). Bits per value: 8 * a message's bytes / its values. Time: the three
passes per value, one thread, best of 5.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distlearn_cuda import _C
from distlearn_cuda.examples.data import load_digits
from distlearn_cuda.examples.digits import build_model

from .harness import machine_info, markdown_table, write_files
from .slow_link_lm import ByteLM, ModelShape, loss_of, sample_batch, split_stdlib

FORMATS = {"int8": 0, "int4": 1, "fp8_e4m3": 2, "mxfp4": 3}
BLOCKS = (32, 64, 128, 256)
WORLD = 4
DEFAULT_OUT = Path(__file__).parent / "results"


def rank_gradients(quick: bool) -> dict[str, list[torch.Tensor]]:
    """{"init": [...], "trained": [...], "outer": [...], "conv init": [...],
    "conv trained": [...]}: each rank's flattened values."""
    torch.manual_seed(0)
    # The slow-link benchmark's model; a smaller one for --quick.
    if quick:
        shape = ModelShape(width=32, layers=1, heads=2, context=32)
    else:
        shape = ModelShape(width=64, layers=3, heads=4, context=128)
    model = ByteLM(shape)
    data = torch.frombuffer(bytearray(split_stdlib().train), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(1)

    def loss() -> torch.Tensor:
        return loss_of(model, sample_batch(data, 16, shape.context, generator))

    found = {"init": each_rank_gradient(model, loss)}
    train(model, torch.optim.AdamW(model.parameters(), lr=3e-3), loss, 5 if quick else 200)
    found["trained"] = each_rank_gradient(model, loss)
    found["outer"] = outer_gradients(model, loss, 5 if quick else 50)
    found |= conv_gradients(quick)
    return found


def each_rank_gradient(
    model: torch.nn.Module, loss: Callable[[], torch.Tensor]
) -> list[torch.Tensor]:
    """Each rank's flattened gradient of ``model``, a batch of ``loss`` each."""
    flat = []
    for _ in range(WORLD):
        model.zero_grad()
        loss().backward()
        flat.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    return flat


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: Callable[[], torch.Tensor],
    steps: int,
) -> None:
    """``steps`` steps of ``optimizer``, a batch of ``loss`` each."""
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()


def outer_gradients(
    model: torch.nn.Module, loss: Callable[[], torch.Tensor], inner_steps: int
) -> list[torch.Tensor]:
    """Each rank's DiLoCo outer gradient from ``model``'s parameters: where
    they started minus where ``inner_steps`` AdamW steps (DiLoCo's inner
    optimizer) on the rank's own batches took them."""
    start = [p.detach().clone() for p in model.parameters()]
    flat = []
    for _ in range(WORLD):
        with torch.no_grad():
            for p, s in zip(model.parameters(), start, strict=True):
                p.copy_(s)
        train(model, torch.optim.AdamW(model.parameters(), lr=3e-3), loss, inner_steps)
        moved = [
            (s - p.detach()).reshape(-1) for p, s in zip(model.parameters(), start, strict=True)
        ]
        flat.append(torch.cat(moved))
    return flat


def conv_gradients(quick: bool) -> dict[str, list[torch.Tensor]]:
    """{"conv init": [...], "conv trained": [...]}: the digits example's
    network, each rank's gradient of a batch of 64."""
    torch.manual_seed(2)
    model = build_model()
    train_set, _ = load_digits(0)
    generator = torch.Generator().manual_seed(3)

    def loss() -> torch.Tensor:
        index = torch.randint(0, len(train_set), (64,), generator=generator)
        return torch.nn.functional.cross_entropy(
            model(train_set.images[index]), train_set.labels[index]
        )

    found = {"conv init": each_rank_gradient(model, loss)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, optimizer, loss, 5 if quick else 100)
    found["conv trained"] = each_rank_gradient(model, loss)
    return found


def low_bit_sum(values: list[torch.Tensor], code: int, block: int) -> tuple[torch.Tensor, int]:
    """(the low-bit sum of the ranks' values, bits per value on the wire)."""
    n, world = values[0].numel(), len(values)
    shape = _C.LowBitShape(code, block, math.ceil(n / world / block), world)
    size = shape.message_bytes
    sent = [torch.zeros(world * size, dtype=torch.uint8) for _ in range(world)]
    for rank, v in enumerate(values):
        _C.low_bit_encode(shape, v.data_ptr(), 0, 0, n, sent[rank].data_ptr(), 1)
    gathered = torch.zeros(world * size, dtype=torch.uint8)
    for j in range(world):
        received = torch.cat([s[j * size : (j + 1) * size] for s in sent])
        _C.low_bit_sum(shape, received.data_ptr(), gathered[j * size :].data_ptr(), 1)
    out = torch.zeros(n)
    _C.low_bit_decode(shape, gathered.data_ptr(), n, out.data_ptr(), 1)
    return out, 8 * size / shape.shard


def pass_seconds(values: torch.Tensor, code: int, block: int, repeats: int) -> float:
    """The three passes of one rank, per value: best of ``repeats``."""
    n = values.numel()
    shape = _C.LowBitShape(code, block, math.ceil(n / WORLD / block), WORLD)
    messages = torch.zeros(WORLD * shape.message_bytes, dtype=torch.uint8)
    summed = torch.zeros(shape.message_bytes, dtype=torch.uint8)
    out = torch.zeros(n)
    best = math.inf
    for _ in range(repeats + 1):
        start = time.perf_counter()
        _C.low_bit_encode(shape, values.data_ptr(), 0, 0, n, messages.data_ptr(), 1)
        _C.low_bit_sum(shape, messages.data_ptr(), summed.data_ptr(), 1)
        _C.low_bit_decode(shape, messages.data_ptr(), n, out.data_ptr(), 1)
        best = min(best, time.perf_counter() - start)
    return best / n


def run(quick: bool) -> list[dict[str, object]]:
    torch.set_num_threads(1)
    rows = []
    for kind, values in rank_gradients(quick).items():
        exact = torch.stack([v.double() for v in values]).sum(dim=0)
        big = values[0] if quick else torch.cat(values * 16)  # timing: past the caches
        for fmt, code in FORMATS.items():
            for block in BLOCKS:
                got, bits = low_bit_sum(values, code, block)
                error = float((got.double() - exact).norm() / exact.norm())
                rows.append(
                    {
                        "gradients": kind,
                        "format": fmt,
                        "block": block,
                        "bits_per_value": round(bits, 4),
                        "relative_error": error,
                        "ns_per_value": pass_seconds(big, code, block, 1 if quick else 5) * 1e9,
                    }
                )
                print(f"  {kind} {fmt} block {block}: {bits:.3f} bits, error {error:.4g}")
    return rows


def chart(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(str(r["gradients"]) for r in rows))
    columns = 3
    rows_of_axes = math.ceil(len(kinds) / columns)
    figure, axes = plt.subplots(
        rows_of_axes, columns, figsize=(6 * columns, 4.5 * rows_of_axes), squeeze=False
    )
    for axis in axes.flat[len(kinds) :]:
        axis.set_visible(False)
    for axis, kind in zip(axes.flat, kinds, strict=False):  # the spare axes hidden above
        for fmt in FORMATS:
            mine = [r for r in rows if r["gradients"] == kind and r["format"] == fmt]
            axis.plot(
                [r["bits_per_value"] for r in mine],
                [r["relative_error"] for r in mine],
                marker="o",
                label=fmt,
            )
            for r in mine:
                axis.annotate(str(r["block"]), (r["bits_per_value"], r["relative_error"]))
        axis.set_xlabel("bits per value on the wire")
        axis.set_ylabel("relative L2 error of one 4-rank sum")
        axis.set_yscale("log")
        axis.set_title(f"{kind} gradients (points: block size)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where reports go")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    header = ["gradients", "format", "block", "bits/value", "relative error", "ns/value"]
    table = markdown_table(
        header,
        [
            [
                str(r["gradients"]),
                str(r["format"]),
                str(r["block"]),
                f"{r['bits_per_value']:.3f}",
                f"{r['relative_error']:.4g}",
                f"{r['ns_per_value']:.2f}",
            ]
            for r in rows
        ],
        [False, False, True, True, True, True],
    )
    name = "low_bit_blocks_quick" if args.quick else "low_bit_blocks"
    meta = machine_info() | {"world": WORLD, "quick": args.quick}
    paths = write_files(name, meta, rows, table, args.out, chart=lambda p: chart(rows, p))
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return rows


if __name__ == "__main__":
    main()
