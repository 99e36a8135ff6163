"""An elastic job for the tests: a control process (TCPStore and torchft's
Lighthouse) and ranks running tests/elastic_worker.py, each writing its
events as JSON lines. Every wait has its own bound, and ``close()`` kills
every process, so a bug fails a test instead of hanging the suite."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from distlearn_cuda.elastic._keys import SECRET_ENV
from distlearn_cuda.elastic.control import store_port  # needs no torchft until it runs

SECRET = "tests-elastic-secret-0123456789"  # the control process's and the ranks'

WORKER = Path(__file__).with_name("elastic_worker.py")
ROOT = Path(__file__).resolve().parents[1]
# Lighthouse timeouts of the tests' control process (seconds): a lost rank
# is dropped from the next quorum one heartbeat timeout after its last beat.
HEARTBEAT_TIMEOUT = 2.0
# Longer than the ranks' collective deadline (3 s, elastic_worker.py): a
# survivor that learns of the loss only from its deadline is still waited for.
JOIN_TIMEOUT = 5.0
WAIT = 60.0  # the longest any single wait of a test may take
# The README's launch of one rank that is started again after it dies.
TORCHRUN = [
    sys.executable, "-m", "torch.distributed.run", "--standalone",
    "--nproc_per_node", "1", "--max-restarts", "1",
]  # fmt: skip


def port_outside_the_ephemeral_range() -> int:
    """A free port below the kernel's ephemeral range, for the control
    process's store: a restarted control process listens on the port the
    ranks know, and while it is down, a port of the ephemeral range may go
    to any outgoing connection (the ranks make many), so the restart could
    not listen (a suspected cause of one failure of fault seed 10)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 8192), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port below {low}")


