"""Issue 24's low-bit codecs (kernels/low_bit.h, through _C.quantize_blocks
and _C.dequantize_blocks) against the float64 oracle written from the
specifications (tests/quant_reference.py) and torch's float8_e4m3fn."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from quant_reference import E2M1, E4M3, dequantize, quantize
from tensor_cases import fresh_seed

from distlearn_cuda import _C

FORMAT_CODES = {"int8": 0, "int4": 1, "fp8_e4m3": 2, "mxfp4": 3}


def run_codec(values: torch.Tensor, fmt: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the dequantized values, the scales), outputs poisoned first."""
    out, scales, _ = run_codec_with_codes(values, fmt, block)
    return out, scales


def run_codec_with_codes(
    values: torch.Tensor, fmt: str, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = values.numel()
    codes = torch.full((n,), 0xAB, dtype=torch.uint8)
    scales = torch.full(((n + block - 1) // block,), -7.0)  # no scale is negative
    out = torch.full((n,), float("nan"))
    code = FORMAT_CODES[fmt]
    _C.quantize_blocks(code, values.data_ptr(), n, block, codes.data_ptr(), scales.data_ptr())
    _C.dequantize_blocks(code, codes.data_ptr(), scales.data_ptr(), n, block, out.data_ptr())
    return out, scales, codes


def elements_of(codes: torch.Tensor, fmt: str) -> list[float]:
    """The grid value each code stands for, decoded independently of the codec."""
    if fmt in ("int8", "int4"):
        return codes.view(torch.int8).double().tolist()
    if fmt == "fp8_e4m3":
        return codes.view(torch.float8_e4m3fn).double().tolist()
    table = [*E2M1, *(-v for v in E2M1)]  # E2M1: sign in bit 3
    return [table[c] for c in codes.tolist()]


def test_e4m3_codes_round_trip_and_round_like_torch() -> None:
    rng = random.Random(fresh_seed())
    grid = torch.tensor([*E4M3, *(-v for v in E4M3)])  # every finite value, both signs
    back, _ = run_codec(grid / 448.0 * 448.0, "fp8_e4m3", grid.numel())
    # One block whose amax is 448: the scale is 1, every grid value is exact.
    assert torch.equal(back, grid)
    values = [rng.uniform(-448, 448) * rng.choice([1, 1e-2, 1e-4]) for _ in range(5000)]
    values += [(a + b) / 2 for a, b in itertools.pairwise(E4M3)]  # every tie
    values.append(448.0)  # amax 448: scale 1, so each value is rounded as a float8 alone
    x = torch.tensor(values)
    got, scales = run_codec(x, "fp8_e4m3", x.numel())
    assert scales.tolist() == [1.0]
    assert torch.equal(got, x.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("fmt", list(FORMAT_CODES))
@pytest.mark.parametrize("block", [32, 7, 128])
def test_blocks_match_the_oracle(fmt: str, block: int) -> None:
    # The oracle computes in float64, the codec in float32: an element whose
    # scaled value lies within float32's rounding of a tie may round the
    # other way (one grid step); mxfp4's power-of-two scaling is exact, so
    # it must match everywhere.
    rng = random.Random(fresh_seed())
    n = rng.choice([1, 33, 515, 1000])
    x = torch.tensor([rng.gauss(0, rng.choice([1e-3, 1.0, 1e3])) for _ in range(n)])
    got, scales, codes = run_codec_with_codes(x, fmt, block)
    blocks = quantize(x.double().tolist(), fmt, block)
    want_scales = [scale for scale, _ in blocks]
    want_elements = [e for _, elements in blocks for e in elements]
    torch.testing.assert_close(
        scales.double(), torch.tensor(want_scales, dtype=torch.float64), rtol=1e-6, atol=0
    )
    elements = elements_of(codes, fmt)
    # The dequantized value is the float32 product of the two.
    expected = torch.tensor(elements) * scales.repeat_interleave(block)[:n]
    assert torch.equal(got, expected)
    differ = [i for i, (g, w) in enumerate(zip(elements, want_elements, strict=True)) if g != w]
    if fmt == "mxfp4":
        assert not differ, (differ[:5], x[differ[:5]])
        return
    assert len(differ) <= max(1, n // 1000), (fmt, block, differ[:5])
    grid = {"int8": None, "int4": None, "fp8_e4m3": E4M3}[fmt]
    for i in differ:  # one grid step apart, at a float32-rounded tie
        if grid is None:
            assert abs(elements[i] - want_elements[i]) == 1, (fmt, i)
        else:
            a, b = abs(elements[i]), abs(want_elements[i])
            assert abs(grid.index(a) - grid.index(b)) == 1, (fmt, i)


def test_e2m1_elements_are_the_specifications_table() -> None:
    # A block with amax 6 * 2^k has scale 2^k: its elements are E2M1's table.
    grid = torch.tensor([*E2M1, *(-v for v in E2M1)]) * 4.0
    back, scales = run_codec(grid, "mxfp4", grid.numel())
    assert scales.tolist() == [4.0] and torch.equal(back, grid)


def test_zero_blocks() -> None:
    back, scales = run_codec(torch.zeros(70), "int4", 32)
    assert scales.tolist() == [0.0, 0.0, 0.0] and torch.equal(back, torch.zeros(70))


@pytest.mark.parametrize("fmt", list(FORMAT_CODES))
def test_a_block_with_a_non_finite_value_reads_back_as_nans(fmt: str) -> None:
    # NOTE [Non-finite blocks] (kernels/low_bit.h): the block's scale is NaN,
    # every value of it NaN (an infinity too, and MXFP4's NaN, which has no
    # E2M1 code); the other blocks as if alone. Against the oracle.
    seed = fresh_seed()
    rng = random.Random(seed)
    block = rng.choice([4, 32, 33])
    n = block * 6 - rng.randrange(block)
    values = [rng.gauss(0, 1.0) for _ in range(n)]
    for i in rng.sample(range(n), 3):
        values[i] = rng.choice([math.nan, math.inf, -math.inf])
    x = torch.tensor(values)
    got, scales = run_codec(x, fmt, block)
    want = dequantize(quantize(values, fmt, block))
    where = f"seed {seed}, {fmt}, block {block}"
    bad_blocks = {i // block for i, v in enumerate(values) if not math.isfinite(v)}
    assert bad_blocks and all(math.isnan(s) == (k in bad_blocks) for k, s in
                              enumerate(scales.tolist())), where  # fmt: skip
    for i, (g, w) in enumerate(zip(got.tolist(), want, strict=True)):
        assert math.isnan(g) == math.isnan(w) == (i // block in bad_blocks), (where, i)
    finite = [i for i in range(n) if i // block not in bad_blocks]
    if fmt == "mxfp4":  # exact (see test_blocks_match_the_oracle)
        assert [got[i].item() for i in finite] == [want[i] for i in finite], where


def test_bad_arguments_are_value_errors() -> None:
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="format must be"):
        _C.quantize_blocks(9, x.data_ptr(), 4, 2, x.data_ptr(), x.data_ptr())
    with pytest.raises(ValueError, match="block >= 1"):
        _C.quantize_blocks(0, x.data_ptr(), 4, 0, x.data_ptr(), x.data_ptr())
    with pytest.raises(ValueError, match="null address"):
        _C.dequantize_blocks(0, 0, x.data_ptr(), 4, 2, x.data_ptr())
