"""Fault injection for elastic mode: real jobs (a control process, 2 to 4
ranks, gloo on 127.0.0.1) into which faults drawn from a seed are injected
at every point of the protocol, and invariants checked afterwards.

A schedule (``Schedule``, drawn by ``draw(seed)``) gives the algorithm
(SGD, EA with synchronous or asynchronous rounds, or DiLoCo with 1 to 3
fragments, a delay, a mix, and synchronize_global or
synchronize_parameters as its synchronization points), the world size, whether the
control process is killed and restarted as the faults are armed, one or
two faults (a rank kills or stalls itself, see
tests/elastic_worker.py, some milliseconds into its N-th step,
synchronization, view or state hand-over; a stalled rank is killed, or let
go, later), when a replacement rank joins (at once: started before the
fault, its imports done; late; or never), which victims run under
``torchrun --max-restarts 1`` (a killed one is started again, and joins as
a new rank), and whether a next job runs on the same control process (once
the job ended, or after all its ranks were killed at once). Every rank that
stays alive must finish, and the logs must show (``check_invariants``):

- no hang: each live rank exits 0 within its bound;
- after each synchronization point, every member of the view that passed it
  at the same step count holds bitwise equal parameters (SGD) or center
  (EA) or global parameters (DiLoCo; after synchronize_parameters, the
  parameters are them), and the same epoch counter (``extra_state``);
  the members of a view that both finished in it passed the same
  synchronization points;
- no SGD step applied twice: a rank averages each step number once;
- an averaged gradient that every member of its view logged equals the
  float64 mean of their own gradients; an EA round that every member
  logged moved each x and the center as the paper's update computed in
  float64 (no round applied twice or half; see ``check_ea_rounds``); a
  DiLoCo outer step that every member logged moved the global
  parameters, the momenta and each x as the paper's, in float64 (see
  ``check_outer_steps``);
- at the end, every rank (joiners included) holds the same parameters or
  center, the same step count and the same epoch counter;
- a next job trains from its own start, under a job number of its own.

Every failure prints the seed and the schedule; ``DISTLEARN_ELASTIC_SEED=S``
runs that one again. CI runs a fixed list of seeds;
``DISTLEARN_ELASTIC_SOAK=N`` runs N more, drawn at random (with
``DISTLEARN_ELASTIC_ALGO=sgd|ea|diloco``, only that algorithm's).
"""

from __future__ import annotations

import itertools
import math
import os
import random
import signal
import subprocess
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
from elastic_job import EXACT_TOL, WAIT, Job, assert_close, mean64
from long_mode import LONG, long_only
from quant_reference import STEP_FRACTION

pytest.importorskip("torchft", reason="elastic mode needs torchft (the [elastic] extra)")

POINTS = ("step", "sync", "view", "handover")
# Seeds CI runs: SGD, a 2-rank job whose stalled rank comes back while a
# replacement and a misbuilt joiner arrive at once, just after the control
# process restarted, then a next job (1: fails at da3f0ba, the misbuilt
# joiner ends the job; failed at 18f5ff3, the two newcomers started a job
# of their own beside the running one); SGD, a rank under torchrun stalled
# in a synchronization point comes back, the control process restarted
# (10: fails at da3f0ba, its epoch counter is not taken); synchronous EA, a
# rank under torchrun killed in a step and started again, a round redone
# on the new view and checked against the reference (5); asynchronous EA,
# two of three ranks stalled in a synchronization point and killed, one
# under torchrun, a replacement late (494502454: fails at 0bbc037, the
# survivor refused every view without most of the last one, and the
# replacements could not be admitted before it had one). Seed 41 (a round's
# failure surfacing between rounds) ran here until
# test_a_round_a_peer_died_in_is_rolled_back_and_redone_whole pinned it.
# DiLoCo (2027, synchronous, checked against the reference): two of four
# ranks lost in a synchronization point (one killed, one stalled and
# killed, under torchrun and started again), a replacement at once, then a
# next job. Streaming DiLoCo (2012: 3 fragments, delay 1, mix 0.5): a rank
# stalled in a step, a misbuilt joiner and a late replacement, then every
# rank killed at once and a next job.
# Seeds 5, 10 and 2012 run in the long mode only (tests/long_mode.py):
# CI's budget keeps one seed of each algorithm's hardest regression: 1
# (SGD), 494502454 (EA), 2027 (DiLoCo).
CI_SEEDS = [
    int(s)
    for s in os.environ.get(
        "DISTLEARN_ELASTIC_SEEDS", "1 494502454 2027" + (" 5 10 2012" if LONG else "")
    ).split()
]
SOAK = int(os.environ.get("DISTLEARN_ELASTIC_SOAK", "0"))
SYNC_EVERY = 10
NEXT_WORLD = 2
EA_BETA = 0.9  # tests/elastic_worker.py's
# tests/elastic_worker.py's (Nesterov; the paper's 0.7 and 0.9 diverge at tau 3 there).
DILOCO_OUTER_LR, DILOCO_MOMENTUM = 0.5, 0.5
COMPRESSION_SALT = 0  # see draw()


