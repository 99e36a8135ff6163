"""Argument checks. Every check runs before any tensor is touched, so a bad
call raises and leaves all tensors as they were."""

from __future__ import annotations

import datetime
import itertools
import math
import operator
from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch

from ._tree import Flat

# Storage types the kernels handle; codes match kernels/scalar_types.h.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
}

# Largest n such that every integer 0..n is exact in the dtype: a count slot
# may sum at most this many ones (IEEE mantissa bits + 1).
EXACT_INTEGER_LIMIT: dict[torch.dtype, int] = {
    torch.float32: 2**24,
    torch.float64: 2**53,
    torch.float16: 2**11,
    torch.bfloat16: 2**8,
}

# (device, per-tensor entries): what must stay the same between calls.
Signature = tuple[torch.device, tuple[tuple[Any, ...], ...]]


def is_dense(tensor: torch.Tensor) -> bool:
    """True when the elements fill one memory block without gaps or overlap
    (contiguous, channels_last, or any other permutation of dims)."""
    if tensor.numel() == 0 or tensor.is_contiguous():
        return True
    expected = 1
    dims = sorted((st, sz) for sz, st in zip(tensor.shape, tensor.stride(), strict=True) if sz != 1)
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def signature(flat: Flat, arg: str, with_strides: bool) -> Signature:
    """Validates a flattened structure and returns its signature.

    Raises TypeError for non-tensors and unsupported dtypes, ValueError for
    an empty structure, mixed devices and tensors that are not dense.
    """
    if not flat.tensors:
        raise ValueError(f"{arg}: contains no tensors")
    device = flat.tensors[0].device
    entries = []
    for tensor, name in zip(flat.tensors, flat.names, strict=True):
        if tensor.layout is not torch.strided:
            raise TypeError(f"{name}: {tensor.layout} tensors are not supported")
        if tensor.dtype not in DTYPE_CODES:
            raise TypeError(
                f"{name}: dtype {tensor.dtype} is not supported; expected float32, "
                f"float64, float16 or bfloat16"
            )
        if tensor.device != device:
            raise ValueError(
                f"{name}: is on {tensor.device} but {flat.names[0]} is on {device}; all "
                f"tensors of {arg} must be on one device"
            )
        if not is_dense(tensor):
            raise ValueError(
                f"{name}: is not dense (a strided view with gaps); pass a contiguous tensor"
            )
        if with_strides:
            entries.append((tensor.dtype, tuple(tensor.shape), tensor.stride()))
        else:
            entries.append((tensor.dtype, tuple(tensor.shape)))
    return device, tuple(entries)


def structure_entries(sig: Signature) -> list[str]:
    """One line per tensor of a signature, as the ranks compare them (device
    type, not index: ranks may use different GPUs)."""
    device, entries = sig
    return [f"{device.type} " + " ".join(str(part) for part in entry) for entry in entries]


# What the hot path compares between calls: if every tensor has the dtype,
# shape, device and layout of the last validated call and is contiguous,
# signature() would pass and return the same value, so it can be skipped.
tensor_metadata = operator.attrgetter("dtype", "shape", "device", "layout")


def unchanged_since(flat: Flat, metadata: tuple[Any, ...] | None) -> bool:
    """Whether the tensors' metadata equals ``metadata`` (from a validated
    call) and every tensor is contiguous; False: a full check is needed."""
    return tuple(map(tensor_metadata, flat.tensors)) == metadata and all(
        map(torch.Tensor.is_contiguous, flat.tensors)
    )


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
        detail = f"tensor {index} is {got_entries[index]}, expected {exp_entries[index]}"
    raise ValueError(
        f"{arg}: structure changed since the first call ({detail}); every call must pass "
        f"tensors of the same dtypes, shapes and order, as all ranks must"
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


def check_tau(tau: Any) -> int:
    if isinstance(tau, bool) or not isinstance(tau, int):
        raise TypeError(f"tau must be an int, got {type(tau).__name__}")
    if tau < 1:
        raise ValueError(f"tau must be >= 1, got {tau}")
    return tau


def check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 0.0 < alpha <= 1.0):
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return alpha


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
NONFINITE_MODES = ("propagate", "skip", "raise")


def check_nonfinite(mode: Any) -> str:
    if not isinstance(mode, str) or mode not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE_MODES)}; got {mode!r}")
    return mode