def python_env() -> dict[str, str]:
    # The caller's PYTHONPATH stays: the GPU machine's torchft is carried there.
    # DISTLEARN_TEST_LIBRARY: another checkout's library under the same
    # tests (to show that a test fails on an older commit).
    library = os.environ.get("DISTLEARN_TEST_LIBRARY", str(ROOT))
    path = os.pathsep.join(p for p in (library, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", SECRET_ENV: SECRET}


class Job:
    """A control process and the ranks of one elastic job."""

    def __init__(self, tmp_path: Path, algo: str, world: int, device: str = "cpu") -> None:
        self.tmp_path, self.algo, self.world, self.device = tmp_path, algo, world, device
        self.stop_file = tmp_path / "stop"
        self.ranks: dict[str, subprocess.Popen] = {}
        self.control: subprocess.Popen | None = None
        self.port = port_outside_the_ephemeral_range()
        self.start_control()

    def start_control(self) -> None:
        log = open(self.tmp_path / "control.log", "a")
        self.control = subprocess.Popen(
            [
                sys.executable, "-m", "distlearn_cuda.elastic.control",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT),
                "--join-timeout", str(JOIN_TIMEOUT),
            ],
            stdout=subprocess.PIPE, stderr=log, text=True, env=python_env(),
            cwd=os.environ.get("DISTLEARN_TEST_LIBRARY"),  # python -m imports from the cwd
        )  # fmt: skip
        # The process prints it once it listens.
        self.port = store_port(self.control.stdout.readline())

    def hold(self, name: str, *extra: str) -> None:
        """Starts ``name`` now (its imports take seconds here) and has it
        join the job only at ``release(name)``."""
        self.start(name, *extra, "--wait-for", str(self.tmp_path / f"{name}.go"))

    def release(self, name: str) -> None:
        (self.tmp_path / f"{name}.go").touch()

    def start(self, name: str, *extra: str, pause: float = 0.02, torchrun: bool = False) -> None:
        """Starts rank ``name``: a plain process, or under ``TORCHRUN`` (then
        ``ranks[name]`` is torchrun's agent, and a worker it starts again
        writes its events as ``name+restart1``, see elastic_worker.py)."""
        with open(self.tmp_path / f"{name}.log", "w") as log:
            self.ranks[name] = subprocess.Popen(
                [
                    *(TORCHRUN if torchrun else [sys.executable]), str(WORKER),
                    f"127.0.0.1:{self.port}",
                    str(self.tmp_path / f"{name}.jsonl"), "--algo", self.algo,
                    "--world", str(self.world), "--stop", str(self.stop_file),
                    "--pause", str(pause), "--device", self.device, *extra,
                ],
                stdout=log, stderr=subprocess.STDOUT, env=python_env(),
            )  # fmt: skip

    def events(self, name: str, kind: str | None = None) -> list[dict]:
        path = self.tmp_path / f"{name}.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        parsed = [json.loads(line) for line in lines if line.endswith("}")]
        return [e for e in parsed if kind is None or e["event"] == kind]

    def wait_until(self, what: str, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(0.05)

    def steps_of(self, name: str) -> int:
        steps = [e["steps"] for e in self.events(name, "step")] or [
            e["steps"] for e in self.events(name, "view") if e["steps"] is not None
        ]
        return max(steps, default=-1)

    def view_of(self, name: str) -> str | None:
        """The prefix of ``name``'s current view (its last), or None."""
        views = self.events(name, "view")
        return views[-1]["prefix"] if views else None

    def views(self, name: str) -> list[int]:
        return [e["world"] for e in self.events(name, "view")]

    def finish(self, names: list[str], margin: int = 30) -> dict[str, dict]:
        """Stops the job ``margin`` steps past the furthest rank; waits for
        ``names`` to exit 0; returns their "done" events."""
        # Atomically (a rename): a rank that read the file while it was being
        # written saw it empty, took that for step 0 and stopped alone (fault
        # seed 2027's next job failed so: one rank done at step 7, the other
        # left alone in a view of its own).
        staged = self.stop_file.with_suffix(".staged")
        staged.write_text(str(max(self.steps_of(n) for n in names) + margin))
        os.replace(staged, self.stop_file)
        for name in names:
            try:
                code = self.ranks[name].wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} did not finish\n{self.logs()}") from None
            assert code == 0, f"{name} exited {code}\n{self.logs()}"
        return {name: self.events(name, "done")[-1] for name in names}

    def logs(self) -> str:
        """Each log's end, without C++ stack frames and c10d's socket
        warnings, which would crowd out the library's own lines."""
        parts = []
        for path in sorted(self.tmp_path.glob("*.log")):
            lines = [
                line
                for line in path.read_text().splitlines()
                if not re.match(r"(frame #\d+:|\[W\d{4} .*socket\.cpp)", line.lstrip())
            ]
            parts.append(f"--- {path.name}\n" + "\n".join(lines)[-4000:])
        return "\n".join(parts)

    def kill_ranks(self) -> None:
        """Kills every rank at once, the workers of torchrun's agents too
        (an agent killed with SIGKILL leaves its worker running)."""
        workers = [c for p in self.ranks.values() if p.poll() is None for c in children(p.pid)]
        for process in self.ranks.values():
            if process.poll() is None:
                process.kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.ranks.values():
            process.wait(timeout=10)

    def close(self) -> None:
        self.kill_ranks()
        if self.control is not None and self.control.poll() is None:
            self.control.kill()
            self.control.wait(timeout=10)


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux /proc); none once it is gone."""
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(child) for child in (task / "children").read_text().split()]
    except FileNotFoundError:
        pass
    return found


def mean64(vectors: list[list[float]]) -> list[float]:
    return [math.fsum(column) / len(vectors) for column in zip(*vectors, strict=True)]


# assert_close's bound for exact sums: float32 values against a float64 reference.
EXACT_TOL = 2e-6


def assert_close(
    got: list[float], want: list[float], tol: float = EXACT_TOL, what: str = ""
) -> None:
    worst = max(abs(g - w) / max(1.0, abs(w)) for g, w in zip(got, want, strict=True))
    assert worst <= tol, (
        f"{what}{': ' if what else ''}off by {worst:.3g} (relative; bound {tol:.3g})"
    )
