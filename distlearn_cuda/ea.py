"""AllReduceEA: elastic averaging SGD (Zhang, Choromanska, LeCun, arXiv 1412.6651)."""

from __future__ import annotations

import contextlib
import datetime
import operator
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import increment_version

from . import _C
from ._algorithms.carry import CarriedState, check_carry_args, pick_source
from ._algorithms.member import GroupMember
from ._comm.collectives import PendingSum, is_capturing
from ._comm.group import resolve
from ._comm.low_bit import ErrorFeedback, LowBitFormat, LowBitSum, check_compression
from ._native import addresses_of
from ._tensors import tree as _tree
from ._tensors.agreement import EA_CODES, EA_PROBLEM, EA_ROUND, Description, Problem, decide
from ._tensors.plan import Addresses, Plan, PlanCache, lossless_dtype
from ._tensors.tree import Flat
from ._tensors.validate import (
    DEFAULT_TIMEOUT,
    NonFinite,
    Signature,
    check_comm_dtype,
    check_ea_rate,
    check_no_overlap,
    check_nonfinite,
    check_same_signature,
    check_state_tensors,
    check_tau,
    check_timeout,
    signature,
    state_tensors,
    state_value,
    structure_entries,
)
from .errors import CommunicationError

__all__ = ["AllReduceEA"]


def _nothing() -> None:
    return None


