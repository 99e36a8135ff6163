"""AllReduceEA's low-bit round in a matrix scenario, in float64: what the
center moves by and what each rank's residual becomes, from the formats'
oracle (``quant_reference``) and the documented protocol alone
(``docs/low_bit.md``; the module docstring of ``distlearn_cuda._comm.low_bit``):

- each rank's deltas sit in one payload, every parameter's segment at a
  multiple of 16 elements, the padding 0 (``kernels/layout.h``, its header);
- a rank that trained the round (a contributor) adds its residual and,
  with error feedback, keeps what its quantization lost; a waiting rank
  sends its delta alone and keeps its residual;
- the messages are quantized in blocks of the format's size from the
  payload's start, summed, and the sum quantized again in the same blocks;
- a round where any rank's values were not finite clears every residual.

The library sums in float32 in rank order where this sums in float64, and
computes scales in float32: an element next to a rounding boundary may
land a step away (``quant_reference.steps_of``). So a comparison allows
each element those steps (``flip``), and asks most elements to agree to
float32 rounding (``MOSTLY``): a protocol error moves them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from quant_reference import dequantize, quantize, steps_of

# Elements per scale (docs/low_bit.md, "Formats").
BLOCK = {"int8": 128, "int4": 128, "fp8_e4m3": 256, "mxfp4": 32}
SEGMENT_ALIGN = 16  # kernels/layout.h
# The share of elements that must agree to float32 rounding: a flip is
# rare (2026-12-07, 200 scenarios in low bits: at least 99.6% agreed, and
# no element was off by more than 0.42 of the steps it may be).
MOSTLY = 0.9

Named = dict[str, torch.Tensor]


class Payload:
    """Where each parameter's values sit in the summed buffer."""

    def __init__(self, shapes: dict[str, torch.Size]) -> None:
        self.shapes = shapes
        self.offsets: dict[str, int] = {}
        end = 0
        for name, shape in shapes.items():
            self.offsets[name] = end
            end = -(-(end + math.prod(shape)) // SEGMENT_ALIGN) * SEGMENT_ALIGN
        self.numel = end

    def flatten(self, named: Named) -> list[float]:
        values = [0.0] * self.numel
        for name, offset in self.offsets.items():
            flat = named[name].double().flatten().tolist()
            values[offset : offset + len(flat)] = flat
        return values

    def split(self, values: list[float]) -> Named:
        out = {}
        for name, shape in self.shapes.items():
            offset = self.offsets[name]
            count = math.prod(shape)
            out[name] = torch.tensor(values[offset : offset + count], dtype=torch.float64)
            out[name] = out[name].reshape(shape)
        return out


@dataclass
class RoundSum:
    """One round: what the center moves by, each rank's residual after it,
    and per element the steps either may be off by."""

    increment: Named
    increment_flip: Named  # the messages' steps and the sum's
    residuals: list[list[float] | None]
    residual_flips: list[list[float]]


def low_bit_round(
    fmt: str,
    payload: Payload,
    deltas: list[Named],
    residuals: list[list[float] | None],
    contributes: list[bool],
    feedback: bool,
) -> RoundSum:
    """The round's low-bit sum of ``deltas`` (float32 values, as each rank
    computed them), each contributor's ``residual`` added (None: zeros)."""
    block = BLOCK[fmt]
    messages, flips = [], [0.0] * payload.numel
    new_residuals: list[list[float] | None] = []
    residual_flips: list[list[float]] = []
    finite = True
    for delta, residual, contributor in zip(deltas, residuals, contributes, strict=True):
        values = payload.flatten(delta)
        finite = finite and all(math.isfinite(v) for v in values)
        if contributor and feedback and residual is not None:
            values = _float32([v + r for v, r in zip(values, residual, strict=True)])
        sent = dequantize(quantize(values, fmt, block))
        messages.append(sent)
        steps = steps_of(values, fmt, block)
        flips = [f + s for f, s in zip(flips, steps, strict=True)]
        if contributor and feedback:
            new_residuals.append(_float32([v - s for v, s in zip(values, sent, strict=True)]))
            residual_flips.append(steps)
        else:
            new_residuals.append(residual)
            residual_flips.append([0.0] * payload.numel)
    total = [math.fsum(column) for column in zip(*messages, strict=True)]
    increment = dequantize(quantize(total, fmt, block))
    flips = [f + s for f, s in zip(flips, steps_of(total, fmt, block), strict=True)]
    if not finite:  # a flagged round clears every residual
        new_residuals = [[0.0] * payload.numel for _ in deltas]
        residual_flips = [[0.0] * payload.numel for _ in deltas]
    return RoundSum(payload.split(increment), payload.split(flips), new_residuals, residual_flips)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.double().flatten() for t in tensors])


def _float32(values: list[float]) -> list[float]:
    return torch.tensor(values, dtype=torch.float32).double().tolist()


