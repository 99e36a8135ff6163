"""DiLoCo and Streaming DiLoCo in float64, written from the papers, as the
oracle of the tests (issue 23): plain Python over lists of floats, one
worker at a time, no library code.

DiLoCo (Douillard et al., arXiv 2311.08105, Algorithm 1): every worker
starts an outer step from the global parameters, takes H inner steps of its
own, and the outer gradient is the mean over the workers of
``global - local``; the outer optimizer (Nesterov momentum SGD: lr 0.7,
momentum 0.9) applies it to the global parameters, and every worker starts
the next outer step from them.

The outer optimizer is PyTorch's ``SGD(nesterov=True, dampening=0)``, as the
paper's and torchft's: the first step's buffer is the gradient itself,
``b = mu * b + g`` after it, and the step is ``x -= lr * (g + mu * b)``.

Streaming DiLoCo (Douillard et al., arXiv 2501.18512): the parameters are
split into P fragments; fragment p is synchronized when the step count t
satisfies ``(t - offset_p) % H == 0`` with ``offset_p = p * H // P`` (the
fragments staggered across the H steps), its outer gradient taken from the
local parameters at that step, its exchange overlapped with ``tau`` more
inner steps, after which the global fragment takes the outer step and each
worker merges it into its local fragment as it then is:
``local = alpha * local + (1 - alpha) * global`` (alpha 0: the reset of
DiLoCo). With P = 1, tau = 0 and alpha = 0 it is DiLoCo.

A worker that contributes nothing to an outer step (ran out of data) is
left out of the mean: the outer gradient is the mean over the contributors,
as the library's count slots make it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Vector = list[float]
# An inner step: (worker, step count, local parameters) -> new local parameters.
InnerStep = Callable[[int, int, Vector], Vector]


@dataclass
class OuterOptimizer:
    """Nesterov momentum SGD on one vector (see the module)."""

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True
    buffer: Vector | None = None

    def step(self, params: Vector, grad: Vector) -> Vector:
        if self.momentum == 0:
            return [x - self.lr * g for x, g in zip(params, grad, strict=True)]
        if self.buffer is None:
            self.buffer = list(grad)
        else:
            self.buffer = [self.momentum * b + g for b, g in zip(self.buffer, grad, strict=True)]
        if self.nesterov:
            direction = [g + self.momentum * b for g, b in zip(grad, self.buffer, strict=True)]
        else:
            direction = list(self.buffer)
        return [x - self.lr * d for x, d in zip(params, direction, strict=True)]


def mean_outer_gradient(global_params: Vector, locals_: Sequence[Vector]) -> Vector:
    """(1/k) sum_i (global - local_i), each coordinate summed exactly."""
    k = len(locals_)
    return [math.fsum(g - local[j] for local in locals_) / k for j, g in enumerate(global_params)]


@dataclass
class Fragment:
    indices: list[int]
    offset: int
    optimizer: OuterOptimizer
    # Outer gradients sent and not applied yet: (step to apply at, gradient).
    in_flight: list[tuple[int, Vector]] = field(default_factory=list)


def streaming_diloco(
    initial: Vector,
    workers: int,
    steps: int,
    inner_step: InnerStep,
    H: int,
    fragments: int = 1,
    tau: int = 0,
    alpha: float = 0.0,
    lr: float = 0.7,
    momentum: float = 0.9,
    contributes: Callable[[int, int], bool] = lambda worker, step: True,
) -> tuple[Vector, list[Vector]]:
    """Runs ``steps`` inner steps on every worker; returns the global
    parameters and each worker's local ones. Fragment p holds the indices
    i with ``i % fragments == p``. ``contributes(worker, t)``: whether the
    worker takes part in a synchronization at step t (see the module)."""
    global_params = list(initial)
    local = [list(initial) for _ in range(workers)]
    parts = [
        Fragment(
            [i for i in range(len(initial)) if i % fragments == p],
            p * H // fragments,
            OuterOptimizer(lr, momentum),
        )
        for p in range(fragments)
    ]
    for t in range(1, steps + 1):
        local = [inner_step(w, t, local[w]) for w in range(workers)]
        for part in parts:
            # Send: the fragment's outer gradient from the local parameters now.
            if (t - part.offset) % H == 0:
                senders = [w for w in range(workers) if contributes(w, t)]
                if senders:
                    grad = mean_outer_gradient(
                        [global_params[i] for i in part.indices],
                        [[local[w][i] for i in part.indices] for w in senders],
                    )
                    part.in_flight.append((t + tau, grad))
            # Receive: tau steps later, the outer step and the merge.
            while part.in_flight and part.in_flight[0][0] == t:
                _, grad = part.in_flight.pop(0)
                fragment = part.optimizer.step([global_params[i] for i in part.indices], grad)
                for i, value in zip(part.indices, fragment, strict=True):
                    global_params[i] = value
                    for w in range(workers):
                        local[w][i] = alpha * local[w][i] + (1 - alpha) * value
    return global_params, local


def diloco(
    initial: Vector,
    workers: int,
    outer_steps: int,
    inner_step: InnerStep,
    H: int,
    lr: float = 0.7,
    momentum: float = 0.9,
) -> tuple[Vector, list[Vector]]:
    """Algorithm 1 of the DiLoCo paper, written as it is (not through
    ``streaming_diloco``): returns the global parameters and each worker's
    local ones after the last outer step (equal to the global ones)."""
    global_params = list(initial)
    optimizer = OuterOptimizer(lr, momentum)
    local = [list(initial) for _ in range(workers)]
    for outer in range(outer_steps):
        for w in range(workers):
            local[w] = list(global_params)
            for h in range(1, H + 1):
                local[w] = inner_step(w, outer * H + h, local[w])
        grad = mean_outer_gradient(global_params, local)
        global_params = optimizer.step(global_params, grad)
        local = [list(global_params) for _ in range(workers)]
    return global_params, local


@dataclass
class Snapshot:
    """After step t: the global parameters, each worker's local ones, and
    each fragment's momentum buffer (zeros before its first outer step)."""

    global_params: Vector
    local: list[Vector]
    momentum: Vector


