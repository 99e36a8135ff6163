"""DiLoCo and Streaming DiLoCo: elastic averaging's descendants.

DiLoCo (Douillard et al., arXiv 2311.08105): every rank takes ``tau`` inner
steps of its own optimizer from the global parameters; the mean over the
ranks of the outer gradient ``global - local`` is applied to the global
parameters by an outer optimizer (Nesterov momentum SGD), and every rank
starts again from them. Streaming DiLoCo (arXiv 2501.18512) splits the
parameters into fragments synchronized on staggered steps, overlaps each
fragment's exchange with ``delay`` more inner steps, and merges the new
global fragment into the local one with a mixing factor.

One exchange of a fragment is two fused passes and one allreduce: the
outer gradient is written into the flat buffer (with this rank's count slot
and the non-finite flag), the buffer is summed, and one pass reads the sum,
the count, the global parameters, the outer momentum and the local
parameters and writes the new momentum, global and local parameters
(``kernels/fused_ops.h``, ``OuterStepOp``).
"""

from __future__ import annotations

import copy
import datetime
import inspect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch.autograd.graph import increment_version

from . import _C
from ._algorithms.carry import CarriedState, check_carry_args, pick_source
from ._algorithms.member import GroupMember
from ._comm.collectives import PendingSum, is_capturing
from ._comm.low_bit import LowBitFormat, LowBitSum, check_compression
from ._native import addresses_of
from ._tensors import tree as _tree
from ._tensors.plan import OuterStep, Plan, PlanCache, lossless_dtype
from ._tensors.tree import Flat
from ._tensors.validate import (
    DEFAULT_TIMEOUT,
    NonFinite,
    Signature,
    check_comm_dtype,
    check_int,
    check_no_overlap,
    check_nonfinite,
    check_real,
    check_same_signature,
    check_state_tensors,
    check_tau,
    check_timeout,
    entry,
    signature,
    state_tensors,
    state_value,
    structure_entries,
)
from .errors import CommunicationError
from .reference import memory_view

__all__ = ["DiLoCo"]

# The count-slot codes of an exchange (see "Call codes" in _tensors.agreement):
# a rank contributes its outer gradient, or takes part with a problem of its
# own (its params no longer match the bound ones) and contributes zeros.
_OUTER_STEP = 0
_OUTER_PROBLEM = 1
_OUTER_CODES = 2


@dataclass
class _Exchange:
    """A fragment's exchange: its allreduce (None once waited for) and the
    step at whose call its outer step is taken."""

    merge_at: int
    pending: PendingSum | None


class Piece(NamedTuple):
    """Elements [begin, end) of tensor ``tensor`` of the bound params, in
    memory order: a fragment is a run of pieces."""

    tensor: int
    begin: int
    end: int


