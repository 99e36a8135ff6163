"""The low-bit sum: a float32 buffer summed over the ranks in 8 or 4 bits.

Values quantized with different scales do not add, and 4-bit sums
overflow, so the network's own reduction cannot sum codes. Instead (issue
24; as torchft's fp8 allreduce, with block scales and error feedback):

1. each rank quantizes its values (plus its error-feedback residual, which
   then becomes what the quantization lost) into codes and a scale per
   block (``kernels/low_bit.h``);
2. an all-to-all gives rank j every rank's codes and scales of shard j
   (the payload cut into ``world`` shards of whole blocks);
3. rank j dequantizes them and sums them in float32, in rank order, and
   quantizes the sum;
4. an all-gather returns every shard's codes and scales, which every rank
   dequantizes into the buffer: the result is bitwise the same everywhere.

Steps 1, 3 and 4 are one pass each over their values
(``kernels/low_bit_sum.h``, which also fixes the messages' layout). The
buffer's tail (count slots, the non-finite flag) is summed exactly by a
small float32 allreduce. 4-bit codes travel two to a byte; MXFP4's
power-of-two scales as one E8M0 byte each (OCP MX v1.0), the others' as
float32. Bytes on the wire per rank and call: 2 * (world - 1) messages of
one shard's codes and scales (``wire_bytes``), against 2 * (world - 1) /
world of the buffer for a ring allreduce: per element, 4.25 bits for
MXFP4 (block 32) and int4 (block 128), 8.25 for int8 (128), 8.125 for
fp8 (256), against 32.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.distributed as dist

from .. import _C

__all__ = [
    "FORMATS",
    "ErrorFeedback",
    "LowBitFormat",
    "LowBitSettings",
    "LowBitSum",
    "check_compression",
]

LowBitFormat = Literal["int8", "int4", "fp8_e4m3", "mxfp4"]
FORMATS: tuple[LowBitFormat, ...] = get_args(LowBitFormat)
# The extension's code of each format (kernels/low_bit.h, LowBitFormat).
_CODES = {"int8": 0, "int4": 1, "fp8_e4m3": 2, "mxfp4": 3}
# Elements per scale, by measurement (benchmarks/bench_low_bit_blocks.py,
# RESULTS.md: one 4-rank sum of a transformer's gradients per format and
# block, its error against its bits; a block worth halving when that cuts
# the error more than the same bits would as code bits, 2^-bits): int4 128
# (64 cut the error 10% for 0.25 bits, where code bits give 16%); int8 128
# (64 cut it 16%: break-even, and int8 with error feedback already trains
# to float32's loss at 128); fp8 256 (its error is its 3-bit mantissa's:
# 128 cut it 1%); MXFP4 32, which OCP MX v1.0 fixes. They held on DiLoCo's
# outer gradients and a conv net's gradients (RESULTS.md, 2026-12-08).
_BLOCK = {"int8": 128, "int4": 128, "fp8_e4m3": 256, "mxfp4": 32}


class LowBitSettings(NamedTuple):
    """A call site's compression (None: exact sums) and error feedback."""

    format: LowBitFormat | None
    error_feedback: bool


def check_compression(
    compression: object, error_feedback: object, comm_dtype: torch.dtype | None
) -> tuple[LowBitFormat | None, bool]:
    """``compression`` (None or one of ``FORMATS``) and ``error_feedback``
    (a bool, or None: on for the 4-bit formats) checked, with the checked
    ``comm_dtype`` they go with (None or float32: the sum quantizes float32
    values); TypeError or ValueError naming the argument."""
    if compression is not None and (not isinstance(compression, str) or compression not in FORMATS):
        raise ValueError(
            f"compression must be None or one of {', '.join(FORMATS)}; got {compression!r}"
        )
    if compression is not None and comm_dtype not in (None, torch.float32):
        raise ValueError(
            f"comm_dtype must be None or torch.float32 with compression={compression!r} "
            f"(the low-bit sum quantizes float32 values), got {comm_dtype}"
        )
    if error_feedback is not None and not isinstance(error_feedback, bool):
        kind = type(error_feedback).__name__
        raise TypeError(f"error_feedback must be a bool or None, got {kind}")
    if error_feedback and compression is None:
        raise ValueError("error_feedback=True needs a compression: nothing else loses values")
    if error_feedback is None:
        error_feedback = compression in ("int4", "mxfp4")
    return compression, error_feedback  # type: ignore[return-value]  # checked above


