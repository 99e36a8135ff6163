"""NCCL for CUDA tensors: loading the library, and the communicators, one per group and device.

Loading. The extension never links NCCL: it declares the part of NCCL's C
ABI it calls and opens the library with dlopen the first time a CUDA tensor
needs it, so importing the package needs no GPU, driver or NCCL, and every
CUDA build has this path. Which library: the path in ``DISTLEARN_NCCL_LIBRARY``
when set (and only it); otherwise the copy torch has already loaded, then the
``nvidia-nccl-cu13`` wheel's, then whatever ``libnccl.so.2`` the dynamic
linker finds.

Which communicator (``DISTLEARN_NCCL``, see ``mode``): by default the
extension's own, enqueued on the current stream with the object's deadline
and watchdog. ``DISTLEARN_NCCL=group`` sends CUDA collectives through the
group's own NCCL process group instead, so the process holds one
communicator per group and device rather than two (torch's and ours).

Ownership. This module owns every communicator the extension makes. One
serves all objects on a (group, device), whatever their timeouts: each
collective carries its object's deadline. An object takes a ``Lease`` at its
first CUDA collective and releases it in ``close()``. A communicator is
closed (its watchdog stopped and joined, the collectives in flight and
``ncclCommFinalize`` waited for, then destroyed; aborted on failure) when its
last lease is released, when its group is destroyed, or at interpreter exit,
before the CUDA runtime tears down, so no watchdog thread calls CUDA during
the interpreter's teardown.

Reuse is decided by all ranks together: a new object's first collective on a
device asks (on its CPU group) whether every rank holds the communicator that
rank 0 holds; if one does not (its objects were closed earlier than rank 0's),
all ranks make a new one. So ranks whose objects' lifetimes differ never
disagree on which communicator a collective runs on.

Shrinking (elastic views). A group marked shrinkable (``mark_shrinkable``)
gets communicators that the watchdog revokes rather than aborts on a failure
(where NCCL has ncclCommRevoke). The elastic layer takes a dropped view's
communicators out of the registry (``detach``), and, when the next view only
lost ranks, shrinks one into the next view's (``adopt``); whatever it does
not shrink it closes (``discard``).

Joining is bounded by ``init_timeout``, not by the collective deadline: NCCL's
initialization (bootstrap, topology search, connection setup) often takes
0.2 to 2 s on one node and longer on many, which a 0.5 s collective deadline
must not turn into a failure.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch

from .. import _C
from .group import Group

logger = logging.getLogger(__name__)

__all__ = [
    "INIT_TIMEOUT_ENV",
    "LIBRARY_ENV",
    "MIN_INIT_TIMEOUT_S",
    "MODES",
    "MODE_ENV",
    "Lease",
    "acquire",
    "adopt",
    "close_all",
    "detach",
    "discard",
    "init_timeout",
    "library_candidates",
    "load",
    "mark_shrinkable",
    "mode",
    "open_communicators",
    "runtime_version",
]

LIBRARY_ENV = "DISTLEARN_NCCL_LIBRARY"
MODE_ENV = "DISTLEARN_NCCL"
INIT_TIMEOUT_ENV = "DISTLEARN_NCCL_INIT_TIMEOUT"
MODES = ("own", "group")
# The shortest bound on joining a communicator unless DISTLEARN_NCCL_INIT_TIMEOUT
# says otherwise: well above the 0.2-2 s NCCL's init takes on one node, with
# room for large jobs; an object with a longer timeout gets its timeout.
MIN_INIT_TIMEOUT_S = 60.0
_ALREADY_LOADED = ""  # the loader's name for "a libnccl.so.2 this process has loaded"


def library_candidates() -> list[str]:
    """What ``load`` tries, in order."""
    override = os.environ.get(LIBRARY_ENV, "").strip()
    if override:
        return [override]
    candidates = [_ALREADY_LOADED]
    try:
        import nvidia.nccl  # the wheel: a namespace package, no __init__
    except ImportError:
        pass
    else:
        candidates += [os.path.join(d, "lib", "libnccl.so.2") for d in nvidia.nccl.__path__]
    candidates.append("libnccl.so.2")
    return candidates


def load() -> tuple[int, str]:
    """Loads NCCL once per process; returns (NCCL_VERSION_CODE, what was opened).

    Raises:
        RuntimeError: this build has no NCCL support (the CPU flavor), or no
            candidate loaded (the message lists each one and why).
    """
    if not _C.has_nccl:
        raise RuntimeError(
            "this build of distlearn_cuda calls no NCCL itself: it is the CPU flavor "
            "(nvcc was not found when it was built, see setup.py)"
        )
    first = _C.nccl_loaded() is None
    version, path = _C.nccl_load(library_candidates())
    if first:
        logger.info(
            "NCCL %d loaded from %s (mode %s)", version, path or "the process", mode_or_invalid()
        )
    return version, path


def mode_or_invalid() -> str:
    """``mode()``, or what makes it invalid (for a log line that must not raise)."""
    try:
        return mode()
    except (TypeError, ValueError) as error:
        return f"invalid: {error}"


def runtime_version() -> int | None:
    """NCCL_VERSION_CODE of the loaded NCCL (e.g. 23203 for 2.32.3), or None before it loads."""
    if not _C.has_nccl:
        return None
    loaded = _C.nccl_loaded()
    return None if loaded is None else loaded[0]


def mode(choice: str | None = None) -> str:
    """Which NCCL carries CUDA collectives on an NCCL group.

    ``"own"``: the extension's communicator (deadline per collective,
    watchdog, no host synchronization). ``"group"``: the group's own NCCL
    process group (``torch.distributed``), one communicator fewer per group
    and device; its collectives are bounded by the group's timeout, not the
    object's. ``choice`` None reads ``DISTLEARN_NCCL`` (unset or empty: "own").

    Raises:
        TypeError: ``choice`` is not a string.
        ValueError: it (or ``DISTLEARN_NCCL``) is neither "own" nor "group".
    """
    name = "nccl"
    if choice is None:
        name = MODE_ENV
        choice = os.environ.get(MODE_ENV, "").strip() or "own"
    if not isinstance(choice, str):
        raise TypeError(f"nccl must be 'own' or 'group', got {type(choice).__name__}")
    if choice not in MODES:
        raise ValueError(f"{name} must be 'own' or 'group', got {choice!r}")
    return choice


def init_timeout(collective_timeout_s: float) -> float:
    """Seconds a communicator may take to join: ``DISTLEARN_NCCL_INIT_TIMEOUT``
    when set, else the larger of the collective timeout and 60 s.

    Raises:
        ValueError: ``DISTLEARN_NCCL_INIT_TIMEOUT`` is not a number of seconds > 0.
    """
    text = os.environ.get(INIT_TIMEOUT_ENV, "").strip()
    if not text:
        return max(collective_timeout_s, MIN_INIT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{INIT_TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return seconds


class _Shared:
    """A communicator, what made it, and how many leases it has."""

    __slots__ = ("comm", "group_id", "key", "token", "users")

    def __init__(self, comm: _C.NcclCommunicator, key: tuple[int, int], token: bytes) -> None:
        self.comm = comm
        self.key = key
        self.group_id = key[0]
        self.token = token  # the unique id it was made with: the same on every rank
        self.users = 0


class Lease:
    """One object's use of a shared communicator: ``comm`` serves its
    collectives until ``release()`` (idempotent)."""

    __slots__ = ("_shared", "comm")

    def __init__(self, shared: _Shared) -> None:
        self._shared: _Shared | None = shared
        self.comm: _C.NcclCommunicator = shared.comm

    def release(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            _release(shared)


# Every communicator not closed yet, and per (id(group), device) the one new
# objects agree on. An entry leaves _open exactly once, and whoever removes
# it closes it. Entries of a group are purged when the group is collected
# (weakref.finalize), before its id can be reused.
_lock = threading.RLock()
_open: set[_Shared] = set()
_latest: dict[tuple[int, int], _Shared] = {}
_group_watchers: dict[int, weakref.finalize] = {}
# Groups whose communicators are kept for a shrink when they fail (elastic views).
_shrinkable: weakref.WeakSet = weakref.WeakSet()


class Bootstrap(Protocol):
    """The CPU collectives over the group's ranks that meeting on a communicator needs."""

    def broadcast_object(self, value: Any, src: int) -> Any: ...

    def max_int(self, value: int) -> int: ...