@dataclass
class FaultSpec:
    rank: str  # the victim's name
    action: str  # kill, stop (then killed), pause (stopped, then let go)
    point: str
    n: int  # the n-th call at the point
    delay_ms: int

    def arg(self) -> str:
        action = "kill" if self.action == "kill" else "stop"
        return f"{action}@{self.point}:{self.n}:{self.delay_ms}"


@dataclass
class Schedule:
    seed: int
    algo: str
    world: int
    faults: list[FaultSpec] = field(default_factory=list)
    replacement: str = "none"  # at once, late, none
    misbuilt_joiner: bool = False
    asynchronous: bool = False  # EA: each round in flight over the next tau steps
    control_down_s: float = 0.0  # the control process killed as the faults are armed, and
    # restarted (on the same port: an empty store, a new Lighthouse) this long after
    # Victims run under torchrun --max-restarts 1: a victim killed (by itself
    # or by the harness) is started again by torchrun and joins as a new rank.
    torchrun: list[str] = field(default_factory=list)
    # Once the job ends ("after"), or once all its ranks are killed at once
    # ("total failure"), a next job of NEXT_WORLD ranks on the same control process.
    next_job: str = "none"
    # DiLoCo (algo "diloco", tau DILOCO_TAU): fragments, delay, mix, and
    # whether its synchronization points are synchronize_global (else
    # synchronize_parameters).
    fragments: int = 1
    delay: int = 0
    mix: float = 0.0
    sync_global: bool = False
    compression: str | None = None  # a low-bit format of the sums

    def worker_args(self) -> list[str]:
        """What every rank of the schedule's jobs is started with."""
        args = ["--asynchronous"] if self.asynchronous else []
        if self.algo == "diloco":
            args += ["--fragments", str(self.fragments), "--delay", str(self.delay)]
            args += ["--mix", str(self.mix)] + (["--sync-global"] if self.sync_global else [])
        return args + (["--compression", self.compression] if self.compression else [])


