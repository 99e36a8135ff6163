"""ElasticSGD and ElasticEA: the algorithms over a membership that changes.

Each view of the job (see ``_membership``) gets torch's default process group
anew (gloo for CPU tensors, NCCL for CUDA ones unless ``backend="gloo"``, on
the control store under the view's prefix) and a new algorithm object on it,
whose first CUDA collective makes the view's own NCCL communicator (its
unique id broadcast over the view's gloo group, its init bounded); the
previous ones are closed and destroyed first. When the new view only lost
ranks, its communicator is shrunk from the last view's instead (see
``_shrink``: the last view's communicators are set aside when it is dropped,
and closed once the new view is made). A normal step is the algorithm's own
call and nothing else: the control process is consulted only when a
collective fails (a ``CommunicationError``) or, at a synchronization point,
when a join was announced.

Changing views. Every member of the new view (survivors and joiners) tells
the others how far it got; the source is the lowest rank among those that
got furthest (never a rank that joined with no state), and one broadcast
gives everyone its state: the model's parameters and buffers and the
optimizer's state (SGD, and EA joiners), the EA center and step counter, and
what the user registered (``extra_state``). Before that, the members
compare their models' structures: a joiner built with another model is
refused (ValueError there, naming the first difference) and the others
change views again without it. Failures while changing (a rank lost during
the change, a joiner that dies before it has the state) start the change
again, at most ``retries`` times, each step bounded.

NOTE [Transactions]. A step, a synchronization point and an EA round either
complete on every member of a view or are redone whole on the next one.
How far a rank got is (synchronization points completed, steps completed),
compared in that order: after a failure, a rank that is behind the view's
source takes its state, and with it the step or synchronization point it
failed in, which the source completed; the others redo it on the new view.
A rank that took the state of a job that had completed the synchronization
point at its step count (a rank that failed in the step before it, or a
stalled one that joined again there) returns from its own call to that
point at once: its peers are past it.
So no rank leaves a synchronization point that a peer is still in (the peer
would otherwise meet the rank's next steps there, as the uneven-steps rule
of ``AllReduceSGD.synchronize_parameters`` has it, and the two drift a
synchronization interval apart). An EA round that fails is rolled back
before it is redone: the parameters to what the round started from, the
step counter to the call's start (the center never absorbs a failed round).
An asynchronous round completes after the call that launched it (at the
next round, a synchronization, or when the state is read), so whether its
sum reached the center is told apart from the call: every member keeps the
step count of the last round in its center, the source hands its own over,
and each member undoes every blend of a later round (whichever call the
failure surfaced in, a synchronization point's included).

NOTE [Residuals across views]. With compression, a rank's error-feedback
residual is its own (what its own quantizations lost), like its parameters
under EA: never handed over, carried by the rank from view to view, zeros
for a joiner. A failed sum leaves it as it was (no state absorbs a failed
collective), so a step or round redone on the next view adds it once. One
imprecision is left, bounded: a rank that failed in a sum which completed
at the view's source (the rank is behind and takes the source's state)
keeps the residual from before that sum, which the sum already carried: it
is sent again and that sum's quantization error is dropped, a one-time
error of at most a quantization step per value.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar, get_args

import torch
import torch.distributed as dist
from torch import nn

from .._algorithms.member import ElasticPort, GroupMember
from .._comm import nccl as _nccl
from .._comm.gloo import restart_numbering
from .._tensors.validate import check_timeout
from ..ea import AllReduceEA
from ..errors import CommunicationError
from ..sgd import AllReduceSGD
from ._keys import missing_secret_message, read_secret
from ._membership import Membership, View, parse_address
from ._shrink import Parent, shrink_into

__all__ = ["ElasticEA", "ElasticSGD"]

logger = logging.getLogger(__name__)

# The collective deadline: a lost or stalled rank is noticed within it.
DEFAULT_ELASTIC_TIMEOUT = datetime.timedelta(seconds=30)
# What joining a view may take beyond the collective deadline: the Lighthouse
# waits up to its heartbeat or join timeout (seconds) for a lost rank.
DEFAULT_JOIN_WAIT = datetime.timedelta(minutes=10)
Backend = Literal["nccl", "gloo"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
# How far a rank got, as one int (see NOTE [Transactions]): synchronization
# points weigh more than any count of steps.
SYNC_WEIGHT = 1 << 40


class _MisbuiltPeer(RuntimeError):
    """Some member's model is not the job's: the view is changed again without it."""


def structure_of(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[str]:
    """What must match across the members for the state to be handed over:
    every state entry's name, dtype and shape, and the optimizer's groups'
    sizes."""
    entries = [
        f"{name}: {value.dtype} {tuple(value.shape)}"
        for name, value in model.state_dict().items()
        if isinstance(value, torch.Tensor)
    ]
    if optimizer is not None:
        sizes = [len(group["params"]) for group in optimizer.param_groups]
        entries.append(f"optimizer {type(optimizer).__name__}, param groups of sizes {sizes}")
    return entries


def first_difference(mine: list[str], reference: list[str]) -> str:
    """The first entry where ``mine`` differs from ``reference``, in words."""
    for index, (got, want) in enumerate(zip(mine, reference, strict=False)):
        if got != want:
            return f"entry {index} is '{got}', the job's is '{want}'"
    if len(mine) != len(reference):
        return f"{len(mine)} state entries, the job's model has {len(reference)}"
    return "no difference"


def _check_backend(backend: str | None) -> str:
    """The views' backend: "nccl" (CUDA tensors over NCCL, CPU ones over
    gloo) or "gloo" (every tensor over gloo); None picks "nccl" where torch
    has CUDA and NCCL."""
    if backend is None:
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be 'nccl', 'gloo' or None, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise ValueError("backend='nccl' needs CUDA and a torch built with NCCL")
    return backend


def _to_cpu(value: Any) -> Any:
    """``value`` with every tensor moved to the CPU (for one pickled broadcast)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def init_view_group(
    backend: str, store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta
) -> None:
    """torch's default group for a view, named the same on every member.

    torch names a default group by a counter it resets only when a default
    group is destroyed, and counts a group whose rendezvous failed: a rank
    whose earlier try failed there would name this one "1" while a peer
    whose try failed later (in a collective) names it "0", and their
    rendezvous keys never meet again. Each view's store prefix is new, so
    "0" is always free."""
    dist.distributed_c10d._world.group_count = 0
    # No device_id: torch would make its own NCCL communicator at once, a
    # second one per view that the extension's collectives never use.
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


