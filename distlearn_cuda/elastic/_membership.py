"""Who is in the job: one rank's side of the control process.

A rank sends heartbeats to torchft's Lighthouse from a thread of its own,
and asks it for a quorum (the next view's members) only when its view must
change: at start, after a collective failed, or when a join is announced.
Nothing here runs on a normal training step.

Views. A view's ranks are the quorum's members in the Lighthouse's order
(by replica id, which starts with this process's start time, so survivors
keep their order and joiners come last). Its group is made on the control
store under the job's ``view-<quorum id>-<generation>`` key (see
``_keys``), where the generation is one more than the largest any member
reports (each member's count of the views it was in): the Lighthouse's
quorum id changes with the members, the generation when the same members
meet again, so no prefix is used twice within a job, and a restarted
control process starts an empty store.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch.distributed as dist

from .._comm.threads import StoppableThread
from ..errors import CommunicationError
from ._keys import CONTROL_KEY, SECRET_ENV, JobKeys, Keys

__all__ = ["Membership", "View", "import_torchft"]

logger = logging.getLogger(__name__)
# The control process's quorum tick (control.py) in seconds.
LIGHTHOUSE_TICK_S = 0.05
# A quorum request lasts at least this, and three times the Lighthouse's
# longest timeout: a rank listed as a participant must still be listening
# when the quorum that lists it forms.
REQUEST_FLOOR_S = 10.0
# NOTE [Most of the last view]. The Lighthouse counts live ranks by
# heartbeats, which a loaded machine delays, and in the tests it let a lone
# survivor form a view of its own beside the others'. So a quorum that holds
# fewer than half of a rank's last view is refused (every member of that
# view got it: all ask again) until every participant has waited for the
# others longer than a request's patience (3 times the Lighthouse's larger
# timeout, at least REQUEST_FLOOR_S) and says so in its request ("gave_up");
# then all take it alike, from the same data. Delayed heartbeats come back
# within that; ranks that are gone do not, and a job that lost most of its
# ranks at once goes on with the rest, adding its replacements at its next
# synchronization point (they cannot be admitted before one: without this,
# the job waited out join_wait and ended, found by the fault harness).
# Quorums a member asks again for when an admitted joiner is missing.
EXPECTED_TRIES = 3
EXTRA_HINT = 'pip install "distlearn_cuda[elastic]"'
# Between two quorum requests of a rank that waits for more ranks at start.
START_POLL_S = 0.1
# Between two log lines of a rank that waits for the world to fill.
WAITING_LOG_S = 10.0


def import_torchft() -> ModuleType:
    """torchft's coordination module, or ImportError naming the extra."""
    # torchft's Rust side logs every request at info; read when it loads.
    os.environ.setdefault("RUST_LOG", "warn")
    try:
        from torchft import coordination
    except ImportError as error:
        raise ImportError(f"elastic mode needs torchft: {EXTRA_HINT}", name="torchft") from error
    return coordination


@dataclass(frozen=True)
class View:
    """One membership view of the job.

    Attributes:
        rank: this process's rank in the view.
        world_size: number of ranks in the view.
        members: the ranks' replica ids, by rank.
        prefix: the store prefix of the view's group (never reused).
        joined: replica ids that were in no earlier view of this process.
    """

    rank: int
    world_size: int
    members: tuple[str, ...]
    prefix: str
    joined: tuple[str, ...]


def parse_address(control: str) -> tuple[str, int]:
    """("host", port) from "host:port"; ValueError naming ``control`` otherwise."""
    if not isinstance(control, str):
        raise TypeError(f"control must be a 'host:port' string, got {type(control).__name__}")
    host, _, port = control.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"control must look like 'host:port', got {control!r}")
    return host.strip("[]"), int(port)