def draw(seed: int) -> Schedule:
    """A schedule from ``seed`` (see the module)."""
    rng = random.Random(seed)
    algo = rng.choice(["sgd", "ea"])
    world = rng.choice([2, 3, 3, 4])
    names = [f"r{i}" for i in range(world)]
    lost = 2 if world >= 3 and rng.random() < 0.25 else 1
    faults = []
    for victim in rng.sample(names, lost):
        point = rng.choice(POINTS)
        # view and handover: the first change after the start is the first
        # one armed (see elastic_worker.py); a step or synchronization a few
        # into the run.
        n = (
            1
            if point in ("view", "handover")
            else rng.randint(2, 4) * (SYNC_EVERY if point == "step" else 1)
            + (rng.randint(-2, 2) if point == "step" else 0)
        )
        faults.append(
            FaultSpec(
                victim,
                rng.choice(["kill", "kill", "stop", "pause"]),
                point,
                n,
                rng.choice([0, 0, 5, 20, 60]),
            )
        )
    # A view or hand-over fault needs a change after the start: a replacement.
    needs_change = any(f.point in ("view", "handover") for f in faults)
    replacement = rng.choice(["at once", "late"] + ([] if needs_change else ["none"]))
    misbuilt = rng.random() < 0.2
    # Drawn last, each: the seeds drawn before keep the rest of their schedule.
    asynchronous = algo == "ea" and rng.random() < 0.5
    control_down_s = rng.choice([0.5, 2.0]) if rng.random() < 0.25 else 0.0
    torchrun = [f.rank for f in faults if rng.random() < 0.35]
    next_job = rng.choices(["none", "after", "total failure"], weights=[70, 15, 15])[0]
    schedule = Schedule(
        seed, algo, world, faults, replacement, misbuilt, asynchronous, control_down_s,
        torchrun, next_job,
    )  # fmt: skip
    # DiLoCo from a generator of its own, so that the seeds drawn before it
    # came keep their schedules; salted with the first number (3) that
    # leaves CI_SEEDS' as their comment tells them.
    rng = random.Random(f"diloco 3 {seed}")
    if rng.random() < 1 / 3:
        schedule.algo, schedule.asynchronous = "diloco", False
        schedule.fragments = rng.choice([1, 1, 2, 3])
        schedule.delay = rng.choice([0, 1, 2]) if schedule.fragments > 1 else 0
        schedule.mix = rng.choice([0.0, 0.0, 0.5])
        schedule.sync_global = rng.random() < 0.5
        schedule.compression = rng.choice([None, None, "int8", "mxfp4"])
    # SGD's and EA's compression, from a generator of its own too, salted
    # with the first number (COMPRESSION_SALT) that leaves CI_SEEDS' exact
    # (their float64 checks of the sums are the point).
    rng = random.Random(f"compression {COMPRESSION_SALT} {seed}")
    if schedule.algo in ("sgd", "ea"):
        if rng.random() < 1 / 3:
            schedule.compression = rng.choice(["int8", "fp8_e4m3", "int4", "mxfp4"])
    return schedule


def run_schedule(tmp_path: Path, schedule: Schedule) -> Job:
    """Runs ``schedule`` and checks the invariants; returns the job (closed:
    its events stay readable)."""
    job = Job(tmp_path, schedule.algo, schedule.world)
    try:
        _run(job, schedule)
    except AssertionError as error:
        raise AssertionError(f"{error}\nseed {schedule.seed}: {asdict(schedule)}") from None
    finally:
        job.close()
    return job


def _run(job: Job, schedule: Schedule) -> None:
    names = [f"r{i}" for i in range(schedule.world)]
    faults = {f.rank: f for f in schedule.faults}
    common = schedule.worker_args()
    for name in names:
        extra = ["--fault", faults[name].arg()] if name in faults else []
        job.start(name, *common, *extra, torchrun=name in schedule.torchrun)
    if schedule.replacement != "none":
        job.hold("joiner", *common)
    if schedule.misbuilt_joiner:
        job.hold("misbuilt", *common, "--shape", "4")
    job.wait_until("the job to train", lambda: all(job.steps_of(n) >= 1 for n in names))
    if schedule.control_down_s:
        job.control.kill()
        job.control.wait(timeout=10)
        time.sleep(schedule.control_down_s)
        job.start_control()
    if schedule.replacement == "at once":
        job.release("joiner")
    if schedule.misbuilt_joiner:
        job.release("misbuilt")

    def struck(victim: str) -> bool:
        return bool(job.events(victim, "fault")) or job.ranks[victim].poll() is not None

    # A step or synchronization fault strikes on its own; a view or hand-over
    # fault only in a change, which the replacement makes.
    first = [v for v, f in faults.items() if f.point in ("step", "sync")]
    job.wait_until("the step and synchronization faults", lambda: all(map(struck, first)))
    if schedule.replacement == "late":
        time.sleep(1.0)
        job.release("joiner")
    job.wait_until("every fault to strike", lambda: all(map(struck, faults)))
    time.sleep(4.0)  # past the collective deadline (3 s): the stall is noticed
    alive = [n for n in names if n not in faults]
    for victim, fault in faults.items():
        # The worker (under torchrun, the agent's child) logged its pid with the fault.
        worker = job.events(victim, "fault")[-1]["pid"]
        if fault.action == "pause" and job.ranks[victim].poll() is None:
            os.kill(worker, signal.SIGCONT)  # it finds its view gone, and joins again
            alive.append(victim)
            continue
        if fault.action != "kill":
            os.kill(worker, signal.SIGKILL)
        if victim in schedule.torchrun:  # started again: a new rank, the same agent
            alive.append(f"{victim}+restart1")
            job.ranks[alive[-1]] = job.ranks[victim]
    if schedule.replacement != "none":
        alive.append("joiner")
    if schedule.misbuilt_joiner:
        process = job.ranks["misbuilt"]
        try:
            code = process.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the misbuilt joiner did not exit\n{job.logs()}") from None
        assert code != 0
        assert "is not the job's" in (job.tmp_path / "misbuilt.log").read_text()
    job.wait_until(
        "every live rank to reach the same view",
        lambda: len({job.view_of(n) for n in alive}) == 1 and job.view_of(alive[0]) is not None,
    )
    everyone = [*job.ranks]
    if schedule.next_job == "total failure":
        job.kill_ranks()
        check_invariants(job, schedule, everyone, [], {})
    else:
        done = job.finish(alive)
        check_invariants(job, schedule, everyone, alive, done)
    if schedule.next_job != "none":
        _run_next_job(job, schedule, job_number(job.view_of(alive[0])))


