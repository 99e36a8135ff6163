"""What the ranks agree on in each call, at no extra collective.

NOTE: [Call codes]. A rank that takes part in a step writes its 1 into a
count slot (see ``_tensors.plan.count_slots_for``); here the slots are grouped, one
group per *code*, and the rank writes into the group of the code that says
what it is doing: which call with which options, or that its own inputs are
bad (a missing ``.grad``, a structure that changed), or that its trainable
parameters changed. The allreduce that carries the data sums the slots, so
afterwards every rank sees how many ranks wrote each code: the sum over all
groups is the step's contributor count (what the unpack divides by), and
the ranks agree exactly when a single group holds it all. Every rank reads
the same sums and so reaches the same verdict:

- one call code holds every contributor: the step goes on as asked;
- anything else: every rank (the waiting ones of ``synchronize_parameters``
  included) exchanges a short description of what it did (one small
  gather, only on this path), and every rank takes the same decision from
  the same descriptions: raise the same error naming the ranks and the
  tensors, or, when every rank found the same trainable parameters changed,
  bind the new set together.

A rank that found its own input bad still takes part (packing zeros where a
tensor is missing) instead of raising alone, so its peers raise at once
with it instead of a CommunicationError at their deadline.

On the device (CUDA buffers, where reading the slots would make the host
wait), the unpack kernel reads them instead: unless this rank's code holds
every contributor it writes zeros, the same on every rank, and the host
reads the slots at the object's next call (see ``Deferred``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .validate import NONFINITE_MODES

__all__ = [
    "CALLS",
    "CALL_CODES",
    "CHANGED",
    "EA_CODES",
    "EA_PROBLEM",
    "EA_ROUND",
    "HOOK",
    "PROBLEM",
    "SGD_CODES",
    "Decision",
    "Description",
    "Problem",
    "decide",
    "verdict",
]

# SGD's gradient steps: a call (sum_gradients, normalize=False, or
# sum_and_normalize_gradients) with its nonfinite mode, codes 0 to 5.
CALLS: tuple[tuple[bool, str], ...] = tuple(
    (normalize, mode) for normalize in (False, True) for mode in NONFINITE_MODES
)
HOOK = len(CALLS)  # a bucket started by a backward hook, before the call is known
CHANGED = HOOK + 1  # this rank's trainable parameters changed since they were bound
PROBLEM = HOOK + 2  # this rank's own input is bad (see its description)
SGD_CODES = HOOK + 3

# AllReduceEA's averaging rounds.
EA_ROUND = 0
EA_PROBLEM = 1
EA_CODES = 2


CALL_CODES: dict[tuple[bool, str], int] = {call: code for code, call in enumerate(CALLS)}


def call_name(normalize: bool) -> str:
    return "sum_and_normalize_gradients" if normalize else "sum_gradients"


def verdict(code_counts: Sequence[int]) -> int | None:
    """The code every contributor wrote, -1 when no rank contributed, None
    when they disagree (or some wrote CHANGED or PROBLEM, which always
    needs the descriptions)."""
    written = [code for code, count in enumerate(code_counts) if count > 0]
    if not written:
        return -1
    if len(written) == 1 and written[0] not in (CHANGED, PROBLEM):
        return written[0]
    return None


@dataclass(frozen=True)
class Problem:
    """A rank's own bad input: the exception its peers raise too."""

    kind: str  # "ValueError" or "TypeError"
    message: str


