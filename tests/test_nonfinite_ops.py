"""The non-finite guard inside the fused ops: the flag pack and the EA blend
write, and the skip that unpack and the center update apply, on the CPU
flavor and the reference (the CUDA flavor: tests/test_cuda_ops.py)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from tensor_cases import DTYPES, ODD_SHAPES, fresh_seed, poisoned_like, random_tensors

from distlearn_cuda import _C, reference
from distlearn_cuda._native import DTYPE_CODES

PAIRS = list(itertools.product(DTYPES, DTYPES))
BAD_VALUES = [float("nan"), float("inf"), float("-inf")]


def layout_of(tensors: list[torch.Tensor], buffer_dtype: torch.dtype) -> _C.Layout:
    codes = [DTYPE_CODES[t.dtype] for t in tensors]
    return _C.Layout([t.numel() for t in tensors], codes, DTYPE_CODES[buffer_dtype], 2)


def addresses(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def tensors_with(dtype: torch.dtype, bad: float | None) -> list[torch.Tensor]:
    """ODD_SHAPES of N(0, 1) values; with ``bad``, one of them at a random place."""
    rng = random.Random(fresh_seed())
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    tensors = random_tensors(ODD_SHAPES, [dtype] * len(ODD_SHAPES), generator)
    if bad is not None:
        target = rng.choice([t for t in tensors if t.numel() > 0])
        target.view(-1)[rng.randrange(target.numel())] = bad
    return tensors


def flags_after_pack(tensors: list[torch.Tensor], buffer_dtype: torch.dtype) -> tuple[float, float]:
    layout = layout_of(tensors, buffer_dtype)
    got = torch.full((layout.buffer_numel,), float("nan"), dtype=buffer_dtype)
    expected = got.clone()
    _C.pack(layout, addresses(tensors), got.data_ptr(), 0, 2)
    reference.pack(tensors, expected, layout.offsets, layout.count_offset, 2, 0, layout.flag_offset)
    return float(got[layout.flag_offset]), float(expected[layout.flag_offset])


@pytest.mark.parametrize(("tensor_dtype", "buffer_dtype"), PAIRS)
@pytest.mark.parametrize("bad", [None, *BAD_VALUES])
def test_pack_flags_a_nonfinite_value(
    tensor_dtype: torch.dtype, buffer_dtype: torch.dtype, bad: float | None
) -> None:
    got, expected = flags_after_pack(tensors_with(tensor_dtype, bad), buffer_dtype)
    assert got == expected == (0.0 if bad is None else 1.0)


@pytest.mark.parametrize(("wide", "narrow"), [(torch.float32, torch.float16)])
def test_pack_flags_a_cast_that_overflows(wide: torch.dtype, narrow: torch.dtype) -> None:
    tensors = tensors_with(wide, None)
    tensors[3].view(-1)[0] = 1e5  # finite in fp32, beyond fp16's 65504
    assert flags_after_pack(tensors, narrow) == (1.0, 1.0)


@pytest.mark.parametrize(("tensor_dtype", "buffer_dtype"), PAIRS)
@pytest.mark.parametrize("bad", [None, *BAD_VALUES])
def test_ea_blend_flags_a_nonfinite_delta(
    tensor_dtype: torch.dtype, buffer_dtype: torch.dtype, bad: float | None
) -> None:
    params, centers = tensors_with(tensor_dtype, bad), tensors_with(tensor_dtype, None)
    params_ref = [p.clone() for p in params]
    layout = layout_of(params, buffer_dtype)
    got = torch.full((layout.buffer_numel,), float("nan"), dtype=buffer_dtype)
    expected = got.clone()
    _C.ea_blend(layout, addresses(params), addresses(centers), got.data_ptr(), 0.3, 1, 2)
    reference.ea_blend(
        params_ref,
        centers,
        expected,
        layout.offsets,
        0.3,
        layout.count_offset,
        2,
        1,
        layout.flag_offset,
    )
    flag = 0.0 if bad is None else 1.0
    assert float(got[layout.flag_offset]) == float(expected[layout.flag_offset]) == flag


@pytest.mark.parametrize("flag", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_skip_writes_zeros_only_when_flagged(flag: float, dtype: torch.dtype) -> None:
    sources = tensors_with(dtype, None)
    layout = layout_of(sources, torch.float32)
    buffer = torch.zeros(layout.buffer_numel)
    reference.pack(sources, buffer, layout.offsets, layout.count_offset, 2, 0)
    buffer[layout.flag_offset] = flag
    buffer[layout.count_offset + 1] = 1  # 2 contributors
    got, expected = poisoned_like(sources), poisoned_like(sources)
    _C.unpack(layout, addresses(got), buffer.data_ptr(), True, 2, True)
    reference.unpack(
        expected, buffer, layout.offsets, layout.count_offset, 2, True, layout.flag_offset, True
    )
    for g, e, s in zip(got, expected, sources, strict=True):
        assert torch.equal(g, e)
        if flag:
            assert bool((g == 0).all())
        else:
            torch.testing.assert_close(g.double(), s.double() / 2, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("flag", [0.0, 1.0])
def test_center_update_skip_leaves_centers_only_when_flagged(flag: float) -> None:
    centers = tensors_with(torch.float32, None)
    before = [c.clone() for c in centers]
    layout = layout_of(centers, torch.float32)
    buffer = torch.ones(layout.buffer_numel)
    buffer[layout.flag_offset] = flag
    _C.center_update(layout, addresses(centers), buffer.data_ptr(), 2, True)
    for c, b in zip(centers, before, strict=True):
        assert torch.equal(c, b if flag else b + 1)


@pytest.mark.parametrize("where", [0, -1])
def test_pack_flag_is_combined_across_threads(where: int) -> None:
    # 2^20 elements: four threads' pieces; the bad value in the first or the last.
    tensors = [torch.randn(1 << 19), torch.randn(1 << 19)]
    tensors[where].view(-1)[where] = float("nan")
    layout = layout_of(tensors, torch.float32)
    buffer = torch.full((layout.buffer_numel,), float("nan"))
    _C.pack(layout, addresses(tensors), buffer.data_ptr(), 0, 4)
    assert float(buffer[layout.flag_offset]) == 1.0
    tensors[where].view(-1)[where] = 0.0
    _C.pack(layout, addresses(tensors), buffer.data_ptr(), 0, 4)
    assert float(buffer[layout.flag_offset]) == 0.0
