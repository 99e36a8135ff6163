"""NCCL from the extension: its declared ABI, where it is loaded from, what it
reports, how it fails, and which NCCL carries CUDA collectives.

Loading NCCL needs no GPU, so these run in CI where the setup script
installed the nvidia-nccl-cu13 wheel. Loading is once per process, so each
case runs in a fresh interpreter. Collectives over NCCL need a GPU: see
tests/test_cuda_api.py.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from host_build import cuda_include
from multiproc import run_world
from nccl_stand_in import StandInCommunicator

import distlearn_cuda as dl
from distlearn_cuda import _C
from distlearn_cuda._comm import collectives as _collectives
from distlearn_cuda._comm import nccl as _nccl

ROOT = Path(__file__).resolve().parent.parent
needs_nccl = pytest.mark.skipif(not _C.has_nccl, reason="this build has no NCCL support")


def wheel_file(relative: str) -> str | None:
    """A file of the nvidia-nccl-cu13 wheel, if it is installed."""
    try:
        import nvidia.nccl
    except ImportError:
        return None
    for directory in nvidia.nccl.__path__:
        path = os.path.join(directory, relative)
        if os.path.exists(path):
            return path
    return None


def wheel_library() -> str | None:
    return wheel_file(os.path.join("lib", "libnccl.so.2"))


needs_wheel = pytest.mark.skipif(wheel_library() is None, reason="nvidia-nccl-cu13 not installed")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter (NCCL loads once per process)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_candidates_prefer_the_loaded_copy_then_the_wheel_then_the_system(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(_nccl.LIBRARY_ENV, raising=False)
    candidates = _nccl.library_candidates()
    assert candidates[0] == ""  # the copy already in the process (torch's)
    assert candidates[-1] == "libnccl.so.2"
    if wheel_library() is not None:
        assert wheel_library() in candidates[1:-1]


def test_environment_variable_overrides_every_other_candidate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(_nccl.LIBRARY_ENV, "/opt/custom/libnccl.so.2")
    assert _nccl.library_candidates() == ["/opt/custom/libnccl.so.2"]


@pytest.mark.skipif(
    shutil.which("nvcc") is None or os.environ.get("DISTLEARN_CUDA") == "0",
    reason="nvcc is not on PATH here, so the CPU flavor is the expected build",
)
def test_every_cuda_build_has_the_nccl_path() -> None:
    # No nccl.h is needed to build it: nccl_api.h declares NCCL's ABI.
    assert _C.has_cuda and _C.has_nccl
    assert dl.build_info()["nccl_abi_version"] == "2.14.0"


def compile_abi_check(*include_first: Path) -> subprocess.CompletedProcess:
    """Compiles tests/nccl_abi_check.cpp (syntax and static_asserts only)
    against the wheel's nccl.h, with ``include_first`` searched before csrc/."""
    compiler = shutil.which("c++") or shutil.which("g++")
    header = wheel_file(os.path.join("include", "nccl.h"))
    cuda = cuda_include()
    if compiler is None or header is None or cuda is None:
        pytest.skip("needs a C++ compiler, the nvidia-nccl-cu13 wheel's nccl.h and CUDA's headers")
    command = [compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror"]
    command += [f"-I{d}" for d in (*include_first, ROOT / "csrc", Path(header).parent, cuda)]
    command.append(str(ROOT / "tests" / "nccl_abi_check.cpp"))
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_declared_nccl_abi_matches_the_installed_nccl_h() -> None:
    done = compile_abi_check()
    assert done.returncode == 0, done.stderr


def test_the_abi_check_rejects_a_wrong_declaration(tmp_path: Path) -> None:
    # The check has teeth: one enumerator off by one in a copy of the header.
    header = (ROOT / "csrc" / "nccl_api.h").read_text()
    assert "ncclInProgress = 7," in header
    (tmp_path / "nccl_api.h").write_text(
        header.replace("ncclInProgress = 7,", "ncclInProgress = 8,")
    )
    done = compile_abi_check(tmp_path)
    assert done.returncode != 0
    assert "static assertion failed" in done.stderr and "ncclInProgress" in done.stderr


@needs_nccl
@needs_wheel
def test_nothing_is_loaded_until_asked_then_the_wheel_is() -> None:
    done = run_python(
        """
        import json
        import distlearn_cuda as dl
        from distlearn_cuda import _C
        from distlearn_cuda._comm import nccl as _nccl
        before = dl.build_info()
        # Where the process already has NCCL (a CUDA build of torch loads it),
        # that copy is the one to use; read independently of the loader.
        with open("/proc/self/maps") as maps:
            mapped = {line.split()[-1] for line in maps if "/libnccl.so" in line}
        version, path = _nccl.load()
        after = dl.build_info()
        print(json.dumps({"before": before, "after": after, "version": version, "path": path,
                          "again": list(_nccl.load()), "message": _C.nccl_error_string(4),
                          "mapped": sorted(mapped)}))
        """
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["before"]["nccl_runtime_version"] is None
    assert report["before"]["nccl_library"] is None
    # On a CPU build of torch nothing has NCCL loaded: the wheel's copy.
    expected = report["mapped"] or [wheel_library()]
    assert len(expected) == 1 and os.path.realpath(report["path"]) == os.path.realpath(expected[0])
    assert report["version"] >= 21200
    major, minor, patch = map(int, report["after"]["nccl_runtime_version"].split("."))
    assert major * 10000 + minor * 100 + patch == report["version"]
    assert report["after"]["nccl_library"] == report["path"]
    assert report["again"] == [report["version"], report["path"]]  # loaded once
    # NCCL's own text for ncclInvalidArgument (4), not a message of ours.
    assert "invalid argument" in report["message"].lower()


@needs_nccl
@needs_wheel
def test_a_copy_already_loaded_is_used_and_reported_by_its_path(tmp_path: Path) -> None:
    # As a CUDA build of torch does, the process loads NCCL first, here
    # through a link of our own, so that only the already-loaded candidate
    # can report that path (the wheel's candidate names the wheel's file).
    link = tmp_path / "libnccl.so.2"
    link.symlink_to(wheel_library())
    done = run_python(
        f"""
        import ctypes, json, os
        ctypes.CDLL({str(link)!r}, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
        from distlearn_cuda._comm import nccl as _nccl
        print(json.dumps(list(_nccl.load())))
        """
    )
    assert done.returncode == 0, done.stderr
    version, path = json.loads(done.stdout)
    assert path == str(link) and version >= 21200


@needs_nccl
def test_a_missing_library_fails_with_every_candidate_named() -> None:
    done = run_python(
        """
        from distlearn_cuda._comm import nccl as _nccl
        _nccl.load()
        """,
        DISTLEARN_NCCL_LIBRARY="/nonexistent/libnccl.so.2",
    )
    assert done.returncode != 0
    assert "RuntimeError: could not load NCCL; tried:" in done.stderr
    assert "/nonexistent/libnccl.so.2" in done.stderr


@needs_nccl
def test_a_library_that_is_not_nccl_is_refused() -> None:
    done = run_python(
        """
        from distlearn_cuda._comm import nccl as _nccl
        _nccl.load()
        """,
        DISTLEARN_NCCL_LIBRARY=_C.__file__,  # a shared library, but not NCCL
    )
    assert done.returncode != 0
    assert "it has no ncclGetVersion" in done.stderr


@needs_nccl
@needs_wheel
def test_unique_ids_need_no_gpu_and_a_communicator_without_one_raises() -> None:
    done = run_python(
        """
        import torch
        from distlearn_cuda import _C
        from distlearn_cuda._comm import nccl as _nccl
        _nccl.load()
        first, second = _C.NcclCommunicator.unique_id(), _C.NcclCommunicator.unique_id()
        assert len(first) == len(second) == 128 and first != second
        try:
            _C.NcclCommunicator(first[:5], 1, 0, 0, 5.0)
        except ValueError as error:
            print("short id:", error)
        try:
            _C.NcclCommunicator(first, 2, 2, 0, 5.0)
        except ValueError as error:
            print("bad rank:", error)
        try:
            _C.NcclCommunicator(first, 1, 0, 0, 0.0)
        except ValueError as error:
            print("bad init timeout:", error)
        if not torch.cuda.is_available():
            try:
                _C.NcclCommunicator(first, 1, 0, 0, 5.0)
            except RuntimeError as error:
                print("no gpu:", error)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "short id: unique_id must be 128 bytes, got 5" in done.stdout
    assert "bad rank: rank 2 is not in a world of 2" in done.stdout
    assert "bad init timeout: init_timeout must be a finite number of seconds > 0" in done.stdout
    if not torch.cuda.is_available():
        assert "no gpu: cudaGetDevice" in done.stdout


def test_a_gloo_group_does_not_use_the_extensions_nccl(world_of_one: None) -> None:
    assert not _collectives.uses_cuda_nccl(dist.group.WORLD)


def test_the_nccl_choice_is_validated_with_the_name_it_came_by(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(_nccl.MODE_ENV, raising=False)
    assert _nccl.mode() == "own"
    assert _nccl.mode("group") == "group"
    monkeypatch.setenv(_nccl.MODE_ENV, "group")
    assert _nccl.mode() == "group"
    assert _nccl.mode("own") == "own"  # an explicit choice wins over the environment
    monkeypatch.setenv(_nccl.MODE_ENV, "torch")
    with pytest.raises(ValueError, match=r"DISTLEARN_NCCL must be 'own' or 'group', got 'torch'"):
        _nccl.mode()
    with pytest.raises(ValueError, match=r"^nccl must be 'own' or 'group', got 'mine'"):
        _nccl.mode("mine")
    with pytest.raises(TypeError, match=r"nccl must be 'own' or 'group', got int"):
        _nccl.mode(1)  # type: ignore[arg-type]


def test_an_invalid_nccl_choice_fails_at_construction_on_every_class(
    world_of_one: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_nccl.MODE_ENV, "both")
    for make in (dl.AllReduceSGD, dl.AllReduceEA):
        with pytest.raises(ValueError, match="DISTLEARN_NCCL must be 'own' or 'group'"):
            make()
    assert dl.build_info()["nccl_mode"].startswith("invalid: DISTLEARN_NCCL")
    monkeypatch.setenv(_nccl.MODE_ENV, "group")
    with dl.AllReduceSGD() as sgd, dl.AllReduceEA() as ea:
        for collectives in (sgd._collectives, ea._collectives):
            assert not collectives._own_nccl  # CUDA buffers would use the group's NCCL
    assert dl.build_info()["nccl_mode"] == "group"


def test_joining_has_its_own_bound_not_shorter_than_a_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(_nccl.INIT_TIMEOUT_ENV, raising=False)
    assert _nccl.init_timeout(0.5) == 60.0  # NCCL's init often takes 0.2-2 s
    assert _nccl.init_timeout(600.0) == 600.0
    monkeypatch.setenv(_nccl.INIT_TIMEOUT_ENV, "12.5")
    assert _nccl.init_timeout(0.5) == 12.5
    for bad in ("0", "-3", "inf", "soon"):
        monkeypatch.setenv(_nccl.INIT_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match="DISTLEARN_NCCL_INIT_TIMEOUT must be"):
            _nccl.init_timeout(1.0)


def _registry(rank: int, world_size: int) -> dict:
    import gc
    import weakref

    from distlearn_cuda._comm.collectives import Collectives
    from distlearn_cuda._comm.group import Group, resolve

    device = torch.device("cuda", 0)  # only its index is used: no GPU is touched
    world = resolve(None)
    boot = Collectives(world, datetime.timedelta(seconds=30))

    def acquire(timeout_s: float, group: Group = world) -> _nccl.Lease:
        return _nccl.acquire(group, device, boot, timeout_s, factory=StandInCommunicator)

    report: dict = {}
    hasty, patient = acquire(0.5), acquire(600.0)
    shared = hasty.comm
    report["shared"] = patient.comm is shared
    report["init_timeout"] = shared.init_timeout  # the first user's: max(0.5, 60)
    hasty.release()
    hasty.release()  # idempotent
    report["open_after_one_release"] = not shared.closed
    if rank == 0:
        patient.release()  # rank 0's last user: closed here, still open on rank 1
    report["closed_on_rank0_only"] = shared.closed == (rank == 0)
    later = acquire(5.0)  # the ranks disagree, so every rank makes a new one
    report["new_after_disagreement"] = later.comm is not shared
    ids = [None] * world_size
    dist.all_gather_object(ids, later.comm.unique_id)
    report["same_new_id"] = len(set(ids)) == 1
    again = acquire(5.0)  # now they agree
    report["reused_after_agreement"] = again.comm is later.comm
    if rank == 1:
        patient.release()
    report["old_closed_once"] = shared.closes == 1
    for lease in (later, again):
        lease.release()
    report["new_closed_once"] = later.comm.closes == 1

    sub = dist.new_group(backend="gloo")
    on_sub = acquire(5.0, Group(weakref.ref(sub), rank, world_size))
    dist.destroy_process_group(sub)
    del sub
    gc.collect()
    report["closed_with_its_group"] = on_sub.comm.closes == 1
    on_sub.release()
    report["group_close_counted_once"] = on_sub.comm.closes == 1
    leftover = acquire(5.0)
    _nccl.close_all()  # what the exit handler does
    report["closed_at_exit"] = leftover.comm.closes == 1
    report["nothing_open"] = _nccl.open_communicators() == []
    return report


@needs_nccl
@needs_wheel
def test_communicators_are_shared_refcounted_and_agreed_on_by_the_ranks() -> None:
    reports = run_world(_registry, 2, timeout=120)
    for rank, report in enumerate(reports):
        assert report.pop("init_timeout") == 60.0
        assert all(report.values()), (rank, report)
