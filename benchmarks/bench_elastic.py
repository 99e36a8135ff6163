"""Elastic mode's costs: a step when nothing fails, a lost rank, a joining rank.

    python -m benchmarks.bench_elastic [--ranks 3] [--trials 3] [--steps 200] [--out DIR]

``--ranks``: the job's size in every measurement (at least 2).

Real processes over gloo on this machine, each rank one torch thread, an MLP
of 1.1M parameters (256-1024-768-10; a step's compute is several times its
allreduce here), batch 32, plain SGD. Three measurements, ``--trials``
times each:

- **step time when nothing fails**: the median step (forward, backward,
  gradient averaging, optimizer step) of ``--steps`` steps, averaging with
  ``AllReduceSGD`` in a torchrun-style world and with ``ElasticSGD`` under a
  control process, both synchronizing parameters every 20 steps (for
  ``ElasticSGD`` that is also where joiners are added); the two alternate
  trial by trial (plain first);
- **loss to next step**: a job of ``--ranks`` ranks loses one to SIGKILL;
  the time from the kill to the first step the survivors complete together
  after it (the latest survivor's), with the control process's heartbeat
  timeout of 2 s;
- **joiner to training**: a rank started while the job runs; from its start
  (``Popen``) and from its first quorum to its first completed step. It
  joins at the job's next synchronization point (every 20 steps);
- **loss with a replacement at once**: the same kill, with the replacement
  started in the same moment (``torchrun --max-restarts`` or a hot spare):
  the time from the kill to the survivors' next step, and to the
  replacement's first step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from distlearn_cuda.elastic.control import store_port

from .harness import machine_info, markdown_table, write_files

DEFAULT_OUT = Path(__file__).parent / "results"
SYNC_EVERY = 20
HEARTBEAT_TIMEOUT_S = 2.0
ROOT = Path(__file__).resolve().parents[1]


def rank_main(argv: list[str]) -> None:
    """One rank: trains until the stop file's step, logging each step's end time."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("plain", "elastic"), required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--stop", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args(argv)
    import torch
    import torch.distributed as dist
    from torch import nn

    import distlearn_cuda as dl
    from distlearn_cuda.elastic import ElasticSGD

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 768), nn.ReLU(), nn.Linear(768, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    log = open(args.log, "a", buffering=1)
    quorum = {"t": None}
    if args.mode == "plain":
        host, port = args.address.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), args.world, is_master=args.rank == 0)
        dist.init_process_group("gloo", store=store, rank=args.rank, world_size=args.world)
        job = dl.AllReduceSGD()

        def average() -> None:
            job.sum_and_normalize_gradients(model)

        steps = lambda: count  # noqa: E731
    else:

        def on_change(view: object) -> None:
            quorum["t"] = quorum["t"] or time.time()

        job = ElasticSGD(args.address, model, optimizer, world_size=args.world, timeout=10,
                         on_change=on_change)  # fmt: skip
        average = job.sum_and_normalize_gradients
        steps = lambda: job.steps  # noqa: E731
    log.write(json.dumps({"quorum": quorum["t"]}) + "\n")
    count = 0
    stop = Path(args.stop)
    generator = torch.Generator().manual_seed(os.getpid())
    while not (stop.exists() and steps() >= int(stop.read_text() or 0)):
        x, y = torch.randn(32, 256, generator=generator), torch.randint(0, 10, (32,))
        nn.functional.cross_entropy(model(x), y).backward()
        average()
        optimizer.step()
        optimizer.zero_grad()
        count += 1
        log.write(json.dumps({"step": steps(), "t": time.time()}) + "\n")
        if steps() % SYNC_EVERY == 0:  # like for like: both synchronize
            if args.mode == "elastic":
                job.synchronize_parameters()
            else:
                job.synchronize_parameters(model, optimizer=optimizer)
    job.close()
    if args.mode == "plain":
        dist.destroy_process_group()