def streaming_diloco_uneven(
    initial: Vector,
    steps: Sequence[int],
    inner_step: InnerStep,
    H: int,
    parts: Sequence[Sequence[int]],
    delay: int = 0,
    mix: float = 0.0,
    lr: float = 0.7,
    momentum: float = 0.9,
    nesterov: bool = True,
) -> tuple[dict[int, Snapshot], Snapshot]:
    """Streaming DiLoCo (fragment p: the indices ``parts[p]``, offset
    ``p * H // len(parts)``) where worker w takes ``steps[w]`` inner steps,
    then waits for the others, as the library's synchronization promises:

    - fragment p's exchange at step t takes the outer gradient of the
      workers that took an inner step since p's previous exchange, and the
      mean over them; with none, it is dropped;
    - its outer step and merge come ``delay`` steps later, at the start of
      that step's processing (before its exchanges);
    - the first exchange with no contributor ends the run (every worker is
      then past its last step); the exchanges still in flight take their
      outer steps in the order they were due.

    Returns the snapshot after each step t (keyed by t), and the final one.
    """
    workers = len(steps)
    global_params = list(initial)
    local = [list(initial) for _ in range(workers)]
    fragments = [
        Fragment(list(part), p * H // len(parts), OuterOptimizer(lr, momentum, nesterov))
        for p, part in enumerate(parts)
    ]
    last_send = [0] * len(fragments)
    last_step = [0] * workers

    def apply(part: Fragment, grad: Vector) -> None:
        values = part.optimizer.step([global_params[i] for i in part.indices], grad)
        for i, value in zip(part.indices, values, strict=True):
            global_params[i] = value
            for w in range(workers):
                local[w][i] = value if mix == 0 else mix * local[w][i] + (1 - mix) * value

    def snapshot() -> Snapshot:
        buffers = [0.0] * len(initial)
        for part in fragments:
            if part.optimizer.buffer is not None:
                for i, b in zip(part.indices, part.optimizer.buffer, strict=True):
                    buffers[i] = b
        return Snapshot(list(global_params), [list(x) for x in local], buffers)

    snapshots: dict[int, Snapshot] = {}
    t = 0
    while True:
        t += 1
        for w in range(workers):
            if t <= steps[w]:
                local[w] = inner_step(w, t, local[w])
                last_step[w] = t
        for part in fragments:
            while part.in_flight and part.in_flight[0][0] == t and delay > 0:
                apply(part, part.in_flight.pop(0)[1])
        nobody = False
        for p, part in enumerate(fragments):
            if (t - part.offset) % H != 0:
                continue
            senders = [w for w in range(workers) if last_step[w] > last_send[p]]
            last_send[p] = t
            if not senders:
                nobody = True
                continue
            grad = mean_outer_gradient(
                [global_params[i] for i in part.indices],
                [[local[w][i] for i in part.indices] for w in senders],
            )
            if delay == 0:
                apply(part, grad)
            else:
                part.in_flight.append((t + delay, grad))
        snapshots[t] = snapshot()
        if nobody:
            break
    pending = sorted(
        ((due, p, grad) for p, part in enumerate(fragments) for due, grad in part.in_flight),
        key=lambda entry: entry[:2],
    )
    for _, p, grad in pending:
        apply(fragments[p], grad)
    return snapshots, snapshot()