def job_number(prefix: str) -> int:
    """The job a view's prefix belongs to (views are named ".../job-N/...")."""
    return int(prefix.split("/job-")[1].split("/")[0])


def _run_next_job(job: Job, schedule: Schedule, previous: int) -> None:
    """A next job on the same control process trains from its own start and
    ends with every rank equal, under a job number of its own."""
    job.stop_file.unlink(missing_ok=True)
    names = [f"n{i}" for i in range(NEXT_WORLD)]
    job.world = NEXT_WORLD
    for name in names:
        job.start(name, *schedule.worker_args())
    job.wait_until("the next job to train", lambda: all(job.steps_of(n) >= 5 for n in names))
    done = job.finish(names, margin=5)
    check_invariants(job, schedule, names, names, done)
    numbers = {job_number(job.view_of(n)) for n in names}
    assert len(numbers) == 1 and previous not in numbers, f"job {previous}, then {numbers}"
    assert all(d["world"] == NEXT_WORLD for d in done.values()), done


def check_invariants(
    job: Job, schedule: Schedule, everyone: list[str], alive: list[str], done: dict
) -> None:
    """``everyone``: the ranks whose events count; ``alive`` and ``done``:
    those that finished and their "done" events (none after a total failure)."""
    algo = schedule.algo
    final = [d["params"] if algo == "sgd" else d["center"] for d in done.values()]
    assert all(f == final[0] for f in final), "the ranks disagree at the end"
    assert len({d["steps"] for d in done.values()}) <= 1, f"steps differ: {done}"
    assert len({d["epoch"] for d in done.values()}) <= 1, f"epoch counters differ: {done}"

    # After each synchronization point: the same state on every member.
    synced: dict[tuple[str, int], list[tuple[str, dict]]] = defaultdict(list)
    passed: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for name in everyone:
        for event in job.events(name, "synced"):
            synced[event["prefix"], event["steps"]].append((name, event))
            passed[event["prefix"]].setdefault(name, []).append(event["steps"])
    for (prefix, steps), events in synced.items():
        state = [e["params"] if algo == "sgd" else e["center"] for _, e in events]
        where = f"view {prefix}, step {steps}: {[n for n, _ in events]}"
        assert all(s == state[0] for s in state), f"state differs after a synchronization, {where}"
        epochs = {e["epoch"] for _, e in events}
        assert len(epochs) == 1, f"epoch counters {epochs} after a synchronization, {where}"
        if algo == "diloco" and not schedule.sync_global:
            # synchronize_parameters: every member's params are the global ones.
            assert all(e["params"] == e["center"] for _, e in events), f"params, {where}"
    for prefix, by_rank in passed.items():
        finished_here = [n for n in by_rank if n in alive and job.view_of(n) == prefix]
        # From the first point every one of them passed (a joiner enters the
        # view at a synchronization point it did not call).
        start = max((by_rank[n][0] for n in finished_here), default=0)
        lists = [[steps for steps in by_rank[n] if steps >= start] for n in finished_here]
        assert all(lst == lists[0] for lst in lists), (
            f"members of view {prefix} passed different synchronization points: "
            f"{dict(zip(finished_here, lists, strict=True))}"
        )

    if algo == "sgd":
        averaged: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
        # A rank's own gradient for a step (the same when the step is redone).
        own: dict[tuple[str, int], list[float]] = {}
        for name in everyone:
            numbers = [e["steps"] for e in job.events(name, "step") if not e["skipped"]]
            assert len(numbers) == len(set(numbers)), f"{name} averaged a step twice: {numbers}"
            for e in job.events(name, "local"):
                own[name, e["steps"]] = e["local"]
            for e in job.events(name, "step"):
                if not e["skipped"]:
                    averaged[e["prefix"], e["steps"]][name] = e
        largest = max((abs(v) for values in own.values() for v in values), default=0.0)
        tol = compressed_sum_tolerance(schedule.compression, largest)
        for (_, steps), events in averaged.items():
            world = next(iter(events.values()))["world"]
            if len(events) < world:
                continue  # not every member logged it: a member was lost in it
            want = mean64([own[name, steps] for name in events])
            means = [e["mean"] for e in events.values()]
            if schedule.compression:
                assert all(m == means[0] for m in means), f"step {steps}: means differ"
            for mean in means:
                assert_close(mean, want, tol, f"the mean of step {steps}")
    elif algo == "ea":
        check_ea_rounds(job, everyone, schedule.asynchronous, schedule.compression)
    else:
        check_outer_steps(job, everyone, schedule)


