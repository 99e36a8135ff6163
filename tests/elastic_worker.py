"""One rank of an elastic job, for tests/test_elastic.py (run as a process).

    python tests/elastic_worker.py CONTROL OUT --algo sgd|ea|diloco --world N --stop FILE
        [--sync-every N] [--pause S] [--timeout S] [--die-in-view] [--wait-for FILE]
        [--device cpu|cuda] [--fragments P --delay D --mix A --sync-global]

Trains a small linear model on data drawn from this process's own seed and
the job's step count until the job's step count reaches the number the
test writes to the --stop file (the same for every rank, written well
ahead of all of them), and writes one JSON line per event to OUT: "view"
(after each membership change: rank, world size, steps, parameters, EA
center or DiLoCo's global parameters, logged as "center"), "step" (the
step's number; for SGD this rank's own gradient and the averaged one;
the algorithm objects of this rank still alive, with the garbage
collector off: a dropped view's object must go with its last
reference, buffers and all), "done" (final parameters and center).
``--die-in-view``: exits as soon as its first quorum is agreed, before it
has the job's state (a joiner lost during the change). ``--wait-for``:
joins only once FILE exists, so a test
can start a joiner early and have it join without the wait for imports.
``--device cuda``: the model and data on the GPU, every rank on the same
one, over gloo (NCCL refuses two ranks on one device).

``--fault ACTION@POINT:N:DELAY_MS`` (the fault-injection harness,
tests/test_elastic_faults.py): this rank kills (``kill``: SIGKILL) or
stalls (``stop``: SIGSTOP; the harness kills or continues it later) itself
``DELAY_MS`` after it enters the ``N``-th call at ``POINT``: ``step`` (the
step call), ``sync`` (the synchronization call), ``handover`` (the state
hand-over of a view change, counted from the first change after the start)
or ``view`` (a view agreed, before the group is made). Events "local"
(before the step call, SGD: this rank's own gradient) and "synced" (after
each synchronization: steps, parameters, center, view prefix) feed the
harness's invariants.

Under ``torchrun --max-restarts N``, a worker started again
(``TORCHELASTIC_RESTART_COUNT`` > 0) is a new rank: its fault is not armed
again, and it writes its events to OUT with ``+restartK`` before the
suffix (``r1.jsonl`` -> ``r1+restart1.jsonl``), so that each incarnation's
events stay apart.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import threading
import time
import weakref
from pathlib import Path

import torch

import distlearn_cuda.elastic as elastic
from distlearn_cuda.elastic import _membership, _trainer


class Fault:
    """One self-inflicted fault (see the module): armed at the N-th call at a point."""

    def __init__(self, spec: str | None) -> None:
        self.action, self.point, self.n, self.delay = None, None, -1, 0.0
        if spec:
            self.action, rest = spec.split("@")
            self.point, n, delay = rest.split(":")
            self.n, self.delay = int(n), float(delay) / 1000
        self.calls: dict[str, int] = {}

    def enter(self, point: str, emit) -> None:  # type: ignore[no-untyped-def]
        count = self.calls[point] = self.calls.get(point, 0) + 1
        if point != self.point or count != self.n:
            return
        signum = signal.SIGKILL if self.action == "kill" else signal.SIGSTOP

        def strike() -> None:
            emit("fault", action=self.action, point=point, n=count)
            os.kill(os.getpid(), signum)

        if self.delay <= 0:
            strike()
        else:
            threading.Timer(self.delay, strike).start()


def flat(tensors: object) -> list[float]:
    parts = [t.detach().reshape(-1).double() for t in tensors]  # type: ignore[attr-defined]
    return torch.cat(parts).tolist() if parts else []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("control")
    parser.add_argument("out")
    parser.add_argument("--algo", choices=("sgd", "ea", "diloco"), required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--stop", required=True)
    parser.add_argument("--sync-every", type=int, default=10)
    parser.add_argument("--pause", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--die-in-view", action="store_true")
    parser.add_argument("--wait-for", help="a file to wait for before joining (imports done)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--fault", help="ACTION@POINT:N:DELAY_MS (see the module)")
    parser.add_argument("--shape", type=int, default=5, help="the model's inputs (misbuilt: not 5)")
    parser.add_argument("--asynchronous", action="store_true", help="EA: rounds in flight")
    parser.add_argument("--fragments", type=int, default=1, help="DiLoCo")
    parser.add_argument("--delay", type=int, default=0, help="DiLoCo")
    parser.add_argument("--mix", type=float, default=0.0, help="DiLoCo")
    parser.add_argument("--compression", help="a low-bit format")
    parser.add_argument(
        "--sync-global", action="store_true", help="DiLoCo: synchronize_global, not _parameters"
    )
    args = parser.parse_args()
    # The library's view changes, timed, in the rank's log (read when a test fails).
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("distlearn_cuda.elastic").setLevel(logging.INFO)
    torch.set_num_threads(1)
    gc.disable()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart:
        out_path = Path(args.out)
        args.out = str(out_path.with_name(f"{out_path.stem}+restart{restart}{out_path.suffix}"))
        args.fault = None
    out = open(args.out, "a", buffering=1)

    def emit(event: str, **fields: object) -> None:
        out.write(json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields}))
        out.write("\n")

    if args.die_in_view:
        agree = _membership.Membership.agree

        def agree_then_die(self: _membership.Membership, **kwargs: object) -> object:
            view = agree(self, **kwargs)
            emit("dying", world=view.world_size)
            os._exit(3)

        _membership.Membership.agree = agree_then_die

    fault = Fault(args.fault)
    started = {"done": False}  # view and hand-over faults count from the first change after it
    if fault.point == "view":
        agree_first = _membership.Membership.agree

        def agree_and_fault(self: _membership.Membership, **kwargs: object) -> object:
            view = agree_first(self, **kwargs)
            if started["done"]:
                fault.enter("view", emit)
            return view

        _membership.Membership.agree = agree_and_fault
    if fault.point == "handover":
        hand_over = _trainer._ElasticMember._hand_over_state

        def hand_over_and_fault(self: _trainer._ElasticMember) -> bool:
            if started["done"]:
                fault.enter("handover", emit)
            return hand_over(self)

        _trainer._ElasticMember._hand_over_state = hand_over_and_fault  # type: ignore[method-assign]

    torch.manual_seed(0)
    model = torch.nn.Linear(args.shape, 3).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    epoch = {"value": 0}
    holder: dict[str, object] = {}

    def center_of(obj: object) -> list[float] | None:
        """EA's center, DiLoCo's global parameters; None for SGD."""
        if args.algo == "ea":
            return flat(obj.center.values())  # type: ignore[attr-defined]
        if args.algo == "diloco":
            return flat(obj.global_parameters.values())  # type: ignore[attr-defined]
        return None

    def on_change(view: elastic.View) -> None:
        obj = holder.get("obj")
        emit(
            "view",
            rank=view.rank,
            world=view.world_size,
            prefix=view.prefix,
            params=flat(model.parameters()),
            steps=None if obj is None else obj.steps,
            center=None if obj is None else center_of(obj),
        )

    while args.wait_for and not Path(args.wait_for).exists():
        time.sleep(0.02)
    kind = {"sgd": elastic.ElasticSGD, "ea": elastic.ElasticEA, "diloco": elastic.ElasticDiLoCo}[
        args.algo
    ]
    options: dict[str, object] = {"compression": args.compression}
    if args.algo == "ea":  # AllReduceEA's rounds are asynchronous unless told
        options |= {"tau": 2, "beta": 0.9, "asynchronous": args.asynchronous}
    if args.algo == "diloco":  # tests/test_elastic_faults.py's DILOCO settings
        options |= {
            "tau": 3, "outer_lr": 0.5, "momentum": 0.5, "nesterov": True,
            "fragments": args.fragments, "delay": args.delay, "mix": args.mix,
        }  # fmt: skip
    obj = kind(
        args.control,
        model,
        optimizer,
        world_size=args.world,
        timeout=args.timeout,
        join_wait=60,
        on_change=on_change,
        extra_state=(lambda: dict(epoch), epoch.update),
        backend="gloo",
        **options,
    )
    holder["obj"] = obj
    started["done"] = True

    def emit_state(event: str) -> None:
        emit(
            event,
            rank=obj.rank,
            world=obj.world_size,
            steps=obj.steps,
            epoch=epoch["value"],
            params=flat(model.parameters()),
            center=center_of(obj),
        )

    algorithms: list[weakref.ref] = []

    def alive_algorithms() -> int:
        if not any(r() is obj._algo for r in algorithms):
            algorithms.append(weakref.ref(obj._algo))
        return sum(r() is not None for r in algorithms)

    def emit_step(prefix_before: str, **fields: object) -> None:
        """An EA or DiLoCo call's "step" event (the call counted already)."""
        emit(
            "step",
            steps=obj.steps - 1,
            world=obj.world_size,
            rank=obj.rank,
            alive=alive_algorithms(),
            prefix=obj.view.prefix,
            prefix_before=prefix_before,
            **fields,
        )

    emit_state("started")
    stop = Path(args.stop)
    # The file appears whole (elastic_job.Job.finish renames it into place).
    while not (stop.exists() and obj.steps >= int(stop.read_text())):
        generator = torch.Generator().manual_seed(os.getpid() * 100_003 + obj.steps)
        x = torch.randn(16, args.shape, generator=generator).to(args.device)
        y = torch.randn(16, 3, generator=generator).to(args.device)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if args.algo == "sgd":
            local = flat(p.grad for p in model.parameters())
            step = obj.steps
            emit("local", steps=step, prefix=obj.view.prefix, local=local)
            fault.enter("step", emit)
            obj.sum_and_normalize_gradients()
            emit(
                "step",
                steps=step,
                world=obj.world_size,
                rank=obj.rank,
                prefix=obj.view.prefix,
                skipped=obj.last_step_skipped,
                alive=alive_algorithms(),
                local=local,
                mean=flat(p.grad for p in model.parameters()),
            )
            if not obj.last_step_skipped:
                optimizer.step()
        elif args.algo == "diloco":
            optimizer.step()
            # What the outer step starts from, for the harness's float64
            # reference (synchronous exchanges only: state_dict() would wait
            # for an exchange in flight).
            synchronous = args.fragments == 1 and args.delay == 0
            state = obj._algo.state_dict() if synchronous else {"globals": [], "momenta": []}
            before, prefix_before = flat(model.parameters()), obj.view.prefix
            outer_before = obj.outer_steps
            fault.enter("step", emit)
            obj.average_parameters()
            emit_step(
                prefix_before,
                # An outer step in this call, on the view it began in.
                round=prefix_before == obj.view.prefix and obj.outer_steps > outer_before,
                before=before,
                center_before=flat(state["globals"]),
                momenta_before=flat(state["momenta"]),
                params=flat(model.parameters()),
                center=center_of(obj),
                momenta=flat(obj._algo.state_dict()["momenta"] if synchronous else []),
            )
        else:
            optimizer.step()
            # What the round starts from, for the harness's float64 reference.
            before = flat(model.parameters())
            center_before = flat(obj.center.values())
            prefix_before = obj.view.prefix
            is_round = obj._algo.next_call_is_round
            fault.enter("step", emit)
            obj.average_parameters()
            emit_step(
                prefix_before,
                round=is_round,
                before=before,
                center_before=center_before,
                params=flat(model.parameters()),
                center=flat(obj.center.values()),
            )
        optimizer.zero_grad()
        time.sleep(args.pause)
        if obj.steps % args.sync_every == 0:
            # Counted before the synchronization, as the examples do: a joiner
            # admitted there starts with it (see NOTE [Extra state readings]).
            epoch["value"] += 1
            fault.enter("sync", emit)
            if args.algo == "sgd":
                obj.synchronize_parameters()
            elif args.algo == "ea":
                obj.synchronize_center()
            elif args.sync_global:
                obj.synchronize_global()
            else:
                obj.synchronize_parameters()
            emit(
                "synced",
                steps=obj.steps,
                epoch=epoch["value"],
                prefix=obj.view.prefix,
                world=obj.world_size,
                params=flat(model.parameters()),
                center=center_of(obj),
            )
    emit_state("done")
    obj.close()


if __name__ == "__main__":
    main()
