"""Walking the user's structures of tensors, as torch-distlearn walked Lua tables.

A structure is a tensor, a list/tuple/dict nesting of tensors, or an
``nn.Module``. Flattening gives the tensors in a fixed order (lists and tuples
by index, dicts by insertion order, modules by ``named_parameters()``), a
name per tensor for error messages, and a function that rebuilds the same
structure around other tensors (the EA center).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Rebuild = Callable[[list[torch.Tensor]], Any]


@dataclass(frozen=True)
class Flat:
    """Tensors of a structure in walk order, their names, and the structure's shape."""

    tensors: list[torch.Tensor]
    names: list[str]
    rebuild: Rebuild


def flatten(structure: Any, arg: str) -> Flat:
    """Flattens a tensor structure; ``arg`` names it in error messages.

    An ``nn.Module`` contributes all its parameters, and rebuilds as a dict
    from parameter name to tensor.
    """
    if isinstance(structure, nn.Module):
        named = list(structure.named_parameters())
        names = [f"{arg}.{name}" for name, _ in named]
        keys = [name for name, _ in named]
        return Flat([p for _, p in named], names, lambda ts: dict(zip(keys, ts, strict=True)))
    if type(structure) is list and all(isinstance(t, torch.Tensor) for t in structure):
        # The common case, on the hot path: a flat list of tensors.
        return Flat(list(structure), _list_names(arg, len(structure)), list)
    tensors: list[torch.Tensor] = []
    walked: list[str] = []
    spec = _walk(structure, arg, tensors, walked)
    return Flat(tensors, walked, lambda ts: _build(spec, iter(ts)))


@functools.lru_cache(maxsize=64)
def _list_names(arg: str, length: int) -> list[str]:
    """The names _walk gives a flat list's tensors (shared: never mutated)."""
    return [f"{arg}[{i}]" for i in range(length)]


def materialize(structure: Any) -> Any:
    """A one-shot iterable (``model.parameters()``, a generator, dict values)
    as a list, so it can be walked more than once; anything else unchanged."""
    if isinstance(structure, (torch.Tensor, nn.Module, list, tuple, dict, str, bytes)):
        return structure
    if isinstance(structure, Iterable):
        return list(structure)
    return structure


def flatten_grads(structure: Any, arg: str) -> Flat:
    """Flattens gradients, PyTorch's way (``clip_grad_norm_``, optimizers): a
    module stands for the ``.grad`` of each trainable parameter, and so does
    any tensor that requires grad (a parameter), alone or in a structure;
    a tensor that requires grad is never taken as a gradient itself.

    Raises ValueError naming the parameter when one has no gradient.
    """
    if not isinstance(structure, nn.Module):
        flat = flatten(materialize(structure), arg)
        if not any(t.requires_grad for t in flat.tensors):
            return flat
        return Flat(
            [_grad_of(t, name, arg) for t, name in zip(flat.tensors, flat.names, strict=True)],
            [
                f"{name}.grad" if t.requires_grad else name
                for t, name in zip(flat.tensors, flat.names, strict=True)
            ],
            flat.rebuild,
        )
    grads: list[torch.Tensor] = []
    names: list[str] = []
    for name, param in structure.named_parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            raise ValueError(
                f"{arg}: parameter '{name}' has no .grad; run backward() first, or set "
                f"requires_grad=False on parameters that take no part in the loss"
            )
        grads.append(param.grad)
        names.append(f"{arg}.{name}.grad")
    return Flat(grads, names, list)


def _grad_of(tensor: torch.Tensor, name: str, arg: str) -> torch.Tensor:
    """A gradient given as itself, or a parameter given for its ``.grad``."""
    if not tensor.requires_grad:
        return tensor
    grad = tensor.grad if tensor.is_leaf else None
    if grad is None:
        raise ValueError(
            f"{arg}: {name} requires grad, so it stands for its .grad, and it has none; "
            f"run backward() first, or pass gradients (detached) rather than parameters"
        )
    return grad


def trainable(structure: Any, arg: str) -> Flat:
    """The tensors whose gradients ``flatten_grads`` returns: what a gradient looks like."""
    if not isinstance(structure, nn.Module):
        return flatten(structure, arg)
    named = [(n, p) for n, p in structure.named_parameters() if p.requires_grad]
    return Flat([p for _, p in named], [f"{arg}.{n}" for n, _ in named], list)


# A spec is the structure with tensors replaced by None: ("tensor",),
# ("list", [specs]), ("tuple", [specs]) or ("dict", [keys], [specs]).
def _walk(node: Any, path: str, tensors: list[torch.Tensor], names: list[str]) -> tuple:
    if isinstance(node, (list, tuple)):
        kind = "list" if isinstance(node, list) else "tuple"
        return (kind, [_walk(v, f"{path}[{i}]", tensors, names) for i, v in enumerate(node)])
    if isinstance(node, dict):
        keys = list(node.keys())
        return ("dict", keys, [_walk(node[k], f"{path}[{k!r}]", tensors, names) for k in keys])
    if not isinstance(node, torch.Tensor):
        raise TypeError(
            f"{path} is a {type(node).__name__}; expected a tensor, a list/tuple/dict of "
            f"tensors, or an nn.Module"
        )
    tensors.append(node)
    names.append(path)
    return ("tensor",)


def _build(spec: tuple, leaves: Any) -> Any:
    kind = spec[0]
    if kind == "tensor":
        return next(leaves)
    if kind == "list":
        return [_build(s, leaves) for s in spec[1]]
    if kind == "tuple":
        return tuple(_build(s, leaves) for s in spec[1])
    return {k: _build(s, leaves) for k, s in zip(spec[1], spec[2], strict=True)}
