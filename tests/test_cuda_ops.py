"""The CUDA flavor of every fused op against the reference and the CPU flavor.

Runs where the extension was built with CUDA and a GPU is present; skipped
(and reported as skipped) elsewhere. The GPU script scripts/gpu_check.sh runs
it, under compute-sanitizer too.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from tensor_cases import (
    DTYPES,
    ODD_SHAPES,
    fresh_seed,
    needs_gpu,
    poisoned_like,
    random_tensors,
    tolerance,
)

from distlearn_cuda import _C, reference
from distlearn_cuda._native import DTYPE_CODES

pytestmark = needs_gpu

_SHORT = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
# Every (tensor, buffer) dtype pair, with ids such as "f32_bf16" that
# scripts/gpu_check.sh selects a representative subset by.
PAIRS = [
    pytest.param(t, b, id=f"{_SHORT[t]}_{_SHORT[b]}") for t, b in itertools.product(DTYPES, DTYPES)
]
# Many small tensors: more than one launch's parameters hold, for one
# stream (pack, unpack, center_update) and two (the EA blends), so the
# list splits into several launches; and views whose data pointer is not
# 16-byte aligned (storage offset 1).
MANY_SMALL = [(n % 37 + 1,) for n in range(2 * _C.kLaunchCapacity + 70)]


def misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """t at storage offset 1: its data pointer is not 16-byte aligned."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