def compressed_sum_tolerance(compression: str | None, largest: float, ranks: int = 1) -> float:
    """assert_close's bound on a mean (``ranks`` 1), or a sum over ``ranks``
    (EA's deltas), in ``compression``, ``largest`` the largest value any
    rank sent: each rank's error-feedback residual goes in and a new one
    comes out (at most a step each, per rank) and the summed shard is
    quantized again (half a step of the sum): 1.5 steps per rank, with a
    margin of its own (a rank behind the source sends a residual twice:
    NOTE [Residuals across views])."""
    if compression is None:
        return EXACT_TOL
    return 2.0 * STEP_FRACTION[compression] * largest * ranks + EXACT_TOL


def check_outer_steps(job: Job, everyone: list[str], schedule: Schedule) -> None:
    """Every DiLoCo outer step that every member of the view it ran in
    logged, against the paper's (arXiv 2311.08105, Algorithm 1) in float64,
    from what each member held when its call began: the outer gradient
    g = mean_i(global - x_i), the momentum m' = mu * m + g, the Nesterov
    direction g + mu * m', global' = global - lr * direction, and
    x_i' = mix * x_i + (1 - mix) * global'. Checked where exchanges are
    synchronous (one fragment, no delay: the worker reads the state only
    there); an outer step a member missed (lost in it) is not logged by
    every member, and one taken twice or in part leaves a value off. A
    step count logged twice is a call applied twice. With a compression the
    outer gradient is the low-bit mean (the same on every member), within
    ``compressed_sum_tolerance`` of g: the momentum by as much, the global
    parameters by lr * (1 + mu) times it, the params by (1 - mix) times that."""
    steps_by: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for name in everyone:
        events = job.events(name, "step")
        steps = [e["steps"] for e in events]
        assert len(steps) == len(set(steps)), f"{name} counted a step twice: {steps}"
        for e in events:
            if e["round"]:
                steps_by[e["prefix"], e["steps"]].append({**e, "name": name})
    if schedule.fragments != 1 or schedule.delay != 0:
        return  # (the worker reads the state where exchanges are synchronous only)
    lr, mu, mix = DILOCO_OUTER_LR, DILOCO_MOMENTUM, schedule.mix
    # The largest outer gradient any member sent (residuals carry earlier ones' errors).
    largest = max(
        (
            abs(c - x)
            for events in steps_by.values()
            for e in events
            for c, x in zip(e["center_before"], e["before"], strict=True)
        ),
        default=0.0,
    )
    g_tol = center_tol = params_tol = EXACT_TOL
    if schedule.compression:
        g_tol = compressed_sum_tolerance(schedule.compression, largest)
        center_tol = lr * (1 + mu) * g_tol + EXACT_TOL
        params_tol = (1 - mix) * center_tol + EXACT_TOL
    checked = 0
    for (prefix, steps), events in steps_by.items():
        if len(events) < events[0]["world"]:
            continue  # not every member logged it: a member was lost in it
        center, momenta = events[0]["center_before"], events[0]["momenta_before"]
        assert all(e["center_before"] == center for e in events), f"{prefix} step {steps}"
        assert all(e["momenta_before"] == momenta for e in events), f"{prefix} step {steps}"
        g = mean64([[c - x for c, x in zip(center, e["before"], strict=True)] for e in events])
        m = [mu * old + gi for old, gi in zip(momenta, g, strict=True)]
        new = [c - lr * (gi + mu * mi) for c, gi, mi in zip(center, g, m, strict=True)]
        where = f"outer step {steps} of {prefix}"
        for e in events:
            assert e["center"] == events[0]["center"], f"{where}: global parameters differ"
            assert_close(e["momenta"], m, g_tol, f"the momenta after {where}")
            assert_close(e["center"], new, center_tol, f"the global parameters after {where}")
            want = [mix * x + (1 - mix) * c for x, c in zip(e["before"], new, strict=True)]
            assert_close(e["params"], want, params_tol, f"{e['name']}'s params after {where}")
        checked += 1
    print(f"DiLoCo outer steps checked against the reference: {checked}")
    assert checked > 0, "no DiLoCo outer step was checked"


