"""Zero-copy storage for ``AllReduceSGD.use_flat_storage``.

A module's trainable parameters and their gradients become views into two
flat buffers laid out like the gradient plan's (same segments and padding):
the parameters into a buffer of their own, the gradients into the plan's
buffer itself. Backward then accumulates straight into the buffer the
allreduce runs on, so the pack and unpack copies disappear: a step writes the
count slot, allreduces in place and scales in place, with device-side ops
only (no host synchronization).

Gradients must stay those views: ``optimizer.zero_grad(set_to_none=False)``.
A gradient found elsewhere (set to None and made anew by backward) is
copied into its view and the view put back, so a step is always correct and
zero-copy again from the next one.
"""

from __future__ import annotations

import torch
from torch import nn

from ._plan import Plan

__all__ = ["FlatStorage"]


class FlatStorage:
    """The views of one module's trainable parameters and gradients."""

    def __init__(self, module: nn.Module, params: list[nn.Parameter], plan: Plan) -> None:
        self.module = module
        self.params = params
        self.plan = plan
        layout = plan.layout
        self.param_buffer = torch.zeros_like(plan.buffer)
        self.grad_views = []
        with torch.no_grad():
            for param, offset in zip(params, layout.offsets, strict=True):
                end = offset + param.numel()
                data_view = self.param_buffer[offset:end].view(param.shape)
                data_view.copy_(param)
                param.data = data_view
                grad_view = plan.buffer[offset:end].view(param.shape)
                if param.grad is not None:
                    grad_view.copy_(param.grad)
                else:
                    grad_view.zero_()
                param.grad = grad_view
                self.grad_views.append(grad_view)
        self._view_addresses = [v.data_ptr() for v in self.grad_views]
        self.data = plan.buffer[: layout.count_offset]  # segments and their zero padding
        self.counts = plan.buffer[layout.count_offset : layout.count_offset + layout.count_slots]
        self.flag = plan.buffer[layout.flag_offset]
        self.copied_steps = 0  # steps where some gradient was not in its view

    def gather_gradients(self) -> None:
        """Puts every gradient back into its view (a copy only where it left it)."""
        moved = False
        for param, view, address in zip(
            self.params, self.grad_views, self._view_addresses, strict=True
        ):
            grad = param.grad
            if grad is None:
                raise ValueError(
                    "grads: a parameter of the flat module has no .grad; run backward() first"
                )
            if grad.data_ptr() != address:
                with torch.no_grad():
                    view.copy_(grad)
                param.grad = view
                moved = True
        self.copied_steps += moved

    def write_slots(self, count_slot: int, check_nonfinite: bool) -> None:
        """What the pack would write besides the data: count slots and the flag."""
        self.counts.zero_()
        self.counts[count_slot] = 1
        if check_nonfinite:
            self.flag.copy_((~torch.isfinite(self.data)).any())
        else:
            self.flag.zero_()

    def scale(self, normalize: bool, skip_nonfinite: bool) -> None:
        """What the unpack would do, in place and on the device: data /= the
        contributor count; zeros when skipping a flagged step."""
        if normalize:
            self.data.div_(self.counts.sum().clamp_min(1))
        if skip_nonfinite:
            self.data.masked_fill_(self.flag > 0, 0)