def cuda_tensors(
    shapes: list[tuple[int, ...]], dtypes: list[torch.dtype], misaligned: bool
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(fresh_seed())
    tensors = [t.cuda() for t in random_tensors(shapes, dtypes, generator)]
    return [misaligned_copy(t) for t in tensors] if misaligned else tensors


def cuda_case(shapes: list[tuple[int, ...]], dtype: torch.dtype, misaligned: bool) -> list:
    return cuda_tensors(shapes, [dtype] * len(shapes), misaligned)


def layout_of(tensors: list[torch.Tensor], buffer_dtype: torch.dtype) -> _C.Layout:
    codes = [DTYPE_CODES[t.dtype] for t in tensors]
    return _C.Layout([t.numel() for t in tensors], codes, DTYPE_CODES[buffer_dtype], 2)


def addresses(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def written(layout: _C.Layout, buffer: torch.Tensor) -> torch.Tensor:
    parts = [buffer[o : o + n] for o, n in zip(layout.offsets, layout.numels, strict=True)]
    parts.append(buffer[layout.count_offset : layout.count_offset + layout.count_slots])
    return torch.cat(parts)


CASES = [
    pytest.param("odd", ODD_SHAPES, False, id="odd"),
    pytest.param("misaligned", ODD_SHAPES, True, id="misaligned"),
    pytest.param("many", MANY_SMALL, False, id="many"),
]


@pytest.mark.parametrize(("tensor_dtype", "buffer_dtype"), PAIRS)
@pytest.mark.parametrize(("name", "shapes", "misaligned"), CASES)
def test_pack_then_unpack_match_reference(
    tensor_dtype: torch.dtype, buffer_dtype: torch.dtype, name: str, shapes: list, misaligned: bool
) -> None:
    tensors = cuda_case(shapes, tensor_dtype, misaligned)
    layout = layout_of(tensors, buffer_dtype)
    got = torch.full((layout.buffer_numel,), float("nan"), dtype=buffer_dtype, device="cuda")
    expected = got.clone()
    _C.pack_cuda(layout, addresses(tensors), got.data_ptr(), 1, stream())
    reference.pack(tensors, expected, layout.offsets, layout.count_offset, 2, 1)
    torch.testing.assert_close(written(layout, got), written(layout, expected), rtol=0, atol=0)

    got[layout.count_offset] = 2  # contributor count 3 = 2 + 1
    expected.copy_(got)
    out, out_expected = poisoned_like(tensors), poisoned_like(tensors)
    _C.unpack_cuda(layout, addresses(out), got.data_ptr(), True, stream())
    reference.unpack(out_expected, expected, layout.offsets, layout.count_offset, 2, True)
    for o, e in zip(out, out_expected, strict=True):
        assert not o.isnan().any()
        torch.testing.assert_close(o, e, **tolerance(tensor_dtype, buffer_dtype))


@pytest.mark.parametrize(("tensor_dtype", "buffer_dtype"), PAIRS)
@pytest.mark.parametrize(("name", "shapes", "misaligned"), CASES)
def test_ea_blend_and_center_update_match_reference(
    tensor_dtype: torch.dtype, buffer_dtype: torch.dtype, name: str, shapes: list, misaligned: bool
) -> None:
    params = cuda_case(shapes, tensor_dtype, misaligned)
    centers = cuda_case(shapes, tensor_dtype, misaligned)
    params_expected, centers_expected = [p.clone() for p in params], [c.clone() for c in centers]
    layout = layout_of(params, buffer_dtype)
    got = torch.full((layout.buffer_numel,), float("nan"), dtype=buffer_dtype, device="cuda")
    expected = got.clone()
    _C.ea_blend_cuda(
        layout, addresses(params), addresses(centers), got.data_ptr(), 0.3, 0, stream()
    )
    reference.ea_blend(
        params_expected, centers_expected, expected, layout.offsets, 0.3, layout.count_offset, 2, 0
    )
    tol = tolerance(tensor_dtype, buffer_dtype)
    torch.testing.assert_close(written(layout, got), written(layout, expected), **tol)
    for p, e in zip(params, params_expected, strict=True):
        torch.testing.assert_close(p, e, **tol)

    _C.center_update_cuda(layout, addresses(centers), got.data_ptr(), stream())
    reference.center_update(centers_expected, got, layout.offsets)
    for c, e in zip(centers, centers_expected, strict=True):
        torch.testing.assert_close(c, e, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_and_cpu_flavors_are_bit_identical(dtype: torch.dtype) -> None:
    params = cuda_case(ODD_SHAPES, dtype, misaligned=False)
    centers = cuda_case(ODD_SHAPES, dtype, misaligned=False)
    params_cpu, centers_cpu = [p.cpu() for p in params], [c.cpu() for c in centers]
    layout = layout_of(params, torch.float32)
    buffer = torch.zeros(layout.buffer_numel, device="cuda")
    buffer_cpu = torch.zeros(layout.buffer_numel)
    _C.ea_blend_cuda(
        layout, addresses(params), addresses(centers), buffer.data_ptr(), 0.25, 0, stream()
    )
    _C.ea_blend(
        layout, addresses(params_cpu), addresses(centers_cpu), buffer_cpu.data_ptr(), 0.25, 0, 2
    )
    assert torch.equal(buffer.cpu(), buffer_cpu)
    assert all(torch.equal(p.cpu(), q) for p, q in zip(params, params_cpu, strict=True))


def test_address_lists_of_another_length_are_rejected() -> None:
    tensors = cuda_case([(5,), (7,)], torch.float32, misaligned=False)
    layout = layout_of(tensors, torch.float32)
    buffer = torch.zeros(layout.buffer_numel, device="cuda")
    with pytest.raises(ValueError, match="expected 2 tensors, got 1"):
        _C.pack_cuda(layout, addresses(tensors[:1]), buffer.data_ptr(), 0, stream())
    with pytest.raises(ValueError, match="centers: expected 2 tensors, got 1"):
        _C.ea_blend_cuda(
            layout, addresses(tensors), addresses(tensors[:1]), buffer.data_ptr(), 0.5, 0, stream()
        )


def mixed_case(shapes: list[tuple[int, ...]], misaligned: bool) -> list[torch.Tensor]:
    """shapes with the dtypes taking turns: one group of launches per dtype."""
    return cuda_tensors(shapes, [DTYPES[i % len(DTYPES)] for i in range(len(shapes))], misaligned)


# Odd sizes, and a list long enough that each dtype's group needs two
# launches (about 1,050 tensors of each dtype: more than one launch holds,
# 1,015 tensors for one stream, 812 for two).
MIXED_SHAPES = {"odd": ODD_SHAPES, "many": (ODD_SHAPES + MANY_SMALL * 2)}


MIXED_CASES = [
    *itertools.product(["odd"], [torch.float64, torch.float32], [False, True]),
    ("many", torch.float32, True),
]


@pytest.mark.parametrize(("shapes", "buffer_dtype", "misaligned"), MIXED_CASES)
def test_mixed_dtype_lists_match_reference_and_cpu_flavor(
    shapes: str, buffer_dtype: torch.dtype, misaligned: bool
) -> None:
    params = mixed_case(MIXED_SHAPES[shapes], misaligned)
    centers = mixed_case(MIXED_SHAPES[shapes], not misaligned)
    params_ref, centers_ref = [p.clone() for p in params], [c.clone() for c in centers]
    params_cpu, centers_cpu = [p.cpu() for p in params], [c.cpu() for c in centers]
    layout = layout_of(params, buffer_dtype)
    got = torch.full((layout.buffer_numel,), float("nan"), dtype=buffer_dtype, device="cuda")
    expected = got.clone()
    got_cpu = got.cpu()
    _C.ea_blend_cuda(
        layout, addresses(params), addresses(centers), got.data_ptr(), 0.7, 1, stream()
    )
    _C.ea_blend(
        layout, addresses(params_cpu), addresses(centers_cpu), got_cpu.data_ptr(), 0.7, 1, 2
    )
    reference.ea_blend(
        params_ref, centers_ref, expected, layout.offsets, 0.7, layout.count_offset, 2, 1
    )
    # Same element code as the CPU flavor: bit-identical; the reference: close.
    assert torch.equal(written(layout, got).cpu(), written(layout, got_cpu))
    for p, q, r in zip(params, params_cpu, params_ref, strict=True):
        assert torch.equal(p.cpu(), q)
        torch.testing.assert_close(p, r, **tolerance(p.dtype, buffer_dtype))

    out, out_cpu = poisoned_like(params), poisoned_like(params_cpu)
    _C.unpack_cuda(layout, addresses(out), got.data_ptr(), True, stream())
    _C.unpack(layout, addresses(out_cpu), got_cpu.data_ptr(), True, 2)
    for o, c in zip(out, out_cpu, strict=True):
        assert not o.isnan().any()
        assert torch.equal(o.cpu(), c)


def test_a_list_of_empty_tensors_still_writes_its_count_slot() -> None:
    tensors = [torch.empty(0, device="cuda"), torch.empty(0, 3, device="cuda")]
    layout = layout_of(tensors, torch.float32)
    buffer = torch.full((layout.buffer_numel,), float("nan"), device="cuda")
    _C.pack_cuda(layout, addresses(tensors), buffer.data_ptr(), 1, stream())
    slots = buffer[layout.count_offset : layout.count_offset + layout.count_slots]
    assert slots.tolist() == [0.0, 1.0]


@pytest.mark.parametrize(("tensor_dtype", "buffer_dtype"), PAIRS)
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_pack_and_blend_flag_nonfinite_values_like_the_cpu_flavor(
    tensor_dtype: torch.dtype, buffer_dtype: torch.dtype, bad: float | None
) -> None:
    tensors = cuda_case(ODD_SHAPES, tensor_dtype, misaligned=False)
    centers = cuda_case(ODD_SHAPES, tensor_dtype, misaligned=True)
    if bad is not None:
        tensors[-2].view(-1)[tensors[-2].numel() // 2] = bad
    layout = layout_of(tensors, buffer_dtype)
    want = 0.0 if bad is None else 1.0
    buffer = torch.full((layout.buffer_numel,), float("nan"), dtype=buffer_dtype, device="cuda")
    _C.pack_cuda(layout, addresses(tensors), buffer.data_ptr(), 0, stream())
    assert float(buffer[layout.flag_offset]) == want
    buffer.fill_(float("nan"))
    _C.ea_blend_cuda(
        layout, addresses(tensors), addresses(centers), buffer.data_ptr(), 0.5, 0, stream()
    )
    assert float(buffer[layout.flag_offset]) == want


@pytest.mark.parametrize("flag", [0.0, 2.0])
def test_unpack_and_center_update_skip_when_flagged(flag: float) -> None:
    tensors = cuda_case(ODD_SHAPES, torch.float32, misaligned=False)
    layout = layout_of(tensors, torch.float32)
    buffer = torch.ones(layout.buffer_numel, device="cuda")
    buffer[layout.count_offset : layout.count_offset + layout.count_slots] = 0.5  # count 1
    buffer[layout.flag_offset] = flag
    before = [t.clone() for t in tensors]
    _C.center_update_cuda(layout, addresses(tensors), buffer.data_ptr(), stream(), True)
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(t, b if flag else b + 1)
    out = poisoned_like(tensors)
    _C.unpack_cuda(layout, addresses(out), buffer.data_ptr(), True, stream(), True)
    for o in out:
        assert bool((o == (0.0 if flag else 1.0)).all())


@pytest.mark.parametrize(("tensor_dtype", "buffer_dtype"), PAIRS)
def test_catch_up_blend_is_bitwise_the_two_passes_and_the_cpu_flavor(
    tensor_dtype: torch.dtype, buffer_dtype: torch.dtype
) -> None:
    params = cuda_case(ODD_SHAPES, tensor_dtype, misaligned=False)
    centers = cuda_case(ODD_SHAPES, tensor_dtype, misaligned=True)
    previous_sum = cuda_case(ODD_SHAPES, tensor_dtype, misaligned=False)
    layout = layout_of(params, buffer_dtype)
    buffer = torch.full((layout.buffer_numel,), float("nan"), dtype=buffer_dtype, device="cuda")
    reference.pack(previous_sum, buffer, layout.offsets, layout.count_offset, 2, 0)
    fused_params, fused_centers = [p.clone() for p in params], [c.clone() for c in centers]
    fused_buffer = buffer.clone()
    cpu_params, cpu_centers = [p.cpu() for p in params], [c.cpu() for c in centers]
    cpu_buffer = buffer.cpu()

    _C.center_update_cuda(layout, addresses(centers), buffer.data_ptr(), stream())
    _C.ea_blend_cuda(
        layout, addresses(params), addresses(centers), buffer.data_ptr(), 0.3, 1, stream()
    )
    fused_addresses = addresses(fused_params), addresses(fused_centers)
    _C.ea_blend_cuda(layout, *fused_addresses, fused_buffer.data_ptr(), 0.3, 1, stream(), True)
    _C.ea_blend(
        layout,
        addresses(cpu_params),
        addresses(cpu_centers),
        cpu_buffer.data_ptr(),
        0.3,
        1,
        2,
        True,
    )
    assert torch.equal(written(layout, fused_buffer), written(layout, buffer))
    assert torch.equal(written(layout, fused_buffer).cpu(), written(layout, cpu_buffer))
    for got, two_pass, cpu in zip(
        fused_params + fused_centers, params + centers, cpu_params + cpu_centers, strict=True
    ):
        assert torch.equal(got, two_pass) and torch.equal(got.cpu(), cpu)


def test_launches_are_captured_in_a_cuda_graph_and_replayed() -> None:
    # NOTE [Kernel parameters] (kernels/multi_tensor_engine.h): a list of
    # four dtypes, two launches each, replays with no table to keep alive.
    tensors = mixed_case(MIXED_SHAPES["many"], misaligned=False)
    layout = layout_of(tensors, torch.float32)
    buffer = torch.full((layout.buffer_numel,), float("nan"), device="cuda")
    capture = torch.cuda.Stream()
    capture.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture):  # warm up off the capture, as torch recommends
        _C.pack_cuda(layout, addresses(tensors), buffer.data_ptr(), 1, stream())
    torch.cuda.current_stream().wait_stream(capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _C.pack_cuda(layout, addresses(tensors), buffer.data_ptr(), 1, stream())
    for t in tensors:
        t.copy_(torch.randn_like(t, dtype=torch.float64))
    buffer.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    expected = torch.full_like(buffer, float("nan"))
    reference.pack(tensors, expected, layout.offsets, layout.count_offset, 2, 1)
    assert torch.equal(written(layout, buffer), written(layout, expected))


@pytest.mark.parametrize(("tensor_dtype", "buffer_dtype"), PAIRS)
@pytest.mark.parametrize(("name", "shapes", "misaligned"), CASES)
@pytest.mark.parametrize("mix", [0.0, 0.4])
def test_outer_gradient_and_outer_step_match_reference(
    tensor_dtype: torch.dtype,
    buffer_dtype: torch.dtype,
    name: str,
    shapes: list,
    misaligned: bool,
    mix: float,
) -> None:
    # DiLoCo's two ops: three tensor streams (locals, globals, momenta).
    locals_, globals_, momenta = (cuda_case(shapes, tensor_dtype, misaligned) for _ in range(3))
    expected = [[t.clone() for t in group] for group in (locals_, globals_, momenta)]
    layout = layout_of(locals_, buffer_dtype)
    got = torch.full((layout.buffer_numel,), float("nan"), dtype=buffer_dtype, device="cuda")
    want = got.clone()
    _C.outer_gradient_cuda(
        layout, addresses(locals_), addresses(globals_), got.data_ptr(), 1, stream()
    )
    reference.outer_gradient(
        expected[0], expected[1], want, layout.offsets, layout.count_offset, 2, 1
    )
    tol = tolerance(tensor_dtype, buffer_dtype)
    torch.testing.assert_close(written(layout, got), written(layout, want), **tol)
    got[layout.count_offset] = 2  # contributor count 3 = 2 + 1
    want.copy_(got)
    settings = (0.7, 0.9, True, mix)
    _C.outer_step_cuda(
        layout, *map(addresses, (locals_, globals_, momenta)), got.data_ptr(), *settings, stream()
    )
    reference.outer_step(*expected, want, layout.offsets, layout.count_offset, 2, *settings)
    tol = {"rtol": 4 * tol["rtol"], "atol": 4 * tol["atol"]}
    for got_group, want_group in zip((locals_, globals_, momenta), expected, strict=True):
        for g, w in zip(got_group, want_group, strict=True):
            torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_outer_ops_cuda_and_cpu_flavors_are_bit_identical(dtype: torch.dtype) -> None:
    groups = [cuda_case(ODD_SHAPES, dtype, misaligned=False) for _ in range(3)]
    groups_cpu = [[t.cpu() for t in group] for group in groups]
    layout = layout_of(groups[0], torch.float32)
    buffer = torch.zeros(layout.buffer_numel, device="cuda")
    buffer_cpu = torch.zeros(layout.buffer_numel)
    _C.outer_gradient_cuda(layout, *map(addresses, groups[:2]), buffer.data_ptr(), 0, stream())
    _C.outer_gradient(layout, *map(addresses, groups_cpu[:2]), buffer_cpu.data_ptr(), 0, 2)
    assert torch.equal(buffer.cpu(), buffer_cpu)
    settings = (0.7, 0.9, True, 0.3)
    _C.outer_step_cuda(layout, *map(addresses, groups), buffer.data_ptr(), *settings, stream())
    _C.outer_step(layout, *map(addresses, groups_cpu), buffer_cpu.data_ptr(), *settings, 2)
    for group, group_cpu in zip(groups, groups_cpu, strict=True):
        assert all(torch.equal(t.cpu(), u) for t, u in zip(group, group_cpu, strict=True))