def near(got: torch.Tensor, want: torch.Tensor, flip: torch.Tensor, rounding: torch.Tensor) -> str:
    """'' when ``got`` is ``want`` to ``rounding`` in most elements (MOSTLY)
    and within ``flip + rounding`` in every one, NaN where ``want`` is NaN;
    else what differs."""
    got64, want64 = got.double(), want.double()
    nan = want64.isnan()
    if not torch.equal(got64.isnan(), nan):
        return f"NaN at {int(got64.isnan().sum())} elements, {int(nan.sum())} expected"
    if bool(nan.all()):
        return ""
    off = (got64 - want64).abs()[~nan]
    flip, rounding = flip.double()[~nan], rounding.double()[~nan]
    worst = float((off - flip - rounding).max())
    if worst > 0:
        return f"off by more than the steps it may be: {worst:.3g} past them"
    same = float((off <= rounding).double().mean())
    if same < MOSTLY:
        return f"only {same:.0%} of the elements agree to rounding"
    return ""


class LowBitState:
    """What the reference keeps of a low-bit EA run (each rank's residual,
    the steps its values may be off by) between anchors: the points where
    the ranks' logs show the library's own center and residuals, checked
    against the reference there and taken as its new start, so that steps
    a flip moved do not add up over the run."""

    def __init__(self, payload: Payload, world: int) -> None:
        self.payload = payload
        zeros = [0.0] * payload.numel
        self.residuals: list[list[float] | None] = [None] * world
        self.residual_flips = [list(zeros) for _ in range(world)]
        self.center_flip: Named = {}
        self.center_rounding: Named = {}
        self.rounds = 0  # since the last anchor

    def round(
        self,
        fmt: str,
        feedback: bool,
        deltas: list[Named],
        contributes: list[bool],
        center: Named,
        applied: bool,
    ) -> None:
        """A round's low-bit sum, added to ``center`` when ``applied`` (not
        a skipped round); keeps the residuals."""
        summed = low_bit_round(fmt, self.payload, deltas, self.residuals, contributes, feedback)
        self.residuals = summed.residuals
        for r, contributor in enumerate(contributes):
            if contributor and feedback:
                self.residual_flips[r] = summed.residual_flips[r]
        self.rounds += 1
        if not applied:
            return
        increment = summed.increment
        for name, value in center.items():
            # A float32 sum in rank order, float32 scales, the center's float32 add.
            rounding = 1e-6 * (value.abs() + increment[name].abs()).nan_to_num()
            rounding = rounding + 1e-5 * summed.increment_flip[name]
            self.center_flip[name] = self.center_flip.get(name, 0) + summed.increment_flip[name]
            self.center_rounding[name] = self.center_rounding.get(name, 0) + rounding
            center[name] = value + increment[name]

    def anchor(self, center: Named, records: dict[int, dict], where: str) -> str:
        """Checks ``center`` and the residuals against the library's in
        ``records`` (by rank: logs holding ``center_now`` and
        ``residual_now``) and takes those; '' or what differs."""
        if not records:
            return ""
        names = list(center)
        snapshots = {
            r: dict(zip(names, rec["center_now"], strict=True)) for r, rec in records.items()
        }
        first_rank = min(snapshots)
        first = snapshots[first_rank]
        for r, snapshot in snapshots.items():
            for name in names:
                if not torch.allclose(snapshot[name], first[name], rtol=0, atol=0, equal_nan=True):
                    return f"{where}: rank {r}'s center {name} is not rank {first_rank}'s"
        # Steps off in one round may shift the next round's deltas by as
        # much again (its blocks' scales): twice for every round unanchored.
        widen = 2 ** max(0, self.rounds - 1)
        # Over every parameter at once: a small one's few elements are no share.
        flip = [widen * self.center_flip.get(n, torch.zeros_like(center[n])) for n in names]
        rounding = [widen * self.center_rounding.get(n, torch.zeros_like(center[n])) for n in names]
        problem = near(
            _cat([first[n] for n in names]),
            _cat([center[n] for n in names]),
            _cat(flip),
            _cat(rounding),
        )
        if problem:
            return f"{where}: the center: {problem}"
        for name in names:
            center[name] = first[name].double()
        zeros = [0.0] * self.payload.numel
        for r, rec in records.items():
            got = rec["residual_now"]
            got_values = got.double().tolist() if got is not None else zeros
            want = self.residuals[r] or zeros
            flips = torch.tensor(self.residual_flips[r], dtype=torch.float64) * widen
            problem = near(
                torch.tensor(got_values, dtype=torch.float64),
                torch.tensor(want, dtype=torch.float64),
                flips,
                1e-4 * flips,
            )
            if problem:
                return f"{where}: rank {r}'s residual: {problem}"
            self.residuals[r] = got_values if got is not None else None
            self.residual_flips[r] = list(zeros)
        self.center_flip, self.center_rounding, self.rounds = {}, {}, 0
        return ""