class AllReduceEA(GroupMember):
    """Elastic averaging over a process group (torch-distlearn's AllReduceEA).

    Each rank trains its own copy x of the parameters; all ranks hold the
    same center c. On every ``tau``-th call of ``average_parameters``, each
    rank computes ``delta = alpha * (x - c)``, moves ``x -= delta``, and
    ``c += allreduce_sum(delta)``: one fused pass and one allreduce.

    Ranks may take different numbers of steps: ``synchronize_center`` and
    ``synchronize_parameters`` let early ranks keep joining the others'
    averaging rounds (with their parameters no longer trained) until all
    have arrived. Every allreduced delta is added to the center, the last
    round's included, so with no local steps in between,
    ``sum over ranks of x + c`` does not change.

    Every call is collective: all ranks of the group must make the calls in
    the same order with tensors of the same dtypes, shapes and strides.

    Args:
        group: a ``torch.distributed`` process group, or None for the default
            group (initialized on demand, see ``AllReduceSGD``).
        tau: communication period: average on every tau-th call (int >= 1).
        alpha: moving rate of the elastic force (torch-distlearn's alpha),
            below 2 / (p + 1) for p ranks: above, the rounds cannot converge
            (ValueError saying why; see "EA stability" in docs/semantics.md).
        beta: the elastic-averaging paper's way to set it: alpha = beta / p,
            stable at any p for beta < 2p / (p + 1). Give alpha or beta; with
            neither, beta = 0.9 (the paper's).
        comm_dtype: dtype in which deltas travel; default: the parameters'
            own dtype (their promotion when they differ).
        nonfinite: what a round does when some rank's delta holds a NaN or
            an infinity (checked in the blend; the flag travels in the same
            allreduce, so every rank decides alike): ``"propagate"``
            (default: the center takes the sum), ``"skip"`` (the center
            keeps its value on every rank; a rank whose params are not
            finite rejoins from the center, the others keep their own
            elastic step; see ``last_round_skipped`` and
            ``last_round_rejoined``; reads this rank's flag once per round)
            or ``"raise"`` (every rank raises ``FloatingPointError`` before
            the center changes; reads the device once per round).
        asynchronous: start each round's allreduce and return without
            waiting for it (default True); the sum is added to the center
            when it is next needed: at the start of the next round (the
            center is read only there), or by ``center``, ``state_dict``,
            ``synchronize_*``. The communication then overlaps the tau local
            steps in between, and every result is bitwise the same as with
            False. A failed allreduce surfaces at that later point. With
            ``nonfinite="raise"`` rounds are synchronous: the host must see
            the flag before the round completes.
        compression: None, or the low-bit format deltas travel in
            (``"int8"``, ``"fp8_e4m3"``, ``"int4"``, ``"mxfp4"``; see
            ``DiLoCo``): the center then moves by the low-bit sum of the
            deltas while each x moves by its own exact delta. CPU params
            only, for now. Asynchronous rounds overlap their all-to-all
            with the steps in between; the all-gather of the shards each
            rank summed runs when the round completes.
        error_feedback: add what each round's quantization lost to this
            rank's next delta (default: on for the 4-bit formats).
        timeout: deadline of every collective (seconds or a
            ``datetime.timedelta``, default 5 minutes); see ``AllReduceSGD``.
            A rank that finished its epoch waits for the others' next
            round, tau local steps away: keep timeout above that.

    Constructing one is collective too: it sets up a private gloo group
    (with ``timeout``) over the ranks of ``group``.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        tau: int = 10,
        alpha: float | None = None,
        *,
        beta: float | None = None,
        comm_dtype: torch.dtype | None = None,
        nonfinite: NonFinite = "propagate",
        asynchronous: bool = True,
        compression: LowBitFormat | None = None,
        error_feedback: bool | None = None,
        timeout: float | datetime.timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        if not isinstance(asynchronous, bool):
            raise TypeError(f"asynchronous must be a bool, got {type(asynchronous).__name__}")
        self._nonfinite = check_nonfinite(nonfinite)
        self._tau = check_tau(tau)
        self._comm_dtype = check_comm_dtype(comm_dtype)
        self._compression, self._error_feedback = check_compression(
            compression, error_feedback, self._comm_dtype
        )
        # "raise" reads the flag before the round completes.
        self._asynchronous = asynchronous and self._nonfinite != "raise"
        timeout = check_timeout(timeout)
        self._alpha = check_ea_rate(alpha, beta, resolve(group).world_size)
        super().__init__(group, timeout)
        self._plans = PlanCache(self._group.world_size)
        self._signature: Signature | None = None
        self._delta_plan_cache: Plan | None = None  # for the bound signature
        self._centers: list[torch.Tensor] = []
        self._loaded_center: list[torch.Tensor] | None = None  # from load_state_dict, unbound
        self._center_addresses = _C.Addresses()
        self._rebuild: _tree.Rebuild = list
        self._checked_addresses: list[int] = []
        self._address_vector = _C.Addresses()  # the same, as the ops take them
        # The last params that passed the checks (hot path; see _bind).
        self._last_flat: Flat | None = None
        self._last_params: Callable[[], object] = _nothing
        self._step = 0
        self._skip_plan: Plan | None = None  # the last round's, when it ran with "skip"
        self._rejoined = False
        # The allreduce of a round in flight, on the delta plan's buffer: the
        # buffer is not touched, and the center not read, until it is waited for.
        self._pending: PendingSum | None = None
        # A completed round held a rank's problem: the next round raises it.
        self._agreement_due = False
        self._rounds_completed = 0  # rounds whose sum reached the center
        # With compression: the low-bit sum's scratch and this rank's
        # error-feedback residual (made with the delta plan; a loaded one
        # waits for it).
        self._low_bit: LowBitSum | None = None
        self._feedback = ErrorFeedback("params") if self._error_feedback else None

    @property
    def last_round_skipped(self) -> bool:
        """Whether the last averaging round left the center unchanged because
        some rank's delta was not finite (``nonfinite="skip"``; the same
        answer on every rank). Reads the device; valid until the next round."""
        self._complete_for_reading()
        plan = self._skip_plan
        return plan is not None and plan.nonfinite_ranks() > 0

    @property
    def last_round_rejoined(self) -> bool:
        """Whether, in the last averaging round (``nonfinite="skip"``), this
        rank's params were not finite and were set to the center. Its
        optimizer state is the caller's to reset (e.g. ``opt.state.clear()``):
        moments that hold a NaN make the params non-finite again."""
        return self._rejoined

    def wait(self) -> None:
        """Completes the averaging round in flight, if any: its sum joins the
        center. Rounds complete on their own when next needed; call this
        before capturing a CUDA graph (a capture cannot wait on work from
        outside it) or to bound when a failed round's error surfaces."""
        self._finish_pending_round()

    @property
    def tau(self) -> int:
        """The communication period: a round runs on every tau-th call."""
        return self._tau

    # What the elastic layer reads to make a round a transaction (see
    # elastic._trainer, NOTE [Transactions]).

    @property
    def next_call_is_round(self) -> bool:
        """Whether the next ``average_parameters`` call runs a round."""
        return (self._step + 1) % self._tau == 0

    @property
    def state_step(self) -> int:
        """The step counter (``state_dict()["step"]``), without completing a round."""
        return self._step

    @property
    def round_in_flight(self) -> bool:
        """Whether an asynchronous round's allreduce has not been waited for."""
        return self._pending is not None

    @property
    def rounds_completed(self) -> int:
        """Rounds whose sum reached the center, since this object was made."""
        return self._rounds_completed

    @property
    def alpha(self) -> float:
        """The moving rate: each round moves a rank by alpha * (x - center)."""
        return self._alpha

    @property
    def beta(self) -> float:
        """world_size * alpha: each round moves the center by beta * (mean x - center)."""
        return self._alpha * self.world_size

    def _settings(self) -> list[tuple[str, object]]:
        return [
            *super()._settings(),
            ("tau", self._tau),
            ("alpha", repr(self._alpha)),
            ("comm_dtype", self._comm_dtype),
            ("nonfinite", self._nonfinite),
            ("asynchronous", self._asynchronous),
            ("compression", self._compression),
            ("error_feedback", self._error_feedback),
        ]

    @property
    def center(self) -> Any:
        """The center tensors, in the structure of the params last passed (a
        dict by parameter name for an ``nn.Module``); None before the first call.
        Completes a round still in flight first."""
        if not self._centers:
            return None
        self._complete_for_reading()
        return self._rebuild(self._centers)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the step counter (where the next round
        falls) and copies of the center tensors, in the order of the params'
        tensors (None before the first call). Completes a round still in
        flight first, so no sum is pending in a checkpoint. After a
        ``CommunicationError`` it does not raise: it returns the state of the
        last round that completed, never one that absorbed a failed round."""
        self._complete_for_reading()
        center = [c.detach().clone() for c in self._centers] if self._centers else None
        state: dict[str, Any] = {"step": self._step, "center": center}
        if self._feedback is not None:  # this rank's own, like its params
            state["residual"] = self._feedback.saved()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``'s output. Before the first call the center
        is kept and taken up by it; after, it must match the bound params.
        Everything is checked before anything changes."""
        self._finish_pending_round()
        step = state_value(state, "step", int)
        center = state_tensors(state, "center")
        residual = state.get("residual")
        if residual is not None:
            if not isinstance(residual, torch.Tensor) or self._feedback is None:
                raise ValueError(
                    "state['residual'] must be None or a tensor, and only an object with "
                    "error feedback (compression) takes one"
                )
            self._feedback.check(residual)
        if center is not None:
            if self._centers:
                check_state_tensors(center, self._centers, "center")
                with torch.no_grad():
                    torch._foreach_copy_(self._centers, list(center))
            else:
                self._loaded_center = [t.detach().clone() for t in center]
        if residual is not None:
            assert self._feedback is not None  # checked above
            self._feedback.load(residual)
        self._step = step

    def average_parameters(self, params: Any) -> None:
        """Counts a step; on every tau-th step runs an elastic averaging round.

        Call it after each optimizer step. Updates ``params`` in place.
        Between rounds a call only counts, so it costs next to nothing;
        ``params`` is checked against the bound structure on the calls that
        use it (the first, and every round), before anything is modified.

        Args:
            params: a tensor, a list/tuple/dict nesting of tensors, any
                iterable of tensors (``model.parameters()``), or an
                ``nn.Module`` (all its parameters).
        """
        self._collectives.check_usable("average_parameters")
        if self._signature is not None and (self._step + 1) % self._tau != 0:
            self._step += 1
            return
        try:
            flat, addresses = self._bind(params)
        except (TypeError, ValueError) as error:
            if self._signature is None:
                raise  # the first call: every rank raised in the structure check
            # A round this rank cannot take (its params changed): it still
            # takes part, so that every rank raises with it (see _agreement).
            self._step += 1
            if self._step % self._tau == 0:
                self._problem_round(error, "average_parameters")
            raise
        self._step += 1
        if self._step % self._tau == 0:
            self._round(flat, addresses, active=True, asynchronous=self._asynchronous)

    def synchronize_center(self, params: Any) -> None:
        """Waits for all ranks (joining their averaging rounds), then gives
        every rank rank 0's center. Call at the end of an epoch.

        Never spreads a NaN: when rank 0's center is not all finite, the
        lowest rank whose center is gives it; when none is, every rank
        raises ``FloatingPointError`` after the last averaging round, and
        nothing is broadcast."""
        self._collectives.check_usable("synchronize_center")
        flat, addresses = self._bind_or_join(params, None, "synchronize_center")
        self._wait_for_all_ranks(flat, addresses)
        self._check_ranks_agree(
            flat, CarriedState(None, None, flat.tensors[0].device), "synchronize_center"
        )
        self._broadcast_from_first_finite(self._centers, self._center_addresses, "center")

    def synchronize_parameters(
        self,
        params: Any,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        buffers: bool = False,
        state: Any = (),
    ) -> None:
        """Waits for all ranks (joining their averaging rounds), then gives
        every rank rank 0's parameters and resets the center to them.

        Never spreads a NaN: when rank 0's parameters (or carried state) are
        not all finite, the lowest rank whose are gives them; when no rank's
        are, every rank raises ``FloatingPointError`` after the last
        averaging round, and nothing is broadcast.

        Args:
            params: as for ``average_parameters``.
            optimizer: also give every rank that rank's optimizer state,
                bitwise (see ``AllReduceSGD.synchronize_parameters``).
            buffers: also give every rank that rank's module buffers (any
                dtype); needs an ``nn.Module`` as ``params``.
            state: objects with ``state_dict()`` and ``load_state_dict()``
                (see ``AllReduceSGD.synchronize_parameters``).
        """
        self._collectives.check_usable("synchronize_parameters")
        try:
            states = check_carry_args(params, optimizer, buffers, state)
        except (TypeError, ValueError) as error:
            self._bind_or_join(params, error, "synchronize_parameters")
            raise AssertionError("unreachable: _bind_or_join raised") from error
        params = _tree.materialize(params)
        flat, addresses = self._bind_or_join(params, None, "synchronize_parameters")
        carried = CarriedState(
            params if buffers else None, optimizer, flat.tensors[0].device, states
        )
        self._wait_for_all_ranks(flat, addresses)
        self._check_ranks_agree(flat, carried, "synchronize_parameters")
        self._broadcast_from_first_finite(flat.tensors, addresses, "params", carried)
        increment_version(flat.tensors)
        with torch.no_grad():
            torch._foreach_copy_(self._centers, flat.tensors)

    def _position_step(self) -> int:
        return self._step

    def _release(self) -> None:
        # The round in flight completes (every rank is in it already), so the
        # center stays what state_dict() reports; a failure was recorded.
        self._complete_for_reading()

    def _bind_ahead(self, params: Any) -> None:
        self._bind(params)

    def _bind(self, params: Any) -> tuple[Flat, Addresses]:
        """Validates params against the bound structure (binding it, and
        making the center, on the first call); returns them and their addresses.

        Hot path: a module bound by the last call is not walked again (its
        parameters are bound, as an optimizer binds them: one added or
        replaced later is not seen), and tensors that are the same objects
        at the same addresses as in the last call were checked then (their
        dtype, shape and strides change only with their storage)."""
        last = self._last_flat
        if last is not None and params is self._last_params():
            flat = last
        else:
            flat = _tree.flatten(_tree.materialize(params), "params")
        addresses = addresses_of(flat.tensors)
        if (
            last is not None
            and addresses == self._checked_addresses
            and all(map(operator.is_, flat.tensors, last.tensors))
        ):
            self._rebuild = flat.rebuild
            return flat, self._address_vector
        flat = self._check_and_bind(flat, addresses)
        self._last_flat = flat
        self._last_params = weakref.ref(params) if isinstance(params, nn.Module) else _nothing
        self._address_vector = _C.Addresses(addresses)
        return flat, self._address_vector

    def _bind_or_join(
        self, params: Any, problem: Exception | None, call: str
    ) -> tuple[Flat, Addresses]:
        """``_bind`` for a synchronization; a rank whose input is bad (a
        ``problem``, or one ``_bind`` finds) joins the waiting rounds with it
        instead of raising alone, so that every rank raises the same error."""
        if problem is None:
            try:
                return self._bind(params)
            except (TypeError, ValueError) as error:
                if self._signature is None:
                    raise  # the first call: every rank raised in the structure check
                problem = error
        if self._signature is None:
            # Not bound: the structure check every rank's first call makes.
            self._collectives.check_same_structure(
                [f"cannot take part: {problem}"], [call], "params", noun="check"
            )
            raise problem
        self._problem_round(problem, call, waiting=True)
        raise AssertionError("unreachable: _problem_round raises")

    def _problem_round(self, problem: Exception, call: str, waiting: bool = False) -> None:
        """A round this rank takes part in with a problem of its own (its
        params changed, its arguments are bad): it contributes nothing (a
        delta of zeros, with the problem's code), the others' round
        completes as usual, then every rank raises the same error."""
        self._finish_pending_round()
        plan = self._delta_plan()
        plan.buffer.zero_()
        plan.buffer[plan.layout.count_offset + plan.count_slot(self.rank, EA_PROBLEM)] = 1
        self._sum(plan, active=False)
        mine = Description(call, waiting=waiting, problems=[_problem(problem)])
        self._finish_round(plan, mine)
        raise AssertionError("unreachable: the round's codes hold this rank's problem")

    def _check_and_bind(self, flat: Flat, addresses: list[int]) -> Flat:
        if self._signature is None:
            try:
                params_signature = signature(flat, "params")
                check_no_overlap(flat, "params")
                if self._loaded_center is not None:
                    check_state_tensors(self._loaded_center, flat.tensors, "center")
                if self._compression is not None and params_signature[0].type != "cpu":
                    raise ValueError(
                        f"params: compression={self._compression!r} runs on CPU tensors only "
                        f"for now; these are on {params_signature[0]}"
                    )
                entries, names, problem = structure_entries(params_signature), flat.names, None
            except (TypeError, ValueError) as error:
                entries, names, problem = [f"cannot be bound: {error}"], ["params"], error
            # Each rank binds once, in its first call of any kind, so the
            # ranks' checks pair up even when some take no step; a rank that
            # cannot bind makes every rank raise there.
            self._collectives.check_same_structure(entries, names, "params")
            if problem is not None:
                raise problem
            self._signature = params_signature
            self._centers = [t.detach().clone() for t in flat.tensors]
            if self._loaded_center is not None:
                with torch.no_grad():
                    torch._foreach_copy_(self._centers, self._loaded_center)
                self._loaded_center = None
            self._center_addresses = _C.Addresses(addresses_of(self._centers))
        else:
            check_same_signature(self._signature, signature(flat, "params"), "params")
            if addresses != self._checked_addresses:
                check_no_overlap(flat, "params")
        self._checked_addresses = addresses
        self._rebuild = flat.rebuild
        return flat

    def _check_ranks_agree(self, flat: Flat, carried: CarriedState, call: str) -> None:
        """Every rank is past its last round: compare structures (and that
        every rank makes the same call) before anything is overwritten."""
        entries = [f"call {call}"]
        entries += structure_entries(self._bound_signature()) + carried.structure_entries()
        names = ["the call", *flat.names, *carried.names()]
        self._collectives.check_same_structure(entries, names, f"{call}: params")

    def _delta_plan(self) -> Plan:
        if self._delta_plan_cache is None:
            # The low-bit sum quantizes float32 values.
            dtype = torch.float32 if self._compression else self._comm_dtype
            dtype = dtype or self._lossless_dtype()
            plan = self._plans.get("delta", self._bound_signature(), dtype, EA_CODES)
            if self._compression is not None:
                payload = plan.layout.count_offset
                self._low_bit = LowBitSum.over(
                    self._compression, plan.layout, payload, self.world_size, self.rank
                )
                if self._feedback is not None:
                    self._feedback.make(payload)
            self._delta_plan_cache = plan
        return self._delta_plan_cache

    def _sum(self, plan: Plan, active: bool) -> None:
        """The round's allreduce, waited for: low-bit (a contributor's
        residual goes in) or exact (on the current stream, so a captured
        round forks no stream)."""
        if self._low_bit is None:
            self._collectives.all_reduce_sum(plan.buffer, verify=True)
        else:
            self._start_sum(plan, active).wait()

    def _start_sum(self, plan: Plan, active: bool) -> PendingSum:
        """Starts the round's allreduce: low-bit (a contributor's residual
        goes in) or exact."""
        if self._low_bit is not None:
            residual = self._feedback.residual if self._feedback is not None else None
            return self._collectives.all_reduce_low_bit_async(
                plan.buffer, self._low_bit, residual, active
            )
        return self._collectives.all_reduce_sum_async(plan.buffer, verify=True)

    def _lossless_dtype(self) -> torch.dtype:
        return lossless_dtype([entry[0] for entry in self._bound_signature()[1]])

    def _bound_signature(self) -> Signature:
        assert self._signature is not None, "bound by the first call"
        return self._signature

    def _round(
        self, flat: Flat, addresses: Addresses, active: bool, asynchronous: bool = False
    ) -> Plan:
        plan = self._delta_plan()
        if is_capturing(plan.buffer.device):
            # A CUDA graph must not wait on work outside it, nor fork a stream
            # it does not join: a round in flight from before the capture is
            # refused, and a captured round completes within the capture.
            if self._pending is not None:
                raise RuntimeError(
                    "average_parameters: an averaging round started before this CUDA graph "
                    "capture is still in flight; call ea.wait() before capturing"
                )
            asynchronous = False
        # The blend reads the center: a round still in flight completes first,
        # its center update folded into this blend's pass when nothing else
        # (its codes, the non-finite guard) must look at its sum first.
        catch_up = self._nonfinite == "propagate" and self._wait_for_pending_round()
        if catch_up and plan.code_counts()[EA_PROBLEM] > 0:
            self._finish_round(plan)  # raises, as on the rank with the problem
        if not catch_up:
            self._finish_pending_round()
        slot = plan.count_slot(self.rank, EA_ROUND) if active else -1
        plan.ea_blend(
            flat.tensors,
            addresses,
            self._centers,
            self._center_addresses,
            self._alpha,
            slot,
            catch_up=catch_up,
        )
        if self._nonfinite == "skip":
            # Before the allreduce the flag is this rank's own: its params are
            # not finite. They rejoin from the center, which this round leaves
            # as it is (the flag travels on and every rank skips the update).
            self._rejoined = plan.nonfinite_ranks() > 0
            if self._rejoined:
                with torch.no_grad():  # the params are leaves that require grad
                    torch._foreach_copy_(flat.tensors, self._centers)
        increment_version(flat.tensors)
        if asynchronous:
            self._pending = self._start_sum(plan, active)
        else:
            # The center update below cannot be undone: know the sum arrived.
            self._sum(plan, active)
            self._finish_round(plan)
        return plan

    def _wait_for_pending_round(self) -> bool:
        """Waits for a round in flight; True if there was one (its sum is then
        in the delta plan's buffer, not yet in the center)."""
        if self._pending is None:
            return False
        pending, self._pending = self._pending, None
        pending.wait()
        return True

    def _complete_for_reading(self) -> None:
        """Completes a round in flight for a reader of the state; a failed
        round leaves the center as it was (the failure is recorded, and every
        later collective call raises it). A round that a rank took part in
        with a problem completes too; the error is raised by the next call
        that communicates (``_agreement_due``)."""
        with contextlib.suppress(CommunicationError):
            if self._wait_for_pending_round():
                self._finish_round(self._delta_plan(), for_reading=True)

    def _finish_pending_round(self) -> None:
        if self._agreement_due:
            self._agreement_due = False
            self._raise_agreed(Description("average_parameters"))
        if self._wait_for_pending_round():
            self._finish_round(self._delta_plan())

    def _finish_round(
        self, plan: Plan, mine: Description | None = None, for_reading: bool = False
    ) -> None:
        """center += the allreduced deltas, under the non-finite guard; then,
        when a rank took part with a problem of its own (``mine`` on that
        rank), every rank raises the same error (the others' deltas are in
        the center: a consistent state, that rank's delta zero)."""
        if plan.code_counts()[EA_PROBLEM] > 0:
            plan.center_update(self._centers, self._center_addresses)
            self._rounds_completed += 1
            if for_reading:
                self._agreement_due = True
                return
            self._raise_agreed(mine if mine is not None else Description("average_parameters"))
        if self._nonfinite == "raise" and (ranks := plan.nonfinite_ranks()) > 0:
            raise FloatingPointError(
                f"params: NaN or infinite deltas on {ranks} of {self.world_size} ranks in this "
                f"averaging round; every rank raises before the center changes"
            )
        skip = self._nonfinite == "skip"
        plan.center_update(self._centers, self._center_addresses, skip_nonfinite=skip)
        self._rounds_completed += 1
        self._skip_plan = plan if skip else None

    def _raise_agreed(self, mine: Description) -> None:
        """Every rank's description (one gather), and the error from them."""
        gathered = self._collectives.gather_objects(mine.as_data())
        decision = decide(
            [Description.from_data(d) for d in gathered],
            "params",
            "the round completed among the other ranks",
        )
        assert decision.error is not None
        raise decision.error

    def _wait_for_all_ranks(self, flat: Flat, addresses: Addresses) -> None:
        # Rounds of ranks still stepping carry count 1; ours carry count 0.
        # The first round that sums to count 0 has every rank here; its
        # deltas are real and go into the center like any other round's.
        while self._round(flat, addresses, active=False).contributor_count() != 0:
            pass
        self._step = 0

    def _broadcast_from_first_finite(
        self,
        tensors: list[torch.Tensor],
        addresses: Addresses,
        arg: str,
        carried: CarriedState | None = None,
    ) -> None:
        """Copies ``tensors`` (and ``carried``) from the lowest rank whose are
        all finite to every rank."""
        assert self._signature is not None
        plan = self._plans.get("synchronize", self._signature, self._lossless_dtype())
        # Every rank packs: the pack's flag says whether its tensors are finite.
        plan.pack(tensors, addresses, count_slot=-1)
        finite = plan.nonfinite_ranks() == 0 and (carried is None or carried.finite())
        src = pick_source(self._collectives, 0, finite, arg)
        self._collectives.broadcast(plan.buffer, src=src)
        if self.rank != src:
            plan.unpack(tensors, addresses, normalize=False)
        if carried is not None:
            carried.broadcast(self._collectives, src, self.rank)


def _problem(error: Exception) -> Problem:
    return Problem(type(error).__name__, str(error))