class LowBitSum:
    """The scratch of one call site's low-bit sum over ``world`` ranks of a
    float32 buffer whose first ``payload`` elements are compressed, made
    once (nothing allocates per call). ``flag``: where the buffer holds the
    non-finite flag (how many ranks' values were not finite), if it has
    one: a flagged sum clears the residual instead of carrying a NaN into
    the call site's later sums."""

    def __init__(
        self,
        fmt: LowBitFormat,
        payload: int,
        world: int,
        rank: int,
        flag: int | None = None,
        padding: torch.Tensor | None = None,
    ) -> None:
        self.format, self.block, self._flag = fmt, _BLOCK[fmt], flag
        self._padding = padding
        self.payload, self.world, self.rank = payload, world, rank
        blocks_per_shard = max(1, math.ceil(payload / world / self.block))
        self._shape = _C.LowBitShape(_CODES[fmt], self.block, blocks_per_shard, world)
        self.shard, self.message = self._shape.shard, self._shape.message_bytes
        self._send = torch.zeros(world * self.message, dtype=torch.uint8)
        self._received = torch.zeros(world * self.message, dtype=torch.uint8)
        self._summed = torch.zeros(self.message, dtype=torch.uint8)
        self._gathered = torch.zeros(world * self.message, dtype=torch.uint8)
        # The residual a call leaves, kept until the call succeeded (no state
        # absorbs a failed collective).
        self._next_residual = torch.zeros(payload)

    @classmethod
    def over(
        cls, fmt: LowBitFormat, layout: _C.Layout, payload: int, world: int, rank: int
    ) -> LowBitSum:
        """The low-bit sum of a plan's buffer laid out as ``layout`` (its
        non-finite flag where the layout puts it), whose first ``payload``
        elements are compressed: the padding between its segments there
        is kept 0 (see ``dequantize_into``)."""
        offsets, numels = layout.offsets, layout.numels
        ends = [*offsets[1:], payload]
        padding = [
            i
            for start, count, end in zip(offsets, numels, ends, strict=True)
            for i in range(min(start + count, payload), min(end, payload))
        ]
        index = torch.tensor(padding, dtype=torch.int64) if padding else None
        return cls(fmt, payload, world, rank, layout.flag_offset, index)

    @property
    def wire_bytes(self) -> int:
        """Bytes this rank sends per call (all-to-all and all-gather), the
        exact tail's allreduce aside."""
        return 2 * (self.world - 1) * self.message

    def quantize_into_messages(self, values: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Step 1: ``values`` (float32, ``payload`` long, contiguous) plus
        ``residual`` into the outgoing messages; what the quantization lost
        is the next residual, taken by ``settle_residual`` once the call
        succeeded."""
        self._check_values("values", values)
        residual_at = next_at = 0
        if residual is not None:
            self._check_values("residual", residual)
            residual_at, next_at = residual.data_ptr(), self._next_residual.data_ptr()
        _C.low_bit_encode(
            self._shape,
            values.data_ptr(),
            residual_at,
            next_at,
            self.payload,
            self._send.data_ptr(),
            torch.get_num_threads(),
        )

    def exchange_shards(self, backend: dist.ProcessGroupGloo) -> dist.Work:
        """Step 2, started: the all-to-all (rank j gets every rank's shard j)."""
        splits = [self.message] * self.world
        options = dist.AllToAllOptions()
        # ProcessGroupGloo's collectives exist at run time, not in torch's stubs.
        return backend.alltoall_base(self._received, self._send, splits, splits, options)  # type: ignore[attr-defined,no-any-return]

    def sum_shard(self) -> None:
        """Step 3: this rank's shard, summed in float32 in rank order and quantized."""
        threads = torch.get_num_threads()
        _C.low_bit_sum(self._shape, self._received.data_ptr(), self._summed.data_ptr(), threads)

    def gather_shards(self, backend: dist.ProcessGroupGloo) -> dist.Work:
        """Step 4's communication, started: every rank's summed shard."""
        return backend._allgather_base(self._gathered, self._summed)  # type: ignore[attr-defined,no-any-return]

    def dequantize_into(self, values: torch.Tensor) -> None:
        """Step 4: the summed shards, dequantized into ``values`` (``payload``
        long). The decode writes every element, the padding between a
        plan's segments too, which must stay 0 (``kernels/layout.h``: no
        pack writes it), and a non-finite block would leave NaN there for
        every later sum (NOTE [Non-finite blocks]): it is zeroed again."""
        self._check_values("values", values)
        _C.low_bit_decode(
            self._shape,
            self._gathered.data_ptr(),
            self.payload,
            values.data_ptr(),
            torch.get_num_threads(),
        )
        if self._padding is not None:
            values.index_fill_(0, self._padding, 0.0)

    def settle_residual(
        self, residual: torch.Tensor, buffer: torch.Tensor, contributed: bool
    ) -> None:
        """After a call that succeeded: zeros when ``buffer``'s summed flag
        says some rank's values were not finite; else, when this rank
        ``contributed`` (its residual went in), what this call's
        quantization lost (error feedback)."""
        if self._flag is not None and float(buffer[self._flag]) > 0:
            residual.zero_()
        elif contributed:
            residual.copy_(self._next_residual)

    def _check_values(self, name: str, values: torch.Tensor) -> None:
        # The passes read raw addresses: a wrong dtype, size or stride would
        # be read as something else.
        if values.dtype != torch.float32 or values.device.type != "cpu":
            raise TypeError(
                f"{name} must be a float32 CPU tensor, got {values.dtype} on {values.device}"
            )
        if values.numel() != self.payload or not values.is_contiguous():
            raise ValueError(f"{name} must be contiguous with {self.payload} elements")


class ErrorFeedback:
    """A call site's error-feedback residual, each rank's own: made once the
    payload's size is known (``make``), and taken from a checkpoint before
    or after that (``load``: at once when made, else kept for ``make``).
    ``what`` names the payload in errors ("params", "gradients")."""

    def __init__(self, what: str) -> None:
        self._what = what
        self.residual: torch.Tensor | None = None
        self._loaded: torch.Tensor | None = None

    def make(self, payload: int) -> torch.Tensor:
        """A residual of ``payload`` zeros, or the one loaded before (its size
        checked), in place of any earlier one."""
        residual = torch.zeros(payload)
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            self._check_fits(loaded, residual)
            residual.copy_(loaded)
        self.residual = residual
        return residual

    def saved(self) -> torch.Tensor | None:
        """A copy for a checkpoint: the residual, or a loaded one not yet made."""
        current = self.residual if self.residual is not None else self._loaded
        return None if current is None else current.clone()

    def check(self, residual: torch.Tensor) -> None:
        """ValueError unless a saved ``residual`` fits the one made (if any)."""
        if self.residual is not None:
            self._check_fits(residual, self.residual)

    def load(self, residual: torch.Tensor) -> None:
        """Takes a saved residual: now when made (checked), else at ``make``."""
        if self.residual is None:
            self._loaded = residual.detach().clone()
            return
        self._check_fits(residual, self.residual)
        self.residual.copy_(residual)

    def _check_fits(self, residual: torch.Tensor, current: torch.Tensor) -> None:
        if residual.shape != current.shape:
            raise ValueError(f"state['residual'] does not fit the bound {self._what}")
