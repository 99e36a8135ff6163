"""NCCL from the extension: where it is loaded from, what it reports, how it fails.

Loading NCCL needs no GPU, so these run in CI where the setup script
installed the nvidia-nccl-cu13 wheel. Loading is once per process, so each
case runs in a fresh interpreter. Collectives over NCCL need a GPU: see
tests/test_cuda_api.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

import distlearn_cuda as dl
from distlearn_cuda import _C, _collectives, _nccl

needs_nccl = pytest.mark.skipif(not _C.has_nccl, reason="this build has no NCCL support")


def wheel_library() -> str | None:
    try:
        import nvidia.nccl
    except ImportError:
        return None
    for directory in nvidia.nccl.__path__:
        path = os.path.join(directory, "lib", "libnccl.so.2")
        if os.path.exists(path):
            return path
    return None


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
    shutil.which("nvcc") is None or wheel_library() is None,
    reason="needs nvcc and the nvidia-nccl-cu13 wheel at build time",
)
def test_nccl_support_is_built_where_the_header_is_found() -> None:
    assert _C.has_nccl
    assert re.fullmatch(r"2\.\d+\.\d+", dl.build_info()["nccl_header_version"])


@needs_nccl
@needs_wheel
def test_nothing_is_loaded_until_asked_then_the_wheel_is() -> None:
    done = run_python(
        """
        import json
        import distlearn_cuda as dl
        from distlearn_cuda import _C, _nccl
        before = dl.build_info()
        version, path = _nccl.load()
        after = dl.build_info()
        print(json.dumps({"before": before, "after": after, "version": version, "path": path,
                          "again": list(_nccl.load()), "message": _C.nccl_error_string(4)}))
        """
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["before"]["nccl_runtime_version"] is None
    assert report["before"]["nccl_library"] is None
    assert report["path"] == wheel_library()
    assert report["version"] >= 21200
    major, minor, patch = map(int, report["after"]["nccl_runtime_version"].split("."))
    assert major * 10000 + minor * 100 + patch == report["version"]
    assert report["after"]["nccl_library"] == wheel_library()
    assert report["again"] == [report["version"], report["path"]]  # loaded once
    # NCCL's own text for ncclInvalidArgument (4), not a message of ours.
    assert "invalid argument" in report["message"].lower()


@needs_nccl
def test_a_missing_library_fails_with_every_candidate_named() -> None:
    done = run_python(
        """
        from distlearn_cuda import _nccl
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
        from distlearn_cuda import _nccl
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
        from distlearn_cuda import _C, _nccl
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
            print("bad timeout:", error)
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
    assert "bad timeout: timeout must be a finite number of seconds > 0" in done.stdout
    if not torch.cuda.is_available():
        assert "no gpu: cudaGetDevice" in done.stdout


def test_a_gloo_group_does_not_use_the_extensions_nccl(world_of_one: None) -> None:
    assert not _collectives.uses_cuda_nccl(dist.group.WORLD)
