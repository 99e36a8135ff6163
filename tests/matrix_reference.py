"""What a matrix scenario must produce, from the documented semantics alone.

Written from the README and the docstrings (and, for EA, the elastic
averaging paper, arXiv 1412.6651), never from the library's code: every
expected value is computed here in float64 from what each rank logged as
its own input (its gradients, its parameters before a round), and every
expected error from the rules "every rank raises the same error in the call
where any rank's call or input differs". In low bits, where a float32 sum
and a float64 one may round an element a step apart, the center and
residuals are checked after each round (``matrix_low_bit``) and the next
round starts from the library's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from matrix_low_bit import LowBitState, Payload
from matrix_scenario import TOGGLED, EaScenario, SgdScenario
from quant_reference import STEP_FRACTION

Log = dict[str, Any]


class Mismatch(AssertionError):
    """A rank's log differs from what the scenario must produce."""


def check(scenario: SgdScenario | EaScenario, logs: list[Log]) -> None:
    """Raises Mismatch naming the first difference."""
    for rank, log in enumerate(logs):
        if "crash" in log:
            raise Mismatch(f"rank {rank} crashed in the test worker:\n{log['crash']}")
    _check_lone_objects(scenario, logs)
    if isinstance(scenario, SgdScenario):
        SgdModel(scenario, logs).check()
    else:
        EaModel(scenario, logs).check()


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise Mismatch(message)


def _expect_error(outcome: tuple[str, str], kind: str, *fragments: str, where: str) -> None:
    _expect(
        outcome[0] == kind and all(f in outcome[1] for f in fragments),
        f"{where}: expected {kind} mentioning {fragments}, got {outcome}",
    )


def _every_rank_raises(logs: list[Log], key: str, kind: str, *fragments: str) -> None:
    """Every rank's outcome ``key`` is the error ``kind`` mentioning ``fragments``."""
    for rank, log in enumerate(logs):
        _expect_error(log[key], kind, *fragments, where=f"rank {rank}'s {key}")


def _check_lone_objects(scenario: Any, logs: list[Log]) -> None:
    """An object one rank made alone fails there, naming the rule; the
    scenario's own objects, made by every rank after it, work (checked by
    the rest)."""
    for rank, log in enumerate(logs):
        if scenario.extra_object == rank:
            _expect_error(
                log["lone"],
                "CommunicationError",
                "every rank of the group must make the same objects",
                where=f"rank {rank}'s lone object",
            )


def _close(
    got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, rtol: float, atol: float = 0.0
) -> bool:
    """Elementwise |got - expected| <= rtol * scale + atol + 1e-6, NaN where
    expected is NaN."""
    got64, exp64 = got.double(), expected.double()
    nan = exp64.isnan()
    if not torch.equal(got64.isnan(), nan):
        return False
    diff = (got64 - exp64).abs()[~nan]
    bound = rtol * scale.double().nan_to_num(posinf=0.0)[~nan] + atol + 1e-6
    return bool((diff <= bound).all())


def _bitwise(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.view(-1).view(torch.int8) if a.is_contiguous() else a.contiguous().view(torch.int8),
            b.view(-1).view(torch.int8) if b.is_contiguous() else b.contiguous().view(torch.int8),
        )
    )


# -- AllReduceSGD ----------------------------------------------------------------------


def _first_trainable() -> set[str]:
    """The trainable parameters of a fresh MatrixNet (the gate starts frozen)."""
    return {"embed.weight", "conv.weight", "conv.bias", "lin1.weight", "lin1.bias", "head.weight"}


@dataclass
class _Rank:
    trainable: set[str]
    stopped: bool = False
    steps: int = 0  # successful sum calls since the last synchronization
    pending: tuple[str, tuple[str, ...]] | None = None  # an error its next call raises
    cursor: int = 0  # next entry of its steps log
    sync_cursor: int = 0
    params: dict[str, torch.Tensor] = field(default_factory=dict)


