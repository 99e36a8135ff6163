"""What ``synchronize_parameters`` carries besides the parameters: the module's
buffers (any dtype), the optimizer's state, and the state of any other
objects with ``state_dict``/``load_state_dict`` (learning-rate schedulers,
``GradScaler``, the user's counters), copied bitwise from one rank.

Buffers have the same structure on every rank (checked with the parameters),
so all ranks size the transfer alone. State dicts need not: a rank that took
no step has no optimizer state. The source rank therefore first broadcasts a
skeleton of its state dicts (hyperparameters, counters, and dtype and shape
in place of each tensor on the parameters' device; other values as they are,
as ``_comm.gloo.encode`` bytes that receivers read without running code), then
the buffers and those tensors travel as bytes in one broadcast, each segment
aligned so that any dtype can be viewed in place. Receivers copy the buffers
in place and load the rebuilt state dicts, so their optimizer, schedulers
and counters become the source's whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._comm import gloo as _gloo
from .._comm.collectives import Collectives

__all__ = ["CarriedState", "check_carry_args", "pick_source"]

# Byte alignment of every segment: the largest element size (complex128), so
# a uint8 slice can be viewed as any dtype.
_ALIGN = 16


def check_carry_args(params: Any, optimizer: Any, buffers: Any, state: Any = ()) -> list[Any]:
    """TypeError/ValueError naming the argument, before anything happens;
    returns the ``state`` objects as a list."""
    if isinstance(state, (list, tuple)):
        states = list(state)
    elif state is None:
        states = []
    else:
        states = [state]
    for index, item in enumerate(states):
        if not (
            callable(getattr(item, "state_dict", None))
            and callable(getattr(item, "load_state_dict", None))
        ):
            raise TypeError(
                f"state[{index}] must have state_dict() and load_state_dict() (an LR scheduler, "
                f"a GradScaler, a counter of your own), got {type(item).__name__}"
            )
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
    return states


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
    """A tensor of the state dicts that travels in the byte buffer."""

    index: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def as_data(self) -> dict[str, Any]:
        return {_SLOT_KEY: self.index, "dtype": self.dtype, "shape": list(self.shape)}


def _as_slot(value: Any) -> _Slot | None:
    if isinstance(value, dict) and _SLOT_KEY in value:
        return _Slot(int(value[_SLOT_KEY]), value["dtype"], tuple(value["shape"]))
    return None


# Where a tensor of the skeleton travels in the byte buffer.
_SLOT_KEY = "__distlearn_carried_tensor__"
# A skeleton the source could not send (its receivers could not read it).
_ERROR_KEY = "__distlearn_carry_error__"


class CarriedState:
    """The buffers of ``module`` (when given), the state of ``optimizer``
    (when given) and of each of ``states``, for one synchronization on ``device``."""

    def __init__(
        self,
        module: nn.Module | None,
        optimizer: torch.optim.Optimizer | None,
        device: torch.device,
        states: list[Any] | None = None,
    ) -> None:
        named = list(module.named_buffers()) if module is not None else []
        self._buffer_names = [name for name, _ in named]
        self._buffers = [buffer for _, buffer in named]
        self._optimizer = optimizer
        self._states = list(states or [])
        self._device = device

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
        entries += [f"state {type(item).__name__}" for item in self._states]
        return entries

    def names(self) -> list[str]:
        """A name per structure entry, for the mismatch message."""
        names = [f"params.{name} (buffer)" for name in self._buffer_names]
        if self._optimizer is not None:
            names.append("optimizer")
            for index, group in enumerate(self._optimizer.param_groups):
                names += [f"optimizer.param_groups[{index}]"] * len(group["params"])
        names += [f"state[{index}]" for index in range(len(self._states))]
        return names

    def finite(self) -> bool:
        """Whether every floating-point tensor carried from this rank is
        finite (reads the device; numbers in a state dict, such as a
        scheduler's best loss of inf, are not tensors and not checked)."""
        tensors = list(self._buffers)
        if self._optimizer is not None:
            tensors += _tensors_in(self._optimizer.state_dict()["state"])
        for item in self._states:
            tensors += _tensors_in(item.state_dict())
        return all(bool(torch.isfinite(t).all()) for t in tensors if _is_float(t))

    def _state_dicts(self) -> dict[str, Any]:
        return {
            "optimizer": self._optimizer.state_dict() if self._optimizer is not None else None,
            "states": [item.state_dict() for item in self._states],
        }

    def broadcast(self, collectives: Collectives, src: int, rank: int) -> None:
        """Makes every rank's buffers and carried state those of rank ``src``.

        Raises:
            TypeError: on every rank, when rank ``src``'s state dicts hold a
                value that cannot travel safely (see ``_comm.gloo.encode``);
                nothing changed.
        """
        skeleton: Any = None
        sent: list[torch.Tensor] = []
        if self._optimizer is not None or self._states:
            if rank == src:
                skeleton = _skeleton(self._state_dicts(), self._device, sent)
                try:
                    _gloo.decode(_gloo.encode(skeleton))  # what the receivers will read
                except Exception as error:
                    skeleton, sent = {_ERROR_KEY: f"{type(error).__name__}: {error}"}, []
            skeleton = collectives.broadcast_object(skeleton, src)
            if isinstance(skeleton, dict) and _ERROR_KEY in skeleton:
                raise TypeError(
                    f"synchronize_parameters: rank {src}'s state dicts (optimizer, state=) hold "
                    f"a value that cannot be sent safely (tensors, numbers, strings and "
                    f"containers can): {skeleton[_ERROR_KEY]}"
                )
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
        if skeleton is not None:
            received = [segment.clone() for segment in segments[len(self._buffers) :]]
            state_dicts = _fill(skeleton, received)
            if self._optimizer is not None:
                self._optimizer.load_state_dict(state_dicts["optimizer"])
            for item, state_dict in zip(self._states, state_dicts["states"], strict=True):
                item.load_state_dict(state_dict)


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
    """``value`` with each tensor on ``device`` replaced by a _Slot's data
    (the tensor appended to ``sent``); other tensors and values stay, to
    travel in the skeleton."""
    if isinstance(value, torch.Tensor) and value.device == device:
        sent.append(value)
        return _Slot(len(sent) - 1, value.dtype, tuple(value.shape)).as_data()
    if isinstance(value, dict):
        return {key: _skeleton(item, device, sent) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_skeleton(item, device, sent) for item in value)
    return value


def _slots_in(skeleton: Any) -> list[_Slot]:
    """The slots of a skeleton, by index."""
    found: list[_Slot] = []

    def walk(value: Any) -> None:
        slot = _as_slot(value)
        if slot is not None:
            found.append(slot)
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
    slot = _as_slot(skeleton)
    if slot is not None:
        return received[slot.index]
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
