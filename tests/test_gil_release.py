"""Every binding of ``_C.NcclCommunicator`` that takes the communicator's
mutex releases the GIL while it waits for it: checked by running them, not
only by reading bindings.cpp (tests/test_build.py does that).

Why it matters: the communicator's watchdog holds the mutex through a slow
NCCL abort, and a call that waited for it with the GIL held would stall
every Python thread meanwhile; the elastic heartbeat thread too, so that a
healthy rank would be declared dead.

How: the extension is built with the host compiler, the NCCL communicator
included, against the scripted CUDA runtime and NCCL of tests/host_nccl
(no GPU needed). In one process per binding (so that a failure names it;
the processes run in parallel), a thread calls shrink() on a
communicator whose shrink never completes, so shrink() holds the mutex for
SHRINK_HOLD_S seconds; another thread then calls the binding, which has to
wait for the mutex. The main thread then runs Python code and looks: the
shrink still holds the mutex and the binding has not returned. A binding
that kept the GIL while waiting would have kept the main thread from
running until the shrink had given up and released the mutex.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pybind11
from host_build import compile_all, compiler, cuda_include

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
HOST_NCCL = ROOT / "tests" / "host_nccl"
# The extension's host sources (setup.py's CPU sources and NCCL_SOURCES).
EXTENSION_SOURCES = sorted(path.name for path in CSRC.glob("*.cpp"))
# -O0: bindings.cpp (pybind11) dominates the build and compiles twice as fast as at -O1.
FLAGS = ["-std=c++17", "-O0", "-fPIC", "-pthread", "-DDISTLEARN_WITH_NCCL"]

# How long the never-ending shrink holds the mutex before it gives up: the
# main thread's look comes well within it, even on a loaded machine.
SHRINK_HOLD_S = 4.0
# Python code the main thread runs once the binding's call has begun.
MAIN_THREAD_PAUSE_S = 0.2
WAIT_FOR_START_S = 10.0  # a round's shrink and call start within this
ROUND_TIMEOUT_S = 60.0
BUFFER_ADDRESS = 0x1000  # the fake never dereferences a buffer
FLOAT32 = 0  # distlearn::DType::kFloat32

SHRINK_HOLDS_THE_MUTEX, SHRINK_GAVE_UP = 1, 2  # fake_first_shrink_state's answers (fake_device.h)

# Each binding that takes the mutex, called on (communicator, stream).
CALLS_TAKING_THE_MUTEX: dict[str, Callable[[Any, int], object]] = {
    "check": lambda comm, stream: comm.check(),
    "usable": lambda comm, stream: comm.usable,
    "can_shrink": lambda comm, stream: comm.can_shrink,
    "revoked": lambda comm, stream: comm.revoked,
    "closed": lambda comm, stream: comm.closed,
    "in_flight": lambda comm, stream: comm.in_flight,
    "enqueues_in_progress": lambda comm, stream: comm.enqueues_in_progress,
    "keep_for_shrink": lambda comm, stream: comm.keep_for_shrink(),
    "abort": lambda comm, stream: comm.abort(),
    "close": lambda comm, stream: comm.close(),
    "shrink": lambda comm, stream: comm.shrink([1], init_timeout=1.0),
    "all_reduce_sum": lambda comm, stream: comm.all_reduce_sum(
        BUFFER_ADDRESS, 4, FLOAT32, stream, 5.0
    ),
    "broadcast": lambda comm, stream: comm.broadcast(BUFFER_ADDRESS, 4, FLOAT32, 0, stream, 5.0),
    "all_to_all": lambda comm, stream: comm.all_to_all(
        BUFFER_ADDRESS, BUFFER_ADDRESS, 4, stream, 5.0
    ),
    "all_gather": lambda comm, stream: comm.all_gather(
        BUFFER_ADDRESS, BUFFER_ADDRESS, 4, stream, 5.0
    ),
}
# The class's other public names: constant attributes and the static unique_id.
NOT_TAKING_THE_MUTEX = {"unique_id", "rank", "nranks", "device", "nonblocking"}


def build_extension(out: Path) -> tuple[Path, Path]:
    """Builds `_C` with the NCCL communicator into out/module, linked against
    the fake (its CUDA runtime); returns the module's folder and the fake."""
    # Imported here: each round's process runs this file and needs none of pytest.
    import pytest

    include = cuda_include()
    if include is None:
        pytest.skip("needs CUDA's headers (cuda_runtime.h), as the CUDA build does")
    cxx = compiler()
    module_dir = out / "module"
    module_dir.mkdir()
    fake = module_dir / "libfake_device.so"
    includes = [
        f"-I{pybind11.get_include()}",
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{CSRC}",
        f"-I{ROOT / 'kernels'}",
        f"-I{include}",
    ]
    objects = [out / f"{Path(source).stem}.o" for source in EXTENSION_SOURCES]
    commands = [
        [cxx, *FLAGS, *includes, "-c", str(CSRC / source), "-o", str(obj)]
        for source, obj in zip(EXTENSION_SOURCES, objects, strict=True)
    ]
    fake_source = HOST_NCCL / "fake_device.cpp"
    commands.append([cxx, *FLAGS, f"-I{include}", "-shared", str(fake_source), "-o", str(fake)])
    compile_all(commands)
    module = module_dir / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    # The extension finds the fake by its run path; the loader then opens the same copy as NCCL.
    link = [cxx, "-shared", "-pthread", *map(str, objects), f"-L{module_dir}", "-lfake_device"]
    compile_all([[*link, f"-Wl,-rpath,{module_dir}", "-ldl", "-o", str(module)]])
    return module_dir, fake


