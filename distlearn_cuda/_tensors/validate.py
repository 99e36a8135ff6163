"""Argument checks. Every check runs before any tensor is touched, so a bad
call raises and leaves all tensors as they were."""

from __future__ import annotations

import datetime
import itertools
import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any, Literal, get_args

import torch

from .._native import DTYPE_CODES
from .layouts import canonical_strides, describe_layout, is_dense
from .tree import Flat

# Largest n such that every integer 0..n is exact in the dtype: a count slot
# may sum at most this many ones (IEEE mantissa bits + 1).
EXACT_INTEGER_LIMIT: dict[torch.dtype, int] = {
    torch.float32: 2**24,
    torch.float64: 2**53,
    torch.float16: 2**11,
    torch.bfloat16: 2**8,
}

# (device, per-tensor entries (dtype, shape, strides)): what must stay the
# same between calls and across ranks. The strides are the tensor's memory
# order (``_tensors.layouts.canonical_strides``; see the note "Segment order").
Signature = tuple[torch.device, tuple[tuple[Any, ...], ...]]


def tensor_problem(tensor: torch.Tensor, name: str) -> TypeError | ValueError | None:
    """Why a tensor cannot be averaged, or None (dtype, layout, density)."""
    if tensor.layout is not torch.strided:
        return TypeError(f"{name}: {tensor.layout} tensors are not supported")
    if tensor.dtype not in DTYPE_CODES:
        return TypeError(
            f"{name}: dtype {tensor.dtype} is not supported; expected float32, "
            f"float64, float16 or bfloat16"
        )
    if not is_dense(tensor):
        return ValueError(
            f"{name}: is not dense (a strided view with gaps); pass a contiguous tensor"
        )
    return None


def entry(tensor: torch.Tensor) -> tuple[Any, ...]:
    """A tensor's signature entry: dtype, shape and memory order."""
    return (tensor.dtype, tuple(tensor.shape), canonical_strides(tensor))


def signature(flat: Flat, arg: str) -> Signature:
    """Validates a flattened structure and returns its signature.

    Raises TypeError for non-tensors and unsupported dtypes, ValueError for
    an empty structure, mixed devices and tensors that are not dense.
    """
    if not flat.tensors:
        raise ValueError(f"{arg}: contains no tensors")
    device = flat.tensors[0].device
    entries = []
    for tensor, name in zip(flat.tensors, flat.names, strict=True):
        problem = tensor_problem(tensor, name)
        if problem is not None:
            raise problem
        if tensor.device != device:
            raise ValueError(
                f"{name}: is on {tensor.device} but {flat.names[0]} is on {device}; all "
                f"tensors of {arg} must be on one device"
            )
        entries.append(entry(tensor))
    return device, tuple(entries)


def describe_entry(entry: tuple[Any, ...]) -> str:
    """ "torch.float32 (64, 3, 7, 7) channels_last": an entry as messages and
    the ranks' structure comparison show it."""
    dtype, shape, strides = entry
    if not strides and shape:
        return f"{dtype} {shape}"
    return f"{dtype} {shape} {describe_layout(shape, strides)}"


def structure_entries(sig: Signature) -> list[str]:
    """One line per tensor of a signature, as the ranks compare them (device
    type, not index: ranks may use different GPUs)."""
    device, entries = sig
    return [f"{device.type} {describe_entry(e)}" for e in entries]


def check_same_signature(expected: Signature, got: Signature, arg: str) -> None:
    """ValueError when a structure differs from the one the object was bound to."""
    if expected == got:
        return
    exp_device, exp_entries = expected
    got_device, got_entries = got
    if exp_device != got_device:
        detail = f"device {got_device}, expected {exp_device}"
    elif len(exp_entries) != len(got_entries):
        detail = f"{len(got_entries)} tensors, expected {len(exp_entries)}"
    else:
        index = next(
            i for i, (e, g) in enumerate(zip(exp_entries, got_entries, strict=True)) if e != g
        )
        detail = (
            f"tensor {index} is {describe_entry(got_entries[index])}, "
            f"expected {describe_entry(exp_entries[index])}"
        )
    raise ValueError(
        f"{arg}: structure changed since the first call ({detail}); every call must pass "
        f"tensors of the same dtypes, shapes, memory layouts and order, as all ranks must"
    )


def check_no_overlap(flat: Flat, arg: str) -> None:
    """ValueError when two tensors share memory (an update would apply twice)."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
        for t, name in zip(flat.tensors, flat.names, strict=True)
        if t.numel() > 0
    )
    for (_, end, name), (start, _, next_name) in itertools.pairwise(spans):
        if start < end:
            raise ValueError(f"{arg}: {name} and {next_name} share memory")


def check_int(value: Any, name: str, low: int) -> int:
    """An int (not a bool) >= ``low``; TypeError or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_tau(tau: Any) -> int:
    return check_int(tau, "tau", 1)


# The elastic-averaging paper's beta = p * alpha (arXiv 1412.6651, section 3:
# "beta = 0.9" in its experiments), the default of AllReduceEA: stable at any
# number of ranks p (see check_ea_rate).
DEFAULT_BETA = 0.9


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_real(value: Any, name: str, low: float, high: float | None) -> float:
    """A finite real number in [low, high) ([low, inf) when ``high`` is None)."""
    value = _real(value, name)
    if not math.isfinite(value) or value < low or (high is not None and value >= high):
        where = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be finite and {where}, got {value}")
    return value