class _Fragment:
    """A run of the params' elements (pieces of consecutive tensors), with
    views of their global values and outer momenta, a buffer and a schedule."""

    def __init__(
        self,
        pieces: list[Piece],
        offset: int,
        plan: Plan,
        globals_: Sequence[torch.Tensor],
        momenta: Sequence[torch.Tensor],
    ) -> None:
        self.pieces = pieces
        self.tensors = sorted({piece.tensor for piece in pieces})
        self.offset = offset  # sends at the steps t >= 1 with t = offset (mod tau)
        self.plan = plan
        self.globals_ = _views(globals_, pieces)
        self.momenta = _views(momenta, pieces)
        self.global_addresses = _C.Addresses(addresses_of(self.globals_))
        self.momentum_addresses = _C.Addresses(addresses_of(self.momenta))
        self.local_addresses = _C.Addresses()
        self.last_send = 0  # the step of this fragment's last exchange
        # The one before: restored when an exchange fails (it never happened).
        self.previous_send = 0
        self.in_flight: _Exchange | None = None
        # Outer steps applied to this rank's local fragment, and whether the
        # last one was a skip's reset (local = global, whatever the mix): a
        # view change in elastic mode compares them with the source's.
        self.merges = 0
        self.last_reset = False
        # With compression: the low-bit sum's scratch, and the error
        # feedback's residual (None without it).
        self.low_bit: LowBitSum | None = None
        self.residual: torch.Tensor | None = None

    def drop_exchange(self) -> None:
        """Forgets the exchange in flight, as if it had never started: no
        state absorbs it, and the progress it carried goes into the next."""
        if self.in_flight is not None:
            self.in_flight = None
            self.last_send = self.previous_send

    def abandon_exchange(self) -> None:
        """Forgets the exchange every rank drops alike (nobody contributed,
        or every rank raises): a low-bit sum still in flight completes
        first, so that its scratch is free for the next one and its
        all-gather pairs up (NOTE [Low-bit sums in flight])."""
        exchange, self.in_flight = self.in_flight, None
        if exchange is not None and exchange.pending is not None:
            exchange.pending.wait()

    def bind_locals(self, addresses: Sequence[int], element_sizes: Sequence[int]) -> None:
        self.local_addresses = _C.Addresses(
            [addresses[p.tensor] + p.begin * element_sizes[p.tensor] for p in self.pieces]
        )

    def locals_of(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The pieces of ``tensors`` (the bound params) as 1-D views."""
        return _views(tensors, self.pieces)


def _views(tensors: Sequence[torch.Tensor], pieces: Sequence[Piece]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [memory_view(tensors[p.tensor].detach())[p.begin : p.end] for p in pieces]


class DiLoCo(GroupMember):
    """DiLoCo and Streaming DiLoCo over a process group.

    Each rank trains its own copy of the parameters with its own (inner)
    optimizer and calls ``average_parameters`` after every inner step. Every
    ``tau`` steps, a fragment's outer step runs: the mean over the ranks of
    ``global - local`` moves the global parameters by PyTorch's
    ``SGD(lr=outer_lr, momentum=momentum, nesterov=nesterov)``, and the local
    parameters are merged with them: ``local = mix * local + (1 - mix) *
    global`` (``mix=0``, the default, is DiLoCo's reset).

    With ``fragments=P`` the parameters' elements, tensor after tensor in
    memory order, are split into P runs of about equal bytes (a tensor may
    be split between two; cuts fall on multiples of 64 elements where the
    sizes allow; see ``fragment_pieces``);
    fragment p exchanges on the steps ``t = p * tau // P (mod tau)``, so the
    traffic of one exchange is about 1/P of the parameters. With
    ``delay=d`` a fragment's allreduce runs while d more inner steps run,
    and its outer step is taken in the call of step ``t + d``: the results
    are bitwise those of an allreduce that finished at once. Several
    fragments may be in flight; ``tau`` need not be a multiple of P.

    Ranks may take different numbers of steps: the outer gradient is the
    mean over the ranks that took inner steps since the fragment's last
    exchange (the count slots travel in the same allreduce), and a rank
    that ran out of data keeps joining the others' exchanges in
    ``synchronize_parameters`` / ``synchronize_global`` until all have
    arrived. The global parameters and the outer momenta are bitwise the
    same on every rank.

    Every call is collective: all ranks must make the calls in the same
    order with tensors of the same dtypes, shapes and strides.

    Args:
        group: a ``torch.distributed`` process group, or None for the default
            group (initialized on demand, see ``AllReduceSGD``).
        tau: inner steps per outer step (the papers' H; int >= 1).
        outer_lr: the outer optimizer's learning rate (default 0.7, the paper's).
        momentum: its momentum, in [0, 1) (default 0.9).
        nesterov: Nesterov momentum (default True; needs momentum > 0).
        fragments: how many fragments the parameters are split into (int
            >= 1, at most the number of elements).
        delay: inner steps each exchange overlaps, in [0, tau) (default 0).
        mix: the merge's share of the local parameters, in [0, 1) (default 0).
        comm_dtype: dtype in which outer gradients travel; default: the
            parameters' own dtype (their promotion when they differ).
        compression: None, or the low-bit format outer gradients travel in
            (``"int8"``, ``"fp8_e4m3"``: 8 bits; ``"int4"``, ``"mxfp4"``: 4
            bits; a float32 scale per block): an all-to-all, a float32 sum
            of each shard, an all-gather (``_comm/low_bit.py``). CPU
            params only, for now. With ``delay`` the exchange overlaps the
            inner steps as an exact one does, its all-gather starting at
            the next exchange or the outer step.
        error_feedback: keep what each quantization lost and add it to the
            next exchange of the fragment (default: on for 4-bit formats).
        nonfinite: what an outer step does when some rank's outer gradient
            holds a NaN or an infinity (the flag travels in the same
            allreduce, so every rank decides alike): ``"propagate"``
            (default), ``"skip"`` (the global parameters and the momenta
            keep their values and every rank's local fragment is reset to
            the global one; see ``last_outer_step_skipped``) or ``"raise"``
            (every rank raises ``FloatingPointError`` before anything
            changes; exchanges are then synchronous).
        timeout: deadline of every collective (seconds or a
            ``datetime.timedelta``, default 5 minutes).

    Constructing one is collective too: it sets up a private gloo group
    (with ``timeout``) over the ranks of ``group``.

    Example (``torchrun --nproc_per_node 2 train.py``; ``python train.py``
    is a world of one)::

        import torch
        import distlearn_cuda as dl

        diloco = dl.DiLoCo(tau=5)
        torch.manual_seed(diloco.rank)
        model = torch.nn.Linear(8, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        diloco.synchronize_parameters(model)  # every rank starts from rank 0's weights
        x, y = torch.randn(64, 8), torch.randn(64, 1)
        for step in range(20):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            diloco.average_parameters(model)  # every 5th call: the outer step
        diloco.synchronize_parameters(model)  # every rank: the global parameters
        diloco.close()
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        tau: int = 100,
        *,
        outer_lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
        fragments: int = 1,
        delay: int = 0,
        mix: float = 0.0,
        comm_dtype: torch.dtype | None = None,
        compression: LowBitFormat | None = None,
        error_feedback: bool | None = None,
        nonfinite: NonFinite = "propagate",
        timeout: float | datetime.timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        settings = check_settings(
            tau=tau,
            outer_lr=outer_lr,
            momentum=momentum,
            nesterov=nesterov,
            fragments=fragments,
            delay=delay,
            mix=mix,
            comm_dtype=comm_dtype,
            compression=compression,
            error_feedback=error_feedback,
            nonfinite=nonfinite,
        )
        self._tau, self._outer_lr = settings.tau, settings.outer_lr
        self._momentum, self._nesterov = settings.momentum, settings.nesterov
        self._fragment_count = settings.fragments
        self._delay, self._mix = settings.delay, settings.mix
        self._comm_dtype, self._nonfinite = settings.comm_dtype, settings.nonfinite
        self._compression, self._error_feedback = settings.compression, settings.error_feedback
        timeout = check_timeout(timeout)
        super().__init__(group, timeout)
        self._plans = PlanCache(self._group.world_size)
        self._signature: Signature | None = None
        self._fragments: list[_Fragment] = []
        self._globals: list[torch.Tensor] = []  # in the params' shapes and memory order
        self._momenta: list[torch.Tensor] = []
        self._element_sizes: list[int] = []
        self._names: list[str] = []
        self._rebuild: _tree.Rebuild = list
        self._addresses: list[int] = []
        self._loaded: dict[str, Any] | None = None  # from load_state_dict, before binding
        self._step = 0  # calls (inner steps) since the start or the last synchronization
        self._last_active = 0  # the step of this rank's last inner step
        # Whether step t (mod tau) sends or takes an outer step: the fast path.
        self._event_at = [False] * self._tau
        self._outer_steps = 0
        self._skipped = False
        # Elastic mode's copy of each local fragment before its last outer
        # step, in buffers shaped like the params (ElasticPort.keep_premerge).
        self._premerge: list[torch.Tensor] | None = None
        self._broadcast_at_bind = True  # see _bind_ahead

    # -- properties ---------------------------------------------------------

    @property
    def tau(self) -> int:
        """Inner steps per outer step of each fragment."""
        return self._tau

    @property
    def fragments(self) -> int:
        """How many fragments the parameters are split into."""
        return self._fragment_count

    @property
    def delay(self) -> int:
        """Inner steps each exchange overlaps."""
        return self._delay

    @property
    def outer_steps(self) -> int:
        """Outer steps taken (fragment by fragment) since this object was made."""
        return self._outer_steps

    @property
    def last_outer_step_skipped(self) -> bool:
        """Whether the last outer step left the global parameters unchanged
        because some rank's outer gradient was not finite (``nonfinite="skip"``;
        the same answer on every rank)."""
        return self._skipped

    @property
    def fragment_pieces(self) -> list[list[tuple[str, int, int]]] | None:
        """Each fragment's pieces: (a tensor's name, its first element, its
        end), elements counted in memory order; names as
        ``global_parameters`` keys them for a module, else as error messages
        name them. None before the first call."""
        if not self._fragments:
            return None
        names = [name.removeprefix("params.") for name in self._names]  # a module's: its keys
        return [[(names[p.tensor], p.begin, p.end) for p in f.pieces] for f in self._fragments]

    @property
    def global_parameters(self) -> Any:
        """The global parameters, in the structure of the params last passed
        (a dict by parameter name for an ``nn.Module``); None before the
        first call. Exchanges in flight are not in them yet."""
        if not self._fragments:
            return None
        return self._rebuild(self._globals)

    def _settings(self) -> list[tuple[str, object]]:
        return [
            *super()._settings(),
            ("tau", self._tau),
            ("outer_lr", repr(self._outer_lr)),
            ("momentum", repr(self._momentum)),
            ("nesterov", self._nesterov),
            ("fragments", self._fragment_count),
            ("delay", self._delay),
            ("mix", repr(self._mix)),
            ("comm_dtype", self._comm_dtype),
            ("compression", self._compression),
            ("error_feedback", self._error_feedback),
            ("nonfinite", self._nonfinite),
        ]

    def _position_step(self) -> int:
        return self._step

    # -- the loop -----------------------------------------------------------

    def average_parameters(self, params: Any) -> None:
        """Counts an inner step; on the steps a fragment exchanges, or takes
        its outer step, runs them. Call it after each inner optimizer step.
        Updates ``params`` in place on those steps.

        Between them a call only counts, so it costs next to nothing;
        ``params`` is checked against the bound structure on the calls that
        use them (the first, and every exchange), before anything changes.

        Args:
            params: a tensor, a list/tuple/dict nesting of tensors, any
                iterable of tensors (``model.parameters()``), or an
                ``nn.Module`` (all its parameters).
        """
        self._collectives.check_usable("average_parameters")
        if self._signature is not None and not self._event_at[(self._step + 1) % self._tau]:
            self._step = self._last_active = self._step + 1
            return
        try:
            flat = self._bind(params)  # the first binding takes up a loaded step count
        except (TypeError, ValueError) as error:
            if self._signature is None:
                raise  # the first call: every rank raised in the structure check
            self._step = self._last_active = self._step + 1
            self._take_part_with_problem(error)
            raise
        self._check_capture(flat, "average_parameters")
        self._step = self._last_active = self._step + 1
        self._run_step(flat, waiting=False)

    def wait(self) -> None:
        """Completes the allreduces of the exchanges in flight (their outer
        steps stay due at their steps). Call it before capturing a CUDA
        graph: a capture cannot wait on work from outside it."""
        self._collectives.check_usable("wait")
        for fragment in self._fragments:
            exchange = fragment.in_flight
            if exchange is not None and exchange.pending is not None:
                try:
                    exchange.pending.wait()
                except CommunicationError:
                    fragment.drop_exchange()
                    raise
                exchange.pending = None

    def _check_capture(self, flat: Flat, call: str) -> None:
        """Inside a CUDA graph capture, refuses (RuntimeError, before anything
        changes) what the capture cannot hold: a wait on an exchange started
        before it, a synchronization (its loop reads counts on the host),
        and ``nonfinite="raise"`` (it reads the flag on the host)."""
        if not flat.tensors or not is_capturing(flat.tensors[0].device):
            return
        if call != "average_parameters":
            raise RuntimeError(f"{call} cannot be captured in a CUDA graph: call it eagerly")
        if self._nonfinite == "raise":
            raise RuntimeError(
                "average_parameters: nonfinite='raise' reads the non-finite flag on the host "
                "and cannot be captured in a CUDA graph; use 'skip' or 'propagate'"
            )
        exchanges = [f.in_flight for f in self._fragments if f.in_flight is not None]
        if any(exchange.pending is not None for exchange in exchanges):
            raise RuntimeError(
                "average_parameters: an exchange started before this CUDA graph capture is "
                "still in flight; call diloco.wait() before capturing"
            )

    def synchronize_global(self, params: Any) -> None:
        """Waits for all ranks (joining their exchanges), then completes every
        exchange in flight: the global parameters then hold every rank's
        progress, the same on every rank. The local parameters are merged as
        the outer steps say, not replaced. The step count restarts at 0."""
        self._collectives.check_usable("synchronize_global")
        flat = self._bind_for_synchronization(params)
        self._check_capture(flat, "synchronize_global")
        self._wait_for_all_ranks(flat)

    def synchronize_parameters(
        self,
        params: Any,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        buffers: bool = False,
        state: Any = (),
    ) -> None:
        """``synchronize_global``, then every rank's params are set to the
        global parameters (before the first call: rank 0's params). Call it
        before training and at the end of an epoch.

        Never spreads a NaN: when the global parameters are not all finite,
        every rank raises ``FloatingPointError`` and the params are left as
        they are.

        Args:
            params: as for ``average_parameters``.
            optimizer: also give every rank rank 0's optimizer state, bitwise
                (see ``AllReduceSGD.synchronize_parameters``; the lowest rank
                whose state is finite when rank 0's is not).
            buffers: also give every rank rank 0's module buffers.
            state: more state dicts to give every rank.
        """
        self._collectives.check_usable("synchronize_parameters")
        try:
            states = check_carry_args(params, optimizer, buffers, state)
        except (TypeError, ValueError) as error:
            self._bind_for_synchronization(params, error)
            raise AssertionError("unreachable: _bind_for_synchronization raised") from error
        params = _tree.materialize(params)
        flat = self._bind_for_synchronization(params)
        self._check_capture(flat, "synchronize_parameters")
        carried = CarriedState(
            params if buffers else None, optimizer, flat.tensors[0].device, states
        )
        self._wait_for_all_ranks(flat)
        globals_ = self._globals
        if not all(bool(torch.isfinite(g).all()) for g in globals_):
            raise FloatingPointError(
                "synchronize_parameters: the global parameters hold NaN or infinite values "
                "(the same on every rank); the params were left as they are"
            )
        if carried.names():
            src = pick_source(self._collectives, 0, carried.finite(), "optimizer/buffers/state")
            carried.broadcast(self._collectives, src, self.rank)
        with torch.no_grad():
            torch._foreach_copy_(flat.tensors, globals_)
        increment_version(flat.tensors)

    def _release(self) -> None:
        # An exchange in flight completes (every rank is in it already), so
        # that state_dict() can still report it.
        for fragment in self._fragments:
            self._complete_for_reading(fragment)

    @staticmethod
    def _complete_for_reading(fragment: _Fragment) -> None:
        """Waits for a fragment's allreduce in flight, for a reader of the
        state; a failed one is dropped (the failure is recorded, and every
        later collective call raises it): the state stays that of the last
        exchange that completed."""
        exchange = fragment.in_flight
        if exchange is not None and exchange.pending is not None:
            try:
                exchange.pending.wait()
                exchange.pending = None
            except CommunicationError:
                fragment.drop_exchange()

    # -- state --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs, to continue bitwise as if uninterrupted:
        the step counters, copies of the global parameters and outer momenta
        (in the order of the params' tensors; None before the first call),
        and each fragment's last exchange step and exchange in flight (its
        allreduced sum, waited for, and the step its outer step is due).
        The local parameters and the inner optimizer are the caller's to save.
        Before the first call, a loaded state is returned as it was loaded."""
        if not self._fragments and self._loaded is not None:
            loaded = self._loaded
            return {
                **loaded,
                "globals": _cloned(loaded["globals"]),
                "momenta": _cloned(loaded["momenta"]),
                "fragments": copy.deepcopy(loaded["fragments"]),
            }
        fragments: list[dict[str, Any]] = []
        for fragment in self._fragments:
            self._complete_for_reading(fragment)
            exchange = fragment.in_flight
            in_flight = None
            if exchange is not None:
                in_flight = {"merge_at": exchange.merge_at, "sum": fragment.plan.buffer.clone()}
            fragments.append(
                {
                    "last_send": fragment.last_send,
                    "previous_send": fragment.previous_send,
                    "in_flight": in_flight,
                    "merges": fragment.merges,
                    "last_reset": fragment.last_reset,
                    "residual": _cloned_one(fragment.residual),
                }
            )
        bound = bool(self._fragments)
        return {
            "step": self._step,
            "last_active": self._last_active,
            "outer_steps": self._outer_steps,
            "globals": [g.clone() for g in self._globals] if bound else None,
            "momenta": [m.clone() for m in self._momenta] if bound else None,
            "fragments": fragments if bound else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``'s output (of an object with the same
        settings). Before the first call it is kept and taken up by it;
        after, it must match the bound params. Everything is checked before
        anything changes."""
        loaded = {
            "step": state_value(state, "step", int),
            "last_active": state_value(state, "last_active", int),
            "outer_steps": state_value(state, "outer_steps", int),
            "globals": _cloned(state_tensors(state, "globals")),
            "momenta": _cloned(state_tensors(state, "momenta")),
            "fragments": state_value(state, "fragments", object),
        }
        if len({loaded[key] is None for key in ("globals", "momenta", "fragments")}) > 1:
            raise ValueError("state: globals, momenta and fragments are all None or none is")
        if loaded["fragments"] is not None:
            _check_fragment_states(loaded["fragments"], self._fragment_count, self._tau)
        if self._fragments:
            self._check_loaded_matches(loaded)
            for fragment in self._fragments:
                self._complete_for_reading(fragment)
            self._apply_loaded(loaded)
        else:
            self._loaded = loaded

    def _check_loaded_matches(self, loaded: dict[str, Any]) -> None:
        if loaded["globals"] is None:
            raise ValueError("state['globals'] is None: it comes from an object never bound")
        check_state_tensors(loaded["globals"], self._globals, "globals")
        check_state_tensors(loaded["momenta"], self._globals, "momenta")
        self._check_loaded_sums(loaded)

    def _check_loaded_sums(self, loaded: dict[str, Any]) -> None:
        for fragment, saved in zip(self._fragments, loaded["fragments"], strict=True):
            residual = saved.get("residual")
            if residual is not None and (
                fragment.residual is None or residual.shape != fragment.residual.shape
            ):
                raise ValueError(
                    "state['fragments']: a residual that does not fit this object's error "
                    "feedback (another compression setting?)"
                )
            in_flight = saved["in_flight"]
            if in_flight is not None and in_flight["sum"].shape != fragment.plan.buffer.shape:
                raise ValueError("state['fragments']: an exchange's sum does not fit the buffer")

    def _apply_loaded(self, loaded: dict[str, Any]) -> None:
        self._step = loaded["step"]
        self._last_active = loaded["last_active"]
        self._outer_steps = loaded["outer_steps"]
        with torch.no_grad():
            torch._foreach_copy_(self._globals, loaded["globals"])
            torch._foreach_copy_(self._momenta, loaded["momenta"])
            for fragment, saved in zip(self._fragments, loaded["fragments"], strict=True):
                fragment.last_send = saved["last_send"]
                fragment.previous_send = saved.get("previous_send", 0)
                fragment.merges = saved.get("merges", 0)
                fragment.last_reset = saved.get("last_reset", False)
                if fragment.residual is not None:
                    residual = saved.get("residual")
                    if residual is None:
                        fragment.residual.zero_()
                    else:
                        fragment.residual.copy_(residual)
                in_flight = saved["in_flight"]
                fragment.in_flight = None
                if in_flight is not None:
                    fragment.plan.buffer.copy_(in_flight["sum"])
                    fragment.in_flight = _Exchange(in_flight["merge_at"], None)

    # -- binding ------------------------------------------------------------

    def _bind_ahead(self, params: Any) -> None:
        # Elastic mode: the view's hand-over gives every member the source's
        # global parameters, and a joiner (nothing loaded) must not broadcast
        # alone while the survivors (loaded) do not.
        self._broadcast_at_bind = False
        self._bind(params)

    def _drop_exchanges(self) -> None:
        for fragment in self._fragments:
            self._complete_for_reading(fragment)  # nothing left pending on the old group
            fragment.drop_exchange()

    def _keep_premerge(self, buffers: list[torch.Tensor]) -> None:
        self._premerge = buffers

    def _fragment_views(self, tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        return [fragment.locals_of(tensors) for fragment in self._fragments]

    def _residuals(self) -> list[torch.Tensor | None]:
        return [fragment.residual for fragment in self._fragments]

    def _bind(self, params: Any) -> Flat:
        """Validates params against the bound structure (binding it on the
        first call: the fragments, their plans, the global parameters
        (rank 0's, or loaded) and zero momenta); returns them."""
        flat = _tree.flatten(_tree.materialize(params), "params")
        addresses = addresses_of(flat.tensors)
        if self._signature is None:
            self._bind_first(flat, addresses)
        else:
            check_same_signature(self._signature, signature(flat, "params"), "params")
            if addresses != self._addresses:
                check_no_overlap(flat, "params")
                self._bind_addresses(addresses)
        self._rebuild = flat.rebuild
        self._names = flat.names
        return flat

    def _bind_first(self, flat: Flat, addresses: list[int]) -> None:
        problem: Exception | None = None
        loaded = self._loaded
        try:
            params_signature = signature(flat, "params")
            check_no_overlap(flat, "params")
            sizes = [(t.numel(), t.element_size()) for t in flat.tensors]
            runs = split_fragments(sizes, self._fragment_count)
            if loaded is not None and loaded["globals"] is not None:
                check_state_tensors(loaded["globals"], flat.tensors, "globals")
                check_state_tensors(loaded["momenta"], flat.tensors, "momenta")
            if self._compression is not None and params_signature[0].type != "cpu":
                raise ValueError(
                    f"params: compression={self._compression!r} runs on CPU tensors only for "
                    f"now; these are on {params_signature[0]}"
                )
            entries, names = structure_entries(params_signature), flat.names
        except (TypeError, ValueError) as error:
            entries, names, problem = [f"cannot be bound: {error}"], ["params"], error
        # Each rank binds once, in its first call of any kind; a rank that
        # cannot bind (its params, or the state it loaded) makes every rank
        # raise here.
        self._collectives.check_same_structure(entries, names, "params")
        if problem is not None:
            raise problem
        # The low-bit sum quantizes float32 values.
        dtype = torch.float32 if self._compression else self._comm_dtype
        dtype = dtype or lossless_dtype([t.dtype for t in flat.tensors])
        self._globals = [t.detach().clone() for t in flat.tensors]  # strides kept
        self._momenta = [torch.zeros_like(g) for g in self._globals]
        self._element_sizes = [t.element_size() for t in flat.tensors]
        self._fragments = []
        for p, pieces in enumerate(runs):
            views = _views(self._globals, pieces)
            part: Signature = (params_signature[0], tuple(entry(v) for v in views))
            plan = self._plans.get(f"outer{p}", part, dtype, _OUTER_CODES)
            offset = p * self._tau // self._fragment_count
            fragment = _Fragment(pieces, offset, plan, self._globals, self._momenta)
            if self._compression is not None:
                payload = plan.layout.count_offset
                fragment.low_bit = LowBitSum.over(
                    self._compression, plan.layout, payload, self.world_size, self.rank
                )
                if self._error_feedback:
                    fragment.residual = torch.zeros(payload)
            self._fragments.append(fragment)
        for fragment in self._fragments:
            self._event_at[fragment.offset % self._tau] = True
            self._event_at[(fragment.offset + self._delay) % self._tau] = True
        self._signature = params_signature
        self._bind_addresses(addresses)
        if loaded is not None and loaded["globals"] is not None:
            self._check_loaded_sums(loaded)  # its tensors were checked with the params
            self._apply_loaded(loaded)
        else:
            if loaded is not None:
                self._step, self._last_active = loaded["step"], loaded["last_active"]
            # The global parameters start as rank 0's params, on every rank.
            if self._broadcast_at_bind:
                self._broadcast_globals()
        self._loaded = None

    def _bind_addresses(self, addresses: list[int]) -> None:
        self._addresses = addresses
        for fragment in self._fragments:
            fragment.bind_locals(addresses, self._element_sizes)

    def _broadcast_globals(self) -> None:
        plan = self._plans.get(
            "synchronize",
            self._bound_signature(),
            lossless_dtype([entry[0] for entry in self._bound_signature()[1]]),
        )
        globals_ = self._globals
        plan.pack(globals_, addresses_of(globals_), count_slot=-1)
        self._collectives.broadcast(plan.buffer, src=0)
        plan.unpack(globals_, addresses_of(globals_), normalize=False)

    def _bound_signature(self) -> Signature:
        assert self._signature is not None, "bound by the first call"
        return self._signature

    def _bind_for_synchronization(self, params: Any, problem: Exception | None = None) -> Flat:
        """``_bind`` for a synchronization; a rank whose input is bad (a
        ``problem``, or params ``_bind`` rejects) takes part in the
        exchanges with its problem instead of raising alone, so that every
        rank raises."""
        if problem is None:
            try:
                return self._bind(params)
            except (TypeError, ValueError) as error:
                problem = error
        if self._signature is None:
            # Not bound: the structure check every rank's first call makes.
            self._collectives.check_same_structure(
                [f"cannot take part: {problem}"], ["params"], "params", noun="check"
            )
            raise problem
        self._take_part_with_problem(problem, waiting=True)
        raise problem

    # -- exchanges ----------------------------------------------------------

    def _run_step(self, flat: Flat, waiting: bool) -> bool:
        """What step ``self._step`` does: the outer steps due at it, then the
        exchanges it starts (with delay 0, their outer steps too). Returns
        whether one of its exchanges had no contributor (every rank waiting)."""
        step, tensors = self._step, flat.tensors
        for fragment in self._fragments:
            if fragment.in_flight is not None and fragment.in_flight.merge_at == step:
                self._outer_step(fragment, tensors)
        nobody = False
        for fragment in self._fragments:
            if step >= 1 and (step - fragment.offset) % self._tau == 0:
                if self._send(fragment, tensors, waiting):
                    # No rank took a step since this fragment's last
                    # exchange: no outer step to take (nothing moved).
                    fragment.abandon_exchange()
                    nobody = True
                elif self._delay == 0:
                    self._outer_step(fragment, tensors)
        return nobody

    def _send(self, fragment: _Fragment, tensors: Sequence[torch.Tensor], waiting: bool) -> bool:
        """Starts a fragment's exchange: this rank's outer gradient when it
        took inner steps since the fragment's last exchange, else zeros that
        count for nothing. Returns (when waiting, which reads the count)
        whether no rank contributed."""
        plan = fragment.plan
        contributes = self._last_active > fragment.last_send
        if contributes:
            locals_ = fragment.locals_of(tensors)
            slot = plan.count_slot(self.rank, _OUTER_STEP)
            plan.outer_gradient(
                locals_,
                fragment.local_addresses,
                fragment.globals_,
                fragment.global_addresses,
                slot,
            )
        else:
            plan.buffer.zero_()  # no count, no flag
        fragment.previous_send, fragment.last_send = fragment.last_send, self._step
        merge_at = self._step + self._delay
        fragment.in_flight = _Exchange(merge_at, None)
        # A captured exchange completes within the capture (a graph must join
        # what it forks); its outer step stays due at its step.
        capturing = is_capturing(plan.buffer.device)
        try:
            if fragment.low_bit is not None:
                # Only a contributor's residual goes in: zeros count for nothing.
                # In flight until its outer step, even where the exact sum is
                # waited for at once (NOTE [Low-bit sums in flight]): what is
                # read now (whether anyone contributed, the flag) is in the
                # exact tail.
                low_bit = self._collectives.all_reduce_low_bit_async(
                    plan.buffer, fragment.low_bit, fragment.residual, contributes
                )
                fragment.in_flight.pending = low_bit
                if waiting or self._nonfinite == "raise":
                    low_bit.wait_for_tail()
            elif waiting or self._delay == 0 or self._nonfinite == "raise" or capturing:
                self._collectives.all_reduce_sum(plan.buffer, verify=True)
            else:
                pending = self._collectives.all_reduce_sum_async(plan.buffer, verify=True)
                fragment.in_flight.pending = pending
        except CommunicationError:
            fragment.drop_exchange()
            raise
        if self._nonfinite == "raise" and plan.code_counts()[_OUTER_PROBLEM] == 0:
            if (ranks := plan.nonfinite_ranks()) > 0:
                fragment.abandon_exchange()
                raise FloatingPointError(
                    f"params: NaN or infinite outer gradients on {ranks} of {self.world_size} "
                    f"ranks; every rank raises before the global parameters change"
                )
        return waiting and plan.contributor_count() == 0

    def _outer_step(
        self, fragment: _Fragment, tensors: Sequence[torch.Tensor], scratch: bool = False
    ) -> None:
        """Takes a fragment's outer step (waiting for its sum): the global
        parameters, the momenta and ``tensors``' local fragment; ``scratch``:
        ``tensors`` are copies, not the rank's params."""
        exchange = fragment.in_flight
        assert exchange is not None
        if exchange.pending is not None:
            try:
                exchange.pending.wait()
            except CommunicationError:
                fragment.drop_exchange()
                raise
        fragment.in_flight = None
        plan = fragment.plan
        # Captured: no host reads (a rank with a problem raises in an eager
        # call, never in a captured one: its params were bound at capture).
        capturing = is_capturing(plan.buffer.device)
        if not capturing and (problems := plan.code_counts()[_OUTER_PROBLEM]) > 0:
            raise ValueError(_problem_message(problems, self.world_size))
        skip = self._nonfinite == "skip"
        if self._premerge is not None and not scratch:  # see ElasticPort.keep_premerge
            premerge = _views(self._premerge, fragment.pieces)
            torch._foreach_copy_(premerge, fragment.locals_of(tensors))
        plan.outer_step(
            OuterStep(
                fragment.locals_of(tensors),
                fragment.local_addresses,
                fragment.globals_,
                fragment.global_addresses,
                fragment.momenta,
                fragment.momentum_addresses,
                self._outer_lr,
                self._momentum,
                self._nesterov,
                self._mix,
                skip,
            )
        )
        increment_version([tensors[i] for i in fragment.tensors])
        self._outer_steps += 1
        if not capturing:  # a captured step leaves it as it was
            self._skipped = skip and plan.nonfinite_ranks() > 0
        if not scratch:
            fragment.merges += 1
            fragment.last_reset = self._skipped

    def _take_part_with_problem(self, problem: Exception, waiting: bool = False) -> None:
        """This rank cannot take part as usual (its params no longer match
        the bound ones, or a synchronization's arguments are bad): it takes
        part in the exchanges of this step (when ``waiting``: of the next
        step that has any) with zeros and its problem's code, and takes the
        outer steps due on scratch copies, so that the global parameters
        stay the same on every rank; every rank raises the same ValueError
        when the exchange completes (this one: now, with ``problem`` as its
        cause)."""
        if not waiting:
            self._problem_step(problem)
            return
        while True:  # an exchange comes within tau steps; _problem_step raises there
            self._step += 1
            self._problem_step(problem)

    def _problem_step(self, problem: Exception) -> None:
        step = self._step
        for fragment in self._fragments:
            exchange = fragment.in_flight
            if exchange is not None and exchange.merge_at == step:
                scratch = [g.clone() for g in self._globals]
                fragment.bind_locals(addresses_of(scratch), self._element_sizes)
                try:
                    self._outer_step(fragment, scratch, scratch=True)
                finally:
                    fragment.bind_locals(self._addresses, self._element_sizes)
        problems = 0
        for fragment in self._fragments:
            if step >= 1 and (step - fragment.offset) % self._tau == 0:
                plan = fragment.plan
                plan.buffer.zero_()
                plan.buffer[
                    plan.layout.count_offset + plan.count_slot(self.rank, _OUTER_PROBLEM)
                ] = 1
                fragment.previous_send, fragment.last_send = fragment.last_send, step
                if fragment.low_bit is not None:  # the others' collective
                    self._collectives.all_reduce_low_bit(plan.buffer, fragment.low_bit, None)
                else:
                    self._collectives.all_reduce_sum(plan.buffer, verify=True)
                fragment.in_flight = None  # dropped on every rank (see _outer_step)
                problems = plan.code_counts()[_OUTER_PROBLEM]
        if problems:
            raise ValueError(_problem_message(problems, self.world_size)) from problem

    def _wait_for_all_ranks(self, flat: Flat) -> None:
        """Joins the others' exchanges, step by step without inner steps,
        until one has no contributor (every rank is here, and no rank took a
        step since that fragment's previous exchange, so every other
        fragment's progress is in an exchange already), then completes
        every exchange in flight, in the order they were due."""
        while True:
            self._step += 1
            if self._run_step(flat, waiting=True):
                break
        due = [(f.in_flight.merge_at, p) for p, f in enumerate(self._fragments) if f.in_flight]
        for _, p in sorted(due):
            self._outer_step(self._fragments[p], flat.tensors)
        self._step = self._last_active = 0
        for fragment in self._fragments:
            fragment.last_send = fragment.previous_send = 0


class Settings(NamedTuple):
    """A DiLoCo object's settings, checked (see ``check_settings``)."""

    tau: int
    outer_lr: float
    momentum: float
    nesterov: bool
    fragments: int
    delay: int
    mix: float
    comm_dtype: torch.dtype | None
    compression: LowBitFormat | None
    error_feedback: bool
    nonfinite: NonFinite


def check_settings(**options: Any) -> Settings:
    """``DiLoCo``'s settings (every keyword of its constructor but ``group``
    and ``timeout``; missing ones take its defaults), checked: TypeError or
    ValueError naming the argument. Elastic mode checks them before it
    connects."""
    parameters = inspect.signature(DiLoCo.__init__).parameters
    for name in options:
        if name not in Settings._fields:
            raise TypeError(f"DiLoCo got an unexpected keyword argument {name!r}")
    given = {name: options.get(name, parameters[name].default) for name in Settings._fields}
    tau = check_tau(given["tau"])
    momentum = check_real(given["momentum"], "momentum", 0.0, 1.0)
    nesterov = given["nesterov"]
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True needs momentum > 0 (as torch.optim.SGD)")
    delay = check_int(given["delay"], "delay", 0)
    if delay >= tau:
        raise ValueError(
            f"delay must be below tau ({tau}), got {delay}: a fragment's "
            f"exchange must complete before its next one starts"
        )
    comm_dtype = check_comm_dtype(given["comm_dtype"])
    compression, error_feedback = check_compression(
        given["compression"], given["error_feedback"], comm_dtype
    )
    return Settings(
        tau=tau,
        outer_lr=check_real(given["outer_lr"], "outer_lr", 0.0, None),
        momentum=momentum,
        nesterov=nesterov,
        fragments=check_int(given["fragments"], "fragments", 1),
        delay=delay,
        mix=check_real(given["mix"], "mix", 0.0, 1.0),
        comm_dtype=comm_dtype,
        compression=compression,
        error_feedback=error_feedback,
        nonfinite=cast(NonFinite, check_nonfinite(given["nonfinite"])),
    )


def split_fragments(sizes: Sequence[tuple[int, int]], count: int) -> list[list[Piece]]:
    """``count`` runs of the elements of tensors of (numel, element size)
    ``sizes``, tensor after tensor, each of about 1 / count of the bytes and
    none empty. Cut k falls at the element nearest k / count of the bytes,
    on a multiple of 64 elements within its tensor (16-byte aligned pieces:
    the vector path) unless that leaves a run empty; a tensor without
    elements is in no run. ValueError when there are fewer elements than
    runs."""
    total = sum(n * size for n, size in sizes)
    elements = sum(n for n, _ in sizes)
    if count > elements:
        raise ValueError(f"fragments={count}, but the params have only {elements} elements")
    for granule in (_CUT_GRANULE, 1):
        cuts = [(0, 0), *(_position(sizes, total * k / count, granule) for k in range(1, count))]
        cuts.append((len(sizes), 0))
        runs = [_pieces(sizes, a, b) for a, b in itertools.pairwise(cuts)]
        if all(runs):
            return runs
    raise AssertionError("unreachable: with cuts on elements, every run holds one")


# Cuts fall on multiples of this many elements within a tensor: 64 elements
# keep a piece's address 16-byte aligned for every dtype (vector_io.h).
_CUT_GRANULE = 64


def _position(sizes: Sequence[tuple[int, int]], target: float, granule: int) -> tuple[int, int]:
    """(tensor, element) of the cut nearest ``target`` bytes, rounded to
    ``granule`` elements within the tensor; (i + 1, 0) rather than (i, numel)."""
    start = 0
    for index, (n, size) in enumerate(sizes):
        if start + n * size > target:
            element = round((target - start) / size / granule) * granule
            element = min(max(element, 0), n)
            return (index + 1, 0) if element == n else (index, element)
        start += n * size
    return (len(sizes), 0)


def _pieces(
    sizes: Sequence[tuple[int, int]], a: tuple[int, int], b: tuple[int, int]
) -> list[Piece]:
    """The pieces from position a up to position b (tensor, element)."""
    pieces = []
    for index in range(a[0], min(b[0], len(sizes) - 1) + 1):
        begin = a[1] if index == a[0] else 0
        end = b[1] if index == b[0] else sizes[index][0]
        if end > begin:
            pieces.append(Piece(index, begin, end))
    return pieces


def _problem_message(problems: int, world_size: int) -> str:
    return (
        f"params: on {problems} of {world_size} ranks the params no longer match the ones "
        f"bound by the first call; every rank raises, and that exchange's outer step is not taken"
    )


def _check_fragment_states(fragments: object, count: int, tau: int) -> None:
    if not isinstance(fragments, (list, tuple)) or len(fragments) != count:
        raise ValueError(f"state['fragments'] must be a list of {count} fragment states")
    for saved in fragments:
        if not isinstance(saved, Mapping) or not isinstance(saved.get("last_send"), int):
            raise TypeError("state['fragments']: each must be a dict with an int 'last_send'")
        for key, kind in (("previous_send", int), ("merges", int), ("last_reset", bool)):
            if key in saved and not isinstance(saved[key], kind):
                raise TypeError(f"state['fragments']: '{key}' must be a {kind.__name__}")
        residual = saved.get("residual")
        if residual is not None and not isinstance(residual, torch.Tensor):
            raise TypeError("state['fragments']: 'residual' must be None or a tensor")
        in_flight = saved.get("in_flight")
        if in_flight is not None and (
            not isinstance(in_flight, Mapping)
            or not isinstance(in_flight.get("merge_at"), int)
            or not isinstance(in_flight.get("sum"), torch.Tensor)
        ):
            raise TypeError("state['fragments']: 'in_flight' must be None or {merge_at, sum}")


def _cloned_one(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().clone()


def _cloned(tensors: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    return None if tensors is None else [t.detach().clone() for t in tensors]