def check_ea_rounds(
    job: Job, everyone: list[str], asynchronous: bool, compression: str | None = None
) -> None:
    """Every EA round that every member of the view it ended in logged,
    against the paper's update (arXiv 1412.6651, as one allreduce) in
    float64, from what each member held when its call began: with n members
    and alpha = beta / n, delta_i = alpha * (x_i - center), x_i -= delta_i,
    center += sum_i delta_i. A round that failed and was redone on a new
    view counts too: the failed part must have been rolled back (had a
    member completed it before the failure, that member logged it in the
    old view and this view's group is incomplete). A round applied in part,
    or twice, leaves x or the center off. Asynchronous rounds blend at the
    call and complete when the worker reads the center after it, which
    leaves a failed round's center as it was (the failure surfaces in the
    next call): a round counts once every member's next call ran in the same
    view (test_a_round_a_peer_died_in_is_rolled_back_and_redone_whole
    checks the undoing of one that did not). With ``compression`` each x
    still moves by its exact delta, and the center by the low-bit sum of
    the deltas: the same on every member, within a few quantization steps
    of the exact sum (``compressed_sum_tolerance``)."""
    rounds: dict[tuple[str, int], list[dict]] = defaultdict(list)
    same_view_next: set[tuple[str, int]] = set()  # (name, steps): its next call in that view
    for name in everyone:
        events = job.events(name, "step")
        steps = [e["steps"] for e in events]
        assert len(steps) == len(set(steps)), f"{name} counted a step twice: {steps}"
        for e, after in itertools.pairwise(events):
            if after["steps"] == e["steps"] + 1 and after["prefix_before"] == after["prefix"]:
                if after["prefix"] == e["prefix"]:
                    same_view_next.add((name, e["steps"]))
        for e in events:
            if e["round"]:
                rounds[e["prefix"], e["steps"]].append({**e, "name": name})
    # The largest delta of any round (residuals carry earlier rounds' errors).
    largest = max(
        (
            EA_BETA / e["world"] * abs(x - c)
            for events in rounds.values()
            for e in events
            for x, c in zip(e["before"], e["center_before"], strict=True)
        ),
        default=0.0,
    )
    checked = redone = 0
    for (prefix, steps), events in rounds.items():
        if len(events) < events[0]["world"]:
            continue  # not every member logged it: a member was lost in it
        if asynchronous and not all((e["name"], steps) in same_view_next for e in events):
            continue  # completed on some member, maybe: its failure surfaced after it
        center = events[0]["center_before"]
        assert all(e["center_before"] == center for e in events), f"{prefix} step {steps}"
        alpha = EA_BETA / len(events)
        deltas = [
            [alpha * (x - c) for x, c in zip(e["before"], center, strict=True)] for e in events
        ]
        for e, delta in zip(events, deltas, strict=True):
            where = f"{e['name']}'s params after round {steps} of {prefix}"
            assert_close(
                e["params"], [x - d for x, d in zip(e["before"], delta, strict=True)], what=where
            )
        columns = zip(*deltas, strict=True)
        want = [c + math.fsum(column) for c, column in zip(center, columns, strict=True)]
        # With compression the center moves by the low-bit sum of the
        # deltas (each x by its exact own), the same on every member.
        for e in events:
            assert e["center"] == events[0]["center"], f"{prefix} step {steps}: centers differ"
            tol = compressed_sum_tolerance(compression, largest, len(events))
            assert_close(e["center"], want, tol, f"the center after round {steps} of {prefix}")
        checked += 1
        redone += events[0]["prefix_before"] != prefix
    print(f"EA rounds checked against the reference: {checked}, {redone} redone on a new view")
    assert checked > 0, "no EA round was checked"


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_faults_at_every_point_of_the_protocol(tmp_path: Path, seed: int) -> None:
    run_schedule(tmp_path, draw(int(os.environ.get("DISTLEARN_ELASTIC_SEED", seed))))


