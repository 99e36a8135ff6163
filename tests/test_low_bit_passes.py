"""The low-bit sum's three passes (kernels/low_bit_sum.h, through
``_C.low_bit_encode``, ``_C.low_bit_sum`` and ``_C.low_bit_decode``) in one
process, against the float64 oracle of the formats and of the messages'
layout (tests/quant_reference.py): every block's scale and codes as the
oracle quantizes the values (plus the residual), the new residual exactly
what that lost, the shard's sum the oracle's quantization of the float32
sum in rank order, the decoded values exactly the messages' values.
Outputs start poisoned. tests/host_kernels/low_bit_kernels.cpp shows the
CUDA flavor computes the same bytes."""

from __future__ import annotations

import math
import random

import pytest
import torch
from quant_reference import FORMATS, WIDEST_STEP, dequantize, parse_messages, quantize
from tensor_cases import fresh_seed

from distlearn_cuda import _C

CODES = {"int8": 0, "int4": 1, "fp8_e4m3": 2, "mxfp4": 3}
POISON = 0xAB


class Case:
    """A drawn shape: format, block, blocks per shard, world, and n values."""

    def __init__(self, rng: random.Random, fmt: str) -> None:
        self.fmt = fmt
        self.block = rng.choice([2, 8, 32, 128, 130, 256])
        self.blocks_per_shard = rng.randint(1, 4)
        self.world = rng.randint(1, 4)
        self.shape = _C.LowBitShape(CODES[fmt], self.block, self.blocks_per_shard, self.world)
        padded = self.shape.shard * self.world
        self.n = padded - rng.randint(0, self.shape.shard)  # a partial last shard, or none

    def __repr__(self) -> str:
        return (
            f"{self.fmt}, block {self.block}, {self.blocks_per_shard} blocks per shard, "
            f"world {self.world}, n {self.n}"
        )

    def parse(self, raw: torch.Tensor, shards: int) -> list[tuple[float, list[float]]]:
        return parse_messages(
            bytes(raw.tolist()), self.fmt, self.block, self.blocks_per_shard, shards
        )

    def encode(
        self, values: torch.Tensor, residual: torch.Tensor | None = None, threads: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        messages = torch.full((self.world * self.shape.message_bytes,), POISON, dtype=torch.uint8)
        next_residual = torch.full((self.n,), float("nan"))
        residual_at = 0 if residual is None else residual.data_ptr()
        next_at = 0 if residual is None else next_residual.data_ptr()
        _C.low_bit_encode(
            self.shape,
            values.data_ptr(),
            residual_at,
            next_at,
            self.n,
            messages.data_ptr(),
            threads,
        )
        return messages, next_residual


def spread_values(generator: torch.Generator, n: int) -> torch.Tensor:
    """Magnitudes over many binades, and a run of zeros (a block of zeros)."""
    values = torch.randn(n, generator=generator) * torch.exp(
        torch.randn(n, generator=generator) * 3
    )
    if n > 40:
        start = int(torch.randint(0, n - 40, (1,), generator=generator))
        values[start : start + 40] = 0.0
    return values


def check_blocks(got: list, want: list, fmt: str, where: str) -> None:
    """MXFP4 (power-of-two scales): exactly the oracle's blocks; the others:
    scales up to float32's rounding, values within one step of the oracle's
    grid (a float32-rounded tie), and nearly all elements the oracle's."""
    assert len(got) == len(want), where
    if fmt == "mxfp4":
        assert got == want, where
        return
    for (scale, _), (oracle_scale, _) in zip(got, want, strict=True):
        assert scale == pytest.approx(oracle_scale, rel=2**-23, abs=0), where
    got_values, want_values = dequantize(got), dequantize(want)
    # One step of the widest part of the block's grid (a float32 scale's
    # rounding on top).
    bounds = [scale * WIDEST_STEP[fmt] * (1 + 2**-20) for scale, e in want for _ in e]
    off = [abs(g - w) for g, w in zip(got_values, want_values, strict=True)]
    assert all(o <= b for o, b in zip(off, bounds, strict=True)), f"{where}: worst {max(off)}"
    same = [
        g == w
        for (_, ge), (_, we) in zip(got, want, strict=True)
        for g, w in zip(ge, we, strict=True)
    ]
    assert sum(same) >= 0.99 * len(same), f"{where}: {sum(same)} of {len(same)} codes"


def as_float32(blocks: list[tuple[float, list[float]]]) -> torch.Tensor:
    """Dequantized in float32: scale * element, one rounding (the product is
    exact in float64: the elements have at most 8 significant bits)."""
    return torch.tensor(dequantize(blocks), dtype=torch.float64).float()


@pytest.mark.parametrize("feedback", [False, True], ids=["plain", "error-feedback"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_writes_the_oracles_blocks_and_what_they_lost(fmt: str, feedback: bool) -> None:
    seed = fresh_seed()
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    case = Case(rng, fmt)
    where = f"seed {seed}: {case}"
    values = spread_values(generator, case.n)
    residual = torch.randn(case.n, generator=generator) * 0.01 if feedback else None
    messages, next_residual = case.encode(values, residual)
    corrected = values + residual if residual is not None else values  # float32, as the pass adds
    padded = corrected.tolist() + [0.0] * (case.shape.shard * case.world - case.n)
    got = case.parse(messages, case.world)
    check_blocks(got, quantize(padded, fmt, case.block), fmt, where)
    if feedback:
        lost = corrected - as_float32(got)[: case.n]
        assert torch.equal(next_residual, lost), where
    else:
        assert next_residual.isnan().all(), where  # not written


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_shard_sum_is_the_oracles_quantization_of_the_rank_order_sum(fmt: str) -> None:
    seed = fresh_seed()
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    case = Case(rng, fmt)
    shard_index = rng.randrange(case.world)
    message = case.shape.message_bytes
    where = f"seed {seed}: {case}, shard {shard_index}"
    received = [
        case.encode(spread_values(generator, case.n))[0][
            shard_index * message : (shard_index + 1) * message
        ]
        for _ in range(case.world)
    ]
    summed, every_rank = torch.full((message,), POISON, dtype=torch.uint8), torch.cat(received)
    _C.low_bit_sum(case.shape, every_rank.data_ptr(), summed.data_ptr(), 1)
    total = torch.zeros(case.shape.shard)  # float32, rank by rank from 0
    for raw in received:
        total += as_float32(case.parse(raw, 1))
    want = quantize(total.tolist(), fmt, case.block)
    check_blocks(case.parse(summed, 1), want, fmt, where)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_writes_the_messages_values_and_nothing_past_n(fmt: str) -> None:
    seed = fresh_seed()
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    case = Case(rng, fmt)
    messages, _ = case.encode(spread_values(generator, case.n))
    out = torch.full((case.n + 7,), float("nan"))
    _C.low_bit_decode(case.shape, messages.data_ptr(), case.n, out.data_ptr(), 1)
    want = as_float32(case.parse(messages, case.world))[: case.n]
    assert torch.equal(out[: case.n], want), f"seed {seed}: {case}"
    assert out[case.n :].isnan().all(), f"seed {seed}: {case}"


def test_mx_scales_are_e8m0_bytes_and_zero_blocks_byte_0() -> None:
    # Block k's largest magnitude is 6 * 2^e: its scale is 2^e (OCP MX v1.0,
    # 6.3), byte e + 127, for every exponent a float32 block can give.
    exponents = list(range(-126, 126))
    blocks = [[6.0 * 2.0**e] + [0.0] * 31 for e in exponents] + [[0.0] * 32]
    values = torch.tensor([v for b in blocks for v in b], dtype=torch.float64).float()
    shape = _C.LowBitShape(CODES["mxfp4"], 32, len(blocks), 1)
    messages = torch.full((shape.message_bytes,), POISON, dtype=torch.uint8)
    _C.low_bit_encode(shape, values.data_ptr(), 0, 0, values.numel(), messages.data_ptr(), 1)
    scale_bytes = messages[len(blocks) * 16 :].tolist()
    assert scale_bytes == [e + 127 for e in exponents] + [0]
    out = torch.full_like(values, float("nan"))
    _C.low_bit_decode(shape, messages.data_ptr(), values.numel(), out.data_ptr(), 1)
    assert torch.equal(out, values)  # 6 is an E2M1 value: every block exact


def test_threads_change_nothing() -> None:
    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    world, block, n = 3, 128, 700_001  # pieces of more than 2^18 elements: two threads
    blocks_per_shard = math.ceil(n / world / block)
    for fmt in FORMATS:
        shape = _C.LowBitShape(CODES[fmt], block, blocks_per_shard, world)
        values, residual = torch.randn(n, generator=generator), torch.randn(n, generator=generator)
        outputs = []
        for threads in (1, 2):
            messages = torch.full((world * shape.message_bytes,), POISON, dtype=torch.uint8)
            lost, summed = (
                torch.full((n,), float("nan")),
                torch.zeros(shape.message_bytes, dtype=torch.uint8),
            )
            decoded = torch.full((n,), float("nan"))
            _C.low_bit_encode(
                shape,
                values.data_ptr(),
                residual.data_ptr(),
                lost.data_ptr(),
                n,
                messages.data_ptr(),
                threads,
            )
            _C.low_bit_sum(shape, messages.data_ptr(), summed.data_ptr(), threads)
            _C.low_bit_decode(shape, messages.data_ptr(), n, decoded.data_ptr(), threads)
            outputs.append((messages, lost, summed, decoded))
        for one, two in zip(*outputs, strict=True):
            assert torch.equal(one, two), f"seed {seed}, {fmt}"


def test_bad_arguments_are_value_errors_and_write_nothing() -> None:
    with pytest.raises(ValueError, match="format must be"):
        _C.LowBitShape(7, 32, 1, 1)
    with pytest.raises(ValueError, match="block must be even"):
        _C.LowBitShape(1, 33, 1, 1)
    with pytest.raises(ValueError, match=r"block must be even and in \[2, 256\]"):
        _C.LowBitShape(1, 258, 1, 1)
    with pytest.raises(ValueError, match="world must be >= 1"):
        _C.LowBitShape(1, 32, 1, 0)
    with pytest.raises(ValueError, match="overflows"):
        _C.LowBitShape(0, 256, 2**52, 2**10)
    shape = _C.LowBitShape(0, 4, 2, 2)  # 16 values
    values, messages = torch.ones(17), torch.zeros(2 * shape.message_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"n must be in \[0, "):
        _C.low_bit_encode(shape, values.data_ptr(), 0, 0, 17, messages.data_ptr(), 1)
    with pytest.raises(ValueError, match="go together"):
        _C.low_bit_encode(
            shape, values.data_ptr(), values.data_ptr(), 0, 16, messages.data_ptr(), 1
        )
    with pytest.raises(ValueError, match="null address"):
        _C.low_bit_encode(shape, 0, 0, 0, 16, messages.data_ptr(), 1)
    with pytest.raises(ValueError, match="num_threads"):
        _C.low_bit_decode(shape, messages.data_ptr(), 16, values.data_ptr(), 0)
    assert torch.equal(messages, torch.zeros_like(messages)) and torch.equal(values, torch.ones(17))
