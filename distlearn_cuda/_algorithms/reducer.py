"""The one gradient reducer of AllReduceSGD, for every mode.

A step is the same whatever the mode: the bound gradients (``_tensors.grad_source``)
are cut into buckets (``_algorithms.buckets``), each bucket is filled (packed, or in
place) with this rank's count slot under its call code and allreduced, and
once every bucket arrived the ranks' codes decide (see ``_tensors.agreement``):
agreed, the buckets are unpacked (normalized, with the non-finite guard and
the partial means of ``allow_unused``); not agreed, every rank raises the
same error, or all bind a changed trainable set together. Modes differ only
in their buckets, chosen once at bind time:

- plain: one packed bucket, filled and allreduced by the ``sum_*`` call;
- ``use_flat_storage``: one in-place bucket, the parameters views of a
  buffer laid out the same way;
- ``attach``: the module's trainable parameters in reverse order cut into
  buckets (packed, or in place with ``gradient_as_bucket_view``), each filled
  and started by a backward hook once its gradients are ready, the last one
  always by the ``sum_*`` call, so that it carries the call's code.

Invariant: between two steps each bucket starts at most once, in index
order, so every rank issues the same collectives in the same order whatever
order its gradients arrive in.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import increment_version

from .._comm.collectives import Collectives, PendingSum, is_capturing
from .._comm.low_bit import LowBitSettings, LowBitSum
from .._tensors import agreement as _agreement
from .._tensors.agreement import CHANGED, PROBLEM, SGD_CODES, Description, Problem
from .._tensors.grad_source import Gathered, GradientSource
from .._tensors.plan import Plan, count_slots_for, lossless_dtype
from .._tensors.validate import EXACT_INTEGER_LIMIT, Signature
from ..errors import CommunicationError
from .buckets import Bucket, FlatParameters
from .residuals import GradientResidual

__all__ = ["GradientReducer", "Modes", "split_into_buckets"]


def _zero(tensors: list[torch.Tensor]) -> None:
    """Zeros the tensors (none: nothing; torch's foreach ops refuse an empty list)."""
    if tensors:
        torch._foreach_zero_(tensors)


_MB = 2**20
_GRAD = operator.attrgetter("grad")


def split_into_buckets(
    params: Sequence[torch.Tensor], first_bucket_mb: float, bucket_mb: float
) -> list[list[int]]:
    """Indices of ``params`` per bucket, in order: the first bucket up to
    ``first_bucket_mb``, the others up to ``bucket_mb`` (a parameter larger
    than a bucket gets a bucket of its own)."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for index, param in enumerate(params):
        nbytes = param.numel() * param.element_size()
        cap = (first_bucket_mb if not buckets else bucket_mb) * _MB
        if current and size + nbytes > cap:
            buckets.append(current)
            current, size = [], 0
        current.append(index)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


@dataclass(frozen=True)
class Modes:
    """How the buckets are made: ``attach`` (None: not attached) and
    ``flat`` (use_flat_storage)."""

    attach: tuple[float, float, bool] | None = None  # first_bucket_mb, bucket_mb, views
    flat: bool = False


@dataclass
class _Deferred:
    """A step whose codes the host reads at the next call (see the note
    "Deferred agreement")."""

    counts: torch.Tensor  # the decision plan's count slots, copied off the device
    event: Any  # a torch.cuda.Event recorded after the copy, or None
    code: int
    description: Description
    per_code: bool = False  # counts already summed per code


class GradientReducer:
    """Averages the gradients of one bound source over a group."""

    def __init__(
        self,
        collectives: Collectives,
        rank: int,
        world_size: int,
        comm_dtype: torch.dtype | None,
        allow_unused: bool,
        low_bit: LowBitSettings | None = None,
    ) -> None:
        self._low_bit = low_bit if low_bit is not None and low_bit.format else None
        self._feedback = (
            GradientResidual()
            if self._low_bit is not None and self._low_bit.error_feedback
            else None
        )
        self._collectives = collectives
        self._rank = rank
        self._world_size = world_size
        self._comm_dtype = comm_dtype
        self._allow_unused = allow_unused
        self.source: GradientSource | None = None
        self.modes = Modes()
        self.buckets: list[Bucket] = []
        self.flat_params: FlatParameters | None = None
        self._hooks: list[Any] = []
        self._next = 0  # the first bucket not started yet
        self.paused = False  # set by no_sync()
        self.steps = 0
        # Whether the last step, made with "skip", zeroed the gradients.
        self.skipped: Callable[[], bool] | None = None
        # Steps whose codes the host reads at the next call (CUDA buffers),
        # and where their count slots are copied.
        self._deferred: _Deferred | None = None
        self._deferred_host: torch.Tensor | None = None
        self._deferred_event: Any = None
        # Reads the codes at the next call on every device, as on CUDA (tests).
        self.defer_reads = False
        self._hook_problems: list[Problem] = []
        self._rebind_due = False  # settled in a backward: the next call binds anew

    # -- binding ---------------------------------------------------------------

    @property
    def bound(self) -> bool:
        return self.source is not None

    def bind(self, grads: Any, arg: str) -> None:
        """Binds the gradient structure once all ranks agree on it (collective).

        Each rank binds exactly once, in its first call of any kind, so the
        ranks' structure checks pair up even when some take no step. A rank
        whose argument cannot be bound still takes part, so that every rank
        raises (a ValueError naming the difference, or the same error)."""
        try:
            source = GradientSource.bind(grads, arg)
            entries, names, error = source.entries(), source.names, None
        except (TypeError, ValueError) as local:
            source, error = None, local
            entries, names = [f"cannot be bound: {local}"], ["the argument"]
        self._collectives.check_same_structure(entries, names, arg)
        if error is not None:
            raise error
        assert source is not None
        self._install(source)

    def _install(self, source: GradientSource) -> None:
        """Makes the buckets of ``source`` for the current modes (local)."""
        self._rebind_due = False
        self._remove_hooks()
        self.source = source
        device, entries = source.signature
        # The low-bit sum quantizes float32 values.
        dtype = torch.float32 if self._low_bit else self._comm_dtype
        dtype = dtype or lossless_dtype([e[0] for e in entries])
        if self._low_bit is not None and device.type != "cpu":
            raise ValueError(
                f"{source.arg}: compression={self._low_bit.format!r} runs on CPU tensors only "
                f"for now; these are on {device}"
            )
        if self._allow_unused and self._world_size > EXACT_INTEGER_LIMIT[dtype]:
            raise ValueError(
                f"allow_unused counts the ranks per tensor in the {dtype} buffer, exact up to "
                f"{EXACT_INTEGER_LIMIT[dtype]} ranks; this group has {self._world_size}"
            )
        params, names = source.trainable, source.names
        if self.modes.attach is None:
            groups = [list(range(len(params)))]
            in_place = self.modes.flat
        else:
            first_mb, bucket_mb, in_place = self.modes.attach
            order = list(reversed(range(len(params))))  # the order backward produces them
            groups = [
                [order[i] for i in group]
                for group in split_into_buckets([params[i] for i in order], first_mb, bucket_mb)
            ]
        if in_place and any(e[0] != dtype for e in entries):
            why = ": compression's low-bit sum takes float32 values" if self._low_bit else ""
            raise ValueError(
                f"{source.arg}: gradients in place (flat storage, bucket views) need the "
                f"buffers' dtype ({dtype}{why}) for every trainable parameter; got "
                f"{sorted({str(e[0]) for e in entries})}"
            )
        if self.modes.flat:
            # Its own plan, never a cache's: its buffer is the gradients.
            plan = self._plan((device, entries), dtype)
            assert source.module is not None, "flat storage binds a module"
            self.flat_params = FlatParameters(source.module, params, plan)
        self.buckets = []
        for group in groups:
            signature_ = (device, tuple(entries[i] for i in group))
            self.buckets.append(
                Bucket(
                    [params[i] for i in group],
                    [names[i] for i in group],
                    group,
                    plan if self.modes.flat else self._plan(signature_, dtype),
                    in_place,
                )
            )
        for bucket in self.buckets:
            bucket.whole = bucket.indices == list(range(len(params)))
        if self._low_bit is not None:
            self._install_low_bit(entries, names)
        if self.modes.attach is not None:
            # The last bucket's hooks only count: the call starts it.
            self._hooks = [
                param.register_post_accumulate_grad_hook(self._hook(index))
                for index, bucket in enumerate(self.buckets)
                for param in bucket.params
            ]
        self._next = 0

    def _install_low_bit(self, entries: Sequence[Any], names: Sequence[str]) -> None:
        """Each bucket's low-bit sum: its gradients' segments are quantized,
        the presence segment and the count slots after them stay exact; and
        with error feedback its residual (NOTE [Residual layout] in
        ``_algorithms.residuals``: kept across a change of buckets, per
        gradient across a change of the trainable set)."""
        assert self._low_bit is not None
        fmt = self._low_bit.format
        assert fmt is not None
        for bucket in self.buckets:
            layout = bucket.plan.layout
            payload = layout.offsets[-1]  # where the presence segment begins
            bucket.low_bit = LowBitSum.over(fmt, layout, payload, self._world_size, self._rank)
        if self._feedback is not None:
            self._feedback.install(self.buckets, entries, names)

    def residual(self) -> torch.Tensor | None:
        """A copy of the error feedback's residual, in the layout of NOTE
        [Residual layout] (None before binding, or without it)."""
        return self._feedback.saved() if self._feedback is not None else None

    def load_residual(self, residual: torch.Tensor | None) -> None:
        """Takes a saved residual: now when bound (its shape checked), else at binding."""
        if residual is not None and self._feedback is not None:
            self._feedback.load(residual)

    def _start_sum(self, bucket: Bucket) -> PendingSum:
        """Starts a contributing bucket's allreduce: low-bit (its residual
        goes in; NOTE [Low-bit sums in flight] orders the buckets' halves)
        or exact."""
        if bucket.low_bit is None:
            return self._collectives.all_reduce_sum_async(bucket.plan.buffer, verify=False)
        return self._collectives.all_reduce_low_bit_async(
            bucket.plan.buffer, bucket.low_bit, bucket.residual, settle=False
        )

    def _all_reduce(self, bucket: Bucket, contributes: bool) -> None:
        """A bucket's synchronous allreduce: low-bit (a contributor's residual
        goes in, settled by ``_finish``) or exact."""
        if bucket.low_bit is None:
            self._collectives.all_reduce_sum(bucket.plan.buffer)
            return
        self._collectives.all_reduce_low_bit(
            bucket.plan.buffer, bucket.low_bit, bucket.residual, contributes, settle=not contributes
        )

    def _settle_residuals(self) -> None:
        """Error feedback: once the ranks agreed to use a step's sums, each
        bucket keeps what its quantization lost (or drops its residual when
        the sum was flagged). A step every rank refuses, or that fails,
        leaves the residual as it was."""
        for bucket in self.buckets:
            if bucket.low_bit is not None and bucket.residual is not None:
                bucket.low_bit.settle_residual(bucket.residual, bucket.plan.buffer, True)

    def _plan(self, signature_: Signature, dtype: torch.dtype) -> Plan:
        """A bucket's plan, with the presence segment (see ``_algorithms.buckets``);
        its own, so buckets in flight together never share a buffer."""
        device, entries = signature_
        presence = (dtype, (len(entries),), (1,) if len(entries) > 1 else (0,))
        return Plan(
            (device, (*entries, presence)),
            dtype,
            count_slots_for(self._world_size, dtype),
            SGD_CODES,
        )

    def set_modes(self, modes: Modes) -> None:
        """Rebuilds the buckets for ``modes`` (attach, detach, flat storage)."""
        assert self.source is not None
        self.modes = modes
        self._install(self.source)

    @property
    def plans(self) -> list[Plan]:
        return [bucket.plan for bucket in self.buckets]

    def rebind_if_changed(self, params: Any) -> None:
        """At a synchronization (every rank checked it has the same trainable
        parameters): binds the source's new trainable set when ``params`` is
        the bound argument and its trainable set changed."""
        source = self.source
        if source is not None and source.trainable_changed(params):
            self._install(source.rebound())

    # -- hooks (attach) --------------------------------------------------------

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def on_gradient(_: torch.Tensor) -> None:
            if self.paused:  # inside no_sync(): the gradient only accumulates
                return
            if self._deferred is not None:
                # Before this step's first collective (see the note "Deferred
                # agreement"): a disagreement raises from this backward.
                self.settle(in_backward=True)
            if self._rebind_due:  # the call binds the new set; it starts every bucket
                return
            bucket = self.buckets[index]
            if bucket.started or bucket.ready == len(bucket.params):
                raise RuntimeError(
                    "AllReduceSGD.attach: a second backward before sum_and_normalize_gradients; "
                    "for gradient accumulation, run the backward passes that only accumulate "
                    "inside sgd.no_sync()"
                )
            bucket.ready += 1
            last = len(self.buckets) - 1
            while self._next < last and self.buckets[self._next].ready == len(
                self.buckets[self._next].params
            ):
                self._start_by_hook(self._next)

        return on_gradient

    def _start_by_hook(self, index: int) -> None:
        """Fills a bucket whose gradients backward produced, before the call
        (and its code) is known, and starts its allreduce."""
        bucket = self.buckets[index]
        assert self.source is not None
        grads = list(map(_GRAD, bucket.params))
        checked = self.source.check_bucket(bucket.indices, bucket.params, grads)
        self._hook_problems += checked.problems
        slot = bucket.plan.count_slot(self._rank, _agreement.HOOK)
        bucket.fill(
            checked.grads,
            checked.reordered,
            slot,
            check_nonfinite=bucket.views is None,
            complete=checked.complete,
        )
        bucket.started = bucket.started_by_hook = True
        bucket.pending = self._start_sum(bucket)
        self._next = index + 1

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def in_step(self) -> bool:
        """Whether a backward started buckets that no call finished yet."""
        return any(b.started or b.ready for b in self.buckets)

    def close(self) -> None:
        """Waits for the allreduces in flight (their failures were recorded
        already and are not raised again), then removes the hooks."""
        for bucket in self.buckets:
            if bucket.pending is not None:
                with contextlib.suppress(CommunicationError):
                    bucket.pending.wait()
            bucket.reset()
        self._remove_hooks()

    # -- a step ------------------------------------------------------------------

    def step(self, grads: Any, normalize: bool, nonfinite: str, arg: str = "grads") -> None:
        """The gradients of ``grads`` <- their sum (mean when ``normalize``)
        over the ranks that contributed, in place (the ``sum_*`` calls)."""
        if self._deferred is not None:
            self.settle()
        if self._rebind_due:
            assert self.source is not None
            self._install(self.source.rebound())
        self.skipped = None
        source = self.source
        assert source is not None
        if (source.module is not None and not source.is_for(grads)) or (
            source.module is None and isinstance(grads, nn.Module)
        ):
            gathered = self._other_argument(grads, source)
        else:
            gathered = source.gather(grads, self._allow_unused)
        if self.modes.attach is not None:
            # A problem a hook found is found again here: each counts once.
            gathered.problems = list(dict.fromkeys(self._hook_problems + gathered.problems))
            gathered.problems += self._replaced_since_hooks()
            self._hook_problems = []
        call = Description(
            _agreement.call_name(normalize),
            nonfinite,
            problems=gathered.problems,
            added=gathered.added,
            removed=gathered.removed,
        )
        if call.problems:
            code = PROBLEM
        elif call.changed:
            code = CHANGED
        else:
            code = _agreement.CALL_CODES[normalize, nonfinite]
        check_nonfinite = nonfinite != "propagate"
        try:
            self._start_remaining(gathered, code, check_nonfinite)
            for bucket in self.buckets:
                if bucket.pending is not None:
                    bucket.pending.wait()
        except BaseException:
            self._reset_buckets()
            raise
        decision = self.buckets[-1].plan
        try:
            if decision.on_cuda and is_capturing(decision.buffer.device):
                self._finish(normalize, nonfinite, (decision, code), host_reads=False)
            elif not (decision.on_cuda or self.defer_reads):
                if code in (CHANGED, PROBLEM) or not decision.holds_everyone(code):
                    self._disagree(call, normalize, nonfinite, grads, arg)
                else:
                    self._finish(normalize, nonfinite, None, host_reads=True)
            else:
                self._finish_deferred(decision, code, call, normalize, nonfinite)
                if call.added:  # never a local gradient left un-averaged: zeros too
                    assert self.source is not None
                    added = self.source.items_named(grads, call.added)
                    _zero([p.grad for p in added if p.grad is not None])
        finally:
            self._reset_buckets()

    def _skips_on_device(self) -> bool:
        """Whether the unpack kernels can skip a flagged step alone: one
        bucket, filled by the call (with the flag; a bucket a hook filled in
        place has none), so its flag is the step's."""
        return len(self.buckets) == 1 and not self.buckets[0].started_by_hook

    def _finish_deferred(
        self, decision: Plan, code: int, call: Description, normalize: bool, nonfinite: str
    ) -> None:
        """NOTE: [Deferred agreement]. On a CUDA buffer the host does not read
        the codes in the call: the unpack kernels read them and write zeros
        unless every contributor wrote this rank's code, and the host reads
        them at the object's next call (``settle``), where every rank that
        took part exchanges its description and raises, or binds a changed
        trainable set, together. Every rank follows that rule, whatever it
        knows of its own input, so no rank waits in an exchange that a peer
        only makes later while that peer runs other collectives. A call that
        reads the device anyway (the non-finite flags, the presence counts)
        reads the codes with them and, when they disagree, writes the same
        zeros instead of its host-side decisions."""
        host = nonfinite == "raise" or (nonfinite == "skip" and not self._skips_on_device())
        if code in (CHANGED, PROBLEM):
            # This rank knows already: the zeros its peers' kernels write.
            for bucket in self.buckets:
                _zero(bucket.present_gradients())
            self._defer(decision, code, call)
            self.steps += 1
            return
        if host or self._allow_unused:
            counts = decision.code_counts()
            if _agreement.verdict(counts) == code:
                self._finish(normalize, nonfinite, None, host_reads=True)
                return
            for bucket in self.buckets:
                _zero(bucket.present_gradients())
            self._deferred = _Deferred(torch.tensor(counts), None, code, call, per_code=True)
            self.steps += 1  # as on the ranks whose kernels wrote the zeros
            return
        self._finish(normalize, nonfinite, (decision, code), host_reads=False)
        self._defer(decision, code, call)

    def _replaced_since_hooks(self) -> list[Problem]:
        """Gradients that are no longer the tensors their bucket packed when
        backward started it (a ``.grad`` assigned after backward): their new
        values would not be averaged, so this rank reports it instead."""
        problems = []
        for bucket in self.buckets[: self._next]:
            if not bucket.started_by_hook:
                continue
            current = list(map(_GRAD, bucket.params))
            if all(map(operator.is_, current, bucket.grads)):
                continue
            name = next(
                n for n, g, p in zip(bucket.names, current, bucket.grads, strict=True) if g is not p
            )
            problems.append(
                Problem(
                    "ValueError",
                    f"the .grad of '{name}' was replaced after backward started its bucket "
                    f"(attach); change gradients in place, or detach() to pass them by call",
                )
            )
        return problems

    def _other_argument(self, grads: Any, source: GradientSource) -> Gathered:
        """An argument other than the bound module (another form: the first
        call may have been ``synchronize_parameters``): one of the same
        structure is bound in its place, locally (plain mode: attach and
        flat storage hold the module's parameters), anything else is this
        rank's problem."""
        if self.modes == Modes():
            try:
                other = GradientSource.bind(grads, source.arg)
            except (TypeError, ValueError) as error:
                return Gathered(
                    [None] * len(source.trainable), [Problem(type(error).__name__, str(error))]
                )
            if other.in_place_of(source) is not None:
                self._install(other)
                return other.gather(grads, self._allow_unused)
            problem = Problem("ValueError", other.difference_from(source))
        else:
            problem = Problem(
                "ValueError",
                "not the module bound by the first call (attach and use_flat_storage bind a "
                "module's parameters)",
            )
        return Gathered([None] * len(source.trainable), [problem])

    def _start_remaining(self, gathered: Gathered, code: int, check_nonfinite: bool) -> None:
        """Fills and starts every bucket backward did not start, with ``code``."""
        reordered = set(gathered.reordered)
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            grads = gathered.grads if bucket.whole else [gathered.grads[i] for i in bucket.indices]
            local = [j for j, i in enumerate(bucket.indices) if i in reordered] if reordered else []
            slot = bucket.plan.count_slot(self._rank, code)
            bucket.fill(
                grads, local, slot, check_nonfinite or bucket.views is None, gathered.complete
            )
            bucket.started = True
            if len(self.buckets) == 1:
                self._all_reduce(bucket, contributes=True)
            else:
                bucket.pending = self._start_sum(bucket)
            self._next += 1

    def _reset_buckets(self) -> None:
        for bucket in self.buckets:
            bucket.reset()
        self._next = 0

    def _finish(
        self,
        normalize: bool,
        nonfinite: str,
        agreement: tuple[Plan, int] | None,
        host_reads: bool,
    ) -> None:
        """The agreed step: the non-finite guard, then every bucket unpacked."""
        buckets = self.buckets
        skip_on_device = nonfinite == "skip" and self._skips_on_device()
        ranks = 0
        if host_reads and nonfinite != "propagate" and not skip_on_device:
            ranks = max(b.nonfinite_ranks(b.started_by_hook) for b in buckets)
            if ranks > 0 and nonfinite == "raise":
                in_place = any(b.views is not None for b in buckets)
                raise FloatingPointError(
                    f"grads: NaN or infinite values on {ranks} of {self._world_size} ranks in "
                    f"this step; every rank raises, "
                    + (
                        "its gradients (in place) already holding the sum"
                        if in_place
                        else "with its gradients unchanged"
                    )
                )
        self._settle_residuals()  # before the unpack, which may scale the buffer
        written: list[torch.Tensor] = []
        if ranks > 0:  # skip, read on the host
            for bucket in buckets:
                _zero(bucket.present_gradients())
            self.skipped = lambda: True
        else:
            for bucket in buckets:
                if self._allow_unused:
                    counts, contributors, flagged = bucket.read_counts()
                    skip = nonfinite == "skip" and flagged > 0
                    written += bucket.unpack(normalize, skip, agreement, counts, contributors)
                else:
                    written += bucket.unpack(normalize, skip_on_device, agreement)
            if nonfinite == "skip":
                plan = buckets[0].plan
                self.skipped = (
                    (lambda: plan.nonfinite_ranks() > 0) if skip_on_device else (lambda: False)
                )
        increment_version(written)
        self.steps += 1

    # -- when the ranks do not agree ---------------------------------------------

    def _disagree(
        self, call: Description, normalize: bool, nonfinite: str, grads: Any, arg: str
    ) -> None:
        """Every rank exchanges its description and takes the same decision:
        raise, or bind the changed trainable set together and complete the step."""
        in_place = any(b.views is not None for b in self.buckets)
        state = (
            "its gradients (in place) holding the sums" if in_place else "its gradients unchanged"
        )
        decision = self._exchange(call, arg, state)
        if decision.error is not None:
            raise decision.error
        assert self.source is not None
        source = self.source
        # Every rank found the same change: the old set's sums are whole (every
        # rank packed it), the new parameters are averaged in a step of their
        # own, then the buckets are made for the new set.
        try:
            if decision.added:
                added = source.items_named(grads, list(decision.added))
                top_up = GradientReducer(
                    self._collectives,
                    self._rank,
                    self._world_size,
                    self._comm_dtype,
                    self._allow_unused,
                )
                top_up.bind(added, f"{arg} (now trainable)")
                top_up.step(added, normalize, nonfinite, f"{arg} (now trainable)")
            self._finish(normalize, nonfinite, None, host_reads=True)
        finally:
            self._reset_buckets()
            self._install(source.rebound())

    def _exchange(self, mine: Description, arg: str, state: str) -> _agreement.Decision:
        """Every rank's description (one gather), and the decision from them."""
        gathered = self._collectives.gather_objects(mine.as_data())
        return _agreement.decide([Description.from_data(d) for d in gathered], arg, state)

    # -- the device's decision, read later (CUDA) -------------------------------

    def _defer(self, decision: Plan, code: int, call: Description) -> None:
        """Copies the decision's count slots off the device for the next call
        (into host memory and an event made once: nothing allocated per step;
        ``settle`` has read the last copy before the next one is made)."""
        counts = decision._counts
        if self._deferred_host is None or self._deferred_host.shape != counts.shape:
            on_cuda = counts.is_cuda
            self._deferred_host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=on_cuda)
            self._deferred_event = torch.cuda.Event() if on_cuda else None
        host, event = self._deferred_host, self._deferred_event
        host.copy_(counts, non_blocking=event is not None)
        if event is not None:
            event.record()
        self._deferred = _Deferred(host, event, code, call)

    def settle(self, in_backward: bool = False) -> None:
        """Reads the codes of a step the device decided alone (see
        ``_tensors.agreement``): when the ranks did not agree, every rank raises now
        (that step's gradients were zeros on every rank)."""
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return
        if deferred.event is not None:
            deferred.event.synchronize()
        plan = self.buckets[-1].plan
        if deferred.per_code:
            counts = [int(v) for v in deferred.counts.tolist()]
        else:
            per_code = deferred.counts.double().view(plan.codes, plan.slots_per_code).sum(1)
            counts = [round(v) for v in per_code.tolist()]
        if _agreement.verdict(counts) == deferred.code:
            return
        state = "that step's gradients zeros on every rank (decided on the device)"
        decision = self._exchange(deferred.description, "grads (previous step)", state)
        if decision.error is not None:
            raise decision.error
        # Every rank found the same change: bound together now (in a backward,
        # by the call that follows it: hooks must not change under it); the
        # step in which they found it was zeros on every rank.
        if in_backward:
            self._rebind_due = True
        else:
            assert self.source is not None
            self._install(self.source.rebound())

    # -- synchronize_parameters -----------------------------------------------

    def wait_for_all_ranks(self, problems: list[Problem], call: str) -> None:
        """Joins the other ranks' steps with uncounted zeros until every rank
        is here. A rank whose own input is bad (``problems``) writes PROBLEM
        instead, so that every rank raises with it."""
        self.settle()
        mine = Description(call, waiting=True, problems=problems)
        buckets = self.buckets
        while True:
            for bucket in buckets:
                bucket.plan.buffer.zero_()
            if problems:
                plan = buckets[-1].plan
                plan.buffer[plan.layout.count_offset + plan.count_slot(self._rank, PROBLEM)] = 1
            for bucket in buckets:
                self._all_reduce(bucket, contributes=False)
            verdict = _agreement.verdict(buckets[-1].plan.code_counts())
            if verdict == -1:
                return
            if verdict is None:
                decision = self._exchange(mine, call, "nothing changed")
                if decision.error is not None:
                    raise decision.error
                # The others bound a changed set: this rank waits, so it cannot be.
                raise AssertionError("decide() refuses a change while a rank waits")
