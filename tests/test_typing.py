"""Types. The package type-checks with mypy (its own code, the examples
included), and the public API is typed as a user's type checker sees it:
the package ships ``py.typed``, and mypy flags a wrong option
(``nonfinite="drop"``, ``backend="mpi"``, a string timeout) in the user's
code, on its line, while correct code checks clean. There only the user's
file is checked (the package followed silently: its annotations are what is
read; torch's and torchft's skipped, as Any, which keeps a cold run near a
second instead of 12 s).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="the [test] extra installs mypy")

ROOT = Path(__file__).resolve().parents[1]
MYPY_TIMEOUT_S = 120.0
MYPY_CONFIG = """\
[mypy]
follow_imports = silent
[mypy-torch.*]
follow_imports = skip
[mypy-torchft.*]
follow_imports = skip
"""

USER_CODE = """\
import datetime

import torch

import distlearn_cuda as dl
from distlearn_cuda.elastic import ElasticEA, ElasticSGD

model = torch.nn.Linear(4, 2)
sgd = dl.AllReduceSGD(timeout=datetime.timedelta(seconds=5), allow_unused=True)
sgd.sum_and_normalize_gradients(model, nonfinite="skip")
ea = dl.AllReduceEA(tau=4, beta=0.9, nonfinite="raise", comm_dtype=torch.bfloat16)
ea.average_parameters(model)
center: dict[str, torch.Tensor] = ea.center
dl.save_checkpoint(sgd.state_dict(), "ckpt.pt")
ElasticSGD("127.0.0.1:29400", model, backend="gloo")
ElasticEA("127.0.0.1:29400", model, backend=None, tau=2)
"""
# (line, what mypy must say about it): each a mistake a user makes.
MISTAKES = {
    "sgd.sum_and_normalize_gradients(model, nonfinite='drop')": '"nonfinite"',
    "dl.AllReduceSGD(timeout='5')": '"timeout"',
    "dl.AllReduceEA(tau='10')": '"tau"',
    "dl.AllReduceEA(nonfinite='ignore')": '"nonfinite"',
    "ElasticSGD('127.0.0.1:29400', model, backend='mpi')": '"backend"',
    "sgd.sum_gradients(model, 'skip', 3)": "Too many",
}


def run_mypy(tmp_path: Path, source: str) -> list[tuple[int, str]]:
    """(line, message) of each error mypy reports in ``source``."""
    user = tmp_path / "user_code.py"
    user.write_text(source)
    config = tmp_path / "mypy.ini"
    config.write_text(MYPY_CONFIG)
    done = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--config-file", str(config), "--no-error-summary",
            "--cache-dir", str(tmp_path / "cache"), "--python-version",
            f"{sys.version_info.major}.{sys.version_info.minor}", str(user),
        ],
        capture_output=True, text=True, timeout=MYPY_TIMEOUT_S, cwd=ROOT,
    )  # fmt: skip
    errors = []
    for line in done.stdout.splitlines():
        match = re.match(rf"{re.escape(str(user))}:(\d+): error: (.*)", line)
        if match:
            errors.append((int(match[1]), match[2]))
    assert done.returncode in (0, 1) and (done.returncode == 1) == bool(errors), done
    return errors


def test_the_package_ships_its_annotations() -> None:
    assert (ROOT / "distlearn_cuda" / "py.typed").exists()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()


def test_a_users_mistakes_are_flagged_and_correct_code_checks_clean(tmp_path: Path) -> None:
    # One run: the correct code, then one mistake per line.
    lines = USER_CODE.splitlines()
    first_mistake = len(lines) + 1
    source = "\n".join([*lines, *MISTAKES]) + "\n"
    errors = run_mypy(tmp_path, source)
    clean = [(n, m) for n, m in errors if n < first_mistake]
    assert not clean, f"correct code flagged: {clean}"
    for offset, (mistake, expected) in enumerate(MISTAKES.items()):
        said = [m for n, m in errors if n == first_mistake + offset]
        assert said and expected in said[0], f"{mistake}: mypy said {said}"


# pyproject.toml's [tool.mypy], with torch's annotations skipped (Any): a cold
# run over the package takes ~4 s of CPU instead of ~17 (`mypy` at the root
# runs the full configuration; it passed at the commit that added this).
UNTYPED = ["torchft.*", "sklearn.*", "tqdm.*", "nvidia.*", "matplotlib.*"]
PACKAGE_CONFIG = f"""\
[mypy]
python_version = 3.10
[mypy-{",".join(UNTYPED)}]
ignore_missing_imports = true
[mypy-torch.*]
follow_imports = skip
"""


def test_the_package_type_checks(tmp_path: Path) -> None:
    declared = re.search(r"module = \[([^]]*)\]", (ROOT / "pyproject.toml").read_text())
    assert declared and re.findall(r'"([^"]+)"', declared[1]) == UNTYPED
    config = tmp_path / "mypy.ini"
    config.write_text(PACKAGE_CONFIG)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir",
         str(tmp_path / "cache"), "distlearn_cuda"],
        capture_output=True, text=True, timeout=MYPY_TIMEOUT_S, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_extensions_stub_declares_what_the_built_module_defines() -> None:
    import ast

    from distlearn_cuda import _C

    stub = ast.parse((ROOT / "distlearn_cuda" / "_C.pyi").read_text())
    declared: dict[str, set[str]] = {"": set()}
    for node in stub.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            declared[""].add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            declared[""].add(node.target.id)
        if isinstance(node, ast.ClassDef):
            declared[node.name] = {
                n.name for n in node.body if isinstance(n, ast.FunctionDef) and n.name[0] != "_"
            }
    # The CUDA ops and the NCCL communicator exist in the CUDA flavor only.
    flavor_only = {"cuda_build_version", "pack_cuda", "unpack_cuda", "ea_blend_cuda"}
    flavor_only |= {"center_update_cuda", "nccl_load", "nccl_loaded", "nccl_error_string"}
    flavor_only |= {"NcclCommunicator"}
    built = {name for name in dir(_C) if not name.startswith("_")}
    assert built <= declared[""], f"not in _C.pyi: {built - declared['']}"
    missing = declared[""] - built
    assert not missing - flavor_only, f"in _C.pyi, not in the module: {missing - flavor_only}"
    if _C.has_cuda:
        assert not missing, f"the CUDA flavor lacks {missing}"
    for cls in {"Layout", "NcclCommunicator"} & built:
        members = {n for n in dir(getattr(_C, cls)) if not n.startswith("_")}
        assert members == declared[cls], (cls, members ^ declared[cls])
