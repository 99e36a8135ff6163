"""Every fused op of the extension against the pure-torch reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from tensor_cases import (
    DTYPES,
    ODD_SHAPES,
    fresh_seed,
    poisoned_like,
    random_tensors,
    tolerance,
)

from distlearn_cuda import _C, reference
from distlearn_cuda._native import DTYPE_CODES

CODES = DTYPE_CODES


def make_layout(
    tensors: list[torch.Tensor], buffer_dtype: torch.dtype, count_slots: int = 2
) -> _C.Layout:
    return _C.Layout(
        [t.numel() for t in tensors],
        [CODES[t.dtype] for t in tensors],
        CODES[buffer_dtype],
        count_slots,
    )


def addresses(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def nan_buffer(layout: _C.Layout, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((layout.buffer_numel,), float("nan"), dtype=dtype)


def written_part(layout: _C.Layout, buffer: torch.Tensor) -> torch.Tensor:
    """Segments and count slots, without the padding (which no op writes)."""
    parts = [buffer[o : o + n] for o, n in zip(layout.offsets, layout.numels, strict=True)]
    parts.append(buffer[layout.count_offset : layout.count_offset + layout.count_slots])
    return torch.cat(parts)


def count_args(layout: _C.Layout) -> tuple[int, int]:
    return layout.count_offset, layout.count_slots


PAIRS = list(itertools.product(DTYPES, DTYPES))


def case(tensor_dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return random_tensors(ODD_SHAPES, [tensor_dtype] * len(ODD_SHAPES), generator)


def test_layout_aligns_segments_and_count_slots() -> None:
    layout = _C.Layout([1, 3, 0, 20], [0, 1, 2, 3], 0, 3)
    assert layout.offsets == [0, 16, 32, 32]
    assert layout.count_offset == 64
    assert layout.count_slots == 3
    assert layout.buffer_numel == 80
    assert all(o % _C.kSegmentAlign == 0 for o in layout.offsets)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([1, 2], [0], 0, 1), "same length"),
        (([-1], [0], 0, 1), "numels\\[0\\]"),
        (([1], [7], 0, 1), "dtypes\\[0\\]"),
        (([1], [0], 9, 1), "buffer_dtype"),
        (([1], [0], 0, -1), "count_slots"),
    ],
)
def test_layout_rejects_bad_arguments(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _C.Layout(*args)


@pytest.mark.parametrize(("tensor_dtype", "buffer_dtype"), PAIRS)
def test_pack_matches_reference(tensor_dtype: torch.dtype, buffer_dtype: torch.dtype) -> None:
    tensors = case(tensor_dtype, seed=fresh_seed())
    layout = make_layout(tensors, buffer_dtype)
    got = nan_buffer(layout, buffer_dtype)
    expected = nan_buffer(layout, buffer_dtype)
    _C.pack(layout, addresses(tensors), got.data_ptr(), 1, 2)
    reference.pack(tensors, expected, layout.offsets, *count_args(layout), 1)
    got, expected = written_part(layout, got), written_part(layout, expected)
    if tensor_dtype == torch.float64 and buffer_dtype.itemsize == 2:
        # fp64 -> 16 bits goes through fp32 (see kernels/scalar_types.h).
        torch.testing.assert_close(got, expected, **tolerance(buffer_dtype))
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize(("tensor_dtype", "buffer_dtype"), PAIRS)
@pytest.mark.parametrize("normalize", [True, False])
def test_unpack_matches_reference(
    tensor_dtype: torch.dtype, buffer_dtype: torch.dtype, normalize: bool
) -> None:
    shapes_source = case(tensor_dtype, seed=fresh_seed())
    layout = make_layout(shapes_source, buffer_dtype, count_slots=2)
    buffer = torch.randn(layout.buffer_numel, dtype=torch.float64).to(buffer_dtype)
    buffer[layout.count_offset : layout.count_offset + 2] = torch.tensor([2.0, 1.0])
    got = poisoned_like(shapes_source)
    expected = poisoned_like(shapes_source)
    _C.unpack(layout, addresses(got), buffer.data_ptr(), normalize, 2)
    reference.unpack(expected, buffer, layout.offsets, *count_args(layout), normalize)
    for g, e in zip(got, expected, strict=True):
        assert not g.isnan().any()
        torch.testing.assert_close(g, e, **tolerance(tensor_dtype, buffer_dtype))
    if not normalize and buffer_dtype == tensor_dtype:
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


@pytest.mark.parametrize(("tensor_dtype", "buffer_dtype"), PAIRS)
@pytest.mark.parametrize("count_slot", [0, -1])
def test_ea_blend_matches_reference(
    tensor_dtype: torch.dtype, buffer_dtype: torch.dtype, count_slot: int
) -> None:
    params = case(tensor_dtype, seed=fresh_seed())
    centers = case(tensor_dtype, seed=fresh_seed())
    expected_params = [p.clone() for p in params]
    layout = make_layout(params, buffer_dtype)
    got = nan_buffer(layout, buffer_dtype)
    expected = nan_buffer(layout, buffer_dtype)
    alpha = 0.3
    _C.ea_blend(layout, addresses(params), addresses(centers), got.data_ptr(), alpha, count_slot, 2)
    reference.ea_blend(
        expected_params, centers, expected, layout.offsets, alpha, *count_args(layout), count_slot
    )
    tol = tolerance(tensor_dtype, buffer_dtype)
    got, expected = written_part(layout, got), written_part(layout, expected)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, **tol)
    for p, e in zip(params, expected_params, strict=True):
        torch.testing.assert_close(p, e, **tol)


@pytest.mark.parametrize(("tensor_dtype", "buffer_dtype"), PAIRS)
def test_center_update_matches_reference(
    tensor_dtype: torch.dtype, buffer_dtype: torch.dtype
) -> None:
    centers = case(tensor_dtype, seed=fresh_seed())
    expected_centers = [c.clone() for c in centers]
    layout = make_layout(centers, buffer_dtype)
    buffer = torch.randn(layout.buffer_numel, dtype=torch.float64).to(buffer_dtype)
    _C.center_update(layout, addresses(centers), buffer.data_ptr(), 2)
    reference.center_update(expected_centers, buffer, layout.offsets)
    for c, e in zip(centers, expected_centers, strict=True):
        torch.testing.assert_close(c, e, **tolerance(tensor_dtype, buffer_dtype))


def test_mixed_dtypes_in_one_list() -> None:
    generator = torch.Generator().manual_seed(fresh_seed())
    dtypes = [DTYPES[i % len(DTYPES)] for i in range(len(ODD_SHAPES))]
    tensors = random_tensors(ODD_SHAPES, dtypes, generator)
    layout = make_layout(tensors, torch.float64)
    buffer = nan_buffer(layout, torch.float64)
    _C.pack(layout, addresses(tensors), buffer.data_ptr(), 0, 2)
    out = poisoned_like(tensors)
    _C.unpack(layout, addresses(out), buffer.data_ptr(), False, 2)
    # fp64 holds every value of every dtype: the round trip is exact.
    assert all(torch.equal(o, t) for o, t in zip(out, tensors, strict=True))


@pytest.mark.parametrize("num_threads", [1, 2, 3, 8])
def test_result_does_not_depend_on_thread_count(num_threads: int) -> None:
    params = case(torch.float32, seed=fresh_seed())
    centers = case(torch.float32, seed=fresh_seed())
    layout = make_layout(params, torch.float32)
    single = [p.clone() for p in params]
    buffer_single = torch.zeros(layout.buffer_numel)
    buffer = torch.zeros(layout.buffer_numel)
    _C.ea_blend(layout, addresses(single), addresses(centers), buffer_single.data_ptr(), 0.5, 0, 1)
    _C.ea_blend(
        layout, addresses(params), addresses(centers), buffer.data_ptr(), 0.5, 0, num_threads
    )
    assert torch.equal(buffer, buffer_single)
    assert all(torch.equal(p, s) for p, s in zip(params, single, strict=True))


def test_dense_non_contiguous_tensors_use_memory_order() -> None:
    generator = torch.Generator().manual_seed(fresh_seed())
    channels_last = torch.randn(2, 3, 5, 7, generator=generator).to(
        memory_format=torch.channels_last
    )
    transposed = torch.randn(9, 4, generator=generator).t()
    tensors = [channels_last, transposed]
    layout = make_layout(tensors, torch.float32)
    got = nan_buffer(layout, torch.float32)
    expected = nan_buffer(layout, torch.float32)
    _C.pack(layout, addresses(tensors), got.data_ptr(), 0, 2)
    reference.pack(tensors, expected, layout.offsets, *count_args(layout), 0)
    assert torch.equal(written_part(layout, got), written_part(layout, expected))
    out = poisoned_like(tensors)
    _C.unpack(layout, addresses(out), got.data_ptr(), False, 2)
    assert all(torch.equal(o, t) for o, t in zip(out, tensors, strict=True))


def test_count_slots_and_normalization() -> None:
    tensors = [torch.full((5,), 6.0)]
    layout = make_layout(tensors, torch.float32, count_slots=3)
    buffer = nan_buffer(layout, torch.float32)
    _C.pack(layout, addresses(tensors), buffer.data_ptr(), 2, 1)
    slots = buffer[layout.count_offset : layout.count_offset + 3]
    assert slots.tolist() == [0.0, 0.0, 1.0]
    _C.pack(layout, addresses(tensors), buffer.data_ptr(), -1, 1)
    assert slots.tolist() == [0.0, 0.0, 0.0]
    slots.copy_(torch.tensor([1.0, 0.0, 2.0]))  # three contributors in total
    out = poisoned_like(tensors)
    _C.unpack(layout, addresses(out), buffer.data_ptr(), True, 1)
    assert out[0].tolist() == [2.0] * 5


def _special_floats() -> torch.Tensor:
    specials = [
        0.0,
        -0.0,
        float("inf"),
        float("-inf"),
        float("nan"),
        1.0,
        -1.0,
        65504.0,
        65519.99,
        65520.0,
        1e30,
        -1e30,  # fp16 max, last finite, first inf
        2.0**-14,
        2.0**-24,
        2.0**-25,
        2.0**-25 * 1.5,
        2.0**-26,
        3 * 2.0**-25,  # fp16 subnormals
        1.0 + 2.0**-11,
        1.0 + 3 * 2.0**-11,
        1.0 + 2.0**-8,
        1.0 + 3 * 2.0**-8,  # ties
        3.3895313892515355e38,
        1e-40,
        -1e-45,  # near fp32 max, fp32 subnormals
    ]
    bits = torch.randint(
        -(2**31), 2**31, (100_000,), generator=torch.Generator().manual_seed(fresh_seed())
    )
    return torch.cat([torch.tensor(specials, dtype=torch.float32), bits.int().view(torch.float32)])


@pytest.mark.parametrize("narrow", [torch.float16, torch.bfloat16])
def test_float_to_16_bit_rounds_like_torch(narrow: torch.dtype) -> None:
    values = _special_floats()
    layout = make_layout([values], narrow, count_slots=0)
    buffer = nan_buffer(layout, narrow)
    _C.pack(layout, addresses([values]), buffer.data_ptr(), -1, 2)
    got = buffer[: values.numel()]
    expected = values.to(narrow)
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("narrow", [torch.float16, torch.bfloat16])
def test_every_16_bit_value_widens_exactly(narrow: torch.dtype) -> None:
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).short().view(narrow)
    layout = make_layout([values], torch.float32, count_slots=0)
    buffer = nan_buffer(layout, torch.float32)
    _C.pack(layout, addresses([values]), buffer.data_ptr(), -1, 2)
    got = buffer[: values.numel()]
    expected = values.float()
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), expected[~nan].view(torch.int32))


def test_ops_reject_bad_addresses() -> None:
    tensors = [torch.zeros(4), torch.zeros(3)]
    layout = make_layout(tensors, torch.float32)
    buffer = torch.zeros(layout.buffer_numel)
    with pytest.raises(ValueError, match="expected 2 tensors, got 1"):
        _C.pack(layout, addresses(tensors[:1]), buffer.data_ptr(), 0, 1)
    with pytest.raises(ValueError, match="null address"):
        _C.unpack(layout, [tensors[0].data_ptr(), 0], buffer.data_ptr(), False, 1)
    with pytest.raises(ValueError, match="buffer is a null address"):
        _C.center_update(layout, addresses(tensors), 0, 1)
    with pytest.raises(ValueError, match="count_slot 2 is out of range"):
        _C.ea_blend(layout, addresses(tensors), addresses(tensors), buffer.data_ptr(), 0.1, 2, 1)
    with pytest.raises(ValueError, match="num_threads"):
        _C.pack(layout, addresses(tensors), buffer.data_ptr(), 0, 0)


def clones(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


@pytest.mark.parametrize(("tensor_dtype", "buffer_dtype"), PAIRS)
def test_catch_up_blend_is_bitwise_the_two_passes(
    tensor_dtype: torch.dtype, buffer_dtype: torch.dtype
) -> None:
    seed = fresh_seed()
    params, centers = case(tensor_dtype, seed), case(tensor_dtype, seed + 1)
    layout = make_layout(params, buffer_dtype)
    buffer = nan_buffer(layout, buffer_dtype)
    previous_sum = case(tensor_dtype, seed + 2)
    reference.pack(previous_sum, buffer, layout.offsets, *count_args(layout), 0)
    fused = (clones(params), clones(centers), buffer.clone())
    in_reference = (clones(params), clones(centers), buffer.clone())

    # Two passes: the previous round's center update, then this round's blend.
    _C.center_update(layout, addresses(centers), buffer.data_ptr(), 2)
    _C.ea_blend(layout, addresses(params), addresses(centers), buffer.data_ptr(), 0.3, 1, 2)
    # One pass.
    fused_params, fused_centers, fused_buffer = fused
    _C.ea_blend(
        layout,
        addresses(fused_params),
        addresses(fused_centers),
        fused_buffer.data_ptr(),
        0.3,
        1,
        2,
        True,
    )
    assert torch.equal(written_part(layout, fused_buffer), written_part(layout, buffer))
    for got, want in zip(fused_params + fused_centers, params + centers, strict=True):
        assert torch.equal(got, want)

    ref_params, ref_centers, ref_buffer = in_reference
    reference.ea_blend(
        ref_params,
        ref_centers,
        ref_buffer,
        layout.offsets,
        0.3,
        *count_args(layout),
        1,
        catch_up=True,
    )
    tol = tolerance(tensor_dtype, buffer_dtype)
    for got, want in zip(fused_params + fused_centers, ref_params + ref_centers, strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_a_plan_runs_the_reference_kernels_like_the_extensions() -> None:
    # A device the extension has no kernels for gets reference's, through
    # the same Plan calls (only CUDA without the CUDA flavor reaches it in
    # use, so here a CPU plan is given them): every op, every argument.
    from distlearn_cuda._tensors import plan as plan_module
    from distlearn_cuda._tensors.tree import Flat
    from distlearn_cuda._tensors.validate import signature

    def run(kernels: object) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        params = random_tensors(ODD_SHAPES, [torch.float32] * len(ODD_SHAPES), generator)
        centers = [p.flip(0).clone() for p in params]
        grads = [p * 0.5 for p in params]
        sig = signature(Flat(params, [str(i) for i in range(len(params))], list), "params")
        plan = plan_module.Plan(sig, torch.float32, slots_per_code=2, codes=2)
        plan._kernels = kernels
        decision = plan_module.Plan(sig, torch.float32, slots_per_code=2, codes=2)
        decision._kernels = kernels
        plan.buffer.fill_(float("nan"))
        plan.pack(grads, addresses(grads), count_slot=plan.count_slot(1, code=1))
        decision.pack(grads, addresses(grads), count_slot=decision.count_slot(0, code=1))
        packed = plan.buffer.clone()
        plan.unpack(grads, addresses(grads), True, True, (decision, 1))
        plan.ea_blend(params, addresses(params), centers, addresses(centers), 0.3, 0, True)
        plan.center_update(centers, addresses(centers), skip_nonfinite=True)
        momenta = [p * 0.25 for p in params]
        plan.outer_gradient(grads, addresses(grads), centers, addresses(centers), 1)
        outer = plan.buffer.clone()
        plan.outer_step(
            plan_module.OuterStep(
                *(grads, _C.Addresses(addresses(grads))),
                *(centers, _C.Addresses(addresses(centers))),
                *(momenta, _C.Addresses(addresses(momenta))),
                *(0.7, 0.9, True, 0.5, True),
            )
        )
        return [packed, outer, *grads, *params, *centers, *momenta, plan.buffer]

    seed = fresh_seed()
    extension = run(plan_module._CPU_KERNELS)
    oracle = run(plan_module._ReferenceKernels)
    for got, want in zip(extension, oracle, strict=True):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("tensor_dtype", "buffer_dtype"), PAIRS)
@pytest.mark.parametrize("count_slot", [1, -1])
def test_outer_gradient_matches_reference(
    tensor_dtype: torch.dtype, buffer_dtype: torch.dtype, count_slot: int
) -> None:
    locals_ = case(tensor_dtype, seed=fresh_seed())
    globals_ = case(tensor_dtype, seed=fresh_seed())
    before = [t.clone() for t in locals_ + globals_]
    layout = make_layout(locals_, buffer_dtype)
    got, expected = nan_buffer(layout, buffer_dtype), nan_buffer(layout, buffer_dtype)
    _C.outer_gradient(
        layout, addresses(locals_), addresses(globals_), got.data_ptr(), count_slot, 2
    )
    reference.outer_gradient(
        locals_, globals_, expected, layout.offsets, *count_args(layout), count_slot
    )
    got, expected = written_part(layout, got), written_part(layout, expected)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, **tolerance(tensor_dtype, buffer_dtype))
    for t, b in zip(locals_ + globals_, before, strict=True):
        assert torch.equal(t, b), "outer_gradient only reads the params"


# (lr, momentum, nesterov, mix): the paper's, plain momentum with a merge, none.
OUTER_SETTINGS = [(0.7, 0.9, True, 0.0), (0.5, 0.8, False, 0.4), (1.0, 0.0, False, 0.25)]


@pytest.mark.parametrize(("tensor_dtype", "buffer_dtype"), PAIRS)
@pytest.mark.parametrize("settings", OUTER_SETTINGS)
def test_outer_step_matches_reference(
    tensor_dtype: torch.dtype,
    buffer_dtype: torch.dtype,
    settings: tuple[float, float, bool, float],
) -> None:
    tensors = [case(tensor_dtype, seed=fresh_seed()) for _ in range(3)]
    expected = [[t.clone() for t in group] for group in tensors]
    layout = make_layout(tensors[0], buffer_dtype)
    buffer = torch.randn(layout.buffer_numel, dtype=torch.float64).to(buffer_dtype)
    buffer[layout.count_offset : layout.count_offset + 2] = torch.tensor([2.0, 1.0])
    buffer[layout.flag_offset] = 0
    lr, momentum, nesterov, mix = settings
    _C.outer_step(
        layout, *map(addresses, tensors), buffer.data_ptr(), lr, momentum, nesterov, mix, 2
    )
    reference.outer_step(
        *expected, buffer, layout.offsets, *count_args(layout), lr, momentum, nesterov, mix
    )
    tol = tolerance(tensor_dtype, buffer_dtype)
    tol = {"rtol": 4 * tol["rtol"], "atol": 4 * tol["atol"]}  # the momentum amplifies roundings
    for name, got, want in zip(("locals", "globals", "momenta"), tensors, expected, strict=True):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mix", [0.0, 0.5])
@pytest.mark.parametrize("input_", ["skipped", "nobody"])
def test_outer_step_skips_alike_with_the_reference(mix: float, input_: str) -> None:
    # A raised flag (skip): globals and momenta stay, locals take the globals.
    # No contributor: nothing moves (locals equal the globals when mix is 0).
    tensors = [case(torch.float32, seed=fresh_seed()) for _ in range(3)]
    if input_ == "nobody" and mix == 0:
        tensors[0] = [g.clone() for g in tensors[1]]
    before = [[t.clone() for t in group] for group in tensors]
    expected = [[t.clone() for t in group] for group in tensors]
    layout = make_layout(tensors[0], torch.float32)
    buffer = torch.randn(layout.buffer_numel)
    counts = [2.0, 1.0] if input_ == "skipped" else [0.0, 0.0]
    buffer[layout.count_offset : layout.count_offset + 2] = torch.tensor(counts)
    buffer[layout.flag_offset] = 1.0 if input_ == "skipped" else 0.0
    args = (0.7, 0.9, True, mix)
    _C.outer_step(layout, *map(addresses, tensors), buffer.data_ptr(), *args, 2, True)
    reference.outer_step(
        *expected, buffer, layout.offsets, *count_args(layout), *args, layout.flag_offset, True
    )
    want_locals = before[1] if input_ == "skipped" else before[0]
    for got, want in zip(tensors, [want_locals, before[1], before[2]], strict=True):
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    for got, want in zip(tensors, expected, strict=True):
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


@pytest.mark.parametrize(
    ("lr", "momentum", "mix", "message"),
    [
        (-0.1, 0.9, 0.0, "lr must be finite"),
        (float("nan"), 0.9, 0.0, "lr must be finite"),
        (0.7, 1.0, 0.0, "momentum must be in"),
        (0.7, 0.9, 1.0, "mix must be in"),
    ],
)
def test_outer_step_rejects_bad_settings(
    lr: float, momentum: float, mix: float, message: str
) -> None:
    tensors = [case(torch.float32, seed=1) for _ in range(3)]
    layout = make_layout(tensors[0], torch.float32)
    buffer = torch.zeros(layout.buffer_numel)
    before = [t.clone() for group in tensors for t in group]
    with pytest.raises(ValueError, match=message):
        _C.outer_step(
            layout, *map(addresses, tensors), buffer.data_ptr(), lr, momentum, True, mix, 1
        )
    after = [t for group in tensors for t in group]
    assert all(torch.equal(t, b) for t, b in zip(after, before, strict=True))
