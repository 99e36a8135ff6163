"""Backward-overlapped gradient allreduce for ``AllReduceSGD.attach``.

The module's trainable parameters, in reverse registration order (the order
backward usually produces their gradients), are cut into buckets: a small
first one, so communication starts early, then ``bucket_mb`` each. A hook
after each parameter's gradient accumulation counts the bucket's ready
gradients; a full bucket is packed (its own flat buffer and count slot) and
its allreduce started asynchronously. Buckets start strictly in index order
(a full bucket waits for the ones before it), so every rank issues the same
collectives in the same order whatever order its gradients arrive in.
``finish`` then starts what is left, waits, and unpacks with normalization.

Invariant: between two ``finish`` calls each bucket starts at most once; a
second backward before ``finish`` raises instead of summing half a step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import increment_version

from ._collectives import Collectives, PendingSum
from ._flat_storage import GradientViews
from ._plan import Plan
from ._unused import Presence
from .errors import CommunicationError

__all__ = ["Bucket", "OverlappedGradients", "split_into_buckets"]

_MB = 2**20


def split_into_buckets(
    params: list[nn.Parameter], first_bucket_mb: float, bucket_mb: float
) -> list[list[int]]:
    """Indices of ``params`` per bucket, in order: the first bucket up to
    ``first_bucket_mb``, the others up to ``bucket_mb`` (a parameter larger
    than a bucket gets a bucket of its own); a bucket holds one device only."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for index, param in enumerate(params):
        nbytes = param.numel() * param.element_size()
        cap = (first_bucket_mb if not buckets else bucket_mb) * _MB
        if current and (size + nbytes > cap or param.device != params[current[0]].device):
            buckets.append(current)
            current, size = [], 0
        current.append(index)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


@dataclass
class Bucket:
    """Parameters whose gradients travel together, and their flat buffer."""

    params: list[nn.Parameter]
    names: list[str]
    plan: Plan
    ready: int = 0
    started: bool = False
    pending: PendingSum | None = None
    grads: list[torch.Tensor] = field(default_factory=list)
    addresses: list[int] = field(default_factory=list)
    # allow_unused: the plan's presence segment, and the gradients as packed
    # (None where missing), kept for the unpack.
    presence: Presence | None = None
    current: list[torch.Tensor | None] = field(default_factory=list)
    # gradient_as_bucket_view: the gradients are views of the plan's buffer.
    views: GradientViews | None = None


