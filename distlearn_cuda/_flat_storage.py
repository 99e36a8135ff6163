"""Zero-copy gradients: views of the buffer the allreduce runs on.

``GradientViews`` makes parameters' gradients views of a plan's buffer
segments; ``AllReduceSGD.attach(..., gradient_as_bucket_view=True)`` uses it
per bucket. ``FlatStorage`` (``AllReduceSGD.use_flat_storage``) adds the
parameters themselves as views of a second buffer laid out the same way,
for a module's whole list of trainable parameters. Backward then accumulates
straight into the buffer the allreduce runs on, so the pack and unpack
copies disappear: a step writes the count slot, allreduces in place and
scales in place, with device-side ops only (no host synchronization).

Gradients must stay those views: ``optimizer.zero_grad(set_to_none=False)``.
A gradient found elsewhere (set to None and made anew by backward) is
copied into its view and the view put back, so a step is always correct and
zero-copy again from the next one. The step's device work is the fused ops
applied to the views themselves: the unpack scales in place (each view is
its own buffer segment), and with the non-finite guard the pack of the views
onto themselves computes the flag.
"""

from __future__ import annotations

import operator

import torch
from torch import nn

from . import _C
from ._plan import Plan
from ._unused import read_counts

__all__ = ["FlatStorage", "GradientViews"]

_GRAD = operator.attrgetter("grad")


class GradientViews:
    """The gradients of ``params`` as views of ``plan``'s buffer segments."""

    def __init__(self, params: list[nn.Parameter], plan: Plan) -> None:
        self.params = params
        self.plan = plan
        layout = plan.layout
        self.grad_views = []
        with torch.no_grad():
            for param, offset in zip(params, layout.offsets[: len(params)], strict=True):
                grad_view = plan.buffer[offset : offset + param.numel()].view(param.shape)
                if param.grad is not None:
                    grad_view.copy_(param.grad)
                else:
                    grad_view.zero_()
                param.grad = grad_view
                self.grad_views.append(grad_view)
        # allow_unused: the plan's presence segment follows the gradients' (see
        # _unused); it too is packed and unpacked onto itself.
        self.presence: torch.Tensor | None = None
        segments = list(self.grad_views)
        if layout.num_tensors == len(params) + 1:
            offset = layout.offsets[len(params)]
            self.presence = plan.buffer[offset : offset + len(params)]
            segments.append(self.presence)
        self._segments = segments
        self._view_addresses = _C.Addresses([v.data_ptr() for v in segments])
        self.data = plan.buffer[: layout.count_offset]  # the segments and their zero padding
        # Count slots and flag, adjacent at the end of the buffer, and what
        # each rank's slot writes there (its 1, and a clear flag).
        self.tail = plan.buffer[layout.count_offset : layout.flag_offset + 1]
        self._tails = torch.eye(layout.count_slots, layout.count_slots + 1, dtype=plan.buffer.dtype)
        self._tails = self._tails.to(plan.buffer.device)
        self.copied_steps = 0  # steps where some gradient was not in its view

    def summed_nonfinite(self) -> bool:
        """After the allreduce, whether the sum holds a NaN or an infinity:
        the same answer on every rank, as every rank holds the same sum
        (reads the device; for buckets started before the mode was known)."""
        return not bool(torch.isfinite(self.data).all())

    def gather_gradients(self) -> None:
        """Puts every gradient back into its view (a copy only where it left it)."""
        grads = list(map(_GRAD, self.params))
        if self.presence is not None:
            self._gather_with_presence(grads)
            return
        if all(map(operator.is_, grads, self.grad_views)):
            return
        for param, grad, view in zip(self.params, grads, self.grad_views, strict=True):
            if grad is None:
                raise ValueError(
                    "grads: a parameter whose gradient is a buffer view has no .grad; run "
                    "backward() first (or construct with allow_unused=True)"
                )
            if grad is not view:
                with torch.no_grad():
                    view.copy_(grad)
                param.grad = view
        self.copied_steps += 1

    def write_slots(self, count_slot: int, check_nonfinite: bool) -> None:
        """What the pack would write besides the data: count slots and the flag."""
        if check_nonfinite:
            # The pack of the views onto themselves: the data unchanged, the
            # count slot and the flag written, in one pass.
            self.plan.pack(self._segments, self._view_addresses, count_slot)
        else:
            self.tail.copy_(self._tails[count_slot])

    def scale(self, normalize: bool, skip_nonfinite: bool) -> None:
        """What the unpack would do, in place: data /= the contributor count
        (read on the device); zeros when skipping a flagged step. The unpack
        of the buffer onto the views, which are its own segments."""
        self.plan.unpack(self._segments, self._view_addresses, normalize, skip_nonfinite)

    def _gather_with_presence(self, grads: list[torch.Tensor | None]) -> None:
        """allow_unused: a missing gradient's view is zeroed and marked absent."""
        assert self.presence is not None
        present = []
        with torch.no_grad():
            for param, grad, view in zip(self.params, grads, self.grad_views, strict=True):
                if grad is None:
                    view.zero_()
                elif grad is not view:
                    view.copy_(grad)
                    param.grad = view
                present.append(grad is not None)
            self.presence.copy_(torch.tensor(present, dtype=self.presence.dtype))

    def finish(self, normalize: bool, skip_nonfinite: bool) -> None:
        """After the allreduce: the unpack's work, in place (with allow_unused,
        each view the mean over the ranks that produced it)."""
        if self.presence is None:
            self.scale(normalize, skip_nonfinite)
            return
        counts, contributors, flagged = read_counts(self.plan, self.presence)
        self.finish_with_presence(counts, contributors, normalize, skip_nonfinite and flagged > 0)

    def finish_with_presence(
        self, counts: list[int], contributors: int, normalize: bool, skip_nonfinite: bool
    ) -> None:
        """allow_unused, after the allreduce: every view the mean over the
        ranks that produced it; ``.grad`` None where no rank did, the view
        where some did."""
        partial = {
            index: view * (1.0 / count)
            for index, (view, count) in enumerate(zip(self.grad_views, counts, strict=True))
            if normalize and not skip_nonfinite and 0 < count < contributors
        }
        self.scale(normalize, skip_nonfinite)
        with torch.no_grad():
            for index, mean in partial.items():
                self.grad_views[index].copy_(mean)
        for param, view, count in zip(self.params, self.grad_views, counts, strict=True):
            param.grad = view if count > 0 else None


class FlatStorage(GradientViews):
    """The views of one module's trainable parameters and gradients."""

    def __init__(self, module: nn.Module, params: list[nn.Parameter], plan: Plan) -> None:
        self.module = module
        self.param_buffer = torch.zeros_like(plan.buffer)
        with torch.no_grad():
            for param, offset in zip(params, plan.layout.offsets[: len(params)], strict=True):
                data_view = self.param_buffer[offset : offset + param.numel()].view(param.shape)
                data_view.copy_(param)
                param.data = data_view
        super().__init__(params, plan)