def acquire(
    group: Group,
    device: torch.device,
    bootstrap: Bootstrap,
    collective_timeout_s: float,
    *,
    factory: Callable[[bytes, int, int, int, float], _C.NcclCommunicator] | None = None,
) -> Lease:
    """A lease on the communicator of ``group`` on ``device``, made if the
    ranks do not all hold it (collective over ``bootstrap``: the object's CPU
    collectives over the same ranks, rank 0 offering).

    ``factory(unique_id, nranks, rank, device, init_timeout)`` makes one;
    default ``_C.NcclCommunicator``. The CPU tests of this bookkeeping pass a
    stand-in, since a real one needs a GPU."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    process_group = group.group
    key = (id(process_group), index)
    with _lock:
        found = _latest.get(key)
        token = found.token if found is not None and found.comm.usable else None
        offered = bootstrap.broadcast_object(token if group.rank == 0 else None, 0)
        # Every rank holds rank 0's communicator: the smallest "yes" is 1.
        holds = int(token is not None and token == offered)
        if -bootstrap.max_int(-holds) == 1:
            assert found is not None
            found.users += 1
            return Lease(found)
        load()
        unique_id = bootstrap.broadcast_object(
            _C.NcclCommunicator.unique_id() if group.rank == 0 else None, 0
        )
        make = factory if factory is not None else _C.NcclCommunicator
        comm = make(
            unique_id, group.world_size, group.rank, index, init_timeout(collective_timeout_s)
        )
        if process_group in _shrinkable:
            comm.keep_for_shrink()
        shared = _register(process_group, key, comm, unique_id)
        shared.users = 1
        logger.info(
            "NCCL communicator made: rank %d of %d on cuda:%d%s",
            group.rank,
            group.world_size,
            index,
            " (kept for a shrink)" if process_group in _shrinkable else "",
        )
        return Lease(shared)


def _register(
    process_group: Any, key: tuple[int, int], comm: _C.NcclCommunicator, token: bytes
) -> _Shared:
    """Adds a communicator as the one new objects on ``key`` agree on. With _lock held."""
    shared = _Shared(comm, key, token)
    _open.add(shared)
    _latest[key] = shared  # a previous one stays open for its own leases
    if key[0] not in _group_watchers:
        _group_watchers[key[0]] = weakref.finalize(process_group, _group_gone, key[0])
    return shared


def mark_shrinkable(process_group: Any) -> None:
    """Communicators made from now on for ``process_group`` are kept for a
    shrink when they fail (``keep_for_shrink``)."""
    _shrinkable.add(process_group)


def detach(process_group: Any) -> list[_Shared]:
    """Takes the communicators of ``process_group`` out of the registry: its
    objects' leases no longer close them, nor does the group's end. The
    caller shrinks them or ``discard``s them."""
    with _lock:
        taken = [shared for shared in _open if shared.group_id == id(process_group)]
        for shared in taken:
            _forget(shared)
    return taken


def adopt(process_group: Any, device_index: int, comm: _C.NcclCommunicator, token: bytes) -> None:
    """Registers ``comm`` (shrunk from a detached communicator, every rank of
    ``process_group`` holding its own with the same ``token``) as the one the
    group's objects agree on for ``device_index``."""
    with _lock:
        _register(process_group, (id(process_group), device_index), comm, token)
    logger.info(
        "NCCL communicator shrunk on cuda:%d: rank %d of %d", device_index, comm.rank, comm.nranks
    )


