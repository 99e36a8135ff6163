"""Buckets: gradients that travel together in one flat buffer, and the two
ways they get there (never communicates; ``_algorithms.reducer`` runs the steps).

A bucket's plan has one segment per gradient, then a presence segment (one
element per gradient: 1 where this rank has it, 0 where it has none and
packed zeros), then the count slots in code groups (see ``_tensors.agreement``).
Every gradient plan has the presence segment, with or without
``allow_unused``, so that the two lay out the same buffer: gloo's reduction
order depends on the buffer's length, and only the same length gives
bitwise the same sums.

- *Packed* (``Bucket``): the pack copies the gradients into the buffer and
  the unpack copies the sums back, scaled.
- *In place* (``Bucket`` with ``views``): the gradients are views of the
  buffer's segments (``attach(..., gradient_as_bucket_view=True)``, and
  ``use_flat_storage``, whose parameters are views of a second buffer laid
  out the same way), so backward accumulates straight into what the
  allreduce sends; filling writes only the presence segment and the count
  slots, and the unpack scales in place.

Either way each segment keeps its tensor's memory order (see the note
"Segment order" in ``_tensors.layouts``): a view has its parameter's strides, and a
gradient that comes in another order is copied through a staging tensor.

With ``allow_unused`` the host reads the presence counts after the
allreduce: a gradient every contributor had is unpacked as always, one that
fewer had becomes their sum divided by their number (``partial_means``,
written once for both kinds), created where this rank had none, and one
that no rank had stays None everywhere, so optimizers skip it alike.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from itertools import repeat

import torch
from torch import nn

from .. import _C
from .._comm.collectives import PendingSum
from .._comm.low_bit import LowBitSum
from .._native import addresses_of
from .._tensors.layouts import empty_in_order, segment_view
from .._tensors.plan import Plan

__all__ = ["Bucket", "FlatParameters", "read_counts"]


class Bucket:
    """The gradients of ``params`` (parameters standing for their ``.grad``,
    or gradients given as themselves, see ``_tensors.grad_source``), in ``plan``."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        names: Sequence[str],
        indices: Sequence[int],
        plan: Plan,
        in_place: bool = False,
    ) -> None:
        self.params = list(params)
        self.names = list(names)
        self.indices = list(indices)  # positions in the source's trainable tensors
        self.whole = False  # holds all of them, in order (set by the reducer)
        self.plan = plan
        count = len(self.params)
        self._presence = plan.segment(count)  # this rank's 1s and 0s, then the counts
        self._mask: list[bool] | None = None
        self._all_present = [True] * count
        self._mask_tensor = torch.ones(count, dtype=plan.buffer.dtype, device=plan.buffer.device)
        self._zeros: dict[int, torch.Tensor] = {}  # stand-ins for missing gradients
        self._stages: dict[int, torch.Tensor] = {}  # in each segment's order, for reordered ones
        # The addresses of the last packed inputs, and the op arguments made
        # from them: for the pack (then the presence vector) and the unpack
        # (then the presence segment, scaled onto itself and rewritten by the
        # next pack). Reused while the gradients stay the same tensors.
        self._input_addresses: list[int] = []
        self._pack_addresses = _C.Addresses()
        self._unpack_addresses = _C.Addresses()
        self.views: list[torch.Tensor] | None = None
        # With compression (see GradientReducer._install_low_bit): the
        # low-bit sum's scratch and the error feedback's residual.
        self.low_bit: LowBitSum | None = None
        self.residual: torch.Tensor | None = None
        if in_place:
            self.views = [plan.segment(i) for i in range(count)]
            with torch.no_grad():
                for param, view in zip(self.params, self.views, strict=True):
                    if param.grad is not None:
                        view.copy_(param.grad)
                    param.grad = view
            segments = [*self.views, self._presence]
            self._view_addresses = _C.Addresses(addresses_of(segments))
            self._segments = segments
        # Count slots and flag, adjacent at the end of the buffer, and what
        # each slot's rank writes there (its 1, and a clear flag).
        layout = plan.layout
        self._tail = plan.buffer[layout.count_offset : layout.flag_offset + 1]
        self._tail_rows = torch.eye(
            layout.count_slots, layout.count_slots + 1, dtype=plan.buffer.dtype
        ).to(plan.buffer.device)
        self.copied_steps = 0  # in place: steps where some gradient was not its view
        self.reset()

    def reset(self) -> None:
        """Forgets the step (after it finished or failed)."""
        self.ready = 0
        self.started = False
        self.started_by_hook = False
        self.pending: PendingSum | None = None
        self.grads: list[torch.Tensor | None] = []
        self._inputs: list[torch.Tensor] = []  # what was packed, the presence vector aside
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- filling ---------------------------------------------------------------

    def fill(
        self,
        grads: Sequence[torch.Tensor | None],
        reordered: Sequence[int],
        count_slot: int,
        check_nonfinite: bool,
        complete: bool = False,
    ) -> None:
        """Writes this rank's gradients (None: missing, packed as zeros) and
        its count slot; the non-finite flag too when ``check_nonfinite`` (in
        place, the pack of the segments onto themselves computes it; a packed
        bucket always does). ``reordered``: local indices whose gradient is
        in another memory order than its segment; ``complete``: the caller
        knows no gradient is missing."""
        self.grads = grads = list(grads)
        missing = not complete and any(map(operator.is_, grads, repeat(None)))
        mask = [g is not None for g in grads] if missing else self._all_present
        if mask != self._mask:
            self._mask_tensor.copy_(torch.tensor(mask, dtype=self._mask_tensor.dtype))
            self._mask = mask
        if self.views is not None:
            # A low-bit sum reads the flag whatever the mode: it drops a
            # flagged sum's residual, where a NaN would poison every later sum.
            self._fill_views(count_slot, check_nonfinite or self.low_bit is not None)
            return
        inputs: list[torch.Tensor]
        if not missing and not reordered:
            inputs = grads  # type: ignore[assignment]  # the hot path: no copy
        else:
            inputs = []
            reorder = set(reordered)
            for index, grad in enumerate(grads):
                if grad is None:
                    inputs.append(self._zero(index))
                elif index in reorder:
                    stage = self._stage(index)
                    stage.copy_(grad)
                    self._staged.append((grad, stage))
                    inputs.append(stage)
                else:
                    inputs.append(grad)
        addresses = addresses_of(inputs)
        if addresses != self._input_addresses:
            self._input_addresses = addresses
            self._pack_addresses = _C.Addresses([*addresses, self._mask_tensor.data_ptr()])
            self._unpack_addresses = _C.Addresses([*addresses, self._presence.data_ptr()])
        self.plan.pack([*inputs, self._mask_tensor], self._pack_addresses, count_slot)
        self._inputs = inputs

    def _fill_views(self, count_slot: int, check_nonfinite: bool) -> None:
        """In place: every present gradient into its view (a copy only where
        it left it), missing ones zeroed, the presence and the count slot."""
        assert self.views is not None
        if not all(map(operator.is_, self.grads, self.views)):
            copied = False
            with torch.no_grad():
                for param, grad, view in zip(self.params, self.grads, self.views, strict=True):
                    if grad is None:
                        view.zero_()
                    elif grad is not view:
                        view.copy_(grad)
                        param.grad = view
                        copied = True
            self.copied_steps += copied
        if check_nonfinite:
            self._presence.copy_(self._mask_tensor)
            # The pack of the segments onto themselves: the data unchanged,
            # the count slot and the flag written, in one pass.
            self.plan.pack(self._segments, self._view_addresses, count_slot)
        else:
            # The presence (the allreduce summed it) and the tail (count
            # slots and flag, adjacent) as the pack would write them.
            torch._foreach_copy_(
                [self._presence, self._tail], [self._mask_tensor, self._tail_rows[count_slot]]
            )
        self.grads = list(self.views)

    def _zero(self, index: int) -> torch.Tensor:
        """Zeros standing in for a missing gradient (packed, and unpacked into)."""
        zero = self._zeros.get(index)
        if zero is None:
            zero = self._zeros[index] = self._like(index).zero_()
        return zero

    def _stage(self, index: int) -> torch.Tensor:
        stage = self._stages.get(index)
        if stage is None:
            stage = self._stages[index] = self._like(index)
        return stage

    def _like(self, index: int) -> torch.Tensor:
        """A tensor as gradient ``index`` must be for the ops: its dtype (not
        the buffer's), its shape, its segment's memory order."""
        plan = self.plan
        return empty_in_order(
            plan.shapes[index], plan.strides[index], plan.dtypes[index], plan.buffer.device
        )

    # -- after the allreduce ---------------------------------------------------

    def nonfinite_ranks(self, started_by_hook: bool) -> int:
        """How many ranks packed a non-finite value (reads the device). A
        bucket filled in place by a backward hook carries no flag (the mode
        was not known yet), unless it is summed in low bits: 1 when its sum
        holds one."""
        if self.views is not None and started_by_hook and self.low_bit is None:
            data = self.plan.buffer[: self.plan.layout.count_offset]
            return int(not bool(torch.isfinite(data).all()))
        return self.plan.nonfinite_ranks()

    def unpack(
        self,
        normalize: bool,
        skip_nonfinite: bool,
        agreement: tuple[Plan, int] | None,
        counts: Sequence[int] | None = None,
        contributors: int = 0,
    ) -> list[torch.Tensor]:
        """The sums into the gradients (scaled by 1 / contributors when
        ``normalize``); with ``counts`` (allow_unused: how many ranks had
        each gradient) the partial means too; returns the gradients written."""
        targets: list[torch.Tensor]
        if self.views is not None:
            targets, addresses = list(self._segments), self._view_addresses
        elif counts is None:
            targets, addresses = [*self._inputs, self._presence], self._unpack_addresses
        else:
            targets = [*self._targets_for(counts), self._presence]
            addresses = _C.Addresses(addresses_of(targets))
        partial: list[tuple[int, int]] = []
        means: list[torch.Tensor] = []
        if counts is not None and normalize and not skip_nonfinite:
            partial = [(i, c) for i, c in enumerate(counts) if 0 < c < contributors]
            means = partial_means(self.plan, partial)
        self.plan.unpack(targets, addresses, normalize, skip_nonfinite, agreement)
        if partial or self._staged:
            with torch.no_grad():
                for (index, _), mean in zip(partial, means, strict=True):
                    targets[index].copy_(mean)
                for grad, stage in self._staged:
                    grad.copy_(stage)
        written = targets[: len(self.params)]
        if counts is not None:
            for param, view, count in zip(self.params, written, counts, strict=True):
                if self.views is not None:
                    param.grad = view if count > 0 else None
            return [t for t, c in zip(written, counts, strict=True) if c > 0]
        return written

    def _targets_for(self, counts: Sequence[int] | None) -> list[torch.Tensor]:
        """Where the unpack writes each gradient: the gradient, its stage,
        a new ``.grad`` (allow_unused: missing here, some rank had it), or
        the stand-in (no rank had it: stays None)."""
        stages = {id(grad): stage for grad, stage in self._staged}
        targets = []
        for index, (param, grad) in enumerate(zip(self.params, self.grads, strict=True)):
            if grad is None:
                if counts is not None and counts[index] > 0:
                    grad = empty_in_order(
                        param.shape, self.plan.strides[index], param.dtype, param.device
                    )
                    param.grad = grad
                    targets.append(grad)
                else:
                    targets.append(self._zero(index))
            else:
                targets.append(stages.get(id(grad), grad))
        return targets

    def read_counts(self) -> tuple[list[int], int, int]:
        """See ``read_counts``."""
        return read_counts(self.plan, self._presence)

    def present_gradients(self) -> list[torch.Tensor]:
        """This step's gradients (as filled: a gradient given as itself, or a
        parameter's ``.grad``), the missing ones left out."""
        return [g for g in self.grads if g is not None]


