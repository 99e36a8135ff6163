"""The documentation: the site builds with ``mkdocs build --strict``, and every
Python example of README.md and docs/*.md runs and checks its own result.

How examples are marked (docs/development.md, "These docs"): a
```` ```python ```` block runs on 2 ranks under torchrun (gloo on
127.0.0.1), all such blocks in one launch, each in a fresh namespace and a
working directory of its own. An HTML comment on the line before the fence
changes that: ``<!-- docs-test: elastic -->`` runs the block as 2 elastic
ranks against a control process the test starts (``CONTROL`` names its
address); ``<!-- docs-test: skip -->`` does not run it. Every run has its
own deadline, and every process a test starts is killed when it ends.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from distlearn_cuda.elastic.control import store_port

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A code fence: CommonMark forbids backticks in a backtick fence's info string.
FENCE = re.compile(r"^\s*(?P<ticks>`{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^<!-- docs-test: (?P<kind>[a-z]+) -->$")
KINDS = ("ranks", "elastic", "skip")  # "ranks" when unmarked
MAX_SKIPPED = 2  # keep the blocks that are not run few
RANKS = 2
BUILD_TIMEOUT_S = 120.0
RANKS_TIMEOUT_S = 120.0  # every "ranks" block, in one torchrun launch
ELASTIC_TIMEOUT_S = 90.0  # the control process's start, then both ranks
SECRET = "docs-test-elastic-secret-0123456789"

# Runs each example file given, in order, in this process: torchrun starts
# it on every rank. A block that raises ends the rank (torchrun then stops
# the others), and its traceback names the block's file, named after where
# the block is in the docs.
RUNNER = """\
import os, runpy, sys
for script in sys.argv[1:]:
    os.chdir(script[: -len(".py")])
    runpy.run_path(script, run_name="__main__")
    print(f"docs example ok: rank {os.environ['RANK']}: {os.path.basename(script)}", flush=True)
"""


@dataclass(frozen=True)
class Example:
    path: Path
    line: int  # the fence's, 1-based
    kind: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def write(self, directory: Path, index: int) -> Path:
        """The block as a script, with an empty working directory beside it."""
        slug = re.sub(r"[^A-Za-z0-9]+", "_", self.name)
        script = directory / f"{index:02d}_{slug}.py"
        script.write_text(self.code)
        script.with_suffix("").mkdir()
        return script


def examples_in(path: Path) -> list[Example]:
    found = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        ticks = fence["ticks"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == ticks), len(lines))
        language = fence["info"].strip()
        assert language == "python" or not language.startswith("py"), (
            f"{path.name}:{i + 1}: write ```python (other spellings are not run)"
        )
        if language == "python":
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.match(previous.strip())
            kind = marker["kind"] if marker else "ranks"
            found.append(Example(path, i + 1, kind, "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return found


EXAMPLES = [example for path in DOC_FILES for example in examples_in(path)]


def library_env(**extra: str) -> dict[str, str]:
    # DISTLEARN_TEST_LIBRARY: another checkout's library under these tests,
    # as in tests/elastic_job.py.
    library = os.environ.get("DISTLEARN_TEST_LIBRARY", str(ROOT))
    path = os.pathsep.join(p for p in (library, os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        **extra,
    }


def start(command: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """Starts ``command`` in a session of its own (so that it and anything it
    starts can be killed together), its output into ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=10)


def wait_all(processes: list[subprocess.Popen], deadline: float, what: str, *logs: Path) -> None:
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            for p in processes:
                stop(p)
            output = "\n".join(log.read_text() for log in logs)
            pytest.fail(f"{what} still running at the deadline\n{output}")


