"""The error-feedback residual of AllReduceSGD's low-bit buckets (local:
never communicates).

NOTE [Residual layout]. A bucket's low-bit sum reads and writes its
residual laid out as the bucket's payload: its gradients' segments, in
bucket order (``kernels/layout.h``). Saved, loaded, and carried across a
change of buckets (``attach``, ``detach``, ``use_flat_storage``), the
residual has one layout whatever the mode: the payload of one bucket that
holds every trainable gradient in trainable order. That is the plain
mode's bucket, whose residual it then is, without a copy. So a checkpoint
fits an object of any mode, and attaching or detaching keeps what the
quantizations lost so far. When the trainable set changes (a layer frozen
or unfrozen), each gradient that stays (the same name, dtype, shape and
strides) keeps its segment; one that joins starts from zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _C
from .._comm.low_bit import ErrorFeedback
from .._native import DTYPE_CODES
from .buckets import Bucket

__all__ = ["GradientResidual"]

Entry = tuple[torch.dtype, tuple[int, ...], tuple[int, ...]]  # a signature entry


class GradientResidual:
    """What each bucket's quantizations lost, kept with the buckets and
    saved in the layout of NOTE [Residual layout]."""

    def __init__(self) -> None:
        self._feedback = ErrorFeedback("gradients")
        self._buckets: list[Bucket] = []
        # The gradients it is for, by name, and where each one's segment
        # begins in the saved layout.
        self._segments: dict[str, tuple[Entry, int]] = {}
        self._offsets: list[int] = []  # of each gradient's segment, in order

    def install(
        self, buckets: Sequence[Bucket], entries: Sequence[Entry], names: Sequence[str]
    ) -> None:
        """Gives each bucket (its ``low_bit`` set) its residual for the
        gradients of ``entries`` (named ``names``): each one's segment kept
        so far when it was among the buckets' before, else a residual
        loaded before binding, else zeros."""
        kept = self._gathered() if self._buckets else None  # make() replaces it, never writes it
        numels = [math.prod(shape) for _, shape, _ in entries]
        # One bucket of all of them, its presence segment last (see
        # _algorithms.buckets): the payload ends where that begins.
        code = DTYPE_CODES[torch.float32]
        layout = _C.Layout([*numels, len(numels)], [code] * (len(numels) + 1), code, 1)
        saved = self._feedback.make(layout.offsets[-1])
        offsets = layout.offsets[:-1]  # the gradients' segments
        if kept is not None:
            for name, entry, offset, count in zip(names, entries, offsets, numels, strict=True):
                was = self._segments.get(name)
                if was is not None and was[0] == entry:
                    saved[offset : offset + count].copy_(kept[was[1] : was[1] + count])
        self._segments = {
            name: (entry, offset)
            for name, entry, offset in zip(names, entries, offsets, strict=True)
        }
        self._offsets, self._buckets = layout.offsets, list(buckets)
        for bucket in self._buckets:
            assert bucket.low_bit is not None
            whole = bucket.whole and bucket.low_bit.payload == saved.numel()
            bucket.residual = saved if whole else torch.zeros(bucket.low_bit.payload)
        self._scatter()

    def saved(self) -> torch.Tensor | None:
        """A copy in the saved layout (None before binding and loading)."""
        if self._buckets:
            self._gathered()
        return self._feedback.saved()

    def load(self, residual: torch.Tensor) -> None:
        """Takes a saved residual: now when bound (ValueError when it does
        not fit, nothing changed), else at binding."""
        self._feedback.load(residual)
        if self._buckets:
            self._scatter()

    def _pairs(self, bucket: Bucket) -> list[tuple[int, int, int]]:
        """(offset in the bucket, offset in the saved layout, numel) per gradient."""
        offsets = bucket.plan.layout.offsets
        numels = bucket.plan.layout.numels
        return [(offsets[j], self._offsets[i], numels[j]) for j, i in enumerate(bucket.indices)]

    def _scatter(self) -> None:
        """The buckets' residuals <- the saved layout's tensor."""
        self._copy(to_buckets=True)

    def _gathered(self) -> torch.Tensor:
        """The saved layout's tensor, brought up to date from the buckets."""
        return self._copy(to_buckets=False)

    def _copy(self, to_buckets: bool) -> torch.Tensor:
        """Copies each gradient's segment between the saved layout's tensor
        and its bucket's residual (a bucket whose residual is that tensor
        itself is skipped); returns that tensor."""
        saved = self._feedback.residual
        assert saved is not None
        for bucket in self._buckets:
            own = bucket.residual
            assert own is not None
            if own is saved:
                continue
            for at, where, count in self._pairs(bucket):
                if to_buckets:
                    own[at : at + count].copy_(saved[where : where + count])
                else:
                    saved[where : where + count].copy_(own[at : at + count])
        return saved