def partial_means(plan: Plan, partial: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """For each (tensor index, count): its summed segment divided by count
    (``x * (1 / count)``, as the unpack scales), in the tensor's memory
    order. Taken before the unpack, which may write the buffer itself."""
    return [plan.segment(index) * (1.0 / count) for index, count in partial]


def read_counts(plan: Plan, presence: torch.Tensor) -> tuple[list[int], int, int]:
    """After the allreduce, in one device read: how many ranks had each
    gradient (the presence segment ``presence``), how many contributed to
    the step, how many flagged a non-finite value."""
    layout = plan.layout
    tail = plan.buffer[layout.count_offset : layout.flag_offset + 1].double()
    values = torch.cat([presence.double(), tail]).tolist()
    number = presence.numel()
    return [round(v) for v in values[:number]], round(sum(values[number:-1])), round(values[-1])


class FlatParameters:
    """``use_flat_storage``: the parameters as views of one buffer laid out
    as the gradient plan's (each in its own memory order), so that an
    optimizer's foreach kernels and the allreduce see two flat buffers."""

    def __init__(self, module: nn.Module, params: Sequence[torch.Tensor], plan: Plan) -> None:
        self.module = module
        self.buffer = torch.zeros_like(plan.buffer)
        with torch.no_grad():
            for index, param in enumerate(params):
                view = segment_view(
                    self.buffer, plan.layout.offsets[index], param.shape, plan.strides[index]
                )
                view.copy_(param)
                param.data = view
