"""Exact averages when some ranks produced no gradient for a parameter
(``AllReduceSGD(allow_unused=True)``).

The gradient plan then carries one more segment after the gradients: a
presence vector with one element per tensor, where each rank packs 1 for a
gradient it has and 0 for one it has not (its segment then packs zeros). The
allreduce sums it with the gradients, so after the one collective element i
holds how many ranks produced tensor i. The host reads those counts (one
small device read per call: deciding whether a rank must create a ``.grad``,
or leave it None, is a host decision) and:

- a tensor every contributing rank produced is unpacked as always (the mean
  over the step's contributors, bitwise the path without ``allow_unused``);
- a tensor some produced becomes the sum over them, divided by their number
  (``x * (1 / count)``, as the unpack scales), created where it was None;
- a tensor no rank produced keeps ``.grad`` None on every rank, so optimizers
  skip it alike everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._module_grads import check_gradient
from ._plan import Plan

__all__ = ["Presence", "read_counts"]


class Presence:
    """The presence segment of one plan over ``params``' gradients."""

    def __init__(self, plan: Plan, params: Sequence[nn.Parameter], names: Sequence[str]) -> None:
        self.params = list(params)
        self.names = list(names)  # for error messages
        count = len(self.params)
        dtype, device = plan.buffer.dtype, plan.buffer.device
        self.packed = torch.zeros(count, dtype=dtype, device=device)  # this rank's 1s and 0s
        self.unpacked = torch.empty_like(self.packed)  # where the unpack puts the counts
        offset = plan.layout.offsets[count]
        self.counts = plan.buffer[offset : offset + count]
        self._plan = plan
        self._pattern: list[bool] | None = None
        self._zeros: dict[int, torch.Tensor] = {}  # stand-ins for missing gradients

    def gather(self) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
        """The parameters' gradients (None where missing; the present ones
        checked) and what to pack for them (see ``inputs``)."""
        current = [param.grad for param in self.params]
        for grad, name in zip(current, self.names, strict=True):
            if grad is not None:
                check_gradient(grad, name)
        return current, self.inputs(current)

    def inputs(self, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """What to pack: the gradients, zeros where one is missing, the presence vector."""
        pattern = [g is not None for g in grads]
        if pattern != self._pattern:
            self.packed.copy_(torch.tensor(pattern, dtype=self.packed.dtype))
            self._pattern = pattern
        return [*(g if g is not None else self._zero(i) for i, g in enumerate(grads)), self.packed]

    def outputs(
        self, grads: Sequence[torch.Tensor | None], counts: Sequence[int]
    ) -> list[torch.Tensor]:
        """Where to unpack: each gradient, made where it is missing but some
        rank produced it (and set as the parameter's ``.grad``), the zeros
        stand-in where no rank did; then the presence vector's scratch."""
        targets = []
        for index, (param, grad, count) in enumerate(zip(self.params, grads, counts, strict=True)):
            if grad is None and count > 0:
                grad = torch.empty_like(param)
                param.grad = grad
            targets.append(grad if grad is not None else self._zero(index))
        return [*targets, self.unpacked]

    def read(self) -> tuple[list[int], int, int]:
        """See ``read_counts``."""
        return read_counts(self._plan, self.counts)

    def unpack(
        self,
        current: Sequence[torch.Tensor | None],
        counts: Sequence[int],
        contributors: int,
        normalize: bool,
        skip_nonfinite: bool = False,
    ) -> list[torch.Tensor]:
        """Unpacks into the gradients (made where missing but produced
        elsewhere), rescales the ones fewer ranks produced; returns the
        gradients written."""
        targets = self.outputs(current, counts)
        self._plan.unpack(
            targets, [t.data_ptr() for t in targets], normalize, skip_nonfinite=skip_nonfinite
        )
        if normalize and not skip_nonfinite:
            self.rescale(targets, counts, contributors)
        return [t for t, c in zip(targets, counts, strict=False) if c > 0]

    def rescale(
        self, targets: Sequence[torch.Tensor], counts: Sequence[int], contributors: int
    ) -> None:
        """Tensors produced by fewer ranks than the step's contributors: the
        sum over their producers, divided by their number (the unpack divided
        by all contributors)."""
        layout = self._plan.layout
        for index, count in enumerate(counts):
            if 0 < count < contributors:
                offset, numel = layout.offsets[index], layout.numels[index]
                segment = self._plan.buffer[offset : offset + numel].view(targets[index].shape)
                with torch.no_grad():
                    targets[index].copy_(segment * (1.0 / count))

    def _zero(self, index: int) -> torch.Tensor:
        zero = self._zeros.get(index)
        if zero is None:
            zero = self._zeros[index] = torch.zeros_like(self.params[index]).detach()
        return zero


def read_counts(plan: Plan, counts: torch.Tensor) -> tuple[list[int], int, int]:
    """After the allreduce of a plan with the presence segment ``counts``, in
    one device read: how many ranks produced each tensor, how many
    contributed to the step, how many flagged a non-finite value."""
    layout = plan.layout
    tail = plan.buffer[layout.count_offset : layout.flag_offset + 1].double()
    values = torch.cat([counts.double(), tail]).tolist()
    number = counts.numel()
    return [round(v) for v in values[:number]], round(sum(values[number:-1])), round(values[-1])
