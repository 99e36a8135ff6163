"""What ``synchronize_parameters`` carries besides the parameters: the module's
buffers (any dtype) and the optimizer's state, copied bitwise from one rank.

Buffers have the same structure on every rank (checked with the parameters),
so all ranks size the transfer alone. Optimizer state need not: a rank that
took no step has none. The source rank therefore first broadcasts a skeleton
of its ``optimizer.state_dict()`` (hyperparameters, and dtype and shape in
place of each tensor on the parameters' device; other values as they are),
then the buffers and those tensors travel as bytes in one broadcast, each
segment aligned so that any dtype can be viewed in place. Receivers copy the
buffers in place and load the rebuilt state dict, so their optimizer becomes
the source's whole: moments, step counts, hyperparameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._collectives import Collectives

__all__ = ["CarriedState", "check_carry_args", "pick_source"]

# Byte alignment of every segment: the largest element size (complex128), so
# a uint8 slice can be viewed as any dtype.
_ALIGN = 16


def check_carry_args(params: Any, optimizer: Any, buffers: Any) -> None:
    """TypeError/ValueError naming the argument, before anything happens."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    if not isinstance(buffers, bool):
        raise TypeError(f"buffers must be a bool, got {type(buffers).__name__}")
    if buffers and not isinstance(params, nn.Module):
        raise ValueError(
            f"buffers=True needs params to be an nn.Module (its buffers are carried), "
            f"got {type(params).__name__}"
        )


def pick_source(collectives: Collectives, score: int, finite: bool, arg: str) -> int:
    """The group rank every rank copies from in a synchronization: the highest
    ``score`` (>= 0) among the ranks whose values are ``finite``, ties to the
    lowest rank. One MAX-allreduce of score * W + (W - 1 - rank), or -1 for a
    rank with non-finite values. FloatingPointError on every rank (nothing
    broadcast) when no rank's values are finite: a synchronization never
    spreads a NaN or an infinity."""
    world, rank = len(collectives.ranks), collectives.rank
    key = collectives.max_int(score * world + (world - 1 - rank) if finite else -1)
    if key < 0:
        raise FloatingPointError(
            f"{arg}: NaN or infinite values on every rank; nothing was broadcast"
        )
    return world - 1 - key % world


@dataclass(frozen=True)
class _Slot:
    """A tensor of the optimizer state that travels in the byte buffer."""

    index: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class CarriedState:
    """The buffers of ``module`` (when given) and the state of ``optimizer``
    (when given), for one synchronization on ``device``."""

    def __init__(
        self,
        module: nn.Module | None,
        optimizer: torch.optim.Optimizer | None,
        device: torch.device,
    ) -> None:
        named = list(module.named_buffers()) if module is not None else []
        self._buffer_names = [name for name, _ in named]
        self._buffers = [buffer for _, buffer in named]
        self._optimizer = optimizer
        self._device = device

    @property
    def empty(self) -> bool:
        return not self._buffers and self._optimizer is None

    def structure_entries(self) -> list[str]:
        """What must agree across ranks (compared with the parameters' entries)."""
        entries = [
            f"buffer {name} {b.dtype} {tuple(b.shape)}"
            for name, b in zip(self._buffer_names, self._buffers, strict=True)
        ]
        if self._optimizer is not None:
            entries.append(f"optimizer {type(self._optimizer).__name__}")
            for index, group in enumerate(self._optimizer.param_groups):
                entries += [
                    f"optimizer group {index}: {p.dtype} {tuple(p.shape)}" for p in group["params"]
                ]
        return entries

    def names(self) -> list[str]:
        """A name per structure entry, for the mismatch message."""
        names = [f"params.{name} (buffer)" for name in self._buffer_names]
        if self._optimizer is not None:
            names.append("optimizer")
            for index, group in enumerate(self._optimizer.param_groups):
                names += [f"optimizer.param_groups[{index}]"] * len(group["params"])
        return names

    def finite(self) -> bool:
        """Whether every floating-point value carried from this rank is finite
        (reads the device)."""
        tensors = list(self._buffers)
        if self._optimizer is not None:
            tensors += _tensors_in(self._optimizer.state_dict()["state"])
        return all(bool(torch.isfinite(t).all()) for t in tensors if _is_float(t))

    def broadcast(self, collectives: Collectives, src: int, rank: int) -> None:
        """Makes every rank's buffers and optimizer state those of rank ``src``."""
        skeleton: Any = None
        sent: list[torch.Tensor] = []
        if self._optimizer is not None:
            if rank == src:
                skeleton = _skeleton(self._optimizer.state_dict(), self._device, sent)
            skeleton = collectives.broadcast_object(skeleton, src)
        slots = _slots_in(skeleton)
        layout = [(b.dtype, tuple(b.shape)) for b in self._buffers]
        layout += [(slot.dtype, slot.shape) for slot in slots]
        offsets, total = _byte_offsets(layout)
        data = torch.zeros(total, dtype=torch.uint8, device=self._device)
        segments = [
            _segment(data, offset, dtype, shape)
            for (dtype, shape), offset in zip(layout, offsets, strict=True)
        ]
        if total > 0:
            if rank == src:
                torch._foreach_copy_(segments, self._buffers + sent)
            # A broadcast is a bitwise copy in any dtype: float32 words carry
            # the bytes on every backend.
            collectives.broadcast(data.view(torch.float32), src)
        if rank == src:
            return
        with torch.no_grad():
            for buffer, segment in zip(self._buffers, segments, strict=False):
                buffer.copy_(segment)
        if self._optimizer is not None:
            received = [segment.clone() for segment in segments[len(self._buffers) :]]
            self._optimizer.load_state_dict(_fill(skeleton, received))


def _is_float(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def _byte_offsets(layout: list[tuple[torch.dtype, tuple[int, ...]]]) -> tuple[list[int], int]:
    """Aligned byte offsets of each (dtype, shape) and the total, a multiple
    of 4 so that the bytes can travel as float32 words."""
    offsets, total = [], 0
    for dtype, shape in layout:
        offsets.append(total)
        nbytes = math.prod(shape) * dtype.itemsize
        total += -(-nbytes // _ALIGN) * _ALIGN
    return offsets, total


def _segment(
    data: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """The bytes at ``offset`` viewed as a tensor of ``dtype`` and ``shape``."""
    nbytes = math.prod(shape) * dtype.itemsize
    return data[offset : offset + nbytes].view(dtype).view(shape)


def _skeleton(value: Any, device: torch.device, sent: list[torch.Tensor]) -> Any:
    """``value`` with each tensor on ``device`` replaced by a _Slot (the tensor
    appended to ``sent``); other tensors and values stay, to be pickled."""
    if isinstance(value, torch.Tensor) and value.device == device:
        sent.append(value)
        return _Slot(len(sent) - 1, value.dtype, tuple(value.shape))
    if isinstance(value, dict):
        return {key: _skeleton(item, device, sent) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_skeleton(item, device, sent) for item in value)
    return value


def _slots_in(skeleton: Any) -> list[_Slot]:
    """The slots of a skeleton, by index."""
    found: list[_Slot] = []

    def walk(value: Any) -> None:
        if isinstance(value, _Slot):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(skeleton)
    return sorted(found, key=lambda slot: slot.index)


def _fill(skeleton: Any, received: list[torch.Tensor]) -> Any:
    """The skeleton with its slots replaced by the received tensors."""
    if isinstance(skeleton, _Slot):
        return received[skeleton.index]
    if isinstance(skeleton, dict):
        return {key: _fill(item, received) for key, item in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_fill(item, received) for item in skeleton)
    return skeleton


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors_in(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors_in(item)]
    return []