def discard(shared: _Shared) -> None:
    """Aborts and closes a detached communicator that was not shrunk. It
    belongs to a dropped view whose peers may be gone, so nothing is waited
    for (a graceful close would wait for ncclCommFinalize with them, up to
    its bound); the abort is expected here, so no warning."""
    shared.comm.abort()
    shared.comm.close()
    logger.info("NCCL communicator of a dropped view aborted on cuda:%d", shared.key[1])


def open_communicators() -> list[_C.NcclCommunicator]:
    """The communicators not closed yet (for tests and diagnostics)."""
    with _lock:
        return [shared.comm for shared in _open]


def close_all() -> None:
    """Closes every communicator (at interpreter exit; leases become unusable)."""
    with _lock:
        doomed = list(_open)
        _open.clear()
        _latest.clear()
        watchers = list(_group_watchers.values())
        _group_watchers.clear()
    for watcher in watchers:
        watcher.detach()
    for shared in doomed:
        _close(shared)


# NOTE [Fork]: a child forked from a process with communicators (a
# DataLoader worker, a multiprocessing pool) inherits them without their
# watchdog threads, and a lock a parent thread held stays held in the child.
# The child must never call NCCL on them: they leave the registry there (so
# no release or exit handler closes them) and are kept, never destroyed; the
# registry's lock is new. Objects refuse collectives in a child
# (Collectives.check_usable), so nothing in it reaches them.
_inherited: list[_Shared] = []


def _forget_after_fork() -> None:
    global _lock
    _lock = threading.RLock()
    _inherited.extend(_open)
    _open.clear()
    _latest.clear()
    for watcher in _group_watchers.values():
        watcher.detach()
    _group_watchers.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


# Registered at import, which precedes the import of _group and so the
# registration of its exit handler: the objects' close() runs first and
# releases their leases; this closes whatever is left (leaked objects).
# Both run before torch's exit handlers and before the CUDA runtime's own
# teardown, which follows the interpreter's.
atexit.register(close_all)


def _release(shared: _Shared) -> None:
    with _lock:
        shared.users -= 1
        if shared.users > 0 or shared not in _open:
            return
        _forget(shared)
    _close(shared)


def _group_gone(group_id: int) -> None:
    with _lock:
        _group_watchers.pop(group_id, None)
        doomed = [shared for shared in _open if shared.group_id == group_id]
        for shared in doomed:
            _forget(shared)
    for shared in doomed:
        _close(shared)


def _forget(shared: _Shared) -> None:
    """Removes an entry from the registry; the caller closes it. With _lock held."""
    _open.discard(shared)
    if _latest.get(shared.key) is shared:
        del _latest[shared.key]


def _close(shared: _Shared) -> None:
    outcome = shared.comm.close()
    logger.info("NCCL communicator on cuda:%d closed: %s", shared.key[1], outcome)
    if outcome not in ("destroyed", "closed before"):
        warnings.warn(
            f"distlearn_cuda: the NCCL communicator on cuda:{shared.key[1]} did not close "
            f"cleanly: {outcome}",
            RuntimeWarning,
            stacklevel=2,
        )
