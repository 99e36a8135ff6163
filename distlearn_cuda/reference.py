"""Pure-torch reference of every fused op: the oracle of the tests.

Each function does, one tensor at a time and in float64, what the matching
op of ``distlearn_cuda._C`` does in one fused pass. It is written for
clarity, not speed. The library also runs it for tensors on devices that the
built extension has no kernels for, so it stays correct there too.

Buffer layout (see ``kernels/layout.h``): tensor ``i`` occupies
``buffer[offsets[i] : offsets[i] + tensors[i].numel()]`` in the tensor's
memory order, ``count_slots`` slots start at ``count_offset``, and the
non-finite flag is at ``flag_offset`` (the ops below leave it alone when
given None).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "center_update",
    "ea_blend",
    "memory_view",
    "outer_gradient",
    "outer_step",
    "pack",
    "unpack",
]


def memory_view(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's elements in memory order."""
    return tensor.as_strided((tensor.numel(),), (1,))


def _segment(buffer: torch.Tensor, offset: int, tensor: torch.Tensor) -> torch.Tensor:
    return buffer[offset : offset + tensor.numel()]


def _write_count_slots(
    buffer: torch.Tensor, count_offset: int, count_slots: int, count_slot: int
) -> None:
    slots = buffer[count_offset : count_offset + count_slots]
    slots.zero_()
    if count_slot >= 0:
        slots[count_slot] = 1


def _write_flag(
    buffer: torch.Tensor, offsets: Sequence[int], like: Sequence[torch.Tensor], flag_offset: int
) -> None:
    """flag <- 1 if a value written to the buffer segments is a NaN or an infinity."""
    segments = [_segment(buffer, o, t) for t, o in zip(like, offsets, strict=True)]
    buffer[flag_offset] = 0 if all(bool(s.isfinite().all()) for s in segments) else 1


def _flag_raised(buffer: torch.Tensor, flag_offset: int | None) -> bool:
    return flag_offset is not None and float(buffer[flag_offset]) != 0


def pack(
    tensors: Sequence[torch.Tensor],
    buffer: torch.Tensor,
    offsets: Sequence[int],
    count_offset: int,
    count_slots: int,
    count_slot: int,
    flag_offset: int | None = None,
) -> None:
    """buffer segments <- tensors (cast); count slot ``count_slot`` <- 1, the
    others 0; flag <- whether a packed value is not finite."""
    for tensor, offset in zip(tensors, offsets, strict=True):
        _segment(buffer, offset, tensor).copy_(memory_view(tensor).double())
    _write_count_slots(buffer, count_offset, count_slots, count_slot)
    if flag_offset is not None:
        _write_flag(buffer, offsets, tensors, flag_offset)


def unpack(
    tensors: Sequence[torch.Tensor],
    buffer: torch.Tensor,
    offsets: Sequence[int],
    count_offset: int,
    count_slots: int,
    normalize: bool,
    flag_offset: int | None = None,
    skip_nonfinite: bool = False,
    agreement: tuple[torch.Tensor, int, int] | None = None,
) -> None:
    """tensors <- buffer segments * (1 / contributor count if normalize else 1);
    zeros when ``skip_nonfinite`` and the flag is set, or when ``agreement``
    (count slots, first, count) does not hold every contributor in slots
    [first, first + count)."""
    disagree = False
    if agreement is not None:
        slots, first, count = agreement
        values = slots.double()
        disagree = float(values[first : first + count].sum()) != float(values.sum())
    if disagree or (skip_nonfinite and _flag_raised(buffer, flag_offset)):
        for tensor in tensors:
            tensor.zero_()
        return
    contributors = float(buffer[count_offset : count_offset + count_slots].double().sum())
    scale = 1.0 / contributors if normalize and contributors > 0 else 1.0
    for tensor, offset in zip(tensors, offsets, strict=True):
        memory_view(tensor).copy_(_segment(buffer, offset, tensor).double() * scale)


