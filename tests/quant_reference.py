"""Low-bit formats in float64, written from their specifications, as the
oracle of issue 24's tests: plain Python over lists of floats, no library
code, no torch.

Every format quantizes a block of values with one shared scale:

- ``int8``: codes in [-127, 127], scale = amax / 127 (symmetric, so that
  -x and x round alike and 0 is exact); code = round(x / scale), ties to
  even.
- ``int4``: codes in [-7, 7], scale = amax / 7, the same way.
- ``fp8_e4m3``: OCP 8-bit floating point, E4M3 (OCP "OFP8 Formats for Deep
  Learning" v1.0, 2023, table 1): exponent bias 7, no infinities, one NaN
  pattern per sign (S.1111.111), largest finite 448 = 1.75 * 2^8, smallest
  subnormal 2^-9; scale = amax / 448, element = x / scale rounded to the
  nearest E4M3 value, ties to even, saturated to +-448.
- ``mxfp4``: OCP Microscaling (MX) v1.0 (2023), section 6.3: blocks of 32
  elements in FP4 E2M1 (bias 1: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their
  negatives) with one E8M0 scale, a power of two X = 2^(floor(log2(amax))
  - 2) (2 = the largest exponent of E2M1); element = x / X rounded to the
  nearest E2M1 value, ties to even, saturated to +-6.

A block whose values are all zero gets scale 0 (int, fp8) or the smallest
E8M0 scale (MX) and all-zero codes. A block holding a NaN or an infinity
has no finite scale: it gets a NaN scale, and all its values dequantize to
NaN (the library's choice, so that a non-finite value stays non-finite
through a sum; the formats' specifications leave it open).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

Vector = list[float]

FORMATS = ("int8", "int4", "fp8_e4m3", "mxfp4")
MX_BLOCK = 32  # OCP MX v1.0: k = 32 elements per shared scale


def round_half_even(x: float) -> float:
    """Nearest integer, ties to even (Python's round)."""
    return float(round(x))


def _grid_e4m3() -> list[float]:
    """Every non-negative finite E4M3 value, ascending (OCP OFP8 v1.0)."""
    values = []
    for exponent in range(16):
        for mantissa in range(8):
            if exponent == 15 and mantissa == 7:
                continue  # NaN
            if exponent == 0:
                values.append(2.0**-6 * mantissa / 8)
            else:
                values.append(2.0 ** (exponent - 7) * (1 + mantissa / 8))
    return values


def _grid_e2m1() -> list[float]:
    """Every non-negative E2M1 value, ascending (OCP MX v1.0, 5.3.3)."""
    values = []
    for exponent in range(4):
        for mantissa in range(2):
            if exponent == 0:
                values.append(mantissa / 2)  # subnormal: 2^(1-1) * m / 2
            else:
                values.append(2.0 ** (exponent - 1) * (1 + mantissa / 2))
    return values


E4M3 = _grid_e4m3()
E2M1 = _grid_e2m1()
assert E4M3[-1] == 448.0 and E4M3[1] == 2.0**-9 and len(E4M3) == 127
assert E2M1 == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def round_to_grid(x: float, grid: Sequence[float]) -> float:
    """x rounded to the nearest value of a symmetric grid (given by its
    non-negative half, ascending), ties to the value with an even mantissa
    (an even index in the grid), saturated to the largest."""
    magnitude = abs(x)
    if magnitude >= grid[-1]:
        return math.copysign(grid[-1], x)
    low = max(i for i, v in enumerate(grid) if v <= magnitude)
    high = low + 1
    below, above = magnitude - grid[low], grid[high] - magnitude
    pick = low if below < above or (below == above and low % 2 == 0) else high
    return math.copysign(grid[pick], x)


def quantize_block(values: Sequence[float], fmt: str) -> tuple[float, Vector]:
    """(scale, elements) of one block; ``dequantize_block`` inverts it."""
    if not all(math.isfinite(v) for v in values):
        return math.nan, [0.0] * len(values)
    amax = max((abs(v) for v in values), default=0.0)
    if fmt in ("int8", "int4"):
        top = 127.0 if fmt == "int8" else 7.0
        if amax == 0:
            return 0.0, [0.0] * len(values)
        scale = amax / top
        return scale, [max(-top, min(top, round_half_even(v / scale))) for v in values]
    if fmt == "fp8_e4m3":
        if amax == 0:
            return 0.0, [0.0] * len(values)
        scale = amax / 448.0
        return scale, [round_to_grid(v / scale, E4M3) for v in values]
    if fmt == "mxfp4":
        if amax == 0:
            return 2.0**-127, [0.0] * len(values)
        scale = 2.0 ** (math.floor(math.log2(amax)) - 2)
        return scale, [round_to_grid(v / scale, E2M1) for v in values]
    raise ValueError(f"unknown format {fmt!r}")


def dequantize_block(scale: float, elements: Sequence[float]) -> Vector:
    return [scale * e for e in elements]


def quantize(values: Sequence[float], fmt: str, block: int) -> list[tuple[float, Vector]]:
    """Consecutive blocks of ``block`` values (the last may be shorter)."""
    return [quantize_block(values[i : i + block], fmt) for i in range(0, len(values), block)]


def dequantize(blocks: Sequence[tuple[float, Vector]]) -> Vector:
    return [v for scale, elements in blocks for v in dequantize_block(scale, elements)]


def with_error_feedback(
    values: Sequence[float], residual: Sequence[float], fmt: str, block: int
) -> tuple[Vector, Vector]:
    """Error feedback (Seide et al. 2014; Karimireddy et al. 2019, EF-SGD):
    quantize values + residual; the new residual is what the quantization
    lost. Returns (the dequantized message, the new residual)."""
    corrected = [v + r for v, r in zip(values, residual, strict=True)]
    sent = dequantize(quantize(corrected, fmt, block))
    return sent, [c - s for c, s in zip(corrected, sent, strict=True)]


# The widest step of each format's grid, in units of the block's scale:
# int 1; E2M1 2 (4 to 6); E4M3 32 (from 256 to 448).
WIDEST_STEP = {"int8": 1.0, "int4": 1.0, "fp8_e4m3": 32.0, "mxfp4": 2.0}


# A quantization step, as a fraction of its block's largest value, at most
# (the formats' specifications): int8 and int4 scale the largest to 127 and
# 7; fp8 e4m3's 3-bit mantissa; MXFP4's E2M1 has step 2 below its largest
# value 6, and the power-of-two scale puts the block's largest above 3.
STEP_FRACTION = {"int8": 1 / 127, "int4": 1 / 7, "fp8_e4m3": 1 / 8, "mxfp4": 2 / 3}


def steps_of(values: list[float], fmt: str, block: int) -> list[float]:
    """Per element, one step of its block's grid (the widest), plus a float32
    rounding of the block's largest value: where the library's float32
    arithmetic (a sum, a block's amax, a tie) may land one step off the
    float64 oracle's."""
    steps = []
    for first in range(0, len(values), block):
        chunk = values[first : first + block]
        scale, _ = quantize(chunk, fmt, block)[0]
        amax = max(map(abs, chunk), default=0.0)
        steps += [scale * WIDEST_STEP[fmt] + 1e-6 * amax] * len(chunk)
    return steps


# The messages of the low-bit sum (distlearn_cuda/_comm/low_bit.py): shard
# after shard, each its codes (8-bit formats a byte each; 4-bit formats two
# a byte, the first in the low nibble), then its scales (MXFP4: an E8M0
# byte each, 2^(byte - 127), 255 NaN; the others: float32 in host order).


def element_of_code(code: int, fmt: str) -> float:
    """The grid element a code stands for, decoded from the formats' bit layouts."""
    if fmt == "int8":
        return float(code - 256 if code >= 128 else code)
    if fmt == "int4":  # a two's complement nibble
        return float(code - 16 if code >= 8 else code)
    if fmt == "fp8_e4m3":  # S.EEEE.MMM, bias 7, S.1111.111 NaN
        sign, exponent, mantissa = code >> 7, (code >> 3) & 0xF, code & 0x7
        if exponent == 0xF and mantissa == 0x7:
            return math.nan
        value = (
            (mantissa / 8) * 2.0**-6
            if exponent == 0
            else (1 + mantissa / 8) * 2.0 ** (exponent - 7)
        )
        return -value if sign else value
    if fmt == "mxfp4":  # S.EE.M, bias 1
        sign, exponent, mantissa = code >> 3, (code >> 1) & 0x3, code & 0x1
        value = mantissa / 2 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
        return -value if sign else value
    raise ValueError(f"unknown format {fmt!r}")


def parse_messages(
    raw: bytes, fmt: str, block: int, blocks_per_shard: int, shards: int
) -> list[tuple[float, Vector]]:
    """(scale, elements) of every block of ``shards`` messages."""
    bits = 4 if fmt in ("int4", "mxfp4") else 8
    code_bytes = block * blocks_per_shard * bits // 8
    scale_bytes = 1 if fmt == "mxfp4" else 4
    message = code_bytes + scale_bytes * blocks_per_shard
    assert len(raw) == shards * message, (len(raw), shards, message)
    blocks = []
    for j in range(shards):
        body = raw[j * message : (j + 1) * message]
        codes: list[int] = []
        for byte in body[:code_bytes]:
            codes += [byte & 0xF, byte >> 4] if bits == 4 else [byte]
        for k in range(blocks_per_shard):
            at = code_bytes + k * scale_bytes
            if fmt == "mxfp4":
                byte = body[at]
                scale = math.nan if byte == 255 else 2.0 ** (byte - 127)
            else:
                (scale,) = struct.unpack("=f", body[at : at + 4])
            elements = [element_of_code(c, fmt) for c in codes[k * block : (k + 1) * block]]
            blocks.append((scale, elements))
    return blocks
