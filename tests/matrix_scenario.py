"""Scenarios of the property-based matrix test: what a user can combine.

A scenario is plain data (drawn by Hypothesis, printed on failure, and
runnable again from its printed form): the world, the algorithm and every
option, the model's variants, and the events of the run (uneven steps,
layers a rank skips, NaNs, gradients in another layout, layers frozen or
unfrozen, a rank calling another method, an extra object on one rank).
``matrix_worker`` runs one on every rank; ``matrix_reference`` says what
must come out, from the documented semantics alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

# The model's layers that a rank may skip in a step (allow_unused), and
# that events may freeze or unfreeze.
SKIPPABLE = ("conv", "lin1", "embed")
TOGGLED = ("gate", "lin1")
VOCAB, WIDTH, CHANNELS, IMAGE = 11, 6, 3, 5


class MatrixNet(nn.Module):
    """Conv (channels_last on some ranks), linear, embedding, an output
    layer tied to the embedding (or not), and a gate that starts frozen."""

    def __init__(self, tied: bool, frozen_gate: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.conv = nn.Conv2d(CHANNELS, 4, 3)
        self.lin1 = nn.Linear(WIDTH + 4 * 9, WIDTH)
        self.gate = nn.Linear(WIDTH, WIDTH)
        self.gate.requires_grad_(not frozen_gate)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, image: torch.Tensor, skip: set[str]) -> torch.Tensor:
        batch = tokens.shape[0]
        e = self.embed(tokens).mean(1) if "embed" not in skip else torch.zeros(batch, WIDTH)
        c = self.conv(image).flatten(1) if "conv" not in skip else torch.zeros(batch, 36)
        h = torch.cat([e, c], 1)
        h = torch.tanh(self.lin1(h)) if "lin1" not in skip else h[:, :WIDTH]
        h = h + self.gate(h)
        return self.head(h)


def batch(seed: int, rank: int, epoch: int, step: int) -> tuple[torch.Tensor, ...]:
    """Rank ``rank``'s data at a step: tokens, an image, targets."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + epoch * 101 + step)
    tokens = torch.randint(0, VOCAB, (3, 4), generator=g)
    image = torch.randn(3, CHANNELS, IMAGE, IMAGE, generator=g)
    targets = torch.randint(0, VOCAB, (3,), generator=g)
    return tokens, image, targets


@dataclass(frozen=True)
class SgdScenario:
    seed: int
    world: int
    mode: str  # "plain", "attach", "attach_views", "flat"
    form: str  # "module", "params", "grads"
    allow_unused: bool
    comm_dtype: str | None  # None or "bfloat16"
    nonfinite: str
    defer: bool  # the host reads the codes at the next call, as on CUDA
    channels_last: tuple[int, ...]  # ranks whose model is channels_last
    tied: bool
    epochs: tuple[tuple[int, ...], ...]  # steps per rank, per epoch
    skips: tuple[tuple[int, int, int, str], ...] = ()  # (epoch, rank, step, layer)
    nans: tuple[tuple[int, int, int], ...] = ()  # (epoch, rank, step): a NaN gradient
    reorders: tuple[tuple[int, int, int], ...] = ()  # conv's gradient in another layout
    # (epoch, step, "freeze"/"unfreeze", layer, ranks)
    events: tuple[tuple[int, int, str, str, tuple[int, ...]], ...] = ()
    mismatch: tuple[int, int, int, bool, str] | None = None  # (epoch, rank, step, normalize, mode)
    extra_object: int | None = None  # this rank first makes an object alone
    settings_mismatch: bool = False  # rank 1 asks for other settings
    numpy_off: bool = False  # torch without numpy (Tensor.numpy raises)
    twin: bool = False  # a twin object with the other allow_unused, compared bitwise
    frozen_gate: bool = True  # the gate starts frozen (else every parameter trains)
    compression: str | None = None  # a low-bit format (comm_dtype None)
    algo: str = field(default="sgd")

    @property
    def in_place(self) -> bool:
        return self.mode in ("flat", "attach_views")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EaScenario:
    seed: int
    world: int
    tau: int
    rate: tuple[str, float]  # ("alpha", a) or ("beta", b)
    asynchronous: bool
    nonfinite: str
    comm_dtype: str | None
    form: str  # "module", "params"
    epochs: tuple[tuple[int, ...], ...]
    nans: tuple[tuple[int, int, int], ...] = ()  # (epoch, rank, step): a NaN in x
    extra_object: int | None = None
    settings_mismatch: bool = False
    numpy_off: bool = False
    compression: str | None = None  # a low-bit format (refused with bfloat16)
    error_feedback: bool | None = None  # None: the format's default
    algo: str = field(default="ea")

    @property
    def alpha(self) -> float:
        kind, value = self.rate
        return value if kind == "alpha" else value / self.world

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def scenario_from_dict(data: dict[str, Any]) -> SgdScenario | EaScenario:
    """A scenario from its printed ``as_dict()`` (lists back into tuples)."""

    def tuples(value: Any) -> Any:
        if isinstance(value, list):
            return tuple(tuples(v) for v in value)
        return value

    fields = {k: tuples(v) for k, v in data.items()}
    return (SgdScenario if fields["algo"] == "sgd" else EaScenario)(**fields)