@dataclass
class Description:
    """What one rank did in a step, exchanged when the ranks do not agree
    (plain data: it travels as ``_comm.gloo.encode`` bytes)."""

    call: str  # "sum_gradients", "sum_and_normalize_gradients", "synchronize_parameters"...
    nonfinite: str = ""
    waiting: bool = False  # joined the step from synchronize_parameters, contributing nothing
    problems: list[Problem] = field(default_factory=list)
    added: list[str] = field(default_factory=list)  # now trainable, not bound
    removed: list[str] = field(default_factory=list)  # bound, no longer trainable

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)

    def as_data(self) -> dict[str, Any]:
        return {
            "call": self.call,
            "nonfinite": self.nonfinite,
            "waiting": self.waiting,
            "problems": [(p.kind, p.message) for p in self.problems],
            "added": list(self.added),
            "removed": list(self.removed),
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Description:
        return cls(
            call=str(data["call"]),
            nonfinite=str(data["nonfinite"]),
            waiting=bool(data["waiting"]),
            problems=[Problem(str(kind), str(message)) for kind, message in data["problems"]],
            added=[str(name) for name in data["added"]],
            removed=[str(name) for name in data["removed"]],
        )

    def what(self) -> str:
        if self.waiting:
            return f"{self.call} (waiting for the others' steps)"
        return f"{self.call}(nonfinite={self.nonfinite!r})" if self.nonfinite else self.call


@dataclass(frozen=True)
class Decision:
    """What every rank does after exchanging descriptions: ``error`` (raise
    it) or, when None, bind the trainable parameters anew (``added`` and
    ``removed`` agree on every rank)."""

    error: Exception | None
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


_ERRORS: dict[str, type[Exception]] = {"ValueError": ValueError, "TypeError": TypeError}


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _changes(description: Description) -> str:
    parts = []
    if description.added:
        parts.append("now trainable: " + ", ".join(description.added))
    if description.removed:
        parts.append("no longer trainable: " + ", ".join(description.removed))
    return "; ".join(parts) if parts else "no change"


def decide(descriptions: Sequence[Description], arg: str, state: str) -> Decision:
    """The decision of every rank, from every rank's description (by rank).
    ``state``: what the gradients hold when the step fails (for the message)."""
    stepping = {r: d for r, d in enumerate(descriptions) if not d.waiting}
    problems = [(r, p) for r, d in enumerate(descriptions) for p in d.problems]
    if problems:
        rank, first = problems[0]
        others = sorted({r for r, _ in problems} - {rank})
        also = f" (and problems on {_ranks(others)})" if others else ""
        text = first.message.removeprefix(f"{arg}: ")
        message = f"{arg}: rank {rank}: {text}{also}; every rank raises, with {state}"
        return Decision(_ERRORS.get(first.kind, ValueError)(message))
    calls: dict[str, list[int]] = {}
    for rank, description in stepping.items():
        calls.setdefault(description.what(), []).append(rank)
    if len(calls) > 1:
        made = "; ".join(f"{_ranks(ranks)}: {what}" for what, ranks in calls.items())
        return Decision(
            ValueError(
                f"{arg}: the ranks made different calls in this step ({made}); every rank "
                f"must make the same call with the same nonfinite mode; every rank raises, "
                f"with {state}"
            )
        )
    changes: dict[tuple[tuple[str, ...], tuple[str, ...]], list[int]] = {}
    for rank, description in enumerate(descriptions):
        key = (tuple(description.added), tuple(description.removed))
        changes.setdefault(key, []).append(rank)
    waiting = [r for r, d in enumerate(descriptions) if d.waiting]
    if waiting and any(d.changed for d in stepping.values()):
        changed = [r for r, d in stepping.items() if d.changed]
        return Decision(
            ValueError(
                f"{arg}: the trainable parameters of {_ranks(changed)} changed since they "
                f"were bound ({_changes(descriptions[changed[0]])}) while {_ranks(waiting)} "
                f"waits in synchronize_parameters; change them on every rank at the same "
                f"step; every rank raises, with {state}"
            )
        )
    if len(changes) > 1:
        seen = "; ".join(
            f"{_ranks(ranks)}: {_changes(descriptions[ranks[0]])}" for ranks in changes.values()
        )
        return Decision(
            ValueError(
                f"{arg}: the ranks' trainable parameters changed differently since they were "
                f"bound ({seen}); freeze and unfreeze the same parameters on every rank at the "
                f"same step; every rank raises, with {state}"
            )
        )
    (added, removed), _ = next(iter(changes.items()))
    return Decision(None, added, removed)