class Membership:
    """This rank's membership: its replica id, its heartbeats, its job, its views."""

    def __init__(
        self,
        control: str,
        secret: str,
        *,
        heartbeat_interval: float,
        connect_timeout: datetime.timedelta,
    ) -> None:
        self._coordination = import_torchft()
        self._host, self._port = parse_address(control)
        self._connect_timeout = connect_timeout
        self.keys = Keys(secret)
        # Start time first: the Lighthouse orders members by replica id.
        self.replica_id = f"{time.time_ns():020d}-{socket.gethostname()}-{os.getpid()}"
        self.generation = 0  # views this process was in
        self.in_job = False  # set once this rank trained in a view
        self._reconnecting: StoppableThread | None = None
        self._known: set[str] = set()
        self._previous: tuple[str, ...] = ()  # the members of this rank's last view
        self.store = self._first_store()
        self.job = self.keys.for_job(0)  # set by find_job
        # Set while this rank may be counted by the Lighthouse: a joiner
        # sends no heartbeat until it is admitted, since the Lighthouse waits
        # for every live rank that has not asked for a quorum (up to its join
        # timeout) and refuses one holding half or fewer of them.
        self.beating = threading.Event()
        self._beating = StoppableThread(
            self._heartbeats, (heartbeat_interval,), "distlearn-elastic-heartbeat"
        )

    def _first_store(self) -> dist.TCPStore:
        """The store client, or an error that says what is wrong with the
        launch: no control process at the address, another server there, or
        a secret that is not the control process's."""
        address = f"{self._host}:{self._port}"
        try:
            store = self._connect_store()
        except Exception as error:  # torch's DistStoreError, RuntimeError, TimeoutError
            raise ConnectionError(
                f"elastic: no control process's store answers at {address} ({error}); start "
                f"one with `python -m distlearn_cuda.elastic.control --port {self._port}` and "
                f"pass the address its ready line prints ('store HOST:PORT'; not the "
                f"Lighthouse's port)"
            ) from error
        try:
            ours = store.check([CONTROL_KEY])
            mine = ours and store.check([self.keys.lighthouse_port])
        except Exception as error:
            raise ConnectionError(
                f"elastic: the server at {address} is not a control process's store ({error})"
            ) from error
        if not ours:
            raise ConnectionError(
                f"elastic: the store at {address} is not an elastic control process's (is it "
                f"another job's rendezvous?)"
            )
        if not mine:
            raise PermissionError(
                f"elastic: the control process at {address} holds nothing under this rank's "
                f"secret: {SECRET_ENV} differs from the one the control process was given"
            )
        return store

    def live_store(self) -> dist.TCPStore:
        """The store client, connected anew if the control process restarted
        (bounded by the connect timeout)."""
        try:
            self.store.check([self.keys.lighthouse_port])
        except Exception:
            self.store = self._connect_store()
        return self.store

    # -- the job ----------------------------------------------------------

    def find_job(self) -> bool:
        """Finds the job this rank belongs to; returns whether it runs (the
        rank joins it) or is to be started (the rank waits for the world).
        A started job whose members sent no heartbeat within the control
        process's heartbeat timeout is over (it ended, or all its ranks
        were lost): the first rank to notice starts the next one."""
        store = self.live_store()
        self._wait_for_a_running_job(store)
        while True:
            number = store.add(self.keys.job, 0)
            job = self.keys.for_job(number)
            if number > 0 and not store.check([job.started]):
                self.job = job  # being formed: wait for the world with the others
                return False
            if number > 0 and self._alive(store, job):
                self.job = job
                return True
            # None yet, or over: the next number (one rank moves it; the
            # others read it and come back here).
            store.compare_set(self.keys.job, str(number), str(number + 1))

    def _wait_for_a_running_job(self, store: dist.TCPStore) -> None:
        """Waits while the control process is younger than its heartbeat
        timeout and knows no job: a restarted one has an empty store until
        the running job's ranks reconnect and say that it runs (within
        their heartbeat interval), and a rank that came in that window
        would start a second job beside it. Ranks starting a new job pay
        this only when they start within a heartbeat timeout of the control
        process. Its start is its own wall clock: hosts' clocks must agree
        to well under the heartbeat timeout (NTP does)."""
        _, heartbeat_timeout = self._timeouts(store)
        started_at = float(store.get(self.keys.started_at))
        while store.add(self.keys.job, 0) == 0:
            if time.time() - started_at >= heartbeat_timeout:
                return
            time.sleep(START_POLL_S)

    def _alive(self, store: dist.TCPStore, job: JobKeys) -> bool:
        """Whether ``job``'s members beat within the heartbeat timeout."""
        _, heartbeat_timeout = self._timeouts(store)
        first = store.add(job.alive, 0)
        deadline = time.monotonic() + heartbeat_timeout
        while time.monotonic() < deadline:
            time.sleep(START_POLL_S)
            if store.add(job.alive, 0) != first:
                return True
        return False

    def mark_started(self) -> None:
        """Records that the job runs (new ranks then join it)."""
        self.in_job = True
        self.live_store().set(self.job.started, "1")

    def _connect_store(self) -> dist.TCPStore:
        return dist.TCPStore(
            self._host,
            self._port,
            is_master=False,
            timeout=self._connect_timeout,
            use_libuv=True,
        )

    def _client(self, store: dist.TCPStore) -> Any:
        """A client of the Lighthouse whose port the control process put in ``store``."""
        port = int(store.get(self.keys.lighthouse_port))
        return self._coordination.LighthouseClient(
            f"http://{self._host}:{port}", self._connect_timeout
        )

    def _timeouts(self, store: dist.TCPStore) -> tuple[float, float]:
        """The Lighthouse's join and heartbeat timeouts (s), as the control process wrote them."""
        join_timeout, heartbeat_timeout = map(float, store.get(self.keys.timeouts).split())
        return join_timeout, heartbeat_timeout

    def _lighthouse(self) -> tuple[Any, float, float]:
        """A client of the Lighthouse, and its join and heartbeat timeouts (s)."""
        return self._client(self.store), *self._timeouts(self.store)

    def _heartbeats(self, interval: float, stop: threading.Event) -> None:
        client = store = None
        while not stop.wait(interval):
            try:
                if not self.beating.is_set():
                    continue
                if client is None or store is None:
                    store, client = self._lighthouse_from_new_store()
                client.heartbeat(self.replica_id, timeout=self._connect_timeout)
                if self.in_job:
                    store.add(self.job.alive, 1)
            except Exception:  # the control process may be down: keep trying
                client = store = None

    def _lighthouse_from_new_store(self) -> tuple[dist.TCPStore, Any]:
        # Its own store client: TCPStore clients are not shared across threads
        # here. A restarted control process has an empty store: say again
        # that the job runs, and its number, so a new rank joins it instead
        # of starting one.
        store = self._connect_store()
        if self.in_job:
            if store.add(self.keys.job, 0) < self.job.job:
                store.set(self.keys.job, str(self.job.job))
            store.set(self.job.started, "1")
        return store, self._client(store)

    # -- joining ----------------------------------------------------------
    #
    # A joiner must not wait in a quorum request while the members train:
    # the Lighthouse counts its wait from that request, and once it exceeds
    # the join timeout a quorum may form with the joiner and only some of
    # the members. So a joiner announces itself, waits in the store until a
    # synchronization point admits it, marks itself requesting and asks;
    # the members wait for that mark before they ask, and ask again if the
    # quorum they got misses an admitted joiner that is still alive. The
    # joiner holds quorums to the members' rules: it reads the members and
    # the joiners admitted with it, and asks again when the members would.

    def announce_join(self) -> int:
        """Announces this rank as a joiner; returns its number."""
        self.beating.clear()
        number = self.store.add(self.job.joins, 1)
        self.store.set(self.job.joiner(number), self.replica_id)
        return number

    def admit_joins(self, handled: int, members: tuple[str, ...]) -> tuple[int, list[str]]:
        """Admits the joiners announced after the first ``handled`` (rank 0,
        at a synchronization point of a view of ``members``): returns the new
        count handled and the replica ids admitted."""
        try:
            announced = self.store.add(self.job.joins, 0)
            if announced < handled:  # a restarted control process: a new store
                handled = 0
            admitted: list[str] = []
            number = handled
            while number < announced and self.store.check([self.job.joiner(number + 1)]):
                number += 1
                admitted.append(self.store.get(self.job.joiner(number)).decode())
            if number > handled:
                self.store.set(self.job.members, f"{','.join(members)};{','.join(admitted)}")
                self.store.set(self.job.admitted, str(number))
        except Exception:  # the control process is down: training goes on
            self._reconnect_in_background()
            return handled, []
        return number, admitted

    def _reconnect_in_background(self) -> None:
        """A new store client for the next synchronization point, made on a
        thread: connecting retries up to its timeout, which must not hold
        up the other ranks at this one."""
        if self._reconnecting is not None and self._reconnecting.is_alive():
            return

        def reconnect(stop: threading.Event) -> None:
            with contextlib.suppress(Exception):
                self.store = self._connect_store()

        self._reconnecting = StoppableThread(reconnect, (), "distlearn-elastic-reconnect")

    def wait_for_joiners(self, joiners: list[str], bound: float) -> None:
        """Waits (at most ``bound`` seconds) until each admitted joiner marked
        itself requesting, plus two Lighthouse ticks for its request to land.
        The control process being down ends the wait (the change then finds
        out whether the joiners came)."""
        keys = [self.job.requesting(joiner) for joiner in joiners]
        deadline = time.monotonic() + bound
        try:
            while keys and not self.live_store().check(keys) and time.monotonic() < deadline:
                time.sleep(START_POLL_S)
        except Exception:
            return
        time.sleep(2 * LIGHTHOUSE_TICK_S)

    def _wait_for_admission(self, number: int, deadline: float) -> tuple[str, ...]:
        """Waits until a synchronization point admits join ``number``;
        returns the joiners admitted with it (the members expect them)."""
        while time.monotonic() < deadline:
            store = self.live_store()
            if store.check([self.job.admitted]) and int(store.get(self.job.admitted)) >= number:
                members, admitted = store.get(self.job.members).decode().split(";")
                self._previous = tuple(members.split(","))
                self.beating.set()
                store.set(self.job.requesting(self.replica_id), "1")
                return tuple(a for a in admitted.split(",") if a != self.replica_id)
            time.sleep(START_POLL_S)
        raise CommunicationError(
            "elastic membership: this rank's join was not admitted in time (the job's ranks "
            "add joiners at their synchronization points)",
            operation="membership",
            ranks=[],
            rank=-1,
        )

    def agree(
        self,
        *,
        progress: int,
        min_size: int,
        deadline: float,
        join: bool = False,
        newcomer: bool = False,
        expected: tuple[str, ...] = (),
    ) -> View:
        """The next view, agreed with the Lighthouse: asks for quorums until
        one holds this rank, at least ``min_size`` ranks and (for a few
        tries) every rank of ``expected``. ``join``: this rank joins a
        running job (see above); ``newcomer``: it starts a new job, or joins
        the job once one runs (another rank may have started it, or a
        restarted control process not have heard of it yet in its first
        moments). A control process that is down is asked
        again (a new store client each time) until ``deadline``
        (``time.monotonic()``), then CommunicationError. A rank whose
        request goes unanswered for long (the others formed a view without
        it) joins as a new rank."""
        last_error: Exception | None = None
        misses = 0
        waiting_since = time.monotonic()
        minority_since: float | None = None  # refusing quorums without most of the last view
        if not join:
            self.beating.set()
        while time.monotonic() < deadline:
            try:
                store = self.live_store()
                if newcomer and store.check([self.job.started]):
                    join, newcomer, min_size = True, False, 1
                if join:
                    expected = self._wait_for_admission(self.announce_join(), deadline)
                    join = False
                client, join_timeout, heartbeat_timeout = self._lighthouse()
                patience = max(REQUEST_FLOOR_S, 3 * max(join_timeout, heartbeat_timeout))
                request = max(0.1, min(patience, deadline - time.monotonic()))
                # See NOTE [Most of the last view]: this rank gave up waiting for the others.
                gave_up = (
                    minority_since is not None and time.monotonic() - minority_since > patience
                )
                quorum = client.quorum(
                    replica_id=self.replica_id,
                    timeout=datetime.timedelta(seconds=request),
                    step=progress,
                    data={"generation": self.generation, "gave_up": gave_up},
                )
            except TimeoutError as error:
                last_error = error
                logger.info("elastic: no quorum with this rank in time; it joins as a new rank")
                join = True  # left out: ask to be added at the next synchronization point
                continue
            except CommunicationError:
                raise
            except Exception as error:  # the control process is down
                last_error = error
                logger.info("elastic: the control process did not answer (%s)", error)
                time.sleep(START_POLL_S)
                try:
                    self.store = self._connect_store()
                except Exception as store_error:
                    last_error = store_error
                continue
            members = tuple(member.replica_id for member in quorum.participants)
            if self.replica_id not in members or len(members) < min_size:
                if time.monotonic() - waiting_since > WAITING_LOG_S:
                    waiting_since = time.monotonic()
                    logger.warning(
                        "elastic: waiting for the world to fill: %d of %d ranks asked (the "
                        "others not started yet, or started with another control address "
                        "or secret?)",
                        len(members),
                        min_size,
                    )
                time.sleep(START_POLL_S)
                continue
            if newcomer and self.live_store().check([self.job.started]):
                continue  # a job runs: join it (at the loop's top) rather than start one
            if any(e not in members for e in expected) and misses < EXPECTED_TRIES:
                misses += 1  # every member got this quorum: all ask again
                logger.info(
                    "elastic: quorum %d misses an admitted joiner; asking again", quorum.quorum_id
                )
                continue
            kept = sum(m in members for m in self._previous)
            if 2 * kept < len(self._previous):
                if minority_since is None:
                    minority_since = time.monotonic()
                # NOTE [Most of the last view]
                if not all(m.data.get("gave_up") for m in quorum.participants):
                    logger.info(
                        "elastic: quorum %d holds %d of the last view's %d ranks; asking again",
                        quorum.quorum_id,
                        kept,
                        len(self._previous),
                    )
                    time.sleep(START_POLL_S)
                    continue
                logger.warning(
                    "elastic: quorum %d holds %d of the last view's %d ranks, the others gone "
                    "for %.0f s: going on without them",
                    quorum.quorum_id,
                    kept,
                    len(self._previous),
                    time.monotonic() - minority_since,
                )
            generation = 1 + max(int(m.data["generation"]) for m in quorum.participants)
            joined = tuple(m for m in members if m not in self._known and m != self.replica_id)
            self._known.update(members)
            self._previous = members
            self.generation = generation
            logger.info(
                "elastic: quorum %d, generation %d: rank %d of %d",
                quorum.quorum_id,
                generation,
                members.index(self.replica_id),
                len(members),
            )
            return View(
                rank=members.index(self.replica_id),
                world_size=len(members),
                members=members,
                prefix=self.job.view(quorum.quorum_id, generation),
                joined=joined,
            )
        raise CommunicationError(
            f"elastic membership: no view with this rank and at least {min_size} ranks was "
            f"agreed in time (last error: {last_error})",
            operation="membership",
            ranks=[],
            rank=-1,
        )

    def close(self) -> None:
        """Stops the heartbeats (the Lighthouse counts this rank dead after
        its heartbeat timeout) and waits for this object's threads, each
        call of theirs bounded by the connect timeout (NOTE [Threads at
        exit]: a thread left in a call can abort the process's exit)."""
        bound = 2 * self._connect_timeout.total_seconds()
        for thread in (self._beating, self._reconnecting):
            if thread is not None:
                thread.close(bound)