class OverlappedGradients:
    """The buckets of one attached module and the hooks that start them."""

    def __init__(
        self,
        module: nn.Module,
        buckets: list[Bucket],
        collectives: Collectives,
        count_slot: Callable[[Plan], int],
    ) -> None:
        self.module = module
        self.buckets = buckets
        self._collectives = collectives
        self._count_slot = count_slot
        self._next = 0  # the first bucket not started yet
        self.paused = False  # set by AllReduceSGD.no_sync()
        self._handles = [
            param.register_post_accumulate_grad_hook(self._hook(index))
            for index, bucket in enumerate(buckets)
            for param in bucket.params
        ]

    @property
    def plans(self) -> list[Plan]:
        return [bucket.plan for bucket in self.buckets]

    def detach(self) -> None:
        """Removes the hooks; refuses while a step is half done."""
        if any(bucket.started or bucket.ready for bucket in self.buckets):
            raise RuntimeError(
                "detach: a backward ran since the last sum_and_normalize_gradients; "
                "finish the step first"
            )
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def close(self) -> None:
        """Waits for the allreduces in flight (their failures were recorded
        already and are not raised again), then removes the hooks."""
        for bucket in self.buckets:
            if bucket.pending is not None:
                with contextlib.suppress(CommunicationError):
                    bucket.pending.wait()
                bucket.pending = None
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def finish(self, normalize: bool, check: bool) -> int:
        """Starts the buckets backward did not fill, waits for all, unpacks.

        With ``check``, returns how many ranks packed a non-finite value (the
        most over the buckets, read on the host), and leaves the gradients as
        they were when that is not 0, for the caller to decide; else 0."""
        while self._next < len(self.buckets):
            self._start(self._next)
        for bucket in self.buckets:
            assert bucket.pending is not None
            bucket.pending.wait()
        ranks = max(map(_nonfinite_ranks, self.buckets)) if check else 0
        for bucket in self.buckets:
            if bucket.views is not None:
                if ranks == 0:
                    bucket.grads = _finish_views(bucket.views, normalize)
            elif ranks == 0 and bucket.presence is not None:
                counts, contributors, _ = bucket.presence.read()
                bucket.grads = bucket.presence.unpack(
                    bucket.current, counts, contributors, normalize
                )
            elif ranks == 0:
                bucket.plan.unpack(bucket.grads, bucket.addresses, normalize=normalize)
            increment_version(bucket.grads)
            bucket.ready, bucket.started, bucket.pending = 0, False, None
            bucket.grads, bucket.addresses, bucket.current = [], [], []
        self._next = 0
        return ranks

    def _hook(self, index: int) -> Callable[[nn.Parameter], None]:
        def on_gradient(_: nn.Parameter) -> None:
            if self.paused:  # inside no_sync(): the gradient only accumulates
                return
            bucket = self.buckets[index]
            if bucket.started:
                raise RuntimeError(
                    "AllReduceSGD.attach: a second backward before sum_and_normalize_gradients; "
                    "for gradient accumulation, run the backward passes that only accumulate "
                    "inside sgd.no_sync()"
                )
            bucket.ready += 1
            while self._next < len(self.buckets) and self._full(self.buckets[self._next]):
                self._start(self._next)

        return on_gradient

    @staticmethod
    def _full(bucket: Bucket) -> bool:
        return bucket.ready == len(bucket.params)

    def _start(self, index: int) -> None:
        bucket = self.buckets[index]
        if bucket.views is not None:
            # Backward accumulated into the buffer: only the count slot to write.
            bucket.views.gather_gradients()
            bucket.views.write_slots(self._count_slot(bucket.plan), check_nonfinite=False)
            bucket.grads = bucket.views.grad_views
            bucket.pending = self._collectives.all_reduce_sum_async(
                bucket.plan.buffer, verify=False
            )
            bucket.started = True
            self._next = index + 1
            return
        if bucket.presence is not None:
            self._start_with_presence(index, bucket, bucket.presence)
            return
        grads = []
        for param, name in zip(bucket.params, bucket.names, strict=True):
            grad = param.grad
            if grad is None:
                raise ValueError(
                    f"grads: parameter '{name}' has no .grad; overlapped mode needs a gradient "
                    f"for every trainable parameter in every step"
                )
            if grad.shape != param.shape or grad.dtype != param.dtype or not grad.is_contiguous():
                raise ValueError(
                    f"grads: the .grad of '{name}' is not a contiguous {param.dtype} tensor of "
                    f"the parameter's shape"
                )
            grads.append(grad)
        addresses = [g.data_ptr() for g in grads]
        plan = bucket.plan
        plan.pack(grads, addresses, count_slot=self._count_slot(plan))
        bucket.grads, bucket.addresses = grads, addresses
        bucket.pending = self._collectives.all_reduce_sum_async(plan.buffer, verify=False)
        bucket.started = True
        self._next = index + 1

    def _start_with_presence(self, index: int, bucket: Bucket, presence: Presence) -> None:
        """allow_unused: missing gradients travel as zeros, marked absent."""
        current, tensors = presence.gather()
        plan = bucket.plan
        plan.pack(tensors, [t.data_ptr() for t in tensors], count_slot=self._count_slot(plan))
        bucket.current = current
        bucket.pending = self._collectives.all_reduce_sum_async(plan.buffer, verify=False)
        bucket.started = True
        self._next = index + 1


def _nonfinite_ranks(bucket: Bucket) -> int:
    """How many ranks packed a non-finite value into the bucket (read on the
    host). Zero-copy buckets start before the call's mode is known and pack
    no flag: there, 1 when the sum holds one (the count is not known)."""
    if bucket.views is not None:
        return int(bucket.views.summed_nonfinite())
    return bucket.plan.nonfinite_ranks()


def _finish_views(views: GradientViews, normalize: bool) -> list[torch.Tensor]:
    """Scales a zero-copy bucket in place (per-tensor counts with allow_unused)."""
    views.finish(normalize, skip_nonfinite=False)
    return views.grad_views
