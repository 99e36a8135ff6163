"""Plans: the flat buffer and layout for one list of tensors, made once and reused.

A Plan owns a ``_C.Layout`` (where each tensor lives in the buffer), the
buffer itself, and dispatches each fused op to the extension's kernels, or
to ``reference`` for devices the extension was built without.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _C, reference
from ._validate import DTYPE_CODES, EXACT_INTEGER_LIMIT, Signature


def count_slots_for(world_size: int, buffer_dtype: torch.dtype) -> int:
    """Count slots so that no slot ever sums more ones than the dtype holds exactly.

    Rank r writes its 1 into slot r % slots, so a slot receives at most
    ceil(world_size / slots) ones: one slot for fp32 up to 2^24 ranks, more
    for 16-bit buffers on large worlds.
    """
    return max(1, math.ceil(world_size / EXACT_INTEGER_LIMIT[buffer_dtype]))


def lossless_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """Smallest supported dtype that holds every value of every dtype exactly."""
    promoted = dtypes[0]
    for dtype in dtypes[1:]:
        promoted = torch.promote_types(promoted, dtype)
    return promoted


class Plan:
    """Layout, buffer and fused ops for tensors of one signature."""

    def __init__(self, signature: Signature, buffer_dtype: torch.dtype, count_slots: int) -> None:
        device, entries = signature
        dtypes = [entry[0] for entry in entries]
        numels = [math.prod(entry[1]) for entry in entries]
        self.layout = _C.Layout(
            numels, [DTYPE_CODES[d] for d in dtypes], DTYPE_CODES[buffer_dtype], count_slots
        )
        # Zeros: padding between segments is never written and must stay 0.
        self.buffer = torch.zeros(self.layout.buffer_numel, dtype=buffer_dtype, device=device)
        self._address = self.buffer.data_ptr()
        self._offsets = self.layout.offsets
        self._counts = self.buffer[
            self.layout.count_offset : self.layout.count_offset + self.layout.count_slots
        ]
        self._native = device.type == "cpu"

    @property
    def count_slots(self) -> int:
        return self.layout.count_slots

    def contributor_count(self) -> int:
        """Sum of the count slots (reads the device: not for the hot path)."""
        return round(float(self._counts.double().sum()))

    def pack(self, tensors: Sequence[torch.Tensor], addresses: list[int], count_slot: int) -> None:
        if self._native:
            _C.pack(self.layout, addresses, self._address, count_slot, torch.get_num_threads())
        else:
            reference.pack(tensors, self.buffer, self._offsets, *self._count_args(), count_slot)

    def unpack(
        self, tensors: Sequence[torch.Tensor], addresses: list[int], normalize: bool
    ) -> None:
        if self._native:
            _C.unpack(self.layout, addresses, self._address, normalize, torch.get_num_threads())
        else:
            reference.unpack(tensors, self.buffer, self._offsets, *self._count_args(), normalize)

    def ea_blend(
        self,
        params: Sequence[torch.Tensor],
        param_addresses: list[int],
        centers: Sequence[torch.Tensor],
        center_addresses: list[int],
        alpha: float,
        count_slot: int,
    ) -> None:
        if self._native:
            _C.ea_blend(
                self.layout,
                param_addresses,
                center_addresses,
                self._address,
                alpha,
                count_slot,
                torch.get_num_threads(),
            )
        else:
            reference.ea_blend(
                params, centers, self.buffer, self._offsets, alpha, *self._count_args(), count_slot
            )

    def center_update(self, centers: Sequence[torch.Tensor], center_addresses: list[int]) -> None:
        if self._native:
            _C.center_update(self.layout, center_addresses, self._address, torch.get_num_threads())
        else:
            reference.center_update(centers, self.buffer, self._offsets)

    def _count_args(self) -> tuple[int, int]:
        return self.layout.count_offset, self.layout.count_slots


class PlanCache:
    """Plans by (signature, buffer dtype); count slots follow from the world size."""

    def __init__(self, world_size: int) -> None:
        self._world_size = world_size
        self._plans: dict[tuple[Signature, torch.dtype], Plan] = {}

    def get(self, signature: Signature, buffer_dtype: torch.dtype) -> Plan:
        key = (signature, buffer_dtype)
        plan = self._plans.get(key)
        if plan is None:
            slots = count_slots_for(self._world_size, buffer_dtype)
            plan = self._plans[key] = Plan(signature, buffer_dtype, slots)
        return plan