_Algorithm = TypeVar("_Algorithm", bound=GroupMember)


class _ElasticMember(Generic[_Algorithm]):
    """What both algorithms share: the membership, the views and their groups,
    the state handed over at each change."""

    def __init__(
        self,
        control: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        world_size: int = 1,
        timeout: float | datetime.timedelta = DEFAULT_ELASTIC_TIMEOUT,
        join_wait: float | datetime.timedelta = DEFAULT_JOIN_WAIT,
        retries: int = 3,
        heartbeat_interval: float = 0.5,
        backend: Backend | None = None,
        on_change: Callable[[View], None] | None = None,
        extra_state: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
        **algorithm_options: Any,
    ) -> None:
        parse_address(control)  # TypeError/ValueError naming it
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not isinstance(heartbeat_interval, (int, float)) or not heartbeat_interval > 0:
            raise ValueError(f"heartbeat_interval must be seconds > 0, got {heartbeat_interval!r}")
        if on_change is not None and not callable(on_change):
            raise TypeError("on_change must be callable or None")
        if extra_state is not None and not (
            isinstance(extra_state, tuple)
            and len(extra_state) == 2
            and all(callable(f) for f in extra_state)
        ):
            raise TypeError("extra_state must be None or a (get, load) pair of callables")
        self._backend = _check_backend(backend)
        self._timeout = check_timeout(timeout)
        self._join_wait = check_timeout(join_wait)
        self._check_options(algorithm_options)
        self._options = algorithm_options  # for each view's algorithm object
        self._model = model
        self._optimizer = optimizer
        self._retries = retries
        self._on_change = on_change
        self._extra_state = extra_state
        if dist.is_initialized():
            raise RuntimeError(
                "elastic mode makes torch's default process group for each membership view: "
                "do not initialize it (dist.init_process_group) in an elastic job"
            )
        local_world = os.environ.get("LOCAL_WORLD_SIZE", "1")
        if local_world.isdigit() and int(local_world) > 1:
            raise ValueError(
                f"elastic mode runs one process per launcher: torchrun started "
                f"{local_world} processes here (LOCAL_WORLD_SIZE), and restarts all of them "
                f"when any fails, which elastic mode exists to avoid; start each rank with "
                f"`torchrun --nproc_per_node 1` (or as a plain process)"
            )
        secret = read_secret()
        if secret is None:
            raise ValueError(missing_secret_message())
        self._membership = Membership(
            control,
            secret,
            heartbeat_interval=float(heartbeat_interval),
            connect_timeout=self._timeout,
        )
        self._algo: _Algorithm | None = None
        self._steps = 0  # steps the job took, as this rank knows them (handed over)
        self._syncs = 0  # synchronization points the job completed (handed over)
        self._synced_at = -1  # the step count at the last one (handed over)
        # This rank took, in a change, the state of a job that had completed
        # the synchronization point at this step count: its own call to it is
        # then done (NOTE [Transactions]). Cleared by the next step.
        self._past_sync = False
        # NOTE [Extra state readings]. extra_state's get() is read when this
        # rank completes a step and a synchronization point; a member that
        # takes the source's state takes the reading that matches where it
        # is: behind in a step, the source's reading after its last step
        # (the member then runs its own code after that step, as the source
        # did); behind in a synchronization point, or a joiner (whose loop
        # starts after one), the reading after the last synchronization. A
        # member as far as the source keeps its own: it holds the same.
        self._extra_after_step: Any = None
        self._extra_after_sync: Any = None
        self._call = "start"  # where this rank is: "start", "step" or "sync"
        self._view: View | None = None
        self._has_state = False  # False until this rank holds the job's state
        self._joins_handled = 0
        self._closed = False
        self._parent: Parent | None = None  # the dropped view's NCCL communicators
        try:
            # A new rank waits for the initial world; one arriving later joins.
            if self._membership.find_job():
                self._change_view(join=True)
            else:
                self._change_view(min_size=world_size, newcomer=True)
        except BaseException:
            self._membership.close()  # no heartbeats from a rank that never joined
            raise

    # -- what the user reads ------------------------------------------------

    @property
    def view(self) -> View:
        """The current membership view."""
        assert self._view is not None
        return self._view

    @property
    def rank(self) -> int:
        """This process's rank in the current view."""
        return self.view.rank

    @property
    def world_size(self) -> int:
        """Number of ranks in the current view."""
        return self.view.world_size

    @property
    def steps(self) -> int:
        """Steps the job took (completed gradient averagings for SGD,
        ``average_parameters`` calls for EA), as this rank knows them: a
        joiner starts from the furthest rank's count. Schedule
        synchronization points on it, so joiners keep to them."""
        return self._steps

    @property
    def group(self) -> dist.ProcessGroup:
        """The current view's process group (torch's default group)."""
        return self._current().group

    def close(self) -> None:
        """Leaves the job: closes the algorithm object and the view's group and
        stops the heartbeats (the others continue without this rank after
        their next failed collective). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._drop_view(keep_parent=False)  # its communicators close as usual
        self._discard_parent()
        self._membership.close()

    def __enter__(self) -> _ElasticMember:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- views ----------------------------------------------------------------

    def _current(self) -> _Algorithm:
        if self._closed or self._algo is None:
            raise RuntimeError("this elastic object was closed")
        return self._algo

    def _progress(self) -> int:
        """How far this rank got (larger is further; NOTE [Transactions]);
        only ranks with state count."""
        return self._syncs * SYNC_WEIGHT + self._steps

    def _make_algorithm(self) -> _Algorithm:
        raise NotImplementedError

    def _check_options(self, options: dict[str, Any]) -> None:
        """ValueError for an algorithm option elastic mode cannot keep."""

    def _state(self) -> dict[str, Any]:
        """What the source hands over."""
        raise NotImplementedError

    def _load_state(self, state: dict[str, Any], had_state: bool) -> None:
        raise NotImplementedError

    def _keep_state(self) -> None:
        """Saves what the next view's algorithm object must start from."""

    def _drop_view(self, keep_parent: bool = True) -> None:
        """Closes the algorithm object and destroys the view's group. Neither
        waits on a lost peer: the failed collective already returned, and
        close() bounds what is still in flight by the deadline. With
        ``keep_parent``, the view's NCCL communicators are set aside for the
        next view (see ``_keep_parent``)."""
        if self._algo is not None:
            self._keep_state()
            if keep_parent:
                self._keep_parent()  # before close(), whose leases would close them
            self._algo.close()
            self._algo = None
        if dist.is_initialized():
            dist.destroy_process_group()

    def _keep_parent(self) -> None:
        """Takes the view's NCCL communicators out of the registry, for the
        next view to shrink (see ``_shrink``)."""
        if self._backend != "nccl" or not dist.is_initialized() or self._view is None:
            return
        self._discard_parent()  # an older one: the next view is not shrunk from it
        self._parent = Parent(self._view.members, _nccl.detach(dist.group.WORLD))

    def _discard_parent(self) -> None:
        parent, self._parent = self._parent, None
        if parent is not None:
            parent.discard()

    def _install(self, view: View) -> None:
        """The view's group (torch's default group) and algorithm object."""
        self._drop_view()
        store = dist.PrefixStore(view.prefix, self._membership.store)
        init_view_group(
            "cpu:gloo,cuda:nccl" if self._backend == "nccl" else "gloo",
            store,
            view.rank,
            view.world_size,
            self._timeout,
        )
        assert dist.group.WORLD is not None, "initialized just now"
        restart_numbering(dist.group.WORLD)
        self._algo = self._make_algorithm()
        self._check_structures()
        self._bind_algorithm()
        if self._backend == "nccl":
            # Before the view's first CUDA collective, which makes its communicator.
            _nccl.mark_shrinkable(dist.group.WORLD)
            parent, self._parent = self._parent, None
            shrink_into(
                parent,
                view,
                dist.group.WORLD,
                ElasticPort(self._algo).collectives,
                _nccl.init_timeout(self._timeout.total_seconds()),
            )

    def _check_structures(self) -> None:
        """Every member's model structure against the job's (the furthest
        rank's, or in a new job the one most members have): a member whose
        differs raises ValueError (a misbuilt joiner: it leaves); the others
        raise _MisbuiltPeer, and the change starts again without it."""
        port = ElasticPort(self._current())
        mine = structure_of(self._model, self._optimizer)
        progress = self._progress() if self._has_state else -1
        gathered = port.gather_objects([progress, mine])
        best = max(p for p, _ in gathered)
        if best >= 0:
            reference = next(structure for p, structure in gathered if p == best)
        else:
            structures = [structure for _, structure in gathered]
            reference = max(structures, key=structures.count)  # ties: the lowest rank's
        misbuilt = [rank for rank, (_, s) in enumerate(gathered) if s != reference]
        if not misbuilt:
            return
        if mine != reference:
            difference = first_difference(mine, reference)
            raise ValueError(
                f"elastic: this rank's model is not the job's ({difference}); every rank must "
                f"build the same model and optimizer"
            )
        raise _MisbuiltPeer(f"ranks {misbuilt} of the view have another model; leaving them out")

    def _bind_algorithm(self) -> None:
        """Binds the view's algorithm object to the model, where it must
        before the hand-over (after the structures were compared)."""

    def _hand_over_state(self) -> bool:
        """Every member gets the source's state; returns whether this rank was
        behind the source (its state was replaced by a further one). Three
        small collectives of the new algorithm object, so a member lost here
        raises CommunicationError within the deadline."""
        port = ElasticPort(self._current())
        # -1: no state (a joiner); a new job has none anywhere, and rank 0 gives its model.
        mine = self._progress() if self._has_state else -1
        best = port.max_int(mine)
        source = -port.max_int(-(self.rank if mine == best else self.world_size))
        state = None
        if self.rank == source:
            state = _to_cpu(
                {
                    **self._state(),
                    "syncs": self._syncs,
                    "synced_at": self._synced_at,
                    "joins": self._joins_handled,  # so that no later rank 0 admits them again
                    "extra": self._extra_readings(),
                }
            )
        state = port.broadcast_object(state, source)
        if self.rank != source:
            self._load_state(state, self._has_state)
            self._syncs = state["syncs"]
            self._synced_at = state["synced_at"]
            self._past_sync = self._steps == self._synced_at
            self._joins_handled = state["joins"]
            if not self._has_state or mine < best:
                after_step, after_sync = state["extra"]
                self._load_extra(
                    after_step if self._has_state and self._call == "step" else after_sync
                )
        behind = self._has_state and mine < best
        self._has_state = True
        return behind

    def _change_view(
        self,
        *,
        min_size: int = 1,
        join: bool = False,
        newcomer: bool = False,
        expected: tuple[str, ...] = (),
    ) -> bool:
        """Agrees on the next view and moves there; returns whether this rank
        was behind the view's source (see ``_hand_over_state``). ``join``:
        this rank joins a running job; ``expected``: admitted joiners the
        view should hold. Retries a change that a failure interrupts;
        CommunicationError after ``retries`` retries."""
        last_error: Exception | None = None
        # Dropped first: closing this rank's connections fails the peers
        # still waiting on it in the broken collective at once, instead of at
        # their deadline (gloo cannot be aborted, but a closed pair errors).
        logger.info("elastic: leaving the view for the next")
        self._drop_view()
        for _ in range(self._retries + 1):
            deadline = time.monotonic() + self._join_wait.total_seconds()
            view = self._membership.agree(
                progress=max(self._progress(), 0) if self._has_state else 0,
                min_size=min_size,
                deadline=deadline,
                join=join,
                newcomer=newcomer,
                expected=expected,
            )
            join, newcomer, expected = False, False, ()
            try:
                self._view = view
                self._install(view)
                behind = self._hand_over_state()
                self._membership.mark_started()
            except ValueError:
                # This rank is the misbuilt one: it leaves the job.
                self._drop_view()
                self._discard_parent()
                raise
            except RuntimeError as error:
                # A member lost during the change: CommunicationError from a
                # collective, torch.distributed's errors (DistError, gloo's
                # RuntimeError) from the group's rendezvous on the store,
                # or a failed shrink. Dropped now, while self._view is still
                # the view its communicators belong to.
                last_error = error
                logger.warning("elastic: the change to %s failed: %s", view.prefix, error)
                min_size = 1
                self._drop_view()
                continue
            if self._on_change is not None:
                self._on_change(view)
            return behind
        self._drop_view()
        self._discard_parent()
        raise CommunicationError(
            f"elastic: the membership change failed {self._retries + 1} times; last error: "
            f"{last_error}",
            operation="change view",
            ranks=list(range(self._view.world_size if self._view else 0)),
            rank=self._view.rank if self._view else -1,
        ) from last_error

    def _add_joiners(self) -> None:
        """At a synchronization point: adds the joiners announced since the
        last one (rank 0 admits them; everyone gets its list)."""
        admitted = None
        if self.rank == 0:
            admitted = self._membership.admit_joins(self._joins_handled, self.view.members)
        handled, joiners = ElasticPort(self._current()).broadcast_object(admitted, 0)
        self._joins_handled = handled
        if joiners:
            self._membership.wait_for_joiners(joiners, self._timeout.total_seconds())
            self._change_view(expected=tuple(joiners))

    def _synchronization_point(self, synchronize: Callable[[], None]) -> None:
        """``synchronize`` then the joiners, as one transaction (NOTE
        [Transactions]): after a failure, done when the view's source
        completed it, redone otherwise."""
        if self._past_sync:  # set only where the step count is that point's
            self._past_sync = False
            return  # the job completed it while this rank was changing views
        self._call = "sync"
        syncs = self._syncs
        for attempt in range(self._retries + 1):
            try:
                if self._syncs == syncs:
                    synchronize()
                    self._syncs += 1
                    self._synced_at = self._steps
                    self._extra_after_sync = self._extra()
                self._add_joiners()
                return
            except CommunicationError:
                if attempt == self._retries:
                    raise
                self._change_view()
                self._after_failed_view_change()
                if self._syncs > syncs:
                    return  # the source completed it: its state is this rank's

    def _after_failed_view_change(self) -> None:
        """What a failed synchronization point undoes once the view changed."""

    def _extra(self) -> Any:
        return self._extra_state[0]() if self._extra_state is not None else None

    def _step_done(self) -> None:
        """Counts a completed step (NOTE [Extra state readings])."""
        self._steps += 1
        if self._extra_state is not None:
            self._extra_after_step = self._extra()

    def _extra_readings(self) -> tuple[Any, Any]:
        """(after the last step, after the last synchronization point); what
        get() returns now where there is none yet."""
        if self._extra_state is None:
            return None, None
        now = self._extra()
        after_step = self._extra_after_step if self._extra_after_step is not None else now
        after_sync = self._extra_after_sync if self._extra_after_sync is not None else now
        return after_step, after_sync

    def _load_extra(self, value: Any) -> None:
        if self._extra_state is not None:
            self._extra_state[1](value)