# The synchronous round in the long mode only: the asynchronous one is the
# round that failed (before 38038ba).
@pytest.mark.parametrize("asynchronous", [pytest.param(False, marks=long_only), True])
def test_a_round_a_peer_died_in_is_rolled_back_and_redone_whole(
    tmp_path: Path, asynchronous: bool
) -> None:
    # Issue 21, item 2: the survivor's round had moved x by -delta when the
    # failure surfaced, and the retry only counted (x went from 3 to 2, the
    # center stayed at 1). r1 dies as it enters its 22nd call (step 21, a
    # round: tau 2). Synchronous: r0's round fails, is rolled back, and
    # runs again on a view of r0 alone, where the paper's update from what
    # r0 held before it must hold (check_ea_rounds). Asynchronous: the
    # failure surfaces in the next call (step 22; r0 read the center after
    # step 21, which completes a round without raising), which must undo
    # round 21's blend; the rounds after it are whole (check_ea_rounds).
    fault = FaultSpec("r1", "kill", "step", 22, 0)
    schedule = Schedule(-1, "ea", 2, [fault], asynchronous=asynchronous)
    job = run_schedule(tmp_path, schedule)
    steps = {e["steps"]: e for e in job.events("r0", "step")}
    changed = [s for s, e in steps.items() if e["prefix_before"] != e["prefix"]]
    assert changed == [22 if asynchronous else 21], changed
    assert steps[21]["round"] and steps[changed[0]]["world"] == 1
    if asynchronous:
        launch, surfaced = steps[21], steps[22]
        assert launch["world"] == 2
        blend = [
            EA_BETA / 2 * (x - c)
            for x, c in zip(launch["before"], launch["center_before"], strict=True)
        ]
        assert_close(
            launch["params"], [x - d for x, d in zip(launch["before"], blend, strict=True)]
        )
        assert_close(
            surfaced["params"], [x + d for x, d in zip(surfaced["before"], blend, strict=True)]
        )
        assert surfaced["center"] == launch["center_before"]


@pytest.mark.skipif(SOAK == 0, reason="the soak runs only when DISTLEARN_ELASTIC_SOAK=N is set")
def test_soak(tmp_path: Path) -> None:
    rng = random.Random()
    algo = os.environ.get("DISTLEARN_ELASTIC_ALGO")  # only schedules of this algorithm
    for index in range(SOAK):
        seed = rng.randrange(1 << 30)
        while algo is not None and draw(seed).algo != algo:
            seed = rng.randrange(1 << 30)
        run_dir = tmp_path / str(index)
        run_dir.mkdir()
        print(f"soak {index}: seed {seed}: {asdict(draw(seed))}", flush=True)
        run_schedule(run_dir, draw(seed))
