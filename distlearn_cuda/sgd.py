"""AllReduceSGD: a mini-batch split across ranks, gradients averaged by allreduce."""

from __future__ import annotations

import contextlib
import datetime
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import increment_version

from . import _C, _group, _tree
from ._carry import CarriedState, check_carry_args, pick_source
from ._flat_storage import FlatStorage, GradientViews
from ._module_grads import ModuleGradients
from ._overlap import Bucket, OverlappedGradients, split_into_buckets
from ._plan import Plan, PlanCache, count_slots_for, lossless_dtype
from ._tree import Flat
from ._unused import Presence
from ._validate import (
    DEFAULT_TIMEOUT,
    EXACT_INTEGER_LIMIT,
    Signature,
    check_comm_dtype,
    check_nonfinite,
    check_same_signature,
    check_timeout,
    signature,
    state_value,
    structure_entries,
    tensor_metadata,
    unchanged_since,
)

__all__ = ["AllReduceSGD"]

_DATA_PTR = torch.Tensor.data_ptr


def _nothing() -> None:
    return None


def _stands_for_parameters(grads: Any) -> bool:
    """Whether ``grads`` names parameters for their ``.grad`` (a module, or
    tensors that require grad), the forms in which a gradient can be missing."""
    if isinstance(grads, nn.Module):
        return True
    if isinstance(grads, torch.Tensor):
        return grads.requires_grad
    if isinstance(grads, (list, tuple)):
        return bool(grads) and all(isinstance(t, torch.Tensor) and t.requires_grad for t in grads)
    return False


def _parameter_names(trainable: Flat) -> list[str]:
    """A module's parameter names ("1.bias") from ``_tree.trainable(module, "grads")``."""
    return [name.removeprefix("grads.") for name in trainable.names]


