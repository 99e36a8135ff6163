"""Elastic mode: real processes, a real control process (TCPStore and
torchft's Lighthouse), gloo on 127.0.0.1, ranks killed with SIGKILL and
stalled with SIGSTOP, ranks joining a running job.

Each rank runs tests/elastic_worker.py and writes its events as JSON lines;
the tests read them back and check them against references computed here in
float64. Every wait has its own bound, and every process is killed at the
end of its test, so a bug fails a test instead of hanging the suite.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tensor_cases import needs_gpu

from distlearn_cuda.elastic.control import store_port  # needs no torchft until it runs

pytest.importorskip("torchft", reason="elastic mode needs torchft (the [elastic] extra)")

WORKER = Path(__file__).with_name("elastic_worker.py")
ROOT = Path(__file__).resolve().parents[1]
# Lighthouse timeouts of the tests' control process (seconds): a lost rank
# is dropped from the next quorum one heartbeat timeout after its last beat.
HEARTBEAT_TIMEOUT = 2.0
# Longer than the ranks' collective deadline (3 s, elastic_worker.py): a
# survivor that learns of the loss only from its deadline is still waited for.
JOIN_TIMEOUT = 5.0
WAIT = 60.0  # the longest any single wait of a test may take


def python_env() -> dict[str, str]:
    # The caller's PYTHONPATH stays: the GPU machine's torchft is carried there.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


class Job:
    """A control process and the ranks of one elastic job."""

    def __init__(self, tmp_path: Path, algo: str, world: int, device: str = "cpu") -> None:
        self.tmp_path, self.algo, self.world, self.device = tmp_path, algo, world, device
        self.stop_file = tmp_path / "stop"
        self.ranks: dict[str, subprocess.Popen] = {}
        self.control: subprocess.Popen | None = None
        self.port = 0
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
        )  # fmt: skip
        # The process prints it once it listens.
        self.port = store_port(self.control.stdout.readline())

    def hold(self, name: str, *extra: str) -> None:
        """Starts ``name`` now (its imports take seconds here) and has it
        join the job only at ``release(name)``."""
        self.start(name, *extra, "--wait-for", str(self.tmp_path / f"{name}.go"))

    def release(self, name: str) -> None:
        (self.tmp_path / f"{name}.go").touch()

    def start(self, name: str, *extra: str, pause: float = 0.02) -> None:
        with open(self.tmp_path / f"{name}.log", "w") as log:
            self.ranks[name] = subprocess.Popen(
                [
                    sys.executable, str(WORKER), f"127.0.0.1:{self.port}",
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

    def views(self, name: str) -> list[int]:
        return [e["world"] for e in self.events(name, "view")]

    def finish(self, names: list[str], margin: int = 30) -> dict[str, dict]:
        """Stops the job ``margin`` steps past the furthest rank; waits for
        ``names`` to exit 0; returns their "done" events."""
        self.stop_file.write_text(str(max(self.steps_of(n) for n in names) + margin))
        for name in names:
            try:
                code = self.ranks[name].wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} did not finish\n{self.logs()}") from None
            assert code == 0, f"{name} exited {code}\n{self.logs()}"
        return {name: self.events(name, "done")[-1] for name in names}

    def logs(self) -> str:
        parts = []
        for path in sorted(self.tmp_path.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text()[-3000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        for process in [*self.ranks.values(), self.control]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture
def make_job(tmp_path: Path) -> Iterator[Callable[..., Job]]:
    jobs: list[Job] = []

    def make(algo: str, world: int, device: str = "cpu") -> Job:
        jobs.append(Job(tmp_path, algo, world, device))
        return jobs[-1]

    yield make
    for job in jobs:
        job.close()


def mean64(vectors: list[list[float]]) -> list[float]:
    return [math.fsum(column) / len(vectors) for column in zip(*vectors, strict=True)]


def assert_close(got: list[float], want: list[float], tol: float = 2e-6) -> None:
    worst = max(abs(g - w) / max(1.0, abs(w)) for g, w in zip(got, want, strict=True))
    assert worst <= tol, f"off by {worst:.3g} (relative)"


# On a GPU every rank shares the one device, over gloo (NCCL refuses two
# ranks on one device): the CUDA kernels, and the state handed over from and
# to CUDA tensors.
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("algo", ["sgd", "ea"])
def test_survivors_carry_on_after_a_kill_and_a_new_rank_joins(
    make_job, algo: str, device: str
) -> None:
    job = make_job(algo, world=4, device=device)
    names = ["r0", "r1", "r2", "r3"]
    for name in names:
        job.start(name)
    job.hold("joiner")
    job.wait_until("the job to train", lambda: all(job.steps_of(n) >= 15 for n in names))
    killed = names[2]
    job.ranks[killed].send_signal(signal.SIGKILL)
    survivors = [n for n in names if n != killed]
    job.wait_until(
        "the survivors to agree on 3 ranks and train on",
        lambda: all(3 in job.views(n) and job.steps_of(n) >= 45 for n in survivors),
    )
    job.release("joiner")
    job.wait_until("the joiner to join", lambda: 4 in job.views("joiner"))
    done = job.finish([*survivors, "joiner"])
    last_step = done["joiner"]["steps"]

    for name in survivors:
        assert job.views(name)[:2] == [4, 3], job.views(name)
        assert job.views(name)[-1] == 4  # the joiner made it 4 again
    assert all(d["world"] == 4 and d["steps"] == last_step for d in done.values())
    joiner_view = job.events("joiner", "view")[0]
    joiner_start = job.events("joiner", "started")[0]
    assert joiner_view["world"] == 4
    source = next(
        e for n in survivors for e in job.events(n, "view")
        if e["prefix"] == joiner_view["prefix"] and e["rank"] == 0
    )  # fmt: skip
    # The joiner starts from the furthest rank's state, bitwise, and at its step.
    assert joiner_start["params"] == source["params"]
    assert joiner_start["steps"] == source["steps"]
    if algo == "ea":
        assert joiner_start["center"] == source["center"]
    # The extra state (an epoch counter) came along.
    assert joiner_start["epoch"] >= 4

    # Each dropped view's algorithm object was freed (no cycle kept it).
    for name in [*survivors, "joiner"]:
        assert {e["alive"] for e in job.events(name, "step")} == {1}, name

    final = [d["params"] if algo == "sgd" else d["center"] for d in done.values()]
    assert all(f == final[0] for f in final), "ranks disagree at the end"
    if algo == "sgd":
        # After the loss: the averaged gradient is the mean of the three
        # survivors' own gradients, computed here in float64.
        by_step: dict[int, dict[str, dict]] = {}
        for name in survivors:
            for e in job.events(name, "step"):
                if e["world"] == 3 and not e["skipped"]:
                    by_step.setdefault(e["steps"], {})[name] = e
        complete = [s for s, ranks in by_step.items() if len(ranks) == 3]
        assert len(complete) >= 10
        for step in complete:
            events = by_step[step]
            want = mean64([e["local"] for e in events.values()])
            for e in events.values():
                assert_close(e["mean"], want)


def test_a_stall_a_control_restart_and_a_joiner_lost_mid_change(make_job) -> None:
    job = make_job("sgd", world=3)
    names = ["r0", "r1", "r2"]
    for name in names:
        job.start(name)
    job.hold("lost", "--die-in-view")
    job.hold("joiner")
    job.wait_until("the job to train", lambda: all(job.steps_of(n) >= 15 for n in names))

    # A stalled rank is lost once its peers' deadline passes (3 s).
    job.ranks["r2"].send_signal(signal.SIGSTOP)
    survivors = ["r0", "r1"]
    job.wait_until(
        "the survivors to drop the stalled rank",
        lambda: all(job.views(n)[-1:] == [2] for n in survivors),
    )
    job.ranks["r2"].kill()

    # Without its control process the job trains on.
    job.control.kill()
    job.control.wait(timeout=10)
    before = min(job.steps_of(n) for n in survivors)
    job.wait_until(
        "training without the control process",
        lambda: all(job.steps_of(n) >= before + 20 for n in survivors),
    )
    job.start_control()  # on the same port: an empty store, a new Lighthouse

    # A joiner lost after the quorum and before it has the state: the
    # change is retried without it.
    job.release("lost")
    job.wait_until("the joiner to die mid-change", lambda: job.events("lost", "dying"))
    assert job.ranks["lost"].wait(timeout=WAIT) == 3
    views_before = {n: len(job.views(n)) for n in survivors}
    job.release("joiner")
    job.wait_until("the next joiner to join", lambda: 3 in job.views("joiner"))
    done = job.finish([*survivors, "joiner"])

    assert all(d["world"] == 3 for d in done.values())
    final = [d["params"] for d in done.values()]
    assert all(f == final[0] for f in final)
    for name in survivors:
        assert job.views(name)[:2] == [3, 2]
        assert len(job.views(name)) > views_before[name]


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return found


def test_digits_elastic_survives_a_killed_rank_restarted_by_torchrun(tmp_path: Path) -> None:
    # The launch the README gives: a control process, then one process per
    # rank; the third under torchrun --nproc_per_node 1 --max-restarts 1,
    # which starts it again after it is killed, and it joins again.
    job = Job(tmp_path, "sgd", world=3)
    try:
        common = [
            "-m", "distlearn_cuda.examples.digits", "--elastic", f"127.0.0.1:{job.port}",
            "--world", "3", "--elastic-timeout", "3", "--epochs", "20",
            "--elastic-backend", "gloo",
        ]  # fmt: skip
        torchrun = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "1", "--max-restarts", "1",
        ]  # fmt: skip
        commands = {
            "d0": [sys.executable, *common],
            "d1": [sys.executable, *common],
            "d2": [*torchrun, *common],
        }
        for name, command in commands.items():
            with open(tmp_path / f"{name}.log", "w") as log:
                job.ranks[name] = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=python_env()
                )
        logs = [tmp_path / f"{name}.log" for name in commands]
        # Rank 0 prints; the ranks are ordered by start time, whoever that is.
        job.wait_until("epoch 1", lambda: any("epoch 1 " in p.read_text() for p in logs))
        (worker,) = children(job.ranks["d2"].pid)
        os.kill(worker, signal.SIGKILL)
        for name in commands:
            assert job.ranks[name].wait(timeout=WAIT) == 0, job.logs()
        lines = [line for p in logs for line in p.read_text().splitlines()]
        # Lost, then back after torchrun's restart, in the log of one rank 0.
        sizes = [
            [int(line.split("ranks ")[1].split()[0]) for line in p.read_text().splitlines()
             if line.startswith("epoch ")]
            for p in logs
        ]  # fmt: skip
        assert any(2 in s and s[-1] == 3 and 3 in s[s.index(2) :] for s in sizes), sizes
        final = [line for line in lines if line.startswith("final test accuracy")]
        assert final and all(float(f.split()[-1].rstrip("%")) >= 95.0 for f in final), final
    finally:
        job.close()


@needs_gpu
def test_nccl_views_are_made_aborted_and_made_again_in_a_loop(tmp_path: Path) -> None:
    """Issue 14's GPU check: each pass fails the view's NCCL communicator
    (a collective past its deadline: revoked, or aborted where NCCL has no
    ncclCommRevoke), and the step completes on a new view with a new
    communicator; nothing hangs, nothing accumulates."""
    import torch

    if not torch.distributed.is_nccl_available():
        pytest.skip("torch has no NCCL")
    job = Job(tmp_path, "sgd", world=1)
    loops = 6
    try:
        done = subprocess.run(
            [sys.executable, str(WORKER.with_name("elastic_nccl_loop.py")),
             f"127.0.0.1:{job.port}", str(loops)],
            capture_output=True, text=True, timeout=120, env=python_env(),
        )  # fmt: skip
    finally:
        job.close()
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    passes, closed = records[:-1], records[-1]
    assert len(passes) == loops + 1, done.stdout
    prefixes = [p["prefix"] for p in passes]
    assert len(set(prefixes)) == loops + 1, prefixes  # a new view (group, communicator) each pass
    assert all(p["prefix_before"] != p["prefix"] for p in passes[1:])
    assert all(p["gradients_intact"] for p in passes)  # the failed step ran again, whole
    assert [p["steps"] for p in passes] == list(range(1, loops + 2))
    assert all(p["open_communicators"] == 1 for p in passes)
    assert all(p["failed_closed"] for p in passes[1:])
    if passes[0]["nccl_version"] >= 22900:  # ncclCommRevoke is in every NCCL since 2.29
        assert all(p["failed_revoked"] for p in passes[1:])
    assert closed == {"closed": True, "open_communicators": 0}
    # From the first re-made view on, the same threads, the same tensors, and
    # no growth of the device memory outside torch's allocator (NCCL's
    # buffers among it; torch's cache grows in 20 MiB segments, not counted).
    assert passes[-1]["threads"] == passes[1]["threads"], [p["threads"] for p in passes]
    assert passes[-1]["allocated_bytes"] == passes[1]["allocated_bytes"]
    outside = [p["outside_torch_bytes"] for p in passes]
    assert outside[-1] - outside[1] <= 2 << 20, outside


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"control": "no-port"}, ValueError, "control"),
        ({"control": 29400}, TypeError, "control"),
        ({"model": [1.0]}, TypeError, "model"),
        ({"optimizer": "sgd"}, TypeError, "optimizer"),
        ({"world_size": 0}, ValueError, "world_size"),
        ({"world_size": True}, ValueError, "world_size"),
        ({"retries": -1}, ValueError, "retries"),
        ({"heartbeat_interval": 0}, ValueError, "heartbeat_interval"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"join_wait": "long"}, TypeError, "timeout"),
        ({"on_change": 3}, TypeError, "on_change"),
        ({"extra_state": (dict,)}, TypeError, "extra_state"),
        ({"backend": "mpi"}, ValueError, "backend"),
        ({"backend": 1}, TypeError, "backend"),
    ],
)
@pytest.mark.parametrize("algo", ["sgd", "ea"])
def test_bad_arguments_are_refused_before_anything_connects(
    algo: str, kwargs: dict, error: type, names: str
) -> None:
    import torch

    from distlearn_cuda import elastic

    model = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in model.parameters()]
    arguments = {"control": "127.0.0.1:1", "model": model, **kwargs}
    kind = elastic.ElasticSGD if algo == "sgd" else elastic.ElasticEA
    with pytest.raises(error, match=names):
        kind(arguments.pop("control"), arguments.pop("model"), **arguments)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_nccl_backend_without_cuda_is_refused_naming_the_argument() -> None:
    import torch

    from distlearn_cuda import elastic

    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        pytest.skip("this machine has CUDA and NCCL: backend='nccl' is valid here")
    with pytest.raises(ValueError, match="backend='nccl' needs CUDA"):
        elastic.ElasticSGD("127.0.0.1:1", torch.nn.Linear(2, 2), backend="nccl")


def test_control_rejects_bad_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "distlearn_cuda.elastic.control", "--min-ranks", "0"],
        capture_output=True, text=True, timeout=60, env=python_env(),
    )  # fmt: skip
    assert done.returncode == 2 and "--min-ranks" in done.stderr
