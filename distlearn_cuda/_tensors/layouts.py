"""Memory layouts: which order a dense tensor's elements lie in, and a
tensor's segment in a flat buffer laid out in that order.

NOTE: [Segment order]. The fused ops copy a tensor's elements in memory
order: a tensor's segment of the flat buffer holds its elements as they lie
in memory, one copy with no index arithmetic (the kernels' speed). Two ranks
therefore add the same logical element only if their tensors have the same
memory order, so the order is part of the structure the ranks agree on
(``strides`` below, compared with the dtypes and shapes; a rank whose
tensor is channels_last while a peer's is contiguous gets a ValueError on
every rank, naming the tensor and both layouts, as DDP refuses them). Once
bound, a segment's order is fixed: a tensor that comes in another order
later (a gradient assigned by hand, a model converted mid-training) is
copied through a staging tensor in the segment's order (correct on every
rank, one extra copy of that tensor), and every view the library makes of a
segment (bucket views, flat storage, the partial means of allow_unused)
keeps that order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "Strides",
    "canonical_strides",
    "contiguous_strides",
    "describe_layout",
    "empty_in_order",
    "is_dense",
    "segment_view",
]

# Strides with 0 for every dimension of size 1 (whose stride maps no
# element), so that two tensors compare equal exactly when they lay the same
# elements at the same offsets.
Strides = tuple[int, ...]


def is_dense(tensor: torch.Tensor) -> bool:
    """True when the elements fill one memory block without gaps or overlap
    (contiguous, channels_last, or any other permutation of dims)."""
    if tensor.numel() == 0 or tensor.is_contiguous():
        return True
    expected = 1
    dims = sorted((st, sz) for sz, st in zip(tensor.shape, tensor.stride(), strict=True) if sz != 1)
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def contiguous_strides(shape: Sequence[int]) -> Strides:
    """The canonical strides of a contiguous tensor of ``shape``."""
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(0 if size == 1 else step)
        step *= size
    if math.prod(shape) == 0:
        return tuple(0 for _ in shape)
    return tuple(reversed(strides))


def canonical_strides(tensor: torch.Tensor) -> Strides:
    """A dense tensor's memory order as comparable strides (see ``Strides``);
    an empty tensor has none to speak of."""
    if tensor.numel() == 0:
        return tuple(0 for _ in tensor.shape)
    pairs = zip(tensor.shape, tensor.stride(), strict=True)
    return tuple(0 if size == 1 else stride for size, stride in pairs)


def _named_orders(shape: Sequence[int]) -> dict[Strides, str]:
    names = {contiguous_strides(shape): "contiguous"}
    if len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        probe = torch.empty(tuple(shape), device="meta").to(memory_format=fmt)
        names.setdefault(canonical_strides(probe), "channels_last")
    return names


def describe_layout(shape: Sequence[int], strides: Strides) -> str:
    """ "contiguous", "channels_last", or "strides (...)" for messages and
    structure entries."""
    return _named_orders(shape).get(strides, f"strides {strides}")


def _real_strides(shape: Sequence[int], strides: Strides) -> tuple[int, ...]:
    """Strides a tensor of the memory order ``strides`` can carry: a size-1
    dimension gets 1 rather than 0 (autograd takes a 0 stride for a view of
    a broadcast and breaks its gradient layout contract), an empty tensor
    the contiguous ones."""
    if math.prod(shape) == 0:
        return tuple(torch.empty(tuple(shape), device="meta").stride())
    return tuple(stride if stride else 1 for stride in strides)


def segment_view(
    buffer: torch.Tensor, offset: int, shape: Sequence[int], strides: Strides
) -> torch.Tensor:
    """The segment at ``offset`` of a flat buffer as a tensor of ``shape``
    whose elements lie in the memory order ``strides`` (a view: writing it
    writes the buffer)."""
    numel = math.prod(shape)
    return buffer[offset : offset + numel].as_strided(tuple(shape), _real_strides(shape, strides))


def empty_in_order(
    shape: Sequence[int], strides: Strides, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """An uninitialized dense tensor laid out in the order ``strides``."""
    flat = torch.empty(math.prod(shape), dtype=dtype, device=device)
    return flat.as_strided(tuple(shape), _real_strides(shape, strides))