# -- strategies ------------------------------------------------------------------


@st.composite
def epochs_of(draw: Any, world: int) -> tuple[tuple[int, ...], ...]:
    count = draw(st.integers(1, 2))
    return tuple(tuple(draw(st.integers(0, 4)) for _ in range(world)) for _ in range(count))


def _events_at(epochs: tuple[tuple[int, ...], ...]) -> list[tuple[int, int, int]]:
    """Every (epoch, rank, step) a rank takes."""
    return [
        (e, r, s) for e, steps in enumerate(epochs) for r, n in enumerate(steps) for s in range(n)
    ]


@st.composite
def sgd_scenarios(draw: Any) -> SgdScenario:
    world = draw(st.integers(2, 4))
    mode = draw(st.sampled_from(["plain", "attach", "attach_views", "flat"]))
    form = draw(st.sampled_from(["module", "params", "grads"])) if mode == "plain" else "module"
    in_place = mode in ("flat", "attach_views")
    allow_unused = draw(st.booleans())
    nonfinite = draw(st.sampled_from(["propagate", "skip", "raise"]))
    epochs = draw(epochs_of(world))
    twin = mode == "plain" and draw(st.integers(0, 2)) == 0
    if twin:
        # A twin object steps beside the scenario's: every rank every step
        # (a rank waiting in synchronize_parameters would not join the
        # twin's allreduce), every gradient present.
        steps = draw(st.integers(1, 3))
        epochs = tuple(tuple(steps for _ in range(world)) for _ in epochs)
    taken = _events_at(epochs)
    layout = draw(st.sampled_from(["none", "all", "some"]))
    channels_last: tuple[int, ...] = ()
    if layout == "all":
        channels_last = tuple(range(world))
    elif layout == "some":
        channels_last = tuple(
            sorted(draw(st.sets(st.integers(0, world - 1), min_size=1, max_size=world - 1)))
        )

    def some(max_size: int) -> list[tuple[int, int, int]]:
        if not taken:
            return []
        return draw(st.lists(st.sampled_from(taken), max_size=max_size, unique=True))

    # Skipping a layer is a missing gradient: allowed with allow_unused, an
    # error on every rank without (in the modes where a gradient can be
    # missing: in place, a skipped layer's gradient is its zeroed view).
    skips = tuple(
        (e, r, s, draw(st.sampled_from(SKIPPABLE)))
        for e, r, s in some(
            0 if twin else 3 if allow_unused else draw(st.sampled_from([0, 0, 0, 1]))
        )
    )
    nans = tuple(some(draw(st.sampled_from([0, 0, 1]))))
    reorders = tuple(some(draw(st.sampled_from([0, 0, 1]))))
    events: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    if draw(st.integers(0, 3)) == 0 and taken and not twin:
        epoch, _, step = draw(st.sampled_from(taken))
        ranks = tuple(range(world)) if draw(st.booleans()) else (draw(st.integers(0, world - 1)),)
        kind, layer = draw(st.sampled_from([("unfreeze", "gate"), ("freeze", "lin1")]))
        events.append((epoch, step, kind, layer, ranks))
    mismatch = None
    if draw(st.integers(0, 5)) == 0 and taken:
        epoch, rank, step = draw(st.sampled_from(taken))
        mismatch = (
            epoch,
            rank,
            step,
            draw(st.booleans()),
            draw(st.sampled_from(["propagate", "skip", "raise"])),
        )
    comm_dtype = None if in_place else draw(st.sampled_from([None, None, "bfloat16"]))
    compression = None
    if comm_dtype is None and draw(st.integers(0, 2)) == 0:
        compression = draw(st.sampled_from(["int8", "int4", "fp8_e4m3", "mxfp4"]))
    return SgdScenario(
        seed=draw(st.integers(0, 2**31 - 1)),
        world=world,
        mode=mode,
        form=form,
        allow_unused=allow_unused,
        comm_dtype=comm_dtype,
        nonfinite=nonfinite,
        defer=draw(st.booleans()),
        channels_last=channels_last,
        tied=draw(st.booleans()),
        epochs=epochs,
        skips=skips,
        nans=nans,
        reorders=reorders,
        events=tuple(events),
        mismatch=mismatch,
        extra_object=draw(st.sampled_from([None] * 7 + list(range(world)))),
        settings_mismatch=draw(st.integers(0, 11)) == 0,
        numpy_off=draw(st.booleans()),
        twin=twin,
        frozen_gate=draw(st.booleans()),
        compression=compression,
    )