class Run:
    """The processes of one measured job."""

    def __init__(self, out: Path, name: str) -> None:
        self.dir = out / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stop = self.dir / "stop"
        self.stop.unlink(missing_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.control: subprocess.Popen | None = None

    def start_control(self) -> str:
        self.control = subprocess.Popen(
            [sys.executable, "-m", "distlearn_cuda.elastic.control", "--host", "127.0.0.1",
             "--port", "0", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S),
             "--join-timeout", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env(),
        )  # fmt: skip
        return f"127.0.0.1:{store_port(self.control.stdout.readline())}"

    def start(self, name: str, *args: str) -> None:
        self.started[name] = time.time()
        log = self.dir / f"{name}.jsonl"
        log.unlink(missing_ok=True)
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_elastic", "--rank-process", *args,
             "--stop", str(self.stop), "--log", str(log)],
            env=env(), stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def records(self, name: str) -> list[dict]:
        path = self.dir / f"{name}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def steps(self, name: str) -> list[dict]:
        return [r for r in self.records(name) if "step" in r]

    def wait(self, condition: object, bound: float = 120.0) -> None:
        deadline = time.monotonic() + bound
        while not condition():
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"bench_elastic: timed out in {self.dir}")
            time.sleep(0.05)

    def finish(self, names: list[str], margin: int) -> None:
        self.stop.write_text(str(max(self.steps(n)[-1]["step"] for n in names) + margin))
        for name in names:
            self.processes[name].wait(timeout=120)

    def close(self) -> None:
        for process in [*self.processes.values(), self.control]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)


# The control process's and the ranks' shared secret (a benchmark's own).
SECRET = "bench-elastic-secret-0123456789"


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "DISTLEARN_ELASTIC_SECRET": SECRET,
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def median_step_ms(records: list[dict]) -> float:
    times = [r["t"] for r in records]
    # The first tenth warms up; each step's time is the gap to the previous end.
    start = len(times) // 10
    return 1000 * statistics.median(b - a for a, b in itertools.pairwise(times[start:]))


def step_time(out: Path, mode: str, ranks: int, steps: int, trial: int) -> float:
    run = Run(out, f"{mode}-{trial}")
    try:
        names = [f"r{i}" for i in range(ranks)]
        if mode == "plain":
            address = f"127.0.0.1:{free_port()}"
            for i, name in enumerate(names):
                run.start(name, "--mode", "plain", "--address", address, "--rank", str(i),
                          "--world", str(ranks))  # fmt: skip
        else:
            address = run.start_control()
            for name in names:
                run.start(name, "--mode", "elastic", "--address", address, "--world", str(ranks))
        run.stop.write_text(str(steps))
        for name in names:
            run.processes[name].wait(timeout=300)
        return statistics.median(median_step_ms(run.steps(n)) for n in names)
    finally:
        run.close()


def loss_and_join(out: Path, ranks: int, trial: int) -> tuple[float, float, float]:
    """(kill to the survivors' next step, joiner start to its first step,
    joiner's first quorum to its first step), in seconds."""
    run = Run(out, f"faults-{trial}")
    try:
        address, survivors, killed_at = _kill_one(run, ranks)
        recovered = _next_step_together(run, survivors, killed_at)
        run.start("joiner", "--mode", "elastic", "--address", address, "--world", str(ranks))
        run.wait(lambda: len(run.steps("joiner")) >= 1)
        first = run.steps("joiner")[0]["t"]
        quorum = run.records("joiner")[0]["quorum"]
        run.finish([*survivors, "joiner"], margin=2 * SYNC_EVERY)
        return recovered - killed_at, first - run.started["joiner"], first - quorum
    finally:
        run.close()


def loss_with_replacement(out: Path, ranks: int, trial: int) -> tuple[float, float]:
    """A replacement started the moment a rank is killed: (kill to the
    survivors' next step, kill to the replacement's first step), in seconds."""
    run = Run(out, f"replaced-{trial}")
    try:
        address, survivors, killed_at = _kill_one(run, ranks)
        run.start("replacement", "--mode", "elastic", "--address", address, "--world", str(ranks))
        recovered = _next_step_together(run, survivors, killed_at)
        run.wait(lambda: len(run.steps("replacement")) >= 1)
        first = run.steps("replacement")[0]["t"]
        run.finish([*survivors, "replacement"], margin=2 * SYNC_EVERY)
        return recovered - killed_at, first - killed_at
    finally:
        run.close()