def state_tensors(state: Any, key: str) -> list[torch.Tensor] | None:
    """``state[key]``: None or a list (or tuple) of tensors, as a list."""
    value = state_value(state, key, object)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in value):
        raise TypeError(f"state[{key!r}] must be None or a list of tensors")
    return list(value)


def check_state_tensors(
    tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor], key: str
) -> None:
    """ValueError unless loaded ``state[key]`` has the bound tensors' count,
    dtypes and shapes."""
    if len(tensors) != len(like):
        raise ValueError(f"state[{key!r}] has {len(tensors)} tensors, the params have {len(like)}")
    for index, (got, want) in enumerate(zip(tensors, like, strict=True)):
        if got.dtype != want.dtype or got.shape != want.shape:
            raise ValueError(
                f"state[{key!r}][{index}] is {got.dtype} {tuple(got.shape)}, the params' "
                f"tensor {index} is {want.dtype} {tuple(want.shape)}"
            )


def check_ea_rate(alpha: Any, beta: Any, world_size: int) -> float:
    """AllReduceEA's moving rate alpha, given as ``alpha`` (torch-distlearn's)
    or as ``beta`` (the paper's p * alpha), or neither (beta = DEFAULT_BETA).

    NOTE: [EA stability]. A round moves each rank by delta_i = alpha * (x_i - c)
    and the center by the sum of the p deltas, so the distance between the
    ranks' mean and the center, m - c, becomes (1 - alpha * (p + 1)) * (m - c)
    (the ranks' spread around their mean only shrinks, by 1 - alpha). Rounds
    converge only when |1 - alpha * (p + 1)| < 1, that is alpha < 2 / (p + 1);
    at alpha = 2 / (p + 1) and above they oscillate or diverge (seen: the
    digits example at 10 ranks and alpha 0.2 fell from 88% to 27.5%).
    beta = p * alpha keeps the center's step fixed as p grows, which the
    paper recommends: beta < 2p / (p + 1) is stable, so beta = 0.9 is at any p.
    """
    if alpha is not None and beta is not None:
        raise ValueError("give alpha or beta, not both (beta = world size * alpha)")
    if beta is not None:
        beta = _real(beta, "beta")
        if not (math.isfinite(beta) and beta > 0.0):
            raise ValueError(f"beta must be > 0, got {beta}")
        rate, given = beta / world_size, f"beta={beta:g} (alpha = beta / {world_size} ranks"
    elif alpha is not None:
        rate = _real(alpha, "alpha")
        if not (math.isfinite(rate) and 0.0 < rate <= 1.0):
            raise ValueError(f"alpha must be in (0, 1], got {rate}")
        given = f"alpha={rate:g} ({world_size} ranks"
    else:
        return DEFAULT_BETA / world_size
    bound = 2.0 / (world_size + 1)
    if rate >= bound:
        raise ValueError(
            f"{given}) cannot be stable: each averaging round multiplies the distance between "
            f"the ranks' mean and the center by 1 - alpha * (ranks + 1) = "
            f"{1.0 - rate * (world_size + 1):.3g}, which converges only for alpha < "
            f"2 / (ranks + 1) = {bound:.4g}. Pass beta (the elastic-averaging paper's "
            f"ranks * alpha; {DEFAULT_BETA} in its experiments, the default here, is stable "
            f"at any number of ranks) or a smaller alpha"
        )
    return rate


def check_comm_dtype(comm_dtype: Any) -> torch.dtype | None:
    if comm_dtype is None:
        return None
    if not isinstance(comm_dtype, torch.dtype) or comm_dtype not in DTYPE_CODES:
        raise TypeError(
            f"comm_dtype must be None or one of float32, float64, float16, bfloat16; "
            f"got {comm_dtype!r}"
        )
    return comm_dtype


# Deadline of every collective unless the caller sets one: long enough for a
# peer's forward and backward of a large model or tau local steps of EA (the
# waits a collective of ranks that ran out of data sits through), short
# enough that a dead peer does not stall a job for torch's default 30 min.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)


def check_timeout(timeout: Any) -> datetime.timedelta:
    """The deadline as a timedelta: seconds (int or float) or a timedelta, > 0."""
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, Real) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(
            f"timeout must be seconds (int or float) or a datetime.timedelta, "
            f"got {type(timeout).__name__}"
        )
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"timeout must be a finite duration > 0, got {timeout!r}")
    return datetime.timedelta(seconds=seconds)


def state_value(state: Any, key: str, kind: type) -> Any:
    """state[key], checked to be a ``kind`` (ints: >= 0) for ``load_state_dict``."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping from state_dict(), got {type(state).__name__}")
    if key not in state:
        raise ValueError(f"state has no {key!r}; expected the keys of state_dict()")
    value = state[key]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"state[{key!r}] must be an int >= 0, got {value!r}")
    elif not isinstance(value, kind):
        raise TypeError(f"state[{key!r}] must be a {kind.__name__}, got {type(value).__name__}")
    return value


# What the non-finite guard does when a rank packs a NaN or an infinity.
NonFinite = Literal["propagate", "skip", "raise"]
NONFINITE_MODES: tuple[NonFinite, ...] = get_args(NonFinite)


def check_nonfinite(mode: Any) -> str:
    if not isinstance(mode, str) or mode not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE_MODES)}; got {mode!r}")
    return mode