def test_the_site_builds_strictly_with_only_public_names(tmp_path: Path) -> None:
    assert importlib.util.find_spec("mkdocs"), (
        "mkdocs is not installed (it is in the docs extra: pip install -e '.[docs]')"
    )
    site = tmp_path / "site"
    log = tmp_path / "build.log"
    build = start(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        log,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    try:
        wait_all([build], time.monotonic() + BUILD_TIMEOUT_S, "mkdocs build", log)
    finally:
        stop(build)
    assert build.returncode == 0, log.read_text()
    api = (site / "api" / "index.html").read_text()
    for name in (
        "distlearn_cuda.AllReduceSGD.sum_and_normalize_gradients",
        "distlearn_cuda.AllReduceEA.average_parameters",
        "distlearn_cuda.save_checkpoint",
        "distlearn_cuda.CommunicationError",
        "distlearn_cuda.build_info",
        "distlearn_cuda.elastic.ElasticSGD.synchronize_parameters",
        "distlearn_cuda.elastic.ElasticEA.average_parameters",
        "distlearn_cuda.elastic.View",
        "distlearn_cuda.elastic.control.main",
    ):
        assert f'id="{name}"' in api, f"{name} is not in the API reference"
    # Private modules may move: no object of theirs, nor any private member,
    # has an entry or a link (a default value's tooltip may name its module).
    private = re.findall(r'(?:id|href)="[^"]*distlearn_cuda[\w.]*\._[^"]*"', api)
    assert not private, private


def test_examples_are_marked_and_check_their_results() -> None:
    assert sum(e.path.name == "README.md" for e in EXAMPLES) >= 2, "the README's examples"
    assert {e.kind for e in EXAMPLES} <= set(KINDS), [(e.name, e.kind) for e in EXAMPLES]
    skipped = [e.name for e in EXAMPLES if e.kind == "skip"]
    assert len(skipped) <= MAX_SKIPPED, f"too many examples not run: {skipped}"
    for example in EXAMPLES:
        if example.kind != "skip":
            assert "assert " in example.code and "print(" in example.code, (
                f"{example.name}: an example asserts and prints what it checked"
            )
            compile(example.code, example.name, "exec")


def test_examples_run_on_two_ranks(tmp_path: Path) -> None:
    examples = [e for e in EXAMPLES if e.kind == "ranks"]
    scripts = [e.write(tmp_path, i) for i, e in enumerate(examples)]
    runner = tmp_path / "run_examples.py"
    runner.write_text(RUNNER)
    log = tmp_path / "torchrun.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(RANKS), str(runner), *map(str, scripts)]
    launch = start(command, log, cwd=tmp_path, env=library_env())
    try:
        wait_all([launch], time.monotonic() + RANKS_TIMEOUT_S, "torchrun", log)
    finally:
        stop(launch)
    output = log.read_text()
    for example, script in zip(examples, scripts, strict=True):
        for rank in range(RANKS):
            assert f"docs example ok: rank {rank}: {script.name}" in output, (
                f"{example.name} failed on rank {rank}:\n{output}"
            )
    assert launch.returncode == 0, output


@pytest.mark.parametrize(
    "example", [e for e in EXAMPLES if e.kind == "elastic"], ids=lambda e: e.name
)
def test_elastic_examples_run_as_two_ranks(example: Example, tmp_path: Path) -> None:
    pytest.importorskip("torchft", reason="elastic mode needs torchft (the elastic extra)")
    deadline = time.monotonic() + ELASTIC_TIMEOUT_S
    env = library_env(DISTLEARN_ELASTIC_SECRET=SECRET)
    control_log = tmp_path / "control.log"
    control = start(
        [sys.executable, "-m", "distlearn_cuda.elastic.control", "--port", "0"],
        control_log,
        env=env,
        cwd=os.environ.get("DISTLEARN_TEST_LIBRARY"),  # python -m imports from the cwd
    )
    processes = [control]
    try:
        while not (ready := [s for s in control_log.read_text().splitlines() if " store " in s]):
            assert control.poll() is None, control_log.read_text()
            assert time.monotonic() < deadline, "the control process did not start"
            time.sleep(0.05)
        env["CONTROL"] = f"127.0.0.1:{store_port(ready[0])}"
        script = example.write(tmp_path, 0)
        logs = [tmp_path / f"rank{i}.log" for i in range(RANKS)]
        ranks = [
            start([sys.executable, str(script)], log, cwd=script.with_suffix(""), env=env)
            for log in logs
        ]
        processes += ranks
        wait_all(ranks, deadline, example.name, control_log, *logs)
        for rank, log in zip(ranks, logs, strict=True):
            assert rank.returncode == 0, f"{example.name}:\n{log.read_text()}"
    finally:
        for process in processes:
            stop(process)