class Call(threading.Thread):
    """One call in a thread of its own: records that it began, and how it
    ended and the shrink's state then."""

    def __init__(self, call: Callable[[], object], shrink_state: Callable[[], int]) -> None:
        super().__init__(daemon=True)
        self.call = call
        self.shrink_state = shrink_state
        self.began = threading.Event()
        self.returned = threading.Event()
        self.outcome = "did not return"
        self.shrink_when_returned = -1

    def run(self) -> None:
        self.began.set()
        try:
            self.outcome = f"returned {self.call()!r}"
        except Exception as error:  # raising is fine: the call only has to wait
            self.outcome = f"raised {type(error).__name__}: {error}"
        self.shrink_when_returned = self.shrink_state()
        self.returned.set()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_FOR_START_S
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {WAIT_FOR_START_S} s")
        time.sleep(0.005)


def run_round(module_dir: Path, fake_path: Path, binding: str) -> dict[str, object]:
    """One binding's round, in a process of its own (a binding that keeps the
    GIL stalls its whole process): see the module's docstring."""
    sys.path.insert(0, str(module_dir))
    import _C  # the module built here, not distlearn_cuda's

    assert Path(_C.__file__).parent == module_dir, _C.__file__
    fake = ctypes.CDLL(str(fake_path))  # the same copy as the extension's and the loader's
    fake.fake_new_stream.restype = ctypes.c_void_p
    _C.nccl_load([str(fake_path)])
    fake.fake_script_shrink(-1, 0)  # the shrink's job never ends (child state: ncclSuccess)
    stream = fake.fake_new_stream()
    comm = _C.NcclCommunicator(_C.NcclCommunicator.unique_id(), 2, 0, 0, 5.0)

    shrink_state = fake.fake_first_shrink_state
    shrink = Call(lambda: comm.shrink([1], init_timeout=SHRINK_HOLD_S), shrink_state)
    shrink.start()
    wait_until(lambda: shrink_state() == SHRINK_HOLDS_THE_MUTEX, "the shrink's start")
    waiter = Call(lambda: CALLS_TAKING_THE_MUTEX[binding](comm, stream), shrink_state)
    waiter.start()
    wait_until(waiter.began.is_set, f"the call of {binding}")
    time.sleep(MAIN_THREAD_PAUSE_S)
    # The main thread runs again: it could not, had the waiting call kept the GIL.
    call_returned_at_look = waiter.returned.is_set()
    shrink_returned_at_look = shrink.returned.is_set()
    shrink_at_look = shrink_state()

    for call in (shrink, waiter):
        call.join(SHRINK_HOLD_S + WAIT_FOR_START_S)
    return {
        "public_names": sorted(name for name in dir(_C.NcclCommunicator) if name[0] != "_"),
        "shrink_held_the_mutex_at_look": shrink_at_look == SHRINK_HOLDS_THE_MUTEX,
        "shrink_returned_at_look": shrink_returned_at_look,
        "call_returned_at_look": call_returned_at_look,
        "call_returned_after_the_shrink_gave_up": waiter.shrink_when_returned == SHRINK_GAVE_UP,
        "call_outcome": waiter.outcome,
        "shrink_outcome": shrink.outcome,
    }


def run_rounds(module_dir: Path, fake: Path) -> dict[str, dict[str, Any]]:
    """Every binding's round, in parallel processes; their results by binding."""
    rounds = {
        binding: subprocess.Popen(
            [sys.executable, __file__, str(module_dir), str(fake), binding],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for binding in CALLS_TAKING_THE_MUTEX
    }
    results = {}
    try:
        for binding, process in rounds.items():
            stdout, stderr = process.communicate(timeout=ROUND_TIMEOUT_S)
            assert process.returncode == 0, f"{binding}'s round failed:\n{stdout}{stderr}"
            results[binding] = json.loads(stdout.splitlines()[-1])
    finally:
        for process in rounds.values():
            process.kill()
            process.wait()
    return results


def test_every_binding_that_takes_the_communicators_mutex_releases_the_gil_while_waiting(
    tmp_path: Path,
) -> None:
    module_dir, fake = build_extension(tmp_path)
    results = run_rounds(module_dir, fake)

    public_names = set(next(iter(results.values()))["public_names"])
    unclassified = public_names - NOT_TAKING_THE_MUTEX - set(CALLS_TAKING_THE_MUTEX)
    assert not unclassified, f"NcclCommunicator bindings this test does not cover: {unclassified}"
    assert set(CALLS_TAKING_THE_MUTEX) <= public_names, "a binding tested here is gone"
    for binding, result in results.items():
        # The shrink held the mutex for SHRINK_HOLD_S, then gave up.
        gave_up = result["shrink_outcome"].startswith("raised RuntimeError: ncclCommShrink did not")
        assert gave_up, f"{binding}'s round: the shrink {result['shrink_outcome']}"
        assert result["call_returned_after_the_shrink_gave_up"], (
            f"{binding} did not wait for the communicator's mutex: {result}"
        )
    kept_the_gil = [
        f"{binding} (when the main thread ran again: the shrink held the mutex "
        f"{result['shrink_held_the_mutex_at_look']}, had returned "
        f"{result['shrink_returned_at_look']}; the call had returned "
        f"{result['call_returned_at_look']})"
        for binding, result in results.items()
        if not result["shrink_held_the_mutex_at_look"] or result["call_returned_at_look"]
    ]
    assert not kept_the_gil, (
        "kept the GIL while waiting for the communicator's mutex, so that the main thread ran "
        f"again only once the shrink holding it had given up ({SHRINK_HOLD_S} s): "
        + "; ".join(kept_the_gil)
    )


if __name__ == "__main__":  # one round: module folder, fake, binding
    print(json.dumps(run_round(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])))
