"""Background threads that call the store, stopped before the interpreter
finalizes.

NOTE [Threads at exit]: a daemon thread still inside a C++ call that released
the GIL (a TCPStore read or write, a Lighthouse heartbeat) when the
interpreter finalizes is ended by ``pthread_exit`` as it takes the GIL back;
that unwinding passes a ``catch (...)`` or a ``noexcept`` destructor on its
way out, which calls ``std::terminate``, and a process that finished its
work dies of SIGABRT ("FATAL: exception not rethrown"). A rank that had
completed its elastic job died so in the fault harness. So every such thread
is started here: its owner's ``close()`` stops and joins it, and an exit
handler does the same for the owners never closed. Each thread's calls are
bounded (by its store's timeout); so is every wait here.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["StoppableThread"]

logger = logging.getLogger(__name__)

# Bound on the exit handler's wait for all the threads together: a store call
# normally returns in milliseconds; one stuck on a dead peer would hold the
# exit up to its timeout, and this is where the exit goes on regardless.
EXIT_BOUND_S = 5.0

_lock = threading.Lock()
_running: set[StoppableThread] = set()


class StoppableThread:
    """A daemon thread running ``target(*args, stop)`` until ``stop`` is set
    (the target returns promptly once it is, between two bounded calls)."""

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> None:
        self.stop = threading.Event()
        self.name = name
        self._thread = threading.Thread(
            target=self._run, args=(target, args), name=name, daemon=True
        )
        with _lock:
            _running.add(self)
        self._thread.start()

    def _run(self, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            target(*args, self.stop)
        finally:
            with _lock:
                _running.discard(self)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, bound: float) -> bool:
        """Stops the thread and waits for it at most ``bound`` seconds;
        returns whether it ended (a thread that outlives the bound is left
        to the exit handler, and logged)."""
        self.stop.set()
        if self._thread is threading.current_thread():
            return False
        self._thread.join(timeout=bound)
        if self._thread.is_alive():
            logger.warning("%s still runs %.1f s after it was told to stop", self.name, bound)
            return False
        return True


def stop_all(bound: float = EXIT_BOUND_S) -> None:
    """Stops every thread started here and waits for them, ``bound`` seconds
    in all (at interpreter exit, before daemon threads are frozen)."""
    with _lock:
        threads = list(_running)
    for thread in threads:
        thread.stop.set()
    deadline = time.monotonic() + bound
    for thread in threads:
        thread.close(max(0.0, deadline - time.monotonic()))


# atexit handlers run before the interpreter finalizes, while daemon threads
# still run and can finish their calls.
atexit.register(stop_all)
