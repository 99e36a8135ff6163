"""The low-bit sum's compute passes (``kernels/low_bit_sum.h``) on one
rank's data, fused and eager, for ``bench_cpu_ops``: quantize the values
plus the error-feedback residual into ``world`` messages (and the new
residual), sum ``world`` messages of a shard, dequantize ``world`` summed
messages. The communication between the passes is left out: the messages
one rank sends stand for those it receives (the same bytes).

The eager baseline is the same work in PyTorch best practice (whole-tensor
ops over a ``(blocks, block)`` view, torchft's quantization structure
without Triton): the integer formats only, whose rounding PyTorch has
(``torch.round``: to nearest, ties to even, as the kernels).

``python -m benchmarks.low_bit_ops`` times each pass alone per format.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from distlearn_cuda import _C
from distlearn_cuda._comm import low_bit
from distlearn_cuda._comm.low_bit import FORMATS

# The eager baseline's formats, with the library's codes and block (one
# block for both).
CODES = {fmt: low_bit._CODES[fmt] for fmt in ("int8", "int4")}
TOPS = {"int8": 127.0, "int4": 7.0}
BLOCK = low_bit._BLOCK["int8"]
assert low_bit._BLOCK["int4"] == BLOCK


def bytes_per_element(fmt: str, world: int) -> float:
    """The passes' minimal bytes per float32 element: quantize reads the
    values and the residual and writes the residual and a message byte
    share m; the sum reads m and writes m / world; dequantize reads m and
    writes the values: 16 + m * (3 + 1 / world)."""
    message = (8 if fmt == "int8" else 4) / 8 + 4 / BLOCK
    return 16 + message * (3 + 1 / world)


class LowBitPasses:
    """Both paths' state, made once; ``fused()`` and ``eager()`` each run
    the three passes, leaving their decoded values and new residual."""

    def __init__(self, fmt: str, values: torch.Tensor, world: int) -> None:
        self.fmt, self.world, self.n = fmt, world, values.numel()
        blocks_per_shard = math.ceil(self.n / world / BLOCK)
        self.shape = _C.LowBitShape(CODES[fmt], BLOCK, blocks_per_shard, world)
        self.padded = self.shape.shard * world
        self.values = values
        self.residual = torch.randn(self.n) * 1e-3
        self.messages = torch.zeros(world * self.shape.message_bytes, dtype=torch.uint8)
        self.summed = torch.zeros(self.shape.message_bytes, dtype=torch.uint8)
        self.fused_residual = torch.zeros(self.n)
        self.fused_values = torch.zeros(self.n)
        self.eager_values = torch.zeros(self.n)
        self.eager_residual = torch.zeros(self.n)

    def fused(self) -> None:
        threads = torch.get_num_threads()
        shape, n = self.shape, self.n
        _C.low_bit_encode(
            shape,
            self.values.data_ptr(),
            self.residual.data_ptr(),
            self.fused_residual.data_ptr(),
            n,
            self.messages.data_ptr(),
            threads,
        )
        _C.low_bit_sum(shape, self.messages.data_ptr(), self.summed.data_ptr(), threads)
        _C.low_bit_decode(shape, self.messages.data_ptr(), n, self.fused_values.data_ptr(), threads)

    def eager(self) -> None:
        top = TOPS[self.fmt]
        corrected = torch.zeros(self.padded)
        torch.add(self.values, self.residual, out=corrected[: self.n])
        codes, scales = self._quantize(corrected, top)
        packed = self._pack(codes)
        decoded = self._dequantize(self._unpack(packed), scales)
        torch.sub(corrected[: self.n], decoded[: self.n], out=self.eager_residual)
        # The sum: every shard's codes stand for a rank's message of one shard.
        shard = self.shape.shard
        rows = self._unpack(packed).view(self.world, shard)
        row_scales = scales.view(self.world, -1)
        total = torch.zeros(shard)
        for r in range(self.world):
            total += self._dequantize(rows[r], row_scales[r])
        self._pack(self._quantize(total, top)[0])
        # Every shard dequantized into the values.
        self.eager_values.copy_(decoded[: self.n])

    def _quantize(self, values: torch.Tensor, top: float) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = values.view(-1, BLOCK)
        scales = blocks.abs().amax(dim=1, keepdim=True) / top
        safe = torch.where(scales == 0, torch.ones_like(scales), scales)
        codes = torch.round(blocks / safe).clamp_(-top, top).to(torch.int8)
        return codes.view(-1), scales.view(-1)

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        if self.fmt == "int8":
            return codes.view(torch.uint8)
        pairs = codes.view(torch.uint8).view(-1, 2)
        return (pairs[:, 0] & 0x0F) | (pairs[:, 1] << 4)

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        if self.fmt == "int8":
            return packed.view(torch.int8)
        signed = packed.view(torch.int8)
        low = (signed << 4) >> 4  # the low nibble, sign-extended
        return torch.stack([low, signed >> 4], dim=1).view(-1)

    def _dequantize(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return (codes.view(-1, BLOCK).float() * scales.view(-1, 1)).view(-1)


def pass_times(n: int = 4_000_000, world: int = 4, repeats: int = 5) -> dict[str, dict[str, float]]:
    """Each pass alone, per format (the library's codes and blocks), on one
    thread: the best of ``repeats`` runs in ns per value (the sum: per
    payload value); with the fused pack and unpack (normalizing) of the
    same values as 16 tensors, and a copy, for scale: what folding the
    quantization into the pack and the dequantization into the unpack
    would save at most is the pack's and the unpack's time."""
    torch.set_num_threads(1)
    values, residual, lost = torch.randn(n), torch.randn(n) * 1e-3, torch.zeros(n)
    out = torch.zeros(n)
    grads = list(torch.randn(n).chunk(16))
    layout = _C.Layout([g.numel() for g in grads], [0] * len(grads), 0, 1)
    buffer = torch.zeros(layout.buffer_numel)
    addresses = [g.data_ptr() for g in grads]

    def best(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) / n * 1e9

    table = {}
    for fmt in FORMATS:
        block = low_bit._BLOCK[fmt]
        shape = _C.LowBitShape(low_bit._CODES[fmt], block, math.ceil(n / world / block), world)
        messages = torch.zeros(world * shape.message_bytes, dtype=torch.uint8)
        summed = torch.zeros(shape.message_bytes, dtype=torch.uint8)
        encode = (shape, values.data_ptr(), residual.data_ptr(), lost.data_ptr(), n)
        table[fmt] = {
            "quantize+EF": best(
                lambda e=encode, m=messages: _C.low_bit_encode(*e, m.data_ptr(), 1)
            ),
            "sum": best(
                lambda s=shape, m=messages, o=summed: _C.low_bit_sum(
                    s, m.data_ptr(), o.data_ptr(), 1
                )
            ),
            "dequantize": best(
                lambda s=shape, m=messages: _C.low_bit_decode(s, m.data_ptr(), n, out.data_ptr(), 1)
            ),
            "pack": best(lambda: _C.pack(layout, addresses, buffer.data_ptr(), 0, 1)),
            "unpack": best(lambda: _C.unpack(layout, addresses, buffer.data_ptr(), True, 1)),
            "copy": best(lambda: out.copy_(values)),
        }
    return table


if __name__ == "__main__":
    for fmt, times in pass_times().items():
        print(fmt + ": " + ", ".join(f"{k} {v:.2f} ns" for k, v in times.items()))