class ElasticSGD(_ElasticMember[AllReduceSGD]):
    """AllReduceSGD over a job whose ranks may be lost and may join.

    Start the control process once (``python -m distlearn_cuda.elastic.control
    --port 29400``) and each rank as its own process (or its own ``torchrun
    --nproc_per_node 1``) with this object instead of ``AllReduceSGD``::

        sgd = ElasticSGD("ctrl-host:29400", model, optimizer, world_size=4)
        for x, y in batches(sgd.rank, sgd.world_size):
            loss_fn(model(x), y).backward()
            sgd.sum_and_normalize_gradients()
            if not sgd.last_step_skipped:
                optimizer.step()
            optimizer.zero_grad()
        sgd.synchronize_parameters()  # e.g. each epoch: joiners are added here

    When a rank is lost, the step in progress completes among the survivors
    (each survivor's gradients are intact until the unpack, so the allreduce
    runs again on the new view's group) and later steps average over them. A
    rank that was a step behind the furthest survivor (it failed in a step
    the others had completed) receives the furthest's parameters and
    optimizer state, and reports its step skipped (``last_step_skipped``):
    skip ``optimizer.step()`` then. Every member but the furthest rank (the
    source) takes its parameters, buffers, optimizer state and
    ``extra_state``. A synchronization point that fails is redone on the
    new view unless the source completed it (NOTE [Transactions] in the
    module).

    On NCCL (CUDA tensors, ``backend="nccl"``) each step's allreduce is
    waited for on the host before its sum is unpacked, so that a failed one
    leaves the gradients intact for the redo: the host does not run ahead of
    the device past a step, as it would with ``AllReduceSGD``.

    Args:
        control: "host:port" of the control process's store.
        model: the module trained; its ``.grad`` are averaged, its parameters
            and buffers handed to joiners.
        optimizer: its state goes with the parameters (or None).
        world_size: the ranks a new job waits for before it starts (a rank
            arriving once the job runs joins it instead).
        timeout: deadline of every collective (seconds or timedelta); a lost
            or stalled rank is noticed within it.
        join_wait: the longest a membership change may wait for the control
            process's quorum (a joiner waits up to this for the next
            synchronization point).
        retries: membership changes a failure may restart before
            ``CommunicationError``.
        heartbeat_interval: seconds between this rank's heartbeats (keep it
            well under the control process's ``--heartbeat-timeout``).
        backend: "nccl" (CUDA tensors over NCCL, the default where torch has
            CUDA and NCCL) or "gloo" (every tensor over gloo, e.g. several
            ranks sharing a GPU, which NCCL refuses).
        on_change: called with the new ``View`` after every change, the first
            included (to re-split the data by ``rank`` and ``world_size``).
        extra_state: a (get, load) pair for state of the user's own (an epoch
            counter, a scheduler's ``state_dict``; tensors and plain data),
            taken from the source by every other member at each change.
        **algorithm_options: passed to ``AllReduceSGD`` (``comm_dtype``,
            ``allow_unused``, ``compression``, ``error_feedback``; each
            rank keeps its own residual: NOTE [Residuals across views]).
    """

    _skipped = False  # whether the last step was left out (see last_step_skipped)
    # With error feedback: this rank's residual, carried from view to view
    # (NOTE [Residuals across views]); None for a rank that never averaged.
    _residual: torch.Tensor | None = None

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last ``sum_and_normalize_gradients`` left this rank's
        step out (its parameters were replaced by a further rank's, which
        already include the step): do not call ``optimizer.step()``."""
        return self._skipped

    def sum_and_normalize_gradients(self) -> None:
        """The model's gradients <- their mean over the current view's ranks.
        After a lost rank, completes among the survivors (see the class)."""
        self._skipped = False
        self._past_sync = False
        self._call = "step"
        for attempt in range(self._retries + 1):
            try:
                self._current().sum_and_normalize_gradients(self._model)
                break
            except CommunicationError:
                if attempt == self._retries:
                    raise
                if self._change_view():
                    self._skipped = True
                    return
        self._step_done()

    def synchronize_parameters(self) -> None:
        """Every rank gets the parameters, buffers and optimizer state of the
        rank that took the most steps (ranks may take different numbers of
        steps between synchronizations, as with ``AllReduceSGD``); then the
        ranks whose join was announced are added. A failure redoes it on
        the next view (NOTE [Transactions])."""

        def synchronize() -> None:
            # First the algorithm's own synchronization, which lets ranks that
            # took fewer steps join the others' allreduces until all arrive;
            # then, with every rank at the same point, the joiners.
            self._current().synchronize_parameters(
                self._model, optimizer=self._optimizer, buffers=True
            )

        self._synchronization_point(synchronize)

    def _make_algorithm(self) -> AllReduceSGD:
        algo = AllReduceSGD(timeout=self._timeout, **self._options)
        # On NCCL a failed allreduce is known on the host only later; the
        # gradients must stay intact until the sum is known to be whole, so
        # that the step can run again on the next view.
        ElasticPort(algo).verify_every_sum()
        if self._residual is not None:
            algo.load_state_dict({"steps": 0, "residual": self._residual})
        return algo

    def _keep_state(self) -> None:
        if self._algo is not None:
            self._residual = self._algo.state_dict().get("residual")

    def _state(self) -> dict[str, Any]:
        return {
            "steps": self._steps,
            "model": self._model.state_dict(),
            "optimizer": self._optimizer.state_dict() if self._optimizer else None,
        }

    def _load_state(self, state: dict[str, Any], had_state: bool) -> None:
        self._steps = state["steps"]
        self._model.load_state_dict(state["model"])
        if self._optimizer is not None and state["optimizer"] is not None:
            self._optimizer.load_state_dict(state["optimizer"])


class ElasticEA(_ElasticMember[AllReduceEA]):
    """AllReduceEA over a job whose ranks may be lost and may join.

    Used like ``ElasticSGD`` (same control process, launch and arguments),
    with ``average_parameters()`` after each ``optimizer.step()``. A round
    completes only when its sum is complete: a round whose allreduce fails
    leaves the center as it was on every survivor, each survivor's
    parameters go back to what the round started from (an asynchronous
    round's blend undone when it is found to have failed, at the next
    round), and the call runs again on the new view (each survivor keeps its
    own parameters: a lost rank's are lost, the center is not). Every member
    of a new view takes the center, step counter and ``extra_state`` of the
    furthest rank; a joiner also takes its parameters, buffers and
    optimizer state.

    Args: as ``ElasticSGD``, with ``tau``, ``beta`` and the other
    ``AllReduceEA`` options passed through ``**algorithm_options``
    (``alpha`` is refused: see ``beta`` in ``AllReduceEA``).
    """

    def _check_options(self, options: dict[str, Any]) -> None:
        if options.get("alpha") is not None:
            raise ValueError(
                "ElasticEA takes beta, not alpha: the world size changes with the views, and "
                "a fixed alpha is stable only below 2 / alpha - 1 ranks (NOTE [EA stability]), "
                "so a view that grew past it could not be made; beta (the center's rate, "
                "default 0.9) gives each view alpha = beta / its size"
            )

    # The EA state (center, round counter) the next view's object starts from.
    _handed_state: dict[str, Any] | None = None

    @property
    def center(self) -> dict[str, torch.Tensor]:
        """The center, by parameter name (as ``AllReduceEA.center``)."""
        return self._current().center

    # An asynchronous round in flight: what its blend moved the parameters
    # by (parameters before it minus after it), the job's step count at the
    # call that launched it, and the algorithm object's rounds completed
    # then (the round is in the center once that count has grown).
    _blend: list[torch.Tensor] | None = None
    _blend_step = -1
    _blend_base = 0
    # The step count at the last round whose sum is in this rank's center
    # (after a hand-over, the source's): a blend of a later round was never
    # summed into the center every member takes, and is undone (NOTE
    # [Transactions]).
    _center_round = -1
    # The step counter a failed call rolls back to (set while it changes views).
    _rollback_step: int | None = None
    # Free sets of buffers shaped like the parameters, for a round's starting
    # point and the blend in flight: two at most, made in the first rounds
    # and reused (no allocation per round).
    _spares: tuple[list[torch.Tensor], ...] = ()

    def _copy_of(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters' values in a free set of buffers."""
        buffers = self._spares[-1] if self._spares else None
        self._spares = self._spares[:-1]
        if buffers is None or any(
            (b.shape, b.dtype, b.device) != (p.shape, p.dtype, p.device)
            for b, p in zip(buffers, params, strict=True)
        ):
            self._spares = ()  # the parameters changed (moved, cast): new buffers
            buffers = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(buffers, [p.detach() for p in params])
        return buffers

    def _free(self, buffers: list[torch.Tensor] | None) -> None:
        if buffers is not None:
            self._spares = (*self._spares, buffers)

    def _note_completed_round(self) -> None:
        """Moves ``_center_round`` past the round in flight once it is in the
        center: completed by a round, a synchronization, or a reader of the
        state (``center``, ``state_dict()``), which AllReduceEA completes
        without raising a failure, leaving it to the next call."""
        if self._blend is not None and self._algo is not None:
            if self._algo.rounds_completed > self._blend_base:
                self._center_round = self._blend_step
                self._free(self._blend)
                self._blend = None

    def _settle_blends(self, call: tuple[int, list[torch.Tensor]] | None = None) -> None:
        """After a failed call's view change: undoes each round not in the
        center the view's members now hold (NOTE [Transactions]). ``call``:
        the failed call's step count and the parameters it started from,
        restored exactly if its round is undone; the round in flight is
        older, so it is undone whenever the call's is, and maybe alone."""
        params: list[torch.Tensor] = list(self._model.parameters())
        with torch.no_grad():
            if call is not None:
                step, start = call
                if step > self._center_round:
                    torch._foreach_copy_(params, start)
                self._free(start)
            if self._blend is not None and self._blend_step > self._center_round:
                torch._foreach_add_(params, self._blend)
        self._free(self._blend)
        self._blend = None

    def average_parameters(self) -> None:
        """One EA step of the model's parameters (a round every ``tau``
        steps). A round that fails is rolled back and redone on the next
        view (NOTE [Transactions])."""
        self._past_sync = False
        self._call = "step"
        for attempt in range(self._retries + 1):
            algo = self._current()
            # A call between rounds only counts, but it is where an
            # asynchronous round's failure can surface: it is handled alike.
            is_round = algo.next_call_is_round
            params: list[torch.Tensor] = list(self._model.parameters())
            before = None
            if is_round:
                with torch.no_grad():
                    before = self._copy_of(params)
            step, call_step = algo.state_step, self._steps
            try:
                algo.average_parameters(self._model)
            except CommunicationError:
                if attempt == self._retries:
                    self._free(before)
                    raise
                # (_change_view's _keep_state notes a round a reader completed.)
                self._rollback_step = step
                try:
                    behind = self._change_view()
                finally:
                    self._rollback_step = None
                # (The source's step count replaced this rank's if it was behind.)
                self._settle_blends(None if before is None else (call_step, before))
                if behind:
                    return  # the source completed this call
                continue
            # The round in flight may have completed, in this call or in a reader's.
            self._note_completed_round()
            if before is not None and algo.round_in_flight:
                with torch.no_grad():
                    torch._foreach_sub_(before, params)
                self._blend, self._blend_step = before, call_step
                self._blend_base = algo.rounds_completed
            else:
                self._free(before)
                if is_round:
                    self._center_round = call_step  # a synchronous round, in the center
            break
        self._step_done()

    def synchronize_center(self) -> None:
        """Every rank gets rank 0's center; then the ranks whose join was
        announced are added. A failure redoes it on the next view (NOTE
        [Transactions])."""
        self._synchronization_point(lambda: self._current().synchronize_center(self._model))
        # Every round is in the center past a synchronization.
        self._free(self._blend)
        self._blend = None
        self._center_round = self._steps

    def _after_failed_view_change(self) -> None:
        self._settle_blends()

    def _keep_state(self) -> None:
        # state_dict() never raises after a failure: the last complete round.
        if self._algo is not None:
            self._handed_state = self._algo.state_dict()
            self._note_completed_round()
            if self._rollback_step is not None:
                self._handed_state["step"] = self._rollback_step

    def _ea_state(self) -> dict[str, Any]:
        self._keep_state()
        assert self._handed_state is not None
        return self._handed_state

    def _make_algorithm(self) -> AllReduceEA:
        algo = AllReduceEA(timeout=self._timeout, **self._options)
        if self._handed_state is not None:
            algo.load_state_dict(self._handed_state)
        return algo

    def _bind_algorithm(self) -> None:
        # Bound now (the center made, or taken from the handed state), so
        # that its state_dict() holds the center before any round.
        ElasticPort(self._current()).bind(self._model)

    def _state(self) -> dict[str, Any]:
        return {
            "steps": self._steps,
            "ea": self._ea_state(),
            "center_round": self._center_round,  # read after _ea_state() completed the round
            "model": self._model.state_dict(),
            "optimizer": self._optimizer.state_dict() if self._optimizer else None,
        }

    def _load_state(self, state: dict[str, Any], had_state: bool) -> None:
        self._steps = state["steps"]
        self._center_round = state["center_round"]
        # The source's error-feedback residual stays the source's: this
        # rank keeps its own (zeros for a joiner: NOTE [Residuals across views]).
        ea_state = {key: value for key, value in state["ea"].items() if key != "residual"}
        self._current().load_state_dict(ea_state)
        self._handed_state = self._current().state_dict()
        if not had_state:
            self._model.load_state_dict(state["model"])
            if self._optimizer is not None and state["optimizer"] is not None:
                self._optimizer.load_state_dict(state["optimizer"])