class SgdModel:
    def __init__(self, scenario: SgdScenario, logs: list[Log]) -> None:
        self.s = scenario
        self.logs = logs
        names = _first_trainable()
        if not scenario.frozen_gate:
            names |= {"gate.weight", "gate.bias"}
        if scenario.tied:
            names.discard("head.weight")  # the same parameter as embed.weight
        self.bound = set(names)
        self.ranks = [_Rank(set(names)) for _ in range(scenario.world)]
        # With compression: the largest finite gradient any rank sent so far
        # (a residual carries at most a step of it into a later step).
        self.largest = 0.0

    # The trainable parameters that each form of argument passes.
    def check(self) -> None:
        s = self.s
        if s.settings_mismatch:
            _every_rank_raises(self.logs, "construct", "ValueError", "settings", "allow_unused")
            return
        for rank, log in enumerate(self.logs):
            _expect(log["construct"] == ("ok", ""), f"rank {rank}: construct {log['construct']}")
        mixed = 0 < len(s.channels_last) < s.world
        if s.mode != "plain":
            for rank, log in enumerate(self.logs):
                if mixed:
                    _expect_error(
                        log["mode"],
                        "ValueError",
                        "conv.weight",
                        "channels_last",
                        "contiguous",
                        where=f"rank {rank}: attach/use_flat_storage with mixed layouts",
                    )
                else:
                    _expect(log["mode"] == ("ok", ""), f"rank {rank}: mode {log['mode']}")
            if mixed:
                return
        if mixed:
            for rank, log in enumerate(self.logs):
                _expect_error(
                    log["syncs"][0]["outcome"],
                    "ValueError",
                    "conv.weight",
                    "channels_last",
                    "contiguous",
                    where=f"rank {rank}: the first call with mixed layouts",
                )
            return
        if not self._sync(-1):
            return
        for epoch, steps in enumerate(s.epochs):
            for step in range(max(steps)):
                if not self._step(epoch, step, steps):
                    return
            if not self._sync(epoch):
                return

    def _record(self, rank: int) -> Log:
        state = self.ranks[rank]
        record = self.logs[rank]["steps"][state.cursor]
        state.cursor += 1
        return record

    def _step(self, epoch: int, step: int, steps: tuple[int, ...]) -> bool:
        """Checks global step (epoch, step); False when the scenario ended there."""
        s = self.s
        stepping = [r for r in range(s.world) if steps[r] > step and not self.ranks[r].stopped]
        waiting = [r for r in range(s.world) if steps[r] <= step and not self.ranks[r].stopped]
        if not stepping:
            return True
        records = {r: self._record(r) for r in stepping}
        if s.compression is not None:
            for r in stepping:
                for grad in records[r]["local"].values():
                    finite = grad[grad.isfinite()] if grad is not None else None
                    if finite is not None and finite.numel():
                        self.largest = max(self.largest, float(finite.abs().max()))
        # An error of the previous step, raised by each rank's next call: this
        # step's, or for a rank that took its last step, its synchronization.
        late = [r for r in range(s.world) if self.ranks[r].pending is not None]
        for r in late:
            kind, fragments = self.ranks[r].pending  # type: ignore[misc]
            outcome = (
                records[r]["outcome"]
                if r in records
                else self.logs[r]["syncs"][self.ranks[r].sync_cursor]["outcome"]
            )
            _expect_error(outcome, kind, *fragments, where=f"rank {r} (late)")
            self.ranks[r].stopped = True
        if late:
            return False
        calls: dict[int, tuple[bool, str]] = {}
        problems: dict[int, tuple[str, str]] = {}
        changed: dict[int, tuple[frozenset[str], frozenset[str]]] = {}
        for r in stepping:
            rank = self.ranks[r]
            for at_epoch, at_step, kind, layer, ranks in s.events:
                if (at_epoch, at_step) == (epoch, step) and r in ranks:
                    names = {f"{layer}.weight", f"{layer}.bias"}
                    rank.trainable = (
                        (rank.trainable | names) if kind == "unfreeze" else (rank.trainable - names)
                    )
            calls[r] = (True, s.nonfinite)
            if s.mismatch is not None and s.mismatch[:3] == (epoch, r, step):
                calls[r] = (s.mismatch[3], s.mismatch[4])
            local = records[r]["local"]
            kept = self.bound & rank.trainable
            # In parameter order: the library names the first one.
            missing = [n for n in local if n in kept and local[n] is None]
            if s.form == "grads":
                if missing:
                    problems[r] = ("TypeError", "NoneType")
                elif rank.trainable != self.bound:
                    problems[r] = ("ValueError", "structure changed")
            elif missing and not s.allow_unused:
                named = missing[0] if s.form == "module" else "stands for its .grad"
                problems[r] = ("ValueError", named)
            if r not in problems and rank.trainable != self.bound:
                changed[r] = (
                    frozenset(rank.trainable - self.bound),
                    frozenset(self.bound - rank.trainable),
                )
        error = self._agreement_error(stepping, waiting, calls, problems, changed)
        if self.s.defer and (error is not None or changed):
            return self._deferred(error, stepping, waiting, records, problems)
        if error is not None:
            return self._disagreed(error, stepping, waiting, records)
        normalize, nonfinite = calls[stepping[0]]
        if changed:  # every rank changed alike: bound together, then averaged
            self.bound = set(self.ranks[stepping[0]].trainable)
        return self._agreed(epoch, step, stepping, records, normalize, nonfinite)

    def _agreement_error(
        self,
        stepping: list[int],
        waiting: list[int],
        calls: dict[int, tuple[bool, str]],
        problems: dict[int, tuple[str, str]],
        changed: dict[int, Any],
    ) -> tuple[str, tuple[str, ...]] | None:
        if problems:
            first = min(problems)
            kind, fragment = problems[first]
            return kind, (f"rank {first}", fragment)
        if len(set(calls.values())) > 1:
            return "ValueError", ("different calls",)
        if changed and (waiting or len(changed) < len(stepping)):
            return "ValueError", ("trainable parameters",)
        if changed and len(set(changed.values())) > 1:
            return "ValueError", ("trainable parameters",)
        return None

    def _disagreed(
        self,
        error: tuple[str, tuple[str, ...]],
        stepping: list[int],
        waiting: list[int],
        records: dict[int, Log],
    ) -> bool:
        """The ranks read their codes in the call: every rank raises there."""
        kind, fragments = error
        self._waiting_raise(error, waiting)
        for r in stepping:
            _expect_error(records[r]["outcome"], kind, *fragments, where=f"rank {r}")
            if not self.s.in_place:
                self._unchanged(r, records[r])
            self.ranks[r].stopped = True
        return False

    def _deferred(
        self,
        error: tuple[str, tuple[str, ...]] | None,
        stepping: list[int],
        waiting: list[int],
        records: dict[int, Log],
        problems: dict[int, tuple[str, str]],
    ) -> bool:
        """The ranks read their codes at their next call (the note "Deferred
        agreement"): the step completes with zeros on every rank (but one
        whose argument could not be read as its gradients: unchanged), then
        the next call raises, or binds a set every rank changed alike."""
        self._waiting_raise(error, waiting)
        for r in stepping:
            _expect(records[r]["outcome"] == ("ok", ""), f"rank {r}: {records[r]['outcome']}")
            if r in problems and self.s.form == "grads":
                self._unchanged(r, records[r])
            else:
                for name, got in records[r]["after"].items():
                    _expect(got is None or bool((got == 0).all()), f"rank {r}: {name} not zeroed")
            self.ranks[r].steps += 1
            self.ranks[r].pending = error
        if error is None:  # every rank changed alike: bound at the next call
            self.bound = set(self.ranks[stepping[0]].trainable)
        return True

    def _waiting_raise(self, error: tuple[str, tuple[str, ...]] | None, waiting: list[int]) -> None:
        """Ranks waiting in synchronize_parameters read the codes at once."""
        if error is None:
            return
        kind, fragments = error
        for r in waiting:
            record = self.logs[r]["syncs"][self.ranks[r].sync_cursor]
            _expect_error(record["outcome"], kind, *fragments, where=f"rank {r} (waiting)")
            self.ranks[r].stopped = True

    def _unchanged(self, rank: int, record: Log) -> None:
        for name, before in record["local"].items():
            after = record["after"].get(name)
            if before is None:
                continue
            _expect(
                after is not None and torch.allclose(after, before, rtol=0, atol=0, equal_nan=True),
                f"rank {rank}: {name}'s gradient changed by a call that raised",
            )

    def _agreed(
        self,
        epoch: int,
        step: int,
        stepping: list[int],
        records: dict[int, Log],
        normalize: bool,
        nonfinite: str,
    ) -> bool:
        s = self.s
        dtype = torch.bfloat16 if s.comm_dtype == "bfloat16" else None
        flagged = any(
            g is not None and not bool(torch.isfinite(g).all())
            for r in stepping
            for n, g in records[r]["local"].items()
            if n in self.bound
        )
        where = f"epoch {epoch} step {step}"
        if flagged and nonfinite == "raise":
            for r in stepping:
                _expect_error(records[r]["outcome"], "FloatingPointError", "NaN", where=where)
                if not s.in_place:
                    self._unchanged(r, records[r])
            return True
        for r in stepping:
            _expect(
                records[r]["outcome"] == ("ok", ""), f"{where}: rank {r} {records[r]['outcome']}"
            )
            self.ranks[r].steps += 1
            if nonfinite == "skip":
                _expect(records[r]["skipped"] == flagged, f"{where}: rank {r} skipped flag")
        for name in sorted(self.bound):
            inputs = [records[r]["local"].get(name) for r in stepping]
            present = [g for g in inputs if g is not None]
            afters = [records[r]["after"].get(name) for r in stepping]
            if not present:
                _expect(
                    all(a is None for a in afters), f"{where}: {name} made where no rank had it"
                )
                continue
            if flagged and nonfinite == "skip":
                _expect(
                    all(a is not None and bool((a == 0).all()) for a in afters),
                    f"{where}: {name} not zeros in a skipped step",
                )
                continue
            if s.compression is not None and flagged:
                # "propagate" in low bits (NOTE [Non-finite blocks]): non-finite
                # wherever a rank's value was (its block's neighbours too, unchecked).
                bad = ~torch.stack([g.isfinite() for g in present]).all(0)
                for r, got in zip(stepping, afters, strict=True):
                    _expect(
                        got is not None and bool((~got.isfinite())[bad].all()),
                        f"{where}: rank {r}'s {name} lost a non-finite value in low bits",
                    )
                    _expect(_bitwise(got, afters[0]), f"{where}: ranks differ in {name}")
                continue
            sent = [g.to(dtype).double() if dtype is not None else g.double() for g in present]
            total = sum(sent)
            expected = total / len(present) if normalize else total
            scale = sum(g.abs() for g in sent) / (len(present) if normalize else 1)
            rtol = (s.world + 2) * 2.0**-8 if dtype is not None else 1e-5
            atol = 0.0
            if s.compression is not None:
                # Each rank's residual in and a new one out, and the summed
                # shard quantized again: three steps of the largest value
                # sent (a step being STEP_FRACTION of a block's largest),
                # whose residual from an earlier step adds a step of that;
                # a sum (not normalized) of n ranks' values has n times it.
                fraction = STEP_FRACTION[s.compression]
                atol = 3 * fraction * (1 + fraction) * self.largest
                atol *= 1 if normalize else len(present)
            for r, got in zip(stepping, afters, strict=True):
                _expect(got is not None, f"{where}: rank {r} has no .grad for {name}")
                _expect(
                    _close(got, expected, scale, rtol, atol),
                    f"{where}: rank {r}'s {name} is not the mean over the {len(present)} ranks "
                    f"that produced it (max error "
                    f"{(got.double() - expected).abs().nan_to_num().max().item():.3g})",
                )
                _expect(
                    torch.allclose(got, afters[0], rtol=0, atol=0, equal_nan=True),
                    f"{where}: ranks {stepping[0]} and {r} hold different {name}",
                )
        for r in stepping:
            twin = records[r].get("twin")
            if twin is not None:
                _expect(not isinstance(twin, tuple), f"{where}: rank {r}'s twin raised {twin}")
                _expect(
                    all(_bitwise(records[r]["after"][n], twin[n]) for n in self.bound),
                    f"{where}: rank {r}: allow_unused and the default path differ bitwise",
                )
        return True

    def _sync(self, epoch: int) -> bool:
        """Checks the synchronization that ends ``epoch`` (-1: the first)."""
        live = [r for r in range(self.s.world) if not self.ranks[r].stopped]
        records = {}
        for r in live:
            rank = self.ranks[r]
            records[r] = self.logs[r]["syncs"][rank.sync_cursor]
            rank.sync_cursor += 1
        late = [r for r in live if self.ranks[r].pending is not None]
        for r in late:
            kind, fragments = self.ranks[r].pending  # type: ignore[misc]
            _expect_error(records[r]["outcome"], kind, *fragments, where=f"rank {r}'s sync (late)")
        if late or not live:
            return False
        where = f"synchronize_parameters after epoch {epoch}"
        for r in live:
            _expect(records[r]["steps"] == self.ranks[r].steps, f"{where}: rank {r}'s step count")
        finite = {
            r: all(bool(torch.isfinite(p).all()) for p in records[r]["params"].values())
            and all(bool(torch.isfinite(t).all()) for t in _tensors(records[r]["optimizer"]))
            for r in live
        }
        candidates = [r for r in live if finite[r]]
        if not candidates:
            for r in live:
                _expect_error(records[r]["outcome"], "FloatingPointError", "NaN", where=where)
            return False
        winner = max(candidates, key=lambda r: (self.ranks[r].steps, -r))
        source = records[winner]
        for r in live:
            record = records[r]
            _expect(record["outcome"] == ("ok", ""), f"{where}: rank {r} {record['outcome']}")
            for name, expected in source["params"].items():
                _expect(
                    _bitwise(record["params_after"][name].contiguous(), expected.contiguous()),
                    f"{where}: rank {r}'s {name} is not rank {winner}'s",
                )
            _expect(
                _same_state(record["optimizer_after"], source["optimizer"]),
                f"{where}: rank {r}'s optimizer state is not rank {winner}'s",
            )
            _expect(
                record["scheduler_after"] == source["scheduler"],
                f"{where}: rank {r}'s scheduler state {record['scheduler_after']} is not rank "
                f"{winner}'s {source['scheduler']}",
            )
            for name, before in record["grads"].items():
                _expect(
                    _bitwise(record["grads_after"][name], before),
                    f"{where}: rank {r}'s {name}.grad was changed by the synchronization",
                )
            self.ranks[r].steps = 0
        return True


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (
        isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    )


