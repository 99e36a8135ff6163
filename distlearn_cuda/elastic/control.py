"""The control process of an elastic job: where ranks meet, and who is in it.

    DISTLEARN_ELASTIC_SECRET=... python -m distlearn_cuda.elastic.control \
        [--host 127.0.0.1] [--port 29400] [--min-ranks 1] [--heartbeat-timeout 5]
        [--join-timeout 60] [--lighthouse-port 0]

It hosts two things and nothing else (it holds no model state, and training
goes on while it is down until membership changes):

- the TCPStore the ranks meet on (``--port``): each membership view's gloo
  group is made on it under a prefix never used before;
- torchft's Lighthouse (``--lighthouse-port``, any free port by default),
  the authority on membership: it hears every rank's heartbeat and computes
  the quorum (the ranks of the next view) when ranks ask for one. Its port
  is published in the store, so ranks need only the store's address.

Lighthouse rules that decide timings (torchft 0.2): a rank that has not
sent a heartbeat for ``--heartbeat-timeout`` seconds is dead; a quorum
forms when at least ``--min-ranks`` ranks ask, more than half of the live
ones, and either every live rank asked or ``--join-timeout`` seconds passed
since the first asked; when every member of the previous view asks again,
it forms at once. After a loss, a survivor that learns of it from its
collective deadline (a peer stalled, or the collective's ring broke beyond
its neighbours) asks up to that deadline later than the others: keep
``--join-timeout`` above the ranks' ``timeout``, or it may be left out of
the next view (it then joins again at the next synchronization point). The
cost of a long join timeout is paid only while a live rank does not ask.

Security (see ``_keys``): it listens on 127.0.0.1 unless ``--host`` says
otherwise, and every key of its jobs is named from a secret the ranks share
(``DISTLEARN_ELASTIC_SECRET``, or ``DISTLEARN_ELASTIC_SECRET_FILE``); with
neither set it makes one and prints it on stderr for the ranks.

Prints one line, ``distlearn_cuda elastic control: store HOST:PORT
lighthouse PORT``, once both listen; runs until SIGTERM or SIGINT. It serves
one job at a time, and any number of jobs one after another.
"""

from __future__ import annotations

import argparse
import datetime
import signal
import sys
import threading
import time

import torch.distributed as dist

from ._keys import CONTROL_KEY, SECRET_ENV, Keys, new_secret, read_secret
from ._membership import LIGHTHOUSE_TICK_S, import_torchft

__all__ = ["main", "store_port"]


# The first words of the line printed once the control process listens.
READY = "distlearn_cuda elastic control:"


def store_port(line: str) -> int:
    """The store's port in the line the control process prints once it
    listens; ValueError for any other line."""
    if not line.startswith(READY):
        raise ValueError(f"not the control process's ready line: {line!r}")
    return int(line.split(" store ")[1].split()[0].rsplit(":", 1)[1])


def bind_host(host: str) -> str:
    """The Lighthouse's bind address for the store's ``host`` (the ranks
    reach both at the same address)."""
    if host in ("0.0.0.0", "::", ""):
        return "[::]"
    return f"[{host}]" if ":" in host else host


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the store listens on (0.0.0.0: every interface; see the module on security)",
    )
    parser.add_argument("--port", type=int, default=29400, help="the store's port (0: any)")
    parser.add_argument("--lighthouse-port", type=int, default=0, help="0: any free port")
    parser.add_argument("--min-ranks", type=int, default=1, help="smallest world that trains")
    parser.add_argument("--heartbeat-timeout", type=positive_seconds, default=5.0)
    parser.add_argument(
        "--join-timeout",
        type=positive_seconds,
        default=60.0,
        help="longer than the ranks' collective timeout (see the module's doc)",
    )
    args = parser.parse_args(argv)
    if args.min_ranks < 1:
        parser.error("--min-ranks must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the control process with the command line ``argv`` (default:
    ``sys.argv[1:]``) until SIGTERM or SIGINT; returns the exit status."""
    args = parse_args(argv)
    secret = read_secret()
    if secret is None:
        secret = new_secret()
        print(
            f"distlearn_cuda elastic control: no secret given; the ranks need "
            f"{SECRET_ENV}={secret}",
            file=sys.stderr,
            flush=True,
        )
    keys = Keys(secret)
    lighthouse_server = import_torchft().LighthouseServer
    store = dist.TCPStore(
        args.host,
        args.port,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=60),
        use_libuv=True,
    )
    lighthouse = lighthouse_server(
        bind=f"{bind_host(args.host)}:{args.lighthouse_port}",
        min_replicas=args.min_ranks,
        join_timeout_ms=round(args.join_timeout * 1000),
        quorum_tick_ms=round(LIGHTHOUSE_TICK_S * 1000),
        heartbeat_timeout_ms=round(args.heartbeat_timeout * 1000),
    )
    lighthouse_port = int(lighthouse.address().rsplit(":", 1)[1])
    store.set(keys.lighthouse_port, str(lighthouse_port))
    store.set(keys.timeouts, f"{args.join_timeout} {args.heartbeat_timeout}")
    store.set(keys.started_at, repr(time.time()))
    store.set(CONTROL_KEY, "1")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"{READY} store {args.host}:{store.port} lighthouse {lighthouse_port}", flush=True)
    while not stop.wait(0.5):  # wakes for the signal handler
        pass
    lighthouse.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
