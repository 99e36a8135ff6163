"""Where an AllReduceSGD object's gradients come from: its ``grads``
argument, bound at the first call, and read at every call after.

Three forms, told apart by what the argument holds:

- a module: the ``.grad`` of each of its parameters that requires grad;
- tensors some of which are parameters (an ``nn.Parameter``, or a tensor
  that requires grad): each parameter stands for its ``.grad``, as for
  ``clip_grad_norm_`` and optimizers, and a frozen one (an ``nn.Parameter``
  that does not require grad) for nothing; the other tensors are gradients;
- tensors that are all gradients.

The *trainable* tensors (those whose gradients are averaged) are bound with
their segments' structure: dtype, shape and memory order (see the note
"Segment order" in ``_tensors.layouts``). Each call reads the gradients and reports,
instead of raising, what is wrong with this rank's input (the ranks then
raise together, see ``_tensors.agreement``): a missing ``.grad`` (unless missing
ones are allowed), a gradient of another dtype, shape or layout kind, a
structure that changed, and the trainable set that changed (a layer frozen
or unfrozen after the binding).

Hot path (a bound module): walking ``named_parameters()`` costs about as
much as the rest of a call for a model of 161 tensors, so, as an optimizer
does, the parameters are bound once (one added to the module later is not
seen). Each call reads every parameter's ``requires_grad`` in one pass in C
(PyTorch keeps no version of it to compare instead) and the trainable ones'
``.grad``; gradient tensors that are the same objects as in the last call
passed the checks already, and new ones (every step after
``zero_grad(set_to_none=True)``) take one pass in C per property when they
have their parameters' strides, as autograd makes them.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch
from torch import nn

from . import tree as _tree
from .agreement import Problem
from .layouts import canonical_strides
from .validate import Signature, describe_entry, signature, tensor_problem

__all__ = ["Gathered", "GradientSource"]

_GRAD = operator.attrgetter("grad")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_LAYOUT = operator.attrgetter("layout")
_METADATA = operator.attrgetter("dtype", "shape", "device")
_STRIDE = torch.Tensor.stride


@dataclass
class Gathered:
    """One rank's gradients for a step, by bound trainable index."""

    grads: list[torch.Tensor | None]  # None: missing (no .grad)
    problems: list[Problem] = field(default_factory=list)
    added: list[str] = field(default_factory=list)  # trainable now, not bound
    removed: list[str] = field(default_factory=list)  # bound, not trainable now
    # Indices whose gradient lies in another memory order than its segment.
    reordered: list[int] = field(default_factory=list)
    complete: bool = False  # known: every gradient is present

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def _stands_for_grad(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, nn.Parameter) or tensor.requires_grad