# -- AllReduceEA ------------------------------------------------------------------------


def _expect_anchored(low_bit: LowBitState, center: dict, records: dict, where: str) -> None:
    problem = low_bit.anchor(center, records, where)
    _expect(not problem, problem)


class EaModel:
    def __init__(self, scenario: EaScenario, logs: list[Log]) -> None:
        self.s = scenario
        self.logs = logs
        self.low_bit: LowBitState | None = None  # with compression

    def check(self) -> None:
        s = self.s
        alpha = s.alpha
        if s.compression is not None and s.comm_dtype is not None:
            _every_rank_raises(self.logs, "construct", "ValueError", "comm_dtype", "compression")
            return
        # The rate is refused by each rank before the ranks compare settings.
        if s.rate[0] == "alpha" and alpha > 1.0:
            _every_rank_raises(self.logs, "construct", "ValueError", "alpha must be in")
            return
        if alpha * (s.world + 1) >= 2.0:  # see the note "EA stability"
            _every_rank_raises(self.logs, "construct", "ValueError", "cannot be stable")
            return
        if s.settings_mismatch:
            _every_rank_raises(self.logs, "construct", "ValueError", "settings", "nonfinite")
            return
        for rank, log in enumerate(self.logs):
            _expect(log["construct"] == ("ok", ""), f"rank {rank}: construct {log['construct']}")
            _expect(log["start"] == ("ok", ""), f"rank {rank}: start {log['start']}")
        start = self.logs[0]["start_params"]
        for rank, log in enumerate(self.logs):
            for name, value in log["start_params"].items():
                _expect(
                    _bitwise(value, start[name]), f"rank {rank}: {name} not rank 0's at the start"
                )
        center = {n: t.double() for n, t in start.items()}
        x = [{n: t.double() for n, t in start.items()} for _ in range(s.world)]
        if s.compression is not None:
            self.low_bit = LowBitState(Payload({n: t.shape for n, t in start.items()}), s.world)
        cursors = [0] * s.world
        for epoch, steps in enumerate(s.epochs):
            outcome = self._epoch(epoch, steps, center, x, cursors)
            if outcome is False:
                return

    def _epoch(
        self,
        epoch: int,
        steps: tuple[int, ...],
        center: dict[str, torch.Tensor],
        x: list[dict[str, torch.Tensor]],
        cursors: list[int],
    ) -> bool:
        s = self.s
        tau, alpha = s.tau, s.alpha
        rounds = [n // tau for n in steps]
        records = [
            self.logs[r]["steps"][cursors[r] : cursors[r] + steps[r]] for r in range(s.world)
        ]
        for r in range(s.world):
            cursors[r] += steps[r]
        total = max(rounds) + 1  # the last one: every rank waits, count 0
        for r in range(s.world):
            if steps[r] > 0 and rounds[r] == 0:  # trained, then waits for the first round
                x[r] = {n: t.double() for n, t in records[r][-1]["after"].items()}
        low_bit = self.low_bit
        asynchronous = s.asynchronous and s.nonfinite != "raise"  # "raise" rounds are synchronous
        fmt = s.compression or ""
        # Error feedback: on by default for the 4-bit formats.
        feedback = s.error_feedback if s.error_feedback is not None else fmt in ("int4", "mxfp4")
        for g in range(1, total + 1):
            where = f"epoch {epoch} round {g}"
            # The logs of the ranks that trained this round: with compression,
            # each holds the object's low-bit state as the call left it.
            trained = {r: records[r][g * tau - 1] for r in range(s.world) if g <= rounds[r]}
            if low_bit is not None and asynchronous:
                # A call of an asynchronous round holds what the round before left.
                _expect_anchored(low_bit, center, trained, f"{where}, before it")
            moved: list[dict[str, torch.Tensor]] = []
            deltas: list[dict[str, torch.Tensor]] = []
            flagged = []
            for r in range(s.world):
                if g <= rounds[r]:
                    record = records[r][g * tau - 1]
                    before = {n: t.double() for n, t in record["before"].items()}
                else:
                    before = x[r]  # waiting: not trained any more
                delta = {}
                for name, value in before.items():
                    d = alpha * (value - center[name])
                    if s.comm_dtype == "bfloat16":
                        d = d.float().to(torch.bfloat16).double()
                    else:
                        d = d.float().double()
                    delta[name] = d
                deltas.append(delta)
                moved.append({n: before[n] - delta[n] for n in before})
                flagged.append(not all(bool(torch.isfinite(d).all()) for d in delta.values()))
            if any(flagged) and s.nonfinite == "raise":
                for r in range(s.world):
                    outcome = (
                        records[r][g * tau - 1]["outcome"]
                        if g <= rounds[r]
                        else self.logs[r]["syncs"][epoch]["outcome"]
                    )
                    _expect_error(outcome, "FloatingPointError", "NaN", where=f"{where} rank {r}")
                return False
            skipped = any(flagged) and s.nonfinite == "skip"
            if skipped:
                for r in range(s.world):
                    if flagged[r]:
                        moved[r] = {n: c.clone() for n, c in center.items()}  # rejoins
            if low_bit is not None:
                contributes = [r in trained for r in range(s.world)]
                low_bit.round(fmt, feedback, deltas, contributes, center, applied=not skipped)
                if not asynchronous:
                    # A call of a synchronous round holds what it left.
                    _expect_anchored(low_bit, center, trained, f"{where}, after it")
            elif not skipped:
                for name in center:
                    center[name] = center[name] + sum(d[name] for d in deltas)
            for r in range(s.world):
                if g <= rounds[r]:
                    record = records[r][g * tau - 1]
                    _expect(
                        record["outcome"] == ("ok", ""), f"{where}: rank {r} {record['outcome']}"
                    )
                    self._compare(record["after"], moved[r], deltas, f"{where}: rank {r}'s params")
                    if s.nonfinite == "skip":
                        _expect(
                            record["rejoined"] == flagged[r], f"{where}: rank {r} rejoined flag"
                        )
                    # Local steps after the round start from what it left.
                    last = rounds[r] * tau
                    if g == rounds[r] and last < steps[r]:
                        x[r] = {n: t.double() for n, t in records[r][-1]["after"].items()}
                    else:
                        x[r] = moved[r]
                else:
                    x[r] = moved[r]
        if not all(bool(torch.isfinite(c).all()) for c in center.values()):
            # Every rank holds the same center: none can give a finite one.
            for r in range(s.world):
                outcome = self.logs[r]["syncs"][epoch]["outcome"]
                _expect_error(outcome, "FloatingPointError", "every rank", where=f"rank {r}")
            return False
        if low_bit is not None:
            syncs = {r: self.logs[r]["syncs"][epoch] for r in range(s.world)}
            _expect_anchored(low_bit, center, syncs, f"epoch {epoch}'s synchronize_center")
        for r in range(s.world):
            sync = self.logs[r]["syncs"][epoch]
            where = f"epoch {epoch}: rank {r}'s synchronize_center"
            _expect(sync["outcome"] == ("ok", ""), f"{where}: {sync['outcome']}")
            self._compare(sync["center"], center, [], f"{where}: center")
            _expect(
                all(
                    _bitwise(sync["center"][n], self.logs[0]["syncs"][epoch]["center"][n])
                    for n in center
                ),
                f"{where}: the center differs from rank 0's",
            )
            self._compare(sync["params_after"], x[r], [], f"{where}: params")
        return True

    def _compare(
        self,
        got: dict[str, torch.Tensor],
        expected: dict[str, torch.Tensor],
        deltas: list[dict[str, torch.Tensor]],
        where: str,
    ) -> None:
        rtol = (self.s.world + 2) * 2.0**-8 if self.s.comm_dtype == "bfloat16" else 1e-5
        for name, value in expected.items():
            # What the values and deltas summed weigh (a NaN among them weighs nothing).
            scale = value.abs().nan_to_num() + sum(
                (d[name].abs().nan_to_num() for d in deltas), torch.zeros_like(value)
            )
            _expect(
                _close(got[name], value, scale + 1.0, rtol),
                f"{where}: {name} differs from the reference by "
                f"{(got[name].double() - value).abs().nan_to_num().max().item():.3g}",
            )


_ = TOGGLED  # the layers the scenarios toggle (documentation)
