"""Runs a matrix scenario on one rank, as a user's training loop would, and
logs what went in and what came out for ``matrix_reference`` to judge.

The gradients a rank computed are logged from ``torch.autograd.grad`` on
the step's loss (fresh tensors, independent of what ``.grad`` held before
backward), with the scenario's injections (a NaN) applied to both, so a
library that leaves something behind in ``.grad`` shows up as a wrong mean.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from matrix_scenario import EaScenario, MatrixNet, SgdScenario, batch
from torch import nn

import distlearn_cuda as dl

TIMEOUT = datetime.timedelta(seconds=12)  # below the pool's deadline for a scenario
LONE_TIMEOUT = datetime.timedelta(seconds=1)  # an object one rank makes alone
DTYPES = {None: None, "bfloat16": torch.bfloat16}


def _outcome(error: BaseException | None) -> tuple[str, str]:
    if error is None:
        return ("ok", "")
    return (type(error).__name__, str(error))


def _clone(named: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    return {n: (t.detach().clone() if t is not None else None) for n, t in named.items()}


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return _clone({n: p.grad for n, p in model.named_parameters()})


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@contextlib.contextmanager
def _without_numpy(off: bool) -> Iterator[None]:
    """torch as installed without numpy: ``Tensor.numpy`` raises as it does there."""
    if not off:
        yield
        return

    def no_numpy(*_: Any, **__: Any) -> Any:
        raise RuntimeError("Numpy is not available")

    saved = torch.Tensor.numpy
    torch.Tensor.numpy = no_numpy  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.numpy = saved  # type: ignore[method-assign]


def _lone_object(scenario: SgdScenario | EaScenario, rank: int) -> tuple[str, str] | None:
    """An object this rank makes alone (a bug in a user's script) while the
    others do something else (here: wait in a barrier of the default group
    until it gave up): it must fail here and leave the later objects of
    every rank working."""
    if scenario.extra_object is None:
        return None
    outcome = None
    if scenario.extra_object == rank:
        try:
            if scenario.algo == "sgd":
                dl.AllReduceSGD(timeout=LONE_TIMEOUT)
            else:
                dl.AllReduceEA(timeout=LONE_TIMEOUT)
            outcome = ("ok", "")
        except Exception as error:
            outcome = _outcome(error)
    dist.barrier()
    return outcome


def run(rank: int, world_size: int, scenario: SgdScenario | EaScenario) -> dict[str, Any]:
    """The scenario on this rank; returns its log (never raises)."""
    log: dict[str, Any] = {"rank": rank}
    try:
        with _without_numpy(scenario.numpy_off):
            log["lone"] = _lone_object(scenario, rank)
            if isinstance(scenario, SgdScenario):
                _run_sgd(rank, scenario, log)
            else:
                _run_ea(rank, scenario, log)
    except Exception:
        log["crash"] = traceback.format_exc()
    return log


# -- AllReduceSGD ------------------------------------------------------------------


def _model(scenario: SgdScenario | EaScenario, rank: int) -> MatrixNet:
    torch.manual_seed(scenario.seed)  # the same weights on every rank
    model = MatrixNet(getattr(scenario, "tied", False), getattr(scenario, "frozen_gate", True))
    if rank in getattr(scenario, "channels_last", ()):
        model.conv.to(memory_format=torch.channels_last)
    return model


def _loss(model: MatrixNet, scenario: Any, rank: int, epoch: int, step: int, skip: set[str]) -> Any:
    tokens, image, targets = batch(scenario.seed, rank, epoch, step)
    if rank in getattr(scenario, "channels_last", ()):
        image = image.to(memory_format=torch.channels_last)
    return nn.functional.cross_entropy(model(tokens, image, skip), targets)


def _grads_argument(scenario: SgdScenario, model: nn.Module) -> Any:
    if scenario.form == "module":
        return model
    if scenario.form == "params":
        return list(model.parameters())
    return [p.grad for p in model.parameters() if p.requires_grad]


def _run_sgd(rank: int, scenario: SgdScenario, log: dict[str, Any]) -> None:
    model = _model(scenario, rank)
    comm_dtype = DTYPES[scenario.comm_dtype]
    allow_unused = scenario.allow_unused
    if scenario.settings_mismatch and rank == 1:
        allow_unused = not allow_unused
    try:
        sgd = dl.AllReduceSGD(
            comm_dtype=comm_dtype,
            allow_unused=allow_unused,
            timeout=TIMEOUT,
            compression=scenario.compression,  # type: ignore[arg-type]
        )
    except Exception as error:
        log["construct"] = _outcome(error)
        return
    log["construct"] = ("ok", "")
    sgd._reducer.defer_reads = scenario.defer
    twin = None
    if scenario.twin:
        # Item 4: with every gradient present, allow_unused and the default
        # path give bitwise the same sums (a model copy holds the same grads).
        twin = (
            dl.AllReduceSGD(
                comm_dtype=comm_dtype,
                allow_unused=not allow_unused,
                timeout=TIMEOUT,
                compression=scenario.compression,  # type: ignore[arg-type]
            ),
            copy.deepcopy(model),
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    set_to_none = not scenario.in_place
    try:
        if scenario.mode.startswith("attach"):
            sgd.attach(
                model,
                bucket_mb=0.0005,
                first_bucket_mb=0.0002,
                gradient_as_bucket_view=scenario.mode == "attach_views",
            )
        elif scenario.mode == "flat":
            sgd.use_flat_storage(model)
        log["mode"] = ("ok", "")
    except Exception as error:
        log["mode"] = _outcome(error)
        return
    steps_log: list[dict[str, Any]] = []
    syncs: list[dict[str, Any]] = []
    log["steps"], log["syncs"] = steps_log, syncs
    if not _sync(sgd, model, optimizer, scheduler, syncs, epoch=-1):
        return
    for epoch, steps in enumerate(scenario.epochs):
        for step in range(steps[rank]):
            record = _sgd_step(sgd, twin, model, scenario, rank, epoch, step)
            steps_log.append(record)
            if record["outcome"][0] not in ("ok", "FloatingPointError"):
                return
            if record["outcome"][0] == "ok":
                optimizer.step()
            optimizer.zero_grad(set_to_none=set_to_none)
            scheduler.step()
        if not _sync(sgd, model, optimizer, scheduler, syncs, epoch):
            return
    sgd.close()


def _sgd_step(
    sgd: dl.AllReduceSGD,
    twin: tuple[dl.AllReduceSGD, MatrixNet] | None,
    model: MatrixNet,
    scenario: SgdScenario,
    rank: int,
    epoch: int,
    step: int,
) -> dict[str, Any]:
    for at_epoch, at_step, kind, layer, ranks in scenario.events:
        if (at_epoch, at_step) == (epoch, step) and rank in ranks:
            getattr(model, layer).requires_grad_(kind == "unfreeze")
    skip = {layer for e, r, s, layer in scenario.skips if (e, r, s) == (epoch, rank, step)}
    reorder = (epoch, rank, step) in scenario.reorders and model.conv.weight.requires_grad
    if reorder and scenario.mode.startswith("attach"):
        # Attached, backward's hooks pack the gradients: a gradient in
        # another layout is one backward accumulates into (set before it).
        model.conv.weight.grad = _other_layout(torch.zeros_like(model.conv.weight))
    nan = None
    if (epoch, rank, step) in scenario.nans:
        # A NaN in the output layer's gradient as backward makes it (attached,
        # its hook packs it during backward), seen by the logged copy too.
        nan = model.head.weight.register_hook(_with_nan)
    loss = _loss(model, scenario, rank, epoch, step, skip)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fresh = torch.autograd.grad(
        loss, [p for _, p in trainable], retain_graph=True, allow_unused=True
    )
    try:
        loss.backward()  # attached: may settle the last step's agreement (and raise)
    except Exception as raised:
        return {"epoch": epoch, "step": step, "local": {}, "outcome": _outcome(raised), "after": {}}
    finally:
        if nan is not None:
            nan.remove()
    local: dict[str, torch.Tensor | None] = {}
    for (name, param), grad in zip(trainable, fresh, strict=True):
        if grad is None and param.grad is not None:
            grad = torch.zeros_like(param)  # in place: a skipped layer's view, zeroed
        local[name] = grad.detach().clone() if grad is not None else None
    if reorder and not scenario.mode.startswith("attach") and model.conv.weight.grad is not None:
        # The same values, another layout (a gradient assigned by hand).
        model.conv.weight.grad = _other_layout(model.conv.weight.grad)
    normalize, nonfinite = True, scenario.nonfinite
    if scenario.mismatch is not None and scenario.mismatch[:3] == (epoch, rank, step):
        normalize, nonfinite = scenario.mismatch[3], scenario.mismatch[4]
    call = sgd.sum_and_normalize_gradients if normalize else sgd.sum_gradients
    twin_ready = twin is not None and all(g is not None for g in local.values())
    if twin_ready:
        assert twin is not None
        for param, copied in zip(model.parameters(), twin[1].parameters(), strict=True):
            copied.requires_grad_(param.requires_grad)
            copied.grad = param.grad.clone() if param.grad is not None else None
    error = None
    try:
        call(_grads_argument(scenario, model), nonfinite=nonfinite)
    except Exception as raised:
        error = raised
    record: dict[str, Any] = {
        "epoch": epoch,
        "step": step,
        "local": local,
        "outcome": _outcome(error),
        "after": _grads(model),
        "skipped": sgd.last_step_skipped if error is None else None,
    }
    if twin is not None and twin_ready and error is None:
        other, copied = twin
        twin_call = other.sum_and_normalize_gradients if normalize else other.sum_gradients
        try:
            twin_call(copied, nonfinite=nonfinite)
            record["twin"] = _grads(copied)
        except Exception as raised:
            record["twin"] = _outcome(raised)
    return record


def _with_nan(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad[(0,) * grad.dim()] = float("nan")
    return grad


def _other_layout(tensor: torch.Tensor) -> torch.Tensor:
    fmt = torch.contiguous_format if not tensor.is_contiguous() else torch.channels_last
    return tensor.clone(memory_format=fmt)


def _sync(
    sgd: dl.AllReduceSGD,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    syncs: list[dict[str, Any]],
    epoch: int,
) -> bool:
    record: dict[str, Any] = {
        "epoch": epoch,
        "params": _params(model),
        "grads": _grads(model),
        "optimizer": _clone_state(optimizer.state_dict()),
        "scheduler": dict(scheduler.state_dict()),
        "steps": sgd.steps,
    }
    error = None
    try:
        sgd.synchronize_parameters(model, optimizer=optimizer, buffers=True, state=[scheduler])
    except Exception as raised:
        error = raised
    record["outcome"] = _outcome(error)
    record["params_after"] = _params(model)
    record["grads_after"] = _grads(model)
    record["optimizer_after"] = _clone_state(optimizer.state_dict())
    record["scheduler_after"] = dict(scheduler.state_dict())
    syncs.append(record)
    return error is None


def _clone_state(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_state(v) for v in value)
    return value


# -- AllReduceEA ---------------------------------------------------------------------


def _low_bit_state(ea: dl.AllReduceEA, scenario: EaScenario) -> dict[str, Any]:
    """With compression: the center and this rank's residual as the object
    holds them now (read without completing a round in flight: after the
    round a call started when synchronous, after the one before when
    asynchronous), so the reference checks each round's low-bit sum from
    where the last one left off instead of from its own float64 run."""
    if scenario.compression is None:
        return {}
    feedback = ea._feedback
    residual = feedback.residual if feedback is not None else None
    return {
        "center_now": [c.detach().clone() for c in ea._centers],
        "residual_now": residual.clone() if residual is not None else None,
    }


def _run_ea(rank: int, scenario: EaScenario, log: dict[str, Any]) -> None:
    model = _model(scenario, rank)
    kind, value = scenario.rate
    nonfinite = scenario.nonfinite
    if scenario.settings_mismatch and rank == 1:
        nonfinite = "raise" if nonfinite != "raise" else "skip"
    try:
        ea = dl.AllReduceEA(
            tau=scenario.tau,
            **{kind: value},
            nonfinite=nonfinite,
            asynchronous=scenario.asynchronous,
            comm_dtype=DTYPES[scenario.comm_dtype],
            timeout=TIMEOUT,
            compression=scenario.compression,  # type: ignore[arg-type]
            error_feedback=scenario.error_feedback,
        )
    except Exception as error:
        log["construct"] = _outcome(error)
        return
    log["construct"] = ("ok", "")
    params: Any = model if scenario.form == "module" else list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    steps_log: list[dict[str, Any]] = []
    syncs: list[dict[str, Any]] = []
    log["steps"], log["syncs"] = steps_log, syncs
    try:
        ea.synchronize_parameters(params)
        log["start"] = ("ok", "")
    except Exception as error:
        log["start"] = _outcome(error)
        return
    log["start_params"] = _params(model)
    for epoch, steps in enumerate(scenario.epochs):
        for step in range(steps[rank]):
            model.zero_grad(set_to_none=True)
            _loss(model, scenario, rank, epoch, step, set()).backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.sub_(0.1 * p.grad)
                if (epoch, rank, step) in scenario.nans:
                    model.lin1.weight[0, 0] = float("nan")
            before = _params(model)
            error = None
            try:
                ea.average_parameters(params)
            except Exception as raised:
                error = raised
            steps_log.append(
                {
                    "epoch": epoch,
                    "step": step,
                    "before": before,
                    "after": _params(model),
                    "outcome": _outcome(error),
                    "rejoined": ea.last_round_rejoined,
                    **_low_bit_state(ea, scenario),
                }
            )
            if error is not None:
                return
        error = None
        record: dict[str, Any] = {"epoch": epoch, "params": _params(model)}
        try:
            ea.synchronize_center(params)
        except Exception as raised:
            error = raised
        record["outcome"] = _outcome(error)
        record["params_after"] = _params(model)
        record.update(_low_bit_state(ea, scenario))
        center = ea.center
        record["center"] = (
            {n: c.clone() for n, c in center.items()}
            if isinstance(center, dict)
            else {n: c.clone() for n, c in zip(names, center, strict=True)}
        )
        syncs.append(record)
        if error is not None:
            return
    ea.close()
