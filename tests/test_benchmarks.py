"""Smoke test of the benchmarks: they run, check their own results, and report.

No timing is asserted here: speed is read from the reports, next to the
machine and date they were measured on (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from benchmarks.shapes import RESNET50_NUM_PARAMS, RESNET50_NUM_TENSORS, resnet50_shapes

REPO = Path(__file__).resolve().parents[1]


def test_resnet50_shapes_match_torchvision_counts() -> None:
    shapes = resnet50_shapes()
    assert len(shapes) == RESNET50_NUM_TENSORS == 161
    assert sum(math.prod(s) for s in shapes) == RESNET50_NUM_PARAMS == 25_557_032


def test_bench_cpu_ops_quick_writes_its_reports(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.bench_cpu_ops", "--quick", "--threads", "1"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "cpu_ops_quick.json").read_text())
    assert report["meta"]["tensors"] == RESNET50_NUM_TENSORS
    assert report["meta"]["torch_threads"] == 1
    assert {"date", "cpu", "torch", "commit", "stream_gbps"} <= report["meta"].keys()
    cases = [row["case"] for row in report["rows"]]
    assert len(cases) == 4 and any("sum_and_normalize_gradients" in c for c in cases)
    for row in report["rows"]:
        assert row["fused_ms"] > 0 and row["eager_ms"] > 0
        assert math.isclose(row["speedup"], row["eager_ms"] / row["fused_ms"])
    assert (tmp_path / "cpu_ops_quick.png").stat().st_size > 0
    assert "| case |" in (tmp_path / "cpu_ops_quick.md").read_text()