@st.composite
def ea_scenarios(draw: Any) -> EaScenario:
    world = draw(st.integers(2, 4))
    epochs = draw(epochs_of(world))
    taken = _events_at(epochs)
    bound = 2.0 / (world + 1)  # see the note "EA stability"
    if draw(st.booleans()):
        # Mostly stable, sometimes past the bound (every rank must refuse it).
        rate = ("alpha", draw(st.sampled_from([0.1, 0.3, 0.6, 0.9, 1.2])) * bound)
    else:
        rate = ("beta", draw(st.sampled_from([0.3, 0.9, 1.2])))
    nans = ()
    if taken and draw(st.integers(0, 2)) == 0:
        nans = (draw(st.sampled_from(taken)),)
    comm_dtype = draw(st.sampled_from([None, None, "bfloat16"]))
    compression = None
    # A third of the float32 runs in low bits; rarely with bfloat16, which
    # every rank must refuse.
    if draw(st.integers(0, 2 if comm_dtype is None else 11)) == 0:
        compression = draw(st.sampled_from(["int8", "int4", "fp8_e4m3", "mxfp4"]))
    return EaScenario(
        seed=draw(st.integers(0, 2**31 - 1)),
        world=world,
        tau=draw(st.integers(1, 3)),
        rate=rate,
        asynchronous=draw(st.booleans()),
        nonfinite=draw(st.sampled_from(["propagate", "skip", "raise"])),
        comm_dtype=comm_dtype,
        form=draw(st.sampled_from(["module", "params"])),
        epochs=epochs,
        nans=nans,
        extra_object=draw(st.sampled_from([None] * 7 + list(range(world)))),
        settings_mismatch=draw(st.integers(0, 11)) == 0,
        numpy_off=draw(st.booleans()),
        compression=compression,
        error_feedback=draw(st.sampled_from([None, True, False])) if compression else None,
    )