class GradientSource:
    """A bound ``grads`` argument (see the module)."""

    def __init__(
        self,
        kind: str,
        names: list[str],
        items: list[torch.Tensor],
        roles: list[bool],
        trainable: list[bool],
        signature_: Signature,
        module: nn.Module | None,
        arg: str,
    ) -> None:
        self.kind = kind  # "module", "tensors"
        self.arg = arg
        # Every item of the argument (a module's parameters, or the flattened
        # tensors), whether it stands for its .grad, and whether it is trainable.
        self._items = items
        self._item_names = names
        self._roles = roles
        self._mask = trainable
        self._module = weakref.ref(module) if module is not None else None
        index = [i for i, t in enumerate(trainable) if t]
        self.trainable = [items[i] for i in index]  # parameters, or gradients themselves
        self.names = [names[i] for i in index]
        self.signature = signature_
        self._raw_strides = [tuple(t.stride()) for t in self.trainable]
        self._checked: list[torch.Tensor | None] = []
        self._checked_complete = False
        # What a flattened argument's tensors are compared with each call.
        self._types = list(map(type, items))
        self._requires = list(map(_REQUIRES_GRAD, items))
        self._metadata = list(map(_METADATA, items))

    # -- binding ------------------------------------------------------------

    @classmethod
    def bind(cls, grads: Any, arg: str) -> GradientSource:
        """The source for ``grads``; TypeError/ValueError (local) when its
        tensors cannot be averaged, nothing trainable included."""
        if isinstance(grads, nn.Module):
            named = list(grads.named_parameters())
            items: list[torch.Tensor] = [p for _, p in named]
            names = [n for n, _ in named]
            roles = [True] * len(items)
            trainable = list(map(_REQUIRES_GRAD, items))
            module: nn.Module | None = grads
        else:
            flat = _tree.flatten(_tree.materialize(grads), arg)
            items, names = flat.tensors, flat.names
            roles = _roles(items)
            trainable = _trainable(items, roles)
            module = None
        chosen = [t for t, keep in zip(items, trainable, strict=True) if keep]
        chosen_names = [n for n, keep in zip(names, trainable, strict=True) if keep]
        sig = signature(_tree.Flat(chosen, chosen_names, list), arg)
        return cls(
            "module" if module is not None else "tensors",
            names,
            items,
            roles,
            trainable,
            sig,
            module,
            arg,
        )

    def rebound(self) -> GradientSource:
        """The same argument with the trainable set it has now (after the
        ranks agreed on a change)."""
        if self.kind == "module":
            module = self._module() if self._module is not None else None
            assert module is not None
            return GradientSource.bind(module, self.arg)
        roles = _roles(self._items)
        trainable = _trainable(self._items, roles)
        chosen = [t for t, keep in zip(self._items, trainable, strict=True) if keep]
        chosen_names = [n for n, keep in zip(self._item_names, trainable, strict=True) if keep]
        sig = signature(_tree.Flat(chosen, chosen_names, list), self.arg)
        return GradientSource(
            self.kind, self._item_names, self._items, roles, trainable, sig, None, self.arg
        )

    def in_place_of(self, bound: GradientSource) -> GradientSource | None:
        """This source (another form of argument, e.g. a list of the bound
        module's parameters) standing in for ``bound``, or None when its
        tensors differ. The same tensors, frozen ones included: it takes
        ``bound``'s trainable set, so that a change since is seen as one.
        The same trainable tensors: it takes their segments."""
        if self.signature[0] != bound.signature[0]:
            return None
        if len(self._items) == len(bound._items) and all(
            map(operator.is_, self._items, bound._items)
        ):
            self._mask = list(bound._mask)
            index = [i for i, keep in enumerate(self._mask) if keep]
            self.trainable = [self._items[i] for i in index]
            self.names = [self._item_names[i] for i in index]
        elif [e[:2] for e in self.signature[1]] != [e[:2] for e in bound.signature[1]]:
            return None
        self.signature = bound.signature
        self._raw_strides = list(bound._raw_strides)
        self._checked = []
        return self

    def difference_from(self, bound: GradientSource) -> str:
        """Why this source cannot stand in for ``bound`` (see ``in_place_of``)."""
        mine, theirs = self.signature[1], bound.signature[1]
        if len(mine) != len(theirs):
            detail = f"{len(mine)} tensors to average, {len(theirs)} bound"
        elif self.signature[0] != bound.signature[0]:
            detail = f"on {self.signature[0]}, bound on {bound.signature[0]}"
        else:
            index = next(
                i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a[:2] != b[:2]
            )
            detail = (
                f"{self.names[index]} is {describe_entry(mine[index])}, "
                f"expected {describe_entry(theirs[index])}"
            )
        return (
            f"structure changed since the first call ({detail}); every call must pass the "
            f"same tensors, as all ranks must"
        )

    def trainable_changed(self, grads: Any) -> bool:
        """Whether ``grads`` is the bound argument with another trainable set."""
        if self._module is not None:
            return self.is_for(grads) and list(map(_REQUIRES_GRAD, self._items)) != self._mask
        problem, items = self._items_of(grads)
        return problem is None and _trainable(items, self._roles_of(items)) != self._mask

    def is_for(self, grads: Any) -> bool:
        """Whether ``grads`` is the bound module itself (the hot path)."""
        return self._module is not None and self._module() is grads

    @property
    def module(self) -> nn.Module | None:
        return self._module() if self._module is not None else None

    def entries(self) -> list[str]:
        """The bound structure, one entry per trainable tensor."""
        device, entries = self.signature
        return [f"{device.type} {describe_entry(e)}" for e in entries]

    # -- each call -------------------------------------------------------------

    def gather(self, grads: Any, allow_missing: bool) -> Gathered:
        """This rank's gradients for a step, checked (see the module).
        ``grads``: the call's argument (for a module source, the bound
        module: the caller checks ``is_for``)."""
        if self._module is not None:
            items, roles = self._items, self._roles
            mask = list(map(_REQUIRES_GRAD, items))
        else:
            problem, items = self._items_of(grads)
            if problem is not None:
                return Gathered([None] * len(self.trainable), [problem])
            roles = self._roles_of(items)
            mask = _trainable(items, roles)
        added: list[str] = []
        removed: list[str] = []
        optional: set[int] = set()  # trainable indices whose gradient may be missing
        if mask != self._mask:
            position = 0
            for name, now, then in zip(self._item_names, mask, self._mask, strict=True):
                if now and not then:
                    added.append(name)
                elif then and not now:
                    removed.append(name)
                    optional.add(position)
                position += then
        gathered = self._read(items, roles, allow_missing, optional)
        gathered.added, gathered.removed = added, removed
        return gathered

    def items_named(self, grads: Any, names: list[str]) -> list[torch.Tensor]:
        """The argument's tensors called ``names`` (the parameters a change
        made trainable, for the top-up of that step)."""
        items = self._items if self._module is not None else self._items_of(grads)[1]
        by_name = dict(zip(self._item_names, items, strict=True))
        return [by_name[name] for name in names]

    def _items_of(self, grads: Any) -> tuple[Problem | None, list[torch.Tensor]]:
        """A flattened argument's tensors, or why they are not the bound structure."""
        if type(grads) is list and all(map(isinstance, grads, repeat(torch.Tensor))):
            items = grads  # a flat list of tensors: the common case
        else:
            try:
                items = _tree.flatten(_tree.materialize(grads), self.arg).tensors
            except (TypeError, ValueError) as error:
                return Problem(type(error).__name__, str(error)), []
        # A parameter and a gradient of it look alike: either may stand in
        # each call (see the module).
        if list(map(_METADATA, items)) == self._metadata:
            return None, items
        return Problem("ValueError", self._difference(items)), []

    def _difference(self, items: list[Any]) -> str:
        if len(items) != len(self._items):
            detail = f"{len(items)} tensors, expected {len(self._items)}"
        else:
            index = next(
                i
                for i, (t, metadata) in enumerate(zip(items, self._metadata, strict=True))
                if _METADATA(t) != metadata
            )
            got, (dtype, shape, device) = items[index], self._metadata[index]
            detail = (
                f"{self._item_names[index]} is {got.dtype} {tuple(got.shape)} on {got.device}, "
                f"expected {dtype} {tuple(shape)} on {device}"
            )
        return (
            f"structure changed since the first call ({detail}); every call must pass tensors "
            f"of the same dtypes, shapes and order, as all ranks must"
        )

    def _roles_of(self, items: list[torch.Tensor]) -> list[bool]:
        """Which of ``items`` stand for their .grad (as bound, when their
        types and requires_grad flags are)."""
        if list(map(type, items)) == self._types and (
            list(map(_REQUIRES_GRAD, items)) == self._requires
        ):
            return self._roles
        return _roles(items)

    def _read(
        self,
        items: list[torch.Tensor],
        roles: list[bool],
        allow_missing: bool,
        optional: set[int],
    ) -> Gathered:
        """The bound trainable tensors' gradients, checked."""
        if self._module is not None:
            params = self.trainable
            grads: list[torch.Tensor | None] = list(map(_GRAD, params))
        else:
            params = [t for t, keep in zip(items, self._mask, strict=True) if keep]
            kept = [r for r, keep in zip(roles, self._mask, strict=True) if keep]
            grads = [(_grad_of(t) if role else t) for t, role in zip(params, kept, strict=True)]
        if len(grads) == len(self._checked) and all(map(operator.is_, grads, self._checked)):
            return Gathered(grads, complete=self._checked_complete)
        # PyTorch keeps a .grad of its parameter's dtype, shape and device, and
        # _items_of compared the gradients given as themselves.
        if (
            not any(map(operator.is_, grads, repeat(None)))
            and all(map(operator.is_, map(_LAYOUT, grads), repeat(torch.strided)))
            and list(map(_STRIDE, grads)) == self._raw_strides  # type: ignore[arg-type]
        ):
            self._checked, self._checked_complete = grads, True
            return Gathered(grads, complete=True)
        return self._check(params, grads, allow_missing, optional)

    def _check(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor | None],
        allow_missing: bool,
        optional: set[int],
    ) -> Gathered:
        gathered = self.check_some(range(len(params)), params, grads, allow_missing, optional)
        if not gathered.problems and not gathered.reordered:
            self._checked = grads
            self._checked_complete = not any(map(operator.is_, grads, repeat(None)))
        return gathered

    def check_bucket(
        self, indices: Sequence[int], params: Sequence[torch.Tensor], grads: list[Any]
    ) -> Gathered:
        """``check_some`` for a bucket a backward hook starts, with the same
        fast path as ``gather``: gradients that all exist as strided tensors
        with their bound strides (autograd makes them so) pass at once."""
        if (
            not any(map(operator.is_, grads, repeat(None)))
            and all(map(operator.is_, map(_LAYOUT, grads), repeat(torch.strided)))
            and list(map(_STRIDE, grads)) == [self._raw_strides[i] for i in indices]
        ):
            return Gathered(grads, complete=True)
        return self.check_some(indices, params, grads)

    def check_some(
        self,
        indices: Sequence[int],
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
        allow_missing: bool = False,
        optional: set[int] | frozenset[int] = frozenset(),
    ) -> Gathered:
        """The gradients of the bound trainable tensors ``indices`` (``params``
        stand for them), checked; ``reordered`` counts positions in ``grads``."""
        gathered = Gathered(list(grads))
        device, entries = self.signature
        for position, (index, param, grad) in enumerate(zip(indices, params, grads, strict=True)):
            bound, name = entries[index], self.names[index]
            if grad is None:
                if not allow_missing and index not in optional:
                    gathered.problems.append(Problem("ValueError", self._missing(param, name)))
                continue
            label = f"{self.arg}.{name}.grad" if grad is not param else name
            problem = tensor_problem(grad, label)
            if problem is None and (grad.dtype, tuple(grad.shape)) != bound[:2]:
                problem = ValueError(
                    f"{label}: is {grad.dtype} {tuple(grad.shape)}, expected {bound[0]} {bound[1]}"
                )
            if problem is None and grad.device != device:
                problem = ValueError(f"{label}: is on {grad.device}, expected {device}")
            if problem is not None:
                gathered.problems.append(Problem(type(problem).__name__, str(problem)))
                gathered.grads[position] = None  # packed as zeros: every rank raises
            elif canonical_strides(grad) != bound[2]:
                gathered.reordered.append(position)
        return gathered

    def _missing(self, param: torch.Tensor, name: str) -> str:
        if self._module is None:
            return (
                f"{name} requires grad, so it stands for its .grad, and it has none; run "
                f"backward() first, pass gradients (detached) rather than parameters, or "
                f"construct AllReduceSGD(allow_unused=True) when some ranks produce no gradient "
                f"for a parameter"
            )
        return (
            f"parameter '{name}' has no .grad; run backward() first, construct "
            f"AllReduceSGD(allow_unused=True) when some ranks produce no gradient for a "
            f"parameter (a branch or expert they did not use), or set requires_grad=False on "
            f"parameters that no rank trains"
        )


def _roles(items: list[torch.Tensor]) -> list[bool]:
    return [_stands_for_grad(t) for t in items]


def _trainable(items: list[torch.Tensor], roles: list[bool]) -> list[bool]:
    """A gradient given as itself is always averaged; a parameter when it
    requires grad (a frozen one stands for nothing)."""
    return [not role or t.requires_grad for t, role in zip(items, roles, strict=True)]


def _grad_of(tensor: torch.Tensor) -> torch.Tensor | None:
    """A parameter's gradient (a non-leaf tensor has none of its own)."""
    return tensor.grad if tensor.is_leaf else None