def ea_blend(
    params: Sequence[torch.Tensor],
    centers: Sequence[torch.Tensor],
    buffer: torch.Tensor,
    offsets: Sequence[int],
    alpha: float,
    count_offset: int,
    count_slots: int,
    count_slot: int,
    flag_offset: int | None = None,
    catch_up: bool = False,
) -> None:
    """delta = alpha * (x - center) into the buffer (rounded to its dtype), x -= delta;
    count slots and flag (of the deltas) as ``pack``. With ``catch_up``, first
    ``center_update`` from the buffer (the previous round's sum)."""
    if catch_up:
        center_update(centers, buffer, offsets)
    for x, center, offset in zip(params, centers, offsets, strict=True):
        x64 = memory_view(x).double()
        delta = (alpha * (x64 - memory_view(center).double())).to(buffer.dtype)
        _segment(buffer, offset, x).copy_(delta)
        memory_view(x).copy_(x64 - delta.double())
    _write_count_slots(buffer, count_offset, count_slots, count_slot)
    if flag_offset is not None:
        _write_flag(buffer, offsets, params, flag_offset)


def center_update(
    centers: Sequence[torch.Tensor],
    buffer: torch.Tensor,
    offsets: Sequence[int],
    flag_offset: int | None = None,
    skip_nonfinite: bool = False,
) -> None:
    """centers += buffer segments (the allreduced deltas); nothing when
    ``skip_nonfinite`` and the flag is set."""
    if skip_nonfinite and _flag_raised(buffer, flag_offset):
        return
    for center, offset in zip(centers, offsets, strict=True):
        view = memory_view(center)
        view.copy_(view.double() + _segment(buffer, offset, center).double())


def outer_gradient(
    locals_: Sequence[torch.Tensor],
    globals_: Sequence[torch.Tensor],
    buffer: torch.Tensor,
    offsets: Sequence[int],
    count_offset: int,
    count_slots: int,
    count_slot: int,
    flag_offset: int | None = None,
) -> None:
    """buffer segments <- globals - locals (DiLoCo's outer gradient); count
    slots and flag as ``pack``."""
    for local, global_, offset in zip(locals_, globals_, offsets, strict=True):
        grad = memory_view(global_).double() - memory_view(local).double()
        _segment(buffer, offset, local).copy_(grad)
    _write_count_slots(buffer, count_offset, count_slots, count_slot)
    if flag_offset is not None:
        _write_flag(buffer, offsets, locals_, flag_offset)


def outer_step(
    locals_: Sequence[torch.Tensor],
    globals_: Sequence[torch.Tensor],
    momenta: Sequence[torch.Tensor],
    buffer: torch.Tensor,
    offsets: Sequence[int],
    count_offset: int,
    count_slots: int,
    lr: float,
    momentum: float,
    nesterov: bool,
    mix: float,
    flag_offset: int | None = None,
    skip_nonfinite: bool = False,
) -> None:
    """DiLoCo's outer step: g = buffer / contributors; as
    ``torch.optim.SGD(lr, momentum, nesterov)`` with ``momenta`` as its
    buffers (stored in their dtype), globals -= lr * direction; then
    locals <- mix * locals + (1 - mix) * globals (mix 0: the globals). No
    contributor: nothing changes but, with mix 0, locals <- globals; with
    ``skip_nonfinite`` and the flag set: locals <- globals, nothing else."""
    contributors = float(buffer[count_offset : count_offset + count_slots].double().sum())
    reset = contributors == 0 and mix == 0
    if contributors == 0 and not reset:
        return
    if reset or (skip_nonfinite and _flag_raised(buffer, flag_offset)):
        for local, global_ in zip(locals_, globals_, strict=True):
            local.copy_(global_)
        return
    for local, global_, m, offset in zip(locals_, globals_, momenta, offsets, strict=True):
        g = _segment(buffer, offset, local).double() / contributors
        direction = g
        if momentum != 0:
            buf = (momentum * memory_view(m).double() + g).to(m.dtype)
            memory_view(m).copy_(buf)
            direction = g + momentum * buf.double() if nesterov else buf.double()
        updated = (memory_view(global_).double() - lr * direction).to(global_.dtype)
        memory_view(global_).copy_(updated)
        merged = (
            updated.double()
            if mix == 0
            else mix * memory_view(local).double() + (1 - mix) * updated.double()
        )
        memory_view(local).copy_(merged)
