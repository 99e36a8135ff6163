"""ElasticDiLoCo: DiLoCo and Streaming DiLoCo over a membership that changes.

NOTE [DiLoCo transactions]. DiLoCo's outer gradient is cumulative
(``global - local``): an exchange that never happens loses nothing, its
progress stays in each rank's local parameters and goes into the
fragment's next exchange. Elastic mode builds on that instead of redoing
calls (as ``ElasticEA`` does):

- a view change drops every exchange in flight, on every member (the new
  group cannot complete the old one's sums, and their count slots are laid
  out for the old world), as if it had never started;
- the call a failure surfaced in then completes on the new view without
  its failed exchanges (so the outer steps stay on their schedule);
- every member takes the source's (the furthest rank's) global parameters,
  outer momenta and counters, and brings each local fragment in line with
  the outer steps the source took: a fragment whose outer step the source
  took and this member did not (its wait failed) is merged from the new
  global parameters as the outer step would have merged it; one whose
  outer step this member took and the source did not is restored from the
  copy taken before that step (``ElasticPort.keep_premerge``). Members of
  a view are at most one exchange apart per fragment: its collectives run
  in the same order on every member, and none starts another after one
  failed. A member further behind was away (stalled, then back) while the
  job went on: its stale local fragment starts again from the global one,
  as a joiner's does.

A synchronization point (``synchronize_global``) that fails is redone on the
new view unless the source completed it (NOTE [Transactions] in
``_trainer``); its waiting loop goes on from the source's step. A lost
rank's local progress since its last exchange is lost; the global
parameters are not. A joiner takes the global parameters as its local ones,
and the source's buffers and inner optimizer state.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .._algorithms.member import ElasticPort
from ..diloco import DiLoCo, Settings, check_settings
from ..errors import CommunicationError
from ._trainer import _ElasticMember

__all__ = ["ElasticDiLoCo"]

logger = logging.getLogger(__name__)


class ElasticDiLoCo(_ElasticMember[DiLoCo]):
    """DiLoCo (and Streaming DiLoCo) over a job whose ranks may be lost and
    may join.

    Used like ``ElasticSGD`` (same control process, launch and arguments),
    with ``average_parameters()`` after each inner ``optimizer.step()`` and
    ``synchronize_global()`` or ``synchronize_parameters()`` as the
    synchronization points where joiners are added::

        diloco = ElasticDiLoCo("ctrl-host:29400", model, optimizer, world_size=4, tau=50)
        for step, (x, y) in enumerate(batches(diloco.rank, diloco.world_size)):
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            diloco.average_parameters()  # every tau-th call: an outer step
            if diloco.steps % 500 == 0:
                diloco.synchronize_global()  # joiners are added here

    When a rank is lost, the exchanges in flight are dropped on every
    survivor (their progress goes into the fragments' next exchanges), the
    call goes on, and the survivors keep the global parameters, the outer
    momenta and their own local parameters (NOTE [DiLoCo transactions] in
    the module). Costs one more copy of the parameters than ``DiLoCo``: each
    local fragment before its outer step.

    Args: as ``ElasticSGD``, with ``tau``, ``outer_lr``, ``momentum``,
    ``nesterov``, ``fragments``, ``delay``, ``mix``, ``comm_dtype`` and
    ``nonfinite`` passed to ``DiLoCo`` through ``**algorithm_options``.
    """

    # The DiLoCo state (global parameters, momenta, counters) the next
    # view's object starts from: this rank's own until a hand-over.
    _handed_state: dict[str, Any] | None = None
    # Each local fragment before its last outer step (ElasticPort.keep_premerge).
    _premerge: list[torch.Tensor] | None = None
    _settings: Settings  # checked by _check_options

    @property
    def global_parameters(self) -> dict[str, torch.Tensor]:
        """The global parameters, by parameter name (as ``DiLoCo.global_parameters``)."""
        return self._current().global_parameters

    @property
    def outer_steps(self) -> int:
        """Outer steps the current view's object took (fragment by fragment)."""
        return self._current().outer_steps

    def average_parameters(self) -> None:
        """Counts an inner step; runs the exchanges and outer steps due at it
        (see ``DiLoCo.average_parameters``). After a lost rank, the call
        completes on the new view without its failed exchanges (NOTE
        [DiLoCo transactions])."""
        self._past_sync = False
        self._call = "step"
        try:
            self._current().average_parameters(self._model)
        except CommunicationError:
            if self._change_view():
                return  # the source completed this call: its step count holds it
        self._step_done()

    def synchronize_global(self) -> None:
        """Every exchange completes and the global parameters hold every
        member's progress (``DiLoCo.synchronize_global``); then the ranks
        whose join was announced are added. A failure redoes it on the next
        view unless the view's source completed it."""
        self._synchronization_point(lambda: self._current().synchronize_global(self._model))

    def synchronize_parameters(self) -> None:
        """``synchronize_global``, then every member's parameters are set to
        the global parameters (before joiners are added: they start from
        the same). A failure redoes it on the next view unless the view's
        source completed it."""

        def synchronize() -> None:
            self._current().synchronize_global(self._model)
            self._take_global_parameters()

        self._synchronization_point(synchronize)
        # Where the source completed it, this member's call returned early.
        self._take_global_parameters()

    def _take_global_parameters(self) -> None:
        params: list[torch.Tensor] = list(self._model.parameters())
        with torch.no_grad():
            torch._foreach_copy_(params, list(self.global_parameters.values()))

    def _check_options(self, options: dict[str, Any]) -> None:
        if "group" in options:
            raise ValueError("elastic mode makes DiLoCo's group itself; do not pass group")
        self._settings = check_settings(**options)  # before anything connects

    def _make_algorithm(self) -> DiLoCo:
        algo = DiLoCo(timeout=self._timeout, **self._options)
        if self._handed_state is not None:
            algo.load_state_dict(self._handed_state)
        return algo

    def _bind_algorithm(self) -> None:
        # Bound now (the global parameters made from rank 0's, or taken from
        # the handed state), so that its state_dict() holds them at once.
        port = ElasticPort(self._current())
        port.bind(self._model)
        params: list[torch.Tensor] = list(self._model.parameters())
        if self._premerge is None or any(
            (b.shape, b.dtype, b.device, b.stride()) != (p.shape, p.dtype, p.device, p.stride())
            for b, p in zip(self._premerge, params, strict=True)
        ):
            self._premerge = [torch.empty_like(p) for p in params]
        port.keep_premerge(self._premerge)

    def _keep_state(self) -> None:
        if self._algo is not None:
            ElasticPort(self._algo).drop_exchanges()
            self._handed_state = self._algo.state_dict()

    def _diloco_state(self) -> dict[str, Any]:
        self._keep_state()
        assert self._handed_state is not None
        return self._handed_state

    def _state(self) -> dict[str, Any]:
        return {
            "steps": self._steps,
            "diloco": self._diloco_state(),
            "model": self._model.state_dict(),
            "optimizer": self._optimizer.state_dict() if self._optimizer else None,
        }

    def _load_state(self, state: dict[str, Any], had_state: bool) -> None:
        mine = self._handed_state if had_state else None
        source = state["diloco"]
        self._steps = state["steps"]
        self._handed_state = source
        algo = self._current()
        algo.load_state_dict(source)
        params: list[torch.Tensor] = list(self._model.parameters())
        globals_ = list(algo.global_parameters.values())
        if mine is None:
            # A joiner: the source's buffers and inner optimizer state, and
            # the global parameters as its local ones.
            self._model.load_state_dict(state["model"])
            if self._optimizer is not None and state["optimizer"] is not None:
                self._optimizer.load_state_dict(state["optimizer"])
            with torch.no_grad():
                torch._foreach_copy_(params, globals_)
            for residual in ElasticPort(algo).residuals():  # its own: none yet
                if residual is not None:
                    residual.zero_()
            return
        self._reconcile(mine["fragments"], source["fragments"], params, globals_)
        # The error feedback's residuals are each rank's own: kept (NOTE
        # [Residuals across views]).
        for own, fragment in zip(mine["fragments"], ElasticPort(algo).residuals(), strict=True):
            if fragment is not None and own.get("residual") is not None:
                fragment.copy_(own["residual"])

    def _reconcile(
        self,
        mine: list[dict[str, Any]],
        source: list[dict[str, Any]],
        params: list[torch.Tensor],
        globals_: list[torch.Tensor],
    ) -> None:
        """Brings each local fragment in line with the outer steps the
        source took (NOTE [DiLoCo transactions])."""
        port = ElasticPort(self._current())
        local_views = port.fragment_views(params)
        global_views = port.fragment_views(globals_)
        assert self._premerge is not None, "made at binding"
        premerge_views = port.fragment_views(self._premerge)
        mix = self._settings.mix
        with torch.no_grad():
            for p, (own, theirs) in enumerate(zip(mine, source, strict=True)):
                behind = theirs["merges"] - own["merges"]
                if behind != 0:
                    action = "restored" if behind < 0 else "merged" if behind == 1 else "reset"
                    logger.info(
                        "elastic: fragment %d took %d outer steps here, %d at the source: %s",
                        p, own["merges"], theirs["merges"], action,
                    )  # fmt: skip
                if behind > 0:
                    # More than one behind: this rank was away (stalled, then
                    # back) while the job went on; its local fragment is
                    # stale, and it starts again from the global one, as a
                    # joiner does.
                    if behind > 1 or mix == 0.0 or theirs["last_reset"]:
                        torch._foreach_copy_(local_views[p], global_views[p])
                    else:
                        for local, global_ in zip(local_views[p], global_views[p], strict=True):
                            local.mul_(mix).add_(global_, alpha=1.0 - mix)
                elif behind < 0:
                    torch._foreach_copy_(local_views[p], premerge_views[p])
