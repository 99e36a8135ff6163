"""The low-bit sum: a float32 buffer summed over the ranks in 8 or 4 bits.

Values quantized with different scales do not add, and 4-bit sums
overflow, so the network's own reduction cannot sum codes. Instead (issue
24; as torchft's fp8 allreduce, with block scales and error feedback):

1. each rank quantizes its values (plus its error-feedback residual, which
   then becomes what the quantization lost) into codes and a float32 scale
   per block (``kernels/low_bit.h``);
2. an all-to-all gives rank j every rank's codes and scales of shard j
   (the payload cut into ``world`` shards of whole blocks);
3. rank j dequantizes them and sums them in float32, in rank order, and
   quantizes the sum;
4. an all-gather returns every shard's codes and scales, which every rank
   dequantizes into the buffer: the result is bitwise the same everywhere.

The buffer's tail (count slots, the non-finite flag) is summed exactly by
a small float32 allreduce. 4-bit codes travel two to a byte; MXFP4's
power-of-two scales as one E8M0 byte each (OCP MX v1.0), the others' as
float32. Bytes on the wire per rank and call: 2 * (world - 1) messages of
one shard's codes and scales (``wire_bytes``), against 2 * (world - 1) /
world of the buffer for a ring allreduce: per element, 4.25 bits for
MXFP4 (block 32) and int4 (block 128), 8.25 for int8 and fp8, against 32.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.distributed as dist

from .. import _C

__all__ = ["FORMATS", "LowBitFormat", "LowBitSettings", "LowBitSum", "check_compression"]

LowBitFormat = Literal["int8", "int4", "fp8_e4m3", "mxfp4"]
FORMATS: tuple[LowBitFormat, ...] = get_args(LowBitFormat)
# (the extension's format code, bits per code) of each format.
_CODECS = {"int8": (0, 8), "int4": (1, 4), "fp8_e4m3": (2, 8), "mxfp4": (3, 4)}
# Elements per scale: OCP MX v1.0 fixes 32 for MXFP4; the others take 128,
# where a float32 scale costs 0.25 bits per element.
_BLOCK = {"int8": 128, "int4": 128, "fp8_e4m3": 128, "mxfp4": 32}


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
        self, fmt: LowBitFormat, payload: int, world: int, rank: int, flag: int | None = None
    ) -> None:
        self.format, (self._code, self._bits) = fmt, _CODECS[fmt]
        self._flag = flag
        self.block = _BLOCK[fmt]
        self.payload, self.world, self.rank = payload, world, rank
        blocks_per_shard = max(1, math.ceil(payload / world / self.block))
        self.shard = blocks_per_shard * self.block
        padded = self.shard * world
        self._values = torch.zeros(padded)
        self._codes = torch.zeros(padded, dtype=torch.uint8)
        self._scales = torch.zeros(padded // self.block)
        self._decoded = torch.zeros(padded)
        # The residual a call leaves, kept until the call succeeded (no state
        # absorbs a failed collective).
        self._next_residual = torch.zeros(payload)
        code_bytes = self.shard * self._bits // 8
        # One shard's message: its codes (two 4-bit codes a byte), then its
        # scales (E8M0 bytes for MXFP4, float32 otherwise).
        self._scale_bytes = 1 if fmt == "mxfp4" else 4
        self.message = code_bytes + self._scale_bytes * blocks_per_shard
        self._code_bytes = code_bytes
        self._send = torch.zeros(world * self.message, dtype=torch.uint8)
        self._received = torch.zeros(world * self.message, dtype=torch.uint8)
        self._gathered = torch.zeros(world * self.message, dtype=torch.uint8)
        self._shard_sum = torch.zeros(self.shard)
        self._shard_codes = torch.zeros(self.shard, dtype=torch.uint8)
        self._shard_scales = torch.zeros(blocks_per_shard)
        self._shard_decoded = torch.zeros(self.shard)
        # Scratch of the message packing: a shard's high nibbles (as int8
        # too), its E8M0 scales as floats, and which of them are NaN.
        self._nibbles = torch.zeros(self.shard // 2, dtype=torch.uint8)
        self._exponents = torch.zeros(blocks_per_shard)
        self._nan_scales = torch.zeros(blocks_per_shard, dtype=torch.bool)

    @property
    def wire_bytes(self) -> int:
        """Bytes this rank sends per call (all-to-all and all-gather), the
        exact tail's allreduce aside."""
        return 2 * (self.world - 1) * self.message

    def quantize_into_messages(self, values: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Step 1: ``values`` (float32, ``payload`` long) plus ``residual``
        into the outgoing messages; what the quantization lost is the next
        residual, taken by ``settle_residual`` once the call succeeded."""
        n = self.payload
        self._values[:n].copy_(values)
        if residual is not None:
            self._values[:n].add_(residual)
        self._quantize(self._values, self._codes, self._scales)
        if residual is not None:
            self._dequantize(self._codes, self._scales, self._decoded)
            torch.sub(self._values[:n], self._decoded[:n], out=self._next_residual)
        blocks = self.shard // self.block
        for j in range(self.world):
            codes = self._codes[j * self.shard : (j + 1) * self.shard]
            scales = self._scales[j * blocks : (j + 1) * blocks]
            self._write_message(self._send, j, codes, scales)

    def exchange_shards(self, backend: dist.ProcessGroupGloo) -> None:
        """Step 2: the all-to-all (rank j gets every rank's shard j)."""
        splits = [self.message] * self.world
        options = dist.AllToAllOptions()
        # ProcessGroupGloo's collectives exist at run time, not in torch's stubs.
        work = backend.alltoall_base(self._received, self._send, splits, splits, options)  # type: ignore[attr-defined]
        work.wait()

    def sum_shard(self) -> None:
        """Step 3: this rank's shard, summed in float32 in rank order and quantized."""
        self._shard_sum.zero_()
        for i in range(self.world):
            self._read_message(self._received, i, self._shard_codes, self._shard_scales)
            self._dequantize(self._shard_codes, self._shard_scales, self._shard_decoded)
            self._shard_sum.add_(self._shard_decoded)
        self._quantize(self._shard_sum, self._shard_codes, self._shard_scales)
        self._write_message(self._send, 0, self._shard_codes, self._shard_scales)

    def gather_shards(self, backend: dist.ProcessGroupGloo) -> None:
        """Step 4's communication: every rank's summed shard."""
        mine = self._send[: self.message]
        backend._allgather_base(self._gathered, mine).wait()  # type: ignore[attr-defined]

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

    def dequantize_into(self, values: torch.Tensor) -> None:
        """Step 4: the summed shards, dequantized into ``values`` (``payload`` long)."""
        for j in range(self.world):
            self._read_message(self._gathered, j, self._shard_codes, self._shard_scales)
            self._dequantize(self._shard_codes, self._shard_scales, self._shard_decoded)
            first = j * self.shard
            end = min(first + self.shard, self.payload)
            if end > first:
                values[first:end].copy_(self._shard_decoded[: end - first])

    # -- codecs and messages ----------------------------------------------

    def _quantize(self, values: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
        n = values.numel()
        _C.quantize_blocks(
            self._code, values.data_ptr(), n, self.block, codes.data_ptr(), scales.data_ptr()
        )

    def _dequantize(self, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        n = codes.numel()
        _C.dequantize_blocks(
            self._code, codes.data_ptr(), scales.data_ptr(), n, self.block, out.data_ptr()
        )

    def _write_message(
        self, into: torch.Tensor, j: int, codes: torch.Tensor, scales: torch.Tensor
    ) -> None:
        message = into[j * self.message : (j + 1) * self.message]
        code_part = message[: self._code_bytes]
        if self._bits == 4:  # two codes a byte, the first in the low nibble
            torch.bitwise_and(codes[0::2], 0x0F, out=code_part)
            torch.bitwise_left_shift(codes[1::2], 4, out=self._nibbles)
            code_part.bitwise_or_(self._nibbles)
        else:
            code_part.copy_(codes)
        if self._scale_bytes == 1:
            encode_e8m0(scales, self._exponents, message[self._code_bytes :])
        else:
            message[self._code_bytes :].copy_(scales.view(torch.uint8))

    def _read_message(
        self, source: torch.Tensor, i: int, codes: torch.Tensor, scales: torch.Tensor
    ) -> None:
        message = source[i * self.message : (i + 1) * self.message]
        code_part = message[: self._code_bytes]
        if self.format == "int4":  # a two's complement nibble: sign-extended to a byte
            signed, low = code_part.view(torch.int8), self._nibbles.view(torch.int8)
            torch.bitwise_left_shift(signed, 4, out=low)  # wraps: the low nibble on top
            torch.bitwise_right_shift(low, 4, out=codes[0::2].view(torch.int8))  # arithmetic
            torch.bitwise_right_shift(signed, 4, out=codes[1::2].view(torch.int8))
        elif self._bits == 4:  # an E2M1 code: its sign is the nibble's bit 3
            torch.bitwise_and(code_part, 0x0F, out=codes[0::2])
            torch.bitwise_right_shift(code_part, 4, out=codes[1::2])
        else:
            codes.copy_(code_part)
        if self._scale_bytes == 1:
            decode_e8m0(message[self._code_bytes :], self._nan_scales, scales)
        else:
            scales.view(torch.uint8).copy_(message[self._code_bytes :])


# OCP MX v1.0's E8M0 scale: 2 ** (byte - 127), 255 NaN. The codec's scales
# are powers of two (0 for a block of zeros, whose codes are 0: byte 0).
_E8M0_NAN = 255


def encode_e8m0(scales: torch.Tensor, exponents: torch.Tensor, out: torch.Tensor) -> None:
    """Power-of-two float32 ``scales`` as E8M0 bytes into ``out`` (uint8),
    through ``exponents`` (float32 scratch of the same length)."""
    torch.log2(scales, out=exponents)  # exact for powers of two
    exponents.add_(127)
    torch.nan_to_num(exponents, nan=_E8M0_NAN, posinf=_E8M0_NAN, neginf=0, out=exponents)
    exponents.clamp_(0, _E8M0_NAN)
    out.copy_(exponents)


def decode_e8m0(codes: torch.Tensor, nan: torch.Tensor, out: torch.Tensor) -> None:
    """E8M0 bytes ``codes`` as float32 scales into ``out``, through ``nan``
    (bool scratch of the same length)."""
    out.copy_(codes)
    out.sub_(127)
    torch.exp2(out, out=out)
    torch.eq(codes, _E8M0_NAN, out=nan)
    out.masked_fill_(nan, float("nan"))