def _kill_one(run: Run, ranks: int) -> tuple[str, list[str], float]:
    """Starts a job of ``ranks``, lets it train, kills its last rank;
    returns the address, the survivors, the kill time."""
    address = run.start_control()
    names = [f"r{i}" for i in range(ranks)]
    for name in names:
        run.start(name, "--mode", "elastic", "--address", address, "--world", str(ranks))
    run.wait(lambda: all(len(run.steps(n)) >= 30 for n in names))
    victim, survivors = names[-1], names[:-1]
    killed_at = time.time()
    run.processes[victim].send_signal(signal.SIGKILL)
    return address, survivors, killed_at


def _next_step_together(run: Run, survivors: list[str], killed_at: float) -> float:
    """When the survivors' first step completed by all of them after the
    kill ended (the latest survivor's end)."""
    run.wait(lambda: all(any(r["t"] > killed_at + 0.5 for r in run.steps(n)) for n in survivors))
    firsts = [min(r["step"] for r in run.steps(n) if r["t"] > killed_at) for n in survivors]
    step = max(firsts)
    return max(
        r["t"] for n in survivors for r in run.steps(n) if r["step"] == step and r["t"] > killed_at
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank-process"]:
        rank_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_elastic"
    rows = []
    if args.ranks < 2:
        parser.error("--ranks: a job that loses a rank needs at least 2")
    for trial in range(args.trials):
        plain = step_time(work, "plain", args.ranks, args.steps, trial)
        elastic = step_time(work, "elastic", args.ranks, args.steps, trial)
        loss, join_start, join_quorum = loss_and_join(work, args.ranks, trial)
        replaced_loss, replaced_first = loss_with_replacement(work, args.ranks, trial)
        rows.append(
            {"trial": trial + 1, "plain_step_ms": plain, "elastic_step_ms": elastic,
             "ratio": elastic / plain, "loss_to_step_s": loss, "joiner_start_to_step_s":
             join_start, "joiner_quorum_to_step_s": join_quorum,
             "replaced_loss_to_step_s": replaced_loss,
             "replacement_kill_to_step_s": replaced_first}
        )  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    table = markdown_table(
        ["trial", "plain step ms", "elastic step ms", "elastic / plain",
         "kill to next step s", "joiner start to step s", "joiner quorum to step s",
         "replaced: kill to next step s", "replaced: kill to replacement's step s"],
        [[str(r["trial"]), f"{r['plain_step_ms']:.2f}", f"{r['elastic_step_ms']:.2f}",
          f"{r['ratio']:.3f}", f"{r['loss_to_step_s']:.2f}", f"{r['joiner_start_to_step_s']:.2f}",
          f"{r['joiner_quorum_to_step_s']:.2f}", f"{r['replaced_loss_to_step_s']:.2f}",
          f"{r['replacement_kill_to_step_s']:.2f}"] for r in rows],
        [False, True, True, True, True, True, True, True, True],
    )  # fmt: skip
    meta = {
        **machine_info(),
        "ranks": args.ranks,
        "steps": args.steps,
        "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
        "sync_every": SYNC_EVERY,
    }
    name = f"elastic_{args.ranks}ranks"
    paths = write_files(name, meta, rows, table, args.out, chart=lambda p: chart(rows, p))
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [r["trial"] for r in rows]
    fig, (steps, faults) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    steps.bar([t - width / 2 for t in trials], [r["plain_step_ms"] for r in rows], width,
              label="AllReduceSGD")  # fmt: skip
    steps.bar([t + width / 2 for t in trials], [r["elastic_step_ms"] for r in rows], width,
              label="ElasticSGD")  # fmt: skip
    steps.set(xlabel="trial", ylabel="median step, ms", title="a step when nothing fails")
    steps.legend()
    faults.bar([t - width for t in trials], [r["loss_to_step_s"] for r in rows], width,
               label="kill to survivors' next step")  # fmt: skip
    faults.bar([t for t in trials], [r["replaced_loss_to_step_s"] for r in rows], width,
               label="kill to next step, replaced at once")  # fmt: skip
    faults.bar([t + width for t in trials], [r["joiner_start_to_step_s"] for r in rows],
               width, label="joiner start to its first step")  # fmt: skip
    faults.set(xlabel="trial", ylabel="seconds", title="membership changes")
    faults.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