class AllReduceSGD(_group.GroupMember):
    """Synchronous data-parallel SGD over a process group (torch-distlearn's AllReduceSGD).

    Each rank computes gradients on its part of the mini-batch, then
    ``sum_and_normalize_gradients`` averages them over the ranks that
    contributed to this step. Ranks may take different numbers of steps
    between synchronizations: ``synchronize_parameters`` lets early ranks
    keep joining the others' allreduces (contributing nothing) until all
    have arrived, then gives every rank the parameters of the rank that took
    the most steps.

    Every call is collective: all ranks of the group must make the calls in
    the same order with tensors of the same dtypes and shapes.

    Args:
        group: a ``torch.distributed`` process group, or None for the default
            group (initialized from torchrun's environment, or as a world of
            one, when not yet initialized).
        comm_dtype: dtype in which gradients travel (for example
            ``torch.bfloat16`` to halve the bytes); default: the gradients'
            own dtype (their promotion when they differ). Parameters always
            travel losslessly.
        timeout: deadline of every collective, in seconds or as a
            ``datetime.timedelta`` (default 5 minutes). A collective that a
            dead or stalled peer keeps from completing raises
            ``distlearn_cuda.CommunicationError`` on the other ranks within
            it. It bounds each wait, including a finished rank's wait for a
            peer's next step in ``synchronize_parameters``.

        allow_unused: a trainable parameter whose ``.grad`` is None on some
            ranks (a branch, expert or head they did not use) is averaged
            over the ranks that produced it: in ``sum_*(module)`` (or
            parameters), each parameter some rank produced a gradient for
            holds the sum over the producing ranks (normalized: divided by
            their number) on every rank, created where it was None; one no
            rank produced keeps ``.grad`` None everywhere. The per-tensor
            counts travel in the same allreduce; reading them costs one
            small device read per call. Without it, a missing ``.grad`` is a
            ValueError.

    Constructing one is collective too: it sets up a private gloo group
    (with ``timeout``) over the ranks of ``group``.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        comm_dtype: torch.dtype | None = None,
        timeout: float | datetime.timedelta = DEFAULT_TIMEOUT,
        allow_unused: bool = False,
    ) -> None:
        if not isinstance(allow_unused, bool):
            raise TypeError(f"allow_unused must be a bool, got {type(allow_unused).__name__}")
        self._allow_unused = allow_unused
        self._comm_dtype = check_comm_dtype(comm_dtype)
        super().__init__(group, check_timeout(timeout))
        self._plans = PlanCache(self._group.world_size)
        self._grad_signature: Signature | None = None
        self._grad_plan: Plan | None = None  # for the bound gradient signature
        # Metadata of the last gradients that passed the full check (hot path).
        self._grad_metadata: tuple | None = None
        self._param_signature: Signature | None = None
        self._steps = 0
        # Whether the last call, made with "skip", zeroed the gradients (reads
        # the device when asked); None when it ran with another mode.
        self._skipped: Callable[[], bool] | None = None
        self._overlap: OverlappedGradients | None = None
        self._flat: FlatStorage | None = None
        # The last module given as grads, its trainable parameters bound (hot path).
        self._module_grads: ModuleGradients | None = None
        # allow_unused: the presence segment of the gradient plan, and what it was made for.
        self._presence: Presence | None = None
        self._presence_source: Callable[[], object] = _nothing
        self._count_slot = 0  # this rank's count slot in the gradient plan

    @property
    def steps(self) -> int:
        """Gradient steps this rank took since the last ``synchronize_parameters``."""
        return self._steps

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the gradient steps taken since the last
        ``synchronize_parameters`` (they decide whose parameters win it)."""
        return {"steps": self._steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``'s output (checked before anything changes)."""
        self._steps = state_value(state, "steps", int)

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last ``sum_*`` call, made with ``nonfinite="skip"``,
        zeroed the gradients (the same answer on every rank). Reads the
        device; valid until the next call of this object."""
        return self._skipped is not None and self._skipped()

    def sum_gradients(self, grads: Any, nonfinite: str = "propagate") -> None:
        """Replaces every gradient by its sum over the ranks, in place.

        Args:
            grads: gradients as a tensor or a list/tuple/dict nesting of
                tensors; or, PyTorch's way (``clip_grad_norm_``, optimizers),
                parameters, any iterable of them (``model.parameters()``)
                or an ``nn.Module``, standing for their ``.grad`` (a tensor
                that requires grad is never averaged as a gradient itself).
            nonfinite: what happens when some rank's gradients hold a NaN or
                an infinity (checked in the pack, after the cast to
                ``comm_dtype``; the flag travels in the same allreduce, so
                every rank decides alike): ``"propagate"`` (default: sum
                them, as DDP does; AMP's GradScaler then skips the step),
                ``"skip"`` (every rank's gradients become zeros; see
                ``last_step_skipped``) or ``"raise"`` (every rank raises
                ``FloatingPointError`` with its gradients unchanged; reads
                the device once per call).
        """
        self._allreduce_gradients(grads, normalize=False, nonfinite=nonfinite)

    def sum_and_normalize_gradients(self, grads: Any, nonfinite: str = "propagate") -> None:
        """Replaces every gradient by its mean over the ranks that contributed
        to this step (not the world size: ranks that ran out of data and wait
        in ``synchronize_parameters`` do not count), in place.

        The contributor count travels in the same allreduce as the gradients
        and is read where the data is: one collective, no extra round trip.
        ``nonfinite``: as for ``sum_gradients``.
        """
        self._allreduce_gradients(grads, normalize=True, nonfinite=nonfinite)

    def synchronize_parameters(
        self,
        params: Any,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        buffers: bool = False,
    ) -> None:
        """Makes every rank hold the same parameters, in place.

        Waits, joining the other ranks' gradient allreduces with uncounted
        zeros, until every rank has called this; then every rank receives the
        parameters of the rank that took the most gradient steps since the
        last synchronization (ties: the lowest rank; with no steps at all,
        rank 0). Resets the step count.

        Never spreads a NaN: a rank whose parameters (or carried state) are
        not all finite is passed over for the next best; when no rank's are,
        every rank raises ``FloatingPointError`` and nothing changes.

        Args:
            params: a tensor, a list/tuple/dict nesting of tensors, any
                iterable of tensors (``model.parameters()``), or an
                ``nn.Module`` (all its parameters).
            optimizer: also give every rank that rank's optimizer state
                (moments, step counts, hyperparameters), bitwise; a rank
                whose optimizer has no state yet receives it whole. Without
                it, ranks that took different steps keep different moments
                and drift apart after the next step.
            buffers: also give every rank that rank's module buffers (any
                dtype, e.g. BatchNorm's running statistics); needs an
                ``nn.Module`` as ``params``.
        """
        self._collectives.check_usable("synchronize_parameters")
        check_carry_args(params, optimizer, buffers)
        params = _tree.materialize(params)
        flat = _tree.flatten(params, "params")
        param_signature = signature(flat, "params", with_strides=False)
        if self._param_signature is not None:
            check_same_signature(self._param_signature, param_signature, "params")
        # Gradients have their parameters' shapes: a rank that has not seen
        # any yet sizes its zero contributions from the params.
        trainable = _tree.trainable(params, "params")
        grad_signature = signature(trainable, "params", with_strides=False)
        if self._grad_signature is not None:
            check_same_signature(self._grad_signature, grad_signature, "params (as gradients)")
        else:
            self._bind_gradients(grad_signature, trainable.names, "params (as gradients)")
        carried = CarriedState(params if buffers else None, optimizer, param_signature[0])

        if self._overlap is not None:
            self._wait_for_all_ranks(self._overlap.plans)
        else:
            self._wait_for_all_ranks([self._gradient_plan(grad_signature)])
        # Every rank is here: compare the parameters across ranks before any
        # of them is overwritten.
        self._collectives.check_same_structure(
            structure_entries(param_signature) + carried.structure_entries(),
            flat.names + carried.names(),
            "params",
        )
        self._param_signature = param_signature
        plan = self._plans.get(param_signature, lossless_dtype([e[0] for e in param_signature[1]]))
        addresses = [t.data_ptr() for t in flat.tensors]
        # Every rank packs: the pack's flag says whether its params are finite.
        plan.pack(flat.tensors, addresses, count_slot=-1)
        finite = plan.nonfinite_ranks() == 0 and carried.finite()
        winner = pick_source(self._collectives, self._steps, finite, "params")
        self._collectives.broadcast(plan.buffer, src=winner)
        if self.rank != winner:
            plan.unpack(flat.tensors, addresses, normalize=False)
            increment_version(flat.tensors)
        carried.broadcast(self._collectives, winner, self.rank)
        self._steps = 0

    def attach(
        self,
        module: nn.Module,
        bucket_mb: float = 25.0,
        first_bucket_mb: float = 1.0,
        *,
        gradient_as_bucket_view: bool = False,
    ) -> None:
        """Overlaps the gradient allreduce with backward for ``module``.

        Registers hooks that start the allreduce of each bucket of gradients
        as soon as backward has produced all of them (a ``first_bucket_mb``
        bucket first, so communication starts early, then ``bucket_mb``
        ones, in reverse parameter order); ``sum_and_normalize_gradients
        (module)`` (or ``sum_gradients``) then starts what is left, waits and
        normalizes. Same results as without ``attach``, up to the order of
        the floating-point sums; the uneven-steps semantics hold unchanged.
        One backward per step, or accumulate with ``no_sync()``.
        Collective: every rank attaches the same module structure.

        ``gradient_as_bucket_view=True`` (DDP's option of that name) makes
        the gradients views of their buckets' buffers, so backward
        accumulates straight into what the allreduce sends: a bucket's pack
        is its count slot and its unpack an in-place scale. Keep them there
        with ``optimizer.zero_grad(set_to_none=False)`` (a gradient made anew
        is copied in: correct, not zero-copy). Needs ``comm_dtype`` None or
        the dtype of every trainable parameter. Such buckets carry no
        non-finite flag (they start before the call's ``nonfinite`` mode is
        known): with "skip" or "raise" the summed gradients are checked
        instead, the same decision on every rank.
        """
        if not isinstance(gradient_as_bucket_view, bool):
            kind = type(gradient_as_bucket_view).__name__
            raise TypeError(f"gradient_as_bucket_view must be a bool, got {kind}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        for name, value in (("bucket_mb", bucket_mb), ("first_bucket_mb", first_bucket_mb)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number of megabytes > 0, got {value!r}")
        if self._overlap is not None:
            raise RuntimeError("attach: already attached to a module; detach() first")
        self._collectives.check_usable("attach")
        trainable, grad_signature = self._trainable_gradients(module, "module")
        # Reverse registration order: roughly the order backward produces gradients.
        order = list(reversed(range(len(trainable.tensors))))
        params = [trainable.tensors[i] for i in order]
        groups = split_into_buckets(params, float(first_bucket_mb), float(bucket_mb))
        self._collectives.check_same_structure(
            [f"bucket {b}: " + " ".join(str(order[i]) for i in g) for b, g in enumerate(groups)],
            [f"bucket {b}" for b in range(len(groups))],
            "attach (buckets)",
        )
        dtype = self._comm_dtype or lossless_dtype([e[0] for e in grad_signature[1]])
        buckets = []
        for group in groups:
            members = [params[i] for i in group]
            names = [trainable.names[order[i]] for i in group]
            bucket_signature = (
                grad_signature[0],
                tuple(grad_signature[1][order[i]] for i in group),
            )
            # Its own plan, never the cache's: buckets of equal shapes are in
            # flight at once and must not share a buffer.
            plan = Plan(
                self._with_presence(bucket_signature, dtype),
                dtype,
                count_slots_for(self.world_size, dtype),
            )
            if gradient_as_bucket_view and any(p.dtype != dtype for p in members):
                raise ValueError(
                    f"module: gradient_as_bucket_view needs the buffers' dtype ({dtype}) for every "
                    f"trainable parameter; got {sorted({str(p.dtype) for p in members})}"
                )
            views = GradientViews(members, plan) if gradient_as_bucket_view else None
            presence = (
                Presence(plan, members, names) if self._allow_unused and views is None else None
            )
            buckets.append(
                Bucket(
                    members,
                    names,
                    plan,
                    presence=presence,
                    views=views,
                )
            )
        self._overlap = OverlappedGradients(
            module, buckets, self._collectives, lambda plan: self.rank % plan.count_slots
        )

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient accumulation: backward passes inside the block only
        accumulate gradients locally; with ``attach``, their hooks start no
        allreduce. The first backward after the block starts the buckets as
        usual, on the accumulated gradients, and ``sum_*`` finishes the step::

            for micro_batch in batches[:-1]:
                with sgd.no_sync():
                    loss_fn(model(micro_batch)).backward()
            loss_fn(model(batches[-1])).backward()
            sgd.sum_and_normalize_gradients(model)

        Without ``attach`` nothing is started by backward anyway: the block
        only documents the intent. Local: no collective.
        """
        overlap = self._overlap
        previous = overlap.paused if overlap is not None else False
        if overlap is not None:
            overlap.paused = True
        try:
            yield
        finally:
            if overlap is not None:
                overlap.paused = previous

    def use_flat_storage(self, module: nn.Module) -> None:
        """Makes ``module``'s trainable parameters and gradients views into two
        contiguous buffers, the gradients' being the one the allreduce runs
        on: ``sum_*(module)`` then copies nothing (it writes the count slot,
        allreduces in place and scales in place).

        Needs one dtype and device for all trainable parameters, and
        ``comm_dtype`` None or that dtype. Keep the gradients in place with
        ``optimizer.zero_grad(set_to_none=False)``; a gradient made anew is
        copied back into its view (correct, not zero-copy for that step).
        Optimizers keep working, made before or after (the parameters stay
        the same objects). ``synchronize_parameters`` reuses the buffer, so
        it leaves the gradients zeroed or overwritten. Not with ``attach``.
        Collective.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if self._overlap is not None or self._flat is not None:
            raise RuntimeError("use_flat_storage: already attached or flattened")
        self._collectives.check_usable("use_flat_storage")
        trainable = _tree.trainable(module, "module")
        grad_signature = signature(trainable, "module", with_strides=False)
        dtypes = {entry[0] for entry in grad_signature[1]}
        if len(dtypes) != 1 or (self._comm_dtype not in (None, *dtypes)):
            raise ValueError(
                "module: use_flat_storage needs one dtype for all trainable parameters and "
                f"comm_dtype None or that dtype; got {sorted(map(str, dtypes))} and "
                f"comm_dtype {self._comm_dtype}"
            )
        if self._grad_signature is None:
            self._bind_gradients(grad_signature, trainable.names, "module")
        else:
            check_same_signature(self._grad_signature, grad_signature, "module")
        params = list(trainable.tensors)
        self._flat = FlatStorage(module, params, self._gradient_plan(grad_signature))

    def _position_step(self) -> int:
        return self._steps

    def _release(self) -> None:
        if self._overlap is not None:
            self._overlap.close()
            self._overlap = None

    def detach(self) -> None:
        """Undoes ``attach``: gradients are allreduced by the ``sum_*`` calls again."""
        if self._overlap is not None:
            self._overlap.detach()
            self._overlap = None

    def _allreduce_gradients(self, grads: Any, normalize: bool, nonfinite: str) -> None:
        self._collectives.check_usable("sum_gradients")
        mode = check_nonfinite(nonfinite)
        self._skipped = None
        if self._overlap is not None and grads is self._overlap.module:
            self._finish_overlapped(normalize, mode)
            return
        if self._flat is not None and grads is self._flat.module:
            self._allreduce_flat(normalize, mode)
            return
        if self._allow_unused:
            grads = _tree.materialize(grads)
            if _stands_for_parameters(grads):
                self._allreduce_unused(grads, normalize, mode)
                return
        bound = self._module_grads
        if bound is not None and bound.is_for(grads):
            tensors, addresses = bound.gather()
        else:
            tensors = self._checked_gradients(grads)
            addresses = list(map(_DATA_PTR, tensors))
        assert self._grad_plan is not None
        plan = self._grad_plan
        plan.pack(tensors, addresses, count_slot=self._count_slot)
        self._collectives.all_reduce_sum(plan.buffer)
        if mode == "raise" and (ranks := plan.nonfinite_ranks()) > 0:
            raise self._nonfinite_error(ranks, "with its gradients unchanged")
        plan.unpack(tensors, addresses, normalize=normalize, skip_nonfinite=mode == "skip")
        if mode == "skip":
            self._skipped = lambda: plan.nonfinite_ranks() > 0
        increment_version(tensors)
        self._steps += 1

    def _checked_gradients(self, grads: Any) -> list[torch.Tensor]:
        """The gradients in ``grads``, checked against the bound structure
        (bound by this call when it is the first); a module's trainable
        parameters are bound for the next calls with it."""
        flat = _tree.flatten_grads(grads, "grads")
        if not unchanged_since(flat, self._grad_metadata):
            grad_signature = signature(flat, "grads", with_strides=False)
            if self._grad_signature is None:
                self._bind_gradients(grad_signature, flat.names, "grads")
            else:
                check_same_signature(self._grad_signature, grad_signature, "grads")
            self._grad_metadata = tuple(map(tensor_metadata, flat.tensors))
        assert self._grad_signature is not None
        plan = self._gradient_plan(self._grad_signature)
        self._count_slot = self.rank % plan.count_slots
        if isinstance(grads, nn.Module):
            trainable = _tree.trainable(grads, "grads")
            self._module_grads = ModuleGradients(
                weakref.ref(grads),
                list(trainable.tensors),
                _parameter_names(trainable),
                list(flat.tensors),
                [],
                _C.Addresses(),
            )
        return flat.tensors

    def _allreduce_flat(self, normalize: bool, mode: str) -> None:
        """A step on flat storage: no pack, no unpack."""
        assert self._flat is not None
        flat = self._flat
        flat.gather_gradients()
        flat.write_slots(self.rank % flat.plan.count_slots, check_nonfinite=mode != "propagate")
        self._collectives.all_reduce_sum(flat.plan.buffer)
        if mode == "raise" and (ranks := flat.plan.nonfinite_ranks()) > 0:
            raise self._nonfinite_error(
                ranks, "its gradients already holding the sum (flat storage)"
            )
        flat.finish(normalize, skip_nonfinite=mode == "skip")
        if mode == "skip":
            plan = flat.plan
            self._skipped = lambda: plan.nonfinite_ranks() > 0
        increment_version(flat.grad_views)
        self._steps += 1

    def _nonfinite_error(self, ranks: int, state: str) -> FloatingPointError:
        return FloatingPointError(
            f"grads: NaN or infinite values on {ranks} of {self.world_size} ranks in this "
            f"step; every rank raises, {state}"
        )

    def _finish_overlapped(self, normalize: bool, mode: str) -> None:
        """The end of an attached step. The non-finite flags are per bucket,
        so "skip" and "raise" read them on the host to decide for all buckets."""
        assert self._overlap is not None
        overlap = self._overlap
        ranks = overlap.finish(normalize=normalize, check=mode != "propagate")
        if mode != "propagate":
            if ranks > 0 and mode == "raise":
                if any(b.views is not None for b in overlap.buckets):
                    raise self._nonfinite_error(
                        ranks, "its gradients (bucket views) holding the sums"
                    )
                raise self._nonfinite_error(ranks, "with its gradients unchanged")
            if ranks > 0:
                grads = [p.grad for b in overlap.buckets for p in b.params if p.grad is not None]
                torch._foreach_zero_(grads)
            self._skipped = lambda: ranks > 0
        self._steps += 1

    def _trainable_gradients(self, structure: Any, arg: str) -> tuple[Flat, Signature]:
        """The trainable tensors of ``structure`` (what its gradients look like)
        and their signature, checked against the bound one (binding it first)."""
        trainable = _tree.trainable(structure, arg)
        grad_signature = signature(trainable, arg, with_strides=False)
        if self._grad_signature is None:
            self._bind_gradients(grad_signature, trainable.names, arg)
        else:
            check_same_signature(self._grad_signature, grad_signature, arg)
        return trainable, grad_signature

    def _bind_gradients(self, grad_signature: Signature, names: list[str], arg: str) -> None:
        """Binds the gradient structure once all ranks agree on it.

        Each rank binds exactly once, in its first call of any kind, so the
        ranks' structure checks pair up even when some take no step.
        """
        self._collectives.check_same_structure(structure_entries(grad_signature), names, arg)
        self._grad_signature = grad_signature

    def _gradient_plan(self, grad_signature: Signature) -> Plan:
        """The plan of the bound gradient signature (callers checked they match)."""
        if self._grad_plan is None:
            dtype = self._comm_dtype or lossless_dtype([e[0] for e in grad_signature[1]])
            self._grad_plan = self._plans.get(self._with_presence(grad_signature, dtype), dtype)
        return self._grad_plan

    def _with_presence(self, grad_signature: Signature, dtype: torch.dtype) -> Signature:
        """With allow_unused, a gradient plan carries a presence segment (see _unused)."""
        if not self._allow_unused:
            return grad_signature
        if self.world_size > EXACT_INTEGER_LIMIT[dtype]:
            raise ValueError(
                f"allow_unused counts the ranks per tensor in the {dtype} buffer, exact up to "
                f"{EXACT_INTEGER_LIMIT[dtype]} ranks; this group has {self.world_size}"
            )
        device, entries = grad_signature
        return device, (*entries, (dtype, (len(entries),)))

    def _allreduce_unused(self, grads: Any, normalize: bool, mode: str) -> None:
        """A step with allow_unused: missing gradients travel as zeros with
        a 0 in the presence segment; the host reads the per-tensor counts."""
        presence = self._bind_unused(grads)
        plan = self._grad_plan
        assert plan is not None
        current, tensors = presence.gather()
        plan.pack(tensors, list(map(_DATA_PTR, tensors)), count_slot=self._count_slot)
        self._collectives.all_reduce_sum(plan.buffer)
        counts, contributors, flagged = presence.read()
        if mode == "raise" and flagged > 0:
            raise self._nonfinite_error(flagged, "with its gradients unchanged")
        skip = mode == "skip" and flagged > 0
        written = presence.unpack(current, counts, contributors, normalize, skip_nonfinite=skip)
        if mode == "skip":
            self._skipped = lambda: skip
        increment_version(written)
        self._steps += 1

    def _bind_unused(self, grads: Any) -> Presence:
        """The presence segment for the parameters ``grads`` stands for, bound
        (with the gradient structure) by the first call, as by an optimizer."""
        if self._presence is not None and self._presence_source() is grads:
            return self._presence
        trainable, grad_signature = self._trainable_gradients(grads, "grads")
        plan = self._gradient_plan(grad_signature)
        self._count_slot = self.rank % plan.count_slots
        self._presence = Presence(plan, trainable.tensors, _parameter_names(trainable))
        if isinstance(grads, nn.Module):
            self._presence_source = weakref.ref(grads)
        else:
            self._presence_source = _nothing
        return self._presence

    def _wait_for_all_ranks(self, plans: list[Plan]) -> None:
        # A stepping rank's allreduces (one per bucket when attached, in
        # bucket order) carry its count 1; ours carry zeros and count 0.
        # When a round sums to count 0, every rank is here.
        while True:
            for plan in plans:
                plan.buffer.zero_()
                self._collectives.all_reduce_sum(plan.buffer)
            if plans[0].contributor_count() == 0:
                return
