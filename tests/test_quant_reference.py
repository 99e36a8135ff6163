"""The float64 low-bit format oracle (tests/quant_reference.py) against what
is known independently of it: torch's own float8_e4m3fn values and
rounding, the specifications' tables, and the properties every block format
must have. Issue 24's kernels and collective will be checked against it."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from quant_reference import (
    E2M1,
    E4M3,
    FORMATS,
    MX_BLOCK,
    dequantize,
    quantize,
    quantize_block,
    round_to_grid,
    with_error_feedback,
)
from tensor_cases import fresh_seed


def test_the_e4m3_grid_is_torchs_float8_e4m3fn() -> None:
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    finite = sorted({float(v) for v in every if v.isfinite() and v >= 0})
    assert finite == E4M3
    assert int(every.isnan().sum()) == 2  # S.1111.111, one per sign


def test_e4m3_rounding_is_torchs_in_range() -> None:
    rng = random.Random(fresh_seed())
    values = [rng.uniform(-448, 448) * rng.choice([1, 1e-2, 1e-4]) for _ in range(4000)]
    values += [(a + b) / 2 for a, b in itertools.pairwise(E4M3)]  # every tie
    ours = [round_to_grid(v, E4M3) for v in values]
    theirs = torch.tensor(values, dtype=torch.float64).to(torch.float8_e4m3fn).double().tolist()
    assert ours == theirs


def test_the_e2m1_grid_is_the_mx_specifications() -> None:
    # OCP MX v1.0, table of FP4 E2M1: exponent bias 1, one mantissa bit.
    assert E2M1 == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert round_to_grid(2.5, E2M1) == 2.0 and round_to_grid(3.5, E2M1) == 4.0  # ties to even
    assert round_to_grid(5.0, E2M1) == 4.0 and round_to_grid(7.0, E2M1) == 6.0
    assert round_to_grid(-100.0, E2M1) == -6.0  # saturates


@pytest.mark.parametrize("fmt", FORMATS)
def test_blocks_round_trip_within_their_formats_error_bound(fmt: str) -> None:
    # int: half a step of amax / top. E4M3: half its widest gap (32 at the
    # top, 2^5 between 256 and 288) in units of amax / 448. MXFP4: the scale
    # puts amax / X in [4, 8), which E2M1 (top 6) saturates: up to 2 X off,
    # as the MX specification accepts (its gaps are at most 2 X: half is X).
    rng = random.Random(fresh_seed())
    for _ in range(200):
        block = [rng.gauss(0, rng.choice([1e-3, 1.0, 1e3])) for _ in range(MX_BLOCK)]
        scale, elements = quantize_block(block, fmt)
        amax = max(abs(v) for v in block)
        bound = {
            "int8": amax / 127 / 2,
            "int4": amax / 7 / 2,
            "fp8_e4m3": amax / 448 * 32 / 2,
            "mxfp4": 2 * scale,
        }[fmt]
        for v, e in zip(block, elements, strict=True):
            assert abs(v - scale * e) <= bound * (1 + 1e-12), (fmt, v, e, scale)


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_blocks_and_the_largest_value_are_exact(fmt: str) -> None:
    scale, elements = quantize_block([0.0] * 5, fmt)
    assert elements == [0.0] * 5
    block = [3.0, -1.25, 0.0, 0.5]
    scale, elements = quantize_block(block, fmt)
    if fmt != "mxfp4":  # the largest magnitude maps to the grid's largest value
        assert scale * max(abs(e) for e in elements) == pytest.approx(3.0, rel=1e-15)
    assert elements[2] == 0.0


def test_mx_scales_are_powers_of_two_and_elements_saturate() -> None:
    scale, elements = quantize_block([7.9, 1.0, -0.3], "mxfp4")
    assert scale == 2.0 ** (2 - 2)  # floor(log2 7.9) = 2, minus E2M1's emax 2
    assert elements[0] == 6.0  # 7.9 saturates to the largest element


def test_error_feedback_keeps_what_was_lost() -> None:
    # Sent + residual is exactly the corrected input, step after step, and
    # the residual stays within half a quantization step of each block.
    rng = random.Random(fresh_seed())
    residual = [0.0] * 70
    total_in, total_sent = [0.0] * 70, [0.0] * 70
    for _ in range(50):
        values = [rng.gauss(0, 1) for _ in range(70)]
        sent, new_residual = with_error_feedback(values, residual, "int4", 32)
        for i in range(70):
            assert sent[i] + new_residual[i] == pytest.approx(values[i] + residual[i], abs=1e-12)
            total_in[i] += values[i]
            total_sent[i] += sent[i]
        residual = new_residual
    # What was sent over 50 steps differs from what came in by the last residual only.
    for i in range(70):
        assert total_sent[i] + residual[i] == pytest.approx(total_in[i], abs=1e-9)


def test_blocks_cover_the_values_in_order() -> None:
    values = [float(i) for i in range(70)]
    blocks = quantize(values, "int8", 32)
    assert [len(e) for _, e in blocks] == [32, 32, 6]
    assert dequantize(blocks) == pytest.approx(values, abs=1e-12 + 69 / 127 / 2)
