"""A module's gradients on the hot path: the trainable parameters bound once.

Walking ``named_parameters()`` costs about as much as the rest of a call for
a model of 161 tensors, so, as an optimizer does, the object binds a
module's trainable parameters at its first call with that module and reads
their ``.grad`` directly afterwards. What PyTorch enforces is not checked
again: a ``.grad`` has its parameter's dtype, shape and device. What it does
not enforce is, whenever a gradient is a new tensor (after
``zero_grad(set_to_none=True)``, every step): it exists, and it is a dense
strided tensor. Gradient tensors that are the same objects as in
the last call passed that check already.

Parameters added to the module, replaced, or frozen after the binding are
not seen, as by an optimizer made before: make a new object.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from itertools import repeat

import torch
from torch import nn

from . import _C
from ._validate import is_dense

__all__ = ["ModuleGradients", "check_gradient"]

_GRAD = operator.attrgetter("grad")
_LAYOUT = operator.attrgetter("layout")
_DATA_PTR = torch.Tensor.data_ptr
_IS_CONTIGUOUS = torch.Tensor.is_contiguous


def _all_contiguous(grads: list[torch.Tensor | None]) -> bool:
    """Whether every gradient exists and is a contiguous strided tensor, as
    autograd makes them for contiguous parameters: one pass in C per
    property, where ``check_gradient`` costs a Python call per tensor
    (about 65 us for 161 new gradients, every step after
    ``zero_grad(set_to_none=True)``)."""
    return (
        not any(map(operator.is_, grads, repeat(None)))
        and all(map(operator.is_, map(_LAYOUT, grads), repeat(torch.strided)))
        and all(map(_IS_CONTIGUOUS, grads))
    )


@dataclass
class ModuleGradients:
    """The bound trainable parameters of one module and their last checked gradients."""

    module: weakref.ref[nn.Module]
    params: list[nn.Parameter]
    names: list[str]
    checked: list[torch.Tensor]
    address_list: list[int]
    addresses: _C.Addresses  # the same, as the ops take them

    def is_for(self, module: nn.Module) -> bool:
        return self.module() is module

    def gather(self) -> tuple[list[torch.Tensor], _C.Addresses]:
        """The current gradients and their addresses, checked where they are
        new tensors (PyTorch keeps a gradient's shape and dtype those of its
        parameter; resizing one in place is not supported).

        Raises ValueError naming the parameter when a gradient is missing or
        is not a dense strided tensor; nothing is modified."""
        grads = list(map(_GRAD, self.params))
        if not all(map(operator.is_, grads, self.checked)):
            if not _all_contiguous(grads):
                for grad, name in zip(grads, self.names, strict=True):
                    check_gradient(grad, name)
            self.checked = grads
        # Read every call: a tensor that got new storage (resize_, set_) must
        # never be written at its old address.
        addresses = list(map(_DATA_PTR, grads))
        if addresses != self.address_list:
            self.address_list = addresses
            self.addresses = _C.Addresses(addresses)
        return grads, self.addresses


def check_gradient(grad: torch.Tensor | None, name: str) -> None:
    if grad is None:
        raise ValueError(
            f"grads: parameter '{name}' has no .grad; run backward() first, or set "
            f"requires_grad=False on parameters that take no part in the loss"
        )
    if grad.layout is not torch.strided:
        raise TypeError(f"grads.{name}.grad: {grad.layout} tensors are not supported")
    if not (grad.is_contiguous() or is_dense(grad)):
        raise ValueError(
            f"grads.{name}.grad: is not dense (a strided view with gaps); PyTorch gives a "
            f"gradient its parameter's layout, so it was assigned by hand"
        )
