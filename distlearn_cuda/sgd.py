"""AllReduceSGD: a mini-batch split across ranks, gradients averaged by allreduce."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import increment_version

from ._algorithms.carry import CarriedState, check_carry_args, pick_source
from ._algorithms.member import GroupMember
from ._algorithms.reducer import GradientReducer, Modes, split_into_buckets
from ._comm.low_bit import LowBitFormat, LowBitSettings, check_compression
from ._native import addresses_of
from ._tensors import tree as _tree
from ._tensors.agreement import Problem
from ._tensors.plan import PlanCache, lossless_dtype
from ._tensors.validate import (
    DEFAULT_TIMEOUT,
    NonFinite,
    Signature,
    check_comm_dtype,
    check_nonfinite,
    check_same_signature,
    check_timeout,
    signature,
    state_value,
    structure_entries,
)

__all__ = ["AllReduceSGD"]


class AllReduceSGD(GroupMember):
    """Synchronous data-parallel SGD over a process group (torch-distlearn's AllReduceSGD).

    Each rank computes gradients on its part of the mini-batch, then
    ``sum_and_normalize_gradients`` averages them over the ranks that
    contributed to this step. Ranks may take different numbers of steps
    between synchronizations: ``synchronize_parameters`` lets early ranks
    keep joining the others' allreduces (contributing nothing) until all
    have arrived, then gives every rank the parameters of the rank that took
    the most steps.

    Every call is collective: all ranks of the group must make the same
    calls in the same order (the same method, the same ``nonfinite``) with
    tensors of the same dtypes, shapes and memory layouts. What each rank
    does travels with its data, so a rank whose call or input differs makes
    every rank raise the same error in that call (see "What every rank
    agrees on" in docs/semantics.md), never a silent wrong sum.

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
            ValueError on every rank.
        compression: None, or the low-bit format gradients travel in
            (``"int8"``, ``"fp8_e4m3"``, ``"int4"``, ``"mxfp4"``; see
            ``DiLoCo``); the counts (``allow_unused``'s included) stay
            exact. A NaN or an infinity makes its whole quantization block
            NaN (``nonfinite="propagate"`` stays non-finite). CPU gradients,
            in every mode (``attach``'s buckets each go in low bits, in
            flight as exact ones do).
        error_feedback: add what each step's quantization lost to this
            rank's next gradients (default: on for the 4-bit formats); kept
            across ``attach`` and ``detach``, and in ``state_dict``.

    Constructing one is collective too: it sets up a private gloo group
    (with ``timeout``) over the ranks of ``group``, and the ranks check that
    they made the same object with the same settings.

    Examples:
        >>> import torch, distlearn_cuda as dl
        >>> model = torch.nn.Linear(4, 2)
        >>> sgd = dl.AllReduceSGD()  # a world of one without torchrun
        >>> sgd.synchronize_parameters(model)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> sgd.sum_and_normalize_gradients(model)
        >>> sgd.steps
        1
        >>> sgd.close()
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        comm_dtype: torch.dtype | None = None,
        timeout: float | datetime.timedelta = DEFAULT_TIMEOUT,
        allow_unused: bool = False,
        compression: LowBitFormat | None = None,
        error_feedback: bool | None = None,
    ) -> None:
        if not isinstance(allow_unused, bool):
            raise TypeError(f"allow_unused must be a bool, got {type(allow_unused).__name__}")
        self._allow_unused = allow_unused
        self._comm_dtype = check_comm_dtype(comm_dtype)
        self._compression, self._error_feedback = check_compression(
            compression, error_feedback, self._comm_dtype
        )
        super().__init__(group, check_timeout(timeout))
        self._plans = PlanCache(self._group.world_size)
        self._reducer = GradientReducer(
            self._collectives,
            self.rank,
            self.world_size,
            self._comm_dtype,
            allow_unused,
            LowBitSettings(self._compression, self._error_feedback),
        )
        self._param_signature: Signature | None = None

    def _settings(self) -> list[tuple[str, object]]:
        return [
            *super()._settings(),
            ("comm_dtype", self._comm_dtype),
            ("allow_unused", self._allow_unused),
            ("compression", self._compression),
            ("error_feedback", self._error_feedback),
        ]

    @property
    def steps(self) -> int:
        """Gradient steps this rank took since the last ``synchronize_parameters``."""
        return self._reducer.steps

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the gradient steps taken since the last
        ``synchronize_parameters`` (they decide whose parameters win it);
        with error feedback, this rank's residual too."""
        state: dict[str, Any] = {"steps": self._reducer.steps}
        if self._error_feedback:
            state["residual"] = self._reducer.residual()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``'s output (checked before anything changes)."""
        steps = state_value(state, "steps", int)
        residual = state.get("residual")
        if residual is not None and (
            not isinstance(residual, torch.Tensor) or not self._error_feedback
        ):
            raise ValueError(
                "state['residual'] must be None or a tensor, and only an object with error "
                "feedback (compression) takes one"
            )
        self._reducer.load_residual(residual)
        self._reducer.steps = steps

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last ``sum_*`` call, made with ``nonfinite="skip"``,
        zeroed the gradients (the same answer on every rank). Reads the
        device; valid until the next call of this object."""
        skipped = self._reducer.skipped
        return skipped is not None and skipped()

    def sum_gradients(self, grads: Any, nonfinite: NonFinite = "propagate") -> None:
        """Replaces every gradient by its sum over the ranks, in place.

        Args:
            grads: gradients as a tensor or a list/tuple/dict nesting of
                tensors; or, PyTorch's way (``clip_grad_norm_``, optimizers),
                parameters, any iterable of them (``model.parameters()``)
                or an ``nn.Module``, standing for their ``.grad`` (a tensor
                that requires grad, or any ``nn.Parameter``, is never
                averaged as a gradient itself; a frozen parameter stands for
                nothing). A layer frozen or unfrozen since the first call is
                noticed: when every rank changed alike, the ranks bind the
                new set together and the new parameters are averaged from
                this step on; otherwise every rank raises ValueError.
            nonfinite: what happens when some rank's gradients hold a NaN or
                an infinity (checked in the pack, after the cast to
                ``comm_dtype``; the flag travels in the same allreduce, so
                every rank decides alike): ``"propagate"`` (default: sum
                them, as DDP does; AMP's GradScaler then skips the step),
                ``"skip"`` (every rank's gradients become zeros; see
                ``last_step_skipped``) or ``"raise"`` (every rank raises
                ``FloatingPointError`` with its gradients unchanged; reads
                the device once per call).

        Raises:
            ValueError, TypeError: on every rank, when any rank's call or
                input differs or is bad (a missing ``.grad`` without
                ``allow_unused``, another structure), naming the rank; the
                gradients are unchanged (in place, they hold the sums).
        """
        self._step(grads, normalize=False, nonfinite=nonfinite)

    def sum_and_normalize_gradients(self, grads: Any, nonfinite: NonFinite = "propagate") -> None:
        """Replaces every gradient by its mean over the ranks that contributed
        to this step (not the world size: ranks that ran out of data and wait
        in ``synchronize_parameters`` do not count), in place.

        The contributor count travels in the same allreduce as the gradients
        and is read where the data is: one collective, no extra round trip.
        ``nonfinite`` and errors: as for ``sum_gradients``.
        """
        self._step(grads, normalize=True, nonfinite=nonfinite)

    def _step(self, grads: Any, normalize: bool, nonfinite: str) -> None:
        self._collectives.check_usable("sum_gradients")
        mode = check_nonfinite(nonfinite)
        if not self._reducer.bound:
            self._reducer.bind(grads, "grads")
        self._reducer.step(grads, normalize, mode)

    def synchronize_parameters(
        self,
        params: Any,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        buffers: bool = False,
        state: Any = (),
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
                ``nn.Module`` (all its parameters). Which of them are
                trainable is compared across ranks too: a module whose
                layers were frozen or unfrozen alike on every rank is bound
                anew here.
            optimizer: also give every rank that rank's optimizer state
                (moments, step counts, hyperparameters), bitwise; a rank
                whose optimizer has no state yet receives it whole. Without
                it, ranks that took different steps keep different moments
                and drift apart after the next step.
            buffers: also give every rank that rank's module buffers (any
                dtype, e.g. BatchNorm's running statistics); needs an
                ``nn.Module`` as ``params``.
            state: an object with ``state_dict()`` and ``load_state_dict()``
                (an LR scheduler, a ``GradScaler``, a counter of your own),
                or a list of them: each gets that rank's state, so that
                schedules stay in step after uneven epochs. Their state
                dicts travel as tensors and plain data (no pickle).

        Raises:
            ValueError, TypeError: on every rank, when a rank's arguments are
                bad or the ranks' structures differ, naming the rank and the
                tensor; nothing changes.
        """
        self._collectives.check_usable("synchronize_parameters")
        problems: list[Problem] = []
        try:
            states = check_carry_args(params, optimizer, buffers, state)
            params = _tree.materialize(params)
            flat = _tree.flatten(params, "params")
            param_signature = signature(flat, "params")
            if self._param_signature is not None:
                # A layout may change (a model converted on every rank): the
                # ranks compare layouts below.
                check_same_signature(
                    _without_layouts(self._param_signature),
                    _without_layouts(param_signature),
                    "params",
                )
        except (TypeError, ValueError) as error:
            problems.append(Problem(type(error).__name__, str(error)))
        if not self._reducer.bound:
            self._reducer.bind(params, "params")  # the first call: with everyone's check
        self._reducer.wait_for_all_ranks(problems, "synchronize_parameters")
        carried = CarriedState(params if buffers else None, optimizer, param_signature[0], states)
        # Every rank is here: compare the parameters (which of them train
        # too) across ranks before any of them is overwritten.
        self._collectives.check_same_structure(
            [
                f"{entry} requires_grad={tensor.requires_grad}"
                for entry, tensor in zip(
                    structure_entries(param_signature), flat.tensors, strict=True
                )
            ]
            + carried.structure_entries(),
            flat.names + carried.names(),
            "synchronize_parameters: params",
        )
        self._param_signature = param_signature
        self._reducer.rebind_if_changed(params)
        plan = self._plans.get(
            "synchronize", param_signature, lossless_dtype([e[0] for e in param_signature[1]])
        )
        addresses = addresses_of(flat.tensors)
        # Every rank packs: the pack's flag says whether its params are finite.
        plan.pack(flat.tensors, addresses, count_slot=-1)
        finite = plan.nonfinite_ranks() == 0 and carried.finite()
        winner = pick_source(self._collectives, self._reducer.steps, finite, "params")
        self._collectives.broadcast(plan.buffer, src=winner)
        if self.rank != winner:
            plan.unpack(flat.tensors, addresses, normalize=False)
            increment_version(flat.tensors)
        carried.broadcast(self._collectives, winner, self.rank)
        self._reducer.steps = 0

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
        (module)`` (or ``sum_gradients``) then starts the last bucket (which
        carries the call's agreement) and what else is left, waits and
        normalizes. Same results as without ``attach``, up to the order of
        the floating-point sums; the uneven-steps semantics hold unchanged.
        One backward per step, or accumulate with ``no_sync()``. Gradients
        of any dense memory layout (channels_last included) are taken.
        Collective: every rank attaches the same module structure with the
        same bucket sizes (checked).

        ``gradient_as_bucket_view=True`` (DDP's option of that name) makes
        the gradients views of their buckets' buffers, with their
        parameters' strides, so backward accumulates straight into what the
        allreduce sends: a bucket's pack is its count slot and its unpack an
        in-place scale. Keep them there with
        ``optimizer.zero_grad(set_to_none=False)`` (a gradient made anew is
        copied in: correct, not zero-copy). Needs ``comm_dtype`` None or the
        dtype of every trainable parameter. Such buckets started during
        backward carry no non-finite flag (the call's ``nonfinite`` mode is
        not known yet): with "skip" or "raise" their sums are checked
        instead, the same decision on every rank.

        With ``compression`` each bucket is a low-bit sum of its own (its
        own blocks: the sums are not bitwise those of the one bucket
        without ``attach``): its all-to-all starts with the bucket, its
        all-gather when the next bucket starts or at the call, and the
        error feedback's residual is kept from before ``attach`` and after
        ``detach``.
        """
        problem = None
        try:
            if not isinstance(gradient_as_bucket_view, bool):
                kind = type(gradient_as_bucket_view).__name__
                raise TypeError(f"gradient_as_bucket_view must be a bool, got {kind}")
            if not isinstance(module, nn.Module):
                raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
            for name, value in (("bucket_mb", bucket_mb), ("first_bucket_mb", first_bucket_mb)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise ValueError(f"{name} must be a number of megabytes > 0, got {value!r}")
        except (TypeError, ValueError) as error:
            problem = error
        if problem is None and self._reducer.modes != Modes():
            raise RuntimeError(
                "attach: already attached to a module, or on flat storage; detach() first"
            )
        self._collectives.check_usable("attach")
        self._bind_module(module, "module", problem)
        source = self._reducer.source
        assert source is not None
        options = (float(first_bucket_mb), float(bucket_mb), gradient_as_bucket_view)
        order = list(reversed(range(len(source.trainable))))
        groups = split_into_buckets([source.trainable[i] for i in order], *options[:2])
        self._collectives.check_same_structure(
            [f"views={gradient_as_bucket_view}"]
            + [f"bucket {b}: " + " ".join(str(order[i]) for i in g) for b, g in enumerate(groups)],
            ["gradient_as_bucket_view"] + [f"bucket {b}" for b in range(len(groups))],
            "attach (buckets)",
            noun="bucket",
        )
        self._reducer.set_modes(Modes(attach=options))

    def _bind_module(self, module: Any, arg: str, problem: Exception | None) -> None:
        """Binds ``module`` (or checks it is the bound one) on every rank
        together: a rank with ``problem`` makes every rank raise."""
        entries = [f"cannot attach: {problem}"] if problem is not None else []
        if not self._reducer.bound and problem is None:
            self._reducer.bind(module, arg)
            return
        source = self._reducer.source
        if problem is None and source is not None and not source.is_for(module):
            entries = [
                f"{arg}: not the module this object was bound to by its first call "
                f"(make a new object for another module)"
            ]
        self._collectives.check_same_structure(entries, [arg] * len(entries), arg, noun="check")
        if entries:
            raise (problem if problem is not None else ValueError(entries[0]))

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
        previous = self._reducer.paused
        self._reducer.paused = True
        try:
            yield
        finally:
            self._reducer.paused = previous

    def use_flat_storage(self, module: nn.Module) -> None:
        """Makes ``module``'s trainable parameters and gradients views into two
        contiguous buffers, the gradients' being the one the allreduce runs
        on: ``sum_*(module)`` then copies nothing (it writes the count slot,
        allreduces in place and scales in place). Each view keeps its
        parameter's memory layout (channels_last stays channels_last).

        Needs one dtype and device for all trainable parameters, and
        ``comm_dtype`` None or that dtype. Keep the gradients in place with
        ``optimizer.zero_grad(set_to_none=False)``; a gradient made anew is
        copied back into its view (correct, not zero-copy for that step).
        Optimizers keep working, made before or after (the parameters stay
        the same objects). ``synchronize_parameters`` never touches the
        gradients. Not with ``attach``. With ``compression``, the low-bit sum
        quantizes the gradients where they are and writes the mean there.
        Collective.
        """
        problem: Exception | None = None
        if not isinstance(module, nn.Module):
            problem = TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        elif self._reducer.modes != Modes():
            raise RuntimeError("use_flat_storage: already attached or flattened")
        else:
            dtypes = {p.dtype for p in module.parameters() if p.requires_grad}
            if len(dtypes) != 1 or (self._comm_dtype not in (None, *dtypes)):
                problem = ValueError(
                    "module: use_flat_storage needs one dtype for all trainable parameters and "
                    f"comm_dtype None or that dtype; got {sorted(map(str, dtypes))} and "
                    f"comm_dtype {self._comm_dtype}"
                )
        self._collectives.check_usable("use_flat_storage")
        self._bind_module(module, "module", problem)
        self._reducer.set_modes(Modes(flat=True))

    def detach(self) -> None:
        """Undoes ``attach``: gradients are allreduced by the ``sum_*`` calls
        again. Local; refuses while a step is half done."""
        if self._reducer.modes.attach is None:
            return
        if self._reducer.in_step():
            raise RuntimeError(
                "detach: a backward ran since the last sum_and_normalize_gradients; "
                "finish the step first"
            )
        self._reducer.set_modes(Modes())

    def _position_step(self) -> int:
        return self._reducer.steps

    def _release(self) -> None:
        self._reducer.close()


def _without_layouts(sig: Signature) -> Signature:
    device, entries = sig
    return device, tuple((dtype, shape, ()) for dtype, shape, _ in entries)
